//! Bytes out: where an archive goes, plain or as seekable zstd frames,
//! with its index, and how it is committed.
//!
//! A file target is written as `ARCHIVE.partial`, created exclusively, and
//! only [`Sink::commit`] makes it `ARCHIVE`, in two steps: [`Sink::seal`]
//! finishes the frames, writes the index (inside a `.vma.zst`, as
//! `ARCHIVE.index` beside a `.vma`) and fsyncs; [`Sealed::publish`]
//! renames and fsyncs the directory. Between the two, a caller may still
//! abandon the archive (a signal during the commit). Dropping an uncommitted sink removes the
//! partial files (unless told to keep them), so a failed run never leaves a
//! file that looks like a complete archive. Standard output and an
//! existing FIFO have no commit point; a consumer learns of failure from the
//! missing last extent and the exit status. A plain stream has no index (a
//! VMA stream cannot carry trailing bytes); a zstd stream ends with its
//! index and seek table like a file.
//!
//! An object target (`s3://BUCKET/KEY`) is a multipart upload
//! ([`crate::object::ObjectUpload`]) and follows the same rule: the seal
//! uploads the last parts, the publish completes the upload, and the
//! object exists from then on, whole; dropped before, the upload is
//! aborted. A plain archive's index becomes the object `KEY.index`, put
//! after the archive's completion.
//!
//! The sink takes the archive as units (the header, then whole extents:
//! [`ArchiveOut`]) so that every zstd frame holds whole extents; it never
//! parses them. `frames` compresses them.

mod frames;

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use bytes::Bytes;

pub use self::frames::FrameWriter;
use crate::object::{ObjectError, ObjectUpload, ObjectUrl};
use crate::vma::ArchiveOut;
use crate::vma::writer::write_all_vectored;

/// Where the archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output (`-`).
    Stdout,
    /// A file path; written as `PATH.partial` until committed.
    File(PathBuf),
    /// An object (`s3://BUCKET/KEY`); a multipart upload until committed.
    Object(ObjectUrl),
}

impl Target {
    /// `-` is stdout, `s3://BUCKET/KEY` an object, anything else a path.
    pub fn parse(s: &str) -> Result<Target, ObjectError> {
        Ok(if s == "-" {
            Target::Stdout
        } else if crate::object::is_object_name(s) {
            Target::Object(ObjectUrl::parse(s)?)
        } else {
            Target::File(PathBuf::from(s))
        })
    }

    /// True when writing it creates files (`ARCHIVE.partial`, the index):
    /// a path that is not an existing FIFO.
    pub fn creates_files(&self) -> bool {
        matches!(self, Target::File(p) if !is_fifo(p))
    }

    /// True for a name that asks for zstd by its extension (`.zst`).
    pub fn implies_zstd(&self) -> bool {
        match self {
            Target::File(p) => p.extension().is_some_and(|e| e == "zst"),
            Target::Object(u) => u.key.ends_with(".zst"),
            Target::Stdout => false,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("-"),
            Target::File(p) => write!(f, "{}", p.display()),
            Target::Object(u) => write!(f, "{u}"),
        }
    }
}

/// How to write.
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// zstd level, or `None` for a plain archive.
    pub zstd_level: Option<i32>,
    /// zstd worker threads (at least one is used).
    pub threads: usize,
    /// Keep `ARCHIVE.partial` when the sink is dropped uncommitted (an
    /// unfinished upload is aborted all the same).
    pub keep_partial: bool,
    /// At most this many archive bytes will be written: an object's part
    /// size is chosen so that they fit S3's part limit.
    pub size_bound: Option<u64>,
}

/// Where the bytes go.
enum Dest {
    File(File),
    Object(Box<ObjectUpload>),
}

impl Write for Dest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Dest::File(f) => f.write(buf),
            Dest::Object(o) => o.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Dest::File(f) => f.write_vectored(bufs),
            Dest::Object(o) => o.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Dest::File(f) => f.flush(),
            Dest::Object(o) => o.flush(),
        }
    }
}

enum Out {
    Plain(Dest),
    Framed(FrameWriter<Dest>),
}

