//! Failure paths of the live backup. In each, the exit status is non-zero
//! and no file exists at the final archive name (nor `ARCHIVE.partial`,
//! except with `--keep-partial`):
//!
//! - the client dies mid-backup (a qemu-io writer, or the whole
//!   qemu-storage-daemon), and the message names the incomplete drive;
//! - QEMU refuses the job (export size differs from the source, node in
//!   use by another job, no such node);
//! - SIGTERM / SIGINT during a throttled backup: the jobs are cancelled
//!   and the targets removed;
//! - the output cannot be written (`ulimit -f`, a pipe whose reader goes
//!   away): QEMU's job fails and nothing of ours stays in QEMU.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{self, *};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use vma_writer::qmp::{BackupJob, Error as QmpError, EventStream, JobEvent, JobOutcome, Qmp};

const MIB: u64 = 1 << 20;

/// Reconnect timeout given to `serve` in these tests.
const RECONNECT_SECS: u64 = 2;

/// How long a failing command may take to give up and clean up.
const FAIL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for the first sign of progress.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts `serve --json` for `drives` (name, size) on a Unix socket in
/// `dir`, writing `archive`; waits for it to listen. Returns it and the
/// socket.
async fn start_serve(
    dir: &Path,
    drives: &[(&str, u64)],
    archive: &str,
    extra: &[&str],
) -> (Proc, PathBuf) {
    let (p, at) = ServeCmd::unix(dir, drives, archive)
        .json()
        .args(extra)
        .start()
        .await;
    (p, at.sock.unwrap())
}

/// A qemu-io client that writes `len` bytes at 0 of `export`, then sleeps
/// connected (until killed).
fn stalled_writer(sock: &Path, export: &str, len: u64) -> Proc {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"])
        .arg(nbd_uri(sock, export))
        .args(["-c", &format!("write -P 0x5a 0 {len}"), "-c", "sleep 60000"])
        .stdout(Stdio::null());
    Proc::spawn(c, false)
}

/// Asserts the `failed` event (with `--json`) and stderr name `missing`
/// (e.g. "drive-scsi0: 3145728 of 4194304 bytes missing") as the only
/// incomplete drives. (The exit status is each test's to pin.)
fn assert_failed_naming(ended: &Ended, missing: &[&str]) {
    for m in missing {
        assert!(
            ended.stderr.contains(&format!("incomplete drive {m}")),
            "stderr does not name incomplete drive {m:?}:\n{}",
            ended.stderr
        );
    }
    assert_eq!(
        ended.stderr.matches("incomplete drive ").count(),
        missing.len(),
        "{}",
        ended.stderr
    );
    if let Some(f) = ended.failed_event() {
        assert_eq!(f["incomplete"], serde_json::json!(missing), "{f}");
    }
}

// ---------------------------------------------------------------------
// The client dies
// ---------------------------------------------------------------------

/// A qemu-io writer killed halfway: after the reconnect timeout serve
/// fails, names the incomplete drive (and not the complete one), and with
/// --keep-partial leaves ARCHIVE.partial, which `verify` rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_client_killed_keep_partial() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let archive = dir.join("killed.vma");
    let (mut serve, sock) = start_serve(
        dir,
        &[("drive-scsi0", 4 * MIB), ("drive-scsi1", MIB)],
        archive.to_str().unwrap(),
        &[
            "--keep-partial",
            "--reconnect-timeout",
            &RECONNECT_SECS.to_string(),
        ],
    )
    .await;
    // drive-scsi1 is written completely; drive-scsi0 only its first MiB.
    support::qemu_io(
        &nbd_uri(&sock, "drive-scsi1"),
        "raw",
        &[format!("write -P 0x11 0 {MIB}")],
    );
    let writer = stalled_writer(&sock, "drive-scsi0", MIB);
    serve
        .next_event(PROGRESS_TIMEOUT, |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d >= MIB)
        })
        .await;
    writer.signal(libc::SIGKILL);
    let killed = Instant::now();
    let ended = serve.wait(FAIL_TIMEOUT).await;
    drop(writer);
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_secs(RECONNECT_SECS) - Duration::from_millis(500),
        "failed {waited:?} after the kill, before the reconnect timeout"
    );
    ended.assert_backup_failed(&[
        "backup failed: the client of drive drive-scsi0 disconnected with 3145728 of \
         4194304 bytes missing and did not reconnect within 2s",
        "incomplete archive kept",
    ]);
    assert_failed_naming(&ended, &["drive-scsi0: 3145728 of 4194304 bytes missing"]);
    assert_no_archive(&archive, true);

    // The kept partial archive is incomplete, and a strict reader says so.
    let partial = vma_writer::sink::partial_path(&archive);
    verify_rejects(&partial);
}

