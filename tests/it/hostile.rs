//! Hostile peers against a real `vma-writer serve` over its real socket,
//! while a good backup runs beside them. Every hostile case must end in a
//! clear error or a disconnect, without a panic and without the server's
//! memory growing with what the peer claims or sends; the good backup
//! must still complete, and its archive verify, extract and compare equal
//! to its sources.
//!
//! What each case gets today:
//! - slowloris handshakes (a byte a second): closed at the 10 s handshake
//!   deadline (`HANDSHAKE_TIMEOUT`).
//! - more connections than `MAX_CONNECTIONS` (128): the extra ones wait in
//!   the listen backlog, unserved, until slots free up; then they are
//!   served (and idle ones closed at the deadline).
//! - an export that does not exist: `NBD_REP_ERR_UNKNOWN` to GO and INFO
//!   (the option phase goes on), a closed connection for EXPORT_NAME
//!   (which cannot carry an error).
//! - a WRITE header claiming 4 GiB: closed at once, nothing read or
//!   allocated for it (above `MAX_DRAIN`, 128 MiB, a refused payload is
//!   not drained).
//! - 10 000 requests in flight: all answered; the server stops reading
//!   while the connection's byte budget (64 MiB) is used up.
//! - a client that never reads its replies: the server stops reading its
//!   requests once the budget is used, holds at most that, and frees it
//!   when the client goes.
//! - requests after DISC: not read; what came before DISC is answered,
//!   then the connection is closed.
//! - reused cookies, in flight at once: each request is answered, with its
//!   cookie (the server does not track them; the client must).
//! - garbage between requests: a framing fault, the connection is closed.
//! - a second client writing to a drive while its backup runs: allowed
//!   (multi-conn), but a write that changes an archived cluster gets EIO
//!   and fails the backup (`a_second_writer_that_changes_archived_data_fails_the_backup`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use vma_writer::nbd::wire::*;
use vma_writer::nbd::{HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};

/// The drive the good backup writes, slowly enough to overlap every case.
const GOOD_SIZE: u64 = 32 * MIB;
/// The drive the hostile clients talk to; filled by a good client at the
/// end.
const VICTIM_SIZE: u64 = 8 * MIB;

/// A connected client that has done a full handshake on `export`.
fn client(sock: &Path, export: &str, extended: bool) -> RawClient {
    let mut c = RawClient::connect(sock);
    c.handshake(export, extended, extended);
    c
}

/// Whether the server closed `s` within `within` (EOF or reset), after
/// discarding whatever it still sent; returns the bytes discarded.
fn closed_within(s: &mut UnixStream, within: Duration) -> Option<usize> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 65536];
    let mut got = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

/// Peak RSS of the server so far, in MiB.
fn hwm_mib(pid: u32) -> u64 {
    vm_hwm_kib(pid).expect("serve is running") >> 10
}

