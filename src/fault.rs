//! Fault injection for the fault tests: failures and pauses that no real
//! file system gives on demand (an fsync that fails, a process that sits
//! in the middle of its commit long enough to be signalled).
//!
//! Compiled in only with the `fault-injection` feature (CI's test build
//! enables it; release builds do not have it). The environment variable
//! [`FAULT_ENV`] names the fault; without the feature, or without the
//! variable, every point is a no-op.

use std::io;

/// The environment variable that names the fault to inject.
pub const FAULT_ENV: &str = "VMA_WRITER_FAULT";

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The archive's final fsync, before its rename (`fsync` fails it
    /// with EIO).
    CommitSync,
    /// The start of the commit, before anything is made final
    /// (`pause-commit` sleeps there for [`PAUSE`] after saying so on
    /// stderr, so a test can signal the process mid-commit).
    CommitStart,
    /// The directory's fsync after the archive was renamed into place
    /// (`dirsync` fails it with EIO): a commit that fails once the archive
    /// is final.
    DirSync,
}

/// How long `pause-commit` sleeps: ample time for a test that saw the
/// message to send a signal, short enough that a command which finishes
/// its commit anyway (a live one checks for a stop request after sealing)
/// does not hold up the test.
pub const PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// The injected result at `point`: `Ok(())` unless the fault named in
/// [`FAULT_ENV`] is this point's.
#[cfg(feature = "fault-injection")]
pub fn at(point: Point) -> io::Result<()> {
    let Ok(fault) = std::env::var(FAULT_ENV) else {
        return Ok(());
    };
    match (fault.as_str(), point) {
        ("fsync", Point::CommitSync) | ("dirsync", Point::DirSync) => {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        ("pause-commit", Point::CommitStart) => {
            eprintln!("vma-writer: fault injection: pausing at the commit");
            std::thread::sleep(PAUSE);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Without the `fault-injection` feature: never a fault.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn at(_point: Point) -> io::Result<()> {
    Ok(())
}