/// The source QEMU (a qemu-storage-daemon running a throttled
/// blockdev-backup into serve) is SIGKILLed: serve fails after the
/// reconnect timeout, names the drive, and leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_source_daemon_killed() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 16 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 21);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("qemu-killed.vma");
    let (mut serve, sock) = start_serve(
        dir,
        &[("drive-scsi0", size)],
        archive.to_str().unwrap(),
        &["--reconnect-timeout", &RECONNECT_SECS.to_string()],
    )
    .await;
    let qmp = daemon.connect().await.unwrap();
    qmp.blockdev_add_nbd("tgt0", sock.as_path(), "drive-scsi0")
        .await
        .unwrap();
    qmp.blockdev_backup_transaction(&[BackupJob {
        job_id: "job0".into(),
        device: "scsi0".into(),
        target: "tgt0".into(),
        speed: Some(2 * MIB),
        filter_node_name: None,
        bitmap: None,
    }])
    .await
    .unwrap();
    let done = serve
        .next_event(PROGRESS_TIMEOUT, |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    support::kill(daemon.pid(), libc::SIGKILL);
    let ended = serve.wait(FAIL_TIMEOUT).await;
    drop(qmp);
    drop(daemon);
    ended.assert_backup_failed(&[
        "backup failed: the client of drive drive-scsi0 disconnected with ",
        "did not reconnect within 2s",
    ]);
    let f = ended.failed_event().expect("failed event");
    let incomplete = f["incomplete"].as_array().unwrap();
    assert_eq!(incomplete.len(), 1, "{f} (progress was {done})");
    let text = incomplete[0].as_str().unwrap();
    assert!(
        text.starts_with("drive-scsi0: ") && text.ends_with(&format!("of {size} bytes missing")),
        "{text}"
    );
    assert!(
        ended.stderr.contains("incomplete drive drive-scsi0: "),
        "{}",
        ended.stderr
    );
    assert_no_archive(&archive, false);
}

// ---------------------------------------------------------------------
// QEMU refuses the job
// ---------------------------------------------------------------------

