//! A small async client for QEMU's JSON monitor (QMP).
//!
//! Owns: talking QMP with QEMU: the connection, the greeting and the
//! `qmp_capabilities` negotiation, commands from several tasks at once,
//! event streams, typed QEMU error classes and block-job events, and thin
//! typed wrappers for the block commands a live backup needs.
//!
//! - [`protocol`]: pure message decoding and encoding, error classes and
//!   typed events; testable with byte strings.
//! - [`client`]: the Unix-socket connection, [`Qmp::execute`] and
//!   [`Qmp::subscribe`], and the client's [`Error`].
//! - [`commands`]: typed block commands and queries (`blockdev-add` of an
//!   NBD node, the backup transaction, `query-named-block-nodes`, ...).
//!
//! Leaves to others: starting QEMU ([`crate::qemu`]), which drives a backup
//! picks ([`crate::backup`]), and everything NBD or VMA. The NBD server is
//! only ever named here by its socket address.

pub mod client;
pub mod commands;
pub mod protocol;

pub use client::{
    COMMAND_TIMEOUT, CONNECT_TIMEOUT, EVENT_BUFFER, Error, EventStream, MAX_MESSAGE_LEN, Qmp,
    wait_event,
};
pub use commands::{
    BackupJob, BitmapAdd, BlockGraph, BlockGraphEdge, BlockGraphNode, BlockInfo, BlockNode,
    DirtyBitmap, JobInfo, NodeBitmaps, SocketAddress,
};
pub use protocol::{
    BlockJobEnd, BlockJobError, DecodeError, ErrorClass, Event, JobEvent, JobOutcome, JobStatus,
    JobStatusChange, QemuVersion, Timestamp,
};
