#!/usr/bin/env bash
# A baseline on this machine: PostgreSQL and cellpay side by side, in one run.
#
#  1. PostgreSQL (Debian's package, installed with apt-get if missing),
#     started on 127.0.0.1 on a free port with a fresh data directory on the
#     real disk, fsync = on, synchronous_commit = on, runs
#     - the transfer workload of `cellpay bench` as SQL
#       (scripts/baseline/transfer.sql: two distinct random accounts, an
#       amount of 1 to 1000, one transaction each: the debit with a balance
#       check, the credit, a history row), then checks that money is
#       conserved (scripts/baseline/check.sql);
#     - pgbench's built-in TPC-B-like script, as a reference;
#     each with the same number of clients for the same time. PostgreSQL is
#     then stopped.
#  2. cellpay: a five-node cluster on loopback as in the README (`ctl init
#     --cells 4 --no-latency`, five `cellpay node`, one `cellpay gateway`,
#     data on the real disk), then `cellpay bench --gateway` with the same
#     accounts and clients.
#  3. Prints transactions/s and the ratios cellpay / PostgreSQL, and writes
#     every number and parameter to $OUT/baseline.json ($OUT/logs: the logs).
#
# Every process it starts is stopped and the temporary data removed at exit.
#
#   scripts/bench-baseline.sh
#   DURATION_S=10 ACCOUNTS=10000 CELLPAY_TRANSFERS=300000 scripts/bench-baseline.sh
#   scripts/bench-baseline.sh --duration-s 10 --accounts 10000 --cellpay-transfers 300000
#
# Settings: environment variables, or the same names as flags
# (--cellpay-transfers N or --cellpay-transfers=N sets CELLPAY_TRANSFERS):
#   ACCOUNTS           accounts, in PostgreSQL and in cellpay           [100000]
#   CONCURRENCY        clients: pgbench -c, cellpay bench --concurrency [8]
#   DURATION_S         seconds each pgbench run lasts (pgbench -T)      [30]
#   CELLPAY_TRANSFERS  transfers cellpay bench sends                    [2000000]
#   BATCH_SIZE         transfers per cellpay request (1 to 8190)        [8190]
#   CROSS_CELL         % of cellpay transfers between two cells         [10]
#   TPCB_SCALE         scale of the TPC-B-like database (pgbench -i -s) [10]
#   INITIAL_BALANCE    each PostgreSQL account's starting balance       [1000000]
#   PG_SHARED_BUFFERS  PostgreSQL shared_buffers                        [256MB]
#   PGBENCH_JOBS       pgbench threads (-j)               [min(CONCURRENCY, nproc)]
#   OUT                results and logs                                 [target/baseline]
#   WORK_BASE          parent of the temporary data directories; must be
#                      a real disk, not tmpfs                           [/var/tmp]
#   CELLPAY_BIN        a cellpay binary to use instead of building one
#                      (default: cargo build --release -p cellpay, which
#                      honours CARGO_TARGET_DIR)
#   KEEP_WORK          1 keeps the temporary data directories           [0]
#   READY_TIMEOUT_S    how long to wait for the cluster to elect leaders [120]
#   SETTLE_S           pause once the cluster is ready                  [5]
#   WAIT_QUIET_S       before each measured run, wait up to this long
#                      for the machine to be under QUIET_BUSY_MAX % busy [0]
#   QUIET_BUSY_MAX     (CPU busy share over 2 s; it is recorded, and a
#                      warning printed above it, either way)            [15]
#
# Needs python3 (ports, readiness, the JSON) and, without CELLPAY_BIN, cargo. Run as root, it uses apt-get
# directly and runs PostgreSQL as the `postgres` user; otherwise it uses sudo
# for apt-get only and runs PostgreSQL as the current user.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cluster.sh

settings=" ACCOUNTS CONCURRENCY DURATION_S CELLPAY_TRANSFERS BATCH_SIZE CROSS_CELL TPCB_SCALE INITIAL_BALANCE"
settings+=" PG_SHARED_BUFFERS PGBENCH_JOBS OUT WORK_BASE CELLPAY_BIN KEEP_WORK READY_TIMEOUT_S SETTLE_S"
settings+=" WAIT_QUIET_S QUIET_BUSY_MAX "

