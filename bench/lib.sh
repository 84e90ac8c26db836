# shellcheck shell=bash
# Shared helpers of the vma-writer benchmark scripts (sourced, not run).
# Not part of the test suite.

# Wall clock in seconds with nanoseconds.
now() { date +%s.%N; }

# Busy share of the CPUs over an interval, in percent (integer), from /proc/stat.
cpu_busy_pct() {
    local interval=${1:-1}
    local a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep "$interval"
    read -r -a b < <(grep '^cpu ' /proc/stat)
    # fields: cpu user nice system idle iowait irq softirq steal
    local i tot=0 idle
    for i in 1 2 3 4 5 6 7 8; do tot=$((tot + b[i] - a[i])); done
    idle=$(( (b[4] - a[4]) + (b[5] - a[5]) ))
    ((tot > 0)) || { echo 0; return; }
    echo $(( 100 * (tot - idle) / tot ))
}

# Waits until the machine has been >= IDLE_PCT % idle over 1 s, at most
# IDLE_CAP seconds; prints a note on stderr when the cap is hit. Sets
# LAST_IDLE to the idle share seen last (recorded with each run).
IDLE_PCT=${IDLE_PCT:-85}
IDLE_CAP=${IDLE_CAP:-60}
LAST_IDLE=0
wait_idle() {
    local start busy
    start=$(date +%s)
    while :; do
        busy=$(cpu_busy_pct 1)
        LAST_IDLE=$((100 - busy))
        ((LAST_IDLE >= IDLE_PCT)) && return 0
        if (( $(date +%s) - start >= IDLE_CAP )); then
            echo "  (machine not idle after ${IDLE_CAP}s: ${LAST_IDLE}% idle; running anyway)" >&2
            return 0
        fi
    done
}

# Median of the numbers given as arguments (printed with 3 decimals).
median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) printf "%.3f\n", a[(NR + 1) / 2];
        else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# MB/s (MB = 10^6 B) of BYTES over SECONDS.
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s <= 0) print "nan"; else printf "%.0f\n", b / s / 1e6 }'; }

# a / b with 2 decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "nan"; else printf "%.2f\n", a / b }'; }

# Seconds since START (a `now` value).
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.4f\n", e - s }'; }

# Peak RSS in KiB from a `/usr/bin/time -v -o FILE` report.
peak_rss_kib() { awk -F: '/Maximum resident set size/ { gsub(/ /, "", $2); print $2 }' "$1"; }

# Waits until a Unix socket exists (up to 10 s).
wait_socket() {
    local i
    for i in $(seq 100); do
        [[ -S $1 ]] && return 0
        sleep 0.1
    done
    echo "socket $1 did not appear" >&2
    return 1
}

# Kills a process we started (by pid), then waits for it; quiet if gone.
stop_pid() {
    local pid=$1
    [[ -n $pid ]] || return 0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Machine description for the result header.
machine_info() {
    echo "date:    $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "host:    $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM"
    echo "cpu:     $(awk -F: '/model name/ {sub(/^ /, "", $2); print $2; exit}' /proc/cpuinfo)"
    echo "commit:  ${COMMIT:-$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --short HEAD 2>/dev/null || echo "?")}"
}

# User + system CPU seconds from a `/usr/bin/time -v -o FILE` report.
cpu_secs_time() { awk -F': ' '/User time \(seconds\)|System time \(seconds\)/ { s += $2 } END { printf "%.2f\n", s }' "$1"; }

# User + system CPU seconds a running process has used so far (from /proc).
cpu_secs_pid() {
    local tck
    tck=$(getconf CLK_TCK)
    # fields after the ")" of comm: utime is 14th, stime 15th of the whole line
    sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk -v t="$tck" '{ printf "%.2f\n", ($12 + $13) / t }'
}

# Busy CPU seconds of the whole machine so far (all CPUs, from /proc/stat):
# user nice system irq softirq steal (idle and iowait excluded).
busy_secs() {
    awk -v t="$(getconf CLK_TCK)" '/^cpu / { printf "%.2f\n", ($2 + $3 + $4 + $7 + $8 + $9) / t }' /proc/stat
}

# FOREIGN = machine busy seconds between B0 and B1 minus OURS (CPU seconds of
# the processes under test): CPU that other sessions used during the run.
foreign_secs() { awk -v a="$1" -v b="$2" -v o="$3" 'BEGIN { f = b - a - o; if (f < 0) f = 0; printf "%.2f\n", f }'; }

# rnd BYTES SEED: deterministic, fast random bytes (the AES-CTR keystream of
# SEED), so every run of a benchmark sees the same data.
rnd() { { openssl enc -aes-128-ctr -nosalt -pass pass:"$2" -pbkdf2 -in /dev/zero 2>/dev/null || true; } | head -c "$1"; }

# txt BYTES SEED: text-like bytes: random bytes mapped onto 32 letters,
# spaces and newlines (5 bits of entropy per byte, so zstd -3 halves it
# roughly).
txt() { rnd "$1" "$2" | tr '\000-\377' 'abcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\nabcdefghijklmnopqrstuvwxyz    \n\n'; }

# mixed IMAGE MIB SEED: the compression benchmarks' image: per 4 MiB, 1 MiB
# text-like, 1 MiB random, 2 MiB holes.
mixed() {
    local img=$1 mib=$2 seed=$3 MiB=$((1 << 20))
    python3 - "$img" "$mib" <(txt $((mib / 4 * MiB)) "t$seed") <(rnd $((mib / 4 * MiB)) "r$seed") <<'PY'
import sys
img, mib, txt, rnd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
M = 1 << 20
with open(txt, "rb") as t, open(rnd, "rb") as r, open(img, "wb") as w:
    for i in range(mib // 4):
        w.seek(4 * i * M)
        w.write(t.read(M))
        w.write(r.read(M))
    w.truncate(mib * M)
PY
}