/// An archive output; see the module docs.
pub struct Sink {
    out: Option<Out>,
    /// `(partial, final)` for file targets.
    paths: Option<(PathBuf, PathBuf)>,
    keep_partial: bool,
    /// Uncompressed archive bytes written so far.
    written: u64,
    /// The object, for an object target.
    object: Option<ObjectUrl>,
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

/// The name of the index beside a plain archive: `ARCHIVE.index`.
pub fn index_path(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".index");
    PathBuf::from(s)
}

impl Sink {
    /// Opens the target. A file target must not exist yet (neither
    /// `ARCHIVE` nor `ARCHIVE.partial`): an archive is never overwritten.
    pub fn create(target: &Target, opts: &SinkOptions) -> io::Result<Sink> {
        if let Target::Object(url) = target {
            let siblings = match opts.zstd_level {
                None => vec![url.with_suffix(".index")],
                Some(_) => Vec::new(),
            };
            if opts.keep_partial {
                tracing::warn!(
                    %url,
                    "--keep-partial does not apply to an object: an unfinished upload is aborted"
                );
            }
            let settings = crate::object::settings();
            let upload = ObjectUpload::create(url, &siblings, opts.size_bound, &settings)?;
            tracing::info!(%url, part_size = upload.part_size(), "uploading the archive");
            let dest = Dest::Object(Box::new(upload));
            let out = match opts.zstd_level {
                None => Out::Plain(dest),
                Some(level) => Out::Framed(FrameWriter::new(dest, level, opts.threads)?),
            };
            return Ok(Sink {
                out: Some(out),
                paths: None,
                keep_partial: false,
                written: 0,
                object: Some(url.clone()),
            });
        }
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
            Target::Object(_) => unreachable!("handled above"),
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
                let index = index_path(path);
                if index.exists() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!(
                            "{} already exists (an index without its archive?); refusing to \
                             overwrite it",
                            index.display()
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
        let file = Dest::File(file);
        let out = match opts.zstd_level {
            None => Out::Plain(file),
            Some(level) => Out::Framed(FrameWriter::new(file, level, opts.threads)?),
        };
        Ok(Sink {
            out: Some(out),
            paths,
            keep_partial: opts.keep_partial,
            written: 0,
            object: None,
        })
    }

    /// The file being written (`ARCHIVE.partial`), if the target is a file.
    pub fn partial(&self) -> Option<&Path> {
        self.paths.as_ref().map(|(p, _)| p.as_path())
    }

    /// Every partial file the sink may make before its commit: the
    /// archive's and, beside a plain one, the index's
    /// (`ARCHIVE.index.partial`).
    pub fn partials(&self) -> Vec<PathBuf> {
        match (&self.paths, &self.out) {
            (Some((partial, path)), Some(Out::Plain(_))) => {
                vec![partial.clone(), partial_path(&index_path(path))]
            }
            (Some((partial, _)), _) => vec![partial.clone()],
            (None, _) => Vec::new(),
        }
    }

    /// True when the archive bytes land uncompressed in a regular file, so
    /// they can be read back by offset while writing.
    pub fn is_plain_file(&self) -> bool {
        self.paths.is_some() && matches!(self.out, Some(Out::Plain(_)))
    }

    /// True when an index can be stored with the archive: in a zstd
    /// output, or beside a plain file or object (not in a plain stream).
    pub fn can_hold_index(&self) -> bool {
        self.paths.is_some() || self.object.is_some() || matches!(self.out, Some(Out::Framed(_)))
    }

    /// The object being uploaded, for an object target.
    pub fn object(&self) -> Option<&ObjectUrl> {
        self.object.as_ref()
    }

    /// Uncompressed archive bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn out(&mut self) -> io::Result<&mut Out> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("archive output already closed"))
    }

    /// Makes everything written so far durable where that is possible:
    /// fdatasync for a file (after the queued zstd frames are written);
    /// for pipes only a flush.
    pub fn sync(&mut self) -> io::Result<()> {
        let is_file = self.paths.is_some();
        let dest = match self.out()? {
            Out::Plain(f) => f,
            Out::Framed(w) => {
                w.drain()?;
                w.get_mut()
            }
        };
        match dest {
            Dest::File(file) if is_file => file.sync_data(),
            // Nothing of an upload is durable before it completes.
            Dest::File(_) | Dest::Object(_) => Ok(()),
        }
    }

    /// Finishes the archive: [`Sink::seal`], then [`Sealed::publish`].
    /// Returns the final path, if any.
    pub fn commit(self, index: Option<&[u8]>) -> io::Result<Option<PathBuf>> {
        self.seal(index)?.publish()
    }

