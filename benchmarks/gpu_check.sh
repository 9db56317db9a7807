#!/usr/bin/env bash
# The one prepared GPU check (docs/gpu.md), under 8 minutes on one GPU. On the lent machine, from the repo root:
#   bash scripts/wheelhouse.sh .whl --python 3.12          # here, with network (carry .whl)
#   OUT=$OUT bash benchmarks/gpu_check.sh                    # there: installs .whl offline, runs, writes $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check.sh: wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
start=$(date +%s)
# The kernels (inplace_repeat first), the trainer, the decode; budgets leave each script time to finish its last
# section, and the three timeouts add up to 450 s.
timeout 160 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" --budget-s 110 > "$OUT/gpu_check.log" 2>&1
echo "gpu_check.py: rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 170 python3 benchmarks/gpu_trainer.py --out "$OUT/gpu_trainer.json" --budget-s 120 > "$OUT/gpu_trainer.log" 2>&1
echo "gpu_trainer.py: rc=$? in $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 120 python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json" --budget-s 90 > "$OUT/gpu_decode.log" 2>&1
echo "gpu_decode.py: rc=$? in $(( $(date +%s) - start )) s"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# GPU check", ""]
for name in ("gpu_check", "gpu_trainer", "gpu_decode"):
    path = out / f"{name}.json"
    if not path.exists():
        lines.append(f"- {name}: no result (see {name}.log)")
        continue
    result = json.loads(path.read_text())
    lines.append(f"## {name}: {'ok' if result.get('ok') else 'FAILED'}")
    for section, value in result.get("sections", {}).items():
        shown = {k: v for k, v in value.items() if k != "trace"} if isinstance(value, dict) else value
        lines.append(f"- `{section}`: `{json.dumps(shown)[:600]}`")
    lines.append("")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
