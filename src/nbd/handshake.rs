//! The fixed-newstyle handshake: greeting, client flags and the option loop,
//! ending in a negotiated export or a closed connection.
//!
//! This module owns the option-phase limits ([`MAX_OPTIONS`],
//! [`MAX_OPTION_LEN`]) and decides what each option is answered. It never
//! touches a backend beyond reading its size and capabilities: no backend
//! state exists before a valid `GO` or `EXPORT_NAME` (nbdkit
//! CVE-2019-14850). The caller (`nbd::server`) applies the handshake
//! deadline and calls `Backend::connected`; data requests are left to
//! `nbd::transmission`. The read helpers and the [`Negotiated`] result
//! live in `nbd::session`, which both phases share.
//!
//! STARTTLS: [`negotiate`] returns [`Outcome::StartTls`] after its ACK; the
//! server then runs the TLS handshake and calls [`negotiate`] again on the
//! TLS stream with a fresh option state (structured replies, extended
//! headers and meta contexts negotiated in plain text are forgotten), so
//! only [`Carry`] (client flags, option budget) survives the upgrade. With
//! TLS required, every option but STARTTLS and ABORT is refused with
//! `ERR_TLS_REQD` before the upgrade.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

use super::backend::{Backend, BackendCaps, Export};
use super::session::{BASE_ALLOCATION_ID, Negotiated, ReadOutcome, ReplyMode, read_or_shutdown};
use super::wire::*;

/// Most options one connection may send before we hang up. Real clients
/// send a handful (QEMU: 4); the limit stops a peer from keeping a
/// connection in the option phase forever. Past it the connection is closed
/// without a reply (as nbdkit does). The first `LIST` raises the budget by
/// [`OPTIONS_PER_LISTED_EXPORT`] per export, because a client that lists
/// (`nbdinfo --list`) then asks about every export it was told of.
pub const MAX_OPTIONS: usize = 32;

/// Extra options granted per export by the first `LIST` (nbdinfo asks INFO,
/// SET_META_CONTEXT and LIST_META_CONTEXT for each).
pub const OPTIONS_PER_LISTED_EXPORT: usize = 4;

/// Largest option payload we read. The longest legitimate option is
/// SET_META_CONTEXT with a few 4096-byte queries; 64 KiB leaves ample room.
/// A longer announced length is treated as hostile: the connection is
/// closed without reading the payload.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Smallest request alignment we advertise in `NBD_INFO_BLOCK_SIZE`: any
/// byte offset and length work.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred block size we advertise: the page size, below which writes
/// cost read-modify-write in most backends.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// The transmission flags an export advertises, given its capabilities and
/// the negotiated reply mode.
pub fn transmission_flags(caps: BackendCaps, mode: ReplyMode) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
    if caps.read_only {
        // As nbdkit and qemu-nbd do: a read-only export offers no command
        // that changes data (they would all be answered EPERM).
        f |= NBD_FLAG_READ_ONLY;
    } else {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    }
    if caps.flush_is_global {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    if mode != ReplyMode::Simple {
        // Every READ is answered with a single data chunk, so DF is free.
        f |= NBD_FLAG_SEND_DF;
    }
    f
}

/// What STARTTLS can do at this point of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsPhase {
    /// The server has no TLS: STARTTLS is answered ERR_UNSUP.
    Unavailable,
    /// Plain text so far; STARTTLS upgrades. With `required`, nothing
    /// else but ABORT is allowed first.
    Offered {
        /// Plain-text clients are refused.
        required: bool,
    },
    /// The connection runs over TLS: a second STARTTLS is ERR_INVALID.
    Active,
}

/// What survives STARTTLS: the client flags from the greeting and the
/// option budget, which counts options across the upgrade.
#[derive(Debug)]
pub(super) struct Carry {
    no_zeroes: bool,
    options: usize,
    max_options: usize,
    listed: bool,
}

