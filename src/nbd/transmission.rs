//! The transmission phase of one connection: read a request, validate it,
//! run it on the backend, reply.
//!
//! Each connection has one reader (the task that called [`serve`]). It
//! decodes headers, validates each request once ([`validate`]), reads WRITE
//! payloads from the socket straight into a recycled buffer (one copy, no
//! page faults: see `nbd::pool`) that reaches the backend as `Bytes`, and
//! spawns one task per request. A request task calls the backend, picks
//! its reply (the bytes come from `nbd::wire`) and hands it to the
//! connection's reply writer (`nbd::replies`), which writes it in
//! completion order, sharing one `writev` with replies that complete
//! together. The reader never writes to the socket, so it keeps reading
//! even while replies are stuck behind a client that is busy sending a
//! large WRITE (no deadlock).
//!
//! Back-pressure: every request holds permits from a per-connection byte
//! budget ([`ServerConfig::max_bytes_in_flight`]) until its reply has been
//! written; when the budget is used up the reader stops reading the socket.
//! When the server has a shared budget ([`ServerConfig::memory`]), a WRITE
//! also takes a charge of its payload from it before the payload is read,
//! and gives it back once the backend call has returned (see
//! `nbd::budget`); its payload buffers then come from the budget's shared
//! pool.
//!
//! Faults in one request are answered with an errno (via [`errno_of`], the
//! single place where backend errors become NBD errors) and the connection
//! carries on; only framing faults (bad magic, torn header, absurd length)
//! end it. This module knows nothing of VMA or of listeners.
//!
//! [`ServerConfig::max_bytes_in_flight`]: super::ServerConfig::max_bytes_in_flight
//! [`ServerConfig::memory`]: super::ServerConfig::memory

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, trace, warn};

use super::backend::{Backend, BackendCaps, BlockStatus};
use super::budget::Share;
use super::replies::{Frame, Replies};
use super::session::{BASE_ALLOCATION_ID, ReadOutcome, ReplyMode, Session, read_or_shutdown};
use super::wire::*;
use crate::pool::BufferPool;

/// Largest refused WRITE payload we still read and discard to keep the
/// stream in step. A header announcing more than this is taken as hostile
/// or corrupt and the connection is closed (nbdkit draws the same line).
pub const MAX_DRAIN: u64 = 128 * 1024 * 1024;

/// Most extents one BLOCK_STATUS reply carries (the spec allows 2^20); the
/// client asks again for the rest. Bounds reply size and backend time.
pub const MAX_EXTENTS: usize = 64 * 1024;

/// Budget charged for every request on top of its payload bytes, so a flood
/// of payload-free requests (WRITE_ZEROES, FLUSH, ...) is bounded too: with
/// the default budget at most 16 Ki such requests are in flight.
pub const REQUEST_OVERHEAD: usize = 4096;

/// Size of the buffer headers are read through. Small enough that the
/// bytes of a WRITE payload that land in it (and are copied once more) are
/// few; large enough for many pipelined headers per read call.
pub const READ_BUFFER: usize = 16 * 1024;

/// Most bytes of idle WRITE buffers one NBD connection keeps for reuse,
/// so large payloads do not page-fault in fresh `mmap`ed buffers. 16 MiB
/// covers nbdcopy's 64 × 256 KiB queue; past it, returned buffers are
/// freed. Not used with a shared budget, whose pool all connections share.
pub const BUFFER_POOL_BYTES: usize = 16 * 1024 * 1024;

/// What a validated request does once it reaches the backend.
#[derive(Debug)]
enum Output {
    /// Success without data.
    Done,
    /// READ data.
    Data(Bytes),
    /// BLOCK_STATUS extents (already clamped to the request).
    Extents(Vec<BlockStatus>),
}

/// Everything the request tasks of one connection share.
struct Conn<B> {
    backend: Arc<B>,
    export: Arc<str>,
    size: u64,
    caps: BackendCaps,
    mode: ReplyMode,
    base_allocation: bool,
    replies: Arc<Replies>,
    /// Fired when the client is gone (EOF without DISC, a socket error or
    /// a framing fault): replies can no longer reach it, so requests still
    /// running are dropped instead of waited for. Backends are cancel-safe
    /// (see [`Backend`]).
    gone: CancellationToken,
}

