//! Server lifecycle: graceful shutdown with requests in flight,
//! back-pressure, listeners (Unix socket permissions and stale sockets,
//! TCP on port 0).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use crate::support::*;
use vma_writer::nbd::wire::*;
use vma_writer::nbd::{ListenAddr, Listener, MemoryBackend, ServerConfig};

const SIZE: u64 = 16 << 20;

/// How long a test waits for the server to get somewhere.
const WAIT: Duration = Duration::from_secs(10);

#[test]
fn shutdown_finishes_in_flight_requests_then_refuses_new_ones() {
    let srv = TestServer::start(vec![(
        "d",
        Counting::new(Gated::new(MemoryBackend::new(SIZE))),
    )]);
    let b = srv.backends[0].clone();
    let mut c = RawClient::connect(&srv.sock);
    c.handshake("d", true, false);
    for i in 0..4u64 {
        c.send_request(
            &req(NBD_CMD_WRITE, 0, i, i * 4096, 4096),
            false,
            &[i as u8 + 1; 4096],
        )
        .unwrap();
    }
    wait_until("writes to reach the backend", WAIT, || {
        b.inner.active.load(Ordering::SeqCst) == 4
    });

    // A client still in the handshake gets ERR_SHUTDOWN.
    let mut h = RawClient::connect(&srv.sock);
    h.start(3);

    srv.begin_shutdown();
    thread::sleep(Duration::from_millis(50));
    h.send_option(NBD_OPT_GO.0, &go_payload("d", &[]));
    let r = h.read_option_replies();
    assert_eq!(r.last().unwrap().1, NBD_REP_ERR_SHUTDOWN.0);

    // A new request gets ESHUTDOWN; its payload is drained.
    c.send_request(&req(NBD_CMD_WRITE, 0, 9, 65536, 100), false, &[9; 100])
        .unwrap();
    let r = c.read_reply(0).unwrap();
    assert_eq!((r.cookie(), r.errno()), (9, NBD_ESHUTDOWN.0));
    assert!(!srv.is_stopped(), "server stopped with requests in flight");

    // The requests in flight complete and are acknowledged.
    b.inner.open(4);
    let mut got: Vec<(u64, u32)> = (0..4)
        .map(|_| c.read_reply(0).unwrap())
        .map(|r| (r.cookie(), r.errno()))
        .collect();
    got.sort();
    assert_eq!(got, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
    assert!(c.is_closed());
    wait_until("the server to stop", WAIT, || srv.is_stopped());
    assert!(!srv.sock.exists(), "socket file left behind");
    assert_eq!(b.unclean_disconnects.load(Ordering::SeqCst), 1);
    assert_eq!(b.inner.writes_done.load(Ordering::SeqCst), 4);
    assert_eq!(
        b.inner.writes_done_at_disconnect.load(Ordering::SeqCst),
        4,
        "disconnected() ran before the requests in flight finished"
    );
    let data = b.inner.inner.contents();
    for i in 0..4usize {
        assert!(
            data[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&x| x == i as u8 + 1)
        );
    }
    assert!(
        data[65536..65636].iter().all(|&x| x == 0),
        "refused write landed"
    );
    srv.stop();
}

#[test]
fn backpressure_stops_reading_at_the_budget() {
    let config = ServerConfig {
        max_bytes_in_flight: 1 << 20,
        ..Default::default()
    };
    let srv = TestServer::start_with(vec![("d", Gated::new(MemoryBackend::new(SIZE)))], config);
    let b = srv.backends[0].clone();
    let mut c = RawClient::connect(&srv.sock);
    c.handshake("d", false, true);
    let chunk = 256 * 1024;
    let n = 16u64;
    let mut sender = c.s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for i in 0..n {
            let mut m = encode_request(
                &req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, i, i * chunk, chunk),
                true,
            );
            m.extend(random_data(chunk as usize, i));
            sender.write_all(&m).unwrap();
        }
        // One request larger than the whole budget must still get through.
        let mut m = encode_request(
            &req(
                NBD_CMD_WRITE,
                NBD_CMD_FLAG_PAYLOAD_LEN,
                99,
                8 << 20,
                3 << 20,
            ),
            true,
        );
        m.extend(vec![0x77u8; 3 << 20]);
        sender.write_all(&m).unwrap();
    });
    wait_until("writes to reach the backend", WAIT, || {
        b.active.load(Ordering::SeqCst) >= 3
    });
    thread::sleep(Duration::from_millis(300));
    let max = b.max_active.load(Ordering::SeqCst);
    assert!(
        max <= 4,
        "{max} writes of 256 KiB in flight with a 1 MiB budget"
    );
    assert!(
        !writer.is_finished(),
        "the server kept reading past its budget"
    );
    b.open(1000);
    let mut cookies: Vec<u64> = (0..=n)
        .map(|_| {
            let r = c.read_reply(0).unwrap();
            assert_eq!(r.errno(), 0);
            r.cookie()
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (0..n).chain([99]).collect::<Vec<_>>());
    writer.join().unwrap();
    let data = b.inner.contents();
    for i in 0..n {
        let at = (i * chunk) as usize;
        assert_same(
            &data[at..at + chunk as usize],
            &random_data(chunk as usize, i),
            "chunk",
        );
    }
    assert!(data[8 << 20..11 << 20].iter().all(|&x| x == 0x77));
    srv.stop();
}

