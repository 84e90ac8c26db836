//! NBD wire layouts: every magic, flag, option, command, reply and errno
//! number, and pure encode/decode functions for the messages we exchange.
//!
//! All fields on the wire are big-endian. Nothing here touches a socket:
//! functions take and return byte slices, so every rejection path can be
//! tested with hand-made bytes (see `mod tests`). That includes every reply
//! we send: simple replies, structured and extended chunks (OFFSET_DATA,
//! NONE, ERROR, BLOCK_STATUS with 32- and 64-bit extents), so the other
//! modules only choose which reply to send. Reading from the peer is left
//! to `nbd::session`, `nbd::handshake` and `nbd::transmission`; writing
//! replies out to `nbd::transmission`.
//!
//! Constants keep the spelling of the protocol document (`NBD_OPT_GO`,
//! `NBD_CMD_WRITE_ZEROES`), so one search hits our code and the spec; typed
//! codes ([`OptionCode`], [`Command`], ...) print their spec name through
//! `Display`, so logs say `WRITE_ZEROES`, not `6`.

use std::fmt;

use thiserror::Error;

use super::backend::BlockStatus;

// ---------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------

/// First 8 bytes the server sends: ASCII "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second 8 bytes of the newstyle greeting and prefix of every client
/// option: ASCII "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request, after `NBD_OPT_EXTENDED_HEADERS`.
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle (structured option replies).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask to skip the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after an `EXPORT_NAME` reply.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Length of the server greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of a client option header: IHAVEOPT, u32 option, u32 length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, u32 option, u32 type, u32 length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Zero padding after an `EXPORT_NAME` reply unless `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

// ---------------------------------------------------------------------------
// Transmission flags (u16, in NBD_INFO_EXPORT and the EXPORT_NAME reply)
// ---------------------------------------------------------------------------

/// Always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Scheduling hint: rotational media.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` supported (structured replies only).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA act across every connection to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` (unmerged extension; never set by us).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` supported.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// BLOCK_STATUS may carry a payload (extended headers; never set by us).
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------
// Command flags (u16)
// ---------------------------------------------------------------------------

/// Force unit access: reply only once the data is durable.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES: do not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: reply in one data chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: exactly one extent.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES: fail with ENOTSUP unless faster than writing zeros.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is the payload length.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Length of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Structured/extended reply flag: this is the final chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// `base:allocation` flag: the range is a hole.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the range reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// Name of the only metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------
// Typed codes with spec names
// ---------------------------------------------------------------------------