/// Slowloris: `n` connections send a valid handshake one byte a second.
/// Returns how long after connecting each was closed.
fn slowloris(sock: &Path, n: usize) -> Vec<Duration> {
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend(option_bytes(NBD_OPT_GO.0, &go_payload("victim", &[])));
    let start = Instant::now();
    let mut conns: Vec<Option<UnixStream>> = (0..n)
        .map(|_| Some(UnixStream::connect(sock).expect("connect")))
        .collect();
    let mut closed = vec![None; n];
    for i in 0..bytes.len() * 2 {
        for (k, slot) in conns.iter_mut().enumerate() {
            let Some(s) = slot else { continue };
            let b = bytes[i.min(bytes.len() - 1)];
            if s.write_all(&[b]).is_err() {
                closed[k] = Some(start.elapsed());
                *slot = None;
            }
        }
        if conns.iter().all(Option::is_none) {
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    closed
        .into_iter()
        .map(|c| c.expect("a slowloris connection was never closed"))
        .collect()
}

/// Connections beyond the limit: opens `n` idle connections and counts
/// how many got a greeting within `wait`; keeps them open until `release`.
fn over_the_limit(sock: &Path, n: usize, wait: Duration) -> (usize, Vec<UnixStream>) {
    let conns: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(sock).expect("connect"))
        .collect();
    thread::sleep(wait);
    let mut greeted = 0;
    for s in &conns {
        s.set_nonblocking(true).unwrap();
        let mut g = [0u8; 18];
        if let Ok(18) = (&*s).read(&mut g) {
            assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
            greeted += 1;
        }
        s.set_nonblocking(false).unwrap();
    }
    (greeted, conns)
}

fn unknown_export(sock: &Path) {
    let mut c = RawClient::connect(sock);
    c.start(3);
    for opt in [NBD_OPT_GO, NBD_OPT_INFO] {
        c.send_option(opt.0, &go_payload("no-such-drive", &[]));
        let r = c.read_option_replies();
        assert_eq!(r.last().unwrap().1, NBD_REP_ERR_UNKNOWN.0, "{opt:?}");
    }
    c.send_option(NBD_OPT_EXPORT_NAME.0, b"no-such-drive");
    assert!(c.is_closed(), "EXPORT_NAME of an unknown export kept open");
}

fn huge_write_headers(sock: &Path) {
    for extended in [false, true] {
        let mut c = client(sock, "victim", extended);
        let (flags, len) = if extended {
            (NBD_CMD_FLAG_PAYLOAD_LEN, 4u64 << 30)
        } else {
            (0, u64::from(u32::MAX))
        };
        let t = Instant::now();
        c.send_request(&req(NBD_CMD_WRITE, flags, 1, 0, len), extended, &[7; 4096])
            .unwrap();
        let got = closed_within(&mut c.s, Duration::from_secs(10));
        assert_eq!(got, Some(0), "4 GiB WRITE: not closed, or answered");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}

/// 10 000 READs pipelined by one thread while another reads the replies.
fn ten_thousand_in_flight(sock: &Path) {
    const N: u64 = 10_000;
    let mut c = client(sock, "victim", false);
    let mut w = c.s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let mut batch = Vec::new();
        for cookie in 0..N {
            let off = (cookie * 4096) % VICTIM_SIZE;
            batch.extend(encode_request(
                &req(NBD_CMD_READ, 0, cookie, off, 4096),
                false,
            ));
        }
        w.write_all(&batch).unwrap();
    });
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let r = c.read_reply(4096).expect("reply");
        assert_eq!(r.errno(), 0);
        assert!(!std::mem::replace(&mut seen[r.cookie() as usize], true));
    }
    sender.join().unwrap();
    c.send_request(&req(NBD_CMD_DISC, 0, 0, 0, 0), false, &[])
        .unwrap();
    assert!(c.is_closed());
}

/// Sends 2000 READs of 1 MiB and never reads a reply; returns the
/// connection (still open) and the sending thread.
fn never_reads(sock: &Path) -> (RawClient, thread::JoinHandle<()>) {
    let c = client(sock, "victim", false);
    let mut w = c.s.try_clone().unwrap();
    w.set_write_timeout(None).unwrap();
    let sender = thread::spawn(move || {
        for cookie in 0..2000u64 {
            let off = (cookie * MIB) % VICTIM_SIZE;
            let r = req(NBD_CMD_READ, 0, cookie, off, MIB);
            // Blocks once the server stops reading; fails once we hang up.
            if w.write_all(&encode_request(&r, false)).is_err() {
                return;
            }
        }
    });
    (c, sender)
}

