#!/usr/bin/env bash
# Runs the deterministic simulator on random seeds until stopped (Ctrl-C),
# and keeps every failing seed's report in soak-failures/ (one file per seed,
# with the command that replays it).
#   scripts/soak.sh [steps]     (default 30000 steps per seed)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-30000}"
cargo build --release --quiet -p cellpay
mkdir -p soak-failures
runs=0
failures=0
started=$(date +%s)
trap 'echo; echo "$runs seeds, $failures failed, in $(( $(date +%s) - started )) s"; exit' INT TERM
while true; do
    seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
    if ! ./target/release/cellpay sim --seed "$seed" --steps "$steps" > "soak-failures/.current" 2>&1; then
        mv soak-failures/.current "soak-failures/seed-$seed.txt"
        failures=$((failures + 1))
        echo "seed $seed FAILED: soak-failures/seed-$seed.txt"
    fi
    runs=$((runs + 1))
    if (( runs % 100 == 0 )); then
        echo "$runs seeds, $failures failed, in $(( $(date +%s) - started )) s"
    fi
done
