//! The QMP client against a real qemu-storage-daemon: node listing, typed
//! errors, a real `blockdev-backup` into nbdkit, cancelling, a lost
//! connection, and process cleanup.

use std::time::{Duration, Instant};

use crate::support::{self, Nbdkit, require_tools};
use serde_json::json;
use vma_writer::backup;
use vma_writer::qemu::{self, DaemonOptions, Image, StorageDaemon};
use vma_writer::qmp::{BackupJob, Error, ErrorClass, Event, JobEvent, JobStatus};

/// Tools every test here needs.
const TOOLS: &[&str] = &["qemu-storage-daemon", "qemu-img", "qemu-io", "nbdkit"];
/// 10 MiB + 1536 B: not a multiple of the 64 KiB backup cluster.
const ODD_SIZE: u64 = 10 * 1024 * 1024 + 1536;
/// QEMU's backup cluster when the target reports none (nbdkit memory).
const CLUSTER: u64 = 64 * 1024;
const QCOW2_SIZE: u64 = 64 * 1024 * 1024;
/// Limit for a whole small backup on a slow CI box.
const JOB_TIMEOUT: Duration = Duration::from_secs(60);
/// "Promptly" for noticing a lost connection.
const LOSS_TIMEOUT: Duration = Duration::from_secs(2);

/// A raw image of ODD_SIZE ("raw0") and a qcow2 of QCOW2_SIZE ("qcow0"),
/// both with some data; optionally a read-only raw ("ro0").
fn images(dir: &std::path::Path, with_ro: bool) -> DaemonOptions {
    let raw = support::qemu_img_create(&dir.join("raw0.raw"), "raw", ODD_SIZE);
    support::write_pattern(raw.to_str().unwrap(), "raw", 0x11, 0, 65536);
    support::write_pattern(raw.to_str().unwrap(), "raw", 0x22, ODD_SIZE - 1536, 1536);
    let qcow = support::qemu_img_create(&dir.join("qcow0.qcow2"), "qcow2", QCOW2_SIZE);
    support::write_pattern(qcow.to_str().unwrap(), "qcow2", 0x33, 3 << 20, 1 << 20);
    let mut opts = DaemonOptions::new(dir.join("run"))
        .image(Image::new("raw0", &raw, "raw"))
        .image(Image::new("qcow0", &qcow, "qcow2"));
    if with_ro {
        let ro = support::qemu_img_create(&dir.join("ro0.raw"), "raw", 1 << 20);
        opts = opts.image(Image::new("ro0", ro, "raw").read_only());
    }
    opts
}

fn is_job_end(job: &str) -> impl FnMut(&Event) -> bool + '_ {
    move |ev| matches!(ev.typed(), Ok(Some(JobEvent::Completed(ref e) | JobEvent::Cancelled(ref e))) if e.device == job)
}

#[tokio::test]
async fn lists_nodes_with_exact_sizes() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = StorageDaemon::start(images(dir.path(), true))
        .await
        .unwrap();
    let qmp = daemon.connect().await.unwrap();
    assert!(qmp.version().major >= 5, "{}", qmp.version());

    let mut nodes = qmp.query_named_block_nodes().await.unwrap();
    nodes.sort_by(|a, b| a.node_name.cmp(&b.node_name));
    let summary: Vec<_> = nodes
        .iter()
        .map(|n| (n.node_name.as_str(), n.driver.as_str(), n.read_only))
        .collect();
    assert_eq!(
        summary,
        [
            ("qcow0", "qcow2", false),
            ("qcow0-file", "file", false),
            ("raw0", "raw", false),
            ("raw0-file", "file", false),
            ("ro0", "raw", true),
            ("ro0-file", "file", true),
        ]
    );
    let size = |name: &str| nodes.iter().find(|n| n.node_name == name).unwrap().size;
    assert_eq!(size("raw0"), ODD_SIZE);
    assert_eq!(size("raw0-file"), ODD_SIZE);
    assert_eq!(size("qcow0"), QCOW2_SIZE);
    assert_ne!(size("qcow0-file"), QCOW2_SIZE); // the qcow2 file itself
    let named = backup::block_nodes(&qmp).await.unwrap();
    assert!(named.iter().all(|n| n.drive_name.is_none()));

    // --all on the storage daemon: the format nodes (graph roots), also
    // the read-only one.
    let all = backup::all_drives(&qmp).await.unwrap();
    let names: Vec<_> = all.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["qcow0", "raw0", "ro0"]);
    // The start-up probes of the QMP sockets leave no noise.
    assert_eq!(daemon.stderr(), "(no output)");
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