/// serve exports a drive 64 KiB larger than the source: QEMU accepts the
/// NBD node but refuses blockdev-backup; once the test removes the node,
/// serve fails after the reconnect timeout and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_refuses_export_of_wrong_size() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 8 * MIB;
    let src = support::raw_islands(&dir.join("scsi0.raw"), size, 31, 4, MIB);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("wrong-size.vma");
    let wrong = size + 64 * 1024;
    let (serve, sock) = start_serve(
        dir,
        &[("drive-scsi0", wrong)],
        archive.to_str().unwrap(),
        &["--reconnect-timeout", "1"],
    )
    .await;
    let qmp = daemon.connect().await.unwrap();
    qmp.blockdev_add_nbd("tgt0", sock.as_path(), "drive-scsi0")
        .await
        .unwrap();
    let refused = qmp
        .blockdev_backup_transaction(&[BackupJob {
            job_id: "job0".into(),
            device: "scsi0".into(),
            target: "tgt0".into(),
            speed: None,
            filter_node_name: None,
            bitmap: None,
        }])
        .await;
    match refused {
        Err(QmpError::Command { desc, .. }) => {
            assert!(desc.to_lowercase().contains("size"), "{desc}")
        }
        other => panic!("QEMU accepted a target of the wrong size: {other:?}"),
    }
    assert!(qmp.query_block_jobs().await.unwrap().is_empty());
    qmp.blockdev_del("tgt0").await.unwrap();
    let ended = serve.wait(FAIL_TIMEOUT).await;
    ended.assert_backup_failed(&[
        "backup failed: the client of drive drive-scsi0 disconnected with 8454144 of 8454144 \
         bytes missing and did not reconnect within 1s",
    ]);
    assert_failed_naming(&ended, &["drive-scsi0: 8454144 of 8454144 bytes missing"]);
    assert_no_archive(&archive, false);
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// `backup` of a node QEMU does not have: refused before anything is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refuses_unknown_node() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = support::raw_islands(&dir.join("scsi0.raw"), 4 * MIB, 41, 2, MIB);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("nosuch.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--drive", "scsi9", "-o"])
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(FAIL_TIMEOUT).await;
    // Refused before the backup starts: a plain error, not "backup failed".
    ended.assert_exit(
        1,
        &["vma-writer: error: QEMU has no block node or drive named 'scsi9'"],
    );
    assert_no_archive(&archive, false);
    let qmp = daemon.connect().await.unwrap();
    assert_no_leftovers(&qmp).await;
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// `backup` of two drives, one of which another block job already uses (a
/// mirror; QEMU allows two backups of one node, but not a backup of a node
/// being mirrored): QEMU refuses the whole transaction after the targets
/// were added; backup removes both, leaves no file and does not disturb
/// the other job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refused_while_node_busy() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 8 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 51);
    let src1 = dense_random(&dir.join("scsi1.raw"), size, 52);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw"), ("scsi1", &src1, "raw")]).await;
    // A mirror of scsi1 (into a null target), crawling along.
    let spare = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    spare
        .execute(
            "blockdev-add",
            Some(serde_json::json!({"driver": "null-co", "node-name": "other-tgt", "size": size})),
        )
        .await
        .unwrap();
    spare
        .execute(
            "blockdev-mirror",
            Some(serde_json::json!({"job-id": "other", "device": "scsi1",
                "target": "other-tgt", "sync": "full", "speed": 65536})),
        )
        .await
        .unwrap();

    // Both drives in one transaction: QEMU refuses all of it, after both
    // targets were added.
    let archive = dir.join("busy.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--drive", "scsi1", "-o"])
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(FAIL_TIMEOUT).await;
    ended.assert_backup_failed(&[
        "backup failed: QEMU refused the backup jobs: ",
        "Node 'scsi1' is busy",
    ]);
    assert_no_archive(&archive, false);
    assert_no_leftovers(&spare).await;
    // The other job is untouched.
    let jobs = spare.query_block_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].device, "other");
    let mut events = spare.subscribe();
    spare.block_job_cancel("other", true).await.unwrap();
    events
        .wait_jobs_ended(&["other"], Duration::from_secs(10))
        .await
        .unwrap();
    drop(spare);
    daemon.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------

/// `backup --speed` of a 32 MiB dense drive gets `sig` once data flows:
/// it exits non-zero, its jobs are cancelled, its target and filter nodes
/// are gone, and no archive file remains (with `keep_partial`, only
/// ARCHIVE.partial, which `verify` rejects).
async fn backup_stopped_by(sig: libc::c_int, keep_partial: bool) {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 32 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 61);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let spare = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    let mut events = spare.subscribe();
    let archive = dir.join("signal.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--speed", "2M", "--json", "-o"])
        .arg(&archive);
    if keep_partial {
        cmd.arg("--keep-partial");
    }
    let mut backup = Proc::spawn(cmd, true);
    backup
        .next_event(PROGRESS_TIMEOUT, |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    // The job runs now.
    let jobs = spare.query_block_jobs().await.unwrap();
    assert!(
        jobs.len() == 1 && job_matches(&jobs[0].device, "vmaw-job0"),
        "{jobs:?}"
    );
    backup.signal(sig);
    let ended = backup.wait(FAIL_TIMEOUT).await;
    // Stopped by a signal: 128 + its number, and the message names it.
    ended.assert_exit(
        128 + sig,
        &[
            &format!(
                "backup failed: stopped by {} before the archive was complete",
                signal_name(sig)
            ),
            "incomplete drive drive-scsi0: ",
        ],
    );
    let outcome = job_outcome(&mut events, &jobs[0].device).await;
    assert!(outcome.cancelled, "job0 was not cancelled: {outcome:?}");
    assert_no_leftovers(&spare).await;
    assert_no_archive(&archive, keep_partial);
    if keep_partial {
        let partial = vma_writer::sink::partial_path(&archive);
        verify_rejects(&partial);
    }
    drop(spare);
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sigterm_cancels_jobs() {
    backup_stopped_by(libc::SIGTERM, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sigint_keep_partial_cancels_jobs() {
    backup_stopped_by(libc::SIGINT, true).await;
}

/// SIGTERM to serve while a client has written half a drive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sigterm_mid_backup() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let archive = dir.join("term.vma");
    let (mut serve, sock) = start_serve(
        dir,
        &[("drive-scsi0", 2 * MIB)],
        archive.to_str().unwrap(),
        &[],
    )
    .await;
    let writer = stalled_writer(&sock, "drive-scsi0", MIB);
    serve
        .next_event(PROGRESS_TIMEOUT, |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d >= MIB)
        })
        .await;
    serve.signal(libc::SIGTERM);
    let ended = serve.wait(FAIL_TIMEOUT).await;
    drop(writer);
    ended.assert_exit(
        143,
        &["backup failed: stopped by SIGTERM before the archive was complete"],
    );
    assert_failed_naming(&ended, &["drive-scsi0: 1048576 of 2097152 bytes missing"]);
    assert_no_archive(&archive, false);
}

