//! Restore verification of `vma-writer backup` through a real
//! qemu-storage-daemon: one drive, three drives in one transaction (64 MiB
//! raw with holes, 10 MiB + 1536 B raw, 1 GiB sparse qcow2), and writes to
//! the source while a throttled backup runs (copy-before-write). Each
//! archive is listed, verified, extracted and compared byte for byte with
//! the point-in-time source.

use std::path::Path;
use std::time::Duration;

use crate::support::{self, *};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_one_drive_64m_raw_with_holes() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = raw_islands(&dir.join("scsi0.raw"), 64 * MIB, 1, 12, 2 * MIB);
    let conf = dir.join("qemu-server.conf");
    let conf_text = "memory: 512\nscsi0: local:vm-100-disk-0,size=64M\n";
    std::fs::write(&conf, conf_text).unwrap();
    let out_dir = dir.join("dump");
    std::fs::create_dir(&out_dir).unwrap();

    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--vmid", "100", "--json", "-c"])
        .arg(&conf)
        .arg("--output-dir")
        .arg(&out_dir);
    let ended = Proc::spawn(cmd, true).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let fin = ended
        .events
        .iter()
        .find(|e| e["event"] == "finished")
        .unwrap_or_else(|| panic!("no finished event: {:?}", ended.events));
    assert_eq!(fin["bytes"], 64 * MIB);

    // --output-dir --vmid: Proxmox's name and its index, nothing else.
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].starts_with("vzdump-qemu-100-") && names[0].ends_with(".vma"),
        "{names:?}"
    );
    assert_eq!(names[1], format!("{}.index", names[0]));
    let archive = out_dir.join(&names[0]);
    assert_eq!(
        fin["archive"].as_str(),
        Some(archive.to_str().unwrap()),
        "{fin}"
    );
    check_archive(&archive, &[("drive-scsi0", 64 * MIB, &src)], dir);
    // The config blob is stored under its file name.
    let listed = stdout_text(&run_ok(&mut vma(["list".as_ref(), archive.as_os_str()])));
    let cfg_line = format!("CFG: size: {} name: qemu-server.conf", conf_text.len());
    assert!(listed.contains(&cfg_line), "{listed}");
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_three_drives_in_one_transaction() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let big = raw_islands(&dir.join("scsi0.raw"), 64 * MIB, 2, 10, 3 * MIB);
    let odd = raw_islands(&dir.join("scsi1.raw"), ODD_SIZE, 3, 6, MIB);
    let qcow = dir.join("virtio0.qcow2");
    let qcow_expected = dir.join("virtio0.expected.raw");
    let t = std::time::Instant::now();
    qcow2_scattered(&qcow, 1 << 30, &qcow_expected);
    eprintln!("sources made in {:?}", t.elapsed());

    let daemon = start_daemon(
        dir,
        &[
            ("scsi0", &big, "raw"),
            ("scsi1", &odd, "raw"),
            ("virtio0", &qcow, "qcow2"),
        ],
    )
    .await;
    let archive = dir.join("three.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args([
            "--drive",
            "scsi0",
            "--drive",
            "scsi1=drive-odd",
            "--drive",
            "virtio0",
            "-o",
        ])
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    eprintln!("backup done in {:?}", ended.elapsed);
    ended.assert_success();
    // The closing summary names the archive.
    assert!(
        ended.stderr.contains(&archive.display().to_string()),
        "{}",
        ended.stderr
    );
    check_archive(
        &archive,
        &[
            ("drive-scsi0", 64 * MIB, &big),
            ("drive-odd", ODD_SIZE, &odd),
            ("drive-virtio0", 1 << 30, &qcow_expected),
        ],
        dir,
    );
    // The daemon still works and holds no job or node of ours.
    let qmp = daemon.connect().await.unwrap();
    support::assert_no_leftovers(&qmp).await;
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// Copy-before-write: the source is exported (writable) by the daemon and
/// written with qemu-io while a throttled backup runs. The archive must
/// hold the image as it was when the backup started (`snapshot`, raw); the
/// source must hold the new data afterwards. `writes` are (pattern,
/// offset, length).
async fn writes_during_backup(
    dir: &Path,
    src: &Path,
    format: &str,
    size: u64,
    snapshot: &Path,
    speed: &str,
    writes: &[(u8, u64, u64)],
) {
    let mut daemon = start_daemon(dir, &[("scsi0", src, format)]).await;
    let sock = daemon.export_nbd("scsi0", "live", true).await.unwrap();
    let uri = format!("nbd+unix:///live?socket={}", sock.display());

    let archive = dir.join("cbw.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--speed", speed, "--json", "-o"])
        .arg(&archive);
    let mut backup = Proc::spawn(cmd, true);
    // Wait until the job has copied something, so the writes land both
    // behind and ahead of the job's position.
    backup
        .next_event(Duration::from_secs(30), |e| {
            support::progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    let cmds: Vec<String> = writes
        .iter()
        .map(|(p, off, len)| format!("write -P {p:#x} {off} {len}"))
        .collect();
    qemu_io(&uri, "raw", &cmds);
    assert!(
        !backup.has_exited(),
        "the backup ended before the writes were done; stderr:\n{}",
        backup.stderr()
    );

    let ended = backup.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    check_archive(&archive, &[("drive-scsi0", size, snapshot)], dir);
    daemon.shutdown().await.unwrap();

    // The source changed: every write is there.
    let reads: Vec<String> = writes
        .iter()
        .map(|(p, off, len)| format!("read -P {p:#x} {off} {len}"))
        .collect();
    qemu_io(src.to_str().unwrap(), format, &reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_backup_leave_point_in_time_image() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 64 * MIB;
    let src = raw_islands(&dir.join("scsi0.raw"), size, 4, 16, 4 * MIB);
    let snapshot = dir.join("snapshot.raw");
    std::fs::copy(&src, &snapshot).unwrap();
    let writes = [
        (0x61, 0, 64 * 1024),
        (0x62, MIB + 12345, 100_000),
        (0x63, 30 * MIB, 64 * 1024),
        (0x64, 40 * MIB - 1000, 3 * CLUSTER as u64),
        (0x65, 50 * MIB + 7, 1),
        (0x66, size - 100_000, 100_000),
    ];
    writes_during_backup(dir, &src, "raw", size, &snapshot, "8M", &writes).await;
    assert_ne!(
        std::fs::read(&src).unwrap(),
        std::fs::read(&snapshot).unwrap()
    );
}

/// The same with a sparse qcow2 source: writes into unallocated clusters,
/// into zero clusters and over data, ahead of and behind the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_backup_of_qcow2() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 128 * MIB;
    let src = dir.join("scsi0.qcow2");
    qemu_img_create(&src, "qcow2", size);
    let setup: Vec<String> = vec![
        "write -P 0x11 0 1M".into(),
        format!("write -P 0x22 {} {}", 60 * MIB + 999, 2 * MIB),
        format!("write -z {} {}", 80 * MIB, 4 * MIB),
        format!("write -P 0x33 {} {}", size - MIB, MIB),
    ];
    qemu_io(src.to_str().unwrap(), "qcow2", &setup);
    let snapshot = dir.join("snapshot.raw");
    qemu_img_to_raw(&src, "qcow2", &snapshot);
    let writes = [
        (0x71, 4096, 8192),                  // over data, behind the job
        (0x72, 40 * MIB + 3, 200_000),       // unallocated
        (0x73, 61 * MIB, 64 * 1024),         // over data
        (0x74, 81 * MIB + 512, 1024 * 1024), // zero clusters
        (0x75, size - 70_000, 70_000),       // over data at the end
    ];
    writes_during_backup(dir, &src, "qcow2", size, &snapshot, "16M", &writes).await;
}

/// A throttled backup whose guest rewrites the whole drive in two goes:
/// QEMU's rate limiter charges the first half's copy-before-write traffic
/// to the job, which then sleeps that debt off (about 16 s at 1 MB/s);
/// meanwhile the second half's copy-before-write archives every remaining
/// cluster. `backup` sees every cluster in, lifts the job's limit (which
/// wakes it: it finds nothing left and ends), says so, and the archive
/// holds the image from before the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_job_ends_once_its_data_is_in() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 32 * MIB;
    let src = dense_random(&dir.join("scsi0.raw"), size, 91);
    let snapshot = dir.join("snapshot.raw");
    std::fs::copy(&src, &snapshot).unwrap();
    let mut daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let sock = daemon.export_nbd("scsi0", "live", true).await.unwrap();
    let uri = format!("nbd+unix:///live?socket={}", sock.display());

    let archive = dir.join("throttled.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--speed", "1M", "--json", "-o"])
        .arg(&archive);
    let mut backup = Proc::spawn(cmd, true);
    backup
        .next_event(Duration::from_secs(30), |e| {
            support::progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
        })
        .await;
    qemu_io(&uri, "raw", &[format!("write -P 0x5a 0 {}", size / 2)]);
    // Long enough for the job to wake from its current chunk's delay and
    // start sleeping off the first half's debt.
    tokio::time::sleep(Duration::from_secs(2)).await;
    qemu_io(
        &uri,
        "raw",
        &[format!("write -P 0x5b {} {}", size / 2, size / 2)],
    );
    let ended = backup.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    assert!(
        ended
            .stderr
            .contains("drive-scsi0: every cluster is in; rate limit lifted"),
        "no note of the lifted limit; stderr:\n{}",
        ended.stderr
    );
    check_archive(&archive, &[("drive-scsi0", size, &snapshot)], dir);
    daemon.shutdown().await.unwrap();
}

