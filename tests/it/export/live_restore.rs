//! `vma-writer live-restore` with qemu-storage-daemon standing in for the
//! VM: the overlays are `blockdev-add`ed into it and exported over its own
//! NBD server, as a guest's disks. Reads while the streams run see the
//! backup, writes while they run survive, the result equals backup plus
//! writes, and the overlays have no backing file afterwards. A restore
//! whose export is killed resumes when `live-restore` is run again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vma_writer::qmp::Qmp;

use super::{Archives, archives};
use crate::support::*;

/// A drive that takes seconds to stream at 1 MiB/s (three quarters of it
/// hold data), and a small one.
const DRIVES: &[(&str, u64, u64)] = &[
    ("drive-scsi0", 12 * MIB + 1536, 21),
    ("drive-efidisk0", 528 * 1024, 22),
];

/// How long a whole restore may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// `vma-writer live-restore ARCHIVE --qmp QMP --dir DIR --json ARGS`.
fn live_restore(archive: &Path, qmp: &Path, dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = vma_async(["live-restore"]);
    cmd.arg(archive)
        .arg("--qmp")
        .arg(qmp)
        .arg("--dir")
        .arg(dir)
        .arg("--json")
        .args(args);
    Proc::spawn(cmd, true)
}

/// Whether QEMU still runs the stream job of `drive`.
async fn streaming(spare: &Path, drive: &str) -> bool {
    let qmp = Qmp::connect(spare).await.unwrap();
    let jobs = qmp.query_block_jobs().await.unwrap();
    jobs.iter()
        .any(|j| j.device == format!("vmaw-restore-{drive}"))
}

/// The backing file QEMU has for node `node`.
async fn backing(spare: &Path, node: &str) -> Option<String> {
    let qmp = Qmp::connect(spare).await.unwrap();
    let nodes = qmp.query_named_block_nodes().await.unwrap();
    nodes
        .into_iter()
        .find(|n| n.node_name == node)
        .unwrap_or_else(|| panic!("no node {node}"))
        .backing_file
}

/// Copies the whole drive behind `uri` into `to`, through nbdcopy.
fn copy_out(uri: &str, to: &Path) -> PathBuf {
    let _ = std::fs::remove_file(to);
    run_ok(Command::new("nbdcopy").arg(uri).arg(to));
    to.to_path_buf()
}

