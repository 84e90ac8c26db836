//! The NBD server against libnbd's clients: nbdcopy (both directions,
//! multi-conn), nbdinfo (--list, --map) and a python3-libnbd script that
//! sends bad requests with strict mode off.

use std::process::Command;
use std::sync::atomic::Ordering;

use crate::support::*;
use vma_writer::nbd::{Backend, MemoryBackend};

const MIB: u64 = 1 << 20;

#[test]
fn nbdcopy_both_directions_with_multi_conn() {
    if !require_tools(&["nbdcopy", "nbdinfo"]) {
        return;
    }
    let size = 48 * MIB + 4096;
    let srv = TestServer::start(vec![("disk", Counting::new(MemoryBackend::new(size)))]);
    let src = srv.dir.path().join("src.raw");
    let want = sparse_image_contents(
        &src,
        size,
        &[(0, 5 * MIB), (9 * MIB + 17, 20 * MIB), (size - 4096, 4096)],
        1,
    );
    let uri = srv.uri("disk");
    // Multi-conn is advertised (the memory backend's flush is global).
    let st = Command::new("nbdinfo")
        .args(["--can", "multi-conn"])
        .arg(&uri)
        .status()
        .unwrap();
    assert!(st.success(), "CAN_MULTI_CONN not advertised");
    let b = &srv.backends[0];
    b.wait_disconnects(1);

    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src)
            .arg(&uri),
    );
    b.wait_disconnects(b.connects.load(Ordering::SeqCst));
    let used = b.connects.load(Ordering::SeqCst) - 1;
    assert!(
        used >= 2,
        "nbdcopy used {used} connection(s), expected multi-conn"
    );
    assert_same(&b.inner.contents(), &want, "nbdcopy file -> nbd");

    let back = srv.dir.path().join("back.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(&uri)
            .arg(&back),
    );
    assert_same(&std::fs::read(&back).unwrap(), &want, "nbdcopy nbd -> file");

    // Single connection, to stdout.
    let out = run_ok(
        Command::new("nbdcopy")
            .args(["--connections=1", "--no-extents"])
            .arg(&uri)
            .arg("-"),
    );
    assert_same(&out.stdout, &want, "nbdcopy nbd -> stdout");
    srv.stop();
}

#[test]
fn nbdinfo_list_and_map() {
    if !require_tools(&["nbdinfo"]) {
        return;
    }
    let srv = TestServer::start(vec![
        ("alpha", MemoryBackend::new(4 * MIB)),
        (
            "beta",
            MemoryBackend::read_only_from(&vec![7u8; 65536 + 512]),
        ),
    ]);
    let out = run_ok(Command::new("nbdinfo").arg("--list").arg(srv.uri("")));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "export=\"alpha\"",
        "export=\"beta\"",
        "description: test export alpha",
        "export-size: 4194304",
        "export-size: 66048",
        "base:allocation",
        "block_size_maximum: 33554432",
        "can_multi_conn: true",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let beta = &text[text.find("export=\"beta\"").unwrap()..];
    assert!(beta.contains("is_read_only: true"), "{beta}");

    let a = &srv.backends[0];
    srv.rt.block_on(async {
        a.write(MIB, vec![1u8; 3 * 65536].into()).await.unwrap();
        a.write_zeroes(2 * MIB, 65536, false).await.unwrap();
    });
    let out = run_ok(
        Command::new("nbdinfo")
            .args(["--map", "--json"])
            .arg(srv.uri("alpha")),
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, MIB, 3),
            (MIB, 3 * 65536, 0),
            (MIB + 3 * 65536, MIB - 3 * 65536, 3),
            (2 * MIB, 65536, 2),
            (2 * MIB + 65536, 2 * MIB - 65536, 3),
        ]
    );
    // Read back through a client too.
    let out = run_ok(Command::new("nbdcopy").arg(srv.uri("beta")).arg("-"));
    assert_eq!(out.stdout, vec![7u8; 65536 + 512]);
    srv.stop();
}

/// Each probe checks the errno the server sent and that the connection
/// still reads and writes correctly afterwards.
const PROBE: &str = r#"
import errno, sys
import nbd

uri_rw, uri_ro = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(uri_rw)
size = h.get_size()
n = 0

def errno_of(e):
    # python3-libnbd 1.14 gives the errno as a name ("ENOSPC").
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)

def still_works():
    global n
    n += 1
    data = bytes([n % 256]) * 4096
    h.pwrite(data, 8192)
    assert h.pread(4096, 8192) == data, "read back after an error"

def expect(code, what, fn):
    try:
        fn()
    except nbd.Error as e:
        assert "command failed" in e.string, f"{what}: not a server error: {e.string}"
        assert errno_of(e) == code, f"{what}: errno {e.errno} ({e.string}), want {code}"
    else:
        if code is not None:
            raise AssertionError(f"{what}: succeeded, want errno {code}")
    still_works()

