//! vma-writer: a live-backup target for stock QEMU.
//!
//! QEMU's `blockdev-backup` job can copy a point-in-time image of every drive
//! of a running VM to an NBD server. vma-writer is that server: it takes the
//! per-drive writes, in any order and alignment, and assembles them into one
//! Proxmox VMA archive.
//!
//! # Layout
//!
//! - [`vma`]: the VMA on-disk format: pure header/extent codecs, a streaming
//!   writer and a streaming reader. No sockets, no tokio.
//! - [`nbd`]: the NBD protocol server on tokio: wire codecs, handshake,
//!   transmission, listeners, and the [`nbd::Backend`] trait an export
//!   implements. Knows nothing of VMA.
//! - [`assembler`]: the NBD backend of each drive export; turns writes of any
//!   shape into whole 64 KiB clusters for the archive writer.
//! - [`target`]: the live-backup target: exports + assembler + the rules
//!   for when the archive is final or the backup failed; typed
//!   [`target::Error`] and [`target::Failure`].
//! - [`backup`]: a whole live backup driven over QMP: [`backup::drives`]
//!   picks the drives (`--drive`, `--all`) and names them, [`backup::run`](mod@backup::run)
//!   adds the targets, starts one transaction of jobs, waits, and cleans up
//!   on failure in one place; [`backup::Error`] carries a failed backup's
//!   incomplete drives.
//! - [`pool`]: recycled buffers that travel as `Bytes` (NBD payloads,
//!   `create`'s image reads).
//! - [`seekable`]: the zstd seekable format's seek table and skippable
//!   frames (pure).
//! - [`archive`]: reading archives: any compression (zstd, gzip, lzop,
//!   by magic), front to back or at random by cluster
//!   ([`archive::RandomArchive`]), checked against the archive index.
//! - [`export`]: an archive's drives served read-only over NBD (instant
//!   restore): one [`nbd::Backend`] per drive over an
//!   [`archive::RandomArchive`], with digest-checked reads, block status
//!   from the index, read-ahead and bounded memory.
//! - [`sink`]: bytes out: plain or zstd, fsync, temp-then-rename commit
//!   (a file), or a multipart upload completed at the commit (an object).
//! - [`object`]: S3-compatible object storage: `s3://BUCKET/KEY` names,
//!   the client, multipart uploads that are aborted unless completed, and
//!   objects read by ranged GETs.
//! - [`qmp`]: a small async client for QEMU's JSON monitor:
//!   [`qmp::protocol`] (pure message decoding, error classes, typed
//!   events), [`qmp::client`] (connection, `execute`, event streams),
//!   [`qmp::commands`] (typed block commands and queries).
//! - [`qemu`]: starting and stopping `qemu-storage-daemon` for `create`,
//!   `demo` and tests.
//! - [`live_restore`]: a VM runs from its backup while it restores: qcow2
//!   overlays over the export, `block-stream` jobs driven over QMP.
//! - [`qemu_img`]: `qemu-img` as a child process: converting an export
//!   into any image format, creating the overlays of a live restore.
//! - [`fault`]: fault injection for the fault tests (feature
//!   `fault-injection`; a no-op without it).
//! - [`cli`]: one module per subcommand of the `vma-writer` binary.

pub mod archive;
pub mod assembler;
pub mod backup;
pub mod cli;
pub mod export;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod live_restore;
pub mod nbd;
pub mod object;
pub mod pool;
pub mod qemu;
pub mod qemu_img;
pub mod qmp;
pub mod seekable;
pub mod sink;
pub mod target;
pub mod vma;