/// The expected image of a drive: what `extract` wrote, with `writes`
/// (pattern, offset, length) applied.
fn expected_with(a: &Archives, name: &str, writes: &[(u8, u64, u64)], to: &Path) -> PathBuf {
    let mut data = std::fs::read(a.expected(name)).unwrap();
    for &(p, off, len) in writes {
        data[off as usize..(off + len) as usize].fill(p);
    }
    std::fs::write(to, data).unwrap();
    to.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_from_its_backup_while_it_streams() {
    if !require_tools(&[QSD_TOOLS, &["nbdcopy"]].concat()) {
        return;
    }
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "lr", DRIVES);
    let mut qsd = start_daemon::<&Path>(dir, &[]).await;
    let spare = qsd.spare_qmp_socket().to_path_buf();
    let restore_dir = dir.join("restore");
    // Slow enough that the stream still runs after the reads and writes
    // below on a busy machine; lifted once they are done.
    let mut lr = live_restore(&a.zst, qsd.qmp_socket(), &restore_dir, &["--speed", "256K"]);
    let ready = lr
        .next_event(LISTEN_TIMEOUT, |e| e["event"] == "ready")
        .await;
    assert_eq!(ready["drives"][0]["created"], true);
    let attached = lr
        .next_event(LISTEN_TIMEOUT, |e| e["event"] == "attached")
        .await;
    assert_eq!(attached["drives"][0]["node"], "drive-scsi0");
    assert_eq!(attached["drives"][0]["added"], true);

    // The overlays as the guest's disks.
    let mut uris = Vec::new();
    for (name, _) in &a.drives {
        let sock = qsd.export_nbd(name, name, true).await.unwrap();
        uris.push(nbd_uri(&sock, name));
    }
    assert!(
        streaming(&spare, "drive-scsi0").await,
        "the stream ended too soon to test"
    );
    // Reads during the stream see the backup.
    for ((name, _), uri) in a.drives.iter().zip(&uris) {
        let got = copy_out(uri, &dir.join(format!("during-{name}.raw")));
        assert_same_file(&got, &a.expected(name));
    }
    // Writes during the stream: into clusters not streamed yet (near the
    // end), unaligned across clusters, and zeroes over data.
    let writes = [
        (0x5a, 12 * MIB - 4096, 4096),
        (0xa5, 100_000, 70_000),
        (0x00, 6 * MIB, 65536),
    ];
    qemu_io(
        &uris[0],
        "raw",
        &writes
            .iter()
            .map(|&(p, off, len)| {
                if p == 0 {
                    format!("write -z {off} {len}")
                } else {
                    format!("write -P {p:#x} {off} {len}")
                }
            })
            .collect::<Vec<_>>(),
    );
    assert!(
        streaming(&spare, "drive-scsi0").await,
        "the stream ended before the writes were done"
    );
    assert!(backing(&spare, "drive-scsi0").await.is_some());
    // Done with the stream's middle: the rest at full speed.
    let qmp = Qmp::connect(&spare).await.unwrap();
    for j in qmp.query_block_jobs().await.unwrap() {
        if j.device.starts_with("vmaw-restore-") {
            // A job may end in between.
            let _ = qmp.block_job_set_speed(&j.device, 0).await;
        }
    }
    drop(qmp);

    let ended = lr.wait(RESTORE_TIMEOUT).await;
    ended.assert_success();
    let fin = ended
        .events
        .iter()
        .find(|e| e["event"] == "finished")
        .unwrap_or_else(|| panic!("no finished event: {:?}", ended.events));
    assert_eq!(fin["drives"].as_array().unwrap().len(), 2);
    assert!(
        !restore_dir.join("nbd.sock").exists(),
        "the export's socket is left"
    );

    // Backup plus writes, and no backing file, seen through QEMU...
    let want = expected_with(&a, "drive-scsi0", &writes, &dir.join("want.raw"));
    for (i, (name, _)) in a.drives.iter().enumerate() {
        assert_eq!(backing(&spare, name).await, None, "{name}");
        let got = copy_out(&uris[i], &dir.join(format!("after-{name}.raw")));
        let want = if i == 0 {
            want.clone()
        } else {
            a.expected(name)
        };
        assert_same_file(&got, &want);
    }
    // ... and in the files, once QEMU has closed them.
    qsd.shutdown().await.unwrap();
    for (i, (name, _)) in a.drives.iter().enumerate() {
        let overlay = restore_dir.join(format!("disk-{name}.qcow2"));
        assert_eq!(vma_writer::qemu_img::backing_file(&overlay).unwrap(), None);
        let want = if i == 0 {
            want.clone()
        } else {
            a.expected(name)
        };
        assert!(
            images_equal(
                overlay.to_str().unwrap(),
                "qcow2",
                want.to_str().unwrap(),
                "raw"
            ),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_resumes_after_its_export_was_killed() {
    if !require_tools(QSD_TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = archives(dir, "resume", &DRIVES[..1]);
    let qsd = start_daemon::<&Path>(dir, &[]).await;
    let restore_dir = dir.join("restore");
    let args = ["--speed", "2M"];
    let mut lr = live_restore(&a.indexed, qsd.qmp_socket(), &restore_dir, &args);
    lr.next_event(RESTORE_TIMEOUT, |e| {
        progress_done(e, "drive-scsi0").is_some_and(|d| d > 0)
    })
    .await;
    lr.signal(libc::SIGKILL);
    lr.wait(Duration::from_secs(10)).await;
    // Again, with the same directory: the overlay (and the job QEMU kept
    // running, waiting for the export to come back) are taken up.
    let mut lr = live_restore(&a.indexed, qsd.qmp_socket(), &restore_dir, &args);
    let ready = lr
        .next_event(LISTEN_TIMEOUT, |e| e["event"] == "ready")
        .await;
    assert_eq!(ready["drives"][0]["created"], false);
    let attached = lr
        .next_event(LISTEN_TIMEOUT, |e| e["event"] == "attached")
        .await;
    assert_eq!(attached["drives"][0]["added"], false);
    lr.wait(RESTORE_TIMEOUT).await.assert_success();
    qsd.shutdown().await.unwrap();
    let overlay = restore_dir.join("disk-drive-scsi0.qcow2");
    assert_eq!(vma_writer::qemu_img::backing_file(&overlay).unwrap(), None);
    let want = a.expected("drive-scsi0");
    assert!(images_equal(
        overlay.to_str().unwrap(),
        "qcow2",
        want.to_str().unwrap(),
        "raw"
    ));
}