/// Maps a backend error to the errno the client sees. The one place this
/// happens; the real cause is logged first, since the client only sees the
/// code.
pub fn errno_of(err: &io::Error) -> NbdErrno {
    let errno = match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => NBD_EPERM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => NBD_ENOSPC,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::EOPNOTSUPP) => NBD_ENOTSUP,
        Some(libc::ESHUTDOWN) => NBD_ESHUTDOWN,
        Some(libc::EOVERFLOW) => NBD_EOVERFLOW,
        Some(_) => NBD_EIO,
        None => match err.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => NBD_ENOSPC,
            io::ErrorKind::InvalidInput => NBD_EINVAL,
            io::ErrorKind::Unsupported => NBD_ENOTSUP,
            _ => NBD_EIO,
        },
    };
    debug!(error = %err, %errno, "backend error");
    errno
}

/// Why a request is refused before it reaches the backend.
fn validate(
    req: &Request,
    caps: BackendCaps,
    size: u64,
    mode: ReplyMode,
    base_allocation: bool,
) -> Result<(), NbdErrno> {
    let cmd = req.command;
    let mut allowed = NBD_CMD_FLAG_FUA;
    match cmd {
        NBD_CMD_READ if mode != ReplyMode::Simple => allowed |= NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE if mode == ReplyMode::Extended => allowed |= NBD_CMD_FLAG_PAYLOAD_LEN,
        NBD_CMD_WRITE_ZEROES => allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_BLOCK_STATUS => allowed |= NBD_CMD_FLAG_REQ_ONE,
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_CACHE => {}
        _ => return Err(NBD_EINVAL),
    }
    if req.flags & !allowed != 0 {
        return Err(NBD_EINVAL);
    }
    if caps.read_only && matches!(cmd, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES | NBD_CMD_TRIM) {
        return Err(NBD_EPERM);
    }
    if matches!(cmd, NBD_CMD_READ | NBD_CMD_WRITE) && req.len > u64::from(MAX_PAYLOAD) {
        return Err(NBD_EINVAL);
    }
    if cmd == NBD_CMD_FLUSH {
        return Ok(());
    }
    let in_range = req
        .offset
        .checked_add(req.len)
        .is_some_and(|end| end <= size);
    if !in_range {
        return Err(if matches!(cmd, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        });
    }
    if cmd == NBD_CMD_BLOCK_STATUS && (!base_allocation || req.len == 0) {
        return Err(NBD_EINVAL);
    }
    Ok(())
}

/// Runs a validated request on the backend.
async fn execute<B: Backend>(
    conn: &Conn<B>,
    req: &Request,
    payload: Option<Bytes>,
) -> Result<Output, NbdErrno> {
    let b = &*conn.backend;
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, req.len);
    let out = match req.command {
        NBD_CMD_WRITE => {
            if len > 0 {
                let data = payload.unwrap_or_default();
                b.write(off, data).await.map_err(|e| errno_of(&e))?;
            }
            Output::Done
        }
        NBD_CMD_WRITE_ZEROES => {
            if req.flags & NBD_CMD_FLAG_FAST_ZERO != 0 && !conn.caps.fast_zero {
                return Err(NBD_ENOTSUP);
            }
            if len > 0 {
                let may_trim = req.flags & NBD_CMD_FLAG_NO_HOLE == 0;
                b.write_zeroes(off, len, may_trim)
                    .await
                    .map_err(|e| errno_of(&e))?;
            }
            Output::Done
        }
        NBD_CMD_TRIM => {
            if len > 0 && conn.caps.trim {
                b.trim(off, len).await.map_err(|e| errno_of(&e))?;
            }
            Output::Done
        }
        NBD_CMD_FLUSH => {
            b.flush().await.map_err(|e| errno_of(&e))?;
            return Ok(Output::Done);
        }
        NBD_CMD_CACHE => {
            if len > 0 {
                b.cache(off, len).await.map_err(|e| errno_of(&e))?;
            }
            return Ok(Output::Done);
        }
        NBD_CMD_READ => {
            if len == 0 {
                return Ok(Output::Data(Bytes::new()));
            }
            // len <= MAX_PAYLOAD was checked by validate().
            let data = b.read(off, len as u32).await.map_err(|e| errno_of(&e))?;
            if data.len() as u64 != len {
                warn!(export = %conn.export, offset = off, len, got = data.len(),
                      "backend read returned the wrong length");
                return Err(NBD_EIO);
            }
            return Ok(Output::Data(data));
        }
        NBD_CMD_BLOCK_STATUS => {
            let runs = b.block_status(off, len).await.map_err(|e| errno_of(&e))?;
            let runs = clamp_extents(runs, len, req.flags & NBD_CMD_FLAG_REQ_ONE != 0);
            if runs.is_empty() {
                warn!(export = %conn.export, offset = off, len, "backend block status returned no extents");
                return Err(NBD_EIO);
            }
            return Ok(Output::Extents(runs));
        }
        _ => return Err(NBD_EINVAL), // validate() lets no other command through
    };
    if fua {
        b.flush().await.map_err(|e| errno_of(&e))?;
    }
    Ok(out)
}

