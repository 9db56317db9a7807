#!/usr/bin/env bash
# The miniature of the X-OPD paper's Table 1 (and Table 3's forgetting check) on this CPU, from one command:
#
#   bash examples/mini_replication/run.sh                    # OUT=runs/mini_table1: all stages, then the table
#   OUT=runs/other bash examples/mini_replication/run.sh --plan plan.json
#
# examples/mini_replication/study.py holds the stages, the fixed learning-rate grid and seeds, and the estimated
# cost (about 2.25 CPU-hours here). A finished stage is skipped on a rerun (its OUT/<stage>/DONE), so the study
# may span sessions; it writes OUT/results.md, OUT/results.json and OUT/plots/*.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
exec python examples/mini_replication/study.py --out "${OUT:-runs/mini_table1}" "$@"
