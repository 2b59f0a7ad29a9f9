#!/usr/bin/env bash
# Runs every cargo-fuzz target for a while (default 20 s each): ci/fuzz.sh [SECONDS]
# [TARGET...]. Installs the nightly toolchain and cargo-fuzz when missing. Corpora
# live in fuzz/corpus/<target> (seeds are committed; what the fuzzer adds stays local
# unless FUZZ_KEEP_CORPUS=1). A crash leaves its input in fuzz/artifacts/<target> and
# fails the script. FUZZ_RUNS=N runs each target for N executions instead of a time.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
shift || true
targets=("$@")

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
rustup target list --toolchain nightly --installed | grep -qx x86_64-unknown-none \
    || rustup target add --toolchain nightly x86_64-unknown-none
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2

if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

cargo +nightly fuzz build

status=0
for t in "${targets[@]}"; do
    seeds="fuzz/corpus/$t"
    work="target/fuzz-corpus/$t"
    mkdir -p "$work" "$seeds"
    [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ] && work="$seeds"
    limit=(-max_total_time="$secs")
    [ -n "${FUZZ_RUNS:-}" ] && limit=(-runs="$FUZZ_RUNS")
    what="$secs s"; [ -n "${FUZZ_RUNS:-}" ] && what="$FUZZ_RUNS runs"
    echo "== fuzz $t ($what)"
    log="target/fuzz-$t.log"
    if cargo +nightly fuzz run "$t" "$work" "$seeds" -- "${limit[@]}" -rss_limit_mb=2048 \
        -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        echo "   ok: $runs executions, $speed/s, peak RSS $rss MB"
    else
        status=1
        echo "   FAILED: see $log and fuzz/artifacts/$t"
        tail -30 "$log"
    fi
done
exit $status