/// Keeps the backend's extents inside the request: drops empty runs, cuts
/// the total at `len`, obeys REQ_ONE and [`MAX_EXTENTS`].
fn clamp_extents(runs: Vec<BlockStatus>, len: u64, req_one: bool) -> Vec<BlockStatus> {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut out = Vec::with_capacity(runs.len().min(max));
    let mut left = len;
    for r in runs {
        if left == 0 || out.len() == max {
            break;
        }
        if r.len == 0 {
            continue;
        }
        let l = r.len.min(left);
        out.push(BlockStatus {
            len: l,
            flags: r.flags,
        });
        left -= l;
    }
    out
}

/// The reply to `req` in the negotiated style; the bytes come from
/// `nbd::wire`, READ data is passed on without a copy.
fn encode_reply(
    mode: ReplyMode,
    req: &Request,
    outcome: Result<Output, NbdErrno>,
    permit: Option<OwnedSemaphorePermit>,
) -> Frame {
    let (cookie, offset) = (req.cookie, req.offset);
    let none = Bytes::new;
    match (mode, outcome) {
        (ReplyMode::Simple, Ok(Output::Data(d))) => {
            Frame::new(&encode_simple_reply(NBD_SUCCESS, cookie), d, permit)
        }
        (ReplyMode::Simple, Ok(_)) => {
            Frame::new(&encode_simple_reply(NBD_SUCCESS, cookie), none(), permit)
        }
        (ReplyMode::Simple, Err(e)) => Frame::new(&encode_simple_reply(e, cookie), none(), permit),

        (ReplyMode::Structured, Ok(Output::Data(d))) if !d.is_empty() => {
            // d.len() <= MAX_PAYLOAD (checked by validate()).
            let h = encode_structured_offset_data(cookie, offset, d.len() as u32);
            Frame::new(&h, d, permit)
        }
        (ReplyMode::Structured, Ok(Output::Extents(runs))) => {
            let (h, p) = encode_block_status_chunk(cookie, BASE_ALLOCATION_ID, &runs);
            Frame::new(&h, Bytes::from(p), permit)
        }
        (ReplyMode::Structured, Ok(_)) if req.command == NBD_CMD_READ => {
            // Zero-length read: nothing to send but the end of the reply.
            Frame::new(&encode_structured_done(cookie), none(), permit)
        }
        (ReplyMode::Structured, Ok(_)) => {
            Frame::new(&encode_simple_reply(NBD_SUCCESS, cookie), none(), permit)
        }
        (ReplyMode::Structured, Err(e)) => {
            Frame::new(&encode_structured_error(cookie, e), none(), permit)
        }

        (ReplyMode::Extended, Ok(Output::Data(d))) if !d.is_empty() => {
            let h = encode_extended_offset_data(cookie, offset, d.len() as u64);
            Frame::new(&h, d, permit)
        }
        (ReplyMode::Extended, Ok(Output::Extents(runs))) => {
            let (h, p) = encode_block_status_ext_chunk(cookie, offset, BASE_ALLOCATION_ID, &runs);
            Frame::new(&h, Bytes::from(p), permit)
        }
        (ReplyMode::Extended, Ok(_)) => {
            Frame::new(&encode_extended_done(cookie, offset), none(), permit)
        }
        (ReplyMode::Extended, Err(e)) => {
            Frame::new(&encode_extended_error(cookie, offset, e), none(), permit)
        }
    }
}

