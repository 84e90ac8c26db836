//! The archive file, read with `pread` from any number of threads, and a
//! count of every byte read from it (what single-drive restore promises
//! to keep small; tests and benchmarks read it).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A file and the bytes read from it; see the module docs.
#[derive(Debug)]
pub struct CountedFile {
    file: File,
    len: u64,
    read: AtomicU64,
}

impl CountedFile {
    /// Wraps `file`, `len` bytes long.
    pub fn new(file: File, len: u64) -> Self {
        CountedFile {
            file,
            len,
            read: AtomicU64::new(0),
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

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Reads at `offset` until `buf` is full or the file ends; returns the
    /// bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.read.fetch_add(got as u64, Ordering::Relaxed);
        Ok(got)
    }

    /// Asks the kernel to start reading `[offset, offset + len)` into the
    /// page cache (`POSIX_FADV_WILLNEED`); returns at once. A hint: errors
    /// are ignored, and nothing is counted as read.
    pub fn advise_willneed(&self, offset: u64, len: u64) {
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ =
                rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::WillNeed);
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
    /// The file back.
    pub fn into_file(self) -> File {
        self.file
    }
}
