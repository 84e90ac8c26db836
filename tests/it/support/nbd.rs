//! The NBD server in-process for the protocol suites: a test server on a
//! Unix socket in a temp dir with its own runtime, backend wrappers that
//! count lifecycle calls or hold writes at a gate, and a blocking
//! raw-bytes client for protocol edges.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vma_writer::nbd::wire;
use vma_writer::nbd::{
    Backend, BackendCaps, BlockStatus, Export, ListenAddr, Listener, Server, ServerConfig,
};

use super::init_tracing;

/// Names of the runtime threads that panicked, for [`TestServer::panics`].
static PANICKED_THREADS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Numbers the servers, so each runtime's threads have their own name.
static NEXT_SERVER: AtomicUsize = AtomicUsize::new(0);

/// Prefix of a test server's runtime thread names.
const SERVER_THREAD_PREFIX: &str = "nbd-test-server-";

/// Installs (once) a panic hook that records panics on a test server's
/// runtime threads, on top of the default one, so tests can assert their
/// server never panicked in its own tasks (tokio would otherwise swallow
/// such panics). Panics elsewhere in the test binary (other tests run in
/// parallel, some on purpose) do not count.
pub fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(name) = std::thread::current().name()
                && name.starts_with(SERVER_THREAD_PREFIX)
            {
                PANICKED_THREADS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(name.to_string());
            }
            prev(info);
        }));
    });
}

/// Wraps a backend and counts `connected`, `disconnected` and `flush`.
pub struct Counting<B> {
    /// The wrapped backend.
    pub inner: B,
    /// `connected()` calls.
    pub connects: AtomicUsize,
    /// `disconnected(true)` calls.
    pub clean_disconnects: AtomicUsize,
    /// `disconnected(false)` calls.
    pub unclean_disconnects: AtomicUsize,
    /// `flush()` calls.
    pub flushes: AtomicUsize,
}

impl<B> Counting<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            connects: AtomicUsize::new(0),
            clean_disconnects: AtomicUsize::new(0),
            unclean_disconnects: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        }
    }
    pub fn disconnects(&self) -> usize {
        self.clean_disconnects.load(Ordering::SeqCst)
            + self.unclean_disconnects.load(Ordering::SeqCst)
    }
    /// Waits until `n` connections have ended (they end asynchronously
    /// after the client exits).
    pub fn wait_disconnects(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.disconnects() < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} disconnects"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl<B: Backend> Backend for Counting<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> BackendCaps {
        self.inner.caps()
    }
    async fn write(&self, offset: u64, data: Bytes) -> std::io::Result<()> {
        self.inner.write(offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim).await
    }
    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush().await
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<BlockStatus>> {
        self.inner.block_status(offset, len).await
    }
    fn connected(&self) {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.connected();
    }
    fn disconnected(&self, clean: bool) {
        self.inner.disconnected(clean);
        if clean {
            self.clean_disconnects.fetch_add(1, Ordering::SeqCst);
        } else {
            self.unclean_disconnects.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The server running in its own tokio runtime, listening on a Unix socket
/// in a temp dir. Dropping it shuts the server down gracefully.
pub struct TestServer<B: Backend> {
    pub rt: Runtime,
    /// Name of the runtime's threads.
    thread_name: String,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub backends: Vec<Arc<B>>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl<B: Backend> TestServer<B> {
    /// Starts a server with default limits.
    pub fn start(exports: Vec<(&str, B)>) -> Self {
        Self::start_with(exports, ServerConfig::default())
    }

    /// Starts a server with the given limits.
    pub fn start_with(exports: Vec<(&str, B)>, config: ServerConfig) -> Self {
        init_tracing();
        count_panics();
        let thread_name = format!(
            "{SERVER_THREAD_PREFIX}{}",
            NEXT_SERVER.fetch_add(1, Ordering::SeqCst)
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(thread_name.clone())
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("nbd.sock");
        let shutdown = CancellationToken::new();
        let backends: Vec<Arc<B>> = Vec::new();
        let mut list = Vec::new();
        let mut backends = backends;
        for (name, b) in exports {
            let b = Arc::new(b);
            backends.push(Arc::clone(&b));
            list.push(Export {
                name: name.to_owned(),
                description: format!("test export {name}"),
                backend: b,
            });
        }
        let handle = {
            let _g = rt.enter();
            let listener = Listener::bind(&ListenAddr::Unix(sock.clone())).expect("bind");
            let server = Server::new(list, config);
            rt.spawn(server.run(listener, shutdown.clone()))
        };
        Self {
            rt,
            thread_name,
            dir,
            sock,
            backends,
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// Number of panics on this server's runtime threads so far.
    pub fn panics(&self) -> usize {
        PANICKED_THREADS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|n| **n == self.thread_name)
            .count()
    }

    /// Fires the shutdown token without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// True once `run` has returned.
    pub fn is_stopped(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Asks the server to stop and waits for `run` to return.
    pub fn stop(mut self) {
        self.stop_inner();
        assert!(!self.sock.exists(), "socket file left behind");
    }

    fn stop_inner(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            let r = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), h).await });
            r.expect("server did not stop within 20 s")
                .expect("server task panicked")
                .expect("server returned an error");
        }
    }
}

impl<B: Backend> Drop for TestServer<B> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop_inner();
        } else {
            self.shutdown.cancel();
        }
    }
}

