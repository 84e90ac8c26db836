//! A small async client for QEMU's JSON monitor (QMP).
//!
//! Owns: the Unix-socket connection, the greeting and the `qmp_capabilities`
//! negotiation, [`Qmp::execute`] (usable from several tasks at once), the
//! event stream ([`Qmp::subscribe`]), typed QEMU error classes, and thin typed
//! wrappers for the commands and events a live backup needs
//! (`query-named-block-nodes`, `blockdev-add` of an NBD client node, a
//! `transaction` of `blockdev-backup`s, `block-job-cancel`, ...).
//!
//! Leaves to others: starting QEMU ([`crate::qemu`]) and everything NBD or
//! VMA. The NBD server is only ever named here by its socket address.
//!
//! # How it works
//!
//! [`Qmp::connect`] reads the greeting, then splits the socket between two
//! tasks. The reader task parses one JSON message per line: replies are routed
//! by their `id` to the waiting [`Qmp::execute`] call, events are broadcast to
//! every [`EventStream`]. The writer task sends queued command lines in order,
//! so a cancelled `execute` never tears a message in half. When the
//! connection is lost (EOF, I/O error, or a message that is not QMP), every
//! pending command fails at once with [`Error::Closed`] and every event
//! stream ends with the same error after handing out the events that arrived
//! before.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How long [`Qmp::connect`] may take for connect, greeting and
/// `qmp_capabilities` together. A QMP socket serves one client at a time: a
/// second client's connect succeeds but its greeting only comes once the
/// first one leaves, so this is also what a busy monitor looks like.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default limit for one command in [`Qmp::execute`]. Generous: `blockdev-add`
/// of an NBD node runs the NBD handshake inside the command. Use
/// [`Qmp::execute_with_timeout`] for another limit.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest QMP message (one line) we accept. `query-named-block-nodes` on a
/// VM with long backing chains is the largest reply we ask for, and stays far
/// below this; a longer line closes the connection with [`Error::Closed`].
pub const MAX_MESSAGE_LEN: usize = 16 << 20;

/// Events buffered per [`EventStream`]. QEMU sends a handful of events per
/// block job; a stream that falls this far behind gets
/// [`Error::EventsLost`] instead of unbounded memory use.
pub const EVENT_BUFFER: usize = 1024;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU answered the command with `{"error": {"class", "desc"}}`.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed, e.g. `blockdev-del`.
        command: String,
        /// QEMU's error class.
        class: ErrorClass,
        /// QEMU's human-readable message.
        desc: String,
    },
    /// Connecting to or talking over the socket failed.
    #[error("QMP {op}: {source}")]
    Io {
        /// What we were doing, with the socket path when known.
        op: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A message was not what QMP allows at that point.
    #[error("QMP protocol error: {what}: {text}")]
    Protocol {
        /// What was wrong.
        what: String,
        /// The offending text (truncated when long).
        text: String,
    },
    /// The connection is gone; no reply or event will come any more.
    #[error("QMP connection closed: {reason}")]
    Closed {
        /// Why: EOF from QEMU, an I/O error, a protocol error, or the client
        /// was dropped.
        reason: String,
    },
    /// Nothing arrived within the limit.
    #[error("QMP {what} timed out after {timeout:?}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// The limit that passed.
        timeout: Duration,
    },
    /// An [`EventStream`] fell more than [`EVENT_BUFFER`] events behind and
    /// the oldest ones were dropped.
    #[error("QMP event stream fell behind: {count} events lost (buffer {EVENT_BUFFER})")]
    EventsLost {
        /// How many events were dropped.
        count: u64,
    },
}

/// The error classes QEMU reports in `{"error": {"class": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// Almost every error: bad arguments, unknown node, permission conflict.
    GenericError,
    /// The command does not exist in this QEMU (or is not allowed yet).
    CommandNotFound,
    /// A device has no medium, or a job is not in the right state.
    DeviceNotActive,
    /// No device or job with that name.
    DeviceNotFound,
    /// KVM lacks a capability.
    KVMMissingCap,
    /// A class this client does not know.
    Other(String),
}

impl ErrorClass {
    /// Maps QEMU's spelling to the enum.
    pub fn parse(s: &str) -> ErrorClass {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            other => ErrorClass::Other(other.to_string()),
        }
    }

    /// QEMU's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QemuVersion {
    /// e.g. 10 for 10.0.2.
    pub major: u32,
    /// e.g. 0 for 10.0.2.
    pub minor: u32,
    /// e.g. 2 for 10.0.2.
    pub micro: u32,
    /// Distribution build string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// When QEMU emitted an event (its own clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch; -1 when QEMU could not read the clock.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// As a `SystemTime`, or `None` when QEMU sent an invalid time.
    pub fn to_system_time(self) -> Option<SystemTime> {
        let secs = u64::try_from(self.seconds).ok()?;
        let micros = u64::try_from(self.microseconds).ok()?;
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
    }
}

/// One QMP event, untyped. See [`Event::typed`] for the block-job events.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// The `data` member (`Value::Null` when absent).
    pub data: Value,
    /// QEMU's timestamp.
    pub timestamp: Timestamp,
}

/// Where a QEMU NBD client connects to, or a QEMU NBD server listens on
/// (QAPI `SocketAddress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A Unix socket path.
    Unix(PathBuf),
    /// TCP; `port` is a string in QAPI (it may be a service name).
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
    },
}

impl SocketAddress {
    /// The flat QAPI form (`{"type":"unix","path":...}`) used by
    /// `blockdev-add`'s `server` and `nbd-server-start`'s `addr`.
    pub fn to_qapi(&self) -> Value {
        match self {
            SocketAddress::Unix(p) => json!({"type": "unix", "path": p.to_string_lossy()}),
            SocketAddress::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port})
            }
        }
    }
}

