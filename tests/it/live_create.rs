//! `create` with non-raw images (the live path through a private
//! qemu-storage-daemon) and `demo`, checked from outside: archives are
//! listed, verified, extracted and compared byte for byte with their
//! sources; no process outlives the command, also after Ctrl-C.

use std::time::Duration;

use crate::support::{self, *};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_qcow2_and_raw_through_qemu() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let qcow = dir.join("virtio0.qcow2");
    let qcow_expected = dir.join("virtio0.expected.raw");
    qcow2_scattered(&qcow, 1 << 30, &qcow_expected);
    let raw = raw_islands(&dir.join("scsi0.raw"), ODD_SIZE, 201, 6, MIB);
    let conf = dir.join("qemu-server.conf");
    std::fs::write(&conf, "memory: 1024\n").unwrap();
    let archive = dir.join("created.vma");
    let mut cmd = vma_async(["create", "-c"]);
    cmd.arg(&conf)
        .arg("-d")
        .arg(format!("format=qcow2:drive-virtio0={}", qcow.display()))
        .arg("-d")
        .arg(format!("drive-scsi0={}", raw.display()))
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    check_archive(
        &archive,
        &[
            ("drive-virtio0", 1 << 30, &qcow_expected),
            ("drive-scsi0", ODD_SIZE, &raw),
        ],
        dir,
    );
    // The sources are untouched and no daemon is left.
    assert_no_process_mentions(qcow.to_str().unwrap(), Duration::from_secs(5));
    assert!(images_equal(
        qcow.to_str().unwrap(),
        "qcow2",
        qcow_expected.to_str().unwrap(),
        "raw"
    ));
}

/// Runs `create -d format=qcow2:drive-virtio0=IMAGE` for a bad image:
/// it must fail (exit 1) naming the drive, never QEMU's internal node name
/// (`vmaw0`), and write no archive and leave no daemon. Returns stderr.
async fn create_bad_qcow2(dir: &std::path::Path, image: &std::path::Path) -> String {
    let archive = dir.join("bad.vma");
    let mut cmd = vma_async(["create", "-d"]);
    cmd.arg(format!("format=qcow2:drive-virtio0={}", image.display()))
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_exit(1, &["vma-writer: error: ", "drive 'drive-virtio0'"]);
    assert!(
        !ended.stderr.contains("vmaw"),
        "an internal node name leaks: {}",
        ended.stderr
    );
    assert_no_archive(&archive, false);
    assert_no_process_mentions(image.to_str().unwrap(), Duration::from_secs(5));
    ended.stderr
}

/// A qcow2 that does not exist: create fails naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_through_qemu_refuses_missing_image() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("missing.qcow2");
    let stderr = create_bad_qcow2(tmp.path(), &image).await;
    assert!(
        stderr.contains(&format!(
            "cannot open image {}: No such file or directory",
            image.display()
        )),
        "image not named: {stderr}"
    );
}

/// A "qcow2" that is a raw file: create fails, and the message says which
/// drive and image QEMU could not open (and QEMU's reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_through_qemu_names_image_of_wrong_format() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = raw_islands(&tmp.path().join("plain.raw"), MIB, 202, 2, 4096);
    let stderr = create_bad_qcow2(tmp.path(), &image).await;
    assert!(
        stderr.contains("plain.raw") && stderr.contains("qemu-storage-daemon cannot open"),
        "image not named: {stderr}"
    );
}

/// A raw image whose size is not a multiple of 512 next to a qcow2: all of
/// it goes through QEMU, which counts whole sectors, and the archive
/// records the size rounded up, as raw-only `create` and Proxmox's `vma
/// create` do; the restore is the source followed by zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rounds_an_odd_raw_size_next_to_qcow2() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let raw = dir.join("odd.raw");
    std::fs::write(&raw, [0x42u8; 1000]).unwrap();
    let qcow = dir.join("small.qcow2");
    qemu_img_create(&qcow, "qcow2", MIB);
    let archive = dir.join("mixed.vma");
    let mut cmd = vma_async(["create", "-d"]);
    cmd.arg(format!("format=qcow2:drive-virtio0={}", qcow.display()))
        .arg("-d")
        .arg(format!("drive-scsi0={}", raw.display()))
        .arg(&archive);
    let ended = Proc::spawn(cmd, false).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let devs = support::list_devices(&archive);
    assert_eq!(
        devs,
        [
            ("drive-virtio0".to_string(), MIB),
            ("drive-scsi0".to_string(), 1024)
        ]
    );
    let restored = support::extract(&archive, dir);
    let mut want = vec![0x42u8; 1000];
    want.resize(1024, 0);
    support::assert_file_is(&support::restored(&restored, "drive-scsi0"), &want);
}