/// How the option phase ended.
pub(super) enum Outcome {
    /// GO or EXPORT_NAME picked an export; the final reply (GO's last
    /// replies or the EXPORT_NAME reply) is still to be sent.
    Transmission(Negotiated, Vec<u8>),
    /// STARTTLS was acknowledged (and flushed): the TLS handshake is next.
    StartTls,
    /// The client aborted, went away, or the server is shutting down.
    Closed,
}

/// Per-connection negotiation state, new after STARTTLS.
struct State<'c> {
    mode: ReplyMode,
    /// Export whose `base:allocation` was selected by SET_META_CONTEXT; the
    /// selection only counts if GO then picks the same export.
    base_allocation: Option<usize>,
    tls: TlsPhase,
    carry: &'c mut Carry,
    out: Vec<u8>,
}

/// Sends the greeting and reads the client flags. `None` when the client
/// went away or the server is shutting down.
pub(super) async fn greet<R, W>(
    r: &mut BufReader<R>,
    w: &mut W,
    shutdown: &CancellationToken,
) -> Result<Option<Carry>, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let offered = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
    w.write_all(&encode_greeting(offered)).await?;
    w.flush().await?;

    let mut cf = [0u8; 4];
    if read_or_shutdown(r, &mut cf, shutdown).await? != ReadOutcome::Data {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(cf);
    check_client_flags(client_flags, offered)?;
    trace!(client_flags, "client flags");
    Ok(Some(Carry {
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        options: 0,
        max_options: MAX_OPTIONS,
        listed: false,
    }))
}

/// Runs the option loop after [`greet`] (or after STARTTLS, with `tls`
/// [`TlsPhase::Active`]). Errors are protocol violations that end the
/// connection.
pub(super) async fn negotiate<R, W, B>(
    r: &mut BufReader<R>,
    w: &mut W,
    exports: &[Export<B>],
    shutdown: &CancellationToken,
    tls: TlsPhase,
    carry: &mut Carry,
) -> Result<Outcome, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let mut st = State {
        mode: ReplyMode::Simple,
        base_allocation: None,
        tls,
        carry,
        out: Vec::with_capacity(256),
    };

    loop {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        match read_or_shutdown(r, &mut hb, shutdown).await? {
            ReadOutcome::Data => {}
            ReadOutcome::Eof => {
                debug!("client closed the connection during the handshake");
                return Ok(Outcome::Closed);
            }
            ReadOutcome::ShutdownIdle => return Ok(Outcome::Closed),
        }
        let hdr = decode_option_header(&hb)?;
        st.carry.options += 1;
        if st.carry.options > st.carry.max_options {
            return Err(ProtocolError::TooManyOptions {
                max: st.carry.max_options,
            });
        }
        if hdr.len > MAX_OPTION_LEN {
            return Err(ProtocolError::OptionTooLong {
                option: hdr.option,
                len: hdr.len,
                max: MAX_OPTION_LEN,
            });
        }
        let mut payload = vec![0u8; hdr.len as usize];
        match r.read_exact(&mut payload).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ProtocolError::TornMessage);
            }
            Err(e) => return Err(e.into()),
        }
        debug!(option = %hdr.option, len = hdr.len, "option");

        st.out.clear();
        let done = handle_option(&mut st, hdr.option, &payload, exports, shutdown)?;
        if let Step::Transmission(n) = done {
            // The caller sends the final reply after Backend::connected, so
            // the backend knows of the client before the client can act.
            return Ok(Outcome::Transmission(n, std::mem::take(&mut st.out)));
        }
        if !st.out.is_empty() {
            w.write_all(&st.out).await?;
            w.flush().await?;
        }
        match done {
            Step::Continue | Step::Transmission(_) => {}
            Step::Close => return Ok(Outcome::Closed),
            Step::StartTls => {
                // The client must wait for our ACK before its ClientHello:
                // anything already buffered was sent in plain text.
                let len = r.buffer().len();
                if len > 0 {
                    return Err(ProtocolError::DataAfterStartTls { len });
                }
                return Ok(Outcome::StartTls);
            }
        }
    }
}

/// What to do after answering an option.
enum Step {
    Continue,
    Close,
    StartTls,
    Transmission(Negotiated),
}

