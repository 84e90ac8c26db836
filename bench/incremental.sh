#!/usr/bin/env bash
# Incremental-backup benchmark of vma-writer (issue 10, part 4).
#
# A 4 GiB raw drive on tmpfs, served by qemu-storage-daemon: DATA_PCT % of
# it random data (the first part of every 2 MiB), the rest zeros. Every
# round, back to back:
#   full  `vma-writer backup -o base.vma`: QEMU sends the whole drive (this
#         is also the round's base; it adds its bitmap);
#         the guest then rewrites DIRTY_PCT % of the drive's clusters, spread
#         at random, 64 KiB each, through the daemon's NBD export;
#         `vma-writer convert` makes base.vma.zst (same uuid, so the same
#         bitmap serves it; not timed);
#   zst   `backup --base base.vma.zst --no-bitmap`: incremental from the
#         seekable zstd base (adds and removes no bitmap);
#   inc   `backup --base base.vma`: incremental from the plain base, the
#         product path (its commit removes the base's bitmap).
#   floor `cp base.vma` on the same file system: the least any incremental
#         that writes a complete standalone archive can take (an incremental
#         archive is as large as the base: every byte of it must be
#         written), for the ratio it sets against the full backup.
# Time: wall clock of the `vma-writer backup` process (QMP, jobs, fill,
# commit). QEMU's bytes: `received_bytes` of the `--json` finished event;
# base-read throughput: `base_bytes / fill_s` (in-device bytes copied from
# the base per second of fill, digests checked). MB = 10^6 B.
# Medians of RUNS rounds (default 3); each timed command starts after the
# machine was >= 85 % idle for 1 s (at most IDLE_CAP s; the idle share seen
# is printed with each raw figure). One incremental archive per kind is
# verified and extracted and compared with the source (not timed).
#
# Targets (issue 10): QEMU's bytes <= dirty + 1 %; wall time of inc <= 0.4 x
# full.
#
# Usage: bench/incremental.sh   Env: VMA=...  RUNS=3  SIZE_MIB=4096
#        DATA_PCT=50  DIRTY_PCT=5  SCRATCH=...
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

VMA=${VMA:-$here/../target/release/vma-writer}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
DATA_PCT=${DATA_PCT:-50}
DIRTY_PCT=${DIRTY_PCT:-5}
[[ -x $VMA ]] || { echo "no binary at $VMA (cargo build --release)" >&2; exit 1; }
VMA=$(cd "$(dirname "$VMA")" && pwd)/$(basename "$VMA")
SIZE=$((SIZE_MIB << 20))
CLUSTERS=$((SIZE / 65536))
DIRTY_CLUSTERS=$((CLUSTERS * DIRTY_PCT / 100))
DIRTY_BYTES=$((DIRTY_CLUSTERS * 65536))

S=${SCRATCH:-/dev/shm/vma-bench-incr.$$}
mkdir -p "$S"
QSD_PID=
cleanup() {
    [[ -n $QSD_PID ]] && stop_pid "$QSD_PID"
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== incremental benchmark, $RUNS rounds, ${SIZE_MIB} MiB raw drive (${DATA_PCT} % data), ${DIRTY_PCT} % of clusters rewritten, binary $VMA"
machine_info
echo "qemu:    $(qemu-storage-daemon --version | head -1)"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) at the start"

echo "making the source in $S ..."
truncate -s "$SIZE" "$S/src.raw"
data_per_2m=$((2097152 * DATA_PCT / 100))
# one random stream cut into the data part of every 2 MiB, written sparse
rnd $((SIZE / 2097152 * data_per_2m)) vma-bench-incr-src | "/usr/bin/python3" -c '
import sys
size, step, part, path = int(sys.argv[1]), 2097152, int(sys.argv[2]), sys.argv[3]
src = sys.stdin.buffer
with open(path, "r+b") as f:
    for off in range(0, size, step):
        f.seek(off)
        f.write(src.read(part))
' "$SIZE" "$data_per_2m" "$S/src.raw"

rm -f "$S/qmp.sock" "$S/live.sock"
qemu-storage-daemon \
    --chardev "socket,path=$S/qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
    --nbd-server "addr.type=unix,addr.path=$S/live.sock" \
    --blockdev "driver=file,filename=$S/src.raw,node-name=f0" \
    --blockdev driver=raw,file=f0,node-name=drive0 \
    --export type=nbd,id=e0,node-name=drive0,name=live,writable=on >> "$S/qsd.log" 2>&1 &
QSD_PID=$!
wait_socket "$S/qmp.sock"
wait_socket "$S/live.sock"

# DIRTY_CLUSTERS distinct clusters at random, 64 KiB writes of one byte
# value each, through the export (the guest); seed: the round.
guest_rewrites() {
    /usr/bin/python3 - "$CLUSTERS" "$DIRTY_CLUSTERS" "$1" <<'EOF' | qemu-io -f raw "nbd+unix:///live?socket=$S/live.sock" > "$S/qemu-io.out"
import random, sys
clusters, n, seed = map(int, sys.argv[1:4])
r = random.Random(seed)
for c in sorted(r.sample(range(clusters), n)):
    print(f"write -P {r.randrange(1, 256)} {c * 65536} 65536")
EOF
    local wrote
    wrote=$(grep -o 'wrote 65536/65536' "$S/qemu-io.out" | wc -l)
    [[ $wrote == "$DIRTY_CLUSTERS" ]] || { echo "qemu-io wrote $wrote of $DIRTY_CLUSTERS clusters" >&2; tail "$S/qemu-io.out" >&2; exit 1; }
}

