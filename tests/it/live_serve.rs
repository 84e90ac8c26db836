//! Restore verification of `vma-writer serve` with real NBD clients, all
//! writing at once to several drives on one listener: qemu-img convert,
//! nbdcopy (multi-conn) and qemu-io with unaligned, overlapping, zeroing
//! and trimming writes made before their clusters are complete. The
//! archive must restore to exactly the bytes the clients wrote.

use std::process::Command;
use std::time::Duration;

use crate::support::{self, *};

const MIB: u64 = 1 << 20;

/// A drive for qemu-io: 1 MiB + 1536 B (ends inside a cluster).
const IO_SIZE: u64 = MIB + 1536;

/// One step of the qemu-io client: its command, and what it does to the
/// expected image.
enum Step {
    Write(u8, u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
}

/// Unaligned and overlapping writes before their clusters are complete,
/// zeroes and a trim overwritten in part, then the gaps filled.
/// Clusters are 64 KiB: 65536, 131072, 196608, 262144, ...
fn io_steps() -> Vec<Step> {
    use Step::*;
    vec![
        Write(0x11, 1000, 5000),
        // Overlaps the previous write and crosses into cluster 1.
        Write(0x22, 3000, 70_000),
        // WRITE_ZEROES: completes cluster 4 (as zeros); clusters 3 and 7
        // stay partial.
        Zero(200_000, 300_000),
        // Data over buffered zeros of partial cluster 3.
        Write(0x33, 250_000, 10_000),
        // TRIM of part of clusters 9 and 10, then data over part of it.
        Discard(600_000, 65_536),
        Write(0x34, 640_000, 100),
        // Fill the rest.
        Write(0x44, 0, 1000),
        Write(0x55, 73_000, 127_000),
        Write(0x66, 500_000, 100_000),
        Write(0x77, 665_536, IO_SIZE - 665_536),
    ]
}

fn io_commands(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match *s {
            Step::Write(p, off, len) => format!("write -P {p:#x} {off} {len}"),
            Step::Zero(off, len) => format!("write -z {off} {len}"),
            Step::Discard(off, len) => format!("discard {off} {len}"),
        })
        .collect()
}

fn io_expected(steps: &[Step], size: u64) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    for s in steps {
        let (v, off, len) = match *s {
            Step::Write(p, off, len) => (p, off, len),
            Step::Zero(off, len) | Step::Discard(off, len) => (0, off, len),
        };
        img[off as usize..(off + len) as usize].fill(v);
    }
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_three_clients_on_one_listener() {
    if !require_tools(&["qemu-img", "qemu-io", "nbdcopy"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a_size = 8 * MIB + 512;
    let b_size = 24 * MIB;
    let src_a = raw_islands(&dir.join("a.raw"), a_size, 11, 8, MIB);
    let src_b = raw_islands(&dir.join("b.raw"), b_size, 12, 12, 2 * MIB);
    let steps = io_steps();
    let expected_c = dir.join("c.expected.raw");
    std::fs::write(&expected_c, io_expected(&steps, IO_SIZE)).unwrap();

    let archive = dir.join("serve.vma");
    let mut cmd = ServeCmd::unix(
        dir,
        &[
            ("drive-a", a_size),
            ("drive-b", b_size),
            ("drive-c", IO_SIZE),
        ],
        &archive,
    )
    .json();
    // Connection logs, to count nbdcopy's connections.
    cmd.command()
        .env("RUST_LOG", "vma_writer::assembler=info")
        .env("NO_COLOR", "1");
    let (serve, at) = cmd.start().await;
    assert_eq!(
        at.event.as_ref().unwrap()["exports"],
        serde_json::json!(["drive-a", "drive-b", "drive-c"])
    );

    let mut convert = Command::new("qemu-img");
    convert
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src_a)
        .arg(at.uri("drive-a"));
    let mut copy = Command::new("nbdcopy");
    copy.args(["-C", "4", "-T", "4", "--request-size=262144"])
        .arg(&src_b)
        .arg(at.uri("drive-b"));
    let c_uri = at.uri("drive-c");
    let c_cmds = io_commands(&steps);
    // All three clients at once.
    std::thread::scope(|s| {
        s.spawn(|| run_ok(&mut convert));
        s.spawn(|| run_ok(&mut copy));
        s.spawn(|| qemu_io(&c_uri, "raw", &c_cmds));
    });

    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let fin = ended.finished_event();
    assert_eq!(fin["bytes"], a_size + b_size + IO_SIZE);
    let conns = |drive: &str| {
        ended
            .stderr
            .lines()
            .filter(|l| l.contains("client connected") && l.ends_with(&format!("drive={drive}")))
            .count()
    };
    assert_eq!(conns("drive-a"), 1, "{}", ended.stderr);
    assert!(
        conns("drive-b") >= 2,
        "nbdcopy used one connection: {}",
        ended.stderr
    );
    assert_eq!(conns("drive-c"), 1, "{}", ended.stderr);
    check_archive(
        &archive,
        &[
            ("drive-a", a_size, &src_a),
            ("drive-b", b_size, &src_b),
            ("drive-c", IO_SIZE, &expected_c),
        ],
        dir,
    );
}

/// TCP listener, zstd output, and a client that flushes and stays
/// connected: serve must finalise on the flush, not wait for the
/// disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tcp_zstd_finalises_after_flush() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 3 * MIB + 4096;
    let archive = dir.join("tcp.vma.zst");
    let (serve, at) = ServeCmd::tcp(&[("drive-scsi0", size)], &archive)
        .args(["--zstd"])
        .start()
        .await;
    let listening = at.event.as_ref().unwrap();
    assert!(
        !listening["address"].as_str().unwrap().ends_with(":0"),
        "no real port in {listening}"
    );

    // qemu-io writes everything, flushes, then sleeps while connected.
    let mut io = tokio::process::Command::new("qemu-io");
    io.args(["-f", "raw"])
        .arg(at.uri("drive-scsi0"))
        .args(["-c", &format!("write -P 0x5a 0 {}", size - 4096)])
        .args(["-c", &format!("write -P 0xa5 {} 4096", size - 4096)])
        .args(["-c", "flush", "-c", "sleep 20000"])
        .stdout(std::process::Stdio::null());
    let client = Proc::spawn(io, false);
    let ended = serve.wait(Duration::from_secs(15)).await;
    drop(client);
    ended.assert_success();

    let mut expected = vec![0x5au8; size as usize];
    expected[(size - 4096) as usize..].fill(0xa5);
    let expected_path = dir.join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    check_archive(&archive, &[("drive-scsi0", size, &expected_path)], dir);
}

