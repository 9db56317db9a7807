#!/usr/bin/env bash
# The paper's run (README "The paper's run"), command for command, on tiny random models built offline, at EP=2 on
# 2 CPU (gloo) processes, in a few minutes: from two HF checkpoints to a trained Qwen3-Omni directory.
#   bash examples/paper_tiny/run.sh [OUT_DIR]          (default runs/paper_tiny; extra Hydra overrides: $TRAIN_ARGS)
# 0) build the two "downloaded" checkpoints (tiny Qwen3-MoE teacher, tiny Qwen3-Omni thinker) and a few prompts;
# 1) convert the teacher; 2) convert the student (its LLM; the tower kept for the cache); 3) speak the prompts
# (espeak-ng); 4) cache the audio tower's outputs; 5) train (the recipe examples/conf/paper_tiny.yaml);
# 6) export the trained student into the thinker's HF layout; 7) compare the export with the trained checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/paper_tiny}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PORT=${MASTER_PORT:-29531}
run2() { torchrun --nproc-per-node 2 --master-port "$PORT" "$@"; }

python examples/paper_tiny/make_models.py --out "$OUT/hf"
run2 tools/convert_hf_to_mcore.py "$OUT/hf/teacher" "$OUT/ckpt/teacher" --ep 2
run2 tools/convert_qwen3_omni_to_mcore.py "$OUT/hf/student" "$OUT/ckpt/student" --ep 2 --perception features
python tools/synthesize_speech_prompts.py --prompts "$OUT/hf/prompts.jsonl" --out-dir "$OUT/data" --no-progress
run2 tools/cache_audio_features.py --student "$OUT/ckpt/student" --cuts "$OUT/data/cuts.jsonl.gz" \
  --out "$OUT/data/tower_cuts.jsonl.gz" --no-progress
run2 examples/train_xopd.py --config-name paper_tiny \
  model.tokenizer="$OUT/ckpt/student" model.student.mcore_path="$OUT/ckpt/student" \
  model.teacher.mcore_path="$OUT/ckpt/teacher" data.train="$OUT/data/tower_cuts.jsonl.gz" \
  checkpoint.dir="$OUT/ckpt/run" logging.dir="$OUT/logs" ${TRAIN_ARGS:-}
STEP=$(ls -d "$OUT"/ckpt/run/step_* | tail -1)
run2 tools/export_student_to_qwen3_omni.py "$STEP" "$OUT/hf/student" "$OUT/student_hf" --meta-dir "$OUT/ckpt/student" --ep 2
WAV=$(ls "$OUT"/data/wavs/*.wav | head -1)
run2 tools/compare_logits.py --hf "$OUT/student_hf" --mcore "$STEP" --meta-dir "$OUT/ckpt/student" --audio "$WAV" \
  --ep 2 --json | tee "$OUT/compare.json"