/// `backup --json -o -`: the archive streams to stdout (here into a
/// file), the JSON status goes elsewhere, and the stream restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_to_stdout_with_json_status() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = raw_islands(&dir.join("scsi0.raw"), ODD_SIZE, 5, 8, MIB);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let stream = dir.join("stream.vma");
    let mut cmd = vma_async(["backup", "--json", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "-o", "-"])
        .stdout(std::fs::File::create(&stream).unwrap());
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    assert!(
        ended.stderr.contains("\"event\":\"finished\""),
        "no JSON status on stderr: {}",
        ended.stderr
    );
    check_archive(&stream, &[("drive-scsi0", ODD_SIZE, &src)], dir);
    daemon.shutdown().await.unwrap();
}

/// QEMU's blockdev-backup driven by the test into `serve`, with many
/// parallel workers and large chunks (x-perf), two drives in one
/// transaction over one listener: many requests in flight at once, in any
/// order. The archive restores to the sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_backup_into_serve_with_parallel_workers() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = support::dense_random(&dir.join("a.raw"), 24 * MIB, 301);
    let b = raw_islands(&dir.join("b.raw"), ODD_SIZE, 302, 8, MIB);
    let daemon = start_daemon(dir, &[("a", &a, "raw"), ("b", &b, "raw")]).await;
    let archive = dir.join("workers.vma");
    let (serve, at) = ServeCmd::unix(
        dir,
        &[("drive-a", 24 * MIB), ("drive-b", ODD_SIZE)],
        &archive,
    )
    .json()
    .args(["--buffer-limit", "1M"])
    .start()
    .await;
    let sock = at.sock.unwrap();
    let qmp = daemon.connect().await.unwrap();
    let mut events = qmp.subscribe();
    let mut actions = Vec::new();
    for (node, export) in [("a", "drive-a"), ("b", "drive-b")] {
        qmp.blockdev_add_nbd(&format!("tgt-{node}"), sock.as_path(), export)
            .await
            .unwrap();
        actions.push(serde_json::json!({"type": "blockdev-backup", "data": {
            "job-id": format!("job-{node}"), "device": node, "target": format!("tgt-{node}"),
            "sync": "full", "x-perf": {"max-workers": 32, "max-chunk": 4 * MIB}}}));
    }
    qmp.execute(
        "transaction",
        Some(serde_json::json!({ "actions": actions })),
    )
    .await
    .unwrap();
    let ends = events
        .wait_jobs_ended(&["job-a", "job-b"], Duration::from_secs(60))
        .await
        .unwrap();
    for e in &ends {
        assert!(e.is_success(), "{e:?}");
    }
    for node in ["a", "b"] {
        qmp.blockdev_del(&format!("tgt-{node}")).await.unwrap();
    }
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    check_archive(
        &archive,
        &[("drive-a", 24 * MIB, &a), ("drive-b", ODD_SIZE, &b)],
        dir,
    );
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// A Unix-socket proxy between QEMU and serve whose connections the test
/// can cut, to make QEMU's NBD client reconnect mid-backup.
struct CutProxy {
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    fn start(listen: &Path, upstream: &Path) -> CutProxy {
        let listener = tokio::net::UnixListener::bind(listen).unwrap();
        let upstream = upstream.to_path_buf();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c2, a2) = (conns.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let up = upstream.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::UnixStream::connect(&up).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c2.lock().unwrap().push(h.abort_handle());
            }
        });
        CutProxy {
            conns,
            accepted,
            task,
        }
    }

    /// Closes every current connection (both directions).
    fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// QEMU's NBD client loses its connection to serve twice mid-backup and
