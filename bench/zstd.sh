#!/usr/bin/env bash
# Random-access archives benchmark (issue 8 item 6), peers in the same run:
#
#   create   `create --zstd` of a 4 GiB image (per 4 MiB: 1 MiB text-like,
#            1 MiB random, 2 MiB of holes) against vzdump's way,
#            `create - | zstd -T2 -3`; also compressed sizes.
#   verify   `verify` of the plain archive with its index (every cluster
#            checked against its digest) against the same without the index,
#            and `xxhsum -H128` / `b3sum` of the archive as hashing ceilings.
#   extract  single-drive extract of a 1 GiB drive from a 4-drive `.vma.zst`
#            (drives of 1, 2, 4 and 8 GiB) against Proxmox's way,
#            `zstd -dc ARCHIVE | extract -d NAME -`; bytes read (rchar of
#            the processes reading the archive).
#
# MB = 10^6 B of drive data; each figure is the median of RUNS (default 3)
# runs, each started after the machine was >= 85 % idle for 1 s. Peers and
# vma-writer alternate within each run.
#
# Usage: bench/zstd.sh [--no-extract]
# Env:   VMA=path/to/vma-writer  RUNS=3  SCRATCH=dir (default /var/tmp/...)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

VMA=${VMA:-$here/../target/release/vma-writer}
RUNS=${RUNS:-3}
EXTRACT=1
[[ ${1:-} == --no-extract ]] && EXTRACT=0
[[ -x $VMA ]] || { echo "no binary at $VMA (cargo build --release)" >&2; exit 1; }
VMA=$(cd "$(dirname "$VMA")" && pwd)/$(basename "$VMA")
for t in zstd xxhsum b3sum python3 openssl; do
    command -v $t >/dev/null || { echo "$t is missing (apt-get install zstd xxhash b3sum)" >&2; exit 1; }
done

