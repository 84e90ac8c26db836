#!/usr/bin/env bash
# Throughput of the NBD protocol layer: nbdcopy and `qemu-img convert -n`
# write a 4 GiB file from /dev/shm over a Unix socket into our null backend
# (examples/nbd-serve) and into `nbdkit null`, alternating run by run.
# Prints the median MB/s (10^6 B/s) per client and server and the ratio
# ours / nbdkit.
#
#   bench/nbd.sh                 # 5 runs each
#   RUNS=3 SIZE_MIB=1024 bench/nbd.sh
#   BENCH_SRC=/dev/shm/x.raw bench/nbd.sh   # reuse a source file
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
RUST_LOG=warn "$SERVE" --listen "unix:$OURS_SOCK" --export "null=${SIZE_MIB}M:null" &
PIDS+=($!)
nbdkit -f -U "$KIT_SOCK" null "${SIZE_MIB}M" &
PIDS+=($!)
for s in "$OURS_SOCK" "$KIT_SOCK"; do
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
    [ -S "$s" ] || { echo "server socket $s did not appear" >&2; exit 1; }
done
OURS_URI="nbd+unix:///null?socket=$OURS_SOCK"
KIT_URI="nbd+unix:///?socket=$KIT_SOCK"

# Prints MB/s of one run of "$@".
rate() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    python3 -c "print(f'{$size_bytes / (($t1 - $t0) / 1e9) / 1e6:.0f}')"
}

declare -A R
for i in $(seq "$RUNS"); do
    for server in ours nbdkit; do
        if [ $server = ours ]; then uri=$OURS_URI; else uri=$KIT_URI; fi
        R[nbdcopy,$server]+="$(rate nbdcopy "$SRC" "$uri") "
        R[qemu-img,$server]+="$(rate qemu-img convert -n -f raw -O raw "$SRC" "$uri") "
    done
    echo "run $i/$RUNS done" >&2
done

median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.0f}')" "$@"; }

printf '\n%-10s %-8s %8s   %s\n' client server "median" "runs (MB/s)"
for client in nbdcopy qemu-img; do
    for server in ours nbdkit; do
        # shellcheck disable=SC2086
        printf '%-10s %-8s %8s   %s\n' "$client" "$server" "$(median ${R[$client,$server]})" "${R[$client,$server]}"
    done
done
echo
for client in nbdcopy qemu-img; do
    # shellcheck disable=SC2086
    o=$(median ${R[$client,ours]}); k=$(median ${R[$client,nbdkit]})
    python3 -c "print(f'$client: ours / nbdkit-null = {$o / $k:.2f}')"
done