impl From<&Path> for SocketAddress {
    fn from(p: &Path) -> Self {
        SocketAddress::Unix(p.to_path_buf())
    }
}

impl From<PathBuf> for SocketAddress {
    fn from(p: PathBuf) -> Self {
        SocketAddress::Unix(p)
    }
}

impl From<&PathBuf> for SocketAddress {
    fn from(p: &PathBuf) -> Self {
        SocketAddress::Unix(p.clone())
    }
}

/// A block node as `query-named-block-nodes` (and, for drives attached to a
/// guest device, `query-block`) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    /// The node name; what `blockdev-backup`'s `device` takes.
    pub node_name: String,
    /// The drive (BlockBackend) name, or else the guest device's qdev id,
    /// when a device has this node inserted. `None` in qemu-storage-daemon.
    pub drive_name: Option<String>,
    /// Exact virtual size in bytes; the NBD export must have this size.
    pub size: u64,
    /// The node is opened read-only.
    pub read_only: bool,
    /// Block driver: the format (`raw`, `qcow2`, ...) or protocol (`file`).
    pub driver: String,
    /// The file name QEMU reports for the node.
    pub filename: String,
}

/// One `blockdev-backup` of a [`Qmp::blockdev_backup_transaction`], always
/// `sync: full`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJob {
    /// Job id; events name the job by it (their `device` field).
    pub job_id: String,
    /// Source node name (or drive name).
    pub device: String,
    /// Target node name, e.g. the one [`Qmp::blockdev_add_nbd`] added.
    pub target: String,
    /// Rate limit in bytes per second; `None` is unlimited.
    pub speed: Option<u64>,
    /// Name of the copy-before-write filter the job inserts over `device`,
    /// so that it can be addressed while the job runs.
    pub filter_node_name: Option<String>,
}

/// States of a QEMU job (QAPI `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Copying.
    Running,
    /// Paused (also briefly at the start of a job).
    Paused,
    /// Mirror jobs: in sync.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for other jobs of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failing or being cancelled.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

/// One block job as `query-block-jobs` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobInfo {
    /// The job id (QEMU calls it `device` here).
    pub device: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Total amount of work, in bytes for a backup.
    pub len: u64,
    /// Work done so far.
    pub offset: u64,
    /// Rate limit in bytes per second, 0 for none.
    pub speed: u64,
    /// Job state.
    pub status: JobStatus,
    /// Error message, when the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// `BLOCK_JOB_COMPLETED` and `BLOCK_JOB_CANCELLED`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobEnd {
    /// The job id.
    pub device: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Total amount of work.
    pub len: u64,
    /// Work done when it ended.
    pub offset: u64,
    /// Rate limit, 0 for none.
    pub speed: u64,
    /// Set when the job failed (only on `BLOCK_JOB_COMPLETED`).
    #[serde(default)]
    pub error: Option<String>,
}

/// `BLOCK_JOB_ERROR`: an I/O error hit a job (the job usually ends with a
/// `BLOCK_JOB_COMPLETED` carrying `error` afterwards).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobError {
    /// The job id.
    pub device: String,
    /// `read` or `write`.
    pub operation: String,
    /// What QEMU does about it: `report`, `ignore` or `stop`.
    pub action: String,
}

/// `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobStatusChange {
    /// The job id.
    pub id: String,
    /// The new state.
    pub status: JobStatus,
}

/// The events a backup waits for, parsed. See [`Event::typed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `BLOCK_JOB_COMPLETED`; check `error`.
    Completed(BlockJobEnd),
    /// `BLOCK_JOB_CANCELLED`.
    Cancelled(BlockJobEnd),
    /// `BLOCK_JOB_ERROR`.
    Error(BlockJobError),
    /// `JOB_STATUS_CHANGE`.
    StatusChange(JobStatusChange),
}

impl JobEvent {
    /// The job the event is about.
    pub fn job_id(&self) -> &str {
        match self {
            JobEvent::Completed(e) | JobEvent::Cancelled(e) => &e.device,
            JobEvent::Error(e) => &e.device,
            JobEvent::StatusChange(e) => &e.id,
        }
    }
}

/// How one block job ended; see [`EventStream::wait_jobs_ended`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// True for `BLOCK_JOB_CANCELLED`, false for `BLOCK_JOB_COMPLETED`.
    pub cancelled: bool,
    /// The event's data; `end.device` is the job id.
    pub end: BlockJobEnd,
}

impl JobOutcome {
    /// Completed, without error, and copied everything.
    pub fn is_success(&self) -> bool {
        !self.cancelled && self.end.error.is_none() && self.end.offset == self.end.len
    }
}

impl Event {
    /// Parses the job events; `Ok(None)` for any other event, an
    /// [`Error::Protocol`] when a job event lacks a field.
    pub fn typed(&self) -> Result<Option<JobEvent>, Error> {
        fn parse<T: for<'de> Deserialize<'de>>(ev: &Event) -> Result<T, Error> {
            T::deserialize(&ev.data).map_err(|e| Error::Protocol {
                what: format!("bad {} event: {e}", ev.name),
                text: clip(&ev.data.to_string()),
            })
        }
        Ok(Some(match self.name.as_str() {
            "BLOCK_JOB_COMPLETED" => JobEvent::Completed(parse(self)?),
            "BLOCK_JOB_CANCELLED" => JobEvent::Cancelled(parse(self)?),
            "BLOCK_JOB_ERROR" => JobEvent::Error(parse(self)?),
            "JOB_STATUS_CHANGE" => JobEvent::StatusChange(parse(self)?),
            _ => return Ok(None),
        }))
    }
}