macro_rules! named_code {
    (
        $(#[$meta:meta])*
        $ty:ident($inner:ty), unknown = $unknown:literal {
            $( $(#[$cmeta:meta])* $const:ident = $val:literal => $name:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $ty(pub $inner);

        $( $(#[$cmeta])* pub const $const: $ty = $ty($val); )*

        impl $ty {
            /// The spec name, or `None` for a code we do not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $val => Some($name), )*
                    _ => None,
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, concat!($unknown, "({})"), self.0),
                }
            }
        }
    };
}

named_code! {
    /// A handshake option code (`NBD_OPT_*`).
    OptionCode(u32), unknown = "UNKNOWN_OPTION" {
        /// Select an export and enter transmission; legacy, no error reply.
        NBD_OPT_EXPORT_NAME = 1 => "EXPORT_NAME",
        /// End the handshake.
        NBD_OPT_ABORT = 2 => "ABORT",
        /// List exports.
        NBD_OPT_LIST = 3 => "LIST",
        /// Withdrawn.
        NBD_OPT_PEEK_EXPORT = 4 => "PEEK_EXPORT",
        /// Upgrade to TLS.
        NBD_OPT_STARTTLS = 5 => "STARTTLS",
        /// Describe an export without selecting it.
        NBD_OPT_INFO = 6 => "INFO",
        /// Describe and select an export, then enter transmission.
        NBD_OPT_GO = 7 => "GO",
        /// Enable structured replies.
        NBD_OPT_STRUCTURED_REPLY = 8 => "STRUCTURED_REPLY",
        /// List metadata contexts.
        NBD_OPT_LIST_META_CONTEXT = 9 => "LIST_META_CONTEXT",
        /// Select metadata contexts for BLOCK_STATUS.
        NBD_OPT_SET_META_CONTEXT = 10 => "SET_META_CONTEXT",
        /// Enable extended (64-bit) headers.
        NBD_OPT_EXTENDED_HEADERS = 11 => "EXTENDED_HEADERS",
    }
}

named_code! {
    /// An option reply type (`NBD_REP_*`); errors have bit 31 set.
    ReplyType(u32), unknown = "UNKNOWN_REPLY" {
        /// Success, end of this option's replies.
        NBD_REP_ACK = 1 => "ACK",
        /// One export in a LIST reply.
        NBD_REP_SERVER = 2 => "SERVER",
        /// One `NBD_INFO_*` item.
        NBD_REP_INFO = 3 => "INFO",
        /// One metadata context.
        NBD_REP_META_CONTEXT = 4 => "META_CONTEXT",
        /// Option not supported.
        NBD_REP_ERR_UNSUP = 0x8000_0001 => "ERR_UNSUP",
        /// Forbidden by policy.
        NBD_REP_ERR_POLICY = 0x8000_0002 => "ERR_POLICY",
        /// Syntactically or semantically invalid.
        NBD_REP_ERR_INVALID = 0x8000_0003 => "ERR_INVALID",
        /// Not supported on this platform.
        NBD_REP_ERR_PLATFORM = 0x8000_0004 => "ERR_PLATFORM",
        /// TLS required first.
        NBD_REP_ERR_TLS_REQD = 0x8000_0005 => "ERR_TLS_REQD",
        /// No such export.
        NBD_REP_ERR_UNKNOWN = 0x8000_0006 => "ERR_UNKNOWN",
        /// Server is shutting down.
        NBD_REP_ERR_SHUTDOWN = 0x8000_0007 => "ERR_SHUTDOWN",
        /// Client must request block sizes.
        NBD_REP_ERR_BLOCK_SIZE_REQD = 0x8000_0008 => "ERR_BLOCK_SIZE_REQD",
        /// Option payload too large.
        NBD_REP_ERR_TOO_BIG = 0x8000_0009 => "ERR_TOO_BIG",
        /// Extended headers required.
        NBD_REP_ERR_EXT_HEADER_REQD = 0x8000_000a => "ERR_EXT_HEADER_REQD",
    }
}

named_code! {
    /// An `NBD_INFO_*` item type inside `NBD_REP_INFO`.
    InfoType(u16), unknown = "UNKNOWN_INFO" {
        /// Size and transmission flags.
        NBD_INFO_EXPORT = 0 => "INFO_EXPORT",
        /// Canonical name.
        NBD_INFO_NAME = 1 => "INFO_NAME",
        /// Human-readable description.
        NBD_INFO_DESCRIPTION = 2 => "INFO_DESCRIPTION",
        /// Block size constraints.
        NBD_INFO_BLOCK_SIZE = 3 => "INFO_BLOCK_SIZE",
    }
}

named_code! {
    /// A transmission command (`NBD_CMD_*`).
    Command(u16), unknown = "UNKNOWN_COMMAND" {
        /// Read data.
        NBD_CMD_READ = 0 => "READ",
        /// Write data (payload follows the header).
        NBD_CMD_WRITE = 1 => "WRITE",
        /// Disconnect.
        NBD_CMD_DISC = 2 => "DISC",
        /// Make acknowledged writes durable.
        NBD_CMD_FLUSH = 3 => "FLUSH",
        /// Advisory discard.
        NBD_CMD_TRIM = 4 => "TRIM",
        /// Prefetch hint.
        NBD_CMD_CACHE = 5 => "CACHE",
        /// Write zeros without a payload.
        NBD_CMD_WRITE_ZEROES = 6 => "WRITE_ZEROES",
        /// Query metadata (allocation).
        NBD_CMD_BLOCK_STATUS = 7 => "BLOCK_STATUS",
        /// Resize (unmerged extension; unsupported).
        NBD_CMD_RESIZE = 8 => "RESIZE",
    }
}

named_code! {
    /// A structured/extended reply chunk type (`NBD_REPLY_TYPE_*`).
    ChunkType(u16), unknown = "UNKNOWN_CHUNK" {
        /// No payload; ends a successful reply.
        NBD_REPLY_TYPE_NONE = 0 => "NONE",
        /// u64 offset + data.
        NBD_REPLY_TYPE_OFFSET_DATA = 1 => "OFFSET_DATA",
        /// u64 offset + u32 length of zeros.
        NBD_REPLY_TYPE_OFFSET_HOLE = 2 => "OFFSET_HOLE",
        /// u32 context id + (u32 length, u32 flags) extents.
        NBD_REPLY_TYPE_BLOCK_STATUS = 5 => "BLOCK_STATUS",
        /// u32 context id, u32 count + (u64 length, u64 flags) extents.
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6 => "BLOCK_STATUS_EXT",
        /// u32 errno, u16 message length, message.
        NBD_REPLY_TYPE_ERROR = 0x8001 => "ERROR",
        /// Like ERROR plus u64 offset.
        NBD_REPLY_TYPE_ERROR_OFFSET = 0x8002 => "ERROR_OFFSET",
    }
}

named_code! {
    /// An error value as sent in replies (`NBD_E*`, Linux numbering).
    NbdErrno(u32), unknown = "UNKNOWN_ERRNO" {
        /// Success.
        NBD_SUCCESS = 0 => "OK",
        /// Operation not permitted (write to a read-only export).
        NBD_EPERM = 1 => "EPERM",
        /// I/O error.
        NBD_EIO = 5 => "EIO",
        /// Out of memory.
        NBD_ENOMEM = 12 => "ENOMEM",
        /// Invalid request.
        NBD_EINVAL = 22 => "EINVAL",
        /// No space (write past the end).
        NBD_ENOSPC = 28 => "ENOSPC",
        /// Value too large.
        NBD_EOVERFLOW = 75 => "EOVERFLOW",
        /// Not supported (FAST_ZERO that would be slow).
        NBD_ENOTSUP = 95 => "ENOTSUP",
        /// Server is shutting down.
        NBD_ESHUTDOWN = 108 => "ESHUTDOWN",
    }
}

impl ReplyType {
    /// True for the `NBD_REP_ERR_*` types.
    pub fn is_error(self) -> bool {
        self.0 & 0x8000_0000 != 0
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Everything that can go wrong on an NBD connection, from the server's side.
///
/// Decode failures carry the bad value and, where there is one, the limit,
/// so the log line explains itself.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The client's option header did not start with `IHAVEOPT`.
    #[error("bad option magic {magic:#018x} (expected IHAVEOPT)")]
    BadOptionMagic {
        /// What the client sent.
        magic: u64,
    },
    /// A request header did not start with the magic of the negotiated
    /// header style.
    #[error("bad request magic {magic:#010x} (expected {expected:#010x})")]
    BadRequestMagic {
        /// What the client sent.
        magic: u32,
        /// The magic the negotiated header style requires.
        expected: u32,
    },
    /// The client set client flags we do not know or did not offer.
    #[error("unknown client flags {flags:#010x}")]
    BadClientFlags {
        /// What the client sent.
        flags: u32,
    },
    /// An option payload exceeds the option length limit.
    #[error("option {option} length {len} exceeds the limit of {max} bytes")]
    OptionTooLong {
        /// Option code.
        option: OptionCode,
        /// Length the client announced.
        len: u32,
        /// Our limit.
        max: u32,
    },
    /// The client sent more options than we allow per connection.
    #[error("more than {max} options on one connection")]
    TooManyOptions {
        /// Our limit.
        max: usize,
    },
    /// An option payload is internally inconsistent.
    #[error("malformed {option} payload: {reason}")]
    MalformedOption {
        /// Option code.
        option: OptionCode,
        /// What is wrong.
        reason: &'static str,
    },
    /// A name or query string exceeds [`MAX_STRING_LEN`].
    #[error("string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        /// Length the client announced.
        len: u32,
        /// Our limit.
        max: usize,
    },
    /// `EXPORT_NAME` named an export we do not have (only answer: close).
    #[error("EXPORT_NAME for unknown export {name:?}")]
    UnknownExport {
        /// The name asked for.
        name: String,
    },
    /// `EXPORT_NAME` after extended headers were negotiated.
    #[error("EXPORT_NAME is not allowed after EXTENDED_HEADERS")]
    ExportNameAfterExtendedHeaders,
    /// The handshake did not finish in time.
    #[error("handshake not finished within {secs} s")]
    HandshakeTimeout {
        /// The deadline in seconds.
        secs: u64,
    },
    /// A WRITE payload too large to even drain.
    #[error("{command} payload of {len} bytes exceeds the drain limit of {max}")]
    PayloadTooLarge {
        /// Command that carried the payload.
        command: Command,
        /// Length the client announced.
        len: u64,
        /// Our limit.
        max: u64,
    },
    /// A WRITE payload holding a share of the server's memory budget did
    /// not arrive in time (a client trickling it would stall the others).
    #[error("WRITE payload of {len} bytes not received within {secs} s")]
    PayloadTimeout {
        /// Length the client announced.
        len: u64,
        /// The deadline in seconds.
        secs: u64,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed mid-message")]
    TornMessage,
    /// Bytes arrived after STARTTLS, before the TLS handshake: they were
    /// sent in plain text and must not be taken as if they came through
    /// TLS (the STARTTLS injection of CVE-2011-0411 and nbdkit's
    /// CVE-2021-3716).
    #[error("{len} byte(s) sent after STARTTLS before the TLS handshake")]
    DataAfterStartTls {
        /// How many bytes were already buffered.
        len: usize,
    },
    /// `EXPORT_NAME` before STARTTLS on a server that requires TLS: it has
    /// no error reply, so the connection is closed.
    #[error("EXPORT_NAME before STARTTLS on a server that requires TLS")]
    ExportNameWithoutTls,
    /// A socket error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

// ---------------------------------------------------------------------------
// Limits that are part of the wire contract
// ---------------------------------------------------------------------------

/// Longest export name or metadata-context query we accept (the spec's
/// 4096-byte string limit). Longer strings make the option fail with
/// `ERR_INVALID` (or `ERR_TOO_BIG`) and the connection stays up.
pub const MAX_STRING_LEN: usize = 4096;

/// Largest READ or WRITE payload we accept, advertised as the maximum in
/// `NBD_INFO_BLOCK_SIZE`. Larger READs are answered EINVAL; larger WRITEs
/// are drained (up to `MAX_DRAIN`, see `nbd::transmission`) and answered
/// EINVAL. 32 MiB is what
/// common clients already respect (qemu-nbd uses the same limit), and QEMU
/// keeps its 1 MiB backup chunks with it.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Handshake codecs
// ---------------------------------------------------------------------------

/// Encodes the 18-byte fixed-newstyle greeting with the given handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Checks the client flags against what we offered (`offered` are the
/// handshake flags we sent; only the bits that have a client counterpart
/// count).
pub fn check_client_flags(flags: u32, offered: u16) -> Result<(), ProtocolError> {
    let allowed = NBD_FLAG_C_FIXED_NEWSTYLE
        | if offered & NBD_FLAG_NO_ZEROES != 0 {
            NBD_FLAG_C_NO_ZEROES
        } else {
            0
        };
    if flags & !allowed != 0 {
        return Err(ProtocolError::BadClientFlags { flags });
    }
    Ok(())
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: OptionCode,
    /// Payload length that follows.
    pub len: u32,
}

/// Decodes a 16-byte option header.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let magic = be_u64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadOptionMagic { magic });
    }
    Ok(OptionHeader {
        option: OptionCode(be_u32(&b[8..12])),
        len: be_u32(&b[12..16]),
    })
}

/// Appends an option reply (header + payload) to `out`.
pub fn encode_option_reply(
    out: &mut Vec<u8>,
    option: OptionCode,
    reply: ReplyType,
    payload: &[u8],
) {
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.0.to_be_bytes());
    out.extend_from_slice(&reply.0.to_be_bytes());
    // Payloads are built by us and bounded far below 4 GiB.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The reply to `EXPORT_NAME`: size, transmission flags, and the 124 zero
/// bytes unless the client set `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
    }
}

/// Payload of `NBD_REP_SERVER`: u32 name length, name, description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + name.len() + description.len());
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(description.as_bytes());
    p
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..2].copy_from_slice(&NBD_INFO_EXPORT.0.to_be_bytes());
    p[2..10].copy_from_slice(&size.to_be_bytes());
    p[10..12].copy_from_slice(&flags.to_be_bytes());
    p
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn encode_info_string(kind: InfoType, text: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + text.len());
    p.extend_from_slice(&kind.0.to_be_bytes());
    p.extend_from_slice(text.as_bytes());
    p
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut p = [0u8; 14];
    p[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.0.to_be_bytes());
    p[2..6].copy_from_slice(&minimum.to_be_bytes());
    p[6..10].copy_from_slice(&preferred.to_be_bytes());
    p[10..14].copy_from_slice(&maximum.to_be_bytes());
    p
}