/// `serve --buffer-limit 1M` (16 partial clusters) of a 4 MiB drive, and a
/// qemu-io client that writes 4 KiB into each of 32 clusters: its 17th
/// write waits for partial-buffer room. Returns serve and the client once
/// the client is connected and has been stuck for a second.
async fn serve_under_back_pressure(dir: &Path, archive: &Path, extra: &[&str]) -> (Proc, Proc) {
    let (mut serve, sock) = start_serve(
        dir,
        &[("drive-scsi0", 4 * MIB)],
        archive.to_str().unwrap(),
        &[&["--buffer-limit", "1M"], extra].concat(),
    )
    .await;
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).arg(nbd_uri(&sock, "drive-scsi0"));
    for i in 0..32u64 {
        c.arg("-c").arg(format!("write -P 0x11 {} 4k", i * 65536));
    }
    c.stdout(Stdio::null());
    let writer = Proc::spawn(c, false);
    serve
        .next_event(PROGRESS_TIMEOUT, |e| {
            e["event"] == "progress" && e["drives"][0]["connections"] == 1
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    (serve, writer)
}

/// SIGTERM to serve while a client's write waits for partial-buffer room:
/// serve stops at once (well before the blocked write would give up after
/// `partial_wait`, 30 s), exits 143 and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sigterm_during_back_pressure() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("pressure.vma");
    let (serve, writer) = serve_under_back_pressure(tmp.path(), &archive, &[]).await;
    serve.signal(libc::SIGTERM);
    let ended = serve.wait(Duration::from_secs(20)).await;
    drop(writer);
    ended.assert_exit(
        143,
        &["backup failed: stopped by SIGTERM before the archive was complete"],
    );
    assert_no_archive(&archive, false);
}

/// The same stop must not log an ERROR claiming that no cluster completed
/// for 30 s: the wait was cut short by the stop after about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sigterm_during_back_pressure_logs_no_false_error() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("pressure.vma");
    let (serve, writer) = serve_under_back_pressure(tmp.path(), &archive, &[]).await;
    serve.signal(libc::SIGTERM);
    let ended = serve.wait(Duration::from_secs(20)).await;
    drop(writer);
    ended.assert_stopped_by(libc::SIGTERM);
    assert!(
        !ended.stderr.contains("ERROR") && !ended.stderr.contains("no cluster completed"),
        "{}",
        ended.stderr
    );
}

/// A client killed while its write waits for partial-buffer room: serve
/// must see it gone and fail after the reconnect timeout (2 s), not only
/// once the blocked write gives up (`partial_wait`, 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_client_killed_during_back_pressure() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("pressure-kill.vma");
    let (serve, writer) = serve_under_back_pressure(
        tmp.path(),
        &archive,
        &["--reconnect-timeout", &RECONNECT_SECS.to_string()],
    )
    .await;
    writer.signal(libc::SIGKILL);
    let ended = serve.wait(Duration::from_secs(RECONNECT_SECS + 18)).await;
    drop(writer);
    ended.assert_backup_failed(&[
        "backup failed: the client of drive drive-scsi0 disconnected with 4194304 of 4194304 \
         bytes missing and did not reconnect within 2s",
    ]);
    assert_failed_naming(&ended, &["drive-scsi0: 4194304 of 4194304 bytes missing"]);
    assert_no_archive(&archive, false);
}

// ---------------------------------------------------------------------
// Output write failures
// ---------------------------------------------------------------------

