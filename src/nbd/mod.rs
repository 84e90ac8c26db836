//! The NBD server: everything between a socket and a [`Backend`].
//!
//! - [`wire`]: every number of the protocol and pure encode/decode of
//!   options, requests and replies; no sockets.
//! - `handshake`: the fixed-newstyle option loop (GO, INFO, EXPORT_NAME,
//!   LIST, ABORT, STRUCTURED_REPLY, EXTENDED_HEADERS, META_CONTEXT), ending
//!   in a negotiated export or a closed socket.
//! - `session`: what both phases share: reading from the peer (clean vs
//!   torn EOF, shutdown grace) and what the handshake agreed (reply mode,
//!   meta-context id), handed on to transmission.
//! - `transmission`: one connection's read → validate → run → reply loop,
//!   with one reader per connection, concurrent request tasks,
//!   back-pressure and errno mapping.
//! - `replies`: the reply writer of one connection: a queue that request
//!   tasks write out in turn, combining replies into one `writev`.
//! - `server`: [`Listener`] (Unix/TCP), [`Server`] with its connection limit
//!   and graceful shutdown; the STARTTLS upgrade of a connection.
//! - [`systemd`]: socket activation, the listening socket systemd passes
//!   (`--listen systemd`).
//! - `tls`: [`Tls`], the rustls configuration a server offers STARTTLS
//!   with, loaded from PEM files.
//! - `budget`: [`MemoryBudget`], one byte budget for the WRITE payloads
//!   of all connections, shared fairly, and their shared buffer pool.
//! - `backend`: [`Backend`], what an export implements, and [`Export`],
//!   which names one; [`MemoryBackend`] and [`NullBackend`] are the two
//!   built-in backends.
//!
//! Supported: fixed newstyle with NO_ZEROES; simple, structured and
//! extended replies; READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
//! FAST_ZERO), CACHE, BLOCK_STATUS (`base:allocation`), DISC, FUA, DF,
//! multi-conn (when the backend's flush is global); STARTTLS with X.509
//! certificates, optional or required, with optional client certificates
//! (when the server has [`Tls`]; ERR_UNSUP otherwise). Not supported:
//! TLS-PSK, oldstyle, RESIZE, other metadata contexts.

#![deny(missing_docs)]

mod backend;
mod budget;
mod handshake;
mod memory;
mod null;
mod replies;
mod server;
mod session;
pub mod systemd;
mod tls;
mod transmission;
pub mod wire;

pub use backend::{Backend, BackendCaps, BlockStatus, Export, split_range};
pub use budget::{Charge, MemoryBudget, POOL_FRACTION, Share};
pub use handshake::{
    MAX_OPTION_LEN, MAX_OPTIONS, MIN_BLOCK_SIZE, OPTIONS_PER_LISTED_EXPORT, PREFERRED_BLOCK_SIZE,
};
pub use memory::{MemoryBackend, PAGE_SIZE};
pub use null::NullBackend;
pub use server::{
    HANDSHAKE_TIMEOUT, ListenAddr, ListenAddrError, Listener, MAX_BYTES_IN_FLIGHT, MAX_CONNECTIONS,
    PAYLOAD_TIMEOUT, Server, ServerConfig,
};
pub use session::SHUTDOWN_GRACE;
pub use tls::{Tls, TlsError, TlsFiles};
pub use transmission::{
    BUFFER_POOL_BYTES, MAX_DRAIN, MAX_EXTENTS, READ_BUFFER, REQUEST_OVERHEAD, errno_of,
};
pub use wire::{MAX_PAYLOAD, MAX_STRING_LEN, NbdErrno, ProtocolError};
