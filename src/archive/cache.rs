//! A bounded cache of decompressed frames, shared by every thread that
//! reads an archive at random. Readers of a frame that is being
//! decompressed wait for that one decompression instead of starting their
//! own; a failed load is not remembered (the next reader tries again and
//! gets its own error). Least recently used frames are dropped past the
//! budget; a reader still holding a dropped frame keeps its bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::pool::BufferPool;

/// Default budget: 64 MiB holds 17 full extents of 3.7 MiB, enough for a
/// few readers at different places and a read-ahead each.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Idle frame buffers (compressed and decompressed) kept for the next
/// loads: eight 4 MiB buffers, two for each of four loads at once. A frame
/// dropped from the cache comes back here once no reader holds it.
pub const IDLE_FRAME_BUFFERS: usize = 32 << 20;

struct Slot {
    /// Held while the frame is loaded; `Some` once it is.
    data: Mutex<Option<Bytes>>,
}

struct Entry {
    slot: Arc<Slot>,
    /// Bytes of the loaded frame (0 while loading).
    len: usize,
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<u32, Entry>,
    bytes: usize,
    tick: u64,
    loads: u64,
}

/// The cache; see the module docs.
pub struct FrameCache {
    budget: usize,
    state: Mutex<State>,
    /// Buffers frames are read and decompressed into.
    buffers: Arc<BufferPool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FrameCache {
    /// A cache keeping up to `budget` bytes of frames (at least the frame
    /// in use).
    pub fn new(budget: usize) -> Self {
        FrameCache {
            budget,
            state: Mutex::new(State::default()),
            buffers: BufferPool::new(IDLE_FRAME_BUFFERS),
        }
    }

    /// Frame `frame`, from the cache or from `load` (called at most once
    /// at a time per frame).
    pub fn get<E>(&self, frame: u32, load: impl FnOnce() -> Result<Bytes, E>) -> Result<Bytes, E> {
        let slot = {
            let mut st = lock(&self.state);
            st.tick += 1;
            let tick = st.tick;
            let e = st.entries.entry(frame).or_insert_with(|| Entry {
                slot: Arc::new(Slot {
                    data: Mutex::new(None),
                }),
                len: 0,
                last_used: tick,
            });
            e.last_used = tick;
            e.slot.clone()
        };
        let mut data = lock(&slot.data);
        if let Some(b) = &*data {
            return Ok(b.clone());
        }
        let loaded = match load() {
            Ok(b) => b,
            Err(e) => {
                drop(data);
                let mut st = lock(&self.state);
                if st
                    .entries
                    .get(&frame)
                    .is_some_and(|e| Arc::ptr_eq(&e.slot, &slot) && e.len == 0)
                {
                    st.entries.remove(&frame);
                }
                return Err(e);
            }
        };
        *data = Some(loaded.clone());
        drop(data);
        let mut st = lock(&self.state);
        st.loads += 1;
        if let Some(e) = st.entries.get_mut(&frame)
            && Arc::ptr_eq(&e.slot, &slot)
        {
            e.len = loaded.len();
            st.bytes += loaded.len();
        }
        self.evict(&mut st, frame);
        Ok(loaded)
    }

    /// Drops least recently used loaded frames other than `keep` until
    /// the cache is within its budget.
    fn evict(&self, st: &mut State, keep: u32) {
        while st.bytes > self.budget {
            let victim = st
                .entries
                .iter()
                .filter(|(f, e)| **f != keep && e.len > 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(f, _)| *f);
            let Some(f) = victim else { break };
            let e = st.entries.remove(&f).expect("found");
            st.bytes -= e.len;
        }
    }

    /// Frame `frame` if it is loaded now, without waiting or loading
    /// (counts as a use, like [`get`](Self::get)); `None` when it is not
    /// held or is still being loaded.
    pub fn peek(&self, frame: u32) -> Option<Bytes> {
        let slot = {
            let mut st = lock(&self.state);
            st.tick += 1;
            let tick = st.tick;
            let e = st.entries.get_mut(&frame)?;
            e.last_used = tick;
            e.slot.clone()
        };
        // A slot whose lock is held is being loaded: that would wait.
        let data = slot.data.try_lock().ok()?;
        data.clone()
    }

    /// True when frame `frame` is held or being loaded (a prefetch of it
    /// would only wait for that load).
    pub fn contains(&self, frame: u32) -> bool {
        lock(&self.state).entries.contains_key(&frame)
    }

    /// The buffers loads read and decompress frames into, for
    /// [`super::frame::read_frame`].
    pub fn buffers(&self) -> &Arc<BufferPool> {
        &self.buffers
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Frames decompressed so far (tests: shared loads count once).
    pub fn loads(&self) -> u64 {
        lock(&self.state).loads
    }

    /// Bytes of frames held.
    pub fn bytes(&self) -> usize {
        lock(&self.state).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn shares_loads_and_stays_within_budget() {
        let cache = FrameCache::new(250);
        let calls = AtomicUsize::new(0);
        let load = |n: u8| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok::<_, ()>(Bytes::from(vec![n; 100]))
        };
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| assert_eq!(cache.get(1, || load(1)).unwrap()[0], 1));
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one load for 8 readers");
        cache.get(2, || load(2)).unwrap();
        cache.get(1, || load(1)).unwrap(); // 1 is now the most recent
        cache.get(3, || load(3)).unwrap(); // over budget: 2 goes
        assert_eq!(cache.bytes(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        cache.get(1, || load(1)).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        cache.get(2, || load(2)).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // A failure is not remembered.
        assert!(cache.get(9, || Err::<Bytes, ()>(())).is_err());
        assert_eq!(cache.get(9, || load(9)).unwrap()[0], 9);
    }
}
