//! Recognising sequential readers of one drive, so the export can warm
//! what they will read next (the frames that hold it, or the kernel's
//! page cache) while they are busy with what they read now. Pure: it only
//! says which range to warm; `export::drive` warms it.
//!
//! A drive may have several sequential readers at once (nbdcopy gives each
//! of its connections its own part of the disk; qemu-img convert and a VM
//! read side by side), so [`Streams`] remembers where the last
//! [`STREAMS`] of them ended. A read that starts where one ended continues
//! that stream; a stream is warmed [`READAHEAD`] bytes ahead of its end, in
//! steps of half that, so one read in many triggers any work.

use std::ops::Range;

/// Sequential streams remembered per drive; the least recently used one
/// is forgotten for a new one.
pub const STREAMS: usize = 8;

/// How far ahead of a sequential reader the export warms: four extents'
/// worth of clusters (an extent, and so a frame of a seekable `.vma.zst`,
/// holds at most 59 clusters, 3.7 MiB), so the next frames decompress on
/// idle cores while the reader is still busy with this one.
pub const READAHEAD: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Where its last read ended.
    end: u64,
    /// How far it has been warmed.
    ahead: u64,
    /// When it was last used (0: never).
    used: u64,
}

/// The sequential streams of one drive; see the module docs.
#[derive(Debug, Default)]
pub struct Streams {
    slots: [Stream; STREAMS],
    clock: u64,
}

impl Streams {
    /// Records a read of `[offset, offset + len)`; returns the range to
    /// warm now, if any. The first read of a stream warms nothing: one read
    /// is no pattern.
    pub fn read(&mut self, offset: u64, len: u64) -> Option<Range<u64>> {
        self.clock += 1;
        let end = offset + len;
        let clock = self.clock;
        if let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| s.used != 0 && s.end == offset)
        {
            s.end = end;
            s.used = clock;
            if s.ahead >= end + READAHEAD / 2 {
                return None;
            }
            let from = s.ahead.max(end);
            s.ahead = end + READAHEAD;
            return Some(from..s.ahead);
        }
        let lru = self
            .slots
            .iter_mut()
            .min_by_key(|s| s.used)
            .expect("STREAMS > 0");
        *lru = Stream {
            end,
            ahead: end,
            used: clock,
        };
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn sequential_reads_warm_ahead_in_steps() {
        let mut s = Streams::default();
        assert_eq!(s.read(0, M), None, "one read is no pattern");
        assert_eq!(s.read(M, M), Some(2 * M..2 * M + READAHEAD));
        // Within the first half of the window: nothing new.
        for i in 2..(2 + READAHEAD / M / 2) {
            assert_eq!(s.read(i * M, M), None, "read {i}");
        }
        let end = (2 + READAHEAD / M / 2) * M;
        assert_eq!(s.read(end - M, M), None, "no stream ended there: a new one");
        let w = s.read(end, M).expect("half the window used");
        assert_eq!(w, 2 * M + READAHEAD..end + M + READAHEAD);
    }

    #[test]
    fn interleaved_streams_are_told_apart() {
        let mut s = Streams::default();
        let base = [0, 100 * M, 200 * M];
        for b in base {
            assert_eq!(s.read(b, M), None);
        }
        for b in base {
            assert!(s.read(b + M, M).is_some(), "stream at {b}");
        }
        // A random read starts a stream of its own and evicts the oldest
        // only when every slot is taken.
        for i in 0..STREAMS as u64 {
            s.read(1000 * M + i * 10 * M, 4096);
        }
        assert_eq!(s.read(200 * M + 2 * M, M), None, "forgotten");
        // A remembered stream would still be inside its window here; a
        // forgotten one starts anew and warms from its end at once.
        let w = s
            .read(203 * M, M)
            .expect("the stream at 200 MiB was forgotten");
        assert_eq!(w.start, 204 * M);
    }
}
