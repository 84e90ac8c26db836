#!/usr/bin/env bash
# Live-backup benchmark of vma-writer (issue 4 item 7).
#
# QEMU `blockdev-backup` (sync=full) of a 4 GiB dense random raw image on
# tmpfs, run by qemu-storage-daemon, into each of these NBD targets on a Unix
# socket (all in the same run, a fresh daemon for every run):
#   a   vma-writer serve, uncompressed archive to tmpfs, job driven by
#       /work/shared/tools/qmp_backup.py (QMP_BACKUP=...);
#   a'  vma-writer backup --qmp (the product path: QMP, NBD and archive in
#       one process), end to end;
#   b   nbdkit null 4G (the transport ceiling);
#   c   nbdkit file onto tmpfs (a server that stores the data).
# Time: wall clock from the start of the QMP driver until the data is safe:
# for a, until `serve` exits with the archive finalised (after QEMU's
# blockdev-del flush + disconnect); for a', until `backup` exits; for b and c,
# until qmp_backup.py exits (after blockdev-del). Also recorded: the job time
# that qmp_backup.py prints (job start to BLOCK_JOB_COMPLETED).
# Peak RSS of vma-writer (and nbdkit) with /usr/bin/time -v.
# MB = 10^6 B of the drive size; medians of RUNS (default 3) runs, each
# started after the machine was >= 85 % idle for 1 s (at most IDLE_CAP s).
# One archive of a and one of a' are checked with `vma-writer verify` (not
# timed).
#
# Experiment (TARGETS="a a2 b c amt"): amt = a under GLIBC_TUNABLES that make
# glibc keep freed 1 MiB payload buffers (what a buffer pool would gain).
#
# Random-access archives (issue 8), as further targets:
#   ax  a, but the archive to stdout (`-o - > FILE`): no index, no digests,
#       so a/ax in CPU is what the index costs;
#   z   vma-writer serve --zstd (seekable frames on all cores, index inside);
#   zp  vma-writer serve -o - | zstd -T2 -3 (vzdump's way), the peer of z.
# SOURCE=mixed makes the source compressible (per 4 MiB: 1 MiB text-like,
# 1 MiB random, 2 MiB zeros) instead of dense random, for z and zp.
#
# Usage: bench/live.sh          Env: VMA=...  RUNS=3  SIZE_MIB=4096  SCRATCH=...
#                                    TARGETS="a a2 b c"  SOURCE=random|mixed
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

VMA=${VMA:-$here/../target/release/vma-writer}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
QMP_BACKUP=${QMP_BACKUP:-/work/shared/tools/qmp_backup.py}
# the system python: a pyenv shim costs ~0.5 s of start-up inside the timed span
PY=${PY:-/usr/bin/python3}
TARGETS=${TARGETS:-"a a2 b c"}
[[ -x $VMA ]] || { echo "no binary at $VMA (cargo build --release)" >&2; exit 1; }
VMA=$(cd "$(dirname "$VMA")" && pwd)/$(basename "$VMA")
SIZE=$((SIZE_MIB << 20))