fn after_disc_cookies_and_garbage(sock: &Path) {
    // READ, DISC, READ: one reply, then the connection is closed.
    let mut c = client(sock, "victim", false);
    let mut b = encode_request(&req(NBD_CMD_READ, 0, 1, 0, 512), false);
    b.extend(encode_request(&req(NBD_CMD_DISC, 0, 2, 0, 0), false));
    b.extend(encode_request(&req(NBD_CMD_READ, 0, 3, 0, 512), false));
    b.extend(encode_request(&req(NBD_CMD_FLUSH, 0, 4, 0, 0), false));
    c.send(&b).unwrap();
    let r = c.read_reply(512).unwrap();
    assert_eq!((r.cookie(), r.errno()), (1, 0));
    assert_eq!(
        closed_within(&mut c.s, Duration::from_secs(10)),
        Some(0),
        "requests after DISC were answered"
    );

    // 500 READs with one cookie, in flight at once: 500 replies.
    let mut c = client(sock, "victim", true);
    let mut b = Vec::new();
    for i in 0..500u64 {
        b.extend(encode_request(
            &req(NBD_CMD_READ, 0, 7, i * 4096, 4096),
            true,
        ));
    }
    c.send(&b).unwrap();
    for _ in 0..500 {
        let r = c.read_reply(0).unwrap();
        assert_eq!((r.cookie(), r.errno()), (7, 0));
    }
    c.send_request(&req(NBD_CMD_DISC, 0, 0, 0, 0), true, &[])
        .unwrap();
    assert!(c.is_closed());

    // Garbage between requests: answered up to it, then closed.
    let mut c = client(sock, "victim", false);
    let mut rng = XorShift::new(99);
    let mut garbage = vec![0u8; 300];
    rng.fill(&mut garbage);
    let mut b = encode_request(&req(NBD_CMD_READ, 0, 1, 0, 512), false);
    b.extend(&garbage);
    b.extend(encode_request(&req(NBD_CMD_READ, 0, 2, 0, 512), false));
    c.send(&b).unwrap();
    assert!(
        closed_within(&mut c.s, Duration::from_secs(10)).is_some(),
        "garbage between requests was not a framing fault"
    );
    // Garbage in the option phase.
    let mut c = RawClient::connect(sock);
    c.start(3);
    let _ = c.send(&garbage);
    assert!(c.is_closed(), "garbage options accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_beside_a_good_backup() {
    if !require_tools(&["qemu-img", "nbdcopy"]) {
        return;
    }
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src_good = dense_random(&dir.join("good.raw"), GOOD_SIZE, 41);
    let src_victim = raw_islands(&dir.join("victim.raw"), VICTIM_SIZE, 42, 6, MIB);
    let archive = dir.join("hostile.vma");
    let (serve, at) = ServeCmd::unix(
        dir,
        &[("good", GOOD_SIZE), ("victim", VICTIM_SIZE)],
        &archive,
    )
    .args(["--reconnect-timeout", "120"])
    .start()
    .await;
    let sock = at.sock.clone().unwrap();
    let pid = serve.pid();
    let baseline = hwm_mib(pid);

    // The good backup: throttled so that it runs through every case.
    let mut good = Command::new("qemu-img");
    good.args(["convert", "-n", "-r", "1M", "-f", "raw", "-O", "raw"])
        .arg(&src_good)
        .arg(at.uri("good"));
    let good_done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    tokio::task::block_in_place(|| {
        thread::scope(|s| {
            let good = s.spawn(|| {
                run_ok(&mut good);
                good_done.store(true, Ordering::SeqCst);
            });
            // Sample the server's peak RSS throughout.
            s.spawn(|| {
                while !good_done.load(Ordering::SeqCst) {
                    if let Some(k) = vm_hwm_kib(pid) {
                        peak.fetch_max(k >> 10, Ordering::SeqCst);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            });
            // Slowloris and more connections than the limit at once.
            let lorises = s.spawn(|| slowloris(&sock, 40));
            let crowd = s.spawn(|| over_the_limit(&sock, MAX_CONNECTIONS, Duration::from_secs(2)));
            let (greeted, crowd) = crowd.join().unwrap();
            assert!(
                greeted < MAX_CONNECTIONS,
                "{greeted} of {MAX_CONNECTIONS} greeted beside 40 others: no limit"
            );
            // The server frees their slots at the deadline, then greets
            // the rest (which time out in turn).
            let mut crowd = crowd;
            for c in &mut crowd {
                assert!(
                    closed_within(c, HANDSHAKE_TIMEOUT * 3).is_some(),
                    "an idle connection beyond the limit was never served and closed"
                );
            }
            for d in lorises.join().unwrap() {
                assert!(
                    d >= HANDSHAKE_TIMEOUT - Duration::from_secs(1) && d < HANDSHAKE_TIMEOUT * 3,
                    "slowloris closed after {d:?}"
                );
            }
            assert!(
                !good_done.load(Ordering::SeqCst),
                "the good backup ended before the hostile cases: slow it down"
            );
            // The protocol cases, one after the other, on free slots.
            unknown_export(&sock);
            huge_write_headers(&sock);
            ten_thousand_in_flight(&sock);
            let (silent, sender) = never_reads(&sock);
            thread::sleep(Duration::from_secs(2));
            let held = hwm_mib(pid);
            after_disc_cookies_and_garbage(&sock);
            // Hanging up (both directions: the sender holds a clone)
            // frees what the silent client held.
            silent.s.shutdown(std::net::Shutdown::Both).unwrap();
            drop(silent);
            sender.join().unwrap();
            eprintln!(
                "hostile cases done after {:?}; serve peak RSS {baseline} MiB at start, \
                 {held} MiB with a client that never reads",
                t.elapsed()
            );
            good.join().unwrap();
        });
    });
    let peak = peak.load(Ordering::SeqCst).max(hwm_mib(pid));
    eprintln!(
        "good backup done after {:?}; serve peak RSS {peak} MiB",
        t.elapsed()
    );
    // One budget (64 MiB) for the silent client, one for the 10 000
    // requests, buffers for the good client: far below what was claimed.
    assert!(peak < baseline + 256, "serve peaked at {peak} MiB");

    // A good client on the drive the hostile ones used completes it.
    run_ok(
        Command::new("nbdcopy")
            .args(["-C", "4"])
            .arg(&src_victim)
            .arg(at.uri("victim")),
    );
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_success();
    assert!(!ended.stderr.contains("panicked"), "{}", ended.stderr);
    check_archive(
        &archive,
        &[
            ("good", GOOD_SIZE, &src_good),
            ("victim", VICTIM_SIZE, &src_victim),
        ],
        dir,
    );
}

/// A second client writes to a drive while its backup runs. Writes to
/// clusters not yet archived cannot be told from the backup's own
/// (multi-conn is legitimate); a write that changes an archived cluster
/// gets EIO and fails the backup with a message naming drive and cluster,
/// and no archive appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_that_changes_archived_data_fails_the_backup() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 16 * MIB;
    let src = dense_random(&dir.join("src.raw"), size, 5);
    let archive = dir.join("two-writers.vma");
    let (serve, at) = ServeCmd::unix(dir, &[("drive-scsi0", size)], &archive)
        .start()
        .await;
    let sock = at.sock.clone().unwrap();
    let mut good = Command::new("qemu-img");
    good.args(["convert", "-n", "-r", "4M", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(at.uri("drive-scsi0"));
    let out = tokio::task::block_in_place(|| {
        thread::scope(|s| {
            let good = s.spawn(|| output_within(&mut good, CMD_TIMEOUT));
            // Wait until the first cluster is archived (the backup writes
            // front to back), then change it from a second connection.
            thread::sleep(Duration::from_secs(1));
            let mut c = client(&sock, "drive-scsi0", false);
            let r = req(NBD_CMD_WRITE, 0, 1, 0, 65536);
            c.send_request(&r, false, &[0xEE; 65536]).unwrap();
            assert_eq!(c.read_reply(0).unwrap().errno(), NBD_EIO.0);
            drop(c);
            good.join().unwrap()
        })
    });
    // The good client's later writes fail too: the backup is over.
    assert!(!out.status.success(), "the backup's own client went on");
    let ended = serve.wait(RUN_TIMEOUT).await;
    ended.assert_backup_failed(&[
        "conflicting writes",
        "drive drive-scsi0: cluster 0 was written again with different content",
    ]);
    assert!(!archive.exists());
}