/// Payload of `NBD_REP_META_CONTEXT`: u32 id, name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    p
}

/// Decoded payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// Export name (empty = default export).
    pub name: String,
    /// `NBD_INFO_*` items the client asked for.
    pub info: Vec<InfoType>,
}

/// Decodes the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: u32 name length,
/// name, u16 count, count × u16 info type; the lengths must add up exactly.
pub fn decode_export_request(option: OptionCode, p: &[u8]) -> Result<ExportRequest, ProtocolError> {
    let mut c = Cursor::new(option, p);
    let name = c.string()?;
    let n = c.u16()? as usize;
    if c.remaining() != n * 2 {
        return Err(ProtocolError::MalformedOption {
            option,
            reason: "info request count does not match the payload length",
        });
    }
    let mut info = Vec::with_capacity(n);
    for _ in 0..n {
        info.push(InfoType(c.u16()?));
    }
    Ok(ExportRequest { name, info })
}

/// Decoded payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name the query is about.
    pub name: String,
    /// Context queries (`base:allocation`, `base:`, ...).
    pub queries: Vec<String>,
}

/// Decodes the payload of the META_CONTEXT options: u32 name length, name,
/// u32 query count, count × (u32 length, query); lengths must add up exactly.
pub fn decode_meta_context_request(
    option: OptionCode,
    p: &[u8],
) -> Result<MetaContextRequest, ProtocolError> {
    let mut c = Cursor::new(option, p);
    let name = c.string()?;
    let n = c.u32()?;
    // Each query needs at least its 4-byte length: reject absurd counts
    // before allocating anything.
    if (n as usize).saturating_mul(4) > c.remaining() {
        return Err(ProtocolError::MalformedOption {
            option,
            reason: "query count exceeds the payload",
        });
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(c.string()?);
    }
    if c.remaining() != 0 {
        return Err(ProtocolError::MalformedOption {
            option,
            reason: "trailing bytes after the last query",
        });
    }
    Ok(MetaContextRequest { name, queries })
}

