#!/usr/bin/env bash
# Issue 34's runs: the same protection (replay) for LoRA, full fine-tuning and meft, compared at
# matched learning. Everything from ONE commit: a clean clone of COMMIT with its own venv, then
# `meft bench` invocations in order of use, each with --skip-done, so the queue continues where
# it stopped when run again (a session can end at any time; run it again from the same commit
# and only the missing runs train).
#
#   bash benchmarks/attribution_queue.sh COMMIT [RESULTS_DIR] [WORK_DIR]
#
# RESULTS_DIR (default benchmarks/results/attribution-COMMIT in this checkout) gets synthetic/
# and airports/: one JSON per run, summary.json, matched.json, table.md, plots. Roughly eleven
# hours on 2 cores (8-10 minutes a built-in run, about an hour an airports one): the built-in
# set (90 steps of 12, three seeds, tuned rate and one lower, with and without +retain: 36 runs;
# then one rate higher for the +retain methods: 9 runs), then the protected airports runs (664
# steps of 12, one seed), then the unprotected airports runs again, since the headline retention
# (kinds replay never trains) did not exist when those were committed.
set -euo pipefail
. "$(dirname "$0")/clean_clone.sh"
start_queue attribution_queue.sh "benchmarks/results/attribution-{commit}" "$@"

# 1. built-in set: tuned rates (LoRA 3e-3, full 3e-4, meft 3e-3: compare-tuned-synthetic)
#    and one lower each, with and without replay, seeds 0-2 (seed-major: seed 0 of every
#    configuration lands first)
"$MEFT" bench --methods lora:all:16@1e-3,3e-3 lora:all:16+retain@1e-3,3e-3 \
    full@1e-4,3e-4 full+retain@1e-4,3e-4 meft:4096@1e-3,3e-3 meft:4096+retain@1e-3,3e-3 \
    --seeds 0,1,2 --steps 90 --batch-size 12 --output "$OUT/synthetic" --skip-done \
    --no-progress

# 1b. one rate higher for every +retain method: their tuned rates were tuned without replay,
#     and replay slows learning (seed 0: LoRA 75.8 -> 41.7 val EM at 3e-3), so the rate above
#     (which collapsed without replay in compare-tuned-synthetic) may be their best now
"$MEFT" bench --methods lora:all:16+retain@1e-2 full+retain@1e-3 meft:4096+retain@1e-2 \
    --seeds 0,1,2 --steps 90 --batch-size 12 --output "$OUT/synthetic" --skip-done \
    --no-progress

# 2. airports, protected, at the tuned rates (compare-tuned-airports), one seed
"$MEFT" bench --dataset airports --methods lora:all:16+retain@3e-3 full+retain@3e-4 \
    meft:16384+retain@3e-3 --steps 664 --batch-size 12 --eval-every 83 \
    --output "$OUT/airports" --skip-done --no-progress

# 3. airports, unprotected, again: the committed runs measured only the kinds replay trains
"$MEFT" bench --dataset airports --methods lora:all:16@3e-3 full@3e-4 meft:16384@3e-3 \
    --steps 664 --batch-size 12 --eval-every 83 --output "$OUT/airports" --skip-done \
    --no-progress
