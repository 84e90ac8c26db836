//! An object read like a file ([`RemoteObject`]): `pread`-like ranged
//! GETs for the random-access readers, and one streamed GET for reading
//! front to back. Reads smaller than a block go through a small cache of
//! aligned blocks, so parsing a header, a seek table or a footer costs a
//! GET or two rather than one per field; larger reads (frames, extents)
//! are fetched exactly, or taken from a range fetched ahead
//! ([`RemoteObject::prefetch`]). Every byte received is counted
//! ([`RemoteObject::fetched`]): what "reads only what it needs" is
//! measured by.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use super::{ObjectError, ObjectUrl, block_on, spawn, store};

/// Bytes of a cached block: a VMA header with its configs, a seek table's
/// tail or an extent header fits in one or two.
const BLOCK: u64 = 64 << 10;

/// Blocks kept (1 MiB): the header and the tail of the archive, read
/// while opening it, stay cached together.
const CACHED_BLOCKS: usize = 16;

/// Bytes fetched ahead of readers ([`RemoteObject::prefetch`], what
/// `export` asks for a plain archive's next clusters) kept at once; a hint
/// past it is dropped.
const AHEAD_BUDGET: u64 = 32 << 20;

/// A range being fetched ahead, or fetched.
struct Ahead {
    start: u64,
    end: u64,
    slot: Arc<(Mutex<Option<Option<Bytes>>>, Condvar)>,
}

/// Chunks of a streamed GET received ahead of the reader: network and
/// decoder overlap, memory stays bounded (the client's chunks are tens of
/// KiB).
const STREAM_CHUNKS_AHEAD: usize = 64;

/// An object opened for reading; see the module docs.
pub struct RemoteObject {
    url: ObjectUrl,
    store: Arc<AmazonS3>,
    len: u64,
    fetched: Arc<AtomicU64>,
    /// Of those, received by ranged GETs (the rest by streams).
    ranged: Arc<AtomicU64>,
    /// GETs made (ranged and streamed).
    requests: AtomicU64,
    /// (block number, bytes), most recent last.
    blocks: Mutex<VecDeque<(u64, Bytes)>>,
    /// Ranges fetched ahead, oldest first (within [`AHEAD_BUDGET`]).
    ahead: Mutex<VecDeque<Ahead>>,
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject")
            .field("url", &self.url)
            .field("len", &self.len)
            .finish()
    }
}

impl RemoteObject {
    /// Looks `url` up (HEAD): it must exist.
    pub fn open(url: &ObjectUrl) -> Result<RemoteObject, ObjectError> {
        let store = store(&url.bucket)?;
        let (s, path) = (store.clone(), url.path());
        let meta = match block_on(async move { s.head(&path).await }) {
            Ok(m) => m,
            Err(e) => {
                let e = ObjectError::of(url, "open it", e);
                if matches!(e, ObjectError::NoSuchKey { .. }) {
                    // Which is missing, the bucket or the key?
                    super::check_bucket(&store, url)?;
                }
                return Err(e);
            }
        };
        Ok(RemoteObject {
            url: url.clone(),
            store,
            len: meta.size,
            fetched: Arc::new(AtomicU64::new(0)),
            ranged: Arc::new(AtomicU64::new(0)),
            requests: AtomicU64::new(0),
            blocks: Mutex::new(VecDeque::new()),
            ahead: Mutex::new(VecDeque::new()),
        })
    }

    /// The object's name.
    pub fn url(&self) -> &ObjectUrl {
        &self.url
    }

    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty object.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes received from the store so far.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// `[start, end)` of the object, in one ranged GET.
    fn get(&self, start: u64, end: u64) -> io::Result<Bytes> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (s, path) = (self.store.clone(), self.url.path());
        let bytes = block_on(async move { s.get_range(&path, start..end).await })
            .map_err(|e| ObjectError::of(&self.url, "read it", e))?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.ranged.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if (bytes.len() as u64) < end - start {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {} bytes at {start} asked for, {} received (did the object change?)",
                    self.url,
                    end - start,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    fn cached(&self, block: u64) -> Option<Bytes> {
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        blocks
            .iter()
            .find(|(b, _)| *b == block)
            .map(|(_, d)| d.clone())
    }

    fn keep(&self, block: u64, data: Bytes) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        if blocks.iter().any(|(b, _)| *b == block) {
            return;
        }
        if blocks.len() == CACHED_BLOCKS {
            blocks.pop_front();
        }
        blocks.push_back((block, data));
    }