die() {
    echo "bench-baseline: $*" >&2
    exit 1
}
log() {
    printf '\n[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        --*=*)
            name=${1%%=*}
            value=${1#*=}
            shift
            ;;
        --*)
            [ $# -ge 2 ] || die "$1 needs a value"
            name=$1
            value=$2
            shift 2
            ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    var=$(printf '%s' "${name#--}" | tr 'a-z-' 'A-Z_')
    case "$settings" in
        *" $var "*) printf -v "$var" '%s' "$value" ;;
        *) die "unknown option $name (see --help)" ;;
    esac
done

: "${ACCOUNTS:=100000}"
: "${CONCURRENCY:=8}"
: "${DURATION_S:=30}"
: "${CELLPAY_TRANSFERS:=2000000}"
: "${BATCH_SIZE:=8190}"
: "${CROSS_CELL:=10}"
: "${TPCB_SCALE:=10}"
: "${INITIAL_BALANCE:=1000000}"
: "${PG_SHARED_BUFFERS:=256MB}"
cpus=$(nproc)
: "${PGBENCH_JOBS:=$((CONCURRENCY < cpus ? CONCURRENCY : cpus))}"
: "${OUT:=target/baseline}"
: "${WORK_BASE:=/var/tmp}"
: "${CELLPAY_BIN:=}"
: "${KEEP_WORK:=0}"
: "${READY_TIMEOUT_S:=120}"
: "${SETTLE_S:=5}"
: "${WAIT_QUIET_S:=0}"
: "${QUIET_BUSY_MAX:=15}"

for var in ACCOUNTS CONCURRENCY DURATION_S CELLPAY_TRANSFERS BATCH_SIZE CROSS_CELL TPCB_SCALE INITIAL_BALANCE \
    PGBENCH_JOBS READY_TIMEOUT_S SETTLE_S WAIT_QUIET_S QUIET_BUSY_MAX; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a whole number, not '${!var}'"
done
[ "$ACCOUNTS" -ge 8 ] || die "ACCOUNTS must be at least 8 (cellpay needs 2 in each of its 4 cells)"
[ "$CONCURRENCY" -ge 1 ] || die "CONCURRENCY must be at least 1"
[ "$DURATION_S" -ge 1 ] || die "DURATION_S must be at least 1"
{ [ "$BATCH_SIZE" -ge 1 ] && [ "$BATCH_SIZE" -le 8190 ]; } || die "BATCH_SIZE must be 1 to 8190"
[ "$CROSS_CELL" -le 100 ] || die "CROSS_CELL must be 0 to 100"
{ [ "$PGBENCH_JOBS" -ge 1 ] && [ "$PGBENCH_JOBS" -le "$CONCURRENCY" ]; } || die "PGBENCH_JOBS must be 1 to CONCURRENCY"
command -v python3 >/dev/null 2>&1 || die "python3 is needed"

mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/logs/* "$OUT/baseline.json" "$OUT/cellpay.json" "$OUT"/pgbench-*.log

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# --- the temporary data directories (real disk), and cleanup at exit --------

mkdir -p "$WORK_BASE"
WORK=$(mktemp -d "$WORK_BASE/cellpay-baseline.XXXXXX")
chmod 755 "$WORK"
fstype=$(stat -f -c %T "$WORK")
case "$fstype" in
    tmpfs | ramfs) die "WORK_BASE=$WORK_BASE is on $fstype: fsync would cost nothing; pick a directory on a disk" ;;
esac
PGDATA="$WORK/pg"
pg_running=""
pids=()

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    pids_stop
    if [ -n "$pg_running" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1
    fi
    [ -f "$PGDATA/server.log" ] && cp "$PGDATA/server.log" "$OUT/logs/postgres.log"
    if [ "$KEEP_WORK" = 1 ]; then
        echo "bench-baseline: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a PostgreSQL server program: as `postgres` when root (PostgreSQL
# refuses to run as root), else as the current user; from / so that an
# unreadable working directory does not matter.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# --- cellpay: build first (a compile error should fail before the long runs) -

if [ -n "$CELLPAY_BIN" ]; then
    CELLPAY=$(readlink -f "$CELLPAY_BIN")
else
    log "building cellpay (cargo build --release -p cellpay)"
    cargo build --release -p cellpay
    target_dir=$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
    CELLPAY="$target_dir/release/cellpay"
fi
[ -x "$CELLPAY" ] || die "no cellpay binary at $CELLPAY"

# --- PostgreSQL: install if missing -------------------------------------------

find_pgbin() {
    local dir command
    # Debian's layout: /usr/lib/postgresql/<version>/bin, newest first.
    while read -r dir; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/pgbench" ]; then
            echo "$dir"
            return 0
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -Vr)
    # Elsewhere: next to pg_ctl on the PATH.
    command=$(command -v pg_ctl 2>/dev/null) || return 1
    dir=$(dirname "$(readlink -f "$command")")
    [ -x "$dir/initdb" ] && [ -x "$dir/pgbench" ] && echo "$dir"
}

if ! PGBIN=$(find_pgbin); then
    log "installing PostgreSQL (apt-get install postgresql)"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
    # Older Debian releases ship pgbench in postgresql-contrib.
    PGBIN=$(find_pgbin) || {
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-contrib
        PGBIN=$(find_pgbin)
    } || die "PostgreSQL installed, but no initdb, pg_ctl and pgbench found"
fi
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user to run PostgreSQL as (it refuses to run as root)"
    command -v runuser >/dev/null 2>&1 || die "runuser (util-linux) is needed to run PostgreSQL as postgres"
fi
pg_version=$("$PGBIN/postgres" --version)

# --- PostgreSQL: a fresh server on loopback ----------------------------------

PG_PORT=$(free_ports 1)
mkdir -m 700 "$PGDATA"
[ "$(id -u)" -ne 0 ] || chown postgres: "$PGDATA"
log "PostgreSQL: $pg_version, data in $PGDATA ($fstype), port $PG_PORT"
as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C >"$OUT/logs/initdb.log" 2>&1 ||
    die "initdb failed: see $OUT/logs/initdb.log"
max_connections=$((CONCURRENCY + 20 > 100 ? CONCURRENCY + 20 : 100))
cat >>"$PGDATA/postgresql.conf" <<EOF

# scripts/bench-baseline.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = $max_connections
shared_buffers = '$PG_SHARED_BUFFERS'
fsync = on
synchronous_commit = on
full_page_writes = on
max_wal_size = '4GB'
checkpoint_timeout = '15min'
EOF
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 start >/dev/null ||
    die "PostgreSQL did not start: see $PGDATA/server.log"
pg_running=1
export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGUSER=postgres
unset PGDATABASE PGSERVICE PGPASSWORD PGOPTIONS
psql=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1)
pg_settings=$("${psql[@]}" -At -d postgres -c "SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name)
    FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'wal_sync_method', 'max_wal_size')")
log "PostgreSQL settings: $pg_settings"

# pgbench's output: the value after "$2 = " or "$2: ".
pgbench_value() {
    sed -n "s/^$2 *[:=] *\([0-9.]*\).*/\1/p" "$1" | head -n 1
}

# --- PostgreSQL: the transfer workload ---------------------------------------

log "PostgreSQL: loading $ACCOUNTS accounts"
"$PGBIN/createdb" transfers
"${psql[@]}" -d transfers -v accounts="$ACCOUNTS" -v initial="$INITIAL_BALANCE" -f scripts/baseline/schema.sql
"${psql[@]}" -d transfers -c CHECKPOINT
load_pg_transfer=$(machine_state)
log "PostgreSQL: transfer workload, $CONCURRENCY clients, $DURATION_S s ($load_pg_transfer)"
"$PGBIN/pgbench" -n -f scripts/baseline/transfer.sql -D accounts="$ACCOUNTS" --max-tries=10 \
    -c "$CONCURRENCY" -j "$PGBENCH_JOBS" -T "$DURATION_S" -P 5 transfers 2>&1 | tee "$OUT/pgbench-transfer.log"
pg_transfer_tps=$(pgbench_value "$OUT/pgbench-transfer.log" tps)
[ -n "$pg_transfer_tps" ] || die "no tps in pgbench's output: see $OUT/pgbench-transfer.log"

IFS='|' read -r pg_accounts pg_total pg_transfers pg_moved pg_mismatched pg_negative < <(
    "${psql[@]}" -At -d transfers -v initial="$INITIAL_BALANCE" -f scripts/baseline/check.sql)
