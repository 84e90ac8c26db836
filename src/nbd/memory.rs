//! [`MemoryBackend`]: a sparse in-memory export for tests, demos and
//! benchmarks.
//!
//! The export is cut into 64 KiB pages kept in sharded hash maps; a page
//! that was never written (or was trimmed) takes no memory and reads as
//! zeros. Whole-page writes keep the client's buffer (no copy); partial
//! writes copy into a page of their own.

use std::collections::HashMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use super::backend::{Backend, BackendCaps, BlockStatus, split_range};

/// Page size: the unit of allocation and of block-status answers. 64 KiB is
/// QEMU's backup cluster, so a backup allocates whole pages.
pub const PAGE_SIZE: u64 = 64 * 1024;

/// Number of independently locked shards; pages are spread by number so
/// concurrent requests on different pages rarely contend.
const SHARDS: usize = 64;

/// Pages one block-status call looks at before answering with what it has
/// (the client asks again for the rest): bounds the time one request takes
/// on a huge sparse export.
const MAX_STATUS_PAGES: u64 = 1 << 16;

/// One allocated page.
#[derive(Debug, Clone)]
enum Page {
    /// Allocated but all zeros (WRITE_ZEROES with NO_HOLE); costs no buffer.
    Zero,
    /// A whole-page slice of a client's WRITE buffer.
    Shared(Bytes),
    /// A page of our own, written piecewise.
    Owned(Box<[u8]>),
}

impl Page {
    /// Turns the page into an owned buffer and returns it for writing.
    fn make_mut(&mut self) -> &mut [u8] {
        match self {
            Page::Owned(_) => {}
            Page::Zero => *self = Page::Owned(vec![0u8; PAGE_SIZE as usize].into_boxed_slice()),
            Page::Shared(b) => *self = Page::Owned(b.to_vec().into_boxed_slice()),
        }
        match self {
            Page::Owned(b) => b,
            _ => unreachable!("page was just made owned"),
        }
    }

    fn data(&self) -> Option<&[u8]> {
        match self {
            Page::Zero => None,
            Page::Shared(b) => Some(b),
            Page::Owned(b) => Some(b),
        }
    }
}

/// A sparse RAM disk. Flush is a no-op that is trivially global, zeroing is
/// fast (pages are dropped or marked), and block status reports holes.
#[derive(Debug)]
pub struct MemoryBackend {
    size: u64,
    read_only: bool,
    shards: Box<[Mutex<HashMap<u64, Page>>]>,
}

impl MemoryBackend {
    /// An empty (all zeros, all holes) writable export of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// A writable export pre-filled with `data` (all-zero pages stay holes).
    pub fn from_data(data: &[u8]) -> Self {
        let b = Self::new(data.len() as u64);
        for (i, chunk) in data.chunks(PAGE_SIZE as usize).enumerate() {
            if chunk.iter().any(|&x| x != 0) {
                b.store(i as u64 * PAGE_SIZE, chunk);
            }
        }
        b
    }

    /// An export that is read-only to clients, pre-filled with `data`.
    pub fn read_only_from(data: &[u8]) -> Self {
        Self::from_data(data).into_read_only()
    }

    /// The same export, read-only to clients (writes, zeroes and trims get
    /// EPERM).
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Copies the whole export out (for tests; allocates `size` bytes).
    pub fn contents(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        self.copy_out(0, &mut out);
        out
    }

    /// Number of allocated pages, data or zero (for tests).
    pub fn allocated_pages(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard(&self, page: u64) -> MutexGuard<'_, HashMap<u64, Page>> {
        lock(&self.shards[(page % SHARDS as u64) as usize])
    }