/// The end of job `job`, as QEMU reported it.
/// vma-writer names its jobs `vmaw<pid>-job<i>`; `job` is written
/// `vmaw-job<i>` here and matches any pid.
fn job_matches(device: &str, job: &str) -> bool {
    device == job
        || job
            .strip_prefix("vmaw")
            .is_some_and(|suffix| device.starts_with("vmaw") && device.ends_with(suffix))
}

async fn job_outcome(events: &mut EventStream, job: &str) -> JobOutcome {
    events
        .wait_jobs_ended(&[job], Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("no end of {job}: {e}"))
        .remove(0)
}

/// Was there a BLOCK_JOB_ERROR for `job` among `seen`?
fn saw_job_error(seen: &[JobEvent], job: &str) -> bool {
    seen.iter()
        .any(|e| matches!(e, JobEvent::Error(x) if job_matches(&x.device, job)))
}

/// Asserts `job` ended cancelled or completed with an error. (With
/// `backup`, vma-writer sees its output fail first and cancels the job,
/// so QEMU usually reports a cancellation, not an I/O error.)
fn assert_job_did_not_succeed(seen: &[JobEvent], job: &str) {
    let ok = seen.iter().any(|e| match e {
        JobEvent::Cancelled(x) => job_matches(&x.device, job),
        JobEvent::Completed(x) => job_matches(&x.device, job) && x.error.is_some(),
        _ => false,
    });
    assert!(ok, "{job} did not fail or get cancelled: {seen:?}");
}

/// Collects the job events of `events` until `job` ends.
async fn job_events_until_end(events: &mut EventStream, job: &str) -> Vec<JobEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no end of {job}; saw {seen:?}"))
            .unwrap();
        if let Ok(Some(je)) = ev.typed() {
            let end = matches!(&je, JobEvent::Completed(e) | JobEvent::Cancelled(e) if job_matches(&e.device, job));
            seen.push(je);
            if end {
                return seen;
            }
        }
    }
}

/// `backup` under `ulimit -f`: the archive write fails with EFBIG; backup
/// exits non-zero naming the write failure, QEMU's job ends (with an
/// error or cancelled by backup), and nothing stays behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_file_size_limit() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 32 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 71);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let spare = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    let mut events = spare.subscribe();
    let archive = dir.join("efbig.vma");
    let mut cmd = vma_async_file_limit(2048, ["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "-o"])
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(FAIL_TIMEOUT).await;
    // Exit 1, not SIGXFSZ; the cause said once, not also in a log line.
    ended.assert_backup_failed(&[
        "backup failed: writing the archive failed: File too large (os error 27)",
    ]);
    assert_eq!(
        ended.stderr.matches("File too large").count(),
        1,
        "{}",
        ended.stderr
    );
    let seen = job_events_until_end(&mut events, "vmaw-job0").await;
    assert_job_did_not_succeed(&seen, "vmaw-job0");
    assert_no_leftovers(&spare).await;
    assert_no_archive(&archive, false);
    drop(spare);
    daemon.shutdown().await.unwrap();
}

/// `backup -o -` into a pipe whose reader stops after 1 MiB: the write
/// fails (EPIPE), backup exits non-zero naming it, and QEMU's job ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_stdout_reader_goes_away() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 32 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 81);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let spare = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    let mut events = spare.subscribe();
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "-o", "-"])
        .stdout(Stdio::piped());
    let mut backup = Proc::spawn(cmd, false);
    let mut out = backup.take_stdout();
    let mut buf = vec![0u8; MIB as usize];
    tokio::time::timeout(Duration::from_secs(20), out.read_exact(&mut buf))
        .await
        .expect("no archive bytes within 20 s")
        .unwrap();
    assert_eq!(&buf[..4], b"VMA\0");
    drop(out);
    let ended = backup.wait(FAIL_TIMEOUT).await;
    ended.assert_backup_failed(&[
        "backup failed: writing the archive failed: Broken pipe (os error 32)",
    ]);
    assert_eq!(
        ended.stderr.matches("Broken pipe").count(),
        1,
        "{}",
        ended.stderr
    );
    let seen = job_events_until_end(&mut events, "vmaw-job0").await;
    assert_job_did_not_succeed(&seen, "vmaw-job0");
    assert_no_leftovers(&spare).await;
    drop(spare);
    daemon.shutdown().await.unwrap();
}

