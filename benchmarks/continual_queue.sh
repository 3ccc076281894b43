#!/usr/bin/env bash
# Issue 37, target 3: five disjoint fact sets learned one after another without rehearsing
# the earlier sets' data (`meft bench --sets 5`): after the fifth, does each earlier set keep
# >= 90% of the held-out exact match it had when learned? LoRA with replay beside it under the
# same schedule. Everything from ONE commit: a clean clone of COMMIT with its own venv, `meft
# bench` per setting with --skip-done (run it again from the same commit to continue).
#
#   bash benchmarks/continual_queue.sh COMMIT [RESULTS_DIR] [WORK_DIR]
#
# RESULTS_DIR (default benchmarks/results/continual-learning/five-sets-COMMIT) gets one bench
# directory per setting. Built-in set, 5 sets of 12 people (48 facts, 144 training questions
# each), 36 steps of 12 per set (3 epochs, as the main job's 90 steps over 30 people), seeds
# 0-2, each method at its tuned rate. A run is 180 steps and 15 evaluations: about 20-25
# minutes on 2 cores; 21 runs, about 7-8 hours.
set -euo pipefail
. "$(dirname "$0")/clean_clone.sh"
start_queue continual_queue.sh "benchmarks/results/continual-learning/five-sets-{commit}" "$@"

run() {  # output-name, then meft bench arguments
    local name=$1
    shift
    "$MEFT" bench --sets 5 --people 12 --seeds 0,1,2 --steps 36 --batch-size 12 \
        --output "$OUT/$name" --skip-done --no-progress "$@"
}

# replay for both; meft also holds the rows earlier sets wrote (its continual protection)
run replay --methods lora:all:16+retain@3e-3 meft:4096+retain@3e-3
# meft with nothing replayed: held rows alone, and more rows for later sets to write
run held-rows-alone --methods meft:4096+retain:rep0@3e-3 meft:16384+retain:rep0@3e-3
# the novelty gate (fitted on the first set) with held rows, nothing replayed
run gate-0.01-alone --methods meft:16384+retain:rep0@3e-3 --retain-gate 0.01
# without protection, for scale
run unprotected --methods lora:all:16@3e-3 meft:4096@3e-3