pg_expected_total=$((ACCOUNTS * INITIAL_BALANCE))
pg_conserved=false
if [ "$pg_accounts" = "$ACCOUNTS" ] && [ "$pg_total" = "$pg_expected_total" ] && [ "$pg_mismatched" = 0 ] &&
    [ "$pg_negative" = 0 ]; then
    pg_conserved=true
fi
log "PostgreSQL conservation: $pg_accounts accounts, total balance $pg_total (expected $pg_expected_total), \
$pg_transfers transfers moved $pg_moved, $pg_mismatched accounts off their history, $pg_negative negative: \
conserved=$pg_conserved"

# --- PostgreSQL: pgbench's TPC-B-like reference ------------------------------

log "PostgreSQL: pgbench -i -s $TPCB_SCALE"
"$PGBIN/createdb" tpcb
"$PGBIN/pgbench" -i -q -s "$TPCB_SCALE" tpcb >"$OUT/logs/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed: see $OUT/logs/pgbench-init.log"
"${psql[@]}" -d tpcb -c CHECKPOINT
load_pg_tpcb=$(machine_state)
log "PostgreSQL: TPC-B-like, $CONCURRENCY clients, $DURATION_S s ($load_pg_tpcb)"
"$PGBIN/pgbench" -c "$CONCURRENCY" -j "$PGBENCH_JOBS" -T "$DURATION_S" -P 5 tpcb 2>&1 |
    tee "$OUT/pgbench-tpcb.log"
pg_tpcb_tps=$(pgbench_value "$OUT/pgbench-tpcb.log" tps)
[ -n "$pg_tpcb_tps" ] || die "no tps in pgbench's output: see $OUT/pgbench-tpcb.log"

log "PostgreSQL: stopping"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
pg_running=""

# --- cellpay: a five-node cluster and a gateway on loopback ------------------

cellpay_work="$WORK/cellpay"
cluster_start "$cellpay_work" "$OUT/logs" off
cluster_wait_ready "$READY_TIMEOUT_S" "$OUT/logs"
log "cellpay: settling $SETTLE_S s"
"$CELLPAY" ctl topology --cluster "$cluster" | tee "$OUT/logs/topology.txt"
sleep "$SETTLE_S"

# --- cellpay: the bench -------------------------------------------------------

load_cellpay=$(machine_state)
log "cellpay: bench through the gateway, $ACCOUNTS accounts, $CELLPAY_TRANSFERS transfers, \
$BATCH_SIZE per request, $CONCURRENCY clients, $CROSS_CELL % cross-cell ($load_cellpay)"
cellpay_ok=true
"$CELLPAY" bench --cluster "$cluster" --gateway --address "$gateway" --accounts "$ACCOUNTS" \
    --transfers "$CELLPAY_TRANSFERS" --batch-size "$BATCH_SIZE" --concurrency "$CONCURRENCY" \
    --cross-cell "$CROSS_CELL" --ledger 1 --output "$OUT/cellpay.json" 2>&1 |
    tee "$OUT/logs/cellpay-bench.log" || cellpay_ok=false
[ -s "$OUT/cellpay.json" ] || die "cellpay bench wrote no result: see $OUT/logs/cellpay-bench.log"

# --- the table and baseline.json ---------------------------------------------

export ACCOUNTS CONCURRENCY DURATION_S CELLPAY_TRANSFERS BATCH_SIZE CROSS_CELL TPCB_SCALE INITIAL_BALANCE \
    PG_SHARED_BUFFERS PGBENCH_JOBS OUT pg_version pg_settings pg_transfer_tps pg_tpcb_tps pg_conserved \
    pg_accounts pg_total pg_expected_total pg_transfers pg_moved pg_mismatched pg_negative cellpay_ok \
    load_pg_transfer load_pg_tpcb load_cellpay fstype
export_commit
python3 - <<'EOF'
import json, os, platform, re, time

env = os.environ
out = env["OUT"]

