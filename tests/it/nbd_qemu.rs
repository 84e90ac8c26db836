//! The NBD server against QEMU's clients: qemu-img, qemu-io and a live
//! `blockdev-backup` from qemu-storage-daemon. QEMU 10 negotiates extended
//! headers, so these also cover extended requests and replies.

use std::process::Command;
use std::sync::atomic::Ordering;

use crate::support::*;
use std::time::Duration;

use vma_writer::nbd::{Backend, MemoryBackend};
use vma_writer::qmp::BackupJob;

const MIB: u64 = 1 << 20;

fn qemu_img_convert_and_compare(size: u64, islands: &[(u64, u64)], dense: bool) {
    let srv = TestServer::start(vec![("disk0", Counting::new(MemoryBackend::new(size)))]);
    let src = srv.dir.path().join("src.raw");
    let want = if dense {
        let data = random_data(size as usize, 7);
        std::fs::write(&src, &data).unwrap();
        data
    } else {
        sparse_image_contents(&src, size, islands, 1)
    };
    let uri = srv.uri("disk0");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"));
    let b = &srv.backends[0];
    b.wait_disconnects(2);
    assert_same(&b.inner.contents(), &want, "qemu-img convert");
    assert_eq!(b.connects.load(Ordering::SeqCst), 2);
    assert_eq!(b.clean_disconnects.load(Ordering::SeqCst), 2);
    assert!(
        b.flushes.load(Ordering::SeqCst) >= 1,
        "qemu-img convert flushes at the end"
    );
    srv.stop();
}

#[test]
fn qemu_img_convert_dense() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    qemu_img_convert_and_compare(24 * MIB + 512, &[], true);
}

#[test]
fn qemu_img_convert_sparse() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    qemu_img_convert_and_compare(
        64 * MIB,
        &[
            (0, 4096),
            (MIB + 100, 3 * MIB),
            (40 * MIB, 1),
            (64 * MIB - 4096, 4096),
        ],
        false,
    );
}

#[test]
fn qemu_img_map_reports_holes_and_data() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    let srv = TestServer::start(vec![("", MemoryBackend::new(16 * MIB))]);
    let b = &srv.backends[0];
    srv.rt.block_on(async {
        b.write(2 * MIB, vec![1u8; MIB as usize].into())
            .await
            .unwrap();
        b.write_zeroes(8 * MIB, MIB, false).await.unwrap();
    });
    let out = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(srv.uri("")),
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries: Vec<(u64, u64, bool, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (0, 2 * MIB, false, true),
            (2 * MIB, MIB, true, false),
            (3 * MIB, 5 * MIB, false, true),
            (8 * MIB, MIB, true, true),
            (9 * MIB, 7 * MIB, false, true),
        ],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn qemu_io_write_read_zero_discard_flush() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let size = 8 * MIB;
    let srv = TestServer::start(vec![("d", Counting::new(MemoryBackend::new(size)))]);
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(srv.uri("d"))
            .args(["-c", "write -P 0xab 0 1M"])
            .args(["-c", "write -P 0xcd 1M 1M"])
            .args(["-c", "write -P 0xef 3M 12345"])
            .args(["-c", "write -z 1M 64k"])
            .args(["-c", "write -z -u 1536k 4k"])
            .args(["-c", "discard 0 512k"])
            .args(["-c", "read -P 0xcd 1088k 448k"])
            .args(["-c", "read -P 0 1M 64k"])
            .args(["-c", "read -P 0xef 3M 12345"])
            .args(["-c", "flush"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let b = &srv.backends[0];
    b.wait_disconnects(1);
    // qemu-io writes through: every write and zero carried FUA, each
    // answered with a backend flush, plus the explicit flush.
    assert!(
        b.flushes.load(Ordering::SeqCst) >= 6,
        "flushes: {}",
        b.flushes.load(Ordering::SeqCst)
    );
    let c = b.inner.contents();
    // The discard may or may not have dropped data; the rest is exact.
    assert!(c[512 * 1024..MIB as usize].iter().all(|&x| x == 0xab));
    assert!(
        c[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|&x| x == 0)
    );
    assert!(
        c[(MIB + 65536) as usize..1536 * 1024]
            .iter()
            .all(|&x| x == 0xcd)
    );
    assert!(c[1536 * 1024..1540 * 1024].iter().all(|&x| x == 0));
    assert!(c[1540 * 1024..2 * MIB as usize].iter().all(|&x| x == 0xcd));
    assert!(
        c[3 * MIB as usize..3 * MIB as usize + 12345]
            .iter()
            .all(|&x| x == 0xef)
    );
    assert!(c[3 * MIB as usize + 12345..].iter().all(|&x| x == 0));
}

fn live_backup(size: u64, islands: &[(u64, u64)]) {
    if !require_tools(&["qemu-storage-daemon"]) {
        return;
    }
    let srv = TestServer::start(vec![("drive0", Counting::new(MemoryBackend::new(size)))]);
    let src = srv.dir.path().join("src.raw");
    let want = sparse_image_contents(&src, size, islands, 1);
    let b = &srv.backends[0];
    srv.rt.block_on(async {
        let qsd = start_daemon(srv.dir.path(), &[("drive0", &src, "raw")]).await;
        let q = qsd.connect().await.unwrap();
        q.blockdev_add_nbd("tgt0", &srv.sock, "drive0")
            .await
            .unwrap();
        assert_eq!(b.connects.load(Ordering::SeqCst), 1);
        let mut events = q.subscribe();
        q.blockdev_backup_transaction(&[BackupJob {
            job_id: "backup0".into(),
            device: "drive0".into(),
            target: "tgt0".into(),
            speed: None,
            filter_node_name: None,
            bitmap: None,
        }])
        .await
        .unwrap();
        let end = events
            .wait_jobs_ended(&["backup0"], Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        assert!(end.is_success(), "backup failed: {end:?}");
        assert_eq!(end.end.offset, end.end.len, "{end:?}");
        q.blockdev_del("tgt0").await.unwrap();
        drop(q);
        qsd.shutdown().await.unwrap();
    });
    b.wait_disconnects(1);
    assert_eq!(
        b.clean_disconnects.load(Ordering::SeqCst),
        1,
        "QEMU ends with DISC"
    );
    assert!(
        b.flushes.load(Ordering::SeqCst) >= 1,
        "QEMU flushes before DISC"
    );
    assert_same(&b.inner.contents(), &want, "backup");
    srv.stop();
}

#[test]
fn qemu_backup_sparse_64m() {
    live_backup(
        64 * MIB,
        &[
            (0, 65536),
            (5 * MIB, 3 * MIB),
            (33 * MIB + 4096, 4096),
            (63 * MIB, MIB),
        ],
    );
}

#[test]
fn qemu_backup_odd_size() {
    // 10 MiB + 1536 B: the last request ends mid-cluster at the disk end.
    let size = 10 * MIB + 1536;
    live_backup(size, &[(MIB, 2 * MIB), (size - 3000, 3000)]);
}