/// A client that writes part of a drive, disconnects, and a new client
/// that connects within the reconnect timeout: the backup goes on. The
/// new client replays an archived cluster with identical content
/// (accepted), writes the rest, and the archive is complete. A second run
/// whose new client tries to change an archived cluster gets EIO, and the
/// backup fails: the archive cannot hold both contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_client_reconnects_and_replays() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 2 * MIB;
    let archive = dir.join("reconnect.vma");
    let (mut serve, at) = ServeCmd::unix(dir, &[("drive-scsi0", size)], &archive)
        .json()
        .args(["--reconnect-timeout", "10"])
        .start()
        .await;
    let uri = at.uri("drive-scsi0");
    // First client: the first MiB, then it leaves.
    qemu_io(&uri, "raw", &[format!("write -P 0x71 0 {MIB}")]);
    serve
        .next_event(Duration::from_secs(10), |e| {
            e["event"] == "progress" && e["drives"][0]["connections"] == 0
        })
        .await;
    assert!(!serve.has_exited(), "serve gave up at once");
    // Second client: an identical replay of cluster 0 is accepted, and
    // the rest completes the drive.
    qemu_io(&uri, "raw", &["write -P 0x71 0 64k".to_string()]);
    qemu_io(&uri, "raw", &[format!("write -P 0x72 {MIB} {MIB}")]);
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let mut expected = vec![0x71u8; size as usize];
    expected[MIB as usize..].fill(0x72);
    let dir2 = extract(&archive, dir);
    assert_file_is(&restored(&dir2, "drive-scsi0"), &expected);

    let archive = dir.join("conflict.vma");
    let (serve, at) = ServeCmd::unix(dir, &[("drive-scsi0", size)], &archive)
        .args(["--reconnect-timeout", "10"])
        .start()
        .await;
    let uri = at.uri("drive-scsi0");
    qemu_io(&uri, "raw", &[format!("write -P 0x71 0 {MIB}")]);
    let text = qemu_io_text(&uri, &["write -P 0x99 0 64k"]);
    assert!(
        text.contains("Input/output error"),
        "rewrite with other content was not refused: {text}"
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&[
        "drive drive-scsi0: cluster 0 was written again with different content",
    ]);
    assert!(!archive.exists());
}