/// One message from QEMU, decoded.
#[derive(Debug, Clone, PartialEq)]
enum Message {
    Greeting(QemuVersion),
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: ErrorClass,
        desc: String,
    },
    Event(Event),
}

/// Longest piece of a bad message quoted in an error.
const MAX_QUOTE: usize = 512;

fn clip(s: &str) -> String {
    if s.len() <= MAX_QUOTE {
        return s.to_string();
    }
    let mut end = MAX_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// Decodes one line from QEMU (pure; no IO).
fn decode(line: &[u8]) -> Result<Message, Error> {
    let text = || clip(String::from_utf8_lossy(line).trim_end());
    let v: Value = serde_json::from_slice(line).map_err(|e| Error::Protocol {
        what: format!("bad JSON: {e}"),
        text: text(),
    })?;
    let Value::Object(mut obj) = v else {
        return Err(Error::Protocol {
            what: "message is not a JSON object".into(),
            text: text(),
        });
    };
    let bad = |what: &str| Error::Protocol {
        what: what.to_string(),
        text: text(),
    };
    if let Some(g) = obj.remove("QMP") {
        let q = g
            .get("version")
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| bad("greeting without version.qemu"))?;
        let num = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        return Ok(Message::Greeting(QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: g
                .get("version")
                .and_then(|v| v.get("package"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }));
    }
    if let Some(name) = obj.remove("event") {
        let name = name
            .as_str()
            .ok_or_else(|| bad("event name is not a string"))?
            .to_string();
        let timestamp = match obj.remove("timestamp") {
            Some(t) => Timestamp::deserialize(&t).map_err(|_| bad("bad event timestamp"))?,
            None => Timestamp::default(),
        };
        return Ok(Message::Event(Event {
            name,
            data: obj.remove("data").unwrap_or(Value::Null),
            timestamp,
        }));
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let class = err
            .get("class")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("error without class"))?;
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
        return Ok(Message::Error {
            id,
            class: ErrorClass::parse(class),
            desc: desc.to_string(),
        });
    }
    Err(bad("neither greeting, reply nor event"))
}

/// Reads one `\n`-terminated message. `Ok(None)` on EOF between messages;
/// EOF inside a message and lines over [`MAX_MESSAGE_LEN`] are errors.
async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<()>, String> {
    buf.clear();
    loop {
        let avail = rd
            .fill_buf()
            .await
            .map_err(|e| format!("read error: {e}"))?;
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(format!(
                    "QEMU closed the connection inside a message: {}",
                    clip(&String::from_utf8_lossy(buf))
                ))
            };
        }
        let (used, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() + used > MAX_MESSAGE_LEN {
            return Err(format!(
                "message longer than {MAX_MESSAGE_LEN} bytes: {}",
                clip(&String::from_utf8_lossy(buf))
            ));
        }
        buf.extend_from_slice(&avail[..used]);
        rd.consume(used);
        if done {
            return Ok(Some(()));
        }
    }
}

/// A command waiting for its reply.
struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value, Error>>,
}

struct State {
    pending: HashMap<u64, Pending>,
    /// `None` once the connection is closed: dropping the sender ends every
    /// [`EventStream`].
    events: Option<broadcast::Sender<Event>>,
    /// Why the connection closed; set once.
    closed: Option<String>,
}

/// What the reader and writer tasks and the handle share.
struct Shared {
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection closed (the first reason wins), fails every
    /// pending command and ends the event streams.
    fn close(&self, reason: String) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            debug!(%reason, "qmp connection closed");
            st.closed = Some(reason.clone());
            st.events = None;
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            let _ = p.reply.send(Err(Error::Closed {
                reason: reason.clone(),
            }));
        }
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            reason: self
                .lock()
                .closed
                .clone()
                .unwrap_or_else(|| "connection lost".into()),
        }
    }

    fn dispatch(&self, msg: Message) {
        let (id, outcome) = match msg {
            Message::Event(ev) => {
                debug!(event = %ev.name, data = %ev.data, "qmp event");
                if let Some(tx) = &self.lock().events {
                    // Err only means nobody is subscribed right now.
                    let _ = tx.send(ev);
                }
                return;
            }
            Message::Greeting(_) => {
                warn!("qmp: unexpected second greeting ignored");
                return;
            }
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, desc } => (id, Err((class, desc))),
        };
        let Some(id) = id.as_ref().and_then(Value::as_u64) else {
            warn!(?id, ?outcome, "qmp reply without a usable id ignored");
            return;
        };
        let Some(p) = self.lock().pending.remove(&id) else {
            // The caller gave up (timeout or dropped future).
            debug!(id, "qmp reply for a command nobody waits for");
            return;
        };
        let result = outcome.map_err(|(class, desc)| Error::Command {
            command: p.command,
            class,
            desc,
        });
        let _ = p.reply.send(result);
    }
}

async fn reader_task(mut rd: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    let reason = loop {
        match read_line(&mut rd, &mut buf).await {
            Ok(None) => break "QEMU closed the connection".to_string(),
            Err(e) => break e,
            Ok(Some(())) => match decode(&buf) {
                Ok(msg) => shared.dispatch(msg),
                Err(e) => break e.to_string(),
            },
        }
    };
    shared.close(reason);
}

