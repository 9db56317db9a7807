#!/usr/bin/env bash
# The mini replication of the X-OPD paper's Table 1 on this CPU (docs/results.md reports what it measured).
#
#   bash examples/mini_replication/run.sh            # everything: data, alignment, 4 methods, evaluation, table
#   SEED=1 OUT=runs/mini_replication_s1 bash examples/mini_replication/run.sh
#
# 1) data: spoken arithmetic prompts (reasoning-gym basic_arithmetic, espeak-ng, Whisper-base features);
# 2) align the perception's adapter and projection alone (the LLM frozen), in two stages: ctc (a CTC warm start
#    against the LLM's token embeddings, tools/warmstart_adapter_ctc.py), then align (SFT from S on the teacher's
#    greedy answers to T). This is the starting student, which answers worse from S than from T;
# 3) start: its accuracy from S and T on the held-out split, and the teacher's from T;
# 4) from that student, with the same data, optimizer steps and learning rate, the LLM trains by
#    offline KD (SFT on the teacher's greedy answers, S and T, lam 0.5), X-OPD lam 0.5, lam 0 and lam 1,
#    each evaluated on the held-out split at its last step;
# 5) the table: OUT/results.md and OUT/results.json.
# A finished stage is skipped on a rerun (its DONE file), so a crash loses only the stage it hit.
# Extra arguments are Hydra overrides for every method run (e.g. optim.lr=1e-5).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/mini_replication}
SEED=${SEED:-1234}
DATA_SEED=${DATA_SEED:-0}
CTC_STEPS=${CTC_STEPS:-40}
ALIGN_STEPS=${ALIGN_STEPS:-8}
STEPS=${STEPS:-12}  # one epoch of the train split at 8 prompts a step (the paper trains 1 epoch)
NPROC=${NPROC:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC ))}
DATA=$OUT/data
mkdir -p "$OUT"

stage() {  # stage NAME CMD...: run CMD unless NAME is done; append its wall time to OUT/timings.jsonl
  local name=$1; shift
  if [[ -f $OUT/$name/DONE ]]; then echo "== $name: done already"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@"
  mkdir -p "$OUT/$name" && touch "$OUT/$name/DONE"
  echo "{\"stage\": \"$name\", \"wall_s\": $(( SECONDS - start ))}" >> "$OUT/timings.jsonl"
}

train() {  # train RUN_NAME OVERRIDES...
  local name=$1; shift
  torchrun --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29517}" examples/train_xopd.py \
    --config-name mini_replication trainer.seed="$SEED" trainer.parallel.tensor_model_parallel_size="$NPROC" \
    data.train="$DATA/train_features.jsonl.gz" data.validation="$DATA/test_features.jsonl.gz" \
    logging.dir="$OUT/$name" "$@"
}

stage data python examples/mini_replication/prepare_data.py --out-dir "$DATA" --seed "$DATA_SEED" --no-progress
stage ctc python tools/warmstart_adapter_ctc.py --cuts "$DATA/alignment_features.jsonl.gz" --steps "$CTC_STEPS" \
  --config examples/conf/mini_replication.yaml --out "$OUT/ctc/perception.safetensors" --seed "$SEED" --no-progress
stage align train align trainer.max_steps="$ALIGN_STEPS" data.train="$DATA/alignment_features.jsonl.gz" \
  data.prompts_per_step=16 xopd.loss=sft xopd.responses=teacher_greedy xopd.lam=0.0 optim.lr=3e-4 \
  model.student.perception_weights="$OUT/ctc/perception.safetensors" model.student.freeze_llm=true \
  model.student.perception.freeze_adapter=false checkpoint.dir="$OUT/align/checkpoints"
START=(checkpoint.init_from="$OUT/align/checkpoints")
stage start train start trainer.max_steps=0 trainer.eval_at_start=true "${START[@]}"
EVAL=(trainer.max_steps="$STEPS" trainer.eval_every="$STEPS" "${START[@]}")
stage offline_kd train offline_kd "${EVAL[@]}" xopd.loss=sft xopd.responses=teacher_greedy xopd.lam=0.5 "$@"
stage xopd_lam0.5 train xopd_lam0.5 "${EVAL[@]}" xopd.lam=0.5 "$@"
stage xopd_lam0 train xopd_lam0 "${EVAL[@]}" xopd.lam=0.0 "$@"
stage xopd_lam1 train xopd_lam1 "${EVAL[@]}" xopd.lam=1.0 "$@"
python examples/mini_replication/summarize.py "$OUT"