# On disk, not tmpfs: the 4-drive set is 15 GiB of drives.
S=${SCRATCH:-/var/tmp/vma-bench-zstd.$$}
mkdir -p "$S"
cleanup() { rm -rf "$S"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

MiB=$((1 << 20))
UUID=01234567-89ab-cdef-0123-456789abcdef
CTIME=1764000000


declare -A T SIZE READ
add() { T[$1]="${T[$1]:-} $2"; }

# rchar of a finished command: run it under a shell that prints its own
# /proc counters is not possible for a pipeline member, so read the
# process's /proc/PID/io just before it exits via a poll loop.
run_rchar() {
    # run_rchar OUTVAR cmd...: runs cmd, stores the last rchar seen.
    local __var=$1; shift
    "$@" &
    local pid=$! last=0 v
    while kill -0 "$pid" 2>/dev/null; do
        v=$(awk '/^rchar/ {print $2}' "/proc/$pid/io" 2>/dev/null || true)
        [[ -n $v ]] && last=$v
        sleep 0.05
    done
    wait "$pid"
    printf -v "$__var" '%s' "$last"
}

echo "== seekable zstd benchmark, $RUNS runs, binary $VMA"
machine_info
echo "zstd:    $(zstd --version | head -1)"
echo "making a 4 GiB image in $S ..."
mixed "$S/img.raw" 4096 1
SIZE4=$((4096 * MiB))

for ((i = 1; i <= RUNS; i++)); do
    echo "-- create run $i/$RUNS"
    rm -f "$S"/a.vma.zst "$S"/b.vma.zst "$S"/a1.vma.zst
    wait_idle; t0=$(now)
    "$VMA" create "$S/a.vma.zst" --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/img.raw"
    add create-zstd "$(since "$t0")"
    wait_idle; t0=$(now)
    "$VMA" create - --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/img.raw" | zstd -T2 -3 -q > "$S/b.vma.zst"
    add create-pipe "$(since "$t0")"
    wait_idle; t0=$(now)
    "$VMA" create "$S/a1.vma.zst" --threads 1 --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/img.raw"
    add create-zstd-t1 "$(since "$t0")"
done
SIZE[a]=$(stat -c %s "$S/a.vma.zst"); SIZE[b]=$(stat -c %s "$S/b.vma.zst")
zstd -dc "$S/a.vma.zst" | cmp - <(zstd -dc "$S/b.vma.zst") && echo "same VMA bytes in both"

echo "-- index cost: create to a file (index + digests) against create to stdout (neither)"
declare -A C
for ((i = 1; i <= RUNS; i++)); do
    rm -f "$S/p.vma" "$S/p.vma.index" "$S/px.vma"
    wait_idle
    /usr/bin/time -v -o "$S/t.txt" "$VMA" create "$S/p.vma" --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/img.raw"
    C[indexed]="${C[indexed]:-} $(cpu_secs_time "$S/t.txt")"
    wait_idle
    /usr/bin/time -v -o "$S/t.txt" "$VMA" create - --uuid $UUID --ctime $CTIME -d drive-scsi0="$S/img.raw" > "$S/px.vma"
    C[plain]="${C[plain]:-} $(cpu_secs_time "$S/t.txt")"
done
cmp "$S/p.vma" "$S/px.vma" && echo "same archive bytes with and without the index"
rm -f "$S/px.vma"
for ((i = 1; i <= RUNS; i++)); do
    echo "-- verify run $i/$RUNS"
    wait_idle; t0=$(now); "$VMA" verify "$S/p.vma" 2>/dev/null; add verify-digests "$(since "$t0")"
    mv "$S/p.vma.index" "$S/p.idx"
    wait_idle; t0=$(now); "$VMA" verify "$S/p.vma" 2>/dev/null; add verify-plain "$(since "$t0")"
    mv "$S/p.idx" "$S/p.vma.index"
    wait_idle; t0=$(now); xxhsum -H128 "$S/p.vma" >/dev/null; add xxhsum "$(since "$t0")"
    wait_idle; t0=$(now); b3sum "$S/p.vma" >/dev/null; add b3sum "$(since "$t0")"
    wait_idle; t0=$(now); "$VMA" verify "$S/a.vma.zst" 2>/dev/null; add verify-zstd-digests "$(since "$t0")"
done

if ((EXTRACT)); then
    echo "making 4 drives (1, 2, 4, 8 GiB) ..."
    mixed "$S/d1.raw" 1024 11; mixed "$S/d2.raw" 2048 12; mixed "$S/d4.raw" 4096 13; mixed "$S/d8.raw" 8192 14
    "$VMA" create "$S/four.vma.zst" -d drive-scsi1="$S/d1.raw" -d drive-scsi2="$S/d2.raw" \
        -d drive-scsi4="$S/d4.raw" -d drive-scsi8="$S/d8.raw"
    FOUR=$(stat -c %s "$S/four.vma.zst")
    for ((i = 1; i <= RUNS; i++)); do
        echo "-- extract run $i/$RUNS"
        rm -rf "$S/x1" "$S/x2"
        wait_idle; t0=$(now)
        run_rchar R1 "$VMA" extract -d drive-scsi1 "$S/four.vma.zst" "$S/x1"
        add extract-seek "$(since "$t0")"; READ[seek]=$R1
        wait_idle; t0=$(now)
        zstd -dc "$S/four.vma.zst" | "$VMA" extract -d drive-scsi1 - "$S/x2" >/dev/null
        add extract-pipe "$(since "$t0")"
        cmp "$S/x1/disk-drive-scsi1.raw" "$S/x2/disk-drive-scsi1.raw"
    done
    # What the pipe reads: the whole compressed archive (zstd reads it all).
    READ[pipe]=$FOUR
fi

echo
echo "== results: medians of $RUNS runs (MB = 10^6 B of drive data)"
row() { local m; m=$(median ${T[$1]}); printf '%-22s %8s s  %6s MB/s\n' "$1" "$m" "$(mbps "$2" "$m")"; }
row create-zstd $SIZE4; row create-pipe $SIZE4; row create-zstd-t1 $SIZE4
echo "create --zstd / pipe (throughput): $(ratio "$(median ${T[create-pipe]})" "$(median ${T[create-zstd]})") x (target >= 1.3)"
echo "compressed: --zstd ${SIZE[a]} B, pipe ${SIZE[b]} B, ratio $(awk -v a="${SIZE[a]}" -v b="${SIZE[b]}" 'BEGIN{printf "%.4f", a/b}') (target within 1 %)"
echo "create CPU-s: with index $(median ${C[indexed]}), without $(median ${C[plain]}): $(ratio "$(median ${C[indexed]})" "$(median ${C[plain]})") (target <= 1.10)"
row verify-digests $SIZE4; row verify-plain $SIZE4; row verify-zstd-digests $SIZE4
P=$(stat -c %s "$S/p.vma")
row xxhsum "$P"; row b3sum "$P"
echo "verify with digests / without (time): $(ratio "$(median ${T[verify-digests]})" "$(median ${T[verify-plain]})") (target <= 1.15)"
if ((EXTRACT)); then
    row extract-seek $((1024 * MiB)); row extract-pipe $((1024 * MiB))
    echo "single-drive extract, seekable / pipe (speed-up): $(ratio "$(median ${T[extract-pipe]})" "$(median ${T[extract-seek]})") x (target >= 3)"
    echo "bytes read: seekable ${READ[seek]}, pipe ${READ[pipe]} (archive $FOUR B)"
fi