#[test]
fn unix_listener_permissions_and_stale_sockets() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let addr = ListenAddr::Unix(path.clone());
    let l = Listener::bind(&addr).unwrap();
    assert_eq!(l.local_addr().unwrap(), addr);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A live socket is not taken over.
    let err = Listener::bind(&addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(l);
    assert!(!path.exists(), "socket not removed on drop");
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = Listener::bind(&addr).unwrap();
    drop(l);
    // Any other file is left alone.
    std::fs::write(&path, b"precious").unwrap();
    let err = Listener::bind(&addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn tcp_listener_on_port_zero() {
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    use vma_writer::nbd::{Export, Server};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let backend = Arc::new(MemoryBackend::new(SIZE));
    let shutdown = CancellationToken::new();
    let (addr, handle) = {
        let _g = rt.enter();
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let server = Server::new(
            vec![Export {
                name: "t".into(),
                description: String::new(),
                backend: backend.clone(),
            }],
            ServerConfig::default(),
        );
        (addr, rt.spawn(server.run(l, shutdown.clone())))
    };
    let ListenAddr::Tcp(sa) = addr else {
        panic!("not tcp: {addr}")
    };
    assert_ne!(sa.port(), 0);
    let mut s = std::net::TcpStream::connect(sa).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&option_bytes(NBD_OPT_EXPORT_NAME.0, b"t"))
        .unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(&r[..8], &SIZE.to_be_bytes());
    s.write_all(&encode_request(
        &req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1, 10, 3),
        false,
    ))
    .unwrap();
    s.write_all(b"tcp").unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(&rep[4..8], &[0, 0, 0, 0]);
    assert_eq!(&backend.contents()[10..13], b"tcp");
    if require_tools(&["qemu-io"]) {
        let uri = format!("nbd://{sa}/t");
        let out = run_ok(std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x74 10 1",
        ]));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
    }
    drop(s);
    shutdown.cancel();
    rt.block_on(handle).unwrap().unwrap();
}

/// Panics on any write at offset 666; otherwise a memory disk.
struct Panicky(MemoryBackend);

impl vma_writer::nbd::Backend for Panicky {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn caps(&self) -> vma_writer::nbd::BackendCaps {
        self.0.caps()
    }
    async fn write(&self, offset: u64, data: bytes::Bytes) -> std::io::Result<()> {
        assert_ne!(offset, 666, "deliberate backend bug");
        self.0.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len, may_trim).await
    }
    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.trim(offset, len).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.0.flush().await
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<bytes::Bytes> {
        self.0.read(offset, len).await
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Vec<vma_writer::nbd::BlockStatus>> {
        self.0.block_status(offset, len).await
    }
}

#[test]
fn a_panicking_backend_call_is_answered_eio() {
    let srv = TestServer::start(vec![("p", Panicky(MemoryBackend::new(SIZE)))]);
    let mut c = RawClient::connect(&srv.sock);
    c.handshake("p", false, false);
    c.send_request(&req(NBD_CMD_WRITE, 0, 1, 666, 4), false, b"boom")
        .unwrap();
    let r = c.read_reply(0).unwrap();
    assert_eq!((r.cookie(), r.errno()), (1, NBD_EIO.0));
    c.send_request(&req(NBD_CMD_WRITE, 0, 2, 700, 2), false, b"ok")
        .unwrap();
    assert_eq!(c.read_reply(0).unwrap().errno(), 0);
    c.send_request(&req(NBD_CMD_READ, 0, 3, 700, 2), false, &[])
        .unwrap();
    assert_eq!(c.read_reply(2).unwrap().payload, b"ok");
    srv.stop();
}

#[test]
fn a_flood_of_bad_requests_without_reading_replies_is_throttled() {
    let config = ServerConfig {
        max_bytes_in_flight: 1 << 20,
        ..Default::default()
    };
    let srv = TestServer::start_with(vec![("d", MemoryBackend::new(SIZE))], config);
    let mut c = RawClient::connect(&srv.sock);
    c.handshake("d", false, false);
    let n = 60_000u64;
    let mut sender = c.s.try_clone().unwrap();
    let flood = thread::spawn(move || {
        let mut all = Vec::with_capacity(n as usize * 28);
        for i in 0..n {
            all.extend(encode_request(&req(Command(77), 0, i, 0, 0), false));
        }
        sender.write_all(&all).unwrap();
    });
    thread::sleep(Duration::from_millis(500));
    assert!(
        !flood.is_finished(),
        "server buffered replies without bound"
    );
    let mut reader = std::io::BufReader::with_capacity(1 << 16, c.s.try_clone().unwrap());
    let mut rep = [0u8; 16];
    for i in 0..n {
        reader.read_exact(&mut rep).unwrap();
        assert_eq!(&rep[4..8], &NBD_EINVAL.0.to_be_bytes(), "reply {i}");
    }
    flood.join().unwrap();
    srv.stop();
}

#[test]
fn no_deadlock_while_the_client_sends_a_big_write_without_reading() {
    let srv = TestServer::start(vec![("d", MemoryBackend::new(64 << 20))]);
    let mut c = RawClient::connect(&srv.sock);
    c.handshake("d", true, false);
    // 16 MiB of READ replies queue up while the client, which reads nothing
    // until it has sent everything, pushes a 32 MiB WRITE.
    let mut all = Vec::new();
    for i in 0..16u64 {
        all.extend(encode_request(
            &req(NBD_CMD_READ, 0, i, i << 20, 1 << 20),
            false,
        ));
    }
    all.extend(encode_request(
        &req(NBD_CMD_WRITE, 0, 99, 32 << 20, 32 << 20),
        false,
    ));
    all.extend(random_data(32 << 20, 5));
    c.s.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    c.send(&all).expect("server stopped reading: deadlock");
    let mut cookies: Vec<u64> = (0..17)
        .map(|_| {
            let r = c.read_reply(0).unwrap();
            assert_eq!(r.errno(), 0);
            r.cookie()
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (0..16).chain([99]).collect::<Vec<_>>());
    assert_same(
        &srv.backends[0].contents()[32 << 20..],
        &random_data(32 << 20, 5),
        "big write",
    );
    srv.stop();
}