/// Serves requests until DISC, EOF, a framing fault, or shutdown; waits for
/// every request in flight to be answered, then returns whether the client
/// ended with DISC (a clean disconnect).
pub(super) async fn serve<R, W, B>(
    mut reader: BufReader<R>,
    writer: W,
    session: Session<B>,
    shutdown: &CancellationToken,
) -> bool
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let replies = Arc::new(Replies::new(Box::pin(writer)));
    let writer_dead = replies.dead().clone();
    let budget_total = session.max_bytes_in_flight.clamp(
        REQUEST_OVERHEAD,
        Semaphore::MAX_PERMITS.min(u32::MAX as usize),
    );
    let budget = Arc::new(Semaphore::new(budget_total));
    let caps = session.backend.caps();
    let conn = Arc::new(Conn {
        size: session.backend.size(),
        backend: session.backend,
        export: session.export,
        caps,
        mode: session.negotiated.mode,
        base_allocation: session.negotiated.base_allocation,
        replies: Arc::clone(&replies),
        gone: CancellationToken::new(),
    });
    let tasks = TaskTracker::new();

    let result = read_loop(
        &mut reader,
        &conn,
        &budget,
        budget_total,
        session
            .memory
            .as_ref()
            .map(|m| (m, session.payload_timeout)),
        &tasks,
        shutdown,
        &writer_dead,
    )
    .await;
    let clean = match result {
        Ok(clean) => clean,
        Err(e) => {
            warn!(export = %conn.export, error = %e, "closing connection");
            conn.gone.cancel();
            false
        }
    };
    // Let every request in flight reply, then end our side of the socket.
    tasks.close();
    tasks.wait().await;
    drop(conn);
    replies.close().await;
    clean
}