    /// The first half of the commit, nothing final yet: writes the
    /// remaining frames, the index (see the module docs) and the seek
    /// table, and makes the partial files durable (fsync). For stdout,
    /// flushes. Whoever holds the [`Sealed`] archive decides whether it is
    /// published; dropping it removes the partial files like an
    /// uncommitted sink. A failed fsync fails the seal: after one, the
    /// kernel may have dropped the unwritten pages, and an archive that is
    /// not safely on disk is no archive.
    pub fn seal(mut self, index: Option<&[u8]>) -> io::Result<Sealed> {
        crate::fault::at(crate::fault::Point::CommitStart)?;
        let (dest, sidecar) = match self.out.take().expect("sink used after commit") {
            Out::Plain(f) => (f, index),
            Out::Framed(w) => (w.finish(index)?, None),
        };
        let file = match dest {
            Dest::Object(mut upload) => {
                upload.finish_parts()?;
                return Ok(Sealed {
                    paths: None,
                    index_files: None,
                    keep_partial: false,
                    upload: Some((*upload, sidecar.map(<[u8]>::to_vec))),
                });
            }
            Dest::File(file) => file,
        };
        let Some((partial, path)) = self.paths.take() else {
            (&file).flush()?;
            return Ok(Sealed {
                paths: None,
                index_files: None,
                keep_partial: false,
                upload: None,
            });
        };
        let mut sealed = Sealed {
            paths: Some((partial, path)),
            index_files: None,
            keep_partial: self.keep_partial,
            upload: None,
        };
        let (partial, path) = sealed.paths.as_ref().expect("set above");
        crate::fault::at(crate::fault::Point::CommitSync)
            .and_then(|()| file.sync_all())
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot fsync {}: {e}; the archive is not safely on disk",
                        partial.display()
                    ),
                )
            })?;
        drop(file);
        if let Some(bytes) = sidecar {
            match write_sidecar(path, bytes) {
                Ok(files) => sealed.index_files = Some(files),
                Err(e) => {
                    // The archive is complete and durable: keep it rather
                    // than delete a finished backup for want of its index
                    // (readers fall back without one), and say where.
                    let _ = std::fs::remove_file(partial_path(&index_path(path)));
                    let msg = format!("{e}; the finished archive is left at {}", partial.display());
                    sealed.keep_partial = true;
                    return Err(io::Error::new(e.kind(), msg));
                }
            }
        }
        Ok(sealed)
    }
}

/// An archive whose bytes are all written and durable under their
/// partial names ([`Sink::seal`]); [`Sealed::publish`] makes it final.
/// Dropped unpublished, it removes its partial files (unless told to keep
/// them).
/// The error of a [`Sealed::publish`] that failed after the archive was
/// renamed into place (renaming its index or syncing the directory): the
/// archive is complete at its final name. Callers tell it apart with
/// [`is_published`].
#[derive(Debug)]
pub struct Published(String);

impl std::fmt::Display for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Published {}

/// True when `e` is a [`Published`] error: the archive is in place.
pub fn is_published(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Published>())
}

pub struct Sealed {
    /// `(partial, final)` for file targets; `None` once published.
    paths: Option<(PathBuf, PathBuf)>,
    /// The index's `(partial, final)` names beside a plain archive.
    index_files: Option<(PathBuf, PathBuf)>,
    keep_partial: bool,
    /// An object's upload with every part uploaded, and the index to put
    /// beside it once it is complete; dropped, it is aborted.
    upload: Option<(ObjectUpload, Option<Vec<u8>>)>,
}