/// reconnects (`reconnect-delay`), replaying the requests in flight;
/// serve accepts the identical replays and the archive restores to the
/// source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reconnects_mid_backup() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 24 * MIB;
    let src = support::dense_random(&dir.join("scsi0.raw"), size, 311);
    let daemon = start_daemon(dir, &[("scsi0", &src, "raw")]).await;
    let archive = dir.join("reconnect.vma");
    let (mut serve, at) = ServeCmd::unix(dir, &[("drive-scsi0", size)], &archive)
        .json()
        .args(["--reconnect-timeout", "20"])
        .start()
        .await;
    let sock = at.sock.unwrap();
    let proxy_sock = dir.join("proxy.sock");
    let proxy = CutProxy::start(&proxy_sock, &sock);

    let qmp = daemon.connect().await.unwrap();
    let mut events = qmp.subscribe();
    qmp.execute(
        "blockdev-add",
        Some(serde_json::json!({"driver": "nbd", "node-name": "tgt",
            "server": {"type": "unix", "path": proxy_sock.to_str().unwrap()},
            "export": "drive-scsi0", "reconnect-delay": 10})),
    )
    .await
    .unwrap();
    qmp.blockdev_backup_transaction(&[vma_writer::qmp::BackupJob {
        job_id: "job0".into(),
        device: "scsi0".into(),
        target: "tgt".into(),
        speed: Some(4 * MIB),
        filter_node_name: None,
        bitmap: None,
    }])
    .await
    .unwrap();
    let mut last = 0;
    for _ in 0..2 {
        serve
            .next_event(Duration::from_secs(20), |e| {
                support::progress_done(e, "drive-scsi0").is_some_and(|d| d > last)
            })
            .await;
        proxy.cut();
        let before = proxy.accepted();
        // QEMU reconnects on its own.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while proxy.accepted() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "QEMU did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last = serve
            .next_event(Duration::from_secs(20), |e| e["event"] == "progress")
            .await["drives"][0]["done"]
            .as_u64()
            .unwrap();
    }
    let ends = events
        .wait_jobs_ended(&["job0"], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(ends[0].is_success(), "{ends:?}");
    qmp.blockdev_del("tgt").await.unwrap();
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    assert!(proxy.accepted() >= 3, "{} connections", proxy.accepted());
    check_archive(&archive, &[("drive-scsi0", size, &src)], dir);
    drop(qmp);
    daemon.shutdown().await.unwrap();
}