/// `--json` with the archive on stdout (`-o -`): stdout carries the
/// archive and nothing else, the JSON status lines go to stderr (every
/// stderr line is one JSON event: listening, progress, finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_json_with_archive_on_stdout() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let stream = dir.join("stream.vma");
    // Without --json as far as ServeCmd is concerned: the events are not
    // on stdout, so it waits for the socket.
    let mut cmd = ServeCmd::unix(dir, &[("drive-scsi0", MIB)], "-").args(["--json"]);
    cmd.command()
        .stdout(std::fs::File::create(&stream).unwrap());
    let (serve, at) = cmd.start().await;
    qemu_io(
        &at.uri("drive-scsi0"),
        "raw",
        &[format!("write -P 0x42 0 {MIB}")],
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    // stdout: exactly the archive.
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, vec![0x42u8; MIB as usize]).unwrap();
    check_archive(&stream, &[("drive-scsi0", MIB, &expected)], dir);
    let a = std::fs::read(&stream).unwrap();
    assert_eq!(&a[..4], b"VMA\0");
    // Ends exactly at an extent boundary: no stray bytes after it.
    extent_offsets(&a);
    // stderr: JSON lines only, from listening to finished.
    let events: Vec<serde_json::Value> = ended
        .stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("stderr line {l:?} is not JSON ({e}):\n{}", ended.stderr)
            })
        })
        .collect();
    assert_eq!(
        events.first().unwrap()["event"],
        "listening",
        "{}",
        ended.stderr
    );
    let last = events.last().unwrap();
    assert_eq!(last["event"], "finished", "{}", ended.stderr);
    assert_eq!(last["archive"], serde_json::Value::Null, "{last}");
    assert_eq!(
        last["archive_bytes"].as_u64(),
        Some(a.len() as u64),
        "{last}"
    );
}

/// The `finished` event's `archive_bytes` is the size of the archive
/// written (uncompressed, so the file size), also when the client does
/// not flush (nbdcopy without --flush) and the final extent still holds
/// clusters at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_event_archive_bytes_is_file_size() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = raw_islands(&dir.join("src.raw"), MIB, 7, 4, 300_000);
    let archive = dir.join("size.vma");
    let (serve, at) = ServeCmd::unix(dir, &[("drive-scsi0", MIB)], &archive)
        .json()
        .start()
        .await;
    run_ok(Command::new("nbdcopy").arg(&src).arg(at.uri("drive-scsi0")));
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let fin = ended.finished_event();
    check_archive(&archive, &[("drive-scsi0", MIB, &src)], dir);
    assert_eq!(
        fin["archive_bytes"].as_u64(),
        Some(std::fs::metadata(&archive).unwrap().len()),
        "{fin}"
    );
}

/// READ during a backup: archived clusters read back from the archive
/// file, buffered partial clusters from memory, unwritten ranges as
/// zeros (qemu-io `read -P` checks each); with `--zstd` an archived
/// cluster cannot be read back and the READ gets EIO. Both archives
/// restore to what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_back_during_backup() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let size: u64 = 256 * 1024;
    let mut expected = vec![0x33u8; size as usize];
    expected[..65536].fill(0x11);
    expected[70_000..71_000].fill(0x22);
    let expected_path = tmp.path().join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    for zstd in [false, true] {
        let dir = tmp.path().join(if zstd { "zstd" } else { "plain" });
        std::fs::create_dir(&dir).unwrap();
        let archive = dir.join(if zstd { "read.vma.zst" } else { "read.vma" });
        let mut cmd = ServeCmd::unix(&dir, &[("drive-scsi0", size)], &archive);
        if zstd {
            cmd = cmd.args(["--zstd"]);
        }
        let (serve, at) = cmd.start().await;
        let uri = at.uri("drive-scsi0");
        qemu_io(
            &uri,
            "raw",
            &[
                "write -P 0x11 0 64k".into(),
                "write -P 0x22 70000 1000".into(),
                // Buffered data, and zeros around it in the same cluster.
                "read -P 0x22 70000 1000".into(),
                "read -P 0 65536 4464".into(),
                // Never written.
                "read -P 0 200000 1000".into(),
            ],
        );
        // An archived cluster, straddling into the buffered one.
        let text = qemu_io_text(&uri, &["read -P 0x11 60000 5536"]);
        if zstd {
            assert!(text.contains("Input/output error"), "{text}");
        } else {
            assert!(
                text.contains("read 5536/5536") && !text.contains("failed"),
                "{text}"
            );
        }
        qemu_io(
            &uri,
            "raw",
            &[
                "write -P 0x33 65536 4464".into(),
                format!("write -P 0x33 71000 {}", size - 71_000),
            ],
        );
        let ended = serve.wait(RUN_TIMEOUT).await;
        ended.assert_success();
        check_archive(&archive, &[("drive-scsi0", size, &expected_path)], &dir);
    }
}