async fn writer_task(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = rx.recv().await {
        if let Err(e) = wr.write_all(&line).await {
            shared.close(format!("write error: {e}"));
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Removes a pending entry when `execute` returns early (timeout, dropped
/// future); a no-op when the reply was already routed.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

/// A QMP connection. Cheap to share by reference between tasks (all methods
/// take `&self`); wrap it in an `Arc` to share across spawned tasks.
pub struct Qmp {
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    reader: JoinHandle<()>,
    version: QemuVersion,
    path: PathBuf,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close("QMP client dropped".into());
        // The writer task ends by itself once `out` is dropped, after
        // sending what is queued.
    }
}

impl Qmp {
    /// Connects to a QMP Unix socket, reads the greeting and negotiates
    /// capabilities, all within [`CONNECT_TIMEOUT`].
    pub async fn connect(path: &Path) -> Result<Qmp, Error> {
        Self::connect_with_timeout(path, CONNECT_TIMEOUT).await
    }

    /// [`Qmp::connect`] with another time limit.
    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        match tokio::time::timeout(timeout, Self::connect_inner(path)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: format!(
                    "connect and greeting on {} (is another client using this monitor?)",
                    path.display()
                ),
                timeout,
            }),
        }
    }

    async fn connect_inner(path: &Path) -> Result<Qmp, Error> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| Error::Io {
                op: format!("connect to {}", path.display()),
                source,
            })?;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut buf = Vec::new();
        let version = match read_line(&mut rd, &mut buf).await {
            Ok(Some(())) => match decode(&buf)? {
                Message::Greeting(v) => v,
                _ => {
                    return Err(Error::Protocol {
                        what: "expected the QMP greeting".into(),
                        text: clip(String::from_utf8_lossy(&buf).trim_end()),
                    });
                }
            },
            Ok(None) => {
                return Err(Error::Closed {
                    reason: format!("{} closed before the greeting", path.display()),
                });
            }
            Err(reason) => return Err(Error::Closed { reason }),
        };
        debug!(path = %path.display(), %version, "qmp greeting");

        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                events: Some(events),
                closed: None,
            }),
            next_id: AtomicU64::new(1),
        });
        let (out, out_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_task(rd, shared.clone()));
        tokio::spawn(writer_task(wr, out_rx, shared.clone()));
        let qmp = Qmp {
            shared,
            out,
            reader,
            version,
            path: path.to_path_buf(),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// The socket path this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once the connection is lost (or was closed).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }

    /// Runs a command and returns its `return` value, within
    /// [`COMMAND_TIMEOUT`]. `args` must be a JSON object when given.
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, Error> {
        self.execute_with_timeout(command, args, COMMAND_TIMEOUT)
            .await
    }

    /// [`Qmp::execute`] with another time limit. On timeout the command may
    /// still run in QEMU; its late reply is dropped.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": command, "id": id});
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value always serializes");
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if let Some(reason) = &st.closed {
                return Err(Error::Closed {
                    reason: reason.clone(),
                });
            }
            st.pending.insert(
                id,
                Pending {
                    command: command.to_string(),
                    reply: tx,
                },
            );
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        debug!(id, command, "qmp execute");
        if self.out.send(line).is_err() {
            return Err(self.shared.closed_error());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => Err(Error::Timeout {
                what: format!("command {command}"),
                timeout,
            }),
        }
    }

    /// Runs a command and deserializes its reply.
    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<T, Error> {
        let v = self.execute(command, args).await?;
        T::deserialize(&v).map_err(|e| Error::Protocol {
            what: format!("unexpected reply to {command}: {e}"),
            text: clip(&v.to_string()),
        })
    }

    /// A new stream of every event QEMU sends from now on. Subscribe before
    /// sending the command that triggers the events you wait for.
    pub fn subscribe(&self) -> EventStream {
        let rx = match &self.shared.lock().events {
            Some(tx) => tx.subscribe(),
            // Closed: a stream that ends at once.
            None => broadcast::channel(1).1,
        };
        EventStream {
            rx,
            shared: self.shared.clone(),
        }
    }

    /// Every named block node (`query-named-block-nodes` with `flat`), with
    /// `drive_name` filled in from `query-block` for nodes a device uses.
    pub async fn block_nodes(&self) -> Result<Vec<BlockNode>, Error> {
        let (nodes, _) = self.nodes_and_drives().await?;
        Ok(nodes)
    }

    async fn nodes_and_drives(&self) -> Result<(Vec<BlockNode>, Vec<RawDrive>), Error> {
        let raw: Vec<RawNode> = self
            .call("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        let drives: Vec<RawBlockInfo> = self.call("query-block", None).await?;
        let drives: Vec<RawDrive> = drives.into_iter().map(RawDrive::from).collect();
        Ok((merge_nodes(raw, &drives), drives))
    }

    /// The nodes `vma-writer backup --all` backs up, in `query-block` order
    /// for a VM and sorted by node name for the storage daemon:
    ///
    /// - When QEMU has drives (`query-block` lists any, i.e. a VM): the top
    ///   node of every drive that has a medium inserted, is not removable
    ///   (CD-ROM, floppy) and is writable. Read-only drives are install
    ///   media or shared images, not VM state.
    /// - Otherwise (qemu-storage-daemon, or a VM with no drives): every node
    ///   that no other block node uses as a child (the roots of
    ///   `x-debug-query-block-graph`), e.g. the `qcow2` node but not the
    ///   `file` node under it; NBD exports and jobs do not count as parents.
    ///   Read-only roots are included: there is no guest, and read-only is
    ///   how `create`/`demo` open source images (QEMU backs them up fine).
    ///   Without that command (it is unstable API), a protocol node (`file`,
    ///   `host_device`) is dropped when another node reports the same file
    ///   name.
    ///
    /// Call it before adding backup targets: NBD target nodes and the
    /// copy-before-write filters of running jobs are roots too.
    pub async fn all_drives(&self) -> Result<Vec<BlockNode>, Error> {
        let (nodes, drives) = self.nodes_and_drives().await?;
        if !drives.is_empty() {
            return Ok(vm_drives(&nodes, &drives));
        }
        let roots = match self
            .call::<RawGraph>("x-debug-query-block-graph", None)
            .await
        {
            Ok(g) => graph_roots(&g),
            Err(Error::Command {
                class: ErrorClass::CommandNotFound,
                ..
            }) => roots_by_filename(&nodes),
            Err(e) => return Err(e),
        };
        let mut out: Vec<BlockNode> = nodes
            .into_iter()
            .filter(|n| roots.contains(&n.node_name))
            .collect();
        out.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        Ok(out)
    }

    /// Adds an NBD client node `node_name` connected to `server`, export
    /// `export`. QEMU runs the NBD handshake inside this command, so a
    /// server that refuses shows up as [`Error::Command`].
    pub async fn blockdev_add_nbd(
        &self,
        node_name: &str,
        server: impl Into<SocketAddress>,
        export: &str,
    ) -> Result<(), Error> {
        let args = json!({
            "driver": "nbd",
            "node-name": node_name,
            "server": server.into().to_qapi(),
            "export": export,
        });
        self.execute("blockdev-add", Some(args)).await.map(drop)
    }

    /// Starts every job in one `transaction` of `blockdev-backup`s with
    /// `sync: full`, so all drives are copied from the same point in time.
    /// Either all jobs start or none does.
    pub async fn blockdev_backup_transaction(&self, jobs: &[BackupJob]) -> Result<(), Error> {
        let actions: Vec<Value> = jobs
            .iter()
            .map(|j| json!({"type": "blockdev-backup", "data": backup_args(j)}))
            .collect();
        self.execute("transaction", Some(json!({ "actions": actions })))
            .await
            .map(drop)
    }

    /// Cancels a block job; a `BLOCK_JOB_CANCELLED` event follows. `force`
    /// matters only for jobs in the ready state (mirror).
    pub async fn block_job_cancel(&self, job_id: &str, force: bool) -> Result<(), Error> {
        self.execute(
            "block-job-cancel",
            Some(json!({"device": job_id, "force": force})),
        )
        .await
        .map(drop)
    }

    /// Changes a job's rate limit (bytes per second, 0 for none).
    pub async fn block_job_set_speed(&self, job_id: &str, speed: u64) -> Result<(), Error> {
        self.execute(
            "block-job-set-speed",
            Some(json!({"device": job_id, "speed": speed})),
        )
        .await
        .map(drop)
    }

    /// Every block job with its progress.
    pub async fn query_block_jobs(&self) -> Result<Vec<JobInfo>, Error> {
        self.call("query-block-jobs", None).await
    }

    /// Removes a node added with `blockdev-add`. For an NBD client node this
    /// makes QEMU send FLUSH and then DISC to the server.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<(), Error> {
        self.execute("blockdev-del", Some(json!({ "node-name": node_name })))
            .await
            .map(drop)
    }

    /// Starts QEMU's NBD server (one per QEMU process).
    pub async fn nbd_server_start(&self, addr: impl Into<SocketAddress>) -> Result<(), Error> {
        let addr = match addr.into() {
            SocketAddress::Unix(p) => {
                json!({"type": "unix", "data": {"path": p.to_string_lossy()}})
            }
            SocketAddress::Inet { host, port } => {
                json!({"type": "inet", "data": {"host": host, "port": port}})
            }
        };
        self.execute("nbd-server-start", Some(json!({ "addr": addr })))
            .await
            .map(drop)
    }

    /// Exports `node_name` over QEMU's NBD server under the name `name`.
    pub async fn block_export_add_nbd(
        &self,
        id: &str,
        node_name: &str,
        name: &str,
        writable: bool,
    ) -> Result<(), Error> {
        let args = json!({
            "type": "nbd",
            "id": id,
            "node-name": node_name,
            "name": name,
            "writable": writable,
        });
        self.execute("block-export-add", Some(args)).await.map(drop)
    }

    /// Asks QEMU to exit. Succeeds also when QEMU closes the connection
    /// before its reply arrives.
    pub async fn quit(&self) -> Result<(), Error> {
        match self.execute("quit", None).await {
            Ok(_) | Err(Error::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn backup_args(j: &BackupJob) -> Value {
    let mut data = json!({
        "job-id": j.job_id,
        "device": j.device,
        "target": j.target,
        "sync": "full",
    });
    if let Some(speed) = j.speed {
        data["speed"] = json!(speed);
    }
    if let Some(f) = &j.filter_node_name {
        data["filter-node-name"] = json!(f);
    }
    data
}

/// The part of `query-named-block-nodes` we use.
#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "node-name")]
    node_name: String,
    ro: bool,
    drv: String,
    #[serde(default)]
    file: String,
    image: RawImage,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

/// The part of `query-block` we use.
#[derive(Deserialize)]
struct RawBlockInfo {
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    removable: bool,
    #[serde(default)]
    inserted: Option<RawInserted>,
}

#[derive(Deserialize)]
struct RawInserted {
    #[serde(rename = "node-name", default)]
    node_name: Option<String>,
}

struct RawDrive {
    device: String,
    qdev: Option<String>,
    removable: bool,
    node_name: Option<String>,
}

impl From<RawBlockInfo> for RawDrive {
    fn from(b: RawBlockInfo) -> RawDrive {
        RawDrive {
            device: b.device,
            qdev: b.qdev,
            removable: b.removable,
            node_name: b.inserted.and_then(|i| i.node_name),
        }
    }
}

/// Prefix of the QOM path of a guest device created with an `id`.
const QOM_PERIPHERAL: &str = "/machine/peripheral/";

impl RawDrive {
    /// The drive's name: its BlockBackend name (`-drive id=`), else the
    /// guest device's id (taken from a `/machine/peripheral/ID/...` QOM
    /// path), else the whole qdev path.
    fn name(&self) -> Option<String> {
        if !self.device.is_empty() {
            return Some(self.device.clone());
        }
        let qdev = self.qdev.as_deref().filter(|q| !q.is_empty())?;
        let id = qdev
            .strip_prefix(QOM_PERIPHERAL)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or(qdev);
        Some(id.to_string())
    }
}

/// Builds [`BlockNode`]s, naming the drive of nodes a device uses.
fn merge_nodes(raw: Vec<RawNode>, drives: &[RawDrive]) -> Vec<BlockNode> {
    raw.into_iter()
        .map(|n| {
            let drive_name = drives
                .iter()
                .find(|d| d.node_name.as_deref() == Some(n.node_name.as_str()))
                .and_then(RawDrive::name);
            BlockNode {
                node_name: n.node_name,
                drive_name,
                size: n.image.virtual_size,
                read_only: n.ro,
                driver: n.drv,
                filename: n.file,
            }
        })
        .collect()
}

/// `--all` on a VM: the top node of each non-removable drive with a medium,
/// when writable, in `query-block` order.
fn vm_drives(nodes: &[BlockNode], drives: &[RawDrive]) -> Vec<BlockNode> {
    drives
        .iter()
        .filter(|d| !d.removable)
        .filter_map(|d| {
            let name = d.node_name.as_deref()?;
            nodes.iter().find(|n| n.node_name == name)
        })
        .filter(|n| !n.read_only)
        .cloned()
        .collect()
}

/// `x-debug-query-block-graph`.
#[derive(Deserialize)]
struct RawGraph {
    nodes: Vec<RawGraphNode>,
    edges: Vec<RawGraphEdge>,
}

#[derive(Deserialize)]
struct RawGraphNode {
    id: u64,
    #[serde(rename = "type")]
    node_type: String,
    name: String,
}

#[derive(Deserialize)]
struct RawGraphEdge {
    parent: u64,
    child: u64,
}

/// Named block-driver nodes with no block-driver parent.
fn graph_roots(g: &RawGraph) -> Vec<String> {
    let is_driver = |id: u64| {
        g.nodes
            .iter()
            .any(|n| n.id == id && n.node_type == "block-driver")
    };
    g.nodes
        .iter()
        .filter(|n| n.node_type == "block-driver" && !n.name.is_empty())
        .filter(|n| {
            !g.edges
                .iter()
                .any(|e| e.child == n.id && is_driver(e.parent))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// Fallback without the graph: drop protocol nodes that share their file
/// name with another node (the format node over them).
fn roots_by_filename(nodes: &[BlockNode]) -> Vec<String> {
    const PROTOCOL_DRIVERS: &[&str] = &["file", "host_device", "host_cdrom"];
    nodes
        .iter()
        .filter(|n| {
            !(PROTOCOL_DRIVERS.contains(&n.driver.as_str())
                && nodes.iter().any(|o| {
                    o.node_name != n.node_name
                        && o.filename == n.filename
                        && !PROTOCOL_DRIVERS.contains(&o.driver.as_str())
                }))
        })
        .map(|n| n.node_name.clone())
        .collect()
}

/// Events from one [`Qmp`] connection, from the moment of
/// [`Qmp::subscribe`] on. Holds at most [`EVENT_BUFFER`] unread events.
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
    shared: Arc<Shared>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event. After the connection is lost, the events that came
    /// before are still handed out, then [`Error::Closed`] every time.
    /// [`Error::EventsLost`] says the stream fell behind; the next call goes
    /// on with the oldest event still buffered.
    pub async fn recv(&mut self) -> Result<Event, Error> {
        match self.rx.recv().await {
            Ok(ev) => Ok(ev),
            Err(broadcast::error::RecvError::Closed) => Err(self.shared.closed_error()),
            Err(broadcast::error::RecvError::Lagged(count)) => Err(Error::EventsLost { count }),
        }
    }

    /// Waits up to `timeout` for the first event `pred` accepts; events it
    /// rejects are dropped.
    pub async fn wait_for<F>(&mut self, timeout: Duration, mut pred: F) -> Result<Event, Error>
    where
        F: FnMut(&Event) -> bool,
    {
        let wait = async {
            loop {
                let ev = self.recv().await?;
                if pred(&ev) {
                    return Ok(ev);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: "wait for event".into(),
                timeout,
            }),
        }
    }

    /// Waits up to `timeout` (in total) until every job in `job_ids` has
    /// sent `BLOCK_JOB_COMPLETED` or `BLOCK_JOB_CANCELLED`, in any order,
    /// and returns the outcomes in the order of `job_ids`. Other events are
    /// dropped. Not cancel-safe: outcomes seen so far are lost when the
    /// future is dropped; a lost connection ends it with [`Error::Closed`].
    pub async fn wait_jobs_ended<S: AsRef<str>>(
        &mut self,
        job_ids: &[S],
        timeout: Duration,
    ) -> Result<Vec<JobOutcome>, Error> {
        let mut found: Vec<Option<JobOutcome>> = vec![None; job_ids.len()];
        let wait = async {
            while found.iter().any(Option::is_none) {
                let ev = self.recv().await?;
                let (cancelled, end) = match ev.typed()? {
                    Some(JobEvent::Completed(end)) => (false, end),
                    Some(JobEvent::Cancelled(end)) => (true, end),
                    _ => continue,
                };
                if let Some(i) = job_ids.iter().position(|j| j.as_ref() == end.device) {
                    found[i] = Some(JobOutcome { cancelled, end });
                }
            }
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout {
                    what: "wait for block jobs to end".into(),
                    timeout,
                });
            }
        }
        Ok(found.into_iter().flatten().collect())
    }
}

/// Free-function form of [`EventStream::wait_for`].
pub async fn wait_event<F>(
    events: &mut EventStream,
    pred: F,
    timeout: Duration,
) -> Result<Event, Error>
where
    F: FnMut(&Event) -> bool,
{
    events.wait_for(timeout, pred).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#;
        let Message::Greeting(v) = decode(line).unwrap() else {
            panic!("not a greeting")
        };
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
        assert_eq!(v.to_string(), "10.0.2 (Debian 1:10.0.2+ds-2)");
    }

    #[test]
    fn replies() {
        assert_eq!(
            decode(b"{\"return\": {}, \"id\": 7}\r\n").unwrap(),
            Message::Return {
                id: Some(json!(7)),
                value: json!({})
            }
        );
        assert_eq!(
            decode(br#"{"id": 3, "error": {"class": "GenericError", "desc": "Failed to find node with node-name='x'"}}"#)
                .unwrap(),
            Message::Error {
                id: Some(json!(3)),
                class: ErrorClass::GenericError,
                desc: "Failed to find node with node-name='x'".into()
            }
        );
        let Message::Error { id, class, .. } =
            decode(br#"{"error": {"class": "SomethingNew", "desc": ""}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(id, None);
        assert_eq!(class, ErrorClass::Other("SomethingNew".into()));
        assert_eq!(class.to_string(), "SomethingNew");
    }

    #[test]
    fn bad_messages() {
        for line in [
            &b"garbage"[..],
            b"[1,2]",
            b"{\"foo\": 1}",
            b"{\"error\": {\"desc\": \"no class\"}}",
            b"{\"event\": 5}",
            b"{\"QMP\": {}}",
        ] {
            assert!(
                matches!(decode(line), Err(Error::Protocol { .. })),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let Err(Error::Protocol { text, .. }) = decode(b"not json") else {
            panic!()
        };
        assert_eq!(text, "not json");
    }

    #[test]
    fn long_text_is_clipped() {
        let s = "é".repeat(1000);
        let c = clip(&s);
        assert!(c.len() < MAX_QUOTE + 40);
        assert!(c.ends_with("(2000 bytes)"));
    }

    fn event(line: &[u8]) -> Event {
        match decode(line).unwrap() {
            Message::Event(e) => e,
            m => panic!("not an event: {m:?}"),
        }
    }

    #[test]
    fn job_events() {
        let ev = event(
            br#"{"timestamp": {"seconds": 1795767188, "microseconds": 791307}, "event": "BLOCK_JOB_COMPLETED", "data": {"device": "backup-drive0", "len": 10486272, "offset": 10486272, "speed": 0, "type": "backup"}}"#,
        );
        assert_eq!(ev.timestamp.seconds, 1795767188);
        assert!(ev.timestamp.to_system_time().is_some());
        let want = BlockJobEnd {
            device: "backup-drive0".into(),
            job_type: "backup".into(),
            len: 10486272,
            offset: 10486272,
            speed: 0,
            error: None,
        };
        assert_eq!(ev.typed().unwrap(), Some(JobEvent::Completed(want)));

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_COMPLETED", "data": {"device": "j", "len": 100, "offset": 50, "speed": 0, "type": "backup", "error": "Input/output error"}}"#,
        );
        let Some(JobEvent::Completed(end)) = ev.typed().unwrap() else {
            panic!()
        };
        assert_eq!(end.error.as_deref(), Some("Input/output error"));

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_CANCELLED", "data": {"device": "j", "len": 100, "offset": 50, "speed": 1024, "type": "backup"}}"#,
        );
        let typed = ev.typed().unwrap().unwrap();
        assert!(matches!(typed, JobEvent::Cancelled(ref e) if e.speed == 1024));
        assert_eq!(typed.job_id(), "j");

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_ERROR", "data": {"device": "j", "operation": "write", "action": "report"}}"#,
        );
        assert_eq!(
            ev.typed().unwrap(),
            Some(JobEvent::Error(BlockJobError {
                device: "j".into(),
                operation: "write".into(),
                action: "report".into()
            }))
        );

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "j"}}"#,
        );
        assert_eq!(
            ev.typed().unwrap(),
            Some(JobEvent::StatusChange(JobStatusChange {
                id: "j".into(),
                status: JobStatus::Waiting
            }))
        );
        let ev =
            event(br#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "brand-new", "id": "j"}}"#);
        assert!(matches!(
            ev.typed().unwrap(),
            Some(JobEvent::StatusChange(JobStatusChange {
                status: JobStatus::Unknown,
                ..
            }))
        ));

        let ev = event(br#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": {"seconds": 1, "microseconds": 0}}"#);
        assert_eq!(ev.typed().unwrap(), None);

        let ev = event(br#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j"}}"#);
        assert!(matches!(ev.typed(), Err(Error::Protocol { .. })));
        let ev = event(br#"{"event": "X", "timestamp": {"seconds": -1, "microseconds": -1}}"#);
        assert_eq!(ev.data, Value::Null);
        assert_eq!(ev.timestamp.to_system_time(), None);
    }

    #[test]
    fn job_info() {
        let v = json!([{"auto-finalize": true, "io-status": "ok", "device": "backup-a", "auto-dismiss": true, "busy": false, "len": 10486272, "offset": 1048576, "status": "running", "paused": false, "speed": 1048576, "ready": false, "type": "backup"}]);
        let jobs: Vec<JobInfo> = Deserialize::deserialize(&v).unwrap();
        assert_eq!(jobs[0].device, "backup-a");
        assert_eq!(jobs[0].status, JobStatus::Running);
        assert_eq!(jobs[0].speed, 1048576);
    }

    #[test]
    fn backup_job_args() {
        let j = BackupJob {
            job_id: "backup-a".into(),
            device: "a".into(),
            target: "nbd-a".into(),
            speed: Some(4096),
            filter_node_name: Some("cbw-a".into()),
        };
        assert_eq!(
            backup_args(&j),
            json!({"job-id": "backup-a", "device": "a", "target": "nbd-a", "sync": "full", "speed": 4096, "filter-node-name": "cbw-a"})
        );
        let j = BackupJob {
            speed: None,
            filter_node_name: None,
            ..j
        };
        assert_eq!(
            backup_args(&j),
            json!({"job-id": "backup-a", "device": "a", "target": "nbd-a", "sync": "full"})
        );
    }

    #[test]
    fn roots_of_graph() {
        // As qemu-storage-daemon 10.0 answers with an NBD export on "a".
        let v = json!({"edges": [
            {"name": "file", "parent": 5, "child": 4, "perm": [], "shared-perm": []},
            {"name": "file", "parent": 2, "child": 3, "perm": [], "shared-perm": []},
            {"name": "root", "parent": 1, "child": 2, "perm": [], "shared-perm": []}],
          "nodes": [
            {"name": "b", "type": "block-driver", "id": 5},
            {"name": "b-file", "type": "block-driver", "id": 4},
            {"name": "a", "type": "block-driver", "id": 2},
            {"name": "a-file", "type": "block-driver", "id": 3},
            {"name": "", "type": "block-backend", "id": 1}]});
        let g: RawGraph = Deserialize::deserialize(&v).unwrap();
        assert_eq!(graph_roots(&g), vec!["b".to_string(), "a".to_string()]);
    }

    #[test]
    fn vm_drive_selection() {
        // Shaped like qemu-system-x86_64 10.0: a -drive disk, a -blockdev
        // disk on a device with an id, a read-only disk, an empty CD-ROM and
        // a CD-ROM with a medium.
        let blocks = json!([
            {"device": "drive-virtio0", "qdev": "/machine/peripheral/virtio0/virtio-backend",
             "removable": false, "locked": false, "type": "unknown",
             "inserted": {"node-name": "#block123", "ro": false, "drv": "qcow2"}},
            {"device": "", "qdev": "/machine/peripheral/scsi0/virtio-backend",
             "removable": false, "locked": false, "type": "unknown",
             "inserted": {"node-name": "drive-scsi0", "ro": false, "drv": "raw"}},
            {"device": "", "qdev": "ro-disk", "removable": false, "locked": false,
             "type": "unknown", "inserted": {"node-name": "ro0", "ro": true, "drv": "raw"}},
            {"device": "ide2-cd0", "qdev": "ide2", "removable": true, "locked": false,
             "tray_open": false, "type": "unknown"},
            {"device": "ide3-cd0", "qdev": "ide3", "removable": true, "locked": false,
             "tray_open": false, "type": "unknown",
             "inserted": {"node-name": "#block9", "ro": true, "drv": "raw"}}
        ]);
        let node = |name: &str, size: u64, ro: bool, drv: &str| {
            json!({"node-name": name, "ro": ro, "drv": drv, "file": format!("/img/{name}"),
                   "image": {"virtual-size": size}})
        };
        let nodes = json!([
            node("#block123", 1 << 30, false, "qcow2"),
            node("#block045", 200_000, false, "file"),
            node("drive-scsi0", 10_487_296, false, "raw"),
            node("ro0", 4096, true, "raw"),
            node("#block9", 1 << 20, true, "raw"),
        ]);
        let drives: Vec<RawDrive> = Vec::<RawBlockInfo>::deserialize(&blocks)
            .unwrap()
            .into_iter()
            .map(RawDrive::from)
            .collect();
        let nodes = merge_nodes(Vec::<RawNode>::deserialize(&nodes).unwrap(), &drives);
        let picked: Vec<_> = vm_drives(&nodes, &drives)
            .into_iter()
            .map(|n| (n.node_name, n.drive_name, n.size))
            .collect();
        assert_eq!(
            picked,
            [
                ("#block123".into(), Some("drive-virtio0".into()), 1 << 30),
                ("drive-scsi0".into(), Some("scsi0".into()), 10_487_296),
            ]
        );
        let ro = nodes.iter().find(|n| n.node_name == "ro0").unwrap();
        assert_eq!(ro.drive_name.as_deref(), Some("ro-disk"));
    }

    #[test]
    fn roots_without_graph() {
        let node = |name: &str, drv: &str, file: &str| BlockNode {
            node_name: name.into(),
            drive_name: None,
            size: 1,
            read_only: false,
            driver: drv.into(),
            filename: file.into(),
        };
        let nodes = vec![
            node("a", "qcow2", "/x/a.qcow2"),
            node("a-file", "file", "/x/a.qcow2"),
            node("lonely", "file", "/x/lonely.raw"),
        ];
        assert_eq!(roots_by_filename(&nodes), vec!["a", "lonely"]);
    }

    #[test]
    fn socket_address_forms() {
        assert_eq!(
            SocketAddress::from(Path::new("/run/x.sock")).to_qapi(),
            json!({"type": "unix", "path": "/run/x.sock"})
        );
        let inet = SocketAddress::Inet {
            host: "127.0.0.1".into(),
            port: "10809".into(),
        };
        assert_eq!(
            inet.to_qapi(),
            json!({"type": "inet", "host": "127.0.0.1", "port": "10809"})
        );
    }

    #[tokio::test]
    async fn read_line_edges() {
        let mut rd = BufReader::new(&b"{\"a\":1}\n{\"b\":2}\r\n{\"torn"[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut rd, &mut buf).await, Ok(Some(())));
        assert_eq!(buf, b"{\"a\":1}\n");
        assert_eq!(read_line(&mut rd, &mut buf).await, Ok(Some(())));
        assert!(decode(&buf).is_err()); // {"b":2} is no QMP message
        assert!(read_line(&mut rd, &mut buf).await.is_err());

        let mut rd = BufReader::new(&b""[..]);
        assert_eq!(read_line(&mut rd, &mut buf).await, Ok(None));
    }
}
