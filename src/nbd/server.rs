//! Listeners, export routing, the connection limit and graceful shutdown.
//!
//! [`Server::run`] accepts connections on a [`Listener`] until the caller's
//! [`CancellationToken`] fires, runs each connection (handshake, then
//! transmission) in its own task, and on shutdown waits for every
//! connection to answer its requests before it returns. Protocol details
//! live in `nbd::handshake` and `nbd::transmission`; [`Export`] itself is
//! defined beside the `Backend` trait.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use super::backend::{Backend, Export};
use super::budget::MemoryBudget;
use super::handshake::{self, Outcome, TlsPhase};
use super::session::{Negotiated, Session};
use super::tls::Tls;
use super::transmission::{self, READ_BUFFER};
use super::wire::ProtocolError;

/// Default for [`ServerConfig::max_connections`]. At the limit the server
/// stops accepting; further clients wait in the kernel's listen backlog
/// (and see a connect timeout or refusal only if that fills too). A backup
/// needs one connection per drive; nbdcopy uses up to four per export.
pub const MAX_CONNECTIONS: usize = 128;

/// Default for [`ServerConfig::max_bytes_in_flight`]: payload bytes (WRITE
/// data read but not yet stored, READ data not yet sent) one connection may
/// hold. At the limit the server stops reading that socket until replies
/// drain. 64 MiB is two maximum-size requests, or QEMU's 16 × 1 MiB four
/// times over, so well-behaved clients never hit it.
pub const MAX_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Default for [`ServerConfig::handshake_timeout`]: a client that has not
/// reached transmission this long after connecting is disconnected, so idle
/// or slow-loris peers cannot hold connection slots (qemu-nbd uses 10 s too).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`ServerConfig::payload_timeout`]: how long a WRITE payload
/// charged to the shared [`MemoryBudget`] may take to arrive before the
/// connection is closed, so a client that trickles a large payload cannot
/// hold the budget (and stall every other drive) for long. 30 s is 1 MiB
/// (QEMU's request) at 35 KB/s; without a shared budget there is no such
/// deadline (a slow payload holds only its own connection).
pub const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest pause between retries after `accept` fails (e.g. out of file
/// descriptors); the pause starts at 1 ms and doubles.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The tunable limits of a [`Server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Connections served at once; see [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Per-connection byte budget; see [`MAX_BYTES_IN_FLIGHT`].
    pub max_bytes_in_flight: usize,
    /// Handshake deadline; see [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// One budget for the WRITE payloads of all connections together
    /// (shared fairly; see [`MemoryBudget`]); `None`: only the
    /// per-connection bound applies.
    pub memory: Option<MemoryBudget>,
    /// With `memory`: payload deadline; see [`PAYLOAD_TIMEOUT`].
    pub payload_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_bytes_in_flight: MAX_BYTES_IN_FLIGHT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            memory: None,
            payload_timeout: PAYLOAD_TIMEOUT,
        }
    }
}

/// Where a [`Listener`] listens.
///
/// Parsed from `unix:PATH`, `tcp:HOST:PORT` or `systemd`. HOST is an IP
/// literal (`[::1]` for IPv6) or `localhost`; an empty HOST (`tcp::10809`)
/// or a bare port (`tcp:10809`) means 127.0.0.1, so nothing is exposed
/// beyond the machine unless asked for. Displayed in the same syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
    /// The listening socket systemd passes (socket activation, see
    /// `nbd::systemd`): Unix or TCP, whatever the socket unit says.
    Systemd,
}

/// Why a [`ListenAddr`] did not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid listen address {input:?}: {reason} (expected unix:PATH, tcp:HOST:PORT or systemd)"
)]
pub struct ListenAddrError {
    input: String,
    reason: &'static str,
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ListenAddrError {
            input: s.to_owned(),
            reason,
        };
        if s == "systemd" {
            return Ok(ListenAddr::Systemd);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(err("unknown scheme"));
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => ("", rest),
        };
        let port: u16 = port.parse().map_err(|_| err("bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = match host {
            "" | "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h
                .parse()
                .map_err(|_| err("HOST must be an IP address or localhost"))?,
        };
        Ok(ListenAddr::Tcp(SocketAddr::new(ip, port)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
            ListenAddr::Systemd => f.write_str("systemd"),
        }
    }
}

/// A bound listening socket.
///
/// Unix sockets are created with mode 0600 (only our user may connect):
/// the socket is bound under a temporary name in the same directory,
/// chmod-ed, then renamed into place, so it is never reachable at the final
/// path with wider permissions. A file already at the path is replaced only
/// if it is a *stale* socket (nobody accepts connections on it); a live
/// socket gives `AddrInUse`, any other file `AlreadyExists`. The socket file
/// is removed when the listener is dropped (if it is still ours).
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// (device, inode) of the socket file we created, so drop only
        /// removes our own file; `None` for a socket systemd passed (its
        /// file is systemd's).
        id: Option<(u64, u64)>,
    },
    Tcp(TcpListener),
}