#[tokio::test]
async fn command_errors_are_typed() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = StorageDaemon::start(images(dir.path(), false))
        .await
        .unwrap();
    let qmp = daemon.connect().await.unwrap();

    match qmp.blockdev_del("no-such-node").await {
        Err(Error::Command {
            command,
            class: ErrorClass::GenericError,
            desc,
        }) => {
            assert_eq!(command, "blockdev-del");
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("expected a GenericError, got {other:?}"),
    }
    match qmp.execute("no-such-command", None).await {
        Err(Error::Command {
            class: ErrorClass::CommandNotFound,
            ..
        }) => {}
        other => panic!("expected CommandNotFound, got {other:?}"),
    }
    // The connection is still fine, and serves several tasks at once.
    let calls = (0..16).map(|i| {
        let qmp = &qmp;
        async move {
            if i % 2 == 0 {
                qmp.query_block_jobs().await.map(|j| j.len())
            } else {
                qmp.execute("query-named-block-nodes", Some(json!({"flat": true})))
                    .await
                    .map(|v| v.as_array().unwrap().len())
            }
        }
    });
    let results = futures_join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), if i % 2 == 0 { 0 } else { 4 });
    }
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// Runs the futures concurrently on this task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn backup_into_nbdkit_completes() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Includes a read-only source: QEMU backs those up too.
    let opts = images(dir.path(), true);
    let sources = opts.images.clone();
    let daemon = StorageDaemon::start(opts).await.unwrap();
    let qmp = daemon.connect().await.unwrap();

    let drives = backup::all_drives(&qmp).await.unwrap();
    let targets: Vec<Nbdkit> = drives
        .iter()
        .map(|n| Nbdkit::memory(dir.path(), &n.node, n.size))
        .collect();
    let mut jobs = Vec::new();
    for (node, target) in drives.iter().zip(&targets) {
        let tgt = format!("nbd-{}", node.node);
        qmp.blockdev_add_nbd(&tgt, &target.socket, "")
            .await
            .unwrap();
        jobs.push(BackupJob {
            job_id: format!("backup-{}", node.node),
            device: node.node.clone(),
            target: tgt,
            speed: None,
            filter_node_name: Some(format!("cbw-{}", node.node)),
            bitmap: None,
        });
    }

    let mut events = qmp.subscribe();
    let t0 = Instant::now();
    qmp.blockdev_backup_transaction(&jobs).await.unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    let outcomes = events.wait_jobs_ended(&ids, JOB_TIMEOUT).await.unwrap();
    for (outcome, node) in outcomes.iter().zip(&drives) {
        assert!(outcome.is_success(), "{outcome:?}");
        let end = &outcome.end;
        // QEMU counts whole 64 KiB backup clusters: an odd-sized image's
        // job length is its size rounded up.
        assert_eq!(end.len, node.size.next_multiple_of(CLUSTER));
        assert_eq!(end.job_type, "backup");
    }
    eprintln!("backup of {} drives took {:?}", jobs.len(), t0.elapsed());
    for job in &jobs {
        qmp.blockdev_del(&job.target).await.unwrap();
    }
    assert!(qmp.query_block_jobs().await.unwrap().is_empty());

    // The targets hold exactly the sources.
    for (node, target) in drives.iter().zip(&targets) {
        let src = sources.iter().find(|i| i.node_name == node.node).unwrap();
        assert!(
            support::images_equal(
                src.path.to_str().unwrap(),
                &src.format,
                &target.uri(),
                "raw"
            ),
            "{} differs from its backup",
            node.node
        );
    }
    drop(qmp);
    assert!(daemon.shutdown().await.unwrap().success());
}

