//! A whole live backup driven over QMP: which drives, then one run that
//! copies them all at one point in time into one archive. On a job error, a
//! lost QMP connection, a target failure or a stop request it cancels the
//! jobs, removes the targets and abandons the archive.
//!
//! - [`drives`]: `--drive NODE[=NAME]` and `--all` resolved against what
//!   QEMU reports, and the archive names.
//! - [`chain`]: incremental backups as policy: one dirty bitmap per
//!   archive, which drives go incremental and why others go full, which
//!   bitmaps are stale.
//! - [`base`]: the base archive, Proxmox's archive names in a dump
//!   directory and the newest of a VM.
//! - [`run`](mod@run): the backup itself, with its one cleanup path.
//! - [`error`]: [`Error`], and [`Failure`] for why a started backup was
//!   abandoned.
//!
//! Used by `backup`, `create` (non-raw images) and `demo`. Display is left
//! to the caller through [`Observer`]; QMP to [`crate::qmp`]; the NBD
//! exports and the archive to [`crate::target`].

pub mod base;
pub mod chain;
pub mod drives;
pub mod error;
pub mod run;

pub use base::{BaseArchive, newest_archive, vzdump_name};
pub use chain::{DrivePlan, FullReason, Mode, bitmap_name};
pub use drives::{BackupDrive, NamedNode, all_drives, archive_name, block_nodes, resolve_drives};
pub use error::{Error, Failure};
pub use run::{CANCEL_TIMEOUT, Finished, Observer, RunOptions, SETTLE_TIMEOUT, TICK, run};