/// `demo` end to end, checked independently: its archive restores to the
/// untouched second drive exactly, and to the first drive as it was
/// before the guest's 1 MiB write at 48 MiB (the only bytes where the
/// restored image and today's source differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_its_archive_restores() {
    if !require_tools(&["qemu-storage-daemon"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("demo");
    let mut cmd = vma_async(["demo", "--dir"]);
    cmd.arg(&work);
    // Capture stdout (its narrative) as lines.
    let ended = Proc::spawn(cmd, true).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let stdout: Vec<&str> = ended.events.iter().filter_map(|e| e.as_str()).collect();
    let archives: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vma"))
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    let archive = &archives[0];
    let says_where = stdout.iter().any(|l| l.contains(archive.to_str().unwrap()))
        || ended.stderr.contains(archive.to_str().unwrap());
    assert!(
        says_where,
        "demo does not say where the archive is: {stdout:?} {}",
        ended.stderr
    );
    support::verify_ok(archive);
    let devs = support::list_devices(archive);
    let names: Vec<&str> = devs.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(names, ["drive-scsi0", "drive-scsi1"]);
    let restored = support::extract(archive, tmp.path());
    support::assert_same_file(
        &support::restored(&restored, "drive-scsi1"),
        &work.join("scsi1.raw"),
    );
    let now = std::fs::read(work.join("scsi0.raw")).unwrap();
    let back = std::fs::read(support::restored(&restored, "drive-scsi0")).unwrap();
    assert_eq!(now.len(), back.len());
    let (a, b) = ((48 * MIB) as usize, (49 * MIB) as usize);
    assert!(now[a..b].iter().all(|&x| x == 0x77), "guest write missing");
    assert_ne!(
        &back[a..b],
        &now[a..b],
        "the archive holds the guest's write"
    );
    assert_eq!(&back[..a], &now[..a]);
    assert_eq!(&back[b..], &now[b..]);
    assert_no_process_mentions(work.to_str().unwrap(), Duration::from_secs(5));
}

/// `demo --json`: every stdout line is JSON, as for serve and backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_json_stdout_is_json_lines() {
    if !require_tools(&["qemu-storage-daemon"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = vma_async(["demo", "--json", "--dir"]);
    cmd.arg(tmp.path().join("demo"));
    let ended = Proc::spawn(cmd, true).wait(RUN_TIMEOUT).await;
    ended.assert_success();
    let text: Vec<&str> = ended.events.iter().filter_map(|e| e.as_str()).collect();
    assert!(text.is_empty(), "non-JSON lines on stdout: {text:?}");
    assert!(ended.events.iter().any(|e| e["event"] == "finished"));
}

/// Ctrl-C during demo's (slowed) backup: demo exits 130 saying so, leaves
/// no archive and no qemu-storage-daemon behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_ctrl_c_cleans_up() {
    if !require_tools(&["qemu-storage-daemon"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("demo");
    let mut cmd = vma_async(["demo", "--json", "--speed", "1M", "--dir"]);
    cmd.arg(&work);
    let mut demo = Proc::spawn(cmd, true);
    demo.next_event(Duration::from_secs(30), |e| {
        e["event"] == "progress"
            && e["drives"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["done"].as_u64() > Some(0)))
    })
    .await;
    assert!(
        !support::processes_mentioning(work.to_str().unwrap()).is_empty(),
        "no daemon running mid-demo"
    );
    demo.signal(libc::SIGINT);
    let ended = demo.wait(Duration::from_secs(30)).await;
    ended.assert_exit(
        130,
        &[
            "backup failed: stopped by SIGINT before the archive was complete",
            "demo failed: the backup did not complete",
        ],
    );
    assert_no_process_mentions(work.to_str().unwrap(), Duration::from_secs(5));
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".vma"))
        .collect();
    assert!(left.is_empty(), "archive files left: {left:?}");
}
