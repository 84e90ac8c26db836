//! `qemu-img` as a child process, for what vma-writer hands to QEMU's
//! block layer: writing an export into an image of any format QEMU writes
//! ([`convert`], for `extract --format`), and creating the qcow2 overlays
//! of a live restore ([`create_overlay`]).
//!
//! Owns: finding the binary (`$QEMU_IMG`, else `PATH`), its command
//! lines, reading `convert`'s progress, quoting its stderr in errors, and
//! stopping it with us ([`crate::qemu::die_with_parent`]). Blocking: call
//! it from a thread that outlives the child, not from a tokio worker.
//! Knows nothing of VMA; the NBD export it reads is only a URI here.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use crate::qemu::{die_with_parent, find_program};

/// Binary name looked up on `PATH`.
pub const BINARY_NAME: &str = "qemu-img";

/// Environment variable naming the binary to use instead of the one on
/// `PATH`.
pub const BINARY_ENV: &str = "QEMU_IMG";

/// Bytes of stderr quoted in errors (the end of it).
const STDERR_TAIL: usize = 4096;

/// Why `qemu-img` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No binary found.
    #[error("{BINARY_NAME} not found ({searched}); install qemu-utils or set {BINARY_ENV}")]
    NotFound {
        /// Where we looked.
        searched: String,
    },
    /// A format name that is no QEMU driver name (letters, digits, `-`,
    /// `_`), so it cannot smuggle options in.
    #[error("'{format}' is not an image format name")]
    BadFormat {
        /// The rejected name.
        format: String,
    },
    /// It could not be started.
    #[error("cannot start {BINARY_NAME}: {source}")]
    Start {
        /// Why.
        source: std::io::Error,
    },
    /// It failed.
    #[error("`{BINARY_NAME} {what}` failed ({status}): {stderr}")]
    Failed {
        /// What it was asked to do, e.g. `convert -O qcow2`.
        what: String,
        /// How it ended.
        status: ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
}

/// Checks that `format` is a plausible QEMU format driver name.
pub fn check_format(format: &str) -> Result<(), Error> {
    let ok = !format.is_empty()
        && format
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadFormat {
            format: format.to_string(),
        })
    }
}

/// `qemu-img ARGS`, stdin from /dev/null, dying with us.
fn command() -> Result<Command, Error> {
    let binary =
        find_program(BINARY_NAME, BINARY_ENV).map_err(|searched| Error::NotFound { searched })?;
    let mut cmd = Command::new(binary);
    cmd.stdin(Stdio::null()).env("LC_ALL", "C");
    die_with_parent(&mut cmd);
    Ok(cmd)
}

/// The end of `bytes`, trimmed, as text.
fn tail(bytes: &[u8]) -> String {
    let t = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(STDERR_TAIL)..]);
    match t.trim() {
        "" => "(no output)".into(),
        t => t.into(),
    }
}

/// Runs `cmd` to its end; an error quotes its stderr.
fn run(mut cmd: Command, what: String) -> Result<(), Error> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| Error::Start { source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Failed {
        what,
        status: out.status,
        stderr: tail(&out.stderr),
    })
}

/// Writes the raw image at `src` (a file or an NBD URI) to a new image
/// `dst` of `format`. Regions the source reports as zero (NBD
/// BLOCK_STATUS) are not written, so they stay unallocated in a format
/// that can leave them so. `progress` is called with the percentage done
/// (0 to 100) as `qemu-img -p` reports it.
pub fn convert(
    src: &str,
    format: &str,
    dst: &Path,
    mut progress: impl FnMut(f64),
) -> Result<(), Error> {
    check_format(format)?;
    let mut cmd = command()?;
    cmd.args(["convert", "-p", "-f", "raw", "-O", format])
        .arg(src)
        .arg(dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| Error::Start { source })?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    // Progress arrives as "    (12.34/100%)\r".
    let mut stdout = child.stdout.take().expect("piped");
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = stdout.read(&mut buf) {
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if let Some(p) = parse_progress(&line) {
                    progress(p);
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    let status = child.wait().map_err(|source| Error::Start { source })?;
    let stderr = errors.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    Err(Error::Failed {
        what: format!("convert -O {format}"),
        status,
        stderr: tail(&stderr),
    })
}

/// The percentage in one of `qemu-img -p`'s progress lines.
fn parse_progress(line: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(line).ok()?.trim();
    let inner = s.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

/// Creates the qcow2 overlay `path` of `size` bytes over `backing`, an
/// image of format `backing_format` given as QEMU's filename (a path, a
/// URI or `json:{...}`). Its backing is opened once, so a backing that
/// cannot be read fails here rather than when a VM uses the overlay.
pub fn create_overlay(
    path: &Path,
    backing: &str,
    backing_format: &str,
    size: u64,
) -> Result<(), Error> {
    check_format(backing_format)?;
    let mut cmd = command()?;
    cmd.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        backing_format,
        "-b",
        backing,
    ])
    .arg(path)
    .arg(size.to_string());
    run(cmd, format!("create -f qcow2 {}", path.display()))
}

/// The backing filename `qemu-img info` reports for the image `path`
/// (`None` when it has no backing file), read with `-U` so an image a QEMU
/// holds open can be inspected.
pub fn backing_file(path: &Path) -> Result<Option<String>, Error> {
    let mut cmd = command()?;
    cmd.args(["info", "-U", "--output=json"]).arg(path);
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| Error::Start { source })?;
    let what = || format!("info {}", path.display());
    if !out.status.success() {
        return Err(Error::Failed {
            what: what(),
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| Error::Failed {
        what: what(),
        status: out.status,
        stderr: format!("unreadable output: {e}"),
    })?;
    Ok(v["backing-filename"].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress(b"    (12.34/100%)"), Some(12.34));
        assert_eq!(parse_progress(b"(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress(b""), None);
        assert_eq!(parse_progress(b"qemu-img: warning"), None);
    }

    #[test]
    fn format_names() {
        for ok in ["qcow2", "raw", "vmdk", "vhdx", "parallels", "qed", "luks"] {
            assert!(check_format(ok).is_ok(), "{ok}");
        }
        for bad in ["", "qcow2,backing=x", "a b", "../x"] {
            assert!(
                matches!(check_format(bad), Err(Error::BadFormat { .. })),
                "{bad}"
            );
        }
    }
}
