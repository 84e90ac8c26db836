//! `base:allocation` of a drive from its cluster masks alone: a stored
//! 4 KiB block is data, an unstored one (in a zero cluster or a cluster
//! with zero blocks) is `HOLE|ZERO`, so `qemu-img convert`, `qemu-img map`
//! and `nbdcopy` skip it. Pure: the masks come from the archive index
//! ([`crate::vma::ArchiveIndex::cluster_masks`]); no archive byte is read.

use crate::nbd::BlockStatus;
use crate::vma::consts::{VMA_BLOCK_SIZE, VMA_CLUSTER_SIZE};

/// Most clusters one BLOCK_STATUS answer looks at (4 GiB, as the live
/// target's); the client asks again for the rest. Bounds the time one
/// request takes on a large drive.
pub const MAX_STATUS_CLUSTERS: u64 = 65536;

/// Flags of a block that holds data.
const DATA: u32 = 0;
/// Flags of a block that is not stored: it reads as zeros.
const UNSTORED: u32 = BlockStatus::HOLE | BlockStatus::ZERO;

/// The runs of `[offset, offset + len)` of a drive of `size` bytes whose
/// clusters have `masks`, in order from `offset`. Stops after
/// [`MAX_STATUS_CLUSTERS`] clusters or `max_runs` runs, whichever comes
/// first (the answer then ends early, as the protocol allows).
pub fn block_status(
    masks: &[u16],
    size: u64,
    offset: u64,
    len: u64,
    max_runs: usize,
) -> Vec<BlockStatus> {
    let cluster_bytes = VMA_CLUSTER_SIZE as u64;
    let block_bytes = VMA_BLOCK_SIZE as u64;
    let end = offset.saturating_add(len).min(size);
    let mut runs: Vec<BlockStatus> = Vec::new();
    let mut pos = offset;
    let mut clusters = 0;
    while pos < end && clusters < MAX_STATUS_CLUSTERS && runs.len() < max_runs {
        let c = pos / cluster_bytes;
        let cluster_end = ((c + 1) * cluster_bytes).min(end);
        let mask = masks.get(c as usize).copied().unwrap_or(0);
        match mask {
            0 => push(&mut runs, cluster_end - pos, UNSTORED),
            u16::MAX => push(&mut runs, cluster_end - pos, DATA),
            _ => {
                while pos < cluster_end {
                    let block = (pos % cluster_bytes) / block_bytes;
                    let block_end = (pos - pos % block_bytes + block_bytes).min(cluster_end);
                    let flags = if mask & (1 << block) != 0 {
                        DATA
                    } else {
                        UNSTORED
                    };
                    push(&mut runs, block_end - pos, flags);
                    pos = block_end;
                }
            }
        }
        pos = cluster_end;
        clusters += 1;
    }
    runs.truncate(max_runs);
    runs
}

/// Appends `len` bytes with `flags`, merged into the last run when it has
/// the same flags.
fn push(runs: &mut Vec<BlockStatus>, len: u64, flags: u32) {
    match runs.last_mut() {
        Some(r) if r.flags == flags => r.len += len,
        _ => runs.push(BlockStatus { len, flags }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u64 = VMA_CLUSTER_SIZE as u64;
    const B: u64 = VMA_BLOCK_SIZE as u64;

    fn runs(v: &[BlockStatus]) -> Vec<(u64, u32)> {
        v.iter().map(|r| (r.len, r.flags)).collect()
    }

    #[test]
    fn zero_clusters_and_zero_blocks_are_holes() {
        // Cluster 0 full, 1 zero, 2 blocks 0 and 15 only, 3 full; the
        // drive ends 1536 bytes into cluster 4 (one block stored).
        let masks = [0xFFFF, 0, 0x8001, 0xFFFF, 0x1];
        let size = 4 * C + 1536;
        let all = block_status(&masks, size, 0, size, usize::MAX);
        assert_eq!(
            runs(&all),
            [
                (C, DATA),
                (C, UNSTORED),
                (B, DATA),
                (14 * B, UNSTORED),
                (B + C + 1536, DATA),
            ]
        );
        assert_eq!(all.iter().map(|r| r.len).sum::<u64>(), size);
        // Unaligned start and end inside blocks.
        let part = block_status(&masks, size, 2 * C + 100, B + 10, usize::MAX);
        assert_eq!(runs(&part), [(B - 100, DATA), (110, UNSTORED)]);
        let part = block_status(&masks, size, C - 10, 30, usize::MAX);
        assert_eq!(runs(&part), [(10, DATA), (20, UNSTORED)]);
        // Never past the drive's end.
        let tail = block_status(&masks, size, 4 * C, 1 << 40, usize::MAX);
        assert_eq!(runs(&tail), [(1536, DATA)]);
    }

    #[test]
    fn answers_are_bounded() {
        let masks = vec![0x5555u16; 10];
        let v = block_status(&masks, 10 * C, 0, 10 * C, 7);
        assert_eq!(v.len(), 7);
        let masks = vec![0u16; (MAX_STATUS_CLUSTERS + 5) as usize];
        let size = masks.len() as u64 * C;
        let v = block_status(&masks, size, 0, size, usize::MAX);
        assert_eq!(runs(&v), [(MAX_STATUS_CLUSTERS * C, UNSTORED)]);
    }
}
