#!/usr/bin/env bash
# Instant restore benchmark (issue 9 item 5), peers in the same run:
#
#   dense   `nbdcopy --connections 4 URI null:` of a 4 GiB dense random drive
#           from `vma-writer export` of a plain .vma (with its index: every
#           cluster checked against its digest), against `nbdkit file`
#           serving the extracted raw image. Also the .vma without its
#           index (no digests), for information. Target >= 0.9 x.
#   zstd    the same from a seekable .vma.zst of the 4 GiB mixed image of
#           bench/zstd.sh (per 4 MiB: 1 MiB text-like, 1 MiB random, 2 MiB
#           holes), against `zstd -dc ARCHIVE > /dev/null`. Target >= 1.5 x.
#           Also, as the ceiling any server reaches with this client here:
#           `nbdkit file` serving the image itself (nothing to decompress
#           or check), against the same `zstd -dc`.
#   start   time from starting `export` to the first READ answered, for a
#           10 GiB archive (the mixed image again) with and without its
#           index; page cache warm, and cold (the archive's and the index's
#           pages dropped with POSIX_FADV_DONTNEED first). Target < 1 s.
#
# MB = 10^6 B of drive data; each figure is the median of RUNS (default 3)
# runs, each command started after the machine was >= 85 % idle for 1 s;
# vma-writer and its peer alternate within each run. The idle share seen
# before each timed command is printed with it.
#
# Usage: bench/export.sh [dense] [zstd] [start]   (default: all three)
# Env:   VMA=path/to/vma-writer  RUNS=3  SIZE_MIB=4096  START_MIB=10240
#        SCRATCH=dir (default /var/tmp/vma-bench-export.PID)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

VMA=${VMA:-$here/../target/release/vma-writer}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
START_MIB=${START_MIB:-10240}
PARTS=${*:-dense zstd start}
[[ -x $VMA ]] || { echo "no binary at $VMA (cargo build --release)" >&2; exit 1; }
VMA=$(cd "$(dirname "$VMA")" && pwd)/$(basename "$VMA")
for t in nbdcopy nbdkit zstd openssl python3 /usr/bin/python3; do
    command -v $t >/dev/null || { echo "$t is missing (apt-get install libnbd-bin nbdkit zstd python3-libnbd)" >&2; exit 1; }
done

# On disk: the dense part alone takes 8 GiB (archive and extracted image).
S=${SCRATCH:-/var/tmp/vma-bench-export.$$}
mkdir -p "$S"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MiB=$((1 << 20))
UUID=01234567-89ab-cdef-0123-456789abcdef
CTIME=1764000000


declare -A T IDLE
add() { T[$1]="${T[$1]:-} $2"; IDLE[$1]="${IDLE[$1]:-} $LAST_IDLE"; }

# serve_vma ARCHIVE SOCK: starts `export` in the background (PID in SRV).
serve_vma() {
    rm -f "$2"
    "$VMA" export "$1" --listen "unix:$2" 2>"$S/export.log" &
    SRV=$!; PIDS+=("$SRV")
    wait_socket "$2"
}
serve_nbdkit() {
    rm -f "$2"
    nbdkit -f -U "$2" file "$1" &
    SRV=$!; PIDS+=("$SRV")
    wait_socket "$2"
}
copy() { nbdcopy --connections=4 --threads=4 "$1" null:; }

echo "== instant restore benchmark, $RUNS runs, binary $VMA"
machine_info
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) at start"
echo "tools:   $(nbdcopy --version | head -1), $(nbdkit --version | head -1), $(zstd --version | head -1)"

if [[ $PARTS == *dense* ]]; then
    echo "-- dense: making a ${SIZE_MIB} MiB random image in $S ..."
    rnd $((SIZE_MIB * MiB)) dense > "$S/dense.img"
    "$VMA" create "$S/dense.vma" --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/dense.img"
    rm "$S/dense.img"
    "$VMA" extract "$S/dense.vma" "$S/x"
    cp "$S/dense.vma" "$S/noindex.vma"
    for ((i = 1; i <= RUNS; i++)); do
        echo "-- dense run $i/$RUNS"
        serve_vma "$S/dense.vma" "$S/v.sock"
        wait_idle; t0=$(now); copy "nbd+unix:///drive-scsi0?socket=$S/v.sock"; add dense-export "$(since "$t0")"
        stop_pid "$SRV"
        serve_nbdkit "$S/x/disk-drive-scsi0.raw" "$S/k.sock"
        wait_idle; t0=$(now); copy "nbd+unix:///?socket=$S/k.sock"; add dense-nbdkit "$(since "$t0")"
        stop_pid "$SRV"
        serve_vma "$S/noindex.vma" "$S/n.sock"
        wait_idle; t0=$(now); copy "nbd+unix:///drive-scsi0?socket=$S/n.sock"; add dense-export-noindex "$(since "$t0")"
        stop_pid "$SRV"
    done
    rm -rf "$S/x" "$S/dense.vma" "$S/dense.vma.index" "$S/noindex.vma"
