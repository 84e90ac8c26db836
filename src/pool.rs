//! [`BufferPool`]: recycled byte buffers that travel as [`Bytes`] and come
//! back to the pool when the last reference to them is dropped.
//!
//! Fresh buffers of 256 KiB and more come from `mmap` and page-fault on
//! first touch, which costs more than filling them; reusing them avoids
//! that. The transmission phase reads each WRITE payload into one
//! ([`BufferPool::get`], then [`PooledBuf::freeze`]) and hands it to the
//! backend as `Bytes` without a copy; a reader that fills whole buffers
//! with `read_at` takes them with [`BufferPool::get_filled`]. Used by the NBD
//! server for WRITE payloads and by `create` for image reads; knows
//! nothing of either.
//!
//! ```
//! use std::io::Write;
//! use vma_writer::pool::BufferPool;
//!
//! let pool = BufferPool::new(16 << 20);
//! let mut buf = pool.get(1000); // empty, room for at least 1000 bytes
//! buf.write_all(b"payload").unwrap();
//! let bytes = buf.freeze(); // no copy
//! assert_eq!(&bytes[..], b"payload");
//! drop(bytes); // the buffer goes back to the pool
//! assert!(pool.idle_bytes() >= 1000);
//! let again = pool.get_filled(512); // 512 initialized bytes, reused
//! assert_eq!(again.len(), 512);
//! ```

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use bytes::Bytes;

/// Makes every thread allocate from one glibc malloc arena; call it before
/// starting the threads (the tokio runtime) of a live target.
///
/// WRITE payload buffers are allocated on the tokio worker threads and
/// freed on the archive writer thread, back into the arena of the thread
/// that allocated them. With an arena per thread, each arena keeps its own
/// high-water mark (the binary keeps freed buffers in the heap, see
/// `main.rs`), so peak RSS is the sum of the threads' peaks rather than the
/// peak of the data alive at once: an 8-drive backup measured 51 MiB peak
/// RSS with per-thread arenas and 38 MiB with one, at a 16 MiB budget
/// (`bench/memory.sh`). Few large allocations per request make the one
/// arena's lock cheap.
pub fn use_one_malloc_arena() {
    // SAFETY: mallopt only tunes the allocator; M_ARENA_MAX limits the
    // arenas created from now on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Smallest buffer the pool hands out (one page). Requests are rounded up
/// to a power of two at least this large, so buffers of similar requests
/// are interchangeable.
const MIN_BUFFER: usize = 4096;

/// A pool of byte buffers holding at most `max_bytes` of idle capacity.
///
/// Shared as `Arc<BufferPool>`; buffers hold only a weak reference, so a
/// buffer that outlives its pool is simply freed. Thread-safe: buffers may
/// be taken on one thread and dropped on another.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Free>,
    /// Idle capacity kept at most, as the owner chose it.
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    /// Sum of the capacities in `bufs`.
    bytes: usize,
}

impl BufferPool {
    /// An empty pool that keeps at most `max_bytes` of idle buffers.
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(Free::default()),
            max_bytes,
        })
    }

    /// An empty buffer (length 0) with room for at least `len` bytes: the
    /// smallest idle one that fits, or a new one.
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self
            .take(len)
            .unwrap_or_else(|| Vec::with_capacity(rounded(len)));
        buf.clear();
        self.wrap(buf)
    }

    /// A buffer of exactly `len` initialized bytes, for filling in place
    /// (`read_exact_at(&mut buf, ..)`). Its contents are unspecified: zeros
    /// when new, earlier data when reused. Reuse costs no memset; only the
    /// part of a reused buffer that was never initialized is zeroed.
    pub fn get_filled(self: &Arc<Self>, len: usize) -> PooledBuf {
        let buf = match self.take(len) {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => {
                // calloc: fresh pages arrive zeroed without a memset.
                let mut b = vec![0u8; rounded(len)];
                b.truncate(len);
                b
            }
        };
        self.wrap(buf)
    }

    /// Capacity of the idle buffers now in the pool.
    pub fn idle_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The smallest idle buffer with capacity for `len` bytes.
    fn take(&self, len: usize) -> Option<Vec<u8>> {
        let mut free = self.lock();
        let best = free
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        let b = free.bufs.swap_remove(best);
        free.bytes -= b.capacity();
        Some(b)
    }

    /// Keeps `buf` for reuse if there is room. Its initialized length is
    /// kept, so [`BufferPool::get_filled`] need not zero it again.
    fn put(&self, buf: Vec<u8>) {
        let mut free = self.lock();
        if free.bytes + buf.capacity() <= self.max_bytes {
            free.bytes += buf.capacity();
            free.bufs.push(buf);
        }
    }

    fn wrap(self: &Arc<Self>, buf: Vec<u8>) -> PooledBuf {
        PooledBuf {
            buf,
            pool: Arc::downgrade(self),
        }
    }
}

/// Capacity of a new buffer for `len` bytes.
fn rounded(len: usize) -> usize {
    len.checked_next_power_of_two()
        .unwrap_or(len)
        .max(MIN_BUFFER)
}

/// A buffer from a [`BufferPool`]: a `Vec<u8>` (through `Deref`) that goes
/// back to the pool when dropped, or, after [`PooledBuf::freeze`], when the
/// last `Bytes` sharing it is dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Weak<BufferPool>,
}

impl PooledBuf {
    /// Turns the buffer into `Bytes` without copying; slices of it keep the
    /// buffer alive, and the last one to go returns it to the pool.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for PooledBuf {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_bytes_goes() {
        let pool = BufferPool::new(1 << 20);
        let mut b = pool.get(5000);
        assert!(b.is_empty() && b.capacity() >= 8192);
        b.extend_from_slice(&[7; 5000]);
        let ptr = b.as_ptr();
        let bytes = b.freeze();
        let tail = bytes.slice(100..);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "a slice still holds the buffer");
        drop(tail);
        assert_eq!(pool.idle_bytes(), 8192);
        // Reused, and handed out empty.
        let again = pool.get(6000);
        assert_eq!((again.as_ptr(), again.len()), (ptr, 0));
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn the_smallest_fitting_buffer_is_reused() {
        let pool = BufferPool::new(1 << 20);
        let (big, small) = (pool.get(64 << 10), pool.get(4096));
        let small_ptr = small.as_ptr();
        drop((big, small));
        assert_eq!(pool.get(100).as_ptr(), small_ptr);
    }

    #[test]
    fn filled_buffers_have_their_length_and_keep_old_bytes() {
        let pool = BufferPool::new(1 << 20);
        let mut b = pool.get_filled(3000);
        assert_eq!(b.len(), 3000);
        assert!(b.iter().all(|&x| x == 0));
        b[0] = 9;
        drop(b);
        let b = pool.get_filled(4000);
        assert_eq!((b.len(), b[0], b[3999]), (4000, 9, 0));
    }

    #[test]
    fn idle_bytes_stay_under_the_limit() {
        let pool = BufferPool::new(10_000);
        let bufs: Vec<_> = (0..3).map(|_| pool.get(4096)).collect();
        drop(bufs);
        assert_eq!(pool.idle_bytes(), 8192);
    }

    #[test]
    fn buffers_outliving_their_pool_are_freed() {
        let pool = BufferPool::new(1 << 20);
        let b = pool.get(10).freeze();
        drop(pool);
        drop(b);
    }
}
