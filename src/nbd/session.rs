//! What one connection carries from the handshake into transmission: how to
//! read from the peer, and what the handshake agreed.
//!
//! Both phases read through [`read_or_shutdown`], which tells a clean EOF
//! between messages from a torn one and gives up [`SHUTDOWN_GRACE`] after
//! shutdown. The handshake (`nbd::handshake`) ends in a [`Negotiated`]
//! (reply style, whether `base:allocation` was selected under
//! [`BASE_ALLOCATION_ID`]); the server wraps it in a [`Session`] for
//! `nbd::transmission`. Deciding what to negotiate is the handshake's job,
//! using the result the transmission's; wire layouts are `nbd::wire`'s.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::budget::Share;
use super::wire::ProtocolError;

/// How long a connection in the option phase (or idle in transmission)
/// still gets after the server was told to shut down: enough for an option
/// or request already on its way to be answered `ERR_SHUTDOWN`/`ESHUTDOWN`,
/// short enough not to hold up the shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Id of the `base:allocation` context once selected with SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Which reply format the transmission phase uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReplyMode {
    /// Simple replies only (nothing negotiated).
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY` negotiated.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS` negotiated: 32-byte requests and replies.
    Extended,
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index into the server's export list.
    pub export: usize,
    /// Reply format for transmission.
    pub mode: ReplyMode,
    /// `base:allocation` was selected, so BLOCK_STATUS is allowed.
    pub base_allocation: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Parameters of one transmission phase.
pub(super) struct Session<B> {
    /// The export's backend.
    pub backend: Arc<B>,
    /// Export name, for logs.
    pub export: Arc<str>,
    /// What the handshake agreed.
    pub negotiated: Negotiated,
    /// Per-connection byte budget.
    pub max_bytes_in_flight: usize,
    /// This connection's part of the server's shared budget, if it has one.
    pub memory: Option<Share>,
    /// How long a payload charged to `memory` may take to arrive.
    pub payload_timeout: Duration,
}

/// Reads exactly `buf.len()` bytes. Returns `Ok(false)` when the peer closed
/// the connection before sending the first byte, and
/// [`ProtocolError::TornMessage`] when it closed in the middle.
pub(super) async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &mut [u8],
) -> Result<bool, ProtocolError> {
    if r.fill_buf().await?.is_empty() {
        return Ok(false);
    }
    match r.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProtocolError::TornMessage),
        Err(e) => Err(e.into()),
    }
}

/// What [`read_or_shutdown`] got.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadOutcome {
    /// `buf` is filled.
    Data,
    /// The peer closed between messages.
    Eof,
    /// Shutdown was requested and nothing arrived within [`SHUTDOWN_GRACE`].
    ShutdownIdle,
}

/// [`read_exact_or_eof`] that gives up [`SHUTDOWN_GRACE`] after `shutdown`
/// fires, without losing a message that is already arriving.
pub(super) async fn read_or_shutdown<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &mut [u8],
    shutdown: &CancellationToken,
) -> Result<ReadOutcome, ProtocolError> {
    let fut = read_exact_or_eof(r, buf);
    tokio::pin!(fut);
    let map = |res: Result<bool, ProtocolError>| {
        res.map(|got| {
            if got {
                ReadOutcome::Data
            } else {
                ReadOutcome::Eof
            }
        })
    };
    if !shutdown.is_cancelled() {
        tokio::select! {
            biased;
            res = &mut fut => return map(res),
            _ = shutdown.cancelled() => {}
        }
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, fut).await {
        Ok(res) => map(res),
        Err(_) => Ok(ReadOutcome::ShutdownIdle),
    }
}