    /// Starts fetching `[offset, offset + len)` in the background, for a
    /// read that is coming (a hint: dropped past [`AHEAD_BUDGET`] or when
    /// it overlaps a range already asked for).
    pub fn prefetch(&self, offset: u64, len: u64) {
        let end = self.len.min(offset.saturating_add(len));
        let mut offset = offset;
        let mut ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        // What is asked for already is not asked for again: a read-ahead
        // window that slides forward overlaps the last one.
        while let Some(a) = ahead.iter().find(|a| a.start <= offset && offset < a.end) {
            offset = a.end;
        }
        if offset >= end {
            return;
        }
        let mut held: u64 = ahead.iter().map(|a| a.end - a.start).sum();
        // Arrived ranges that no reader finished make room, oldest first.
        while held + (end - offset) > AHEAD_BUDGET
            && ahead
                .front()
                .is_some_and(|a| a.slot.0.lock().unwrap_or_else(|e| e.into_inner()).is_some())
        {
            let a = ahead.pop_front().expect("checked");
            held -= a.end - a.start;
        }
        if held + (end - offset) > AHEAD_BUDGET
            || ahead.iter().any(|a| a.start < end && offset < a.end)
        {
            return;
        }
        let slot = Arc::new((Mutex::new(None), Condvar::new()));
        ahead.push_back(Ahead {
            start: offset,
            end,
            slot: slot.clone(),
        });
        drop(ahead);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (s, path) = (self.store.clone(), self.url.path());
        let (fetched, ranged) = (self.fetched.clone(), self.ranged.clone());
        spawn(async move {
            let got = s.get_range(&path, offset..end).await.ok();
            let got = got.filter(|b| b.len() as u64 == end - offset);
            if let Some(b) = &got {
                fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                ranged.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            let (lock, ready) = &*slot;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
            ready.notify_all();
        });
    }

    /// `[offset, end)` from a range fetched ahead, when one holds all of
    /// it (waiting for it to arrive); the range is dropped once read to
    /// its end, or when it failed.
    fn take_ahead(&self, offset: u64, end: u64) -> Option<Bytes> {
        let slot = {
            let ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
            let a = ahead.iter().find(|a| a.start <= offset && end <= a.end)?;
            (a.slot.clone(), a.start, a.end)
        };
        let ((lock, ready), start, stop) = (&*slot.0, slot.1, slot.2);
        let mut got = lock.lock().unwrap_or_else(|e| e.into_inner());
        while got.is_none() {
            got = ready.wait(got).unwrap_or_else(|e| e.into_inner());
        }
        let data = got.clone().flatten();
        drop(got);
        if data.is_none() || end == stop {
            let mut ahead = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
            ahead.retain(|a| !Arc::ptr_eq(&a.slot, &slot.0));
        }
        data.map(|d| d.slice((offset - start) as usize..(end - start) as usize))
    }

    /// Reads at `offset` until `buf` is full or the object ends; returns
    /// the bytes read (like `pread` in a loop).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = self.len.min(offset.saturating_add(buf.len() as u64));
        if offset >= end {
            return Ok(0);
        }
        let want = (end - offset) as usize;
        if let Some(data) = self.take_ahead(offset, end) {
            buf[..want].copy_from_slice(&data);
            return Ok(want);
        }
        if want as u64 >= BLOCK {
            let bytes = self.get(offset, end)?;
            buf[..want].copy_from_slice(&bytes);
            return Ok(want);
        }
        // Small: through the block cache; the missing blocks in one GET.
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut have: Vec<Option<Bytes>> = (first..=last).map(|b| self.cached(b)).collect();
        if let (Some(lo), Some(hi)) = (
            have.iter().position(Option::is_none),
            have.iter().rposition(Option::is_none),
        ) {
            let start = (first + lo as u64) * BLOCK;
            let stop = ((first + hi as u64 + 1) * BLOCK).min(self.len);
            let got = self.get(start, stop)?;
            for (i, slot) in have.iter_mut().enumerate().take(hi + 1).skip(lo) {
                let b = first + i as u64;
                let from = (b * BLOCK - start) as usize;
                let to = (((b + 1) * BLOCK).min(self.len) - start) as usize;
                let data = got.slice(from..to);
                self.keep(b, data.clone());
                *slot = Some(data);
            }
        }
        let mut at = 0;
        for (i, data) in have.into_iter().enumerate() {
            let data = data.expect("fetched above");
            let b = first + i as u64;
            let from = offset.max(b * BLOCK) - b * BLOCK;
            let to = end.min(b * BLOCK + data.len() as u64) - b * BLOCK;
            let n = (to - from) as usize;
            buf[at..at + n].copy_from_slice(&data[from as usize..to as usize]);
            at += n;
        }
        debug_assert_eq!(at, want);
        Ok(want)
    }

