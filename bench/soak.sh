#!/usr/bin/env bash
# Soak test (issue 11 item 7); not part of CI.
#
# SLOTS (default 8) concurrent backup loops for DURATION seconds (default
# 600). Each slot has its own qemu-storage-daemon (the "VM") with 2 raw
# drives of DRIVE_MIB (default 256) MiB on tmpfs, and loops:
#   1. the guest rewrites a few random regions of each drive through the
#      daemon's own NBD export (qemu-io);
#   2. `vma-writer backup` (one process per backup: its NBD server, QMP
#      client and archive writer) archives both drives, alternately plain
#      and --zstd;
#   3. `vma-writer verify`, then `extract`, and each restored drive is
#      compared (cmp) with its source, which nothing writes meanwhile;
#   4. the archive is deleted.
# Recorded per backup: wall time, the backup's peak RSS (VmHWM), and the
# daemon's RSS and open file descriptors afterwards (a leak of ours in QEMU
# — nodes, sockets, bitmaps — would grow them). The report says whether
# every archive verified and matched, and how RSS and fds moved from the
# first round to the last (flat = the last rounds stay within the first
# rounds' range plus a small margin).
#
# Usage: bench/soak.sh        Env: VMA=...  SLOTS=8  DURATION=600  DRIVE_MIB=256
#                                  SCRATCH=dir (default /dev/shm/vma-soak.PID)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

VMA=${VMA:-$here/../target/release/vma-writer}
SLOTS=${SLOTS:-8}
DURATION=${DURATION:-600}
DRIVE_MIB=${DRIVE_MIB:-256}
[[ -x $VMA ]] || { echo "no binary at $VMA (cargo build --release)" >&2; exit 1; }
VMA=$(cd "$(dirname "$VMA")" && pwd)/$(basename "$VMA")
for t in qemu-storage-daemon qemu-io cmp /usr/bin/time; do
    command -v $t >/dev/null || { echo "$t is missing" >&2; exit 1; }
done

