//! `vma-writer export` read by real clients: every drive of archives with
//! 1, 2 and 8 devices through nbdcopy and qemu-img convert in each archive
//! form; qemu-img map's zero regions; writes and trims refused, simple and
//! structured replies, CACHE (libnbd); a corrupt payload failing only the
//! reads that touch it; many clients at once with the server's memory
//! bounded.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vma_writer::archive::RandomArchive;
use vma_writer::vma::DevId;

use super::{EIGHT, ONE, TWO, archives};
use crate::support::{self, *};

/// How long an export may take to stop after a signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Stops an export with SIGTERM; it must exit 0 and say `stopped`.
async fn stop(p: Proc) -> Ended {
    p.signal(libc::SIGTERM);
    let ended = p.wait(STOP_TIMEOUT).await;
    ended.assert_success();
    assert!(
        ended.events.iter().any(|e| e["event"] == "stopped"),
        "no stopped event: {:?}",
        ended.events
    );
    ended
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_qemu_img_read_every_drive_as_extract_writes_it() {
    if !require_tools(&["nbdcopy", "nbdinfo", "qemu-img"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (tag, drives) in [("one", ONE), ("two", TWO), ("eight", EIGHT)] {
        let a = archives(dir, tag, drives);
        for (form, path) in a.forms() {
            let sock = dir.join(format!("{tag}-{form}.sock"));
            let (p, at) = ExportCmd::unix(path, &sock).start().await;
            assert_eq!(at.exports(), a.drives, "{tag} {form}");
            assert_eq!(at.event["digests"], form != "plain", "{tag} {form}");
            let list = run_ok(
                Command::new("nbdinfo")
                    .arg("--list")
                    .arg(nbd_uri(&sock, "")),
            );
            let list = stdout_text(&list);
            for (name, size) in &a.drives {
                let entry = &list[list.find(&format!("export=\"{name}\"")).unwrap()..];
                for needle in [
                    format!("export-size: {size}"),
                    format!(
                        "description: archive {}, created 2023-11-14 22:13:20 UTC",
                        path.file_name().unwrap().to_string_lossy()
                    ),
                    "is_read_only: true".into(),
                    "can_multi_conn: true".into(),
                ] {
                    assert!(
                        entry.contains(&needle),
                        "{tag} {form}: no {needle:?} in\n{list}"
                    );
                }
            }
            for (name, _) in &a.drives {
                let uri = at.uri(name);
                let copy = dir.join(format!("{tag}-{form}-{name}.nbdcopy"));
                run_ok(Command::new("nbdcopy").arg(&uri).arg(&copy));
                assert_same_file(&copy, &a.expected(name));
                let conv = dir.join(format!("{tag}-{form}-{name}.convert"));
                run_ok(
                    Command::new("qemu-img")
                        .args(["convert", "-f", "raw", "-O", "raw"])
                        .arg(&uri)
                        .arg(&conv),
                );
                assert_same_file(&conv, &a.expected(name));
            }
            stop(p).await;
            assert!(!sock.exists(), "{} left behind", sock.display());
        }
    }
}

/// `(start, length, zero)` of `qemu-img map --output=json` over `uri`.
fn zero_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(uri),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let (zero, data) = (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap());
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                zero && !data,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_reports_the_zero_regions() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "map", TWO);
    for (form, path) in a.forms() {
        let (p, at) = ExportCmd::unix(path, &dir.join(format!("{form}.sock")))
            .start()
            .await;
        for (name, size) in &a.drives {
            let data = std::fs::read(a.expected(name)).unwrap();
            let map = zero_map(&at.uri(name));
            assert_eq!(
                map.iter().map(|m| m.1).sum::<u64>(),
                *size,
                "{form} {name}: {map:?}"
            );
            let mut zero_blocks = 0;
            for (start, len, zero) in map {
                // Zero regions are whole 4 KiB blocks (but the drive's last).
                for b in (start / BLOCK as u64)..(start + len).div_ceil(BLOCK as u64) {
                    let is_zero = block_is_zero(&data, b as usize);
                    assert_eq!(
                        zero, is_zero,
                        "{form} {name}: block {b} (map says zero: {zero})"
                    );
                    zero_blocks += usize::from(zero);
                }
            }
            assert!(zero_blocks > 0, "{form} {name}: no zero region reported");
        }
        stop(p).await;
    }
}

/// libnbd, strict mode off: writes, write-zeroes and trims get EPERM and
/// change nothing; reads work with structured and simple replies; CACHE
/// of the whole drive is accepted.
const REFUSALS: &str = r#"
import errno, nbd, sys
uri, expected = sys.argv[1], open(sys.argv[2], "rb").read()

def errno_of(e):
    # python3-libnbd 1.14 gives the errno as a name ("EPERM").
    return e.errno if isinstance(e.errno, int) else getattr(errno, e.errno)

for structured in (True, False):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    assert h.is_read_only() and h.can_multi_conn() and h.can_cache()
    assert not h.can_trim() and not h.can_zero()
    for what, fn in [
        ("write", lambda: h.pwrite(b"x" * 4096, 0)),
        ("zero", lambda: h.zero(65536, 0)),
        ("trim", lambda: h.trim(65536, 0)),
    ]:
        try:
            fn()
        except nbd.Error as e:
            assert errno_of(e) == errno.EPERM, f"{what}: {e.errno} {e.string}"
        else:
            raise AssertionError(f"{what} succeeded")
    h.cache(len(expected), 0)
    assert h.pread(len(expected), 0) == expected
    assert h.pread(5000, 70000) == expected[70000:75000]
    h.shutdown()
print("refusals ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_trims_are_refused() {
    if !require_tools(&["qemu-io"]) || !require_python_nbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "ro", ONE);
    let script = dir.join("refusals.py");
    std::fs::write(&script, REFUSALS).unwrap();
    let (name, _) = &a.drives[0];
    for (form, path) in a.forms() {
        let (p, at) = ExportCmd::unix(path, &dir.join(format!("{form}.sock")))
            .start()
            .await;
        let out = run_ok(
            Command::new(SYSTEM_PYTHON)
                .arg(&script)
                .arg(at.uri(name))
                .arg(a.expected(name)),
        );
        assert!(stdout_text(&out).contains("refusals ok"), "{form}");
        // QEMU will not even open it for writing.
        let text = qemu_io_text(&at.uri(name), &["write -P 0x55 0 64k"]);
        assert!(text.contains("Permission denied"), "{form}: {text}");
        stop(p).await;
    }
}

