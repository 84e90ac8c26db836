//! The QMP connection: the Unix-socket transport, the greeting and the
//! `qmp_capabilities` negotiation, [`Qmp::execute`] (usable from several
//! tasks at once) and the event streams ([`Qmp::subscribe`]), with the
//! client's [`Error`] type.
//!
//! Leaves decoding and encoding of messages to [`super::protocol`] and the
//! typed block commands to [`super::commands`]; knows no command but
//! `qmp_capabilities`.
//!
//! # How it works
//!
//! [`Qmp::connect`] reads the greeting, then splits the socket between two
//! tasks. The reader task reads one JSON message per line: replies are routed
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
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::protocol::{
    DecodeError, ErrorClass, Event, JobEvent, JobOutcome, Message, QemuVersion, clip, decode,
    encode_command,
};

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
    #[error(transparent)]
    Protocol(#[from] DecodeError),
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
                    "connect and greeting on {} (QEMU greets one client per monitor at a time: is \
                     another client using it? Give vma-writer a -qmp socket of its own)",
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
                    return Err(DecodeError {
                        what: "expected the QMP greeting".into(),
                        text: clip(String::from_utf8_lossy(&buf).trim_end()),
                    }
                    .into());
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
        let line = encode_command(id, command, args);
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