E = errno
expect(E.ENOSPC, "write crossing the end", lambda: h.pwrite(b"x" * 4096, size - 1024))
expect(E.ENOSPC, "write at the end", lambda: h.pwrite(b"x", size))
expect(E.ENOSPC, "zero crossing the end", lambda: h.zero(4096, size - 100))
expect(E.EINVAL, "read crossing the end", lambda: h.pread(4096, size - 1024))
expect(E.EINVAL, "read offset overflow", lambda: h.pread(4096, 2**64 - 100))
expect(E.EINVAL, "trim crossing the end", lambda: h.trim(4096, size))
expect(E.EINVAL, "cache crossing the end", lambda: h.cache(4096, size))
expect(E.EINVAL, "block status crossing the end", lambda: h.block_status(4096, size, lambda *a: 0))
expect(E.EINVAL, "read over the payload limit", lambda: h.pread(33 << 20, 0))
expect(E.EINVAL, "write over the payload limit (drained)", lambda: h.pwrite(b"y" * (33 << 20), 0))
expect(E.EINVAL, "unknown flag on write", lambda: h.pwrite(b"x" * 512, 0, 1 << 8))
expect(E.EINVAL, "NO_HOLE on write", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE))
expect(E.EINVAL, "REQ_ONE on read", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE))
expect(E.EINVAL, "FAST_ZERO on trim", lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO))

# Zero-length requests are harmless no-ops.
expect(None, "zero-length read", lambda: h.pread(0, 0))
expect(None, "zero-length write", lambda: h.pwrite(b"", 0))
expect(None, "zero-length zero", lambda: h.zero(0, 0))
expect(None, "zero-length trim", lambda: h.trim(0, 0))

# Misaligned requests are fine: the minimum block size is 1.
h.pwrite(b"abc", 4097)
assert h.pread(5, 4096) == b"\0abc\0"
h.pwrite(b"q" * 70000, 12345, nbd.CMD_FLAG_FUA)
assert h.pread(70002, 12344) == b"\0" + b"q" * 70000 + b"\0"
h.zero(1000, 12346, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(1002, 12345) == b"q" + b"\0" * 1000 + b"q"
assert h.pread(512, 0, nbd.CMD_FLAG_DF) == b"\0" * 512
h.flush()

# 32 writes in flight, then read them all back.
cookies = [h.aio_pwrite(bytes([i]) * 16384, 65536 + i * 16384) for i in range(32)]
for c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
for i in range(32):
    assert h.pread(16384, 65536 + i * 16384) == bytes([i]) * 16384
h.shutdown()

# A read-only export refuses writes with EPERM and still serves reads.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(uri_ro)
assert r.is_read_only()
for what, fn in [
    ("write", lambda: r.pwrite(b"x", 0)),
    ("zero", lambda: r.zero(1, 0)),
    ("trim", lambda: r.trim(1, 0)),
]:
    try:
        fn()
    except nbd.Error as e:
        assert errno_of(e) == E.EPERM, f"read-only {what}: {e.errno} {e.string}"
    else:
        raise AssertionError(f"read-only {what} succeeded")
    assert r.pread(4, 0) == b"\x05" * 4
r.shutdown()
print("probe ok")
"#;

#[test]
fn libnbd_bad_requests_get_the_right_errno() {
    if !require_python_nbd() {
        return;
    }
    let srv = TestServer::start(vec![
        ("rw", Counting::new(MemoryBackend::new(MIB))),
        (
            "ro",
            Counting::new(MemoryBackend::read_only_from(&[5u8; 4096])),
        ),
    ]);
    let script = srv.dir.path().join("probe.py");
    std::fs::write(&script, PROBE).unwrap();
    let out = run_ok(
        Command::new(SYSTEM_PYTHON)
            .arg(&script)
            .arg(srv.uri("rw"))
            .arg(srv.uri("ro")),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("probe ok"));
    let rw = &srv.backends[0];
    rw.wait_disconnects(1);
    assert_eq!(rw.clean_disconnects.load(Ordering::SeqCst), 1);
    srv.stop();
}

#[test]
fn nbdinfo_lists_many_exports() {
    if !require_tools(&["nbdinfo"]) {
        return;
    }
    let names: Vec<String> = (0..20).map(|i| format!("disk{i:02}")).collect();
    let srv = TestServer::start(
        names
            .iter()
            .map(|n| (n.as_str(), MemoryBackend::new(MIB)))
            .collect(),
    );
    let out = run_ok(Command::new("nbdinfo").arg("--list").arg(srv.uri("")));
    let text = String::from_utf8_lossy(&out.stdout);
    for n in &names {
        assert!(
            text.contains(&format!("export=\"{n}\"")),
            "{n} missing:\n{text}"
        );
    }
    assert_eq!(text.matches("export-size: 1048576").count(), 20, "{text}");
    srv.stop();
}
