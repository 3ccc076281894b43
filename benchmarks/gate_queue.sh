#!/usr/bin/env bash
# Issue 37, first measurement of the novelty gate (--retain-gate, meft.training.gate): does
# routing only the tokens that look like the training data keep what the base model knew,
# with and without replay, and what does it cost in learning? Everything from ONE commit: a
# clean clone of COMMIT with its own venv, `meft bench` per setting with --skip-done (run it
# again from the same commit to continue).
#
#   bash benchmarks/gate_queue.sh COMMIT [RESULTS_DIR] [WORK_DIR]
#   GATE_RUNS="once-0.01-alone layers15-reference" bash benchmarks/gate_queue.sh COMMIT
#
# GATE_RUNS names the settings to run (default: every one); each needs the flags of COMMIT
# (--retain-gate-once: from 8bacb91 on). GATE_SEEDS (default 0,1,2) the seeds.
#
# RESULTS_DIR (default benchmarks/results/novelty-routing/gate-COMMIT) gets one bench
# directory per setting. Built-in set, 90 steps of 12, seeds 0-2, meft:4096 (the main job's
# size) at its tuned rate 3e-3; the references without the gate (meft:4096, meft:4096+retain)
# are run again here, from the same commit, so every number compares within one commit and
# one machine (their retention_adjacent did not exist before). 15 runs of 8-10 minutes on
# 2 cores: about 2.25 hours.
set -euo pipefail
. "$(dirname "$0")/clean_clone.sh"
start_queue gate_queue.sh "benchmarks/results/novelty-routing/gate-{commit}" "$@"

run() {  # output-name, then meft bench arguments
    local name=$1
    shift
    if [[ -n "${GATE_RUNS:-}" && " $GATE_RUNS " != *" $name "* ]]; then
        return 0
    fi
    "$MEFT" bench --seeds "${GATE_SEEDS:-0,1,2}" --steps 90 --batch-size 12 --output "$OUT/$name" \
        --skip-done --no-progress "$@"
}

run gate-0.01-alone --methods meft:4096+retain@3e-3 --retain-gate 0.01 --retain-replay 0
run reference --methods meft:4096@3e-3 meft:4096+retain@3e-3
run gate-0.01-replay --methods meft:4096+retain@3e-3 --retain-gate 0.01
run gate-0.05-alone --methods meft:4096+retain@3e-3 --retain-gate 0.05 --retain-replay 0
# one decision per token (--retain-gate-once), made at the first adapted layer, layer 15 of
# 30 (--layers 15-29: on the base model it passes 45% of the training tokens, 4% of unseen
# general ones); the reference: unprotected meft on the same layers
run once-0.01-alone --layers 15-29 --methods meft:4096+retain@3e-3 --retain-gate 0.01 \
    --retain-gate-once --retain-replay 0
run layers15-reference --layers 15-29 --methods meft:4096@3e-3
# the deciding layer lower, so more layers learn (15 adapted layers learned half of what 30
# do at seed 0): layer 8 separates about as well on the base model (44% of training tokens at
# 5% of unseen general ones)
run once8-0.01-alone --layers 8-29 --methods meft:4096+retain@3e-3 --retain-gate 0.01 \
    --retain-gate-once --retain-replay 0
run layers8-reference --layers 8-29 --methods meft:4096@3e-3
# the contrast (--retain-gate-contrast people, from d26c563 on): questions about well-known
# people (none the probe asks, in templates it does not ask) fitted as old knowledge, so the
# gate separates a person the model does not know rather than a question about a person; per
# layer on all 30 layers, and one decision at layer 15
run gate-contrast-0.01-alone --methods meft:4096+retain@3e-3 --retain-gate 0.01 \
    --retain-gate-contrast people --retain-replay 0
run once-contrast-0.01-alone --layers 15-29 --methods meft:4096+retain@3e-3 \
    --retain-gate 0.01 --retain-gate-once --retain-gate-contrast people --retain-replay 0
# a stricter share with the contrast: on the base model at layer 15 the adjacent kinds'
# answer position passes 0.7% (share 0.01: 9.4%), the test phrasings' 79% (92%)
run gate-contrast-0.002-alone --methods meft:4096+retain@3e-3 --retain-gate 0.002 \
    --retain-gate-contrast people --retain-replay 0
# subject routing (--retain-subject BLOCK, from c3f116e on): one decision per sequence at
# block 13, from a pre-pass on the base model, for every layer; with and without the contrast
run subject13-contrast-alone --methods meft:4096+retain@3e-3 --retain-subject 13 \
    --retain-gate-contrast people --retain-replay 0
run subject13-alone --methods meft:4096+retain@3e-3 --retain-subject 13 --retain-replay 0
# the rate above, for subject routing (it routes fewer positions: at 3e-3 its training loss
# ends higher than unprotected meft's, 0.333 against 0.268 at seed 0)
run subject13-contrast-1e-2-alone --methods meft:4096+retain@1e-2 --retain-subject 13 \
    --retain-gate-contrast people --retain-replay 0
