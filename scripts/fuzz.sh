#!/usr/bin/env bash
# Fuzzes the broker's parsers with cargo-fuzz (fuzz/, its own workspace; not
# run in CI: tests/fuzz_corpus.rs replays the seeds and crashes there).
#
#   scripts/fuzz.sh                       every target, 10,000,000 executions each
#   scripts/fuzz.sh -n 1000000 handles    named targets, N executions
#   scripts/fuzz.sh -t 900 config         stop a target after 900 s as well
#   scripts/fuzz.sh seeds                 regenerate fuzz/seeds/ from real wire bytes
#   scripts/fuzz.sh list                  the targets
#
# One fuzzer at a time, one job. The working corpus grows in fuzz/corpus/
# (git-ignored); crash, timeout and OOM inputs are copied into
# fuzz/regressions/<target>/, where the corpus test replays them: commit
# them with the fix. Needs nightly features, so RUSTC_BOOTSTRAP=1 on stable.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(sasl_frames sasl_plain thrift_header open_session_rewrite handles http_auth jdbc_url config)
RUNS=10000000
MAX_TIME=0

max_len() {
    case "$1" in
        sasl_frames | thrift_header | handles | open_session_rewrite) echo 16384 ;;
        config | http_auth) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

if [[ "${1:-}" == seeds ]]; then
    cargo test --test fuzz_corpus -- --ignored generate_seeds --nocapture
    exit
fi
if [[ "${1:-}" == list ]]; then
    printf '%s\n' "${TARGETS[@]}"
    exit
fi
while getopts "n:t:" opt; do
    case "$opt" in
        n) RUNS=$OPTARG ;;
        t) MAX_TIME=$OPTARG ;;
        *) sed -n '2,14p' "$0" >&2; exit 64 ;;
    esac
done
shift $((OPTIND - 1))
if (($# > 0)); then
    for t in "$@"; do
        [[ " ${TARGETS[*]} " == *" $t "* ]] || { echo "unknown target '$t' (scripts/fuzz.sh list)" >&2; exit 64; }
    done
    TARGETS=("$@")
fi

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# one build for all targets: AddressSanitizer and debug assertions (overflow checks) on
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo fuzz build -a

summary=()
failed=0
for t in "${TARGETS[@]}"; do
    corpus=fuzz/corpus/$t
    artifacts=fuzz/artifacts/$t
    mkdir -p "$corpus" "$artifacts" "fuzz/regressions/$t"
    # what an earlier run found is in fuzz/regressions already
    rm -f "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/leak-*
    log=fuzz/artifacts/$t.log
    echo "[fuzz] $t: $RUNS executions (max_len $(max_len "$t"))"
    status=ok
    # new inputs go to the first corpus directory; the others are read only
    if ! cargo fuzz run -a "$t" "$corpus" "fuzz/seeds/$t" "fuzz/regressions/$t" -- \
        -runs="$RUNS" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -timeout=10 \
        -max_total_time="$MAX_TIME" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1; then
        status=FAILED
        failed=1
    fi
    for a in "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/leak-*; do
        [[ -e "$a" ]] || continue
        cp "$a" "fuzz/regressions/$t/"
        echo "[fuzz] $t: $(basename "$a") copied to fuzz/regressions/$t/"
        status=FOUND
    done
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1)
    summary+=("$(printf '%-22s %12s %10s %8s  %s' "$t" "${execs:-?}" "${rate:-?}" "${secs:-?}" "$status")")
    tail -n 3 "$log"
done

echo
printf '%-22s %12s %10s %8s  %s\n' target executions exec/s seconds status
printf '%s\n' "${summary[@]}"
if ((failed)); then
    echo "[fuzz] a target failed: see fuzz/artifacts/<target>.log and fuzz/regressions/" >&2
    exit 1
fi