def pgbench(name):
    text = open(os.path.join(out, f"pgbench-{name}.log")).read()
    def number(pattern):
        found = re.search(pattern, text, re.M)
        if not found:
            return None
        return float(found.group(1)) if "." in found.group(1) else int(found.group(1))
    return {
        "transactions_per_second": number(r"^tps = ([0-9.]+)"),
        "transactions": number(r"^number of transactions actually processed: ([0-9]+)"),
        "failed_transactions": number(r"^number of failed transactions: ([0-9]+)"),
        "retried_transactions": number(r"^number of transactions retried: ([0-9]+)"),
        "latency_ms_average": number(r"^latency average = ([0-9.]+) ms"),
        "latency_ms_stddev": number(r"^latency stddev = ([0-9.]+) ms"),
    }

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

transfer, tpcb = pgbench("transfer"), pgbench("tpcb")
cellpay = json.load(open(os.path.join(out, "cellpay.json")))
cellpay_tps = cellpay["transfers_per_second"]
ints = lambda name: int(env[name])
result = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "commit": env["commit"],
    "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                "data_filesystem": env["fstype"]},
    "parameters": {
        "accounts": ints("ACCOUNTS"), "concurrency": ints("CONCURRENCY"), "duration_s": ints("DURATION_S"),
        "cellpay_transfers": ints("CELLPAY_TRANSFERS"), "batch_size": ints("BATCH_SIZE"),
        "cross_cell_percent": ints("CROSS_CELL"), "tpcb_scale": ints("TPCB_SCALE"),
        "initial_balance": ints("INITIAL_BALANCE"), "pgbench_jobs": ints("PGBENCH_JOBS"),
        "pg_shared_buffers": env["PG_SHARED_BUFFERS"],
    },
    "postgresql": {
        "version": env["pg_version"],
        "settings": env["pg_settings"],
        "transfer_workload": dict(transfer, machine_before=env["load_pg_transfer"], conservation={
            "conserved": env["pg_conserved"] == "true",
            "accounts": int(env["pg_accounts"]), "total_balance": int(env["pg_total"]),
            "expected_total_balance": int(env["pg_expected_total"]),
            "transfers_recorded": int(env["pg_transfers"]), "amount_moved": int(env["pg_moved"]),
            "accounts_off_their_history": int(env["pg_mismatched"]),
            "negative_balances": int(env["pg_negative"]),
        }),
        "tpcb_like": dict(tpcb, machine_before=env["load_pg_tpcb"]),
    },
    "cellpay": dict(cellpay, bench_succeeded=env["cellpay_ok"] == "true", machine_before=env["load_cellpay"],
                    cluster="5 nodes, 4 cells + global, 3 of 5 durable, emulated latency off, through one gateway"),
    "ratios": {
        "cellpay_over_pg_transfer_workload": cellpay_tps / transfer["transactions_per_second"],
        "cellpay_over_pgbench_tpcb": cellpay_tps / tpcb["transactions_per_second"],
    },
}
with open(os.path.join(out, "baseline.json"), "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

rows = [
    ("PostgreSQL: transfer workload (1 transfer/tx)", transfer["transactions_per_second"]),
    (f"PostgreSQL: pgbench TPC-B-like (scale {env['TPCB_SCALE']})", tpcb["transactions_per_second"]),
    (f"cellpay: bench via gateway ({env['BATCH_SIZE']}/request)", cellpay_tps),
]
print()
print(f"{env['ACCOUNTS']} accounts, {env['CONCURRENCY']} clients; PostgreSQL {env['DURATION_S']} s per run, "
      f"cellpay {cellpay['transfers']} transfers in {cellpay['seconds']:.1f} s, {env['CROSS_CELL']} % cross-cell")
print(f"{'workload':<52} {'transactions/s':>15} {'cellpay / this':>15}")
for name, tps in rows:
    print(f"{name:<52} {tps:>15,.1f} {cellpay_tps / tps:>14,.1f}x")
print(f"PostgreSQL money conserved: {env['pg_conserved']}; cellpay conserved: {str(cellpay['conserved']).lower()}, "
      f"{cellpay['transfers_ok']} of {cellpay['transfers']} ok")
print(f"written: {os.path.join(out, 'baseline.json')}")
EOF

[ "$pg_conserved" = true ] || die "PostgreSQL's transfer workload did not conserve money (see above)"
[ "$cellpay_ok" = true ] || die "cellpay bench failed: see $OUT/logs/cellpay-bench.log"
