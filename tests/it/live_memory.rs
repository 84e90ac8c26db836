//! Memory of a many-drive backup target: one budget for the data of all
//! drives (`serve --memory`, `nbd::MemoryBudget`), however many drives and
//! however deep their clients' queues. Real clients against the binary,
//! and raw clients against the in-process server with a budget smaller
//! than one request.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vma_writer::nbd::wire::{NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_ENOSPC};
use vma_writer::nbd::{MemoryBackend, MemoryBudget, ServerConfig};

use crate::support::{self, *};

const MIB: u64 = 1 << 20;

/// Peak RSS (VmHWM) of process `pid` in bytes, while it runs.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Eight drives, each copied by its own nbdcopy with 64 requests of 1 MiB
/// in flight (512 MiB wanted at once), into `serve --memory 8M`: the
/// archive restores to the sources, and serve's peak RSS stays within the
/// 64 MiB the issue sets for an 8-drive backup. With only a per-connection
/// bound (32 MiB each) the same clients could make it hold 256 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_deep_queued_drives_share_one_budget() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    support::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 32 * MIB;
    let names: Vec<String> = (0..8).map(|i| format!("drive-{i}")).collect();
    let srcs: Vec<PathBuf> = (0..8u64)
        .map(|i| dense_random(&dir.join(format!("{i}.raw")), size, 600 + i))
        .collect();
    let drives: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), size)).collect();
    let archive = dir.join("serve.vma");
    let (serve, at) = ServeCmd::unix(dir, &drives, &archive)
        .args(["--memory", "8M"])
        .json()
        .start()
        .await;

    // VmHWM only grows: sample it until the process is gone.
    let pid = serve.pid();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(p) = peak_rss(pid) {
                    peak.fetch_max(p, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::scope(|s| {
        for (name, src) in names.iter().zip(&srcs) {
            let uri = at.uri(name);
            s.spawn(move || {
                run_ok(
                    Command::new("nbdcopy")
                        .args(["-C", "1", "-T", "1", "--requests=64"])
                        .arg("--request-size=1048576")
                        .arg(src)
                        .arg(uri),
                )
            });
        }
    });
    let ended = serve.wait(RUN_TIMEOUT).await;
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    ended.assert_success();
    let expect: Vec<(&str, u64, &std::path::Path)> = names
        .iter()
        .zip(&srcs)
        .map(|(n, s)| (n.as_str(), size, s.as_path()))
        .collect();
    check_archive(&archive, &expect, dir);
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak > 0, "no RSS sample of serve");
    assert!(
        peak <= 64 * MIB,
        "serve --memory 8M peaked at {} MiB RSS with 8 drives",
        peak / MIB
    );
}

/// A budget smaller than one request, shared by 100 connections that each
/// pipeline large WRITEs (larger than the budget), WRITEs past the end
/// (refused and drained) and WRITE_ZEROES without reading replies until
/// all are sent: every request is answered, with the right errno, the data
/// arrives, and the budget never held more than its size and ends empty.
#[test]
fn a_tiny_budget_serves_many_pipelining_connections() {
    const CONNS: u64 = 100;
    const WRITES: u64 = 6;
    const LEN: u64 = 256 * 1024;
    let size = CONNS * WRITES * LEN;
    let budget = MemoryBudget::new(64 * 1024);
    let config = ServerConfig {
        memory: Some(budget.clone()),
        ..Default::default()
    };
    let srv = TestServer::start_with(vec![("d", MemoryBackend::new(size))], config);
    let sock = srv.sock.clone();
    let clients: Vec<_> = (0..CONNS)
        .map(|c| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut cl = RawClient::connect(&sock);
                cl.s.set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                cl.s.set_write_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                cl.handshake("d", false, false);
                let mut want = Vec::new();
                for w in 0..WRITES {
                    let off = (c * WRITES + w) * LEN;
                    let data = vec![(c * WRITES + w) as u8 | 1; LEN as usize];
                    let cookie = 3 * w + 1;
                    cl.send_request(&req(NBD_CMD_WRITE, 0, cookie, off, LEN), false, &data)
                        .unwrap();
                    want.push((cookie, 0));
                    // Past the end: refused with ENOSPC, payload drained.
                    cl.send_request(&req(NBD_CMD_WRITE, 0, cookie + 1, size, LEN), false, &data)
                        .unwrap();
                    want.push((cookie + 1, NBD_ENOSPC.0));
                    cl.send_request(
                        &req(NBD_CMD_WRITE_ZEROES, 0, cookie + 2, off, 0),
                        false,
                        &[],
                    )
                    .unwrap();
                    want.push((cookie + 2, 0));
                }
                let mut got: Vec<(u64, u32)> = (0..want.len())
                    .map(|_| {
                        let r = cl.read_reply(0).expect("every request is answered");
                        (r.cookie(), r.errno())
                    })
                    .collect();
                got.sort();
                want.sort();
                assert_eq!(got, want, "connection {c}");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let contents = srv.backends[0].contents();
    for (i, chunk) in contents.chunks(LEN as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 | 1), "write {i} lost");
    }
    assert!(budget.peak() <= 64 * 1024, "peak {}", budget.peak());
    assert_eq!((budget.in_use(), budget.users()), (0, 0));
    assert_eq!(srv.panics(), 0);
    srv.stop();
}

/// A client that announces a WRITE and trickles its payload holds the
/// shared budget only until the payload deadline: then its connection is
/// closed, and another connection's WRITE, waiting for the budget
/// meanwhile, is served.
#[test]
fn a_trickled_payload_loses_its_budget_at_the_deadline() {
    let budget = MemoryBudget::new(1 << 20);
    let config = ServerConfig {
        memory: Some(budget.clone()),
        payload_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let srv = TestServer::start_with(vec![("d", MemoryBackend::new(4 * MIB))], config);
    let mut slow = RawClient::connect(&srv.sock);
    slow.handshake("d", false, false);
    slow.send_request(&req(NBD_CMD_WRITE, 0, 1, 0, MIB), false, &[7; 10])
        .unwrap();
    let mut good = RawClient::connect(&srv.sock);
    good.handshake("d", false, false);
    good.send_request(&req(NBD_CMD_WRITE, 0, 2, MIB, 65536), false, &[9; 65536])
        .unwrap();
    let r = good
        .read_reply(0)
        .expect("served once the slow one is gone");
    assert_eq!((r.cookie(), r.errno()), (2, 0));
    assert!(slow.is_closed(), "the trickling client was disconnected");
    assert!(
        srv.backends[0].contents()[MIB as usize..][..65536]
            .iter()
            .all(|&b| b == 9)
    );
    assert_eq!(budget.in_use(), 0);
    assert_eq!(srv.panics(), 0);
    srv.stop();
}
