#!/usr/bin/env bash
# The peak-load workload (issue 7) against a five-node cluster and a gateway
# on this machine, with emulated inter-region latency off and on.
#
# For each LATENCIES setting, on a fresh cluster (5 `cellpay node`, 3
# regions, 5 datacenters, 4 cells over 100 shards, every cell on all five
# nodes; one `cellpay gateway`; data on the real disk):
#  1. the load: `cellpay bench --gateway` for DURATION_S seconds,
#     BATCH_SIZE-transfer requests, CONCURRENCY clients, CROSS_CELL % of the
#     transfers between two cells, TWO_PHASE % pending then posted, over
#     ACCOUNTS accounts; the bench checks conservation at the end;
#  2. a lone transfer: batches of one, one client, no other load, for
#     LONE_S seconds (its p50 is the latency of one transfer).
# With PROFILE=1 the load of the first setting runs under `perf record`
# (every process, cpu-clock, call graphs from frame pointers when the binary
# has them): $OUT/profile-threads.txt gives the CPU time by process and
# thread, $OUT/profile-symbols.txt the hottest functions, $OUT/flame.svg a
# flame graph (needs inferno: `cargo install inferno`).
#
# Results: $OUT/bench-cluster.json (every bench's JSON, with the settings),
# and a summary table on stdout. Logs in $OUT/logs-<latency>.
#
#   scripts/bench-cluster.sh
#   LATENCIES=off DURATION_S=30 PROFILE=1 scripts/bench-cluster.sh
#
# Settings (environment variables):
#   LATENCIES     the emulated latency settings to run, in order    [off on]
#   ACCOUNTS      accounts                                          [1000000]
#   DURATION_S    seconds of load                                   [60]
#   BATCH_SIZE    transfers per request (1 to 8190)                 [8190]
#   CONCURRENCY   clients, each with one request in flight          [8]
#   CROSS_CELL    % of transfers between two cells                  [10]
#   TWO_PHASE     % of transfers sent pending, then posted          [0]
#   LONE_S        seconds of the lone-transfer run (0: skip it)      [10]
#   PROFILE       1: record the first load with perf                [0]
#   PERF_FREQ     perf samples per second per CPU                    [499]
#   NODE_ARGS     extra flags for every `cellpay node`, say
#                 "--checkpoint-transfers 524288"                   []
#   OUT           results and logs                                  [target/bench-cluster]
#   WORK_BASE     parent of the temporary data directories (a disk) [/var/tmp]
#   CELLPAY_BIN   a cellpay binary to use instead of building one
#                 (default: cargo build --release -p cellpay)
#   READY_TIMEOUT_S, SETTLE_S, WAIT_QUIET_S, QUIET_BUSY_MAX: as in
#                 scripts/bench-baseline.sh                 [120, 5, 0, 15]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh

die() {
    echo "bench-cluster: $*" >&2
    exit 1
}
log() {
    printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}
[ "${1:-}" != "-h" ] && [ "${1:-}" != "--help" ] || {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
}
[ $# -eq 0 ] || die "no arguments: settings are environment variables (see --help)"

: "${LATENCIES:=off on}"
: "${ACCOUNTS:=1000000}"
: "${DURATION_S:=60}"
: "${BATCH_SIZE:=8190}"
: "${CONCURRENCY:=8}"
: "${CROSS_CELL:=10}"
: "${TWO_PHASE:=0}"
: "${LONE_S:=10}"
: "${PROFILE:=0}"
: "${PERF_FREQ:=499}"
: "${OUT:=target/bench-cluster}"
: "${WORK_BASE:=/var/tmp}"
: "${CELLPAY_BIN:=}"
: "${READY_TIMEOUT_S:=120}"
: "${SETTLE_S:=5}"
: "${WAIT_QUIET_S:=0}"
: "${QUIET_BUSY_MAX:=15}"
for var in ACCOUNTS DURATION_S BATCH_SIZE CONCURRENCY CROSS_CELL TWO_PHASE LONE_S PERF_FREQ READY_TIMEOUT_S \
    SETTLE_S WAIT_QUIET_S QUIET_BUSY_MAX; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a whole number, not '${!var}'"
done
for latency in $LATENCIES; do
    case "$latency" in on | off) ;; *) die "LATENCIES takes on and off, not '$latency'" ;; esac