#[tokio::test]
async fn throttled_job_can_be_cancelled() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = StorageDaemon::start(images(dir.path(), false))
        .await
        .unwrap();
    let qmp = daemon.connect().await.unwrap();
    let target = Nbdkit::memory(dir.path(), "tgt", QCOW2_SIZE);
    qmp.blockdev_add_nbd("nbd-qcow0", &target.socket, "")
        .await
        .unwrap();

    let mut events = qmp.subscribe();
    let speed = 1 << 20; // 64 s for the whole image
    qmp.blockdev_backup_transaction(&[BackupJob {
        job_id: "slow".into(),
        device: "qcow0".into(),
        target: "nbd-qcow0".into(),
        speed: Some(speed),
        filter_node_name: None,
        bitmap: None,
    }])
    .await
    .unwrap();
    events
        .wait_for(JOB_TIMEOUT, |ev| {
            ev.typed().ok().flatten()
                == Some(JobEvent::StatusChange(vma_writer::qmp::JobStatusChange {
                    id: "slow".into(),
                    status: JobStatus::Running,
                }))
        })
        .await
        .unwrap();

    let jobs = qmp.query_block_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].device, "slow");
    assert_eq!(jobs[0].len, QCOW2_SIZE);
    assert_eq!(jobs[0].speed, speed);
    assert!(jobs[0].offset < QCOW2_SIZE);

    qmp.block_job_cancel("slow", false).await.unwrap();
    let ev = events
        .wait_for(Duration::from_secs(10), is_job_end("slow"))
        .await
        .unwrap();
    let Ok(Some(JobEvent::Cancelled(end))) = ev.typed() else {
        panic!("expected BLOCK_JOB_CANCELLED, got {ev:?}")
    };
    assert!(end.offset < end.len, "{end:?}");
    qmp.blockdev_del("nbd-qcow0").await.unwrap();
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

#[tokio::test]
async fn lost_connection_fails_pending_command_and_events() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = StorageDaemon::start(images(dir.path(), false))
        .await
        .unwrap();
    let qmp = std::sync::Arc::new(daemon.connect().await.unwrap());
    let mut events = qmp.subscribe();

    // Freeze the daemon so the command stays unanswered, then kill it.
    support::kill(daemon.pid(), libc::SIGSTOP);
    let pending = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.query_block_jobs().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "a stopped QEMU answered");
    let killed = Instant::now();
    support::kill(daemon.pid(), libc::SIGKILL);

    let r = tokio::time::timeout(LOSS_TIMEOUT, pending)
        .await
        .expect("pending command hangs after QEMU died")
        .unwrap();
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
    let r = tokio::time::timeout(LOSS_TIMEOUT, events.recv())
        .await
        .expect("event stream hangs after QEMU died");
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
    eprintln!("loss noticed after {:?}", killed.elapsed());

    // Later calls fail at once, and so do new subscribers.
    assert!(qmp.is_closed());
    assert!(matches!(
        qmp.execute("query-block", None).await,
        Err(Error::Closed { .. })
    ));
    assert!(matches!(
        qmp.subscribe().recv().await,
        Err(Error::Closed { .. })
    ));
    drop(daemon); // reaps the killed child
}

#[tokio::test]
async fn drop_leaves_no_process_and_shutdown_quits() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = StorageDaemon::start(images(dir.path(), false))
        .await
        .unwrap();
    let pid = daemon.pid();
    let socket = daemon.qmp_socket().to_path_buf();
    // A client connected at drop time must not keep anything alive.
    let qmp = daemon.connect().await.unwrap();
    let mut events = qmp.subscribe();
    assert!(support::pid_alive(pid));
    drop(daemon);
    assert!(!support::pid_alive(pid), "daemon {pid} survived drop");
    assert!(!socket.exists());
    let r = tokio::time::timeout(LOSS_TIMEOUT, events.recv())
        .await
        .unwrap();
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");

    // shutdown(): QMP quit on the spare monitor, clean exit.
    let daemon = StorageDaemon::start(images(dir.path(), false))
        .await
        .unwrap();
    let pid = daemon.pid();
    let qmp = daemon.connect().await.unwrap(); // holds the main monitor
    let t0 = Instant::now();
    let status = daemon.shutdown().await.unwrap();
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() < qemu::QUIT_TIMEOUT, "quit was not used");
    assert!(!support::pid_alive(pid));
    drop(qmp);

    // With both monitors busy, quit cannot connect: SIGTERM after
    // QUIT_TIMEOUT, still a clean exit.
    let daemon = StorageDaemon::start(images(dir.path(), false))
        .await
        .unwrap();
    let pid = daemon.pid();
    let main = daemon.connect().await.unwrap();
    let spare = vma_writer::qmp::Qmp::connect(daemon.spare_qmp_socket())
        .await
        .unwrap();
    let t0 = Instant::now();
    let status = daemon.shutdown().await.unwrap();
    assert!(t0.elapsed() >= qemu::QUIT_TIMEOUT);
    assert!(status.success(), "{status}");
    assert!(!support::pid_alive(pid));
    drop((main, spare));
}