/// A bounds-checked reader over an option payload.
struct Cursor<'a> {
    option: OptionCode,
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(option: OptionCode, buf: &'a [u8]) -> Self {
        Self { option, buf }
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::MalformedOption {
                option: self.option,
                reason: "payload shorter than its fields",
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(be_u16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(be_u32(self.take(4)?))
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()?;
        if len as usize > MAX_STRING_LEN {
            return Err(ProtocolError::StringTooLong {
                len,
                max: MAX_STRING_LEN,
            });
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::MalformedOption {
            option: self.option,
            reason: "string is not UTF-8",
        })
    }
}

// ---------------------------------------------------------------------------
// Transmission codecs
// ---------------------------------------------------------------------------

/// A request header, compact or extended, decoded into one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// Command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (for extended requests with `PAYLOAD_LEN`, the payload length).
    pub len: u64,
}

impl Request {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == NBD_CMD_WRITE || (extended && self.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0)
        {
            self.len
        } else {
            0
        }
    }
}

/// Decodes a compact request (exactly [`REQUEST_LEN`] bytes) or, when
/// `extended`, an extended one ([`EXTENDED_REQUEST_LEN`] bytes).
pub fn decode_request(b: &[u8], extended: bool) -> Result<Request, ProtocolError> {
    let (expected, len) = if extended {
        (NBD_EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN)
    } else {
        (NBD_REQUEST_MAGIC, REQUEST_LEN)
    };
    if b.len() < len {
        return Err(ProtocolError::TornMessage);
    }
    let magic = be_u32(&b[0..4]);
    if magic != expected {
        return Err(ProtocolError::BadRequestMagic { magic, expected });
    }
    Ok(Request {
        flags: be_u16(&b[4..6]),
        command: Command(be_u16(&b[6..8])),
        cookie: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        len: if extended {
            be_u64(&b[24..32])
        } else {
            u64::from(be_u32(&b[24..28]))
        },
    })
}

/// Encodes a request (used by tests and clients; the server only decodes).
pub fn encode_request(r: &Request, extended: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(EXTENDED_REQUEST_LEN);
    let magic = if extended {
        NBD_EXTENDED_REQUEST_MAGIC
    } else {
        NBD_REQUEST_MAGIC
    };
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&r.flags.to_be_bytes());
    b.extend_from_slice(&r.command.0.to_be_bytes());
    b.extend_from_slice(&r.cookie.to_be_bytes());
    b.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&r.len.to_be_bytes());
    } else {
        b.extend_from_slice(&(r.len as u32).to_be_bytes());
    }
    b
}

