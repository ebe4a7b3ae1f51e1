# Shared by the benchmark scripts (sourced, not run): free ports, how busy
# the machine is, and a five-node cellpay cluster with a gateway on loopback.
#
# The sourcing script defines `die` and `log`, and sets CELLPAY (the binary),
# WAIT_QUIET_S and QUIET_BUSY_MAX before calling these.

# The first of N consecutive free loopback ports, below Linux's ephemeral
# range (32768 and up) so that no client connection takes one meanwhile.
free_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(500):
    base = random.randrange(20000, 32000 - n)
    held = []
    try:
        for port in range(base, base + n):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
    print(base)
    sys.exit(0)
sys.exit("no free ports")
EOF
}

# Exports `commit`: the checkout's commit, marked "(modified)" when the
# working tree differs from it (results name the code they measured).
export_commit() {
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD 2>/dev/null || commit="$commit (modified)"
    export commit
}

# The share of the machine's CPU time that was busy over 2 s, in %.
cpu_busy() {
    local a b
    a=$(head -n 1 /proc/stat)
    sleep 2
    b=$(head -n 1 /proc/stat)
    # cpu user nice system idle iowait irq softirq steal (guest: inside user)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x); split(b, y)
        for (i = 2; i <= 9; i++) total += y[i] - x[i]
        idle = (y[5] + y[6]) - (x[5] + x[6])
        printf "%d\n", (total > 0 ? 100 * (total - idle) / total + 0.5 : 0)
    }'
}

# Before a measured run: with WAIT_QUIET_S, waits (at most that long) until
# the machine is under QUIET_BUSY_MAX % busy; prints the load average and
# how busy it is, and warns when other work competes for the CPUs.
machine_state() {
    local busy started=$SECONDS
    busy=$(cpu_busy)
    while [ "$busy" -ge "$QUIET_BUSY_MAX" ] && [ $((SECONDS - started)) -lt "$WAIT_QUIET_S" ]; do
        sleep 1
        busy=$(cpu_busy)
    done
    [ "$busy" -lt "$QUIET_BUSY_MAX" ] ||
        echo "warning: the machine is $busy % busy before this run: other work competes with it" >&2
    echo "load average $(cut -d' ' -f1-3 /proc/loadavg), cpu busy ${busy} %"
}

# cluster_start WORK LOGS LATENCY: five `cellpay node` (3 regions, 5
# datacenters, 4 cells over 100 shards; data in WORK/nodeN, on the disk
# under WORK) and one `cellpay gateway`, logging to LOGS. LATENCY is `on`
# (emulated one-way delays of 0.5 ms in a datacenter, 2 ms in a region,
# 20 ms across regions) or `off`. Sets `cluster` (the cluster file),
# `gateway` (its address) and appends the processes to `pids`. NODE_ARGS,
# if set, is split on spaces and passed to every `cellpay node` (say
# `--checkpoint-transfers 524288`).
cluster_start() {
    local work=$1 logs=$2 latency=$3 base_port node
    local init_flags=()
    case "$latency" in
        on) ;;
        off) init_flags+=(--no-latency) ;;
        *) die "latency must be on or off, not '$latency'" ;;
    esac
    mkdir -p "$work" "$logs"
    cluster="$work/cluster.toml"
    base_port=$(free_ports 11)
    gateway="127.0.0.1:$((base_port + 10))"
    "$CELLPAY" ctl init --cells 4 --base-port "$base_port" "${init_flags[@]}" >"$cluster"
    cp "$cluster" "$logs/cluster.toml"
    log "cellpay: 5 nodes on ports $base_port-$((base_port + 9)) (latency $latency), gateway on $gateway, data in $work"
    for node in 1 2 3 4 5; do
        # shellcheck disable=SC2086 # NODE_ARGS is a list of words
        "$CELLPAY" node --cluster "$cluster" --node "$node" --data "$work/node$node" ${NODE_ARGS:-} \
            >"$logs/node$node.log" 2>&1 &
        pids+=($!)
    done
    "$CELLPAY" gateway --cluster "$cluster" --listen "$gateway" >"$logs/gateway.log" 2>&1 &
    pids+=($!)
}

# Ready: every node answers its status, every cell (the global one too) has
# a replica that is its leader, and the gateway answers /health.
cluster_ready() {
    "$CELLPAY" ctl topology --cluster "$cluster" --json 2>/dev/null | python3 -c '
import json, sys, urllib.request
statuses = json.load(sys.stdin)
if not statuses or any(status is None for status in statuses.values()):
    sys.exit(1)
cells, led = set(), set()
for status in statuses.values():
    for replica in status.get("cells", []):
        cells.add(replica["cell"])
        if replica.get("role") == "leader":
            led.add(replica["cell"])
if not cells or not cells <= led:
    sys.exit(1)
try:
    urllib.request.urlopen("http://" + sys.argv[1] + "/health", timeout=2).read()
except Exception:
    sys.exit(1)' "$gateway"
}

# cluster_wait_ready TIMEOUT_S LOGS: waits for `cluster_ready`; fails if a
# process of `pids` exits meanwhile or the time runs out.
cluster_wait_ready() {
    local timeout_s=$1 logs=$2 started=$SECONDS pid
    until cluster_ready; do
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || die "a cellpay process exited while starting: see $logs/node*.log, gateway.log"
        done
        [ $((SECONDS - started)) -lt "$timeout_s" ] || die "the cluster was not ready after $timeout_s s"
        sleep 1
    done
    log "cellpay: cluster ready after $((SECONDS - started)) s"
}

# Stops every process of `pids` (SIGTERM, then SIGKILL after 20 s) and empties it.
pids_stop() {
    local pid waited
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 100 ]; do
            sleep 0.2
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
