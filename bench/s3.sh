#!/usr/bin/env bash
# Object-storage benchmark of vma-writer (issue 12 item 5), against an S3
# server on loopback: s3s-fs (an S3 server over a directory, on tmpfs
# here), installed with `cargo install s3s-fs --features binary` (S3SFS=...).
#
# 1. A live backup of one SIZE_MIB (default 4096) MiB dense random drive by
#    QEMU (qemu-storage-daemon, `vma-writer backup --qmp --no-bitmap`):
#      f  into a local file on tmpfs;
#      s  into s3://bench/KEY (a multipart upload, default parts);
#      u  the same with AWS_UNSIGNED_PAYLOAD=true: no SHA-256 of every part
#         for its signature (object_store's option; the store then skips
#         checking it too).
#    Wall clock of `backup`, MB/s of drive data, bytes the store received
#    (the object), peak RSS of vma-writer.
# 2. One drive of a 4-drive plain .vma (4 x SIZE_MIB/4 MiB, random and
#    zeros; with its index object) in the store:
#      x  `extract -d d2 s3://...`: ranged GETs of that drive's extents;
#      w  the whole object downloaded first (`convert s3://... FILE`, one
#         streamed GET written to tmpfs), then `extract -d d2 FILE`.
#    Wall clock, bytes fetched (vma-writer's own count, its debug log),
#    peak RSS.
# Medians of RUNS (default 3), each run after the machine was >= 85 % idle
# for 1 s (at most IDLE_CAP s): the machine has 2 cores and may be shared.
#
# Usage: bench/s3.sh     Env: VMA=... S3SFS=... RUNS=3 SIZE_MIB=4096 SCRATCH=...
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
source "$here/lib.sh"

VMA=${VMA:-$here/../target/release/vma-writer}
S3SFS=${S3SFS:-$(command -v s3s-fs || echo "$here/../target/bench-tools/bin/s3s-fs")}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-4096}
[[ -x $VMA ]] || { echo "no binary at $VMA (cargo build --release)" >&2; exit 1; }
[[ -x $S3SFS ]] || { echo "no s3s-fs at $S3SFS (cargo install s3s-fs --features binary)" >&2; exit 1; }
SIZE=$((SIZE_MIB << 20))
PORT=${PORT:-18014}

S=${SCRATCH:-/dev/shm/vma-bench-s3.$$}
mkdir -p "$S/store/bench"
QSD_PID= S3_PID=
cleanup() {
    stop_pid "$QSD_PID"
    stop_pid "$S3_PID"
    rm -rf "$S"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
"$S3SFS" --host 127.0.0.1 --port "$PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$S/store" > "$S/s3.log" 2>&1 &
S3_PID=$!
for _ in $(seq 100); do
    (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done

echo "== S3 benchmark, $RUNS runs, ${SIZE_MIB} MiB, binary $VMA, store s3s-fs on tmpfs"
machine_info
echo "qemu:    $(qemu-storage-daemon --version | head -1)"
echo "making the sources in $S ..."
rnd $SIZE vma-bench-s3 > "$S/src.raw"

start_qsd() {
    rm -f "$S/qmp.sock"
    qemu-storage-daemon \
        --chardev "socket,path=$S/qmp.sock,server=on,wait=off,id=m0" --monitor chardev=m0 \
        --blockdev "driver=file,filename=$S/src.raw,node-name=f0" \
        --blockdev driver=raw,file=f0,node-name=drive0 >> "$S/qsd.log" 2>&1 &
    QSD_PID=$!
    wait_socket "$S/qmp.sock"
}

declare -A T RSS BYTES
add() { T[$1]="${T[$1]:-} $2"; RSS[$1]="${RSS[$1]:-} $3"; BYTES[$1]="${BYTES[$1]:-} $4"; }

# Bytes fetched by every object a command read (its debug log).
fetched() { sed -n 's/.*object \(read by ranges\|streamed\).* fetched=\([0-9]*\).*/\2/p' "$1" | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

start_qsd
for i in $(seq "$RUNS"); do
    for k in f s u; do
        unsigned=false
        case $k in
            f) out="$S/b$i.vma" ;;
            s) out="s3://bench/b$i.vma" ;;
            u) out="s3://bench/b$i.vma"; unsigned=true ;;
        esac
        wait_idle
        t0=$(now)
        AWS_UNSIGNED_PAYLOAD=$unsigned /usr/bin/time -v -o "$S/time.txt" "$VMA" backup --qmp "$S/qmp.sock" --no-bitmap \
            --drive drive0=drive-scsi0 -o "$out" > "$S/backup.out" 2> "$S/backup.err" \
            || { cat "$S/backup.err" >&2; exit 1; }
        secs=$(since "$t0")
        case $k in
            f) bytes=$(stat -c %s "$out"); rm -f "$out" "$out.index" ;;
            s|u) bytes=$(stat -c %s "$S/store/bench/b$i.vma"); rm -f "$S/store/bench/b$i.vma"* ;;
        esac
        add "$k" "$secs" "$(peak_rss_kib "$S/time.txt")" "$bytes"
        echo "  run $i $k: $secs s, $bytes B, RSS $(peak_rss_kib "$S/time.txt") KiB"
    done
