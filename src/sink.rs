//! Bytes out: where an archive goes, plain or zstd-compressed, and how it
//! is committed.
//!
//! A file target is written as `ARCHIVE.partial`, created exclusively, and
//! only [`Sink::commit`] makes it `ARCHIVE`: finish compression, fsync the
//! file, rename, fsync the directory. Dropping an uncommitted sink removes
//! the partial file (unless told to keep it), so a failed run never leaves a
//! file that looks like a complete archive. Standard output and an
//! existing FIFO have no commit point; a consumer learns of failure from the
//! missing last extent and the exit status. This module never parses VMA.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Where the archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output (`-`).
    Stdout,
    /// A file path; written as `PATH.partial` until committed.
    File(PathBuf),
}

impl Target {
    /// `-` is stdout, anything else a path.
    pub fn parse(s: &str) -> Target {
        if s == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }
}

/// How to write.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// zstd level, or `None` for a plain archive.
    pub zstd_level: Option<i32>,
    /// zstd worker threads (0 = compress on the writing thread).
    pub zstd_threads: u32,
    /// Keep `ARCHIVE.partial` when the sink is dropped uncommitted.
    pub keep_partial: bool,
}

enum Out {
    Plain(File),
    Zstd(zstd::stream::write::Encoder<'static, File>),
}

/// An archive output; see the module docs.
pub struct Sink {
    out: Option<Out>,
    /// `(partial, final)` for file targets.
    paths: Option<(PathBuf, PathBuf)>,
    keep_partial: bool,
    written: u64,
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The temporary name of an archive being written.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

impl Sink {
    /// Opens the target. A file target must not exist yet (neither
    /// `ARCHIVE` nor `ARCHIVE.partial`): an archive is never overwritten.
    pub fn create(target: &Target, opts: &SinkOptions) -> io::Result<Sink> {
        let (file, paths) = match target {
            Target::Stdout => {
                // Our own handle on fd 1, unbuffered: std's stdout is
                // line-buffered and would scan every byte for newlines.
                let fd = io::stdout().as_fd().try_clone_to_owned()?;
                (File::from(fd), None)
            }
            Target::File(path) if is_fifo(path) => {
                // A named pipe is a stream like stdout (Proxmox's writer
                // takes FIFOs too): no partial file, no rename.
                let file = OpenOptions::new().write(true).open(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open FIFO {}: {e}", path.display()),
                    )
                })?;
                (file, None)
            }
            Target::File(path) => {
                if path.exists() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} already exists; refusing to overwrite it",
                            path.display()
                        ),
                    ));
                }
                let partial = partial_path(path);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&partial)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            return io::Error::new(
                                e.kind(),
                                format!(
                                    "{} exists: the unfinished archive of an earlier run that \
                                     was killed or kept with --keep-partial. It is not a \
                                     complete archive; delete it to write {}",
                                    partial.display(),
                                    path.display()
                                ),
                            );
                        }
                        io::Error::new(
                            e.kind(),
                            format!("cannot create {}: {e}", partial.display()),
                        )
                    })?;
                (file, Some((partial, path.clone())))
            }
        };
        let out = match opts.zstd_level {
            None => Out::Plain(file),
            Some(level) => {
                let mut enc = zstd::stream::write::Encoder::new(file, level)?;
                // Every frame carries zstd's content checksum (XXH64), as
                // the zstd CLI writes it by default: a corrupted file is
                // caught when it is read.
                enc.include_checksum(true)?;
                if opts.zstd_threads > 0 {
                    enc.multithread(opts.zstd_threads)?;
                }
                Out::Zstd(enc)
            }
        };
        Ok(Sink {
            out: Some(out),
            paths,
            keep_partial: opts.keep_partial,
            written: 0,
        })
    }

    /// The file being written (`ARCHIVE.partial`), if the target is a file.
    pub fn partial(&self) -> Option<&Path> {
        self.paths.as_ref().map(|(p, _)| p.as_path())
    }

    /// True when the archive bytes land uncompressed in a regular file, so
    /// they can be read back by offset while writing.
    pub fn is_plain_file(&self) -> bool {
        self.paths.is_some() && matches!(self.out, Some(Out::Plain(_)))
    }

    /// Uncompressed bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn out(&mut self) -> io::Result<&mut Out> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("archive output already closed"))
    }

    /// Makes everything written so far durable where that is possible:
    /// fdatasync for a plain file; for zstd, a flushed frame plus fdatasync;
    /// for pipes only a flush.
    pub fn sync(&mut self) -> io::Result<()> {
        let is_file = self.paths.is_some();
        let file = match self.out()? {
            Out::Plain(f) => f,
            Out::Zstd(enc) => {
                enc.flush()?;
                enc.get_mut()
            }
        };
        if is_file {
            file.sync_data()?;
        }
        Ok(())
    }

    /// Finishes the archive: ends compression, fsyncs, renames
    /// `ARCHIVE.partial` to `ARCHIVE` and fsyncs the directory. For stdout,
    /// flushes. Returns the final path, if any.
    pub fn commit(mut self) -> io::Result<Option<PathBuf>> {
        let file = match self.out.take().expect("sink used after commit") {
            Out::Plain(f) => f,
            Out::Zstd(enc) => enc.finish()?,
        };
        let Some((partial, path)) = self.paths.take() else {
            (&file).flush()?;
            return Ok(None);
        };
        let res = (|| {
            file.sync_all()?;
            drop(file);
            rename_noreplace(&partial, &path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot rename {} to {}: {e}",
                        partial.display(),
                        path.display()
                    ),
                )
            })?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            File::open(dir)?.sync_all()
        })();
        if let Err(e) = res {
            // The bytes are complete; keep them where they are rather than
            // delete a finished backup, and say where.
            let msg = format!("{e}; the finished archive is left at {}", partial.display());
            self.keep_partial = true;
            self.paths = Some((partial, path));
            return Err(io::Error::new(e.kind(), msg));
        }
        Ok(Some(path))
    }
}