impl Sealed {
    /// The second half of the commit: renames `ARCHIVE.partial` to
    /// `ARCHIVE` (never over an existing file), then the index into place,
    /// and fsyncs the directory. A rename that fails keeps the finished
    /// partial file and says where it is. Returns the final path, if any.
    pub fn publish(mut self) -> io::Result<Option<PathBuf>> {
        if let Some((upload, index)) = self.upload.take() {
            let url = upload.url().clone();
            upload.complete()?;
            if let Some(bytes) = index {
                let at = url.with_suffix(".index");
                // The archive object is final: a failure now is
                // [`Published`], as a failed directory fsync after a
                // rename is (a backup keeps the new archive's bitmap).
                crate::object::upload::put_new(&at, bytes).map_err(|e| {
                    let e = io::Error::from(e);
                    io::Error::new(
                        e.kind(),
                        Published(format!("{e} (the archive {url} is complete)")),
                    )
                })?;
            }
            return Ok(Some(PathBuf::from(url.to_string())));
        }
        let Some((partial, path)) = self.paths.take() else {
            return Ok(None);
        };
        let index_files = self.index_files.take();
        // The archive is renamed before its index, so a crash in between
        // leaves a complete archive without an index (readers fall back),
        // never an index without its archive.
        let res = (|| {
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
            if let Some((tmp, dest)) = &index_files {
                rename_noreplace(tmp, dest).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()),
                    )
                })?;
            }
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            crate::fault::at(crate::fault::Point::DirSync)?;
            File::open(dir)?.sync_all()
        })();
        if let Err(e) = res {
            if path.exists() {
                // Renamed: the archive is complete and in place.
                return Err(io::Error::new(
                    e.kind(),
                    Published(format!("{e} (the archive {} is complete)", path.display())),
                ));
            }
            // The bytes are complete and durable; keep them where they are
            // rather than delete a finished backup, and say where.
            let msg = format!("{e}; the finished archive is left at {}", partial.display());
            self.keep_partial = true;
            self.paths = Some((partial, path));
            self.index_files = index_files;
            return Err(io::Error::new(e.kind(), msg));
        }
        Ok(Some(path))
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        if let Some((partial, _)) = self.paths.take() {
            remove_partial(&partial, self.index_files.take(), self.keep_partial);
        }
    }
}

/// Removes an unfinished archive's partial files: the index's always (it
/// is only ever written whole, just before the publish), the archive's
/// unless `keep`.
fn remove_partial(partial: &Path, index_tmp: Option<(PathBuf, PathBuf)>, keep: bool) {
    if let Some((tmp, _)) = index_tmp {
        let _ = std::fs::remove_file(tmp);
    }
    if keep {
        tracing::warn!(path = %partial.display(), "incomplete archive kept");
    } else if let Err(e) = std::fs::remove_file(partial) {
        tracing::warn!(path = %partial.display(), "cannot remove incomplete archive: {e}");
    }
}

/// Writes the index of the plain archive `path` to `ARCHIVE.index.partial`
/// and fsyncs it; returns (that name, the final name).
fn write_sidecar(path: &Path, bytes: &[u8]) -> io::Result<(PathBuf, PathBuf)> {
    let dest = index_path(path);
    if dest.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} already exists; refusing to overwrite it",
                dest.display()
            ),
        ));
    }
    let tmp = partial_path(&dest);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display())))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok((tmp, dest))
}

impl ArchiveOut for Sink {
    fn write_unit(&mut self, parts: &[Bytes]) -> io::Result<Option<u32>> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        let frame = match self.out()? {
            Out::Plain(f) => {
                let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
                write_all_vectored(f, &mut slices)?;
                None
            }
            Out::Framed(w) => Some(w.submit(parts.to_vec())?),
        };
        self.written += len as u64;
        Ok(frame)
    }

    fn flush_units(&mut self) -> io::Result<()> {
        match self.out()? {
            Out::Plain(f) => f.flush(),
            Out::Framed(w) => w.drain(),
        }
    }
}