/// The reader: returns `Ok(true)` after DISC, `Ok(false)` on EOF or
/// shutdown, `Err` on a framing fault or socket error.
#[allow(clippy::too_many_arguments)]
async fn read_loop<R, B>(
    reader: &mut BufReader<R>,
    conn: &Arc<Conn<B>>,
    budget: &Arc<Semaphore>,
    budget_total: usize,
    memory: Option<(&Share, Duration)>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    writer_dead: &CancellationToken,
) -> Result<bool, ProtocolError>
where
    R: AsyncRead + Unpin,
    B: Backend,
{
    let extended = conn.mode == ReplyMode::Extended;
    let hlen = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    };
    let mut hb = [0u8; EXTENDED_REQUEST_LEN];
    let pool = match memory {
        Some((share, _)) => Arc::clone(share.pool()),
        None => BufferPool::new(BUFFER_POOL_BYTES),
    };
    loop {
        let outcome = tokio::select! {
            biased;
            _ = writer_dead.cancelled() => {
                conn.gone.cancel();
                return Ok(false);
            }
            r = read_or_shutdown(reader, &mut hb[..hlen], shutdown) => r?,
        };
        match outcome {
            ReadOutcome::Data => {}
            ReadOutcome::Eof => {
                debug!(export = %conn.export, "client closed the connection without DISC");
                conn.gone.cancel();
                return Ok(false);
            }
            ReadOutcome::ShutdownIdle => return Ok(false),
        }
        let req = decode_request(&hb[..hlen], extended)?;
        trace!(export = %conn.export, cookie = req.cookie, offset = req.offset, len = req.len,
               command = %req.command, flags = req.flags, "request");
        if req.command == NBD_CMD_DISC {
            debug!(export = %conn.export, "DISC");
            return Ok(true);
        }
        let payload_len = req.payload_len(extended);

        let mut verdict = if shutdown.is_cancelled() {
            Err(NBD_ESHUTDOWN)
        } else {
            validate(&req, conn.caps, conn.size, conn.mode, conn.base_allocation)
        };
        if verdict.is_ok() && payload_len > 0 && req.command != NBD_CMD_WRITE {
            verdict = Err(NBD_EINVAL); // payloads on other commands are not negotiated
        }

        if let Err(errno) = verdict {
            debug!(export = %conn.export, cookie = req.cookie, offset = req.offset, len = req.len,
                   command = %req.command, %errno, "request refused");
            if payload_len > 0 {
                if payload_len > MAX_DRAIN {
                    return Err(ProtocolError::PayloadTooLarge {
                        command: req.command,
                        len: payload_len,
                        max: MAX_DRAIN,
                    });
                }
                drain(reader, payload_len).await?;
            }
            // Refusals hold budget too, so a client that floods bad requests
            // without reading the replies stalls instead of filling memory.
            let permit = tokio::select! {
                biased;
                _ = writer_dead.cancelled() => return Ok(false),
                p = budget.clone().acquire_many_owned(REQUEST_OVERHEAD.min(budget_total) as u32) =>
                    p.expect("budget semaphore is never closed"),
            };
            conn.replies
                .push(encode_reply(conn.mode, &req, Err(errno), Some(permit)));
            // The reader never writes to the socket itself (it could block
            // against a client that is blocked sending us a WRITE).
            let replies = Arc::clone(&conn.replies);
            tasks.spawn(async move { replies.flush().await }.in_current_span());
            continue;
        }

        // Back-pressure: wait for budget before reading the payload or
        // starting the request. A request larger than the whole budget takes
        // all of it, so it can still run (alone).
        let reply_bytes = if req.command == NBD_CMD_READ {
            req.len as usize
        } else {
            0
        };
        let cost = (payload_len as usize + reply_bytes + REQUEST_OVERHEAD).min(budget_total);
        let permit = tokio::select! {
            biased;
            _ = writer_dead.cancelled() => return Ok(false),
            p = budget.clone().acquire_many_owned(cost as u32) => p.expect("budget semaphore is never closed"),
        };
        // The shared budget: only WRITE payloads (validate() lets no other
        // payload through), held until the backend has taken the data.
        let charge = match memory {
            Some((share, _)) if payload_len > 0 => tokio::select! {
                biased;
                _ = writer_dead.cancelled() => return Ok(false),
                c = share.acquire(payload_len as usize) => Some(c),
            },
            _ => None,
        };

        let payload = match (payload_len, memory, &charge) {
            (0, _, _) => None,
            // A charged payload must arrive in time: the budget is shared.
            (len, Some((_, deadline)), Some(_)) => {
                let read = read_payload(reader, len as usize, &pool);
                match tokio::time::timeout(deadline, read).await {
                    Ok(p) => Some(p?),
                    Err(_) => {
                        return Err(ProtocolError::PayloadTimeout {
                            len,
                            secs: deadline.as_secs(),
                        });
                    }
                }
            }
            (len, _, _) => Some(read_payload(reader, len as usize, &pool).await?),
        };

        let conn = Arc::clone(conn);
        tasks.spawn(
            async move {
                // A panic in the backend is answered (EIO) instead of
                // leaving the client waiting forever for that cookie.
                let run = AssertUnwindSafe(execute(&conn, &req, payload)).catch_unwind();
                let done = tokio::select! {
                    biased;
                    r = run => r,
                    _ = conn.gone.cancelled() => {
                        debug!(export = %conn.export, cookie = req.cookie, command = %req.command,
                               "client gone; request dropped unanswered");
                        return;
                    }
                };
                // The backend has stored, handed on or copied the data.
                drop(charge);
                let outcome = match done {
                    Ok(outcome) => outcome,
                    Err(_panic) => {
                        error!(export = %conn.export, cookie = req.cookie, offset = req.offset,
                               len = req.len, command = %req.command,
                               "backend panicked; answering EIO");
                        Err(NBD_EIO)
                    }
                };
                if let Err(errno) = &outcome {
                    debug!(export = %conn.export, cookie = req.cookie, offset = req.offset,
                           len = req.len, command = %req.command, %errno, "request failed");
                }
                conn.replies
                    .push(encode_reply(conn.mode, &req, outcome, Some(permit)));
                conn.replies.flush().await;
            }
            .in_current_span(),
        );
        // Let the request just spawned run now. Tokio keeps it in this
        // worker's LIFO slot, which other workers cannot steal from, so
        // while the reader is busy with a stream of requests the replies
        // would otherwise wait until the reader runs out of input or of
        // its cooperative budget; clients with a full pipeline (nbdcopy)
        // then stall waiting for replies.
        tokio::task::yield_now().await;
    }
}

