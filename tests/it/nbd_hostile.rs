//! Hostile and broken peers, spoken to in raw bytes: truncated greetings,
//! bad magic, oversize lengths, option floods, a disconnect at every byte
//! of a valid conversation. The server must never panic, must close only
//! the offending connection, and must keep serving a good client in
//! parallel.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use crate::support::*;
use vma_writer::nbd::wire::*;
use vma_writer::nbd::{MAX_OPTIONS, MemoryBackend};

const SIZE: u64 = 4 << 20;

/// A client that writes and verifies data until told to stop; returns the
/// number of verified round trips.
fn good_client(srv_sock: std::path::PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut c = RawClient::connect(&srv_sock);
        c.handshake("good", true, false);
        let mut rounds = 0usize;
        while !stop.load(Ordering::SeqCst) || rounds == 0 {
            let off = (rounds as u64 % 64) * 65536;
            let data = random_data(65536, rounds as u64 + 1);
            c.send_request(&req(NBD_CMD_WRITE, 0, 1, off, 65536), false, &data)
                .unwrap();
            let r = c.read_reply(0).unwrap();
            assert_eq!((r.cookie(), r.errno()), (1, 0));
            c.send_request(&req(NBD_CMD_READ, 0, 2, off, 65536), false, &[])
                .unwrap();
            let r = c.read_reply(0).unwrap();
            assert_eq!(r.cookie(), 2);
            assert_eq!(
                &r.payload[8..],
                &data[..],
                "good client read back wrong data"
            );
            rounds += 1;
        }
        c.send_request(&req(NBD_CMD_DISC, 0, 0, 0, 0), false, &[])
            .unwrap();
        rounds
    })
}

/// A valid conversation: flags, EXTENDED_HEADERS, SET_META_CONTEXT, GO,
/// then a WRITE with payload, a FLUSH and DISC.
fn valid_conversation(export: &str) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend(option_bytes(NBD_OPT_EXTENDED_HEADERS.0, &[]));
    b.extend(option_bytes(
        NBD_OPT_SET_META_CONTEXT.0,
        &meta_payload(export, &["base:allocation"]),
    ));
    b.extend(option_bytes(NBD_OPT_GO.0, &go_payload(export, &[3, 1])));
    let w = req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 1, 4096, 100);
    b.extend(encode_request(&w, true));
    b.extend([0x5a; 100]);
    b.extend(encode_request(&req(NBD_CMD_FLUSH, 0, 2, 0, 0), true));
    b.extend(encode_request(&req(NBD_CMD_DISC, 0, 3, 0, 0), true));
    b
}