done
stop_pid "$QSD_PID"; QSD_PID=

echo "making the 4-drive archive ..."
quarter=$((SIZE / 4))
drives=()
for d in 1 2 3 4; do
    # half random, half zeros
    { rnd $((quarter / 2)) "vma-bench-s3-$d"; head -c $((quarter / 2)) /dev/zero; } > "$S/d$d.raw"
    drives+=(-d "d$d=$S/d$d.raw")
done
"$VMA" create "s3://bench/four.vma" "${drives[@]}"
rm -f "$S"/d?.raw "$S/src.raw"
four=$(stat -c %s "$S/store/bench/four.vma")
echo "   four.vma: $four B"
for i in $(seq "$RUNS"); do
    wait_idle
    rm -rf "$S/x"
    t0=$(now)
    RUST_LOG=vma_writer::object=debug /usr/bin/time -v -o "$S/time.txt" \
        "$VMA" extract -d d2 s3://bench/four.vma "$S/x" 2> "$S/x.err" || { cat "$S/x.err" >&2; exit 1; }
    add x "$(since "$t0")" "$(peak_rss_kib "$S/time.txt")" "$(fetched "$S/x.err")"
    wait_idle
    rm -rf "$S/w" "$S/whole.vma" "$S/whole.vma.index"
    t0=$(now)
    RUST_LOG=vma_writer::object=debug /usr/bin/time -v -o "$S/time.txt" \
        "$VMA" convert s3://bench/four.vma "$S/whole.vma" 2> "$S/w.err" || { cat "$S/w.err" >&2; exit 1; }
    rss1=$(peak_rss_kib "$S/time.txt")
    /usr/bin/time -v -o "$S/time.txt" "$VMA" extract -d d2 "$S/whole.vma" "$S/w"
    rss2=$(peak_rss_kib "$S/time.txt")
    add w "$(since "$t0")" "$((rss1 > rss2 ? rss1 : rss2))" "$(fetched "$S/w.err")"
    cmp "$S/x/disk-d2.raw" "$S/w/disk-d2.raw"
    echo "  run $i: x $(echo "${T[x]}" | awk '{print $NF}') s, w $(echo "${T[w]}" | awk '{print $NF}') s"
done

report() { # key what drive-bytes
    local k=$1 what=$2 data=$3 t
    # shellcheck disable=SC2086
    t=$(median ${T[$k]})
    # shellcheck disable=SC2086
    printf '%-58s %8s s %7s MB/s %14s B %9s KiB\n' "$what" "$t" "$(mbps "$data" "$t")" \
        "$(median ${BYTES[$k]} | cut -d. -f1)" "$(median ${RSS[$k]} | cut -d. -f1)"
}
echo
echo "medians of $RUNS (time, MB/s of drive data, bytes to/from the store, peak RSS):"
report f "backup ${SIZE_MIB} MiB -> local file (tmpfs)" $SIZE
report s "backup ${SIZE_MIB} MiB -> s3:// (loopback, tmpfs)" $SIZE
report u "backup ${SIZE_MIB} MiB -> s3://, AWS_UNSIGNED_PAYLOAD=true" $SIZE
echo "   s / f time: $(ratio "$(median ${T[s]})" "$(median ${T[f]})"), u / f: $(ratio "$(median ${T[u]})" "$(median ${T[f]})")"
report x "extract -d d2 (1 of 4 drives) from s3:// by ranges" $quarter
report w "download whole object, then extract -d d2" $quarter
echo "   w / x time: $(ratio "$(median ${T[w]})" "$(median ${T[x]})"), bytes: $(ratio "$(median ${BYTES[w]})" "$(median ${BYTES[x]})")"
