#!/usr/bin/env bash
# A round trip of vma-writer through a real S3-compatible store, for a user
# to run against the store they deploy (not CI: CI tests against s3s-fs).
#
#   AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#       contrib/s3-roundtrip.sh ENDPOINT BUCKET [PREFIX]
#
# e.g. contrib/s3-roundtrip.sh http://127.0.0.1:3900 vma-test
# VMA_WRITER names the binary (default: vma-writer on PATH, else
# target/release/vma-writer). The bucket must exist and be empty under
# PREFIX (default: roundtrip-<time>/); the objects stay there afterwards,
# to be looked at and deleted.
#
# It writes a 4-drive archive as a plain .vma (with its KEY.index) and as
# a seekable .vma.zst into the bucket with `create`, then checks that
# `list`, `config`, `verify`, `extract`, `extract -d` and `convert` read
# them back to the same bytes as the local archive, that an existing key
# is refused, and that an upload stopped by SIGTERM leaves no object (ask
# the store for leftover multipart uploads to check the parts too, e.g.
# `aws s3api list-multipart-uploads`).
#
# A single-node store to run it against:
#   Garage (https://garagehq.deuxfleurs.fr; `cargo install garage` or its
#   static binary), garage.toml:
#       metadata_dir = "/tmp/garage/meta"   data_dir = "/tmp/garage/data"
#       db_engine = "sqlite"                replication_factor = 1
#       rpc_bind_addr = "127.0.0.1:3901"    rpc_secret = "<openssl rand -hex 32>"
#       [s3_api]  s3_region = "garage"  api_bind_addr = "127.0.0.1:3900"
#   then: garage -c garage.toml server &
#         garage -c garage.toml layout assign -z dc1 -c 1G $(garage -c garage.toml node id -q | cut -c1-16)
#         garage -c garage.toml layout apply --version 1
#         garage -c garage.toml bucket create vma-test
#         garage -c garage.toml key create vma-key      # prints the key id and secret
#         garage -c garage.toml bucket allow --read --write vma-test --key vma-key
#         export AWS_REGION=garage
#   MinIO: minio server /tmp/minio --address 127.0.0.1:9000 &
#          (keys minioadmin/minioadmin), mc alias set l http://127.0.0.1:9000
#          minioadmin minioadmin && mc mb l/vma-test
#   s3s-fs (what the tests use): cargo install s3s-fs --features binary;
#          mkdir -p /tmp/s3/vma-test && s3s-fs --host 127.0.0.1 --port 8014 \
#          --access-key K --secret-key S /tmp/s3
set -euo pipefail

endpoint=${1:?usage: s3-roundtrip.sh ENDPOINT BUCKET [PREFIX]}
bucket=${2:?usage: s3-roundtrip.sh ENDPOINT BUCKET [PREFIX]}
prefix=${3:-roundtrip-$(date +%s)/}
: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY}"
export AWS_REGION=${AWS_REGION:-us-east-1}

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${VMA_WRITER:-$(command -v vma-writer || echo "$here/target/release/vma-writer")}
[ -x "$bin" ] || { echo "no vma-writer at $bin (cargo build --release)" >&2; exit 1; }
vma() { "$bin" --s3-endpoint "$endpoint" "$@"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
url="s3://$bucket/$prefix"
step() { printf '%-60s' "$*"; }
ok() { echo ok; }

step "making 4 drive images (8, 1, 8, 4 MiB)"
drives=()
for spec in big1:8 small:1 big2:8 mixed:4; do
    name=${spec%%:*} mib=${spec##*:}
    head -c $((mib << 19)) /dev/urandom > "$work/$name.img"
    truncate -s $((mib << 20)) "$work/$name.img"   # second half zeros
    drives+=(-d "$name=$work/$name.img")
done
printf 'memory: 512\nname: roundtrip\n' > "$work/qemu-server.conf"
ok

for name in a.vma a.vma.zst; do
    common=(--uuid 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 --ctime 1700000000
            -c "$work/qemu-server.conf" "${drives[@]}")
    step "create $name locally and into $url$name"
    vma create "$work/$name" "${common[@]}"
    vma create "$url$name" "${common[@]}" --s3-part-size 5M
    ok
    step "list and config: the same as the local archive's"
    diff <(vma list "$url$name") <(vma list "$work/$name")
    diff <(vma config "$url$name") "$work/qemu-server.conf"
    ok
    step "verify"
    vma verify "$url$name" >/dev/null 2>&1
    ok
    step "extract: every drive as from the local archive"
    vma extract "$url$name" "$work/x-$name" >/dev/null
    vma extract "$work/$name" "$work/l-$name" >/dev/null
    for d in big1 small big2 mixed; do
        cmp "$work/x-$name/disk-$d.raw" "$work/l-$name/disk-$d.raw"
    done
    ok
    step "extract -d small"
    vma extract -d small "$url$name" "$work/s-$name" >/dev/null
    cmp "$work/s-$name/disk-small.raw" "$work/l-$name/disk-small.raw"
    ok
    step "convert back to a local file: the same archive"
    vma convert "$url$name" "$work/back-$name"
    cmp "$work/back-$name" "$work/$name"
    ok
    step "an existing key is refused"
    if vma create "$url$name" "${common[@]}" 2>"$work/err"; then
        echo "FAILED: overwrote $url$name" >&2; exit 1
    fi
    grep -q "already exists" "$work/err"
    ok
done

step "SIGTERM mid-upload: no object, the upload aborted"
head -c $((512 << 20)) /dev/urandom > "$work/big.img"
"$bin" --s3-endpoint "$endpoint" create "${url}stopped.vma" -d "big=$work/big.img" \
    --s3-part-size 5M 2>"$work/err" &
pid=$!
sleep 1
kill -TERM "$pid" 2>/dev/null || true
rc=0; wait "$pid" || rc=$?
if [ "$rc" = 0 ]; then
    echo "the upload finished before the signal (a fast store): rerun to check this step"
else
    [ "$rc" = 143 ] || { echo "FAILED: exit $rc" >&2; cat "$work/err" >&2; exit 1; }
    grep -q "aborted the upload" "$work/err" || { cat "$work/err" >&2; exit 1; }
    if vma list "${url}stopped.vma" 2>"$work/err2"; then
        echo "FAILED: ${url}stopped.vma exists" >&2; exit 1
    fi
    grep -q "no such object" "$work/err2" || { cat "$work/err2" >&2; exit 1; }
    ok
fi
echo "all good; the objects are under $url"