/// How `serve`'s output fails in [`serve_output_failure_fails_qemu_job`].
#[derive(Clone, Copy, Debug)]
enum OutputFailure {
    /// `-o -` into a pipe whose reader closes after the header.
    PipeClosed,
    /// `-o FILE` under `ulimit -f 2048`.
    FileSizeLimit,
}

/// `serve`'s output write fails while QEMU's blockdev-backup (driven by
/// the test) runs into it: QEMU's writes get errors, its job fails
/// (BLOCK_JOB_ERROR, then BLOCK_JOB_COMPLETED with an error), and serve
/// exits non-zero naming the write failure, leaving no archive.
async fn serve_output_failure_fails_qemu_job(how: OutputFailure) {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 32 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 91);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("efbig.vma");
    let drives = [("drive-scsi0", size)];
    let cmd = match how {
        OutputFailure::PipeClosed => {
            let mut c = ServeCmd::unix(dir, &drives, "-");
            c.command().stdout(Stdio::piped());
            c
        }
        OutputFailure::FileSizeLimit => ServeCmd::unix_with(
            vma_async_file_limit(2048, ["serve"]),
            dir,
            &drives,
            &archive,
        ),
    };
    let (mut serve, at) = cmd.args(["--reconnect-timeout", "1"]).start().await;
    let sock = at.sock.unwrap();
    if let OutputFailure::PipeClosed = how {
        let mut out = serve.take_stdout();
        // Read the header, then stop reading and close.
        let mut buf = vec![0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), out.read_exact(&mut buf))
            .await
            .expect("no header within 10 s")
            .unwrap();
        assert_eq!(&buf[..4], b"VMA\0");
    }

    let qmp = daemon.connect().await.unwrap();
    let mut events = qmp.subscribe();
    qmp.blockdev_add_nbd("tgt0", sock.as_path(), "drive-scsi0")
        .await
        .unwrap();
    qmp.blockdev_backup_transaction(&[BackupJob {
        job_id: "job0".into(),
        device: "scsi0".into(),
        target: "tgt0".into(),
        speed: None,
        filter_node_name: None,
        bitmap: None,
    }])
    .await
    .unwrap();
    let seen = job_events_until_end(&mut events, "job0").await;
    let end = seen
        .iter()
        .find_map(|e| match e {
            JobEvent::Completed(x) if x.device == "job0" => Some(x.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("job0 did not complete: {seen:?}"));
    assert!(
        end.error.is_some(),
        "QEMU's job succeeded into a broken output: {end:?}"
    );
    assert!(end.offset < end.len, "{end:?}");
    assert!(saw_job_error(&seen, "job0"), "{seen:?}");
    let _ = qmp.blockdev_del("tgt0").await;
    let ended = serve.wait(FAIL_TIMEOUT).await;
    let why = match how {
        OutputFailure::PipeClosed => "Broken pipe (os error 32)",
        OutputFailure::FileSizeLimit => "File too large (os error 27)",
    };
    ended.assert_backup_failed(&[&format!("backup failed: writing the archive failed: {why}")]);
    assert_eq!(ended.stderr.matches(why).count(), 1, "{}", ended.stderr);
    assert_no_archive(&archive, false);
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_output_pipe_closed_fails_qemu_job() {
    serve_output_failure_fails_qemu_job(OutputFailure::PipeClosed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_file_size_limit_fails_qemu_job() {
    serve_output_failure_fails_qemu_job(OutputFailure::FileSizeLimit).await;
}

/// `serve -o -` into a file when the client dies: the stream ends without
/// the missing clusters, so `verify` rejects what the consumer got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stdout_stream_of_failed_backup_is_rejected() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let stream = dir.join("stream.vma");
    let mut cmd =
        ServeCmd::unix(dir, &[("drive-scsi0", 8 * MIB)], "-").args(["--reconnect-timeout", "1"]);
    cmd.command()
        .stdout(std::fs::File::create(&stream).unwrap());
    let (serve, at) = cmd.start().await;
    support::qemu_io(
        &at.uri("drive-scsi0"),
        "raw",
        &[format!("write -P 0x42 0 {}", 5 * MIB)],
    );
    let ended = serve.wait(FAIL_TIMEOUT).await;
    ended.assert_backup_failed(&[
        "backup failed: the client of drive drive-scsi0 disconnected with 3145728 of 8388608 \
         bytes missing and did not reconnect within 1s",
    ]);
    assert_failed_naming(&ended, &["drive-scsi0: 3145728 of 8388608 bytes missing"]);
    let len = std::fs::metadata(&stream).unwrap().len();
    assert!(len > 5 * MIB, "only {len} bytes reached stdout");
    verify_rejects(&stream);
}

// ---------------------------------------------------------------------
// QEMU goes away, or is shared
// ---------------------------------------------------------------------

/// The QEMU that `backup` drives is SIGKILLed mid-backup: backup notices
/// the lost QMP connection (or its NBD client leaving), exits non-zero
/// and removes the partial archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_source_daemon_killed() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 16 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 101);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("lost.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--speed", "2M", "--json", "-o"])
        .arg(&archive);
    let mut backup = Proc::spawn(cmd, true);
    backup
        .next_event(PROGRESS_TIMEOUT, |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    support::kill(daemon.pid(), libc::SIGKILL);
    let ended = backup.wait(FAIL_TIMEOUT).await;
    drop(daemon);
    ended.assert_backup_failed(&[
        "backup failed: lost the QMP connection: ",
        "incomplete drive drive-scsi0: ",
    ]);
    assert_no_archive(&archive, false);
}

/// QEMU's block jobs and our nodes (`vmaw...`), sorted: (jobs, nodes).
async fn our_names(qmp: &Qmp) -> (Vec<String>, Vec<String>) {
    let mut jobs: Vec<String> = qmp
        .query_block_jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.device)
        .collect();
    let mut nodes: Vec<String> = qmp
        .query_named_block_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.node_name)
        .filter(|n| n.starts_with("vmaw"))
        .collect();
    jobs.sort();
    nodes.sort();
    (jobs, nodes)
}

/// The job and node names `backup` process `pid` gives its drive 0.
fn names_of(pid: u32) -> (Vec<String>, Vec<String>) {
    (
        vec![format!("vmaw{pid}-job0")],
        vec![format!("vmaw{pid}-cbw0"), format!("vmaw{pid}-tgt0")],
    )
}

/// Two `backup` processes against one QEMU, for different drives, at the
/// same time. QEMU's names are per process (`vmaw<pid>-job0`, `-tgt0`,
/// `-cbw0`), so they do not collide: both must succeed and restore byte
/// for byte, and neither may disturb the other. The names are read from
/// QEMU while each backup runs (a daemon has two QMP monitors: the test
/// reads through the one the other backup does not hold; the second backup
/// starts slow and is sped up once its names were seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_backups_of_one_qemu_both_succeed() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 16 * MIB;
    let b_size = 8 * MIB;
    let a_src = dense_random(&dir.join("scsi0.raw"), size, 111);
    let b_src = dense_random(&dir.join("scsi1.raw"), b_size, 112);
    let daemon = start_daemon(dir, &[("scsi0", &a_src, "raw"), ("scsi1", &b_src, "raw")]).await;
    let a_archive = dir.join("a.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--speed", "4M", "--json", "-o"])
        .arg(&a_archive);
    let mut a = Proc::spawn(cmd, true);
    a.next_event(PROGRESS_TIMEOUT, |e| {
        progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
    })
    .await;
    // A's names, through the spare monitor.
    let spare = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    assert_eq!(our_names(&spare).await, names_of(a.pid()));
    drop(spare);

    // B on the spare monitor, crawling (1 MiB/s) until sped up.
    let b_archive = dir.join("b.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.spare_qmp_socket())
        .args(["--drive", "scsi1", "--speed", "1M", "--json", "-o"])
        .arg(&b_archive);
    let mut b = Proc::spawn(cmd, true);
    b.next_event(PROGRESS_TIMEOUT, |e| {
        progress_done(e, "drive-scsi1").is_some_and(|d| d > 0)
    })
    .await;
    let b_pid = b.pid();
    assert!(
        !a.has_exited(),
        "the first backup ended while the second started: {}",
        a.stderr()
    );
    let a = a.wait(RUN_TIMEOUT).await;
    a.assert_success();

    // B's names, through the monitor A has released; then let it run.
    let qmp = daemon.connect().await.unwrap();
    assert_eq!(our_names(&qmp).await, names_of(b_pid));
    qmp.block_job_set_speed(&format!("vmaw{b_pid}-job0"), 0)
        .await
        .unwrap();
    let b = b.wait(RUN_TIMEOUT).await;
    b.assert_success();

    check_archive(&a_archive, &[("drive-scsi0", size, &a_src)], dir);
    check_archive(&b_archive, &[("drive-scsi1", b_size, &b_src)], dir);
    assert_no_leftovers(&qmp).await;
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// `backup -o ARCHIVE` where ARCHIVE (or ARCHIVE.partial) already
/// exists: refused, the file is untouched, QEMU is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_never_overwrites() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = support::raw_islands(&dir.join("scsi0.raw"), 4 * MIB, 121, 2, MIB);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let qmp = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    for existing in ["old.vma", "old2.vma.partial"] {
        let archive = dir.join(existing.trim_end_matches(".partial"));
        let path = dir.join(existing);
        std::fs::write(&path, b"precious").unwrap();
        let mut cmd = vma_async(["backup", "--qmp"]);
        cmd.arg(daemon.qmp_socket())
            .args(["--drive", "scsi0", "-o"])
            .arg(&archive);
        let ended = Proc::spawn(cmd, false).wait(FAIL_TIMEOUT).await;
        let path_text = path.display().to_string();
        let why = if existing.ends_with(".partial") {
            vec![
                "backup failed: cannot create the archive: ",
                &path_text,
                " exists: the unfinished archive of an earlier run",
                "delete it",
            ]
        } else {
            vec![
                "backup failed: cannot create the archive: ",
                &path_text,
                " already exists; refusing to overwrite it",
            ]
        };
        ended.assert_backup_failed(&why);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        assert_no_leftovers(&qmp).await;
    }
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// SIGTERM at several moments of `backup`'s start-up (connecting,
/// adding targets, starting the transaction, first copies): whenever it
/// lands, backup exits non-zero and leaves no archive, no partial file and
/// no job or node in QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_sigterm_at_any_moment_leaves_nothing() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 16 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 131);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let spare = Qmp::connect(daemon.spare_qmp_socket()).await.unwrap();
    for delay_ms in [0u64, 10, 30, 60, 100, 150, 250, 400] {
        let archive = dir.join(format!("t{delay_ms}.vma"));
        let mut cmd = vma_async(["backup", "--qmp"]);
        cmd.arg(daemon.qmp_socket())
            .args(["--drive", "scsi0", "--speed", "2M", "-o"])
            .arg(&archive);
        let p = Proc::spawn(cmd, false);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        p.signal(libc::SIGTERM);
        let ended = p.wait(FAIL_TIMEOUT).await;
        // A signal before the handlers are installed (only while nothing
        // is made yet) kills the process; any later one is handled.
        use std::os::unix::process::ExitStatusExt;
        if ended.status.signal() != Some(libc::SIGTERM) {
            ended.assert_stopped_by(libc::SIGTERM);
        }
        assert_no_archive(&archive, false);
        // backup waits for its cancelled jobs to end before it exits.
        assert_no_leftovers(&spare).await;
    }
    drop(spare);
    daemon.shutdown().await.unwrap();
}

/// `backup --json`: the `failed` event lists the incomplete drives in
/// `incomplete`, as serve's does (not only inside `reason`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_json_failed_event_lists_incomplete_drives() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dense_random(&dir.join("scsi0.raw"), 16 * MIB, 141);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("json.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--speed", "2M", "--json", "-o"])
        .arg(&archive);
    let mut backup = Proc::spawn(cmd, true);
    backup
        .next_event(PROGRESS_TIMEOUT, |e| {
            progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    backup.signal(libc::SIGTERM);
    let ended = backup.wait(FAIL_TIMEOUT).await;
    ended.assert_stopped_by(libc::SIGTERM);
    let f = ended.failed_event().expect("failed event");
    assert_eq!(
        f["reason"], "stopped by SIGTERM before the archive was complete",
        "{f}"
    );
    let incomplete = f["incomplete"].as_array().expect("incomplete list");
    assert_eq!(incomplete.len(), 1, "{f}");
    assert!(
        incomplete[0]
            .as_str()
            .is_some_and(|s| s.starts_with("drive-scsi0: ")),
        "{f}"
    );
    daemon.shutdown().await.unwrap();
}
