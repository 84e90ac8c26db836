#!/usr/bin/env bash
# Memory benchmark of a many-drive live backup (issue 11 item 6); not part
# of CI.
#
# One qemu-storage-daemon (the "VM") with DRIVES (default 8) raw drives of
# DRIVE_MIB (default 512) MiB of dense random data on tmpfs; `vma-writer
# backup --all` (QMP, NBD server and archive writer in one process) archives
# all of them at full speed (no --speed) into an uncompressed archive on
# tmpfs. Each binary in BINS (NAME=PATH; default: before=$BEFORE when set,
# e.g. a release build of the merge base, and after = this tree's release
# build) runs RUNS (default 3)
# times, interleaved (before, after, before, ...), so both see the same
# machine; each run starts after the machine was >= 85 % idle for 1 s (at
# most IDLE_CAP s).
# Recorded per run: the backup's peak RSS (/usr/bin/time -v) and its
# throughput (drive bytes / wall time of `backup`, MB = 10^6 B). One archive
# per binary is checked with `vma-writer verify` (not timed). Extra
# arguments for `backup` (e.g. `--memory 32M`) go in BACKUP_ARGS_<NAME>.
#
# Usage: bench/memory.sh    Env: BEFORE=PATH (or BINS="a=PATH b=PATH") RUNS=3
#                                DRIVES=8 DRIVE_MIB=512 SCRATCH=dir
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

RUNS=${RUNS:-3}
DRIVES=${DRIVES:-8}
DRIVE_MIB=${DRIVE_MIB:-512}
BINS=${BINS:-"${BEFORE:+before=$BEFORE }after=$here/../target/release/vma-writer"}
for t in qemu-storage-daemon /usr/bin/time; do
    command -v $t >/dev/null || { echo "$t is missing" >&2; exit 1; }
done
declare -a NAMES=()
declare -A BIN
for nb in $BINS; do
    n=${nb%%=*} b=${nb#*=}
    [[ -x $b ]] || { echo "no binary at $b ($n)" >&2; exit 1; }
    NAMES+=("$n")
    BIN[$n]=$(cd "$(dirname "$b")" && pwd)/$(basename "$b")
done

S=${SCRATCH:-/dev/shm/vma-bench-mem.$$}
mkdir -p "$S"
QSD_PID=
cleanup() {
    stop_pid "$QSD_PID"
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MiB=$((1 << 20))
echo "== memory benchmark: $DRIVES drives x $DRIVE_MIB MiB dense random, $RUNS runs per binary"
machine_info
echo "qemu:    $(qemu-storage-daemon --version | head -1)"
args=()
for i in $(seq 0 $((DRIVES - 1))); do
    rnd $((DRIVE_MIB * MiB)) "vma-bench-mem-$i" > "$S/d$i.raw"
    args+=(--blockdev "driver=file,filename=$S/d$i.raw,node-name=f$i"
           --blockdev "driver=raw,file=f$i,node-name=drive$i")
done
qemu-storage-daemon \
    --chardev "socket,path=$S/qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
    "${args[@]}" >> "$S/qsd.log" 2>&1 &
QSD_PID=$!
wait_socket "$S/qmp.sock"

TOTAL=$((DRIVES * DRIVE_MIB * MiB))
declare -A RSS MBS IDLE
run() { # run NAME
    local n=$1 arch="$S/$1.vma" t0 secs extra_var extra
    extra_var=BACKUP_ARGS_${n//[^A-Za-z0-9_]/_}
    extra=${!extra_var:-}
    rm -f "$arch" "$arch.index"
    wait_idle
    t0=$(now)
    # shellcheck disable=SC2086 # BACKUP_ARGS_* are split on purpose
    /usr/bin/time -v -o "$S/time-$n.txt" "${BIN[$n]}" backup --qmp "$S/qmp.sock" --all \
        -o "$arch" $extra > "$S/$n.out" 2> "$S/$n.err" \
        || { echo "backup ($n) failed" >&2; cat "$S/$n.err" >&2; return 1; }
    secs=$(since "$t0")
    RSS[$n]="${RSS[$n]:-} $(peak_rss_kib "$S/time-$n.txt")"
    MBS[$n]="${MBS[$n]:-} $(mbps "$TOTAL" "$secs")"
    IDLE[$n]="${IDLE[$n]:-} $LAST_IDLE"
    printf '  %-8s run: peak RSS %6d KiB, %5s MB/s (%ss, machine %s%% idle before)\n' \
        "$n" "$(peak_rss_kib "$S/time-$n.txt")" "$(mbps "$TOTAL" "$secs")" "$secs" "$LAST_IDLE"
    if [[ ! -e $S/verified-$n ]]; then
        "${BIN[$n]}" verify "$arch" > /dev/null && echo "  $n: archive verifies"
        touch "$S/verified-$n"
    fi
    rm -f "$arch" "$arch.index"
}

for r in $(seq "$RUNS"); do
    for n in "${NAMES[@]}"; do run "$n"; done
done

echo
echo "== medians of $RUNS runs ($DRIVES drives, $((TOTAL / MiB)) MiB in all)"
printf '%-8s %14s %10s   %s\n' binary "peak RSS MiB" "MB/s" "runs (RSS KiB; MB/s)"
for n in "${NAMES[@]}"; do
    # shellcheck disable=SC2086
    printf '%-8s %14s %10s   %s; %s\n' "$n" \
        "$(awk -v k="$(median ${RSS[$n]})" 'BEGIN { printf "%.1f", k / 1024 }')" \
        "$(median ${MBS[$n]} | cut -d. -f1)" "${RSS[$n]# }" "${MBS[$n]# }"
done
echo "(2 shared cores: throughput is noisy; peak RSS is the robust figure)"
