#!/usr/bin/env bash
# Issue 39's sweep: how recall of trained facts falls as their number grows, per method, against
# what each method costs on the device. Everything from ONE commit: a clean clone of COMMIT with
# its own venv, then `meft bench` per size with --skip-done, so the queue continues where it
# stopped when run again (a session can end at any time).
#
#   bash benchmarks/capacity_queue.sh COMMIT [RESULTS_DIR] [WORK_DIR]
#
# RESULTS_DIR (default benchmarks/results/capacity-COMMIT) gets people-30/, people-120/,
# people-480/ (120, 480 and 1,920 facts: the built-in invented people, one training phrasing
# per fact, the held-out phrasing for the test), then capacity.json, table.md and the plots
# (benchmarks/capacity.py). Each size trains 5 exposures per fact at batch 32 (steps = 5 x
# facts / 32, rounded up), so larger sets get proportionally more steps. Every method at one
# rate: its default, which is its tuned rate on the built-in set (tuned-comparison-synthetic:
# LoRA r < 32 3e-3, r >= 32 1e-3, full 3e-4, meft 3e-3), borrowed, not tuned per size.
# Retention is not measured (--no-retention: this is about storing), evaluation asks at most 200
# questions per split. Roughly ten hours on 2 cores; the largest size runs a second seed last.
set -euo pipefail
. "$(dirname "$0")/clean_clone.sh"
start_queue capacity_queue.sh "benchmarks/results/capacity-{commit}" "$@"
METHODS=(lora:qv:8 lora:all:4 lora:all:16 lora:all:64 full meft:4096 meft:16384
         meft:65536:bf16:rowwise)

size() {  # people seeds
    local facts=$(($1 * 4))
    "$MEFT" bench --people "$1" --train-phrasings 1 --methods "${METHODS[@]}" \
        --steps $(((5 * facts + 31) / 32)) --batch-size 32 --seeds "$2" --max-eval 200 \
        --no-retention --output "$OUT/people-$1" --skip-done --no-progress
    "$WORK/.venv/bin/python" benchmarks/capacity.py "$OUT"
}

size 30 0
size 120 0
size 480 0
size 480 0,1