fi

if [[ $PARTS == *zstd* ]]; then
    echo "-- zstd: making the ${SIZE_MIB} MiB mixed image ..."
    mixed "$S/mixed.img" "$SIZE_MIB" 1
    "$VMA" create "$S/mixed.vma.zst" --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/mixed.img"
    ZSIZE=$(stat -c %s "$S/mixed.vma.zst")
    for ((i = 1; i <= RUNS; i++)); do
        echo "-- zstd run $i/$RUNS"
        serve_vma "$S/mixed.vma.zst" "$S/z.sock"
        wait_idle; t0=$(now); copy "nbd+unix:///drive-scsi0?socket=$S/z.sock"; add zstd-export "$(since "$t0")"
        stop_pid "$SRV"
        wait_idle; t0=$(now); zstd -dc "$S/mixed.vma.zst" > /dev/null; add zstd-dc "$(since "$t0")"
        serve_nbdkit "$S/mixed.img" "$S/k.sock"
        wait_idle; t0=$(now); copy "nbd+unix:///?socket=$S/k.sock"; add zstd-ceiling-nbdkit-raw "$(since "$t0")"
        stop_pid "$SRV"
    done
    rm -f "$S/mixed.vma.zst" "$S/mixed.img"
fi

if [[ $PARTS == *start* ]]; then
    echo "-- start: making a ${START_MIB} MiB mixed archive ..."
    mixed "$S/big.img" "$START_MIB" 2
    "$VMA" create "$S/big.vma" --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/big.img"
    rm "$S/big.img"
    EXTENTS=$((START_MIB * 16 / 58))
    # first_read ARCHIVE cold|warm: seconds from spawning `export` to the
    # first 4 KiB READ answered (libnbd, retrying the connection every ms).
    first_read() {
        /usr/bin/python3 - "$VMA" "$1" "$S/s.sock" "$2" <<'PY'
import nbd, os, subprocess, sys, time
vma, archive, sock, mode = sys.argv[1:5]
if mode == "cold":
    for f in (archive, archive + ".index"):
        if os.path.exists(f):
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
if os.path.exists(sock):
    os.unlink(sock)
t0 = time.monotonic()
p = subprocess.Popen([vma, "export", archive, "--listen", "unix:" + sock], stderr=subprocess.DEVNULL)
try:
    while True:
        try:
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///drive-scsi0?socket={sock}")
            h.pread(4096, 0)
            break
        except nbd.Error:
            time.sleep(0.001)
    print(f"{time.monotonic() - t0:.4f}")
finally:
    p.terminate()
    p.wait()
PY
    }
    mv "$S/big.vma.index" "$S/big.idx"
    for ((i = 1; i <= RUNS; i++)); do
        echo "-- start run $i/$RUNS"
        mv "$S/big.idx" "$S/big.vma.index"
        for m in warm cold; do wait_idle; add "start-index-$m" "$(first_read "$S/big.vma" $m)"; done
        mv "$S/big.vma.index" "$S/big.idx"
        for m in warm cold; do wait_idle; add "start-noindex-$m" "$(first_read "$S/big.vma" $m)"; done
    done
fi

echo
echo "== results: medians of $RUNS runs (MB = 10^6 B of drive data); idle % before each run in []"
SIZE=$((SIZE_MIB * MiB))
row() { local m; m=$(median ${T[$1]}); printf '%-24s %8s s  %6s MB/s  [%s ]\n' "$1" "$m" "$(mbps "$2" "$m")" "${IDLE[$1]}"; }
if [[ $PARTS == *dense* ]]; then
    row dense-export $SIZE; row dense-nbdkit $SIZE; row dense-export-noindex $SIZE
    echo "dense: export / nbdkit file (speed): $(ratio "$(median ${T[dense-nbdkit]})" "$(median ${T[dense-export]})") x (target >= 0.9)"
fi
if [[ $PARTS == *zstd* ]]; then
    row zstd-export $SIZE; row zstd-dc $SIZE; row zstd-ceiling-nbdkit-raw $SIZE
    echo "zstd: export / zstd -dc (speed): $(ratio "$(median ${T[zstd-dc]})" "$(median ${T[zstd-export]})") x (target >= 1.5); archive $ZSIZE B"
    echo "zstd: ceiling, nbdkit file of the raw image / zstd -dc: $(ratio "$(median ${T[zstd-dc]})" "$(median ${T[zstd-ceiling-nbdkit-raw]})") x; export / that ceiling: $(ratio "$(median ${T[zstd-ceiling-nbdkit-raw]})" "$(median ${T[zstd-export]})") x"
fi
if [[ $PARTS == *start* ]]; then
    for k in start-index-warm start-index-cold start-noindex-warm start-noindex-cold; do
        printf '%-24s %8s s  [%s ]\n' "$k" "$(median ${T[$k]})" "${IDLE[$k]}"
    done
    echo "start: ${START_MIB} MiB archive, about $EXTENTS extents; target: first READ < 1 s"
fi