/// `backup --all --zstd --output-dir --vmid`: every image of the daemon
/// (in node-name order), a compressed archive named `.vma.zst`, restored
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_all_drives_zstd() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let odd = raw_islands(&dir.join("b.raw"), ODD_SIZE, 321, 6, MIB);
    let qcow = dir.join("a.qcow2");
    qemu_img_create(&qcow, "qcow2", 32 * MIB);
    qemu_io(
        qcow.to_str().unwrap(),
        "qcow2",
        &[
            "write -P 0x21 1000 300000".into(),
            format!("write -P 0x22 {} 65536", 31 * MIB),
        ],
    );
    let qcow_expected = dir.join("a.expected.raw");
    qemu_img_to_raw(&qcow, "qcow2", &qcow_expected);
    let daemon = start_daemon(dir, &[("scsi1", &odd, "raw"), ("scsi0", &qcow, "qcow2")]).await;
    let out_dir = dir.join("dump");
    std::fs::create_dir(&out_dir).unwrap();
    let mut cmd = vma_async(["backup", "--all", "--zstd", "--vmid", "7", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .arg("--output-dir")
        .arg(&out_dir);
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with("vzdump-qemu-7-") && names[0].ends_with(".vma.zst"),
        "{names:?}"
    );
    let archive = out_dir.join(&names[0]);
    let head = std::fs::read(&archive).unwrap();
    assert_eq!(&head[..4], &[0x28, 0xb5, 0x2f, 0xfd], "not zstd");
    check_archive(
        &archive,
        &[
            ("drive-scsi0", 32 * MIB, &qcow_expected),
            ("drive-scsi1", ODD_SIZE, &odd),
        ],
        dir,
    );
    daemon.shutdown().await.unwrap();
}