#[test]
fn hostile_peers_do_not_disturb_a_good_client() {
    let srv = TestServer::start(vec![
        ("good", Counting::new(MemoryBackend::new(SIZE))),
        ("victim", Counting::new(MemoryBackend::new(SIZE))),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(srv.sock.clone(), stop.clone());

    // Connect and close at once; read part of the greeting and close.
    for n in [0usize, 1, 8, 17] {
        let mut c = RawClient::connect(&srv.sock);
        if n > 0 {
            c.read_n(n).unwrap();
        }
    }
    // Unknown client flags: the server must hang up.
    let mut c = RawClient::connect(&srv.sock);
    c.start(0x8000_0003);
    assert!(c.is_closed(), "unknown client flags accepted");
    // NO_ZEROES is fine, FIXED_NEWSTYLE may be omitted.
    let mut c = RawClient::connect(&srv.sock);
    c.start(0);
    c.send_option(NBD_OPT_LIST.0, &[]);
    assert_eq!(c.read_option_replies().last().unwrap().1, NBD_REP_ACK.0);
    // Bad option magic.
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    let mut bad = option_bytes(NBD_OPT_GO.0, &go_payload("good", &[]));
    bad[0] = b'X';
    c.send(&bad).unwrap();
    assert!(c.is_closed(), "bad option magic accepted");
    // Oversize option length: closed without reading a gigabyte.
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    let mut hdr = option_bytes(NBD_OPT_GO.0, &[]);
    hdr[12..16].copy_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&hdr).unwrap();
    assert!(c.is_closed(), "oversize option accepted");
    // 1000 unknown options: MAX_OPTIONS answered ERR_UNSUP, then closed.
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    let flood: Vec<u8> = (0..1000)
        .flat_map(|i| option_bytes(1000 + i, b"junk"))
        .collect();
    let sender = {
        let mut s = c.s.try_clone().unwrap();
        thread::spawn(move || {
            use std::io::Write;
            let _ = s.write_all(&flood);
        })
    };
    for _ in 0..MAX_OPTIONS {
        let (_, kind, _) = c.read_option_reply();
        assert_eq!(kind, NBD_REP_ERR_UNSUP.0);
    }
    assert!(c.is_closed(), "option flood not cut off");
    sender.join().unwrap();

    // A disconnect at every byte of a valid conversation.
    let conv = valid_conversation("victim");
    for cut in 0..conv.len() {
        let mut c = RawClient::connect(&srv.sock);
        c.read_n(18).unwrap();
        c.send(&conv[..cut]).unwrap();
        drop(c);
    }
    // And the whole conversation still works.
    let mut c = RawClient::connect(&srv.sock);
    c.read_n(18).unwrap();
    c.send(&conv).unwrap();
    let replies = c.read_option_replies();
    assert_eq!(replies[0].1, NBD_REP_ACK.0);
    let _meta = c.read_option_replies();
    let go = c.read_option_replies();
    assert_eq!(go.last().unwrap().1, NBD_REP_ACK.0);
    let mut cookies: Vec<(u64, u32)> = (0..2)
        .map(|_| c.read_reply(0).unwrap())
        .map(|r| (r.cookie(), r.errno()))
        .collect();
    cookies.sort();
    assert_eq!(cookies, vec![(1, 0), (2, 0)]);
    assert!(c.is_closed());
    assert_eq!(
        &srv.backends[1].inner.contents()[4096..4196],
        &[0x5a; 100][..]
    );

    stop.store(true, Ordering::SeqCst);
    let rounds = good.join().expect("good client failed");
    assert!(rounds > 0);

    // Every connection that reached transmission was also ended.
    let v = &srv.backends[1];
    v.wait_disconnects(v.connects.load(Ordering::SeqCst));
    assert!(v.connects.load(Ordering::SeqCst) > 0);
    assert_eq!(srv.panics(), 0, "something panicked");
    srv.stop();
}

#[test]
fn transmission_framing_faults_close_only_that_connection() {
    let srv = TestServer::start(vec![("good", MemoryBackend::new(SIZE))]);
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(srv.sock.clone(), stop.clone());
    for extended in [false, true] {
        // Bad request magic.
        let mut c = RawClient::connect(&srv.sock);
        c.handshake("good", true, extended);
        let mut b = encode_request(&req(NBD_CMD_READ, 0, 1, 0, 512), extended);
        b[1] ^= 0xff;
        c.send(&b).unwrap();
        assert!(c.is_closed(), "bad request magic accepted");
        // The other header style's magic.
        let mut c = RawClient::connect(&srv.sock);
        c.handshake("good", true, extended);
        let mut b = encode_request(&req(NBD_CMD_READ, 0, 1, 0, 512), !extended);
        b.extend([0u8; 4]); // a compact header is 4 bytes short of an extended one
        c.send(&b).unwrap();
        assert!(c.is_closed(), "wrong header style accepted");
        // Absurd WRITE length: hard disconnect instead of draining 4 GiB.
        let mut c = RawClient::connect(&srv.sock);
        c.handshake("good", true, extended);
        let flags = if extended {
            NBD_CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        c.send_request(
            &req(NBD_CMD_WRITE, flags, 1, 0, u32::MAX as u64),
            extended,
            &[0; 1000],
        )
        .unwrap();
        assert!(c.is_closed(), "absurd write length accepted");
        // Torn request header, then EOF.
        let mut c = RawClient::connect(&srv.sock);
        c.handshake("good", true, extended);
        c.send(&encode_request(&req(NBD_CMD_READ, 0, 1, 0, 512), extended)[..10])
            .unwrap();
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(c.is_closed());
    }
    stop.store(true, Ordering::SeqCst);
    assert!(good.join().expect("good client failed") > 0);
    assert_eq!(srv.panics(), 0, "something panicked");
    srv.stop();
}

#[test]
fn per_request_errors_keep_the_connection() {
    let srv = TestServer::start(vec![
        ("d0", MemoryBackend::new(SIZE)),
        ("d1", MemoryBackend::new(SIZE)),
        ("d2", MemoryBackend::new(SIZE)),
    ]);
    for (i, (structured, extended)) in [(false, false), (true, false), (false, true)]
        .into_iter()
        .enumerate()
    {
        let mut c = RawClient::connect(&srv.sock);
        let (size, flags) = c.handshake(&format!("d{i}"), structured, extended);
        assert_eq!(size, SIZE);
        assert_ne!(flags & NBD_FLAG_CAN_MULTI_CONN, 0);
        let err = |c: &mut RawClient, r: Request, payload: &[u8]| {
            c.send_request(&r, extended, payload).unwrap();
            let rep = c.read_reply(0).unwrap();
            assert_eq!(rep.cookie(), r.cookie);
            rep.errno()
        };
        // Unknown commands and flags.
        assert_eq!(
            err(&mut c, req(Command(99), 0, 10, 0, 0), &[]),
            NBD_EINVAL.0
        );
        assert_eq!(
            err(&mut c, req(NBD_CMD_RESIZE, 0, 11, 0, 0), &[]),
            NBD_EINVAL.0
        );
        assert_eq!(
            err(&mut c, req(NBD_CMD_FLUSH, 1 << 9, 12, 0, 0), &[]),
            NBD_EINVAL.0
        );
        // Write past the end: payload drained, ENOSPC.
        let wflags = if extended {
            NBD_CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        assert_eq!(
            err(
                &mut c,
                req(NBD_CMD_WRITE, wflags, 13, SIZE - 10, 20),
                &[1; 20]
            ),
            NBD_ENOSPC.0
        );
        // Oversized write within the drain limit: drained, EINVAL.
        let big = vec![2u8; (33 << 20) as usize];
        assert_eq!(
            err(
                &mut c,
                req(NBD_CMD_WRITE, wflags, 14, 0, big.len() as u64),
                &big
            ),
            NBD_EINVAL.0
        );
        // BLOCK_STATUS past the end.
        assert_eq!(
            err(&mut c, req(NBD_CMD_BLOCK_STATUS, 0, 15, SIZE, 1), &[]),
            NBD_EINVAL.0
        );
        if extended {
            // An unknown command with a payload: drained, EINVAL.
            assert_eq!(
                err(
                    &mut c,
                    req(Command(99), NBD_CMD_FLAG_PAYLOAD_LEN, 16, 0, 3000),
                    &[3; 3000]
                ),
                NBD_EINVAL.0
            );
            // Zeroing more than 4 GiB in one request is fine with 64-bit lengths.
            let big_srv_len = 5u64 << 30;
            assert_eq!(
                err(
                    &mut c,
                    req(NBD_CMD_WRITE_ZEROES, 0, 17, 0, big_srv_len),
                    &[]
                ),
                NBD_ENOSPC.0
            );
        }
        // The connection still works.
        c.send_request(&req(NBD_CMD_WRITE, wflags, 20, 100, 5), extended, b"hello")
            .unwrap();
        assert_eq!(c.read_reply(0).unwrap().errno(), 0);
        c.send_request(&req(NBD_CMD_READ, 0, 21, 98, 9), extended, &[])
            .unwrap();
        let r = c.read_reply(9).unwrap();
        let data = if structured || extended {
            &r.payload[8..]
        } else {
            &r.payload[..]
        };
        assert_eq!(data, b"\0\0hello\0\0");
        if structured || extended {
            // base:allocation answers, 32- or 64-bit.
            c.send_request(&req(NBD_CMD_BLOCK_STATUS, 0, 22, 0, SIZE), extended, &[])
                .unwrap();
            let r = c.read_reply(0).unwrap();
            let kind = match r.header {
                ReplyHeader::Chunk { kind, flags, .. } => {
                    assert_eq!(flags & NBD_REPLY_FLAG_DONE, NBD_REPLY_FLAG_DONE);
                    kind
                }
                h => panic!("unexpected {h:?}"),
            };
            let p = &r.payload;
            assert_eq!(&p[0..4], &1u32.to_be_bytes(), "context id");
            if extended {
                assert_eq!(kind, NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
                assert_eq!(&p[4..8], &2u32.to_be_bytes(), "extent count");
                assert_eq!(&p[8..16], &65536u64.to_be_bytes());
                assert_eq!(&p[16..24], &0u64.to_be_bytes());
                assert_eq!(&p[24..32], &(SIZE - 65536).to_be_bytes());
                assert_eq!(&p[32..40], &3u64.to_be_bytes());
            } else {
                assert_eq!(kind, NBD_REPLY_TYPE_BLOCK_STATUS);
                assert_eq!(&p[4..8], &65536u32.to_be_bytes());
                assert_eq!(&p[8..12], &0u32.to_be_bytes());
                assert_eq!(&p[12..16], &((SIZE - 65536) as u32).to_be_bytes());
                assert_eq!(&p[16..20], &3u32.to_be_bytes());
            }
        }
        // Pipelined requests are all answered.
        for i in 0..50u64 {
            c.send_request(
                &req(
                    NBD_CMD_WRITE_ZEROES,
                    NBD_CMD_FLAG_NO_HOLE,
                    100 + i,
                    i * 4096,
                    4096,
                ),
                extended,
                &[],
            )
            .unwrap();
        }
        let mut seen: Vec<u64> = (0..50).map(|_| c.read_reply(0).unwrap().cookie()).collect();
        seen.sort();
        assert_eq!(seen, (100..150).collect::<Vec<_>>());
        c.send_request(&req(NBD_CMD_DISC, 0, 0, 0, 0), extended, &[])
            .unwrap();
        assert!(c.is_closed());
    }
    assert_eq!(srv.panics(), 0, "something panicked");
    srv.stop();
}

#[test]
fn option_negotiation_edges() {
    let srv = TestServer::start(vec![
        ("a", MemoryBackend::new(SIZE)),
        ("b", MemoryBackend::new(512)),
    ]);
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    let one = |c: &mut RawClient, code: OptionCode, p: &[u8]| {
        c.send_option(code.0, p);
        c.read_option_replies()
    };
    let last = |r: Vec<(u32, u32, Vec<u8>)>| r.last().unwrap().1;
    assert_eq!(last(one(&mut c, NBD_OPT_LIST, b"x")), NBD_REP_ERR_INVALID.0);
    let list = one(&mut c, NBD_OPT_LIST, &[]);
    assert_eq!(list.len(), 3);
    assert_eq!(&list[0].2[4..5], b"a");
    assert_eq!(
        last(one(&mut c, NBD_OPT_STARTTLS, &[])),
        NBD_REP_ERR_UNSUP.0
    );
    assert_eq!(
        last(one(&mut c, NBD_OPT_PEEK_EXPORT, &[])),
        NBD_REP_ERR_UNSUP.0
    );
    assert_eq!(
        last(one(&mut c, OptionCode(4711), b"whatever")),
        NBD_REP_ERR_UNSUP.0
    );
    assert_eq!(
        last(one(&mut c, NBD_OPT_GO, &[0, 0, 0, 9, b'a'])),
        NBD_REP_ERR_INVALID.0
    );
    assert_eq!(
        last(one(&mut c, NBD_OPT_GO, &go_payload("nope", &[]))),
        NBD_REP_ERR_UNKNOWN.0
    );
    let long = "x".repeat(MAX_STRING_LEN + 1);
    assert_eq!(
        last(one(&mut c, NBD_OPT_GO, &go_payload(&long, &[]))),
        NBD_REP_ERR_TOO_BIG.0
    );
    assert_eq!(
        last(one(
            &mut c,
            NBD_OPT_SET_META_CONTEXT,
            &meta_payload("a", &["base:allocation"])
        )),
        NBD_REP_ERR_INVALID.0,
        "SET_META_CONTEXT needs structured replies"
    );
    // LIST_META_CONTEXT with no queries lists everything, with id 0.
    let r = one(&mut c, NBD_OPT_LIST_META_CONTEXT, &meta_payload("a", &[]));
    assert_eq!(r[0].1, NBD_REP_META_CONTEXT.0);
    assert_eq!(&r[0].2[4..], b"base:allocation");
    let r = one(
        &mut c,
        NBD_OPT_LIST_META_CONTEXT,
        &meta_payload("a", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(
        last(one(&mut c, NBD_OPT_STRUCTURED_REPLY, b"x")),
        NBD_REP_ERR_INVALID.0
    );
    assert_eq!(
        last(one(&mut c, NBD_OPT_STRUCTURED_REPLY, &[])),
        NBD_REP_ACK.0
    );
    // Unknown namespaces select nothing.
    let r = one(
        &mut c,
        NBD_OPT_SET_META_CONTEXT,
        &meta_payload("a", &["qemu:x", "base:"]),
    );
    assert_eq!(r.len(), 1);
    // INFO with NAME and DESCRIPTION, then GO on the other export.
    let r = one(&mut c, NBD_OPT_INFO, &go_payload("", &[1, 2, 3]));
    let kinds: Vec<u16> = r
        .iter()
        .filter(|x| x.1 == NBD_REP_INFO.0)
        .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
        .collect();
    assert_eq!(kinds, vec![0, 1, 2, 3]);
    let name = r
        .iter()
        .find(|x| x.1 == NBD_REP_INFO.0 && x.2[..2] == [0, 1])
        .unwrap();
    assert_eq!(&name.2[2..], b"a", "empty name selects the first export");
    let bs = r
        .iter()
        .find(|x| x.1 == NBD_REP_INFO.0 && x.2[..2] == [0, 3])
        .unwrap();
    assert_eq!(&bs.2[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
    let r = one(&mut c, NBD_OPT_GO, &go_payload("b", &[]));
    assert_eq!(&r[0].2[2..10], &512u64.to_be_bytes());
    // No meta context selected: BLOCK_STATUS is refused.
    c.send_request(&req(NBD_CMD_BLOCK_STATUS, 0, 5, 0, 512), false, &[])
        .unwrap();
    assert_eq!(c.read_reply(0).unwrap().errno(), NBD_EINVAL.0);
    drop(c);

    // EXPORT_NAME: 134-byte reply, or 10 with NO_ZEROES; unknown → closed.
    for (flags, len) in [(1u32, 134usize), (3, 10)] {
        let mut c = RawClient::connect(&srv.sock);
        c.start(flags);
        c.send_option(NBD_OPT_EXPORT_NAME.0, b"b");
        let r = c.read_n(len).unwrap();
        assert_eq!(&r[0..8], &512u64.to_be_bytes());
        c.send_request(&req(NBD_CMD_READ, 0, 1, 0, 512), false, &[])
            .unwrap();
        assert_eq!(c.read_reply(512).unwrap().payload, vec![0; 512]);
    }
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    c.send_option(NBD_OPT_EXPORT_NAME.0, b"nope");
    assert!(c.is_closed());
    // EXPORT_NAME after EXTENDED_HEADERS is a protocol violation.
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    assert_eq!(
        last(one(&mut c, NBD_OPT_EXTENDED_HEADERS, &[])),
        NBD_REP_ACK.0
    );
    assert_eq!(
        last(one(&mut c, NBD_OPT_STRUCTURED_REPLY, &[])),
        NBD_REP_ERR_INVALID.0
    );
    c.send_option(NBD_OPT_EXPORT_NAME.0, b"a");
    assert!(c.is_closed());
    // A context selected for one export does not carry over to another.
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    assert_eq!(
        last(one(&mut c, NBD_OPT_STRUCTURED_REPLY, &[])),
        NBD_REP_ACK.0
    );
    let r = one(
        &mut c,
        NBD_OPT_SET_META_CONTEXT,
        &meta_payload("a", &["base:allocation"]),
    );
    assert_eq!(r.len(), 2);
    assert_eq!(
        last(one(&mut c, NBD_OPT_GO, &go_payload("b", &[]))),
        NBD_REP_ACK.0
    );
    c.send_request(&req(NBD_CMD_BLOCK_STATUS, 0, 5, 0, 512), false, &[])
        .unwrap();
    assert_eq!(c.read_reply(0).unwrap().errno(), NBD_EINVAL.0);
    // ABORT is acknowledged, then the server closes.
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    assert_eq!(last(one(&mut c, NBD_OPT_ABORT, &[])), NBD_REP_ACK.0);
    assert!(c.is_closed());
    assert_eq!(srv.panics(), 0, "something panicked");
    srv.stop();
}

#[test]
fn handshake_deadline_closes_idle_clients() {
    let config = vma_writer::nbd::ServerConfig {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let srv = TestServer::start_with(vec![("a", MemoryBackend::new(SIZE))], config);
    let t = std::time::Instant::now();
    let mut c = RawClient::connect(&srv.sock);
    c.start(3);
    assert!(c.is_closed());
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    // A prompt client is not affected.
    let mut c = RawClient::connect(&srv.sock);
    c.handshake("a", false, false);
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.send_request(&req(NBD_CMD_FLUSH, 0, 1, 0, 0), false, &[])
        .unwrap();
    assert_eq!(c.read_reply(0).unwrap().errno(), 0);
    assert_eq!(srv.panics(), 0, "something panicked");
    srv.stop();
}

#[test]
fn connection_limit_queues_extra_clients() {
    let config = vma_writer::nbd::ServerConfig {
        max_connections: 2,
        ..Default::default()
    };
    let srv = TestServer::start_with(vec![("a", MemoryBackend::new(SIZE))], config);
    let mut a = RawClient::connect(&srv.sock);
    a.handshake("a", false, false);
    let mut b = RawClient::connect(&srv.sock);
    b.handshake("a", false, false);
    // The third waits in the backlog: no greeting while two are served.
    let mut c = RawClient::connect(&srv.sock);
    c.s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    assert!(
        c.read_n(18).is_err(),
        "third connection served beyond the limit"
    );
    a.send_request(&req(NBD_CMD_DISC, 0, 0, 0, 0), false, &[])
        .unwrap();
    c.s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.handshake("a", false, false);
    let _ = AtomicUsize::new(0);
    drop(b);
    assert_eq!(srv.panics(), 0, "something panicked");
    srv.stop();
}