done
[ "$ACCOUNTS" -ge 8 ] || die "ACCOUNTS must be at least 8 (2 in each of the 4 cells)"
{ [ "$BATCH_SIZE" -ge 1 ] && [ "$BATCH_SIZE" -le 8190 ]; } || die "BATCH_SIZE must be 1 to 8190"
[ "$CROSS_CELL" -le 100 ] || die "CROSS_CELL must be 0 to 100"
[ "$TWO_PHASE" -le 100 ] || die "TWO_PHASE must be 0 to 100"
command -v python3 >/dev/null 2>&1 || die "python3 is needed"
if [ "$PROFILE" = 1 ]; then
    command -v perf >/dev/null 2>&1 || die "PROFILE=1 needs perf (Debian: linux-perf)"
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT"/logs-* "$OUT"/*.json "$OUT"/profile-*.txt "$OUT"/flame.svg "$OUT"/perf.data*

if [ -n "$CELLPAY_BIN" ]; then
    CELLPAY=$CELLPAY_BIN
else
    log "building cellpay (cargo build --release -p cellpay)"
    cargo build --release -p cellpay
    target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    CELLPAY="$target_dir/release/cellpay"
fi
[ -x "$CELLPAY" ] || die "no cellpay binary at $CELLPAY"

mkdir -p "$WORK_BASE"
WORK=$(mktemp -d "$WORK_BASE/cellpay-bench-cluster.XXXXXX")
fstype=$(stat -f -c %T "$WORK")
case "$fstype" in
    tmpfs | ramfs) die "WORK_BASE=$WORK_BASE is on $fstype: fsync would cost nothing; pick a directory on a disk" ;;
esac
pids=()
perf_pid=""
cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    [ -z "$perf_pid" ] || kill -INT "$perf_pid" 2>/dev/null
    pids_stop
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

profiled=false
for latency in $LATENCIES; do
    logs="$OUT/logs-$latency"
    cluster_start "$WORK/$latency" "$logs" "$latency"
    cluster_wait_ready "$READY_TIMEOUT_S" "$logs"
    "$CELLPAY" ctl topology --cluster "$cluster" >"$logs/topology.txt"
    sleep "$SETTLE_S"

    # The accounts first, so that the measured run (and the profile) is the load alone.
    log "latency $latency: creating $ACCOUNTS accounts"
    "$CELLPAY" bench --cluster "$cluster" --gateway --address "$gateway" --accounts "$ACCOUNTS" --transfers 0 \
        --ledger 1 >"$logs/accounts.log" 2>&1 || die "creating the accounts failed: see $logs/accounts.log"

    state=$(machine_state)
    log "latency $latency: load for $DURATION_S s ($BATCH_SIZE per request, $CONCURRENCY clients, \
$CROSS_CELL % cross-cell, $TWO_PHASE % two-phase; $state)"
    if [ "$PROFILE" = 1 ] && ! $profiled; then
        perf record -a -g -F "$PERF_FREQ" -o "$OUT/perf.data" -- sleep $((DURATION_S + 5)) \
            >"$logs/perf.log" 2>&1 &
        perf_pid=$!
    fi
    load_ok=true
    "$CELLPAY" bench --cluster "$cluster" --gateway --address "$gateway" --accounts "$ACCOUNTS" \
        --transfers 1000000000000 --duration-s "$DURATION_S" --batch-size "$BATCH_SIZE" \
        --concurrency "$CONCURRENCY" --cross-cell "$CROSS_CELL" --two-phase "$TWO_PHASE" --ledger 1 \
        --output "$OUT/load-$latency.json" 2>&1 | tee "$logs/load.log" || load_ok=false
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" || true
        perf_pid=""
        profiled=true
    fi
    $load_ok || die "the load failed: see $logs/load.log"
    echo "$state" >"$logs/machine-before-load.txt"

    if [ "$LONE_S" -gt 0 ]; then
        log "latency $latency: a lone transfer for $LONE_S s"
        "$CELLPAY" bench --cluster "$cluster" --gateway --address "$gateway" --accounts "$ACCOUNTS" \
            --transfers 1000000000000 --duration-s "$LONE_S" --batch-size 1 --concurrency 1 --cross-cell 0 \
            --ledger 1 --output "$OUT/lone-$latency.json" 2>&1 | tee "$logs/lone.log" ||
            die "the lone-transfer run failed: see $logs/lone.log"
    fi
    pids_stop
    rm -rf "${WORK:?}/$latency"
