#!/usr/bin/env bash
# Throughput of the NBD protocol layer: nbdcopy and `qemu-img convert -n`
# write a 4 GiB file from /dev/shm over a Unix socket into our null backend
# (examples/nbd-serve) and into `nbdkit null`, alternating run by run.
# Prints the median MB/s (10^6 B/s) per client and server and the ratio
# ours / nbdkit, plus the server's own CPU time (user+sys) per GiB, which
# is the steadier figure when other work shares the machine.
#
#   bench/nbd.sh                 # 5 runs each
#   RUNS=3 SIZE_MIB=1024 bench/nbd.sh
#   BENCH_SRC=/dev/shm/x.raw bench/nbd.sh   # reuse a source file
#   SERVE_ARGS="--threads 8" bench/nbd.sh   # extra nbd-serve arguments
#
# Needs: cargo, nbdkit, nbdcopy, qemu-img, python3. The source file is kept
# (delete it yourself) so repeated runs skip the 4 GiB generation.
set -euo pipefail

RUNS=${RUNS:-5}
SIZE_MIB=${SIZE_MIB:-4096}
SRC=${BENCH_SRC:-/dev/shm/vma-writer-nbd-bench-${SIZE_MIB}M.raw}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d /tmp/nbd-bench.XXXXXX)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

for t in nbdkit nbdcopy qemu-img python3 cargo; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

echo "== building (release)" >&2
(cd "$ROOT" && cargo build --release --example nbd-serve -q)
SERVE="$ROOT/target/release/examples/nbd-serve"

size_bytes=$((SIZE_MIB * 1024 * 1024))
if [ ! -f "$SRC" ] || [ "$(stat -c %s "$SRC")" -ne "$size_bytes" ]; then
    echo "== generating $SRC ($SIZE_MIB MiB of random data)" >&2
    head -c "$size_bytes" /dev/urandom > "$SRC"
fi

OURS_SOCK=$TMP/ours.sock
KIT_SOCK=$TMP/nbdkit.sock
# shellcheck disable=SC2086
RUST_LOG=warn "$SERVE" --listen "unix:$OURS_SOCK" --export "null=${SIZE_MIB}M:null" ${SERVE_ARGS:-} &
OURS_PID=$!
PIDS+=("$OURS_PID")
nbdkit -f -U "$KIT_SOCK" null "${SIZE_MIB}M" &
KIT_PID=$!
PIDS+=("$KIT_PID")
for s in "$OURS_SOCK" "$KIT_SOCK"; do
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
    [ -S "$s" ] || { echo "server socket $s did not appear" >&2; exit 1; }
done
OURS_URI="nbd+unix:///null?socket=$OURS_SOCK"
KIT_URI="nbd+unix:///?socket=$KIT_SOCK"

# CPU time (user+sys, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# Runs "$@" once against server pid $1; prints "MB/s server-CPU-ms".
rate() {
    local pid=$1 t0 t1 c0 c1
    shift
    c0=$(cpu_ticks "$pid")
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    c1=$(cpu_ticks "$pid")
    python3 -c "print(f'{$size_bytes / (($t1 - $t0) / 1e9) / 1e6:.0f} {($c1 - $c0) * 1000 / $TICK:.0f}')"
}

declare -A R C
for i in $(seq "$RUNS"); do
    for server in ours nbdkit; do
        if [ $server = ours ]; then uri=$OURS_URI; pid=$OURS_PID; else uri=$KIT_URI; pid=$KIT_PID; fi
        read -r mbps cpu < <(rate "$pid" nbdcopy "$SRC" "$uri")
        R[nbdcopy,$server]+="$mbps "; C[nbdcopy,$server]+="$cpu "
        read -r mbps cpu < <(rate "$pid" qemu-img convert -n -f raw -O raw "$SRC" "$uri")
        R[qemu-img,$server]+="$mbps "; C[qemu-img,$server]+="$cpu "
    done
    echo "run $i/$RUNS done" >&2
done

median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.0f}')" "$@"; }

echo
echo "$RUNS runs of $SIZE_MIB MiB each; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %-8s %8s %14s   %s\n' client server "MB/s" "srv CPU ms/GiB" "runs (MB/s)"
for client in nbdcopy qemu-img; do
    for server in ours nbdkit; do
        # shellcheck disable=SC2086
        cpu=$(median ${C[$client,$server]})
        printf '%-10s %-8s %8s %14s   %s\n' "$client" "$server" "$(median ${R[$client,$server]})" \
            "$((cpu * 1024 / SIZE_MIB))" "${R[$client,$server]}"
    done
done
echo
for client in nbdcopy qemu-img; do
    # shellcheck disable=SC2086
    o=$(median ${R[$client,ours]}); k=$(median ${R[$client,nbdkit]})
    python3 -c "print(f'$client: ours / nbdkit-null = {$o / $k:.2f}')"
done