/// Renames without ever replacing an existing file (an archive that
/// appeared at the final name while we wrote is not clobbered).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        // The filesystem cannot do it: link + unlink is no-replace too.
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some((partial, _)) = self.paths.take() {
            drop(self.out.take());
            if self.keep_partial {
                tracing::warn!(path = %partial.display(), "incomplete archive kept");
            } else if let Err(e) = std::fs::remove_file(&partial) {
                tracing::warn!(path = %partial.display(), "cannot remove incomplete archive: {e}");
            }
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match self.out()? {
            Out::Plain(f) => f.write(buf)?,
            Out::Zstd(e) => e.write(buf)?,
        };
        self.written += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = match self.out()? {
            Out::Plain(f) => f.write_vectored(bufs)?,
            Out::Zstd(e) => e.write_vectored(bufs)?,
        };
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out()? {
            Out::Plain(f) => f.flush(),
            Out::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        let mut s = Sink::create(&Target::File(path.clone()), &SinkOptions::default()).unwrap();
        s.write_all(b"hello").unwrap();
        assert!(partial_path(&path).exists());
        assert!(!path.exists());
        assert_eq!(s.commit().unwrap(), Some(path.clone()));
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert!(!partial_path(&path).exists());
        // never overwrite
        assert!(Sink::create(&Target::File(path.clone()), &SinkOptions::default()).is_err());
        // not even a file that appears while writing
        let late = dir.path().join("late.vma");
        let s = Sink::create(&Target::File(late.clone()), &SinkOptions::default()).unwrap();
        std::fs::write(&late, b"someone else's").unwrap();
        assert!(s.commit().is_err());
        assert_eq!(std::fs::read(&late).unwrap(), b"someone else's");

        let other = dir.path().join("b.vma");
        let mut s = Sink::create(&Target::File(other.clone()), &SinkOptions::default()).unwrap();
        s.write_all(b"x").unwrap();
        drop(s);
        assert!(!partial_path(&other).exists() && !other.exists());

        let kept = dir.path().join("c.vma");
        let opts = SinkOptions {
            keep_partial: true,
            ..Default::default()
        };
        drop(Sink::create(&Target::File(kept.clone()), &opts).unwrap());
        assert!(partial_path(&kept).exists() && !kept.exists());
    }

    #[test]
    fn a_fifo_is_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        use rustix::fs::{CWD, FileType, Mode, mknodat};
        let fifo = dir.path().join("pipe");
        mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        let mut s = Sink::create(&Target::File(fifo.clone()), &SinkOptions::default()).unwrap();
        assert!(s.partial().is_none() && !s.is_plain_file());
        s.write_all(b"through the pipe").unwrap();
        assert_eq!(s.commit().unwrap(), None);
        assert_eq!(reader.join().unwrap(), b"through the pipe");
    }

    #[test]
    fn zstd_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma.zst");
        let opts = SinkOptions {
            zstd_level: Some(3),
            ..Default::default()
        };
        let mut s = Sink::create(&Target::File(path.clone()), &opts).unwrap();
        s.write_all(&[7u8; 100_000]).unwrap();
        s.commit().unwrap();
        let back = zstd::decode_all(File::open(&path).unwrap()).unwrap();
        assert_eq!(back, vec![7u8; 100_000]);
    }
}