/// An accepted connection.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Binds `addr` (for [`ListenAddr::Systemd`]: takes the socket
    /// systemd passed, see [`Listener::from_systemd`]). Must be called
    /// from within a tokio runtime.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Systemd => Listener::from_systemd(),
            ListenAddr::Unix(path) => bind_unix(path),
            ListenAddr::Tcp(a) => {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                Ok(Listener {
                    inner: Inner::Tcp(TcpListener::from_std(l)?),
                })
            }
        }
    }

    /// The listening socket systemd passed to this process (descriptor 3,
    /// `LISTEN_PID` and `LISTEN_FDS=1`): Unix or TCP by its address
    /// family. Its file (for Unix) stays systemd's and is not removed on
    /// drop. Must be called from within a tokio runtime; works once per
    /// process.
    pub fn from_systemd() -> io::Result<Listener> {
        let fd = super::systemd::take_listen_fd()?;
        match super::systemd::socket_family(&fd)? {
            libc::AF_UNIX => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                let listener = UnixListener::from_std(l)?;
                let path = listener
                    .local_addr()?
                    .as_pathname()
                    .map_or_else(|| PathBuf::from("(unnamed)"), Path::to_path_buf);
                Ok(Listener {
                    inner: Inner::Unix {
                        listener,
                        path,
                        id: None,
                    },
                })
            }
            libc::AF_INET | libc::AF_INET6 => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Ok(Listener {
                    inner: Inner::Tcp(TcpListener::from_std(l)?),
                })
            }
            family => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket from systemd has address family {family}, not Unix or TCP"),
            )),
        }
    }

    /// The address actually bound (the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match &self.inner {
            Inner::Unix { path, .. } => Ok(ListenAddr::Unix(path.clone())),
            Inner::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
        }
    }

    async fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.inner {
            Inner::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                let peer = match s.peer_cred().ok().and_then(|c| c.pid()) {
                    Some(pid) => format!("unix pid {pid}"),
                    None => "unix".to_owned(),
                };
                Ok((Stream::Unix(s), peer))
            }
            Inner::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Inner::Unix {
            path, id: Some(id), ..
        } = &self.inner
            && let Ok(m) = std::fs::symlink_metadata(path)
            && (m.dev(), m.ino()) == *id
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<Listener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{}: another server is listening on this socket",
                        path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                debug!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{file}.{}.{}.{nanos:x}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = UnixListener::bind(&tmp)?;
    let finish = || -> io::Result<(u64, u64)> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok((m.dev(), m.ino()))
    };
    match finish() {
        Ok(id) => Ok(Listener {
            inner: Inner::Unix {
                listener,
                path: path.to_owned(),
                id: Some(id),
            },
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// What every connection task shares.
struct Shared<B> {
    exports: Vec<Export<B>>,
    config: ServerConfig,
    /// STARTTLS offered (or required), when set.
    tls: Option<Tls>,
}

/// An NBD server: exports, limits, TLS, and the accept loop.
pub struct Server<B: Backend> {
    shared: Shared<B>,
}

impl<B: Backend> fmt::Debug for Server<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field(
                "exports",
                &self
                    .shared
                    .exports
                    .iter()
                    .map(|e| &e.name)
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.shared.config)
            .field("tls", &self.shared.tls)
            .finish()
    }
}

impl<B: Backend> Server<B> {
    /// A server for `exports` with `config` limits.
    pub fn new(exports: Vec<Export<B>>, config: ServerConfig) -> Self {
        for (i, e) in exports.iter().enumerate() {
            if exports[..i].iter().any(|o| o.name == e.name) {
                warn!(export = %e.name, "duplicate export name; only the first is reachable");
            }
        }
        Self {
            shared: Shared {
                exports,
                config,
                tls: None,
            },
        }
    }

    /// Offers STARTTLS with `tls` (nothing changes with `None`).
    pub fn with_tls(mut self, tls: Option<Tls>) -> Self {
        self.shared.tls = tls;
        self
    }

    /// Serves until `shutdown` fires. Then it stops accepting, lets each
    /// connection finish the requests it has in flight (requests that still
    /// arrive get ESHUTDOWN, options ERR_SHUTDOWN), waits for all of them,
    /// removes the Unix socket file, and returns.
    ///
    /// A backend call that never returns holds up the shutdown, since its
    /// request must be answered first.
    ///
    /// Accept errors are logged and retried with back-off; the only errors
    /// returned are ones that make serving impossible.
    pub async fn run(self, listener: Listener, shutdown: CancellationToken) -> io::Result<()> {
        ignore_sigpipe();
        let addr = listener.local_addr()?;
        let tls = match &self.shared.tls {
            None => "off",
            Some(t) if t.required() => "required",
            Some(_) => "on",
        };
        info!(%addr, exports = self.shared.exports.len(), tls, "NBD server listening");
        let shared = Arc::new(self.shared);
        let slots = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));
        let tracker = TaskTracker::new();
        let mut backoff = Duration::from_millis(1);
        let mut conn_id: u64 = 0;
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = Arc::clone(&slots).acquire_owned() => p.expect("connection semaphore is never closed"),
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(s) => {
                    backoff = Duration::from_millis(1);
                    s
                }
                Err(e) => {
                    warn!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            };
            conn_id += 1;
            let shared = Arc::clone(&shared);
            let shutdown = shutdown.clone();
            let span = info_span!("nbd_conn", id = conn_id, peer = %peer);
            tracker.spawn(
                async move {
                    debug!("connected");
                    match stream {
                        Stream::Unix(s) => serve_connection(&shared, s, &shutdown).await,
                        Stream::Tcp(s) => serve_connection(&shared, s, &shutdown).await,
                    }
                    debug!("connection closed");
                    drop(permit);
                }
                .instrument(span),
            );
        }
        info!(%addr, "NBD server shutting down; waiting for connections");
        tracker.close();
        tracker.wait().await;
        drop(listener);
        info!(%addr, "NBD server stopped");
        Ok(())
    }
}