/// Reads a WRITE payload into a (recycled) buffer: the bytes already
/// buffered are copied, the rest is read from the socket directly into it.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    len: usize,
    pool: &Arc<BufferPool>,
) -> Result<Bytes, ProtocolError> {
    let mut buf = pool.get(len);
    let buffered = reader.buffer();
    let n = buffered.len().min(len);
    buf.extend_from_slice(&buffered[..n]);
    tokio::io::AsyncBufReadExt::consume(reader, n);
    let inner = reader.get_mut();
    while buf.len() < len {
        let want = len - buf.len();
        let mut limited = (&mut *buf).limit(want);
        let got = inner.read_buf(&mut limited).await?;
        if got == 0 {
            return Err(ProtocolError::TornMessage);
        }
    }
    Ok(buf.freeze())
}

/// Reads and discards `len` payload bytes of a refused request.
async fn drain<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    len: u64,
) -> Result<(), ProtocolError> {
    let copied = tokio::io::copy(&mut (&mut *reader).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(ProtocolError::TornMessage);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: BackendCaps = BackendCaps {
        read_only: false,
        flush_is_global: true,
        fast_zero: true,
        trim: true,
    };

    fn req(command: Command, flags: u16, offset: u64, len: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validation_follows_the_error_table() {
        let v = |r: Request| validate(&r, CAPS, 1 << 20, ReplyMode::Structured, true);
        assert_eq!(v(req(NBD_CMD_WRITE, 0, 0, 4096)), Ok(()));
        assert_eq!(v(req(NBD_CMD_WRITE, 0, (1 << 20) - 1, 2)), Err(NBD_ENOSPC));
        assert_eq!(
            v(req(NBD_CMD_WRITE_ZEROES, 0, u64::MAX, 2)),
            Err(NBD_ENOSPC)
        );
        assert_eq!(v(req(NBD_CMD_READ, 0, 1 << 20, 1)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_TRIM, 0, 1 << 20, 1)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_READ, 1 << 8, 0, 1)), Err(NBD_EINVAL));
        assert_eq!(
            v(req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1)),
            Err(NBD_EINVAL)
        );
        assert_eq!(v(req(Command(42), 0, 0, 1)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1)), Ok(()));
        assert_eq!(
            v(req(NBD_CMD_READ, 0, 0, u64::from(MAX_PAYLOAD) + 1)),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            v(req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1)),
            Ok(())
        );
        assert_eq!(v(req(NBD_CMD_BLOCK_STATUS, 0, 0, 0)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_FLUSH, 0, 0, 0)), Ok(()));
        let ro = BackendCaps {
            read_only: true,
            ..CAPS
        };
        assert_eq!(
            validate(
                &req(NBD_CMD_WRITE, 0, 0, 1),
                ro,
                10,
                ReplyMode::Simple,
                false
            ),
            Err(NBD_EPERM)
        );
        assert_eq!(
            validate(
                &req(NBD_CMD_BLOCK_STATUS, 0, 0, 1),
                CAPS,
                10,
                ReplyMode::Structured,
                false
            ),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate(
                &req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1),
                CAPS,
                10,
                ReplyMode::Simple,
                false
            ),
            Err(NBD_EINVAL)
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::ENOSPC)),
            NBD_ENOSPC
        );
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::EROFS)),
            NBD_EPERM
        );
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::ESHUTDOWN)),
            NBD_ESHUTDOWN
        );
        assert_eq!(
            errno_of(&io::Error::from_raw_os_error(libc::EBADF)),
            NBD_EIO
        );
        assert_eq!(errno_of(&io::Error::other("x")), NBD_EIO);
        assert_eq!(errno_of(&io::ErrorKind::Unsupported.into()), NBD_ENOTSUP);
        assert_eq!(errno_of(&io::ErrorKind::InvalidInput.into()), NBD_EINVAL);
    }

    #[test]
    fn extents_are_clamped() {
        let runs = vec![
            BlockStatus { len: 10, flags: 0 },
            BlockStatus { len: 0, flags: 3 },
            BlockStatus { len: 100, flags: 3 },
        ];
        assert_eq!(
            clamp_extents(runs.clone(), 50, false),
            vec![
                BlockStatus { len: 10, flags: 0 },
                BlockStatus { len: 40, flags: 3 }
            ]
        );
        assert_eq!(
            clamp_extents(runs, 50, true),
            vec![BlockStatus { len: 10, flags: 0 }]
        );
    }
}
