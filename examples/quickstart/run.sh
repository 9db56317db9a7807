#!/usr/bin/env bash
# The quickstart: X-OPD on CPU with TP=2 on 2 gloo processes, in minutes.
# 1) speaks ~32 arithmetic prompts with espeak-ng and caches their Whisper-base encoder features;
# 2) trains SmolLM2-135M-Instruct's speech student against the same LLM as text teacher;
# 3) prints the first and last kl_cm / kl_im of runs/quickstart/metrics.jsonl.
# Extra arguments are Hydra overrides, e.g. `bash examples/quickstart/run.sh xopd.lam=1.0 trainer.max_steps=4`.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python examples/quickstart/prepare_data.py --out-dir runs/quickstart/data
torchrun --nproc-per-node 2 --master-port "${MASTER_PORT:-29511}" examples/train_xopd.py --config-name quickstart \
  checkpoint.resume=false "$@"
python - <<'PY'
import json
rows = [json.loads(line) for line in open("runs/quickstart/metrics.jsonl")]
first, last = rows[0], rows[-1]
print(f"steps: {len(rows)}; kl_cm {first['kl_cm']:.4f} -> {last['kl_cm']:.4f}; kl_im {first['kl_im']:.4f} -> {last['kl_im']:.4f}")
PY