done

if $profiled; then
    log "profile: $OUT/profile-threads.txt, profile-symbols.txt, flame.svg"
    perf report -i "$OUT/perf.data" --no-children --sort comm --stdio 2>/dev/null |
        grep -v '^$' >"$OUT/profile-threads.txt" || true
    perf report -i "$OUT/perf.data" --no-children --sort comm,dso,sym --stdio -g none --percent-limit 0.3 \
        2>/dev/null | grep -v '^$' >"$OUT/profile-symbols.txt" || true
    if command -v inferno-collapse-perf >/dev/null 2>&1; then
        perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf --all >"$OUT/perf.folded"
        inferno-flamegraph --title "cellpay: five nodes, a gateway and the bench on 2 cores" <"$OUT/perf.folded" \
            >"$OUT/flame.svg"
    else
        echo "bench-cluster: no inferno-collapse-perf (cargo install inferno): no flame graph" >&2
    fi
fi

NODE_ARGS=${NODE_ARGS:-}
export OUT LATENCIES ACCOUNTS DURATION_S BATCH_SIZE CONCURRENCY CROSS_CELL TWO_PHASE LONE_S NODE_ARGS fstype
export_commit
python3 - <<'EOF'
import json, os, platform

env = os.environ
out = env["OUT"]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

result = {
    "commit": env["commit"],
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "data_filesystem": env["fstype"]},
    "settings": {k.lower(): (env[k] if k == "LATENCIES" else int(env[k])) for k in
                 ["LATENCIES", "ACCOUNTS", "DURATION_S", "BATCH_SIZE", "CONCURRENCY", "CROSS_CELL", "TWO_PHASE", "LONE_S"]}
                | {"node_args": env["NODE_ARGS"]},
    "runs": {},
}
print()
print(f"| latency | transfers/s | batch p50 ms | p99 ms | p999 ms | machine CPU-s per M | conserved | lone p50 ms | lone p99 ms |")
print(f"|---|---:|---:|---:|---:|---:|---|---:|---:|")
for latency in env["LATENCIES"].split():
    run, lone = load(f"load-{latency}.json"), load(f"lone-{latency}.json")
    result["runs"][latency] = {"load": run, "lone": lone}
    def f(d, k, scale=1.0):
        v = d.get(k) if d else None
        return "-" if v is None else f"{v * scale:,.1f}" if isinstance(v, float) else f"{v:,}"
    print(f"| {latency} | {f(run, 'transfers_per_second')} | {f(run, 'batch_latency_ms_p50')} | {f(run, 'batch_latency_ms_p99')} "
          f"| {f(run, 'batch_latency_ms_p999')} | {f(run, 'cpu_seconds_per_million_transfers')} | {run and run.get('conserved')} "
          f"| {f(lone, 'batch_latency_ms_p50')} | {f(lone, 'batch_latency_ms_p99')} |")
json.dump(result, open(os.path.join(out, "bench-cluster.json"), "w"), indent=2)
print(f"\nwritten: {out}/bench-cluster.json")
EOF