#[tokio::test]
async fn start_failure_quotes_qemu() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = DaemonOptions::new(dir.path().join("run")).image(Image::new(
        "gone",
        dir.path().join("missing.raw"),
        "raw",
    ));
    match StorageDaemon::start(opts).await {
        Err(qemu::Error::Exited { status, stderr }) => {
            assert!(!status.success());
            assert!(stderr.contains("missing.raw"), "{stderr}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }

    let opts = DaemonOptions::new(dir.path().join("run")).image(Image::new(
        "bad,name",
        dir.path().join("x.raw"),
        "raw",
    ));
    assert!(matches!(
        StorageDaemon::start(opts).await,
        Err(qemu::Error::BadNodeName { .. })
    ));
}

#[tokio::test]
async fn writes_through_export_during_backup_keep_point_in_time() {
    if !require_tools(TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = images(dir.path(), false);
    let raw = opts.images[0].path.clone();
    // Point-in-time copy to compare against.
    let before = dir.path().join("before.raw");
    std::fs::copy(&raw, &before).unwrap();
    let mut daemon = StorageDaemon::start(opts).await.unwrap();
    let qmp = daemon.connect().await.unwrap();
    // Works while `qmp` holds the main monitor.
    let live = daemon.export_nbd("raw0", "live", true).await.unwrap();
    let live_uri = format!("nbd+unix:///live?socket={}", live.display());

    let target = Nbdkit::memory(dir.path(), "tgt", ODD_SIZE);
    qmp.blockdev_add_nbd("nbd-raw0", &target.socket, "")
        .await
        .unwrap();
    let mut events = qmp.subscribe();
    qmp.blockdev_backup_transaction(&[BackupJob {
        job_id: "pit".into(),
        device: "raw0".into(),
        target: "nbd-raw0".into(),
        speed: Some(1 << 20),
        filter_node_name: Some("cbw-raw0".into()),
        bitmap: None,
    }])
    .await
    .unwrap();

    // Overwrite the start and the odd tail while the job crawls.
    let uri = live_uri.clone();
    tokio::task::spawn_blocking(move || {
        support::write_pattern(&uri, "raw", 0x66, 0, 1 << 20);
        support::write_pattern(&uri, "raw", 0x77, ODD_SIZE - 4096, 4096);
    })
    .await
    .unwrap();
    // The writes really happened while the job was still copying.
    let jobs = qmp.query_block_jobs().await.unwrap();
    assert!(
        jobs.iter().any(|j| j.device == "pit" && j.offset < j.len),
        "the job finished before the writes: {jobs:?}"
    );
    qmp.block_job_set_speed("pit", 0).await.unwrap();
    let ev = events
        .wait_for(JOB_TIMEOUT, is_job_end("pit"))
        .await
        .unwrap();
    assert!(
        matches!(ev.typed(), Ok(Some(JobEvent::Completed(ref e))) if e.error.is_none()),
        "{ev:?}"
    );
    qmp.blockdev_del("nbd-raw0").await.unwrap();

    assert!(support::images_equal(
        before.to_str().unwrap(),
        "raw",
        &target.uri(),
        "raw"
    ));
    assert!(
        !support::images_equal(before.to_str().unwrap(), "raw", &live_uri, "raw"),
        "the writes did not reach the source"
    );
    drop(qmp);
    daemon.shutdown().await.unwrap();
}
