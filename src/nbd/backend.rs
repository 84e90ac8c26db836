//! The per-export backend trait: what the transmission phase calls to serve
//! one export's data requests, and [`Export`], which gives a backend the
//! name clients select it by.
//!
//! The server validates every request (range, flags, read-only, payload size)
//! before it reaches a backend, so a backend only ever sees in-range requests
//! and never has to word a protocol error itself: it returns an
//! [`std::io::Error`], which the server maps to the NBD errno the client sees
//! (see `nbd::transmission`). FUA is implemented by the server as the command
//! followed by [`Backend::flush`], so backends need no FUA parameter.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

/// What a backend can do; turned into the export's transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendCaps {
    /// Writes, write-zeroes and trims are refused with EPERM.
    pub read_only: bool,
    /// [`Backend::flush`] makes every acknowledged write from *every*
    /// connection durable, so the server may advertise CAN_MULTI_CONN.
    pub flush_is_global: bool,
    /// [`Backend::write_zeroes`] is cheaper than writing zero buffers, so a
    /// WRITE_ZEROES with FAST_ZERO may succeed (otherwise it gets ENOTSUP).
    pub fast_zero: bool,
    /// [`Backend::trim`] does something; when false the server still accepts
    /// TRIM (it is advisory) but answers it without calling the backend.
    pub trim: bool,
}

/// One run of [`Backend::block_status`]: `len` bytes with the
/// `base:allocation` flags `NBD_STATE_HOLE` (bit 0) and `NBD_STATE_ZERO`
/// (bit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run in bytes (never 0).
    pub len: u64,
    /// `base:allocation` flags of the run.
    pub flags: u32,
}

impl BlockStatus {
    /// `base:allocation` flag: the range is not allocated.
    pub const HOLE: u32 = 1;
    /// `base:allocation` flag: the range reads as zeros.
    pub const ZERO: u32 = 2;
}

/// Splits `[offset, offset + len)` into pieces that each stay inside one
/// `unit`-sized block (a page, a cluster): `(block number, offset in the
/// block, length)`, in order. For backends that store fixed-size blocks.
pub fn split_range(offset: u64, len: u64, unit: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let in_unit = pos % unit;
        let n = (unit - in_unit).min(end - pos);
        let piece = (pos / unit, in_unit as usize, n as usize);
        pos += n;
        Some(piece)
    })
}

/// The data side of one NBD export.
///
/// Futures returned by the data methods may be dropped before they
/// complete: when the client is gone (EOF without DISC, a socket error),
/// requests still running are abandoned rather than waited for, since their
/// replies cannot be delivered. A backend must therefore leave consistent
/// state at every await point (the spec leaves the outcome of unanswered
/// writes undefined, so dropping one is allowed).
///
/// Every method gets a range the server has already checked against
/// [`Backend::size`]; `len` is never 0. Methods may be called concurrently,
/// from several connections, in any order.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes; fixed for the life of the export.
    fn size(&self) -> u64;

    /// What this backend supports.
    fn caps(&self) -> BackendCaps;

    /// Stores `data` at `offset`. Returns once the backend has accepted the
    /// data (the server acknowledges the WRITE only then); durability comes
    /// with [`Backend::flush`].
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;

    /// Makes `[offset, offset + len)` read as zeros. `may_trim` is false when
    /// the client sent NO_HOLE (the range must then stay allocated).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Advisory discard; afterwards the range may read as anything.
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send;

    /// Returns once every write acknowledged before this call is durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Reads exactly `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Bytes>> + Send;

    /// Allocation status of `[offset, offset + len)`: runs in order, starting
    /// at `offset`; they may end before `offset + len` (the client asks again)
    /// but must not extend past the export end.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<BlockStatus>>> + Send;

    /// Prefetch hint (NBD_CMD_CACHE) for `[offset, offset + len)`: a
    /// backend that reads from slower storage may load the range so later
    /// READs are fast. Advisory: the default does nothing, and a backend
    /// may load less than asked.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = io::Result<()>> + Send {
        let _ = (offset, len);
        std::future::ready(Ok(()))
    }

    /// A client finished the handshake for this export. Called just before
    /// the final handshake reply is sent, so by the time the client's open
    /// returns (e.g. QEMU's `blockdev-add`) the backend knows of it. Every
    /// call is followed by exactly one [`Backend::disconnected`].
    fn connected(&self) {}

    /// A connection to this export ended, after its in-flight requests were
    /// answered. `clean` is true when the client sent DISC first.
    fn disconnected(&self, clean: bool) {
        let _ = clean;
    }
}

/// One export: a name clients select, and the backend serving it.
#[derive(Debug)]
pub struct Export<B> {
    /// Name clients pass to GO/EXPORT_NAME; the empty name selects the first
    /// export unless one is literally named "". Names must be unique (a
    /// later duplicate is unreachable) and at most 4096 bytes.
    pub name: String,
    /// Free text shown by `nbdinfo --list` (NBD_INFO_DESCRIPTION).
    pub description: String,
    /// The data side.
    pub backend: Arc<B>,
}

impl<B> Clone for Export<B> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            description: self.description.clone(),
            backend: Arc::clone(&self.backend),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_range;

    #[test]
    fn pieces_stay_inside_blocks_and_cover_the_range() {
        let v: Vec<_> = split_range(100, 300, 128).collect();
        assert_eq!(v, [(0, 100, 28), (1, 0, 128), (2, 0, 128), (3, 0, 16)]);
        assert_eq!(split_range(256, 0, 128).count(), 0);
        assert_eq!(
            split_range(128, 128, 128).collect::<Vec<_>>(),
            [(1, 0, 128)]
        );
    }
}