S=${SCRATCH:-/dev/shm/vma-bench-live.$$}
mkdir -p "$S"
cleanup() {
    local p c
    # only the background jobs of this shell that are still running
    for p in $(jobs -p); do
        # /usr/bin/time's child first, then the process itself
        for c in $(pgrep -P "$p" 2>/dev/null || true); do kill "$c" 2>/dev/null || true; done
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== live benchmark, $RUNS runs, ${SIZE_MIB} MiB dense random source, binary $VMA"
machine_info
echo "qemu:    $(qemu-storage-daemon --version | head -1)"
echo "nbdkit:  $(nbdkit --version)"
echo "making the ${SOURCE:-random} source in $S ..."
if [[ ${SOURCE:-random} == mixed ]]; then
    # per 4 MiB: 1 MiB text-like (random bytes mapped onto letters, spaces
    # and newlines), 1 MiB random, 2 MiB zeros
    python3 - "$S/src.raw" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
M = 1 << 20
alphabet = bytes(b"abcdefghijklmnopqrstuvwxyz    \n\n" * 8)
table = bytes.maketrans(bytes(range(256)), alphabet)
with open(path, "wb") as w:
    for i in range(mib // 4):
        w.write(os.urandom(M).translate(table))
        w.write(os.urandom(M))
        w.write(bytes(2 * M))
PY
else
    rnd $SIZE vma-bench-live > "$S/src.raw"
fi

QSD_PID=
start_qsd() {
    rm -f "$S/qmp.sock"
    qemu-storage-daemon \
        --chardev "socket,path=$S/qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
        --blockdev "driver=file,filename=$S/src.raw,node-name=f0" \
        --blockdev driver=raw,file=f0,node-name=drive0 >> "$S/qsd.log" 2>&1 &
    QSD_PID=$!
    wait_socket "$S/qmp.sock"
}
# CPU seconds of the daemon so far; recorded per target just before it stops
qsd_cpu() { cpu_secs_pid "$QSD_PID"; }
stop_qsd() { stop_pid "$QSD_PID"; QSD_PID=; }

declare -A T J RSS CPU QCPU FOREIGN SIZES
add() { T[$1]="${T[$1]:-} $2"; IDLE_SEEN[$1]="${IDLE_SEEN[$1]:-} $LAST_IDLE"; }
declare -A IDLE_SEEN

# job seconds from qmp_backup.py's "BLOCK_JOB_COMPLETED ... t=0.41s"
job_secs() { sed -n 's/.*BLOCK_JOB_COMPLETED.* t=\([0-9.]*\)s.*/\1/p' "$1" | head -1; }

VERIFIED_a=0
VERIFIED_a2=0

MALLOC_TUNED='glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=268435456'
run_a() { # vma-writer serve + qmp_backup.py; $2 = key (a, or amt: malloc tuned)
    local i=$1 k=${2:-a} arch="$S/a.vma" t0 sp rc tun=
    [[ $k == amt ]] && tun=$MALLOC_TUNED
    rm -f "$S/nbd.sock" "$arch" "$arch.index"
    GLIBC_TUNABLES=$tun /usr/bin/time -v -o "$S/time-a.txt" "$VMA" serve --listen "unix:$S/nbd.sock" \
        --drive "drive-scsi0=$SIZE" -o "$arch" > "$S/serve.out" 2> "$S/serve.err" &
    sp=$!
    wait_socket "$S/nbd.sock"
    wait_idle
    local b0 q0
    q0=$(qsd_cpu); b0=$(busy_secs)
    t0=$(now)
    "$PY" "$QMP_BACKUP" --qmp "$S/qmp.sock" --nbd-unix "$S/nbd.sock" \
        --node drive0 --export drive-scsi0 > "$S/qb.out" 2>&1 || { cat "$S/qb.out" "$S/serve.err" >&2; return 1; }
    rc=0; wait "$sp" || rc=$?
    add "$k" "$(since "$t0")"
    local b1; b1=$(busy_secs)
    [[ $rc == 0 ]] || { echo "serve exited $rc" >&2; cat "$S/serve.err" >&2; return 1; }
    J[$k]="${J[$k]:-} $(job_secs "$S/qb.out")"
    RSS[$k]="${RSS[$k]:-} $(peak_rss_kib "$S/time-a.txt")"
    CPU[$k]="${CPU[$k]:-} $(cpu_secs_time "$S/time-a.txt")"; QCPU[$k]="${QCPU[$k]:-} $(qsd_cpu)"
    FOREIGN[$k]="${FOREIGN[$k]:-} $(foreign_secs "$b0" "$b1" "$(awk -v s="$(cpu_secs_time "$S/time-a.txt")" -v q1="$(qsd_cpu)" -v q0="$q0" 'BEGIN { print s + q1 - q0 }')")"
    if ((VERIFIED_a == 0)); then
        "$VMA" verify "$arch" && echo "   verify of (a) archive: OK ($(stat -c %s "$arch") B)"
        tail -2 "$S/serve.err" | sed 's/^/   serve: /'
        VERIFIED_a=1
    fi
    rm -f "$arch" "$arch.index"
}

run_a2() { # vma-writer backup --qmp, end to end
    local i=$1 arch="$S/a2.vma" t0
    rm -f "$arch" "$arch.index"
    wait_idle
    local b0 b1 q0
    q0=$(qsd_cpu); b0=$(busy_secs)
    t0=$(now)
    /usr/bin/time -v -o "$S/time-a2.txt" "$VMA" backup --qmp "$S/qmp.sock" \
        --drive drive0=drive-scsi0 -o "$arch" > "$S/backup.out" 2> "$S/backup.err" \
        || { echo "backup failed" >&2; cat "$S/backup.err" >&2; return 1; }
    add a2 "$(since "$t0")"
    b1=$(busy_secs)
    RSS[a2]="${RSS[a2]:-} $(peak_rss_kib "$S/time-a2.txt")"
    CPU[a2]="${CPU[a2]:-} $(cpu_secs_time "$S/time-a2.txt")"; QCPU[a2]="${QCPU[a2]:-} $(qsd_cpu)"
    FOREIGN[a2]="${FOREIGN[a2]:-} $(foreign_secs "$b0" "$b1" "$(awk -v s="$(cpu_secs_time "$S/time-a2.txt")" -v q1="$(qsd_cpu)" -v q0="$q0" 'BEGIN { print s + q1 - q0 }')")"
    if ((VERIFIED_a2 == 0)); then
        "$VMA" verify "$arch" && echo "   verify of (a') archive: OK ($(stat -c %s "$arch") B)"
        tail -2 "$S/backup.err" | sed 's/^/   backup: /'
        VERIFIED_a2=1
    fi
    rm -f "$arch" "$arch.index"
}

run_stream() { # ax: serve -o - > FILE; zp: serve -o - | zstd -T2 -3 > FILE
    local i=$1 k=$2 arch="$S/$2.vma" t0 sp rc
    rm -f "$S/nbd.sock" "$arch" "$arch.index"
    if [[ $k == zp ]]; then
        arch="$S/zp.vma.zst"
        bash -c "/usr/bin/time -v -o '$S/time-$k.txt' '$VMA' serve --listen 'unix:$S/nbd.sock' \
            --drive 'drive-scsi0=$SIZE' -o - 2> '$S/serve.err' | zstd -T2 -3 -q > '$arch'" &
    else
        /usr/bin/time -v -o "$S/time-$k.txt" "$VMA" serve --listen "unix:$S/nbd.sock" \
            --drive "drive-scsi0=$SIZE" -o - > "$arch" 2> "$S/serve.err" &
    fi
    sp=$!
    wait_socket "$S/nbd.sock"
    wait_idle
    local b0 b1 q0
    q0=$(qsd_cpu); b0=$(busy_secs)
    t0=$(now)
    "$PY" "$QMP_BACKUP" --qmp "$S/qmp.sock" --nbd-unix "$S/nbd.sock" \
        --node drive0 --export drive-scsi0 > "$S/qb.out" 2>&1 || { cat "$S/qb.out" "$S/serve.err" >&2; return 1; }
    rc=0; wait "$sp" || rc=$?
    add "$k" "$(since "$t0")"
    b1=$(busy_secs)
    [[ $rc == 0 ]] || { echo "$k exited $rc" >&2; cat "$S/serve.err" >&2; return 1; }
    J[$k]="${J[$k]:-} $(job_secs "$S/qb.out")"
    RSS[$k]="${RSS[$k]:-} $(peak_rss_kib "$S/time-$k.txt")"
    CPU[$k]="${CPU[$k]:-} $(cpu_secs_time "$S/time-$k.txt")"; QCPU[$k]="${QCPU[$k]:-} $(qsd_cpu)"
    FOREIGN[$k]="${FOREIGN[$k]:-} $(foreign_secs "$b0" "$b1" "$(awk -v s="$(cpu_secs_time "$S/time-$k.txt")" -v q1="$(qsd_cpu)" -v q0="$q0" 'BEGIN { print s + q1 - q0 }')")"
    SIZES[$k]=$(stat -c %s "$arch")
    rm -f "$arch" "$arch.index"
}

run_z() { # vma-writer serve --zstd: seekable frames, index inside
    local i=$1 arch="$S/z.vma.zst" t0 sp rc
    rm -f "$S/nbd.sock" "$arch" "$arch.index"
    /usr/bin/time -v -o "$S/time-z.txt" "$VMA" serve --listen "unix:$S/nbd.sock" \
        --drive "drive-scsi0=$SIZE" -o "$arch" > "$S/serve.out" 2> "$S/serve.err" &
    sp=$!
    wait_socket "$S/nbd.sock"
    wait_idle
    local b0 b1 q0
    q0=$(qsd_cpu); b0=$(busy_secs)
    t0=$(now)
    "$PY" "$QMP_BACKUP" --qmp "$S/qmp.sock" --nbd-unix "$S/nbd.sock" \
        --node drive0 --export drive-scsi0 > "$S/qb.out" 2>&1 || { cat "$S/qb.out" "$S/serve.err" >&2; return 1; }
    rc=0; wait "$sp" || rc=$?
    add z "$(since "$t0")"
    b1=$(busy_secs)
    [[ $rc == 0 ]] || { echo "serve --zstd exited $rc" >&2; cat "$S/serve.err" >&2; return 1; }
    J[z]="${J[z]:-} $(job_secs "$S/qb.out")"
    RSS[z]="${RSS[z]:-} $(peak_rss_kib "$S/time-z.txt")"
    CPU[z]="${CPU[z]:-} $(cpu_secs_time "$S/time-z.txt")"; QCPU[z]="${QCPU[z]:-} $(qsd_cpu)"
    FOREIGN[z]="${FOREIGN[z]:-} $(foreign_secs "$b0" "$b1" "$(awk -v s="$(cpu_secs_time "$S/time-z.txt")" -v q1="$(qsd_cpu)" -v q0="$q0" 'BEGIN { print s + q1 - q0 }')")"
    SIZES[z]=$(stat -c %s "$arch")
    if ((${VERIFIED_z:-0} == 0)); then
        "$VMA" verify "$arch" 2>&1 | tail -1 | sed 's/^/   verify of (z): /'
        VERIFIED_z=1
    fi
    rm -f "$arch" "$arch.index"
}

run_nbdkit() { # b: null, c: file
    local which=$1 t0 np
    rm -f "$S/nbd.sock" "$S/c.raw"
    if [[ $which == b ]]; then
        /usr/bin/time -v -o "$S/time-$which.txt" nbdkit -f -U "$S/nbd.sock" null "$SIZE" &
    else
        truncate -s "$SIZE" "$S/c.raw"
        /usr/bin/time -v -o "$S/time-$which.txt" nbdkit -f -U "$S/nbd.sock" file "$S/c.raw" &
    fi
    np=$!
    wait_socket "$S/nbd.sock"
    wait_idle
    local b0 b1 q0 q1
    q0=$(qsd_cpu); b0=$(busy_secs)
    t0=$(now)
    "$PY" "$QMP_BACKUP" --qmp "$S/qmp.sock" --nbd-unix "$S/nbd.sock" \
        --node drive0 --export '' > "$S/qb.out" 2>&1 || { cat "$S/qb.out" >&2; return 1; }
    add "$which" "$(since "$t0")"
    b1=$(busy_secs); q1=$(qsd_cpu)
    J[$which]="${J[$which]:-} $(job_secs "$S/qb.out")"
    # nbdkit's own child is the server; stop it and let time report
    for c in $(pgrep -P "$np" || true); do kill "$c" 2>/dev/null || true; done
    wait "$np" 2>/dev/null || true
    RSS[$which]="${RSS[$which]:-} $(peak_rss_kib "$S/time-$which.txt")"
    CPU[$which]="${CPU[$which]:-} $(cpu_secs_time "$S/time-$which.txt")"; QCPU[$which]="${QCPU[$which]:-} $q1"
    FOREIGN[$which]="${FOREIGN[$which]:-} $(foreign_secs "$b0" "$b1" "$(awk -v s="$(cpu_secs_time "$S/time-$which.txt")" -v q1="$q1" -v q0="$q0" 'BEGIN { print s + q1 - q0 }')")"
    if [[ $which == c ]] && [[ ${CHECKED_c:-0} == 0 ]]; then
        cmp "$S/src.raw" "$S/c.raw" && echo "   (c) target == source"
        CHECKED_c=1
    fi
    rm -f "$S/c.raw"
}

for ((i = 1; i <= RUNS; i++)); do
    for t in $TARGETS; do
        echo "-- run $i/$RUNS target $t"
        start_qsd
        case $t in
            a) run_a "$i" a ;;
            amt) run_a "$i" amt ;;
            a2) run_a2 "$i" ;;
            ax | zp) run_stream "$i" "$t" ;;
            z) run_z "$i" ;;
            b | c) run_nbdkit "$t" ;;
        esac
        stop_qsd
    done