/// Finds an export by name; the empty name selects the first export unless
/// an export is literally named "".
fn find_export<B>(exports: &[Export<B>], name: &str) -> Option<usize> {
    exports
        .iter()
        .position(|e| e.name == name)
        .or_else(|| (name.is_empty() && !exports.is_empty()).then_some(0))
}

fn reply(st: &mut State<'_>, option: OptionCode, kind: ReplyType, payload: &[u8]) {
    if kind.is_error() {
        debug!(%option, reply = %kind, "option refused");
    }
    encode_option_reply(&mut st.out, option, kind, payload);
}

/// Answers an option whose payload did not decode: ERR_TOO_BIG for an
/// over-long string, ERR_INVALID otherwise; the message says what was wrong.
fn reply_malformed(st: &mut State<'_>, option: OptionCode, e: &ProtocolError) {
    debug!(%option, error = %e, "malformed option");
    let kind = match e {
        ProtocolError::StringTooLong { .. } => NBD_REP_ERR_TOO_BIG,
        _ => NBD_REP_ERR_INVALID,
    };
    reply(st, option, kind, e.to_string().as_bytes());
}

/// Answers one option into `st.out`.
fn handle_option<B: Backend>(
    st: &mut State<'_>,
    option: OptionCode,
    payload: &[u8],
    exports: &[Export<B>],
    shutdown: &CancellationToken,
) -> Result<Step, ProtocolError> {
    let shutting_down = shutdown.is_cancelled();
    if st.tls == (TlsPhase::Offered { required: true }) {
        match option {
            NBD_OPT_STARTTLS | NBD_OPT_ABORT => {}
            // EXPORT_NAME has no error reply: closing is the answer.
            NBD_OPT_EXPORT_NAME => return Err(ProtocolError::ExportNameWithoutTls),
            _ => {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_TLS_REQD,
                    b"TLS required: send STARTTLS first",
                );
                return Ok(Step::Continue);
            }
        }
    }
    match option {
        NBD_OPT_EXPORT_NAME => {
            if st.mode == ReplyMode::Extended {
                return Err(ProtocolError::ExportNameAfterExtendedHeaders);
            }
            let name = String::from_utf8_lossy(payload).into_owned();
            let Some(idx) = find_export(exports, &name) else {
                return Err(ProtocolError::UnknownExport { name });
            };
            if shutting_down {
                // EXPORT_NAME cannot carry an error: closing is the answer.
                return Ok(Step::Close);
            }
            let b = &exports[idx].backend;
            let flags = transmission_flags(b.caps(), st.mode);
            encode_export_name_reply(&mut st.out, b.size(), flags, st.carry.no_zeroes);
            Ok(Step::Transmission(Negotiated {
                export: idx,
                mode: st.mode,
                base_allocation: st.base_allocation == Some(idx),
                flags,
            }))
        }
        NBD_OPT_ABORT => {
            reply(st, option, NBD_REP_ACK, &[]);
            Ok(Step::Close)
        }
        _ if shutting_down => {
            reply(st, option, NBD_REP_ERR_SHUTDOWN, b"server shutting down");
            Ok(Step::Continue)
        }
        NBD_OPT_LIST => {
            if !payload.is_empty() {
                reply(st, option, NBD_REP_ERR_INVALID, b"LIST takes no payload");
                return Ok(Step::Continue);
            }
            if !st.carry.listed {
                st.carry.listed = true;
                st.carry.max_options += OPTIONS_PER_LISTED_EXPORT * exports.len();
            }
            for e in exports {
                let p = encode_rep_server(&e.name, &e.description);
                reply(st, option, NBD_REP_SERVER, &p);
            }
            reply(st, option, NBD_REP_ACK, &[]);
            Ok(Step::Continue)
        }
        NBD_OPT_INFO | NBD_OPT_GO => {
            let req = match decode_export_request(option, payload) {
                Ok(r) => r,
                Err(e) => {
                    reply_malformed(st, option, &e);
                    return Ok(Step::Continue);
                }
            };
            let Some(idx) = find_export(exports, &req.name) else {
                reply(st, option, NBD_REP_ERR_UNKNOWN, b"no such export");
                return Ok(Step::Continue);
            };
            let e = &exports[idx];
            let flags = transmission_flags(e.backend.caps(), st.mode);
            reply(
                st,
                option,
                NBD_REP_INFO,
                &encode_info_export(e.backend.size(), flags),
            );
            if req.info.contains(&NBD_INFO_NAME) {
                reply(
                    st,
                    option,
                    NBD_REP_INFO,
                    &encode_info_string(NBD_INFO_NAME, &e.name),
                );
            }
            if req.info.contains(&NBD_INFO_DESCRIPTION) && !e.description.is_empty() {
                let p = encode_info_string(NBD_INFO_DESCRIPTION, &e.description);
                reply(st, option, NBD_REP_INFO, &p);
            }
            // Sent even when not asked for: with a minimum of 1 it
            // constrains nothing, and it tells clients our payload limit.
            let bs = encode_info_block_size(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD);
            reply(st, option, NBD_REP_INFO, &bs);
            reply(st, option, NBD_REP_ACK, &[]);
            if option == NBD_OPT_GO {
                Ok(Step::Transmission(Negotiated {
                    export: idx,
                    mode: st.mode,
                    base_allocation: st.base_allocation == Some(idx),
                    flags,
                }))
            } else {
                Ok(Step::Continue)
            }
        }
        NBD_OPT_STRUCTURED_REPLY => {
            if !payload.is_empty() {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"STRUCTURED_REPLY takes no payload",
                );
            } else if st.mode == ReplyMode::Extended {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"extended headers already negotiated",
                );
            } else {
                st.mode = ReplyMode::Structured;
                reply(st, option, NBD_REP_ACK, &[]);
            }
            Ok(Step::Continue)
        }
        NBD_OPT_EXTENDED_HEADERS => {
            if !payload.is_empty() {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"EXTENDED_HEADERS takes no payload",
                );
            } else {
                st.mode = ReplyMode::Extended;
                reply(st, option, NBD_REP_ACK, &[]);
            }
            Ok(Step::Continue)
        }
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
            let set = option == NBD_OPT_SET_META_CONTEXT;
            let req = match decode_meta_context_request(option, payload) {
                Ok(r) => r,
                Err(e) => {
                    reply_malformed(st, option, &e);
                    return Ok(Step::Continue);
                }
            };
            if set && st.mode == ReplyMode::Simple {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"structured replies not negotiated",
                );
                return Ok(Step::Continue);
            }
            let Some(idx) = find_export(exports, &req.name) else {
                reply(st, option, NBD_REP_ERR_UNKNOWN, b"no such export");
                return Ok(Step::Continue);
            };
            let matched = if req.queries.is_empty() {
                // Empty LIST = everything; empty SET = nothing.
                !set
            } else {
                req.queries
                    .iter()
                    .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
            };
            if matched {
                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                let p = encode_rep_meta_context(id, BASE_ALLOCATION);
                reply(st, option, NBD_REP_META_CONTEXT, &p);
            }
            if set {
                st.base_allocation = matched.then_some(idx);
            }
            reply(st, option, NBD_REP_ACK, &[]);
            Ok(Step::Continue)
        }
        NBD_OPT_STARTTLS => match st.tls {
            TlsPhase::Unavailable => {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_UNSUP,
                    b"TLS is not enabled on this server",
                );
                Ok(Step::Continue)
            }
            TlsPhase::Active => {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"TLS is already negotiated",
                );
                Ok(Step::Continue)
            }
            TlsPhase::Offered { .. } if !payload.is_empty() => {
                reply(
                    st,
                    option,
                    NBD_REP_ERR_INVALID,
                    b"STARTTLS takes no payload",
                );
                Ok(Step::Continue)
            }
            TlsPhase::Offered { .. } => {
                reply(st, option, NBD_REP_ACK, &[]);
                Ok(Step::StartTls)
            }
        },
        _ => {
            reply(st, option, NBD_REP_ERR_UNSUP, b"option not supported");
            Ok(Step::Continue)
        }
    }
}