/// A blocking raw-bytes NBD client for protocol-edge tests.
pub struct RawClient {
    pub s: UnixStream,
}

/// A reply as read by [`RawClient::read_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    pub header: vma_writer::nbd::wire::ReplyHeader,
    pub payload: Vec<u8>,
}

impl RawReply {
    pub fn cookie(&self) -> u64 {
        match self.header {
            wire::ReplyHeader::Simple { cookie, .. } | wire::ReplyHeader::Chunk { cookie, .. } => {
                cookie
            }
        }
    }
    /// The errno of a simple reply or an ERROR chunk (0 otherwise).
    pub fn errno(&self) -> u32 {
        match self.header {
            wire::ReplyHeader::Simple { error, .. } => error.0,
            wire::ReplyHeader::Chunk { kind, .. } if kind.0 & 0x8000 != 0 => {
                u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
            }
            _ => 0,
        }
    }
}

impl RawClient {
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        RawClient { s }
    }

    pub fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    pub fn read_n(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// True when the server closed the connection (EOF or reset) within
    /// the read timeout, after discarding anything it still sent.
    pub fn is_closed(&mut self) -> bool {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                // A socket read with SO_RCVTIMEO fails with EINTR when a
                // signal arrives, even under SA_RESTART (signal(7)); other
                // tests' children send this process SIGCHLD.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Reads and checks the greeting, sends client flags.
    pub fn start(&mut self, client_flags: u32) {
        let g = self.read_n(18).expect("greeting");
        assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
        self.send(&client_flags.to_be_bytes()).unwrap();
    }

    pub fn send_option(&mut self, code: u32, payload: &[u8]) {
        self.send(&option_bytes(code, payload)).unwrap();
    }

    /// Reads one option reply: (option, reply type, payload).
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20).expect("option reply header");
        assert_eq!(&h[0..8], &wire::NBD_REP_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let p = self.read_n(len as usize).expect("option reply payload");
        (opt, kind, p)
    }

    /// Option replies up to and including the final one (ACK or error).
    pub fn read_option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply();
            let last = r.1 == wire::NBD_REP_ACK.0 || r.1 & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Full handshake: optional structured/extended negotiation,
    /// base:allocation, GO. Returns (size, transmission flags).
    pub fn handshake(&mut self, export: &str, structured: bool, extended: bool) -> (u64, u16) {
        self.start(3);
        if extended {
            self.send_option(wire::NBD_OPT_EXTENDED_HEADERS.0, &[]);
            assert_eq!(self.read_option_reply().1, wire::NBD_REP_ACK.0);
        } else if structured {
            self.send_option(wire::NBD_OPT_STRUCTURED_REPLY.0, &[]);
            assert_eq!(self.read_option_reply().1, wire::NBD_REP_ACK.0);
        }
        if structured || extended {
            self.send_option(
                wire::NBD_OPT_SET_META_CONTEXT.0,
                &meta_payload(export, &["base:allocation"]),
            );
            let r = self.read_option_replies();
            assert_eq!(r.len(), 2, "{r:?}");
        }
        self.send_option(wire::NBD_OPT_GO.0, &go_payload(export, &[3]));
        let mut size_flags = None;
        for (_, kind, p) in self.read_option_replies() {
            assert!(
                kind == wire::NBD_REP_INFO.0 || kind == wire::NBD_REP_ACK.0,
                "GO refused: {kind:#x}"
            );
            if kind == wire::NBD_REP_INFO.0 && p[0..2] == [0, 0] {
                size_flags = Some((
                    u64::from_be_bytes(p[2..10].try_into().unwrap()),
                    u16::from_be_bytes(p[10..12].try_into().unwrap()),
                ));
            }
        }
        size_flags.expect("no INFO_EXPORT")
    }

    pub fn send_request(
        &mut self,
        r: &wire::Request,
        extended: bool,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = wire::encode_request(r, extended);
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// Reads one reply (simple, or one chunk). `read_len` is the data
    /// length that follows a successful simple READ reply.
    pub fn read_reply(&mut self, read_len: usize) -> std::io::Result<RawReply> {
        let head = self.read_n(4)?;
        let magic = u32::from_be_bytes(head[..4].try_into().unwrap());
        let total = match magic {
            wire::NBD_SIMPLE_REPLY_MAGIC => 16,
            wire::NBD_STRUCTURED_REPLY_MAGIC => 20,
            wire::NBD_EXTENDED_REPLY_MAGIC => 32,
            m => panic!("bad reply magic {m:#x}"),
        };
        let mut all = head;
        all.extend(self.read_n(total - 4)?);
        let (header, _) = wire::decode_reply_header(&all).unwrap().unwrap();
        let payload = match header {
            wire::ReplyHeader::Simple { error, .. } if error.0 == 0 => self.read_n(read_len)?,
            wire::ReplyHeader::Simple { .. } => Vec::new(),
            wire::ReplyHeader::Chunk { len, .. } => self.read_n(len as usize)?,
        };
        Ok(RawReply { header, payload })
    }
}

pub fn option_bytes(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.to_be_bytes());
    }
    p
}

pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

pub fn req(
    command: wire::Command,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> wire::Request {
    wire::Request {
        flags,
        command,
        cookie,
        offset,
        len,
    }
}

/// A backend wrapper whose writes wait for a gate the test opens, and
/// which records how many writes were inside the backend at once.
pub struct Gated<B> {
    pub inner: B,
    pub gate: tokio::sync::Semaphore,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    pub writes_done: AtomicUsize,
    /// `writes_done` when `disconnected` was called.
    pub writes_done_at_disconnect: AtomicUsize,
}

impl<B> Gated<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            gate: tokio::sync::Semaphore::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            writes_done: AtomicUsize::new(0),
            writes_done_at_disconnect: AtomicUsize::new(usize::MAX),
        }
    }
    /// Lets `n` more writes through.
    pub fn open(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

impl<B: Backend> Backend for Gated<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn caps(&self) -> BackendCaps {
        self.inner.caps()
    }
    async fn write(&self, offset: u64, data: Bytes) -> std::io::Result<()> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        self.gate.acquire().await.expect("gate").forget();
        let r = self.inner.write(offset, data).await;
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.writes_done.fetch_add(1, Ordering::SeqCst);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim).await
    }
    async fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.inner.flush().await
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<BlockStatus>> {
        self.inner.block_status(offset, len).await
    }
    fn connected(&self) {
        self.inner.connected()
    }
    fn disconnected(&self, clean: bool) {
        self.writes_done_at_disconnect
            .store(self.writes_done.load(Ordering::SeqCst), Ordering::SeqCst);
        self.inner.disconnected(clean)
    }
}