declare -A T RECV BASE FILL IDLE
# backup KEY ARGS...: one timed `vma-writer backup --json`, figures kept
backup() {
    local k=$1 t0 t
    shift
    wait_idle
    t0=$(now)
    "$VMA" backup --qmp "$S/qmp.sock" --drive drive0=drive-scsi0 --json "$@" \
        > "$S/$k.json" 2> "$S/$k.err" || { echo "backup $k failed" >&2; cat "$S/$k.err" >&2; exit 1; }
    t=$(since "$t0")
    local fin
    fin=$(grep '"event":"finished"' "$S/$k.json")
    T[$k]="${T[$k]:-} $t"
    IDLE[$k]="${IDLE[$k]:-} $LAST_IDLE"
    RECV[$k]="${RECV[$k]:-} $(jq '.drives[0].received_bytes' <<< "$fin")"
    BASE[$k]="${BASE[$k]:-} $(jq '.drives[0].base_bytes' <<< "$fin")"
    FILL[$k]="${FILL[$k]:-} $(jq '.drives[0].fill_s // 0' <<< "$fin")"
    local mode
    mode=$(jq -r '.drives[0].mode' <<< "$fin")
    echo "   $k: $t s, mode $mode, $(jq '.drives[0].received_bytes' <<< "$fin") B from QEMU, $(jq '.drives[0].base_bytes' <<< "$fin") B from the base (idle ${LAST_IDLE} %)"
}

# check ARCHIVE: verify, extract, compare with the source (not timed)
check() {
    "$VMA" verify "$1" > /dev/null
    rm -rf "$S/x"
    "$VMA" extract "$1" "$S/x" > /dev/null
    cmp "$S/x/disk-drive-scsi0.raw" "$S/src.raw"
    rm -rf "$S/x"
    echo "   $(basename "$1"): verified, extracted, equal to the source"
}

for ((i = 1; i <= RUNS; i++)); do
    echo "-- round $i/$RUNS"
    rm -f "$S"/*.vma "$S"/*.vma.zst "$S"/*.index
    backup full -o "$S/base.vma"
    guest_rewrites "$i"
    "$VMA" convert "$S/base.vma" "$S/base.vma.zst" --zstd 1 > /dev/null 2>&1
    backup zst --base "$S/base.vma.zst" --no-bitmap -o "$S/zst.vma"
    ((i == 1)) && check "$S/zst.vma"
    rm -f "$S/zst.vma" "$S/zst.vma.index"
    backup inc --base "$S/base.vma" -o "$S/inc.vma"
    ((i == 1)) && check "$S/inc.vma"
    rm -f "$S/inc.vma" "$S/inc.vma.index"
    wait_idle
    t0=$(now)
    cp --reflink=never "$S/base.vma" "$S/floor.vma"
    t=$(since "$t0")
    T[floor]="${T[floor]:-} $t"
    IDLE[floor]="${IDLE[floor]:-} $LAST_IDLE"
    echo "   floor: $t s, cp of the base archive ($(stat -c %s "$S/base.vma") B) (idle ${LAST_IDLE} %)"
    rm -f "$S/floor.vma"
done

med() { # median of the list in $1
    # shellcheck disable=SC2086
    median $1
}
echo
echo "== results (medians of $RUNS; dirty data: $DIRTY_BYTES B = $DIRTY_CLUSTERS clusters)"
printf '%-44s %8s %14s %14s %10s\n' "run" "wall s" "from QEMU B" "from base B" "base MB/s"
for k in full zst inc; do
    case $k in
        full) label="full backup (QEMU sends the drive)" ;;
        zst) label="incremental, .vma.zst base" ;;
        inc) label="incremental, plain .vma base" ;;
    esac
    fill=$(med "${FILL[$k]}")
    base=$(med "${BASE[$k]}")
    rate=-
    [[ $k != full ]] && rate=$(mbps "$base" "$fill")
    printf '%-44s %8s %14.0f %14.0f %10s\n' "$label" "$(med "${T[$k]}")" "$(med "${RECV[$k]}")" "$base" "$rate"
done
echo
for k in full zst inc; do echo "raw $k: wall s:${T[$k]}  idle %:${IDLE[$k]}  fill s:${FILL[$k]}"; done
echo "raw floor: wall s:${T[floor]}  idle %:${IDLE[floor]}"
echo
full=$(med "${T[full]}")
for k in inc zst; do
    r=$(ratio "$(med "${T[$k]}")" "$full")
    recv=$(med "${RECV[$k]}")
    over=$(awk -v r="$recv" -v d="$DIRTY_BYTES" 'BEGIN { printf "%.2f", (r - d) * 100 / d }')
    echo "$k: wall time $r x full (target <= 0.40: $(awk -v r="$r" 'BEGIN { print (r <= 0.4) ? "met" : "NOT met" }'));" \
        "QEMU's bytes $recv = dirty + $over % (target <= 1 %: $(awk -v o="$over" 'BEGIN { print (o <= 1) ? "met" : "NOT met" }'))"
done
floor=$(ratio "$(med "${T[floor]}")" "$full")
echo "floor: cp of the base archive $(med "${T[floor]}") s = $floor x full: no incremental that writes a whole archive here can beat that"
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) at the end"