    /// `[offset, end)` front to back, in one streamed GET.
    pub fn stream(&self, offset: u64, end: u64) -> io::Result<ObjectStream> {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(STREAM_CHUNKS_AHEAD);
        let end = end.min(self.len);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (s, path, url, fetched) = (
            self.store.clone(),
            self.url.path(),
            self.url.clone(),
            self.fetched.clone(),
        );
        if offset < end {
            spawn(async move {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(offset..end)),
                    ..Default::default()
                };
                let mut chunks = match s.get_opts(&path, opts).await {
                    Ok(r) => r.into_stream(),
                    Err(e) => {
                        let _ = tx
                            .send(Err(ObjectError::of(&url, "read it", e).into()))
                            .await;
                        return;
                    }
                };
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk.map_err(|e| ObjectError::of(&url, "read it", e).into());
                    if let Ok(c) = &chunk {
                        fetched.fetch_add(c.len() as u64, Ordering::Relaxed);
                    }
                    // Waits while the reader is behind: the
                    // back-pressure. A reader that is gone ends the GET.
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok(ObjectStream {
            rx,
            chunk: Bytes::new(),
            left: end.saturating_sub(offset),
            received: 0,
            url: self.url.clone(),
        })
    }

    /// The whole object `url` when it exists (`None` when it does not):
    /// for a sidecar index.
    pub fn read_whole(url: &ObjectUrl) -> Result<Option<Vec<u8>>, ObjectError> {
        let store = store(&url.bucket)?;
        let path = url.path();
        let res = block_on(async move {
            match store.get(&path).await {
                Ok(r) => r.bytes().await,
                Err(e) => Err(e),
            }
        });
        match res {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(e) => match ObjectError::of(url, "read it", e) {
                ObjectError::NoSuchKey { .. } => Ok(None),
                e => Err(e),
            },
        }
    }
}

impl Drop for RemoteObject {
    /// Says what its ranged GETs cost (`RUST_LOG=vma_writer::object=debug`;
    /// the benchmarks read it); each stream says so of its own.
    fn drop(&mut self) {
        tracing::debug!(
            url = %self.url,
            len = self.len,
            fetched = self.ranged.load(Ordering::Relaxed),
            requests = self.requests.load(Ordering::Relaxed),
            "object read by ranges"
        );
    }
}

/// A range of an object read front to back ([`RemoteObject::stream`]).
pub struct ObjectStream {
    /// Read with `blocking_recv`: streams are read on plain threads.
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
    left: u64,
    /// Bytes received so far.
    received: u64,
    url: ObjectUrl,
}

impl Drop for ObjectStream {
    /// Says what the stream cost (see [`RemoteObject`]'s drop).
    fn drop(&mut self) {
        tracing::debug!(url = %self.url, fetched = self.received, "object streamed");
    }
}

impl Read for ObjectStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.left == 0 || buf.is_empty() {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.chunk = chunk?;
                    self.received += self.chunk.len() as u64;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{}: the object ended {} bytes early", self.url, self.left),
                    ));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        self.left = self.left.saturating_sub(n as u64);
        Ok(n)
    }
}