/// Encodes a simple reply header.
pub fn encode_simple_reply(error: NbdErrno, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.0.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header; `len` is the chunk payload length.
pub fn encode_structured_reply(
    flags: u16,
    kind: ChunkType,
    cookie: u64,
    len: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.0.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encodes an extended reply chunk header; `offset` echoes the request's.
pub fn encode_extended_reply(
    flags: u16,
    kind: ChunkType,
    cookie: u64,
    offset: u64,
    len: u64,
) -> [u8; EXTENDED_REPLY_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    b[0..4].copy_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.0.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// Longest fixed part of a reply that precedes its data: an extended chunk
/// header and the offset of an OFFSET_DATA chunk. The reply writer keeps
/// this much inline per queued reply, so replies need no allocation.
pub const MAX_REPLY_HEAD_LEN: usize = EXTENDED_REPLY_LEN + 8;

/// Payload length of the ERROR chunks we send: u32 errno and a u16 message
/// length of 0. We send no message: the cause is logged on our side.
pub const ERROR_CHUNK_LEN: usize = 6;

/// The structured OFFSET_DATA chunk that answers a READ, up to its data:
/// the header (flag DONE, length `8 + data_len`) and `offset`. The caller
/// sends the `data_len` data bytes after it; `data_len` is at most
/// [`MAX_PAYLOAD`].
pub fn encode_structured_offset_data(
    cookie: u64,
    offset: u64,
    data_len: u32,
) -> [u8; STRUCTURED_REPLY_LEN + 8] {
    let len = 8 + data_len;
    let h = encode_structured_reply(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, cookie, len);
    concat(&h, &offset.to_be_bytes())
}

/// The extended OFFSET_DATA chunk that answers a READ, up to its data: the
/// header (flag DONE, echoing `offset`, length `8 + data_len`) and `offset`.
pub fn encode_extended_offset_data(
    cookie: u64,
    offset: u64,
    data_len: u64,
) -> [u8; EXTENDED_REPLY_LEN + 8] {
    let kind = NBD_REPLY_TYPE_OFFSET_DATA;
    let h = encode_extended_reply(NBD_REPLY_FLAG_DONE, kind, cookie, offset, 8 + data_len);
    concat(&h, &offset.to_be_bytes())
}

/// A final structured NONE chunk: success with nothing to send (a READ of
/// length 0).
pub fn encode_structured_done(cookie: u64) -> [u8; STRUCTURED_REPLY_LEN] {
    encode_structured_reply(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0)
}

/// A final extended NONE chunk echoing `offset`: success without data.
pub fn encode_extended_done(cookie: u64, offset: u64) -> [u8; EXTENDED_REPLY_LEN] {
    encode_extended_reply(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, offset, 0)
}

/// A final structured ERROR chunk: `error` and an empty message.
pub fn encode_structured_error(
    cookie: u64,
    error: NbdErrno,
) -> [u8; STRUCTURED_REPLY_LEN + ERROR_CHUNK_LEN] {
    let len = ERROR_CHUNK_LEN as u32;
    let h = encode_structured_reply(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, len);
    concat(&h, &encode_error_payload(error))
}

/// A final extended ERROR chunk echoing `offset`: `error` and an empty
/// message.
pub fn encode_extended_error(
    cookie: u64,
    offset: u64,
    error: NbdErrno,
) -> [u8; EXTENDED_REPLY_LEN + ERROR_CHUNK_LEN] {
    let len = ERROR_CHUNK_LEN as u64;
    let h = encode_extended_reply(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        offset,
        len,
    );
    concat(&h, &encode_error_payload(error))
}

/// Payload of our ERROR chunks: u32 errno, u16 message length 0.
fn encode_error_payload(error: NbdErrno) -> [u8; ERROR_CHUNK_LEN] {
    let mut p = [0u8; ERROR_CHUNK_LEN];
    p[0..4].copy_from_slice(&error.0.to_be_bytes());
    p
}

/// `head` then `tail` in one array of exactly their combined length.
fn concat<const N: usize>(head: &[u8], tail: &[u8]) -> [u8; N] {
    assert_eq!(
        head.len() + tail.len(),
        N,
        "reply parts do not fill the array"
    );
    let mut b = [0u8; N];
    b[..head.len()].copy_from_slice(head);
    b[head.len()..].copy_from_slice(tail);
    b
}

/// A final structured BLOCK_STATUS chunk: its header and its payload (u32
/// context id, then u32 length and u32 flags per extent). Lengths above
/// `u32::MAX` are cut to it; callers clamp extents to the request, whose
/// length fits in 32 bits without extended headers.
pub fn encode_block_status_chunk(
    cookie: u64,
    context_id: u32,
    extents: &[BlockStatus],
) -> ([u8; STRUCTURED_REPLY_LEN], Vec<u8>) {
    let mut p = Vec::with_capacity(4 + extents.len() * 8);
    p.extend_from_slice(&context_id.to_be_bytes());
    for e in extents {
        let len = e.len.min(u64::from(u32::MAX)) as u32;
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&e.flags.to_be_bytes());
    }
    let h = encode_structured_reply(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        p.len() as u32,
    );
    (h, p)
}

/// A final extended BLOCK_STATUS_EXT chunk echoing `offset`: its header and
/// its payload (u32 context id, u32 extent count, then u64 length and u64
/// flags per extent).
pub fn encode_block_status_ext_chunk(
    cookie: u64,
    offset: u64,
    context_id: u32,
    extents: &[BlockStatus],
) -> ([u8; EXTENDED_REPLY_LEN], Vec<u8>) {
    let mut p = Vec::with_capacity(8 + extents.len() * 16);
    p.extend_from_slice(&context_id.to_be_bytes());
    // At most MAX_EXTENTS (far below 2^32) per reply.
    p.extend_from_slice(&(extents.len() as u32).to_be_bytes());
    for e in extents {
        p.extend_from_slice(&e.len.to_be_bytes());
        p.extend_from_slice(&u64::from(e.flags).to_be_bytes());
    }
    let h = encode_extended_reply(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
        cookie,
        offset,
        p.len() as u64,
    );
    (h, p)
}

/// A decoded reply header of any style (for tests and clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply.
    Simple {
        /// Error value.
        error: NbdErrno,
        /// Cookie.
        cookie: u64,
    },
    /// Structured or extended chunk.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: ChunkType,
        /// Cookie.
        cookie: u64,
        /// Echoed offset (extended only, else 0).
        offset: u64,
        /// Payload length.
        len: u64,
    },
}