/// A client of `serve` that writes clusters through python3-libnbd and
/// prints the size of `ARCHIVE.partial` after each step.
const FLUSH_PROBE: &str = r#"
import os, sys
import nbd

uri, partial = sys.argv[1], sys.argv[2]
cluster = 65536
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
sizes = []
# 10 whole clusters: fewer than an extent holds, so they stay pending.
h.pwrite(b"\x5a" * (10 * cluster), 0)
sizes.append(os.path.getsize(partial))
h.flush()
sizes.append(os.path.getsize(partial))
# The rest of the drive, then a second flush.
h.pwrite(b"\xa5" * (size - 10 * cluster), 10 * cluster)
sizes.append(os.path.getsize(partial))
h.flush()
h.shutdown()
print(" ".join(map(str, sizes)))
"#;

/// NBD FLUSH makes `serve` write out its pending extent: a client writes
/// 10 clusters (an extent holds 58), and `ARCHIVE.partial` does not grow
/// until the client flushes; then it grows by exactly one extent of those
/// 10 clusters. The rest of the drive and a second flush give the second
/// extent, and the archive restores to what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_flush_writes_out_the_pending_extent() {
    if !require_python_nbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 2 * MIB; // 32 clusters: one extent would hold all of them
    let archive = dir.join("flush.vma");
    let partial = vma_writer::sink::partial_path(&archive);
    let (serve, at) = ServeCmd::unix(dir, &[("drive-scsi0", size)], &archive)
        .start()
        .await;
    let script = dir.join("flush.py");
    std::fs::write(&script, FLUSH_PROBE).unwrap();
    let out = run_ok(
        Command::new(SYSTEM_PYTHON)
            .arg(&script)
            .arg(at.uri("drive-scsi0"))
            .arg(&partial),
    );
    let sizes: Vec<u64> = stdout_text(&out)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let extent = |clusters: u64| (EXTENT_HEADER as u64) + clusters * CLUSTER as u64;
    let [written, flushed, rest_written] = sizes[..] else {
        panic!("probe printed {sizes:?}");
    };
    assert_eq!(
        flushed,
        written + extent(10),
        "the flush did not write out the pending extent of 10 clusters: {sizes:?}"
    );
    assert_eq!(
        rest_written, flushed,
        "the 22 other clusters were written out before the flush: {sizes:?}"
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let a = std::fs::read(&archive).unwrap();
    assert_eq!(a.len() as u64, flushed + extent(22));
    assert_eq!(extent_offsets(&a).len(), 2);
    let mut expected = vec![0x5au8; size as usize];
    expected[10 * CLUSTER..].fill(0xa5);
    let expected_path = dir.join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    check_archive(&archive, &[("drive-scsi0", size, &expected_path)], dir);
}

/// `serve --zstd` writes the same VMA as `serve` without it (issue 8): two
/// runs with the same `--uuid` and `--ctime`, fed by the same one-request-
/// at-a-time client (`qemu-img convert -m 1`, so the clusters arrive in the
/// same order), give a plain archive and a seekable `.vma.zst` whose
/// `zstd -dc` is that archive byte for byte; both restore to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_zstd_is_the_plain_archive_under_zstd() {
    if !require_tools(&["qemu-img", "zstd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 6 * MIB + 1536;
    let src = raw_islands(&dir.join("src.raw"), size, 21, 6, MIB);
    let same = [
        "--uuid",
        "6c0a9e4e-7f52-4c39-9d1e-2b1b8a3c4d5e",
        "--ctime",
        "1767225600",
    ];
    let mut archives = Vec::new();
    for (name, extra) in [("plain.vma", None), ("packed.vma.zst", Some("--zstd"))] {
        let sub = dir.join(name.replace('.', "-"));
        std::fs::create_dir(&sub).unwrap();
        let archive = dir.join(name);
        let (serve, at) = ServeCmd::unix(&sub, &[("drive-scsi0", size)], &archive)
            .args(same)
            .args(extra)
            .start()
            .await;
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-m", "1", "-n", "-f", "raw", "-O", "raw"])
                .arg(&src)
                .arg(at.uri("drive-scsi0")),
        );
        serve.wait(RUN_TIMEOUT).await.assert_success();
        check_archive(&archive, &[("drive-scsi0", size, &src)], dir);
        archives.push(archive);
    }
    let unpacked = run_ok(Command::new("zstd").arg("-dc").arg(&archives[1])).stdout;
    assert!(
        unpacked == std::fs::read(&archives[0]).unwrap(),
        "zstd -dc of the .vma.zst differs from the plain archive"
    );
}