/// Reads of each cluster around a corrupt one: EIO only where the
/// corruption is, the right bytes elsewhere, on the same connection.
const AROUND: &str = r#"
import errno, nbd, sys
uri, expected = sys.argv[1], open(sys.argv[2], "rb").read()
bad = [int(c) for c in sys.argv[3].split(",")]
C = 65536
h = nbd.NBD()
h.connect_uri(uri)
for c in range(len(expected) // C):
    try:
        got = h.pread(C, c * C)
    except nbd.Error as e:
        assert c in bad, f"cluster {c}: {e.string}"
        assert e.errno in (errno.EIO, "EIO"), f"cluster {c}: {e.errno}"
    else:
        assert c not in bad, f"cluster {c} of a corrupt extent was read"
        assert got == expected[c * C:(c + 1) * C], f"cluster {c} differs"
# A read across the damage fails as a whole.
try:
    h.pread(3 * C, (bad[0] - 1) * C if bad[0] else 0)
except nbd.Error:
    pass
else:
    raise AssertionError("a read across the corrupt cluster succeeded")
# The connection still serves.
good = next(c for c in range(len(expected) // C) if c not in bad)
assert h.pread(4096, good * C) == expected[good * C:good * C + 4096]
print("around ok")
"#;

/// Flips a byte of cluster `cluster`'s payload (plain) or of the frame
/// holding it (zst); returns the clusters whose reads must fail.
fn corrupt(path: &Path, cluster: u64) -> Vec<u64> {
    let ra = RandomArchive::open(path.to_str().unwrap()).unwrap();
    let ix = ra.index();
    let loc = ix.locate(DevId(1), cluster).unwrap();
    assert_ne!(loc.mask, 0, "cluster {cluster} holds no data");
    let (at, bad) = if path.extension().unwrap() == "zst" {
        // The frame's compressed bytes: every data cluster of its extent
        // becomes unreadable.
        let frames = match ra.file().layout() {
            vma_writer::archive::file::Layout::Seekable { frames, .. } => frames,
            _ => unreachable!(),
        };
        let (start, _, entry) = frames.frame(loc.frame as usize).unwrap();
        let bad = ix.extents[loc.extent as usize]
            .entries
            .iter()
            .filter(|e| e.dev == 1 && e.mask != 0)
            .map(|e| u64::from(e.cluster))
            .collect();
        (start + u64::from(entry.compressed) / 2, bad)
    } else {
        (loc.stream_offset + 100, vec![cluster])
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_payload_fails_only_the_reads_that_touch_it() {
    if !require_python_nbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "bad", ONE);
    let script = dir.join("around.py");
    std::fs::write(&script, AROUND).unwrap();
    let (name, _) = &a.drives[0];
    // Cluster 6 holds data in holey_data (every fourth cluster is zero).
    let cluster = 6;
    for path in [&a.indexed, &a.zst] {
        let bad = corrupt(path, cluster);
        let (p, at) = ExportCmd::unix(path, &dir.join("bad.sock")).start().await;
        let list: Vec<String> = bad.iter().map(u64::to_string).collect();
        let out = run_ok(
            Command::new(SYSTEM_PYTHON)
                .arg(&script)
                .arg(at.uri(name))
                .arg(a.expected(name))
                .arg(list.join(",")),
        );
        assert!(
            stdout_text(&out).contains("around ok"),
            "{}",
            path.display()
        );
        let ended = stop(p).await;
        // The log names the drive and what is broken.
        let needle = if path == &a.indexed {
            format!("device 1 ('{name}') cluster {cluster}: the data does not match its digest")
        } else {
            "zstd frame".to_string()
        };
        assert!(
            ended.stderr.contains("READ answered EIO") && ended.stderr.contains(&needle),
            "{}: {}",
            path.display(),
            ended.stderr
        );
        let stopped = ended
            .events
            .iter()
            .find(|e| e["event"] == "stopped")
            .unwrap();
        assert!(stopped["drives"][0]["read_errors"].as_u64().unwrap() >= bad.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once_with_bounded_memory() {
    if !require_tools(&["nbdcopy", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Larger than everything the export may hold: random data does not
    // compress, so each frame is a full 3.7 MiB extent.
    let size = 256 * MIB;
    let img = dense_random(&dir.join("big.img"), size, 42);
    let archive = dir.join("big.vma.zst");
    run_ok(
        vma(["create".as_ref(), archive.as_os_str(), "-d".as_ref()])
            .arg(format!("drive-scsi0={}", img.display())),
    );
    let cache = 8 * MIB;
    let (p, at) = ExportCmd::unix(&archive, &dir.join("big.sock"))
        .args(["--cache-size", "8M"])
        .start()
        .await;
    let uri = at.uri("drive-scsi0");
    let copy = dir.join("copy.raw");
    let mut nbdcopy = Command::new("nbdcopy");
    nbdcopy
        .args(["--connections=4", "--threads=4"])
        .arg(&uri)
        .arg(&copy);
    let readers: Vec<Vec<String>> = [(0, size), (size / 2, size / 2)]
        .iter()
        .map(|&(from, len)| {
            (0..len / (16 * MIB))
                .map(|i| format!("read {} {}", from + i * 16 * MIB, 16 * MIB))
                .collect()
        })
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| run_ok(&mut nbdcopy));
        for cmds in &readers {
            let uri = &uri;
            s.spawn(move || {
                let mut io = Command::new("qemu-io");
                io.args(["-r", "-f", "raw"]).arg(uri).env("LC_ALL", "C");
                for c in cmds {
                    io.arg("-c").arg(c);
                }
                let out = stdout_text(&run_ok(&mut io));
                assert_eq!(
                    out.matches("read 16777216/16777216 bytes").count(),
                    cmds.len(),
                    "{out}"
                );
            });
        }
    });
    assert_same_file(&copy, &img);
    let peak = peak_rss(p.pid());
    // The frame cache, READ data in flight (64 MiB over all connections),
    // frames being decompressed (one per worker, at most 16) and the
    // program itself.
    let bound = cache + 64 * MIB + 16 * 4 * MIB + 48 * MIB;
    assert!(bound < size, "the test proves nothing");
    assert!(
        peak < bound,
        "peak RSS {} MiB, bound {} MiB",
        peak >> 20,
        bound >> 20
    );
    eprintln!(
        "export peak RSS: {} MiB for a {} MiB drive",
        peak >> 20,
        size >> 20
    );
    stop(p).await;
}
