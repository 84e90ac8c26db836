//! The archive file, read with `pread` from any number of threads (or
//! through a read-only mapping, [`Mapping`]), and a count of every byte
//! read from it (what single-drive restore promises to keep small; tests
//! and benchmarks read it). The "file" may also be an object in S3
//! storage ([`RemoteObject`]): read by ranged GETs, counted in bytes
//! received, never mapped.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::object::RemoteObject;

/// Where the bytes are.
#[derive(Debug)]
enum Backing {
    Local(File),
    Remote(RemoteObject),
}

/// A file and the bytes read from it; see the module docs.
#[derive(Debug)]
pub struct CountedFile {
    file: Backing,
    len: u64,
    read: AtomicU64,
}

impl CountedFile {
    /// Wraps `file`, `len` bytes long.
    pub fn new(file: File, len: u64) -> Self {
        CountedFile {
            file: Backing::Local(file),
            len,
            read: AtomicU64::new(0),
        }
    }

    /// Wraps an object in S3 storage.
    pub fn remote(object: RemoteObject) -> Self {
        CountedFile {
            len: object.len(),
            file: Backing::Remote(object),
            read: AtomicU64::new(0),
        }
    }

    /// The object, when the archive is one.
    pub fn object(&self) -> Option<&RemoteObject> {
        match &self.file {
            Backing::Remote(o) => Some(o),
            Backing::Local(_) => None,
        }
    }

    /// The bytes from `offset` to `end` front to back: `pread`s of the
    /// file, or one streamed GET of an object.
    pub fn reader(self: &Arc<Self>, offset: u64, end: u64) -> io::Result<Box<dyn Read + Send>> {
        match &self.file {
            Backing::Local(_) => Ok(Box::new(SeqReader::new(self.clone(), offset, end))),
            Backing::Remote(o) => Ok(Box::new(o.stream(offset, end)?)),
        }
    }

    /// The file's length when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes read so far (of an object: bytes received, with what its
    /// block cache fetched around small reads).
    pub fn bytes_read(&self) -> u64 {
        match &self.file {
            Backing::Local(_) => self.read.load(Ordering::Relaxed),
            Backing::Remote(o) => o.fetched(),
        }
    }

    /// Maps the whole file read-only, to read it without copying
    /// ([`Mapping::bytes`]).
    pub fn map(self: &Arc<Self>) -> io::Result<Mapping> {
        let Backing::Local(file) = &self.file else {
            return Err(io::Error::other("an object cannot be mapped"));
        };
        let len = usize::try_from(self.len).map_err(io::Error::other)?;
        if len == 0 {
            return Err(io::Error::other("an empty file cannot be mapped"));
        }
        // SAFETY: a fresh read-only shared mapping of our own file
        // descriptor, not aliased by any Rust reference; it lives until
        // `Region::drop` unmaps it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )
        }?;
        Ok(Mapping {
            region: Arc::new(Region {
                ptr: ptr.cast(),
                len,
            }),
            file: self.clone(),
        })
    }

    /// Reads at `offset` until `buf` is full or the file ends; returns the
    /// bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let file = match &self.file {
            Backing::Local(f) => f,
            Backing::Remote(o) => {
                let got = o.read_at(buf, offset)?;
                self.read.fetch_add(got as u64, Ordering::Relaxed);
                return Ok(got);
            }
        };
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.read.fetch_add(got as u64, Ordering::Relaxed);
        Ok(got)
    }

    /// Like [`read_at`](Self::read_at), but only from the page cache: no
    /// disk I/O, so it may run where blocking is not allowed
    /// (`preadv2` with `RWF_NOWAIT`). `None` when some of the bytes are
    /// not cached, or the archive is an object (nothing is counted then;
    /// `buf` is unspecified).
    pub fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
        use rustix::io::{Errno, ReadWriteFlags, preadv2};
        // An object is never "cached" this way: its reads block.
        let Backing::Local(file) = &self.file else {
            return Ok(None);
        };
        let mut got = 0;
        while got < buf.len() {
            let at = offset + got as u64;
            match preadv2(
                file,
                &mut [io::IoSliceMut::new(&mut buf[got..])],
                at,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) if at >= self.len => break,
                // Short of the file's end: the rest is not cached.
                Ok(0) => return Ok(None),
                Ok(n) => got += n,
                Err(Errno::INTR) => {}
                // Not cached, or a kernel or file system without
                // RWF_NOWAIT: the caller reads the blocking way.
                Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.read.fetch_add(got as u64, Ordering::Relaxed);
        Ok(Some(got))
    }

    /// Asks the kernel to start reading `[offset, offset + len)` into the
    /// page cache (`POSIX_FADV_WILLNEED`), or an object's reader to fetch
    /// it ahead; returns at once. A hint: errors are ignored, and nothing
    /// is counted as read (an object counts what it fetches).
    pub fn advise_willneed(&self, offset: u64, len: u64) {
        let file = match &self.file {
            Backing::Local(f) => f,
            Backing::Remote(o) => {
                o.prefetch(offset, len);
                return;
            }
        };
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ = rustix::fs::fadvise(file, offset, Some(len), rustix::fs::Advice::WillNeed);
        }
    }

    /// `len` bytes at `offset`; `None` when the file ends before them.
    pub fn read_vec(&self, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0; len];
        let got = self.read_at(&mut buf, offset)?;
        Ok((got == len).then_some(buf))
    }
}