/// A plain socket that splits into owned halves (no lock between the
/// reader and the reply writer) and can be put together again for
/// STARTTLS.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::R, Self::W);
    fn reunite(r: Self::R, w: Self::W) -> io::Result<Self>;
}

impl Socket for TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn reunite(r: Self::R, w: Self::W) -> io::Result<Self> {
        r.reunite(w).map_err(io::Error::other)
    }
}

impl Socket for UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
    fn reunite(r: Self::R, w: Self::W) -> io::Result<Self> {
        r.reunite(w).map_err(io::Error::other)
    }
}

/// An in-memory pipe (the fuzz targets' client connection): its halves
/// share a lock, which costs nothing there.
impl Socket for tokio::io::DuplexStream {
    type R = ReadHalf<tokio::io::DuplexStream>;
    type W = WriteHalf<tokio::io::DuplexStream>;
    fn into_halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
    fn reunite(r: Self::R, w: Self::W) -> io::Result<Self> {
        Ok(r.unsplit(w))
    }
}

impl<B: Backend> Server<B> {
    /// Serves one client that is already connected over the in-memory
    /// pipe `stream` (the fuzz targets in `fuzz/` drive the real handshake,
    /// STARTTLS included when offered, and transmission code this way).
    /// Handshake deadline, exports and byte budget are this server's; the
    /// connection limit does not apply. Returns when the connection has
    /// ended and every request in flight was answered.
    pub async fn serve_stream(
        &self,
        stream: tokio::io::DuplexStream,
        shutdown: &CancellationToken,
    ) {
        serve_connection(&self.shared, stream, shutdown).await;
    }
}

/// A connection at the end of its handshake, over plain text or TLS.
enum Ready<S: Socket> {
    Plain(BufReader<S::R>, S::W, Negotiated, Vec<u8>),
    Tls(
        BufReader<ReadHalf<TlsStream<S>>>,
        WriteHalf<TlsStream<S>>,
        Negotiated,
        Vec<u8>,
    ),
}

/// Handshake (with STARTTLS when offered), then transmission, on one
/// connection.
async fn serve_connection<B: Backend, S: Socket>(
    shared: &Shared<B>,
    stream: S,
    shutdown: &CancellationToken,
) {
    let timeout = shared.config.handshake_timeout;
    let ready = match tokio::time::timeout(timeout, handshake_phase(shared, stream, shutdown)).await
    {
        Err(_) => {
            let e = ProtocolError::HandshakeTimeout {
                secs: timeout.as_secs(),
            };
            warn!(error = %e, "closing connection");
            return;
        }
        Ok(Err(ProtocolError::Io(e))) => {
            debug!(error = %e, "connection lost during handshake");
            return;
        }
        Ok(Err(e)) => {
            warn!(error = %e, "closing connection during handshake");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(ready))) => ready,
    };
    match ready {
        Ready::Plain(r, w, n, reply) => transmit(shared, r, w, n, reply, false, shutdown).await,
        Ready::Tls(r, w, n, reply) => transmit(shared, r, w, n, reply, true, shutdown).await,
    }
}

