#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), one after the
# other, with libFuzzer through cargo-fuzz on the *stable* toolchain: with
# `--sanitizer none` cargo-fuzz passes rustc only stable flags (SanitizerCoverage
# through -Cpasses/-Cllvm-args), so no nightly and no RUSTC_BOOTSTRAP are
# needed. Rust's own checks catch what a sanitizer would on these paths
# (no unsafe code there): bounds always, and integer overflow because the
# targets are built with debug assertions (`-a`).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs `cargo install cargo-fuzz --locked` and a C++ compiler. Seed
# corpora are made from the golden archives and a valid NBD conversation
# under target/fuzz/corpus/TARGET (kept between runs, so later runs start
# from what earlier ones found); crashes land in fuzz/artifacts/TARGET.
# Exits non-zero when a target finds a crash, a timeout or a leak.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-30}
shift || true
all=(nbd_handshake nbd_transmission nbd_wire vma_header vma_extent vma_reader vma_index)
targets=("${@:-${all[@]}}")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

# The default toolchain: stable on CI (and here).
fuzz=(cargo fuzz)
opts=(--sanitizer none --release --debug-assertions --target-dir target/fuzz)
corpus=target/fuzz/corpus

"${fuzz[@]}" build "${opts[@]}"

seed() { # seed TARGET NAME < bytes
    mkdir -p "$corpus/$1"
    cat > "$corpus/$1/seed-$2"
}
be32() { printf "\\x$(printf %02x $(($1 >> 24 & 255)))\\x$(printf %02x $(($1 >> 16 & 255)))\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 & 255)))"; }
be16() { printf "\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 & 255)))"; }
be64() { be32 $(($1 >> 32)); be32 $(($1 & 0xffffffff)); }
opt() { # opt CODE PAYLOAD-FILE
    printf 'IHAVEOPT'; be32 "$1"; be32 "$(stat -c %s "$2")"; cat "$2"
}
req() { # req EXTENDED FLAGS CMD COOKIE OFFSET LEN
    if [ "$1" = 1 ]; then printf '\x21\xe4\x1c\x71'; else printf '\x25\x60\x95\x13'; fi
    be16 "$2"; be16 "$3"; be64 "$4"; be64 "$5"
    if [ "$1" = 1 ]; then be64 "$6"; else be32 "$6"; fi
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{ be32 1; printf a; be16 2; be16 1; be16 3; } > "$tmp/go"
{ be32 1; printf a; be32 1; be32 15; printf base:allocation; } > "$tmp/meta"
: > "$tmp/none"
{
    be32 3; opt 11 "$tmp/none"; opt 10 "$tmp/meta"; opt 3 "$tmp/none"; opt 9 "$tmp/meta"
    opt 6 "$tmp/go"; opt 7 "$tmp/go"
} | seed nbd_handshake conversation
printf a > "$tmp/a"
{ be32 1; opt 1 "$tmp/a"; } | seed nbd_handshake export-name
requests() { # requests EXTENDED
    req "$1" 0 1 1 4096 100; head -c 100 /dev/zero | tr '\0' Z
    req "$1" 0 0 2 4000 300
    req "$1" 2 6 3 0 65536
    req "$1" 0 7 4 0 1048576
    req "$1" 0 3 5 0 0
    req "$1" 1 4 6 512 512
    req "$1" 0 5 7 0 4096
    req "$1" 0 2 8 0 0
}
for mode in 0 1 2; do
    { printf "\\x$(printf %02x $mode)"; requests $((mode == 2)); } | seed nbd_transmission "mode$mode"
done
{ printf '\x07'; req 0 0 1 1 0 512; } | seed nbd_wire request
{ printf '\x07'; req 1 0 1 1 0 512; } | seed nbd_wire extended
{ printf '\x07'; cat "$tmp/meta"; } | seed nbd_wire meta
{ printf '\x07'; cat "$tmp/go"; } | seed nbd_wire go
for a in format/golden/*.vma tests/fixtures/proxmox/odd-size.vma; do
    n=$(basename "$a" .vma)
    hs=$(od -An -tu1 -j56 -N4 "$a" | awk '{print $1*16777216 + $2*65536 + $3*256 + $4}')
    { printf '\x00'; head -c "$hs" "$a"; } | seed vma_header "$n"
    { dd if="$a" bs=16 skip=8 count=1 iflag=skip_bytes status=none; printf '\x00'
      dd if="$a" bs=512 skip="$hs" count=1 iflag=skip_bytes status=none; } |
        seed vma_extent "$n"
    { printf '\x00'; cat "$a"; } | seed vma_reader "$n"
    if [ -f "$a.index" ] && command -v zstd >/dev/null; then
        { printf '\x00'; dd if="$a.index" bs=8 skip=32 count=1 iflag=skip_bytes status=none
          tail -c +65 "$a.index" | zstd -dcq; } | seed vma_index "$n"
    fi
done

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$corpus/$t" "fuzz/artifacts/$t"
    echo "fuzz/run.sh: $t for ${secs}s"
    max_len=4096
    case $t in
        vma_header) max_len=20000 ;;
        vma_reader) max_len=140000 ;;
        vma_index) max_len=8192 ;;
        nbd_transmission) max_len=70000 ;;
    esac
    if ! "${fuzz[@]}" run "${opts[@]}" "$t" "$corpus/$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>&1 | tee "target/fuzz/$t.log" | grep -E '^(#[0-9]+.*(DONE|NEW)|stat::|==|SUMMARY|.*panicked)' | tail -8; then
        :
    fi
    if grep -qE 'ERROR: libFuzzer|panicked at|deadly signal|SUMMARY' "target/fuzz/$t.log"; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run.sh: findings in ${failed[*]} (see target/fuzz/TARGET.log and fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/run.sh: no findings in ${targets[*]}"