/// Reads a file front to back from `offset` to `end`, through `pread` (so
/// it shares the file and its count, and never moves a file position).
pub struct SeqReader {
    file: Arc<CountedFile>,
    offset: u64,
    end: u64,
}

impl SeqReader {
    /// Reads `file` from `offset` to `end`.
    pub fn new(file: Arc<CountedFile>, offset: u64, end: u64) -> Self {
        SeqReader { file, offset, end }
    }
}

impl Read for SeqReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.offset);
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl CountedFile {
    /// The file back (`None` for an object).
    pub fn into_file(self) -> Option<File> {
        match self.file {
            Backing::Local(f) => Some(f),
            Backing::Remote(_) => None,
        }
    }
}

/// A read-only mapping of a [`CountedFile`]: [`bytes`](Self::bytes) hands
/// out ranges of it as [`Bytes`] without copying (the bytes are read from
/// the page cache when touched, and counted as read).
///
/// The file must not shrink while it is mapped: touching a page past its
/// new end raises SIGBUS. Archives are never changed in place once
/// committed (readers take this risk only for a base archive, which the
/// run reads once, front to back).
#[derive(Debug, Clone)]
pub struct Mapping {
    region: Arc<Region>,
    file: Arc<CountedFile>,
}

#[derive(Debug)]
struct Region {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the region is read-only memory owned by `Region` alone; reading
// it from several threads at once is fine.
unsafe impl Send for Region {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `CountedFile::map`, unmapped once;
        // no `Bytes` of it outlive it (each holds an `Arc<Region>`).
        let _ = unsafe { rustix::mm::munmap(self.ptr as *mut _, self.len) };
    }
}

/// A range of a region, as the owner of a [`Bytes`].
struct Range {
    region: Arc<Region>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Range {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start..end` lies inside the region (checked in
        // `Mapping::bytes`), which stays mapped while `self.region` lives.
        unsafe {
            std::slice::from_raw_parts(self.region.ptr.add(self.start), self.end - self.start)
        }
    }
}

impl Mapping {
    /// `len` bytes at `offset`, without a copy; `None` when the file ends
    /// before them.
    pub fn bytes(&self, offset: u64, len: usize) -> Option<Bytes> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.region.len {
            return None;
        }
        self.file.read.fetch_add(len as u64, Ordering::Relaxed);
        Some(Bytes::from_owner(Range {
            region: self.region.clone(),
            start,
            end,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_hands_out_ranges_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(CountedFile::new(
            File::open(&path).unwrap(),
            data.len() as u64,
        ));
        let map = file.map().unwrap();
        let b = map.bytes(4096, 5000).unwrap();
        assert_eq!(&b[..], &data[4096..9096]);
        assert_eq!(file.bytes_read(), 5000);
        assert!(map.bytes(9000, 1001).is_none());
        assert!(map.bytes(u64::MAX, 1).is_none());
        // The bytes outlive the mapping handle and the file handle.
        drop(map);
        drop(file);
        assert_eq!(b[0], data[4096]);
    }
}