/// Decodes a reply header; returns it and its length, or `None` when `b`
/// is too short (or the magic is unknown: `Err`).
pub fn decode_reply_header(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtocolError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be_u32(&b[0..4]) {
        NBD_SIMPLE_REPLY_MAGIC if b.len() >= SIMPLE_REPLY_LEN => Ok(Some((
            ReplyHeader::Simple {
                error: NbdErrno(be_u32(&b[4..8])),
                cookie: be_u64(&b[8..16]),
            },
            SIMPLE_REPLY_LEN,
        ))),
        NBD_STRUCTURED_REPLY_MAGIC if b.len() >= STRUCTURED_REPLY_LEN => Ok(Some((
            ReplyHeader::Chunk {
                flags: be_u16(&b[4..6]),
                kind: ChunkType(be_u16(&b[6..8])),
                cookie: be_u64(&b[8..16]),
                offset: 0,
                len: u64::from(be_u32(&b[16..20])),
            },
            STRUCTURED_REPLY_LEN,
        ))),
        NBD_EXTENDED_REPLY_MAGIC if b.len() >= EXTENDED_REPLY_LEN => Ok(Some((
            ReplyHeader::Chunk {
                flags: be_u16(&b[4..6]),
                kind: ChunkType(be_u16(&b[6..8])),
                cookie: be_u64(&b[8..16]),
                offset: be_u64(&b[16..24]),
                len: be_u64(&b[24..32]),
            },
            EXTENDED_REPLY_LEN,
        ))),
        NBD_SIMPLE_REPLY_MAGIC | NBD_STRUCTURED_REPLY_MAGIC | NBD_EXTENDED_REPLY_MAGIC => Ok(None),
        magic => Err(ProtocolError::BadRequestMagic {
            magic,
            expected: NBD_SIMPLE_REPLY_MAGIC,
        }),
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_print_spec_spelling() {
        assert_eq!(NBD_CMD_WRITE_ZEROES.to_string(), "WRITE_ZEROES");
        assert_eq!(NBD_OPT_GO.to_string(), "GO");
        assert_eq!(NBD_REP_ERR_UNSUP.to_string(), "ERR_UNSUP");
        assert_eq!(NBD_ENOSPC.to_string(), "ENOSPC");
        assert_eq!(Command(77).to_string(), "UNKNOWN_COMMAND(77)");
        assert_eq!(OptionCode(99).to_string(), "UNKNOWN_OPTION(99)");
        assert!(NBD_REP_ERR_SHUTDOWN.is_error());
        assert!(!NBD_REP_ACK.is_error());
    }

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        let offered = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
        assert!(check_client_flags(0, offered).is_ok());
        assert!(check_client_flags(3, offered).is_ok());
        assert!(matches!(
            check_client_flags(4, offered),
            Err(ProtocolError::BadClientFlags { flags: 4 })
        ));
        // NO_ZEROES only when offered.
        assert!(check_client_flags(2, NBD_FLAG_FIXED_NEWSTYLE).is_err());
    }

    fn option_header(code: u32, len: u32) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&code.to_be_bytes());
        b[12..16].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn option_header_round_trip_and_bad_magic() {
        let b = option_header(7, 10);
        assert_eq!(
            decode_option_header(&b).unwrap(),
            OptionHeader {
                option: NBD_OPT_GO,
                len: 10
            }
        );
        for i in 0..8 {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(matches!(
                decode_option_header(&bad),
                Err(ProtocolError::BadOptionMagic { .. })
            ));
        }
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    #[test]
    fn export_request_round_trip() {
        let p = go_payload("disk0", &[3, 1]);
        let r = decode_export_request(NBD_OPT_GO, &p).unwrap();
        assert_eq!(r.name, "disk0");
        assert_eq!(r.info, vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        let r = decode_export_request(NBD_OPT_GO, &go_payload("", &[])).unwrap();
        assert_eq!(r.name, "");
        assert!(r.info.is_empty());
    }

    #[test]
    fn export_request_rejections() {
        let p = go_payload("disk0", &[3]);
        // Name length too large for the payload.
        let mut bad = p.clone();
        bad[3] = 200;
        assert!(matches!(
            decode_export_request(NBD_OPT_GO, &bad),
            Err(ProtocolError::MalformedOption { .. })
        ));
        // Info count off by one.
        let mut bad = p.clone();
        bad[10] = 2;
        assert!(matches!(
            decode_export_request(NBD_OPT_GO, &bad),
            Err(ProtocolError::MalformedOption { .. })
        ));
        // Trailing byte.
        let mut bad = p.clone();
        bad.push(0);
        assert!(decode_export_request(NBD_OPT_GO, &bad).is_err());
        // Truncated at every length.
        for n in 0..p.len() {
            assert!(
                decode_export_request(NBD_OPT_GO, &p[..n]).is_err(),
                "len {n}"
            );
        }
        // Oversized name length.
        let mut bad = p.clone();
        bad[0..4].copy_from_slice(&5000u32.to_be_bytes());
        assert!(matches!(
            decode_export_request(NBD_OPT_GO, &bad),
            Err(ProtocolError::StringTooLong { len: 5000, .. })
        ));
        // Non-UTF-8 name.
        let mut bad = p;
        bad[4] = 0xff;
        assert!(matches!(
            decode_export_request(NBD_OPT_GO, &bad),
            Err(ProtocolError::MalformedOption { .. })
        ));
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
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

    #[test]
    fn meta_context_round_trip_and_rejections() {
        let p = meta_payload("", &["base:allocation", "qemu:x"]);
        let r = decode_meta_context_request(NBD_OPT_SET_META_CONTEXT, &p).unwrap();
        assert_eq!(r.name, "");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:x"]);
        for n in 0..p.len() {
            assert!(decode_meta_context_request(NBD_OPT_SET_META_CONTEXT, &p[..n]).is_err());
        }
        let mut bad = p.clone();
        bad.push(1);
        assert!(decode_meta_context_request(NBD_OPT_SET_META_CONTEXT, &bad).is_err());
        // Absurd query count is rejected before allocating.
        let mut bad = p;
        bad[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_meta_context_request(NBD_OPT_SET_META_CONTEXT, &bad),
            Err(ProtocolError::MalformedOption { .. })
        ));
    }

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: NBD_CMD_FLAG_FUA,
            command: NBD_CMD_WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 65536,
        };
        for ext in [false, true] {
            let b = encode_request(&r, ext);
            assert_eq!(b.len(), if ext { 32 } else { 28 });
            assert_eq!(decode_request(&b, ext).unwrap(), r);
        }
        let big = Request {
            len: 1 << 33,
            command: NBD_CMD_WRITE_ZEROES,
            ..r
        };
        assert_eq!(
            decode_request(&encode_request(&big, true), true).unwrap(),
            big
        );
        assert_eq!(big.payload_len(true), 0);
        assert_eq!(r.payload_len(false), 65536);
    }

    #[test]
    fn request_rejections() {
        let r = Request {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 1,
            offset: 0,
            len: 512,
        };
        for ext in [false, true] {
            let b = encode_request(&r, ext);
            for i in 0..4 {
                let mut bad = b.clone();
                bad[i] ^= 0x01;
                assert!(matches!(
                    decode_request(&bad, ext),
                    Err(ProtocolError::BadRequestMagic { .. })
                ));
            }
            assert!(matches!(
                decode_request(&b[..b.len() - 1], ext),
                Err(ProtocolError::TornMessage)
            ));
            // The other header style's magic is rejected.
            assert!(decode_request(&encode_request(&r, !ext), ext).is_err());
        }
    }

    #[test]
    fn reply_headers_round_trip() {
        let s = encode_simple_reply(NBD_EINVAL, 42);
        assert_eq!(
            decode_reply_header(&s).unwrap(),
            Some((
                ReplyHeader::Simple {
                    error: NBD_EINVAL,
                    cookie: 42
                },
                16
            ))
        );
        let c = encode_structured_reply(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 7, 520);
        assert_eq!(
            decode_reply_header(&c).unwrap(),
            Some((
                ReplyHeader::Chunk {
                    flags: 1,
                    kind: NBD_REPLY_TYPE_OFFSET_DATA,
                    cookie: 7,
                    offset: 0,
                    len: 520
                },
                20
            ))
        );
        let e = encode_extended_reply(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 9, 4096, 0);
        assert_eq!(
            decode_reply_header(&e).unwrap(),
            Some((
                ReplyHeader::Chunk {
                    flags: 1,
                    kind: NBD_REPLY_TYPE_NONE,
                    cookie: 9,
                    offset: 4096,
                    len: 0
                },
                32
            ))
        );
        assert_eq!(decode_reply_header(&e[..31]).unwrap(), None);
        let mut bad = s;
        bad[0] ^= 0xff;
        assert!(decode_reply_header(&bad).is_err());
    }

    // The reply tests below spell out the expected bytes field by field,
    // as the NBD protocol document lays them out, instead of building them
    // with the encoders under test.

    const COOKIE: u64 = 0x1122_3344_5566_7788;
    const COOKIE_BYTES: [u8; 8] = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn simple_reply_bytes() {
        let want = cat(&[
            &[0x67, 0x44, 0x66, 0x98], // NBD_SIMPLE_REPLY_MAGIC
            &[0, 0, 0, 22],            // error: EINVAL
            &COOKIE_BYTES,
        ]);
        assert_eq!(&encode_simple_reply(NBD_EINVAL, COOKIE)[..], &want[..]);
        let ok = encode_simple_reply(NBD_SUCCESS, COOKIE);
        assert_eq!(&ok[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn structured_reply_bytes() {
        // OFFSET_DATA header of a 512-byte READ at 8 GiB + 4 KiB.
        let want = cat(&[
            &[0x66, 0x8e, 0x33, 0xef], // NBD_STRUCTURED_REPLY_MAGIC
            &[0x00, 0x01],             // flags: DONE
            &[0x00, 0x01],             // type: OFFSET_DATA
            &COOKIE_BYTES,
            &[0x00, 0x00, 0x02, 0x08],       // length: 8 + 512
            &[0, 0, 0, 0x02, 0, 0, 0x10, 0], // offset
        ]);
        assert_eq!(
            &encode_structured_offset_data(COOKIE, 0x2_0000_1000, 512)[..],
            &want[..]
        );
        let want = cat(&[
            &[0x66, 0x8e, 0x33, 0xef],
            &[0x00, 0x01], // DONE
            &[0x00, 0x00], // NONE
            &COOKIE_BYTES,
            &[0, 0, 0, 0], // length
        ]);
        assert_eq!(&encode_structured_done(COOKIE)[..], &want[..]);
        let want = cat(&[
            &[0x66, 0x8e, 0x33, 0xef],
            &[0x00, 0x01], // DONE
            &[0x80, 0x01], // ERROR
            &COOKIE_BYTES,
            &[0, 0, 0, 6],    // length
            &[0, 0, 0, 0x1c], // error: ENOSPC
            &[0, 0],          // message length
        ]);
        assert_eq!(&encode_structured_error(COOKIE, NBD_ENOSPC)[..], &want[..]);
    }

    #[test]
    fn extended_reply_bytes() {
        // OFFSET_DATA header with a length that needs 64 bits.
        let want = cat(&[
            &[0x6e, 0x8a, 0x27, 0x8c], // NBD_EXTENDED_REPLY_MAGIC
            &[0x00, 0x01],             // flags: DONE
            &[0x00, 0x01],             // type: OFFSET_DATA
            &COOKIE_BYTES,
            &[0, 0, 0, 0x02, 0, 0, 0x10, 0], // offset (echoed)
            &[0, 0, 0, 0x01, 0, 0, 0, 0x08], // length: 8 + 4 GiB
            &[0, 0, 0, 0x02, 0, 0, 0x10, 0], // offset
        ]);
        assert_eq!(
            &encode_extended_offset_data(COOKIE, 0x2_0000_1000, 1 << 32)[..],
            &want[..]
        );
        let want = cat(&[
            &[0x6e, 0x8a, 0x27, 0x8c],
            &[0x00, 0x01], // DONE
            &[0x00, 0x00], // NONE
            &COOKIE_BYTES,
            &[0, 0, 0, 0, 0, 0, 0x10, 0], // offset
            &[0; 8],                      // length
        ]);
        assert_eq!(&encode_extended_done(COOKIE, 0x1000)[..], &want[..]);
        let want = cat(&[
            &[0x6e, 0x8a, 0x27, 0x8c],
            &[0x00, 0x01], // DONE
            &[0x80, 0x01], // ERROR
            &COOKIE_BYTES,
            &[0, 0, 0, 0, 0, 0, 0x10, 0], // offset
            &[0, 0, 0, 0, 0, 0, 0, 6],    // length
            &[0, 0, 0, 5],                // error: EIO
            &[0, 0],                      // message length
        ]);
        assert_eq!(
            &encode_extended_error(COOKIE, 0x1000, NBD_EIO)[..],
            &want[..]
        );
    }

    const EXTENTS: [BlockStatus; 2] = [
        BlockStatus {
            len: 0x1_0000,
            flags: 0,
        },
        BlockStatus {
            len: 0x2_0000_0000,
            flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
        },
    ];

    #[test]
    fn block_status_chunk_bytes() {
        let (h, p) = encode_block_status_chunk(COOKIE, 1, &EXTENTS);
        let want_h = cat(&[
            &[0x66, 0x8e, 0x33, 0xef],
            &[0x00, 0x01], // DONE
            &[0x00, 0x05], // BLOCK_STATUS
            &COOKIE_BYTES,
            &[0, 0, 0, 20], // length: id + 2 extents
        ]);
        let want_p = cat(&[
            &[0, 0, 0, 1],             // context id
            &[0x00, 0x01, 0x00, 0x00], // 64 KiB
            &[0, 0, 0, 0],             // allocated data
            &[0xff, 0xff, 0xff, 0xff], // 8 GiB, cut to u32::MAX
            &[0, 0, 0, 3],             // HOLE | ZERO
        ]);
        assert_eq!((&h[..], &p[..]), (&want_h[..], &want_p[..]));
    }

    #[test]
    fn block_status_ext_chunk_bytes() {
        let (h, p) = encode_block_status_ext_chunk(COOKIE, 0x1000, 1, &EXTENTS);
        let want_h = cat(&[
            &[0x6e, 0x8a, 0x27, 0x8c],
            &[0x00, 0x01], // DONE
            &[0x00, 0x06], // BLOCK_STATUS_EXT
            &COOKIE_BYTES,
            &[0, 0, 0, 0, 0, 0, 0x10, 0], // offset
            &[0, 0, 0, 0, 0, 0, 0, 40],   // length: id, count, 2 extents
        ]);
        let want_p = cat(&[
            &[0, 0, 0, 1],                // context id
            &[0, 0, 0, 2],                // extent count
            &[0, 0, 0, 0, 0, 0x01, 0, 0], // 64 KiB
            &[0; 8],                      // allocated data
            &[0, 0, 0, 0x02, 0, 0, 0, 0], // 8 GiB
            &[0, 0, 0, 0, 0, 0, 0, 3],    // HOLE | ZERO
        ]);
        assert_eq!((&h[..], &p[..]), (&want_h[..], &want_p[..]));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn requests_round_trip(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64, ext: bool) {
                let r = Request {
                    flags,
                    command: Command(cmd),
                    cookie,
                    offset,
                    len: if ext { len } else { len & 0xffff_ffff },
                };
                prop_assert_eq!(decode_request(&encode_request(&r, ext), ext).unwrap(), r);
            }

            #[test]
            fn option_payload_decoders_never_panic(p in proptest::collection::vec(any::<u8>(), 0..64)) {
                let _ = decode_export_request(NBD_OPT_GO, &p);
                let _ = decode_meta_context_request(NBD_OPT_SET_META_CONTEXT, &p);
                let _ = decode_reply_header(&p);
                if p.len() >= 32 {
                    let _ = decode_request(&p, true);
                    let _ = decode_request(&p, false);
                }
            }

            #[test]
            fn export_requests_round_trip(name in "[a-z0-9/._-]{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
                let mut p = Vec::new();
                p.extend_from_slice(&(name.len() as u32).to_be_bytes());
                p.extend_from_slice(name.as_bytes());
                p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
                for i in &infos {
                    p.extend_from_slice(&i.to_be_bytes());
                }
                let r = decode_export_request(NBD_OPT_INFO, &p).unwrap();
                prop_assert_eq!(r.name, name);
                prop_assert_eq!(r.info, infos.into_iter().map(InfoType).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn option_reply_and_info_layouts() {
        let mut out = Vec::new();
        encode_option_reply(
            &mut out,
            NBD_OPT_GO,
            NBD_REP_INFO,
            &encode_info_export(1 << 20, 0x0d),
        );
        assert_eq!(out.len(), 20 + 12);
        assert_eq!(&out[0..8], &NBD_REP_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &7u32.to_be_bytes());
        assert_eq!(&out[12..16], &3u32.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..22], &[0, 0]);
        let bs = encode_info_block_size(1, 4096, 32 << 20);
        assert_eq!(&bs[0..2], &[0, 3]);
        assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 5, 1, false);
        assert_eq!(out.len(), 134);
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 5, 1, true);
        assert_eq!(out.len(), 10);
        assert_eq!(&encode_rep_server("a", "b")[..], &[0, 0, 0, 1, b'a', b'b']);
        assert_eq!(&encode_rep_meta_context(1, "x")[..], &[0, 0, 0, 1, b'x']);
    }
}