done

label() {
    case $1 in
        a) echo "a  vma-writer serve -> tmpfs" ;;
        a2) echo "a' vma-writer backup -> tmpfs" ;;
        b) echo "b  nbdkit null" ;;
        c) echo "c  nbdkit file -> tmpfs" ;;
        amt) echo "a  serve, malloc tuned (exp.)" ;;
        ax) echo "ax serve -o - > tmpfs (no index)" ;;
        z) echo "z  serve --zstd (seekable)" ;;
        zp) echo "zp serve -o - | zstd -T2 -3" ;;
    esac
}
med() { # shellcheck disable=SC2086
    median $1; }

echo
echo "== results: QEMU blockdev-backup sync=full of ${SIZE_MIB} MiB ${SOURCE:-random} source, medians of $RUNS runs (MB = 10^6 B)"
machine_info
printf '%-32s %9s %7s %9s %7s %9s %10s %9s\n' target wall_s MB/s job_s job_MB/s "RSS MiB" srv_cpu_s qemu_cpu_s
for t in $TARGETS; do
    w=$(med "${T[$t]}")
    j=""; jm=""
    if [[ -n ${J[$t]:-} ]]; then j=$(med "${J[$t]}"); jm=$(mbps $SIZE "$j"); fi
    r=$(awk -v k="$(med "${RSS[$t]}")" 'BEGIN { printf "%.1f", k / 1024 }')
    printf '%-32s %9s %7s %9s %7s %9s %10s %9s\n' "$(label "$t")" "$w" "$(mbps $SIZE "$w")" "$j" "$jm" "$r" \
        "$(med "${CPU[$t]}")" "$(med "${QCPU[$t]}")"