S=${SCRATCH:-/dev/shm/vma-soak.$$}
mkdir -p "$S"
QSDS=()
cleanup() {
    local p
    for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
    for p in "${QSDS[@]}"; do stop_pid "$p"; done
    wait 2>/dev/null || true
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MiB=$((1 << 20))

# start_slot N: the slot's drives and daemon (QMP on $S/N/qmp.sock, the
# drives exported over NBD on $S/N/nbd.sock as d0 and d1).
start_slot() {
    local d=$S/$1 i
    mkdir -p "$d"
    for i in 0 1; do
        # Half random data, half holes, so archives have zero clusters too.
        truncate -s "${DRIVE_MIB}M" "$d/d$i.raw"
        head -c $((DRIVE_MIB / 2 * MiB)) /dev/urandom | dd of="$d/d$i.raw" conv=notrunc status=none
    done
    qemu-storage-daemon \
        --chardev "socket,path=$d/qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
        --blockdev "driver=file,filename=$d/d0.raw,node-name=f0" \
        --blockdev driver=raw,file=f0,node-name=d0 \
        --blockdev "driver=file,filename=$d/d1.raw,node-name=f1" \
        --blockdev driver=raw,file=f1,node-name=d1 \
        --nbd-server "addr.type=unix,addr.path=$d/nbd.sock" \
        --export type=nbd,id=e0,node-name=d0,name=d0,writable=on \
        --export type=nbd,id=e1,node-name=d1,name=d1,writable=on >> "$d/qsd.log" 2>&1 &
    QSDS+=($!)
    echo $! > "$d/qsd.pid"
    wait_socket "$d/qmp.sock"
    wait_socket "$d/nbd.sock"
}

# slot_loop N: backups until the deadline; one line per backup in
# $S/N/rounds: round wall_s backup_rss_kib qsd_rss_kib qsd_fds ok|FAIL
slot_loop() {
    local n=$1 d=$S/$1 round=0 deadline=$2 qpid
    qpid=$(cat "$d/qsd.pid")
    while (($(date +%s) < deadline)); do
        round=$((round + 1))
        local i off zarg="" out="$d/b.vma" ok=ok t0 wall
        for i in 0 1; do
            off=$(( (RANDOM * 32768 + RANDOM) % (DRIVE_MIB * 16 - 4) * 65536 ))
            qemu-io -f raw "nbd+unix:///d$i?socket=$d/nbd.sock" \
                -c "write -P $((round % 250 + 1)) $off 200000" >/dev/null
        done
        if ((round % 2 == 0)); then zarg=--zstd; out="$d/b.vma.zst"; fi
        rm -rf "$d/x" "$out" "$out.index"
        t0=$(now)
        if ! /usr/bin/time -v -o "$d/time.txt" "$VMA" backup --qmp "$d/qmp.sock" \
            --drive d0=drive-scsi0 --drive d1=drive-scsi1 $zarg -o "$out" \
            > "$d/backup.out" 2> "$d/backup.err"; then
            ok=FAIL-backup
            cp "$d/backup.err" "$d/failed-$round.err"
        fi
        wall=$(since "$t0")
        if [[ $ok == ok ]]; then
            "$VMA" verify "$out" > /dev/null 2>&1 || ok=FAIL-verify
        fi
        if [[ $ok == ok ]]; then
            if "$VMA" extract "$out" "$d/x" > /dev/null 2>&1; then
                for i in 0 1; do
                    cmp -s "$d/x/disk-drive-scsi$i.raw" "$d/d$i.raw" || ok=FAIL-cmp
                done
            else
                ok=FAIL-extract
            fi
        fi
        echo "$round $wall $(peak_rss_kib "$d/time.txt") $(awk '/VmRSS/ {print $2}' "/proc/$qpid/status") $(ls "/proc/$qpid/fd" | wc -l) $ok" >> "$d/rounds"
        rm -rf "$d/x" "$out" "$out.index"
    done
}

echo "== vma-writer soak: $SLOTS concurrent backup loops, 2 x $DRIVE_MIB MiB drives each, ${DURATION}s"
machine_info
for ((n = 1; n <= SLOTS; n++)); do start_slot "$n"; done
deadline=$(($(date +%s) + DURATION))
LOOPS=()
for ((n = 1; n <= SLOTS; n++)); do
    slot_loop "$n" "$deadline" &
    LOOPS+=($!)
done
for p in "${LOOPS[@]}"; do wait "$p"; done

echo
echo "slot rounds  failed  backup_rss_kib(first..last, max)  qsd_rss_kib(first..last)  qsd_fds(first..last)  wall_s(median)"
total=0 failed=0
for ((n = 1; n <= SLOTS; n++)); do
    f=$S/$n/rounds
    r=$(wc -l < "$f")
    bad=$(awk '$6 != "ok"' "$f" | wc -l)
    total=$((total + r)) failed=$((failed + bad))
    printf '%4d %6d %7d  %8s..%-8s %8s  %8s..%-8s  %4s..%-4s  %s\n' "$n" "$r" "$bad" \
        "$(head -1 "$f" | cut -d' ' -f3)" "$(tail -1 "$f" | cut -d' ' -f3)" "$(cut -d' ' -f3 "$f" | sort -n | tail -1)" \
        "$(head -1 "$f" | cut -d' ' -f4)" "$(tail -1 "$f" | cut -d' ' -f4)" \
        "$(head -1 "$f" | cut -d' ' -f5)" "$(tail -1 "$f" | cut -d' ' -f5)" \
        "$(median $(cut -d' ' -f2 "$f"))"
    awk '$6 != "ok" {print "  round " $1 ": " $6}' "$f"
done
echo "backups: $total, failed: $failed"
# Flat: the fds of every daemon end where they started, and the median
# peak RSS of the backups in the last quarter of rounds stays within 10 %
# of the first quarter's, for plain and --zstd backups apart (they differ).
fds_grew=0
for ((n = 1; n <= SLOTS; n++)); do
    f=$S/$n/rounds
    [[ $(head -1 "$f" | cut -d' ' -f5) == "$(tail -1 "$f" | cut -d' ' -f5)" ]] || fds_grew=1
done
all=$(cat "$S"/*/rounds)
rounds=$(echo "$all" | awk '{print $1}' | sort -n | tail -1)
q=$(( (rounds + 3) / 4 ))
for mode in plain zstd; do
    par=$([[ $mode == plain ]] && echo 1 || echo 0)
    first=$(median $(echo "$all" | awk -v q="$q" -v p="$par" '$1 <= q && $1 % 2 == p {print $3}'))
    last=$(median $(echo "$all" | awk -v r="$rounds" -v q="$q" -v p="$par" '$1 > r - q && $1 % 2 == p {print $3}'))
    echo "backup peak RSS ($mode): median $first KiB in the first $q rounds, $last KiB in the last $q: $(awk -v a="$first" -v b="$last" 'BEGIN { print (b <= a * 1.1) ? "flat" : "GREW" }')"
done
echo "daemon fds: $( ((fds_grew)) && echo "GREW in some slot" || echo "flat (same count after the first and the last round in every slot)")"
((failed == 0)) || exit 1