/// The oldest QEMU `backup` claims to work with (README): Debian 12's own
/// QEMU 7.2 (no NBD extended headers, an older backup job). `.ci/run`
/// unpacks its qemu-storage-daemon and names it in `VMA_WRITER_QSD_7_2`.
/// A raw and a qcow2 drive, backed up in one transaction, restore byte for
/// byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_from_qemu_7_2() {
    let old = std::env::var_os("VMA_WRITER_QSD_7_2").map(std::path::PathBuf::from);
    let found = old.as_ref().is_some_and(|p| p.is_file());
    if !require_tools(QSD_TOOLS) || !support::require(found, "VMA_WRITER_QSD_7_2 (QEMU 7.2)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = raw_islands(&dir.join("scsi0.raw"), 32 * MIB, 7, 8, 2 * MIB);
    let qcow = dir.join("virtio0.qcow2");
    let qcow_expected = dir.join("virtio0.expected.raw");
    qcow2_scattered(&qcow, 1 << 30, &qcow_expected);
    let mut opts = vma_writer::qemu::DaemonOptions::new(dir.join("run"))
        .image(vma_writer::qemu::Image::new("scsi0", &raw, "raw"))
        .image(vma_writer::qemu::Image::new("virtio0", &qcow, "qcow2"));
    opts.binary = old;
    let daemon = vma_writer::qemu::StorageDaemon::start(opts)
        .await
        .unwrap_or_else(|e| panic!("qemu-storage-daemon 7.2: {e}"));
    let archive = dir.join("old.vma");
    let mut cmd = vma_async(["backup", "--qmp"]);
    cmd.arg(daemon.qmp_socket())
        .args(["--drive", "scsi0", "--drive", "virtio0", "-o"])
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    check_archive(
        &archive,
        &[
            ("drive-scsi0", 32 * MIB, &raw),
            ("drive-virtio0", 1 << 30, &qcow_expected),
        ],
        dir,
    );
    daemon.shutdown().await.unwrap();
}