done
has() { [[ " $TARGETS " == *" $1 "* ]]; }
if has a && has b; then
    echo "(a)/(b)  = $(ratio "$(med "${T[b]}")" "$(med "${T[a]}")")   (target >= 0.90)"
fi
if has a && has c; then
    echo "(a)/(c)  = $(ratio "$(med "${T[c]}")" "$(med "${T[a]}")")   (target > 1.00)"
fi
if has a && has b; then
    echo "   job-time ratio (a)/(b) = $(ratio "$(med "${J[b]}")" "$(med "${J[a]}")")   (job start to BLOCK_JOB_COMPLETED, without start-up and finalising)"
fi
if has a && has c; then
    echo "   job-time ratio (a)/(c) = $(ratio "$(med "${J[c]}")" "$(med "${J[a]}")")"
fi
if has a2 && has b; then
    echo "(a')/(b) = $(ratio "$(med "${T[b]}")" "$(med "${T[a2]}")")"
fi
if has a2 && has c; then
    echo "(a')/(c) = $(ratio "$(med "${T[c]}")" "$(med "${T[a2]}")")"
fi
if has a; then
    echo "peak RSS of vma-writer serve: max $(printf '%s\n' ${RSS[a]} | sort -n | tail -1) KiB (target <= 65536 KiB)"