/// Renames without ever replacing an existing file (an archive that
/// appeared at the final name while we wrote is not clobbered; `extract`
/// uses it for the same reason). A symlink at `to` counts as a file: it is
/// neither followed nor replaced.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
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
        if let Some((partial, path)) = self.paths.take() {
            drop(self.out.take());
            let index = index_path(&path);
            remove_partial(
                &partial,
                Some((partial_path(&index), index)),
                self.keep_partial,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seekable::{FOOTER_LEN, FrameMap, decode_seek_table, seek_table_len};

    fn unit(s: &mut Sink, bytes: &[u8]) -> Option<u32> {
        s.write_unit(&[Bytes::copy_from_slice(bytes)]).unwrap()
    }

    #[test]
    fn commit_renames_and_drop_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        let mut s = Sink::create(&Target::File(path.clone()), &SinkOptions::default()).unwrap();
        assert_eq!(unit(&mut s, b"hello"), None);
        assert!(partial_path(&path).exists());
        assert!(!path.exists());
        assert_eq!(s.commit(None).unwrap(), Some(path.clone()));
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert!(!partial_path(&path).exists());
        // never overwrite
        assert!(Sink::create(&Target::File(path.clone()), &SinkOptions::default()).is_err());
        // not even a file that appears while writing
        let late = dir.path().join("late.vma");
        let s = Sink::create(&Target::File(late.clone()), &SinkOptions::default()).unwrap();
        std::fs::write(&late, b"someone else's").unwrap();
        assert!(s.commit(None).is_err());
        assert_eq!(std::fs::read(&late).unwrap(), b"someone else's");

        let other = dir.path().join("b.vma");
        let mut s = Sink::create(&Target::File(other.clone()), &SinkOptions::default()).unwrap();
        unit(&mut s, b"x");
        drop(s);
        assert!(!partial_path(&other).exists() && !other.exists());

        let kept = dir.path().join("c.vma");
        let opts = SinkOptions {
            keep_partial: true,
            ..Default::default()
        };
        drop(Sink::create(&Target::File(kept.clone()), &opts).unwrap());
        assert!(partial_path(&kept).exists() && !kept.exists());
        // A leftover partial file is named for what it is.
        let e = Sink::create(&Target::File(kept.clone()), &opts)
            .err()
            .unwrap();
        assert!(e.to_string().contains("delete it"), "{e}");
    }

    #[test]
    fn a_plain_file_gets_its_index_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma");
        let mut s = Sink::create(&Target::File(path.clone()), &SinkOptions::default()).unwrap();
        assert!(s.can_hold_index());
        unit(&mut s, b"archive");
        s.commit(Some(b"index")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"archive");
        assert_eq!(std::fs::read(index_path(&path)).unwrap(), b"index");
        assert!(!partial_path(&index_path(&path)).exists());
        // An index without its archive blocks the name too.
        std::fs::remove_file(&path).unwrap();
        assert!(Sink::create(&Target::File(path.clone()), &SinkOptions::default()).is_err());
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
        assert!(s.partial().is_none() && !s.is_plain_file() && !s.can_hold_index());
        unit(&mut s, b"through the pipe");
        assert_eq!(s.commit(None).unwrap(), None);
        assert_eq!(reader.join().unwrap(), b"through the pipe");
    }

    #[test]
    fn zstd_frames_per_unit_with_index_and_seek_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.vma.zst");
        let opts = SinkOptions {
            zstd_level: Some(3),
            threads: 2,
            ..Default::default()
        };
        let mut s = Sink::create(&Target::File(path.clone()), &opts).unwrap();
        let units: Vec<Vec<u8>> = (0..9u8)
            .map(|i| vec![i; 1000 + 5000 * i as usize])
            .collect();
        for (i, u) in units.iter().enumerate() {
            assert_eq!(unit(&mut s, u), Some(i as u32));
        }
        s.sync().unwrap();
        s.commit(Some(b"the index")).unwrap();
        let file = std::fs::read(&path).unwrap();
        // `zstd -d` sees one stream: the units, in order.
        let back = zstd::decode_all(&file[..]).unwrap();
        assert_eq!(back, units.concat());
        // The seek table: one entry per unit, then the index frame.
        let len = seek_table_len(&file[file.len() - FOOTER_LEN..]).unwrap() as usize;
        let table = decode_seek_table(&file[file.len() - len..]).unwrap();
        assert_eq!(table.len(), units.len() + 1);
        let map = FrameMap::new(&table);
        assert_eq!(map.compressed_len as usize, file.len() - len);
        for (i, u) in units.iter().enumerate() {
            let (at, _, e) = map.frame(i).unwrap();
            assert_eq!(e.decompressed as usize, u.len());
            let frame = &file[at as usize..][..e.compressed as usize];
            // Each frame alone, with its checksum flag (descriptor bit 2).
            assert_eq!(zstd::decode_all(frame).unwrap(), *u);
            assert_ne!(frame[4] & 0x04, 0, "frame {i} has no checksum");
        }
        let (at, _, e) = map.frame(units.len()).unwrap();
        assert_eq!(e.decompressed, 0);
        let index = &file[at as usize..][..e.compressed as usize];
        assert_eq!(&index[8..], b"the index");
    }
}