    fn store(&self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        for (page_no, in_page, n) in split_range(offset, data.len() as u64, PAGE_SIZE) {
            let mut shard = self.shard(page_no);
            let page = shard.entry(page_no).or_insert(Page::Zero);
            page.make_mut()[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn copy_out(&self, offset: u64, out: &mut [u8]) {
        let mut pos = 0usize;
        for (page_no, in_page, n) in split_range(offset, out.len() as u64, PAGE_SIZE) {
            let shard = self.shard(page_no);
            match shard.get(&page_no).and_then(Page::data) {
                Some(d) => out[pos..pos + n].copy_from_slice(&d[in_page..in_page + n]),
                None => out[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }

    /// Zeroes `[offset, offset+len)`: whole pages are dropped (`may_trim`)
    /// or marked zero; partial pages get zeros written into them.
    fn zero_range(&self, offset: u64, len: u64, may_trim: bool) {
        let end = offset + len;
        let first_full = offset.div_ceil(PAGE_SIZE);
        let last_full = end / PAGE_SIZE; // exclusive
        // Partial head and tail pages.
        for (start, stop) in [
            (offset, end.min(first_full * PAGE_SIZE)),
            ((last_full * PAGE_SIZE).max(offset), end),
        ] {
            if start >= stop || (start % PAGE_SIZE == 0 && stop - start == PAGE_SIZE) {
                continue;
            }
            let page_no = start / PAGE_SIZE;
            let mut shard = self.shard(page_no);
            match shard.get_mut(&page_no) {
                Some(p @ (Page::Shared(_) | Page::Owned(_))) => {
                    let a = (start % PAGE_SIZE) as usize;
                    let b = a + (stop - start) as usize;
                    p.make_mut()[a..b].fill(0);
                }
                Some(Page::Zero) => {}
                None if !may_trim => {
                    shard.insert(page_no, Page::Zero);
                }
                None => {}
            }
            if first_full > last_full {
                break; // head and tail are the same page
            }
        }
        if first_full >= last_full {
            return;
        }
        let pages = last_full - first_full;
        if may_trim && pages > 4 * self.allocated_pages() as u64 {
            // Huge range on a sparse disk: sweep the maps instead.
            for s in self.shards.iter() {
                lock(s).retain(|&p, _| p < first_full || p >= last_full);
            }
            return;
        }
        for p in first_full..last_full {
            let mut shard = self.shard(p);
            if may_trim {
                shard.remove(&p);
            } else {
                shard.insert(p, Page::Zero);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a page lock cannot leave a page half-updated in a
    // way that matters more than the panic itself; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: self.read_only,
            flush_is_global: true,
            fast_zero: true,
            trim: true,
        }
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let mut pos = 0usize;
        for (page_no, in_page, n) in split_range(offset, data.len() as u64, PAGE_SIZE) {
            let mut shard = self.shard(page_no);
            if n == PAGE_SIZE as usize {
                shard.insert(page_no, Page::Shared(data.slice(pos..pos + n)));
            } else {
                let page = shard.entry(page_no).or_insert(Page::Zero);
                page.make_mut()[in_page..in_page + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.zero_range(offset, len, may_trim);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        // Advisory: drop whole pages only, leave partial ones as they are.
        let first_full = offset.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = ((offset + len) / PAGE_SIZE) * PAGE_SIZE;
        if first_full < end {
            self.zero_range(first_full, end - first_full, true);
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        let mut buf = BytesMut::zeroed(len as usize);
        self.copy_out(offset, &mut buf);
        Ok(buf.freeze())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<BlockStatus>> {
        let end = (offset + len).min(self.size);
        let mut runs: Vec<BlockStatus> = Vec::new();
        let mut pos = offset;
        let mut scanned = 0;
        while pos < end && scanned < MAX_STATUS_PAGES {
            let page_no = pos / PAGE_SIZE;
            let stop = ((page_no + 1) * PAGE_SIZE).min(end);
            let flags = match self.shard(page_no).get(&page_no) {
                None => BlockStatus::HOLE | BlockStatus::ZERO,
                Some(Page::Zero) => BlockStatus::ZERO,
                Some(_) => 0,
            };
            match runs.last_mut() {
                Some(last) if last.flags == flags => last.len += stop - pos,
                _ => runs.push(BlockStatus {
                    len: stop - pos,
                    flags,
                }),
            }
            pos = stop;
            scanned += 1;
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[tokio::test]
    async fn write_read_round_trip_across_pages() {
        let b = MemoryBackend::new(4 * P + 100);
        let data: Vec<u8> = (0..(2 * P + 300)).map(|i| (i % 251) as u8).collect();
        b.write(P - 100, Bytes::from(data.clone())).await.unwrap();
        let got = b.read(P - 100, data.len() as u32).await.unwrap();
        assert_eq!(&got[..], &data[..]);
        let all = b.contents();
        assert!(all[..(P - 100) as usize].iter().all(|&x| x == 0));
        assert_eq!(
            &all[(P - 100) as usize..(P - 100) as usize + data.len()],
            &data[..]
        );
        // Partial write into a shared page copies on write.
        b.write(P + 5, Bytes::from_static(b"xyz")).await.unwrap();
        assert_eq!(
            &b.read(P + 4, 5).await.unwrap()[..],
            &[data[104], b'x', b'y', b'z', data[108]]
        );
    }

    #[tokio::test]
    async fn zeroes_and_block_status() {
        let b = MemoryBackend::new(8 * P);
        b.write(0, Bytes::from(vec![1u8; (4 * P) as usize]))
            .await
            .unwrap();
        // Punch page 1 and part of page 2; NO_HOLE on page 3.
        b.write_zeroes(P, P + 10, true).await.unwrap();
        b.write_zeroes(3 * P, P, false).await.unwrap();
        let c = b.contents();
        assert!(c[P as usize..(2 * P + 10) as usize].iter().all(|&x| x == 0));
        assert_eq!(c[(2 * P + 10) as usize], 1);
        assert!(c[(3 * P) as usize..].iter().all(|&x| x == 0));
        let st = b.block_status(0, 8 * P).await.unwrap();
        assert_eq!(
            st,
            vec![
                BlockStatus { len: P, flags: 0 },
                BlockStatus { len: P, flags: 3 },
                BlockStatus { len: P, flags: 0 },
                BlockStatus { len: P, flags: 2 },
                BlockStatus {
                    len: 4 * P,
                    flags: 3
                },
            ]
        );
        // Trim drops whole pages only.
        b.trim(10, 3 * P).await.unwrap();
        assert_eq!(b.read(0, 10).await.unwrap()[..], [1u8; 10]);
        assert_eq!(
            b.block_status(P, 2 * P).await.unwrap(),
            vec![BlockStatus {
                len: 2 * P,
                flags: 3
            }]
        );
        // Huge may-trim range takes the sweeping path.
        b.write_zeroes(0, 8 * P, true).await.unwrap();
        assert!(b.contents()[..10].iter().all(|&x| x == 0));
    }

    #[test]
    fn prefilled_exports_skip_zero_pages() {
        let mut data = vec![0u8; (3 * P) as usize];
        data[(P + 7) as usize] = 9;
        let b = MemoryBackend::read_only_from(&data);
        assert!(b.caps().read_only);
        assert_eq!(b.allocated_pages(), 1);
        assert_eq!(b.contents(), data);
        assert!(!MemoryBackend::from_data(&data).caps().read_only);
    }

    #[tokio::test]
    async fn zeroing_inside_one_page() {
        let b = MemoryBackend::new(P);
        b.write(0, Bytes::from(vec![7u8; P as usize]))
            .await
            .unwrap();
        b.write_zeroes(100, 200, true).await.unwrap();
        let c = b.contents();
        assert_eq!(c[99], 7);
        assert!(c[100..300].iter().all(|&x| x == 0));
        assert_eq!(c[300], 7);
    }
}