fi
if has a2; then
    echo "peak RSS of vma-writer backup: max $(printf '%s\n' ${RSS[a2]} | sort -n | tail -1) KiB (target <= 65536 KiB)"
fi
# Paired ratios: each round runs every target back to back, so the ratio
# within a round is less exposed to slow drifts of the machine's load.
paired() { # NUM_KEY DEN_KEY: median over rounds of T[DEN]/T[NUM] (speed of NUM relative to DEN)
    local -a n d r=()
    read -r -a n <<< "${T[$1]}"
    read -r -a d <<< "${T[$2]}"
    local k
    for k in "${!n[@]}"; do r+=("$(ratio "${d[$k]}" "${n[$k]}")"); done
    # the same over clean rounds only: both runs with foreign CPU <= FOREIGN_MAX s
    local -a fn fd c=()
    read -r -a fn <<< "${FOREIGN[$1]:-}"
    read -r -a fd <<< "${FOREIGN[$2]:-}"
    for k in "${!n[@]}"; do
        if awk -v a="${fn[$k]:-9}" -v b="${fd[$k]:-9}" -v m="$FOREIGN_MAX" 'BEGIN { exit !(a <= m && b <= m) }'; then
            c+=("${r[$k]}")
        fi
    done
    local cm="none"
    ((${#c[@]})) && cm=$(median "${c[@]}")
    echo "$(median "${r[@]}") (rounds: ${r[*]}); clean rounds only: $cm (${#c[@]} of ${#r[@]}: ${c[*]})"
}
FOREIGN_MAX=${FOREIGN_MAX:-0.5}
if has z && has zp; then
    echo "(z)/(zp) = $(ratio "$(med "${T[zp]}")" "$(med "${T[z]}")")   (serve --zstd against serve -o - | zstd -T2 -3; sizes ${SIZES[z]:-?} / ${SIZES[zp]:-?} B)"
fi
if has a && has ax; then
    echo "index cost: serve CPU with index / without = $(ratio "$(med "${CPU[a]}")" "$(med "${CPU[ax]}")")   (target <= 1.10)"
fi
for pr in "a b" "a c" "a2 b" "a2 c" "amt b" "amt c" "z zp" "a ax"; do
    read -r x y <<< "$pr"
    if has "$x" && has "$y"; then echo "paired ($x)/($y): $(paired "$x" "$y")"; fi
done
echo "srv_cpu_s: user+sys CPU seconds of the NBD server process (vma-writer or nbdkit; for a' it includes QMP);"
echo "qemu_cpu_s: of qemu-storage-daemon (source read, copy-before-write, NBD client). 2 cores = 2 CPU-s per wall s."
echo "foreign_cpu: CPU-s other processes used during the timed span (machine busy time minus server and QEMU);"
echo "  a round whose runs have foreign_cpu near 0 is a clean comparison."
echo "Raw wall seconds:"
for k in $(printf '%s\n' "${!T[@]}" | sort); do echo "  $k:${T[$k]}   job:${J[$k]:-}   rssKiB:${RSS[$k]:-}   srv_cpu:${CPU[$k]:-}   qemu_cpu:${QCPU[$k]:-}   foreign_cpu:${FOREIGN[$k]:-}   (idle %:${IDLE_SEEN[$k]})"; done