/// The option phase, with the TLS upgrade in the middle when the client
/// asks for it. `None` when the connection ended without an export.
async fn handshake_phase<B: Backend, S: Socket>(
    shared: &Shared<B>,
    stream: S,
    shutdown: &CancellationToken,
) -> Result<Option<Ready<S>>, ProtocolError> {
    let (r, mut w) = stream.into_halves();
    let mut reader = BufReader::with_capacity(READ_BUFFER, r);
    let Some(mut carry) = handshake::greet(&mut reader, &mut w, shutdown).await? else {
        return Ok(None);
    };
    let phase = match &shared.tls {
        None => TlsPhase::Unavailable,
        Some(t) => TlsPhase::Offered {
            required: t.required(),
        },
    };
    let outcome = handshake::negotiate(
        &mut reader,
        &mut w,
        &shared.exports,
        shutdown,
        phase,
        &mut carry,
    )
    .await?;
    match outcome {
        Outcome::Closed => Ok(None),
        Outcome::Transmission(n, reply) => Ok(Some(Ready::Plain(reader, w, n, reply))),
        Outcome::StartTls => {
            let tls = shared
                .tls
                .as_ref()
                .expect("STARTTLS is only accepted with TLS");
            // negotiate checked that nothing is buffered past STARTTLS.
            let stream = S::reunite(reader.into_inner(), w)?;
            let stream = match tls.acceptor().accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "TLS handshake failed");
                    return Ok(None);
                }
            };
            debug!("TLS established");
            let (r, mut w) = tokio::io::split(stream);
            let mut reader = BufReader::with_capacity(READ_BUFFER, r);
            let outcome = handshake::negotiate(
                &mut reader,
                &mut w,
                &shared.exports,
                shutdown,
                TlsPhase::Active,
                &mut carry,
            )
            .await?;
            match outcome {
                Outcome::Transmission(n, reply) => Ok(Some(Ready::Tls(reader, w, n, reply))),
                Outcome::Closed => {
                    // Send TLS close_notify before the socket closes.
                    let _ = w.shutdown().await;
                    Ok(None)
                }
                Outcome::StartTls => unreachable!("a second STARTTLS is refused"),
            }
        }
    }
}

/// Sends the final handshake reply and runs the transmission phase.
async fn transmit<B, R, W>(
    shared: &Shared<B>,
    reader: BufReader<R>,
    mut w: W,
    negotiated: Negotiated,
    final_reply: Vec<u8>,
    tls: bool,
    shutdown: &CancellationToken,
) where
    B: Backend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = &shared.exports[negotiated.export];
    // Tell the backend before the client sees the final reply, so by the
    // time the client's open returns the backend knows of it.
    export.backend.connected();
    let sent = async {
        w.write_all(&final_reply).await?;
        w.flush().await
    }
    .await;
    if let Err(e) = sent {
        debug!(error = %e, "connection lost sending the final handshake reply");
        export.backend.disconnected(false);
        return;
    }
    info!(export = %export.name, mode = ?negotiated.mode, flags = negotiated.flags, tls, "client entered transmission");
    let session = Session {
        backend: Arc::clone(&export.backend),
        export: Arc::from(export.name.as_str()),
        negotiated,
        max_bytes_in_flight: shared.config.max_bytes_in_flight,
        memory: shared.config.memory.as_ref().map(MemoryBudget::share),
        payload_timeout: shared.config.payload_timeout,
    };
    let clean = transmission::serve(reader, w, session, shutdown).await;
    info!(export = %export.name, clean, "client disconnected");
    export.backend.disconnected(clean);
}

/// Makes sure a write to a closed socket yields EPIPE instead of killing
/// the process. Rust binaries already ignore SIGPIPE; a host program
/// (or a test harness) might not.
fn ignore_sigpipe() {
    // SAFETY: querying and setting a signal disposition; SIG_IGN has no
    // handler code that could run concurrently.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_DFL
        {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_parses_and_displays() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "tcp::10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "tcp:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(
            "tcp:localhost:1".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            "tcp:[::1]:5".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:5".parse().unwrap())
        );
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:host:1",
            "tcp:1.2.3.4:99999",
            "udp:1",
            "systemd:",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "systemd".parse::<ListenAddr>().unwrap(),
            ListenAddr::Systemd
        );
        for s in ["unix:/a/b", "tcp:127.0.0.1:80", "tcp:[::1]:5", "systemd"] {
            assert_eq!(s.parse::<ListenAddr>().unwrap().to_string(), s);
        }
    }
}
