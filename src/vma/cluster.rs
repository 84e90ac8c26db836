//! The geometry of clusters and masks (§5.2, §5.3, §6.2): how many clusters
//! a device has and how many bytes of each lie inside it, which 4 KiB blocks
//! a blockinfo mask stores, and where each run of them lies in the cluster
//! and in the stored payload. The writer, the reader and the live
//! assembler do their arithmetic on cluster numbers and masks here; only
//! [`block_mask`](super::zero::block_mask), which makes a mask from data,
//! and [`BlockInfo`](super::extent::BlockInfo), which packs it, touch mask
//! bits otherwise.

use std::ops::Range;

use super::consts::{VMA_BLOCK_SIZE, VMA_BLOCKS_PER_CLUSTER, VMA_CLUSTER_SIZE};

/// [`VMA_CLUSTER_SIZE`] as a device offset.
const CLUSTER_BYTES: u64 = VMA_CLUSTER_SIZE as u64;

/// Clusters of a device of `size` bytes, the last one possibly partial
/// (§6.2).
pub fn clusters_of(size: u64) -> u64 {
    size.div_ceil(CLUSTER_BYTES)
}

/// Byte offset of `cluster` in its device.
pub fn cluster_offset(cluster: u64) -> u64 {
    cluster * CLUSTER_BYTES
}

/// Bytes of `cluster` that lie inside a device of `size` bytes: 64 KiB, or
/// less for the last cluster of a device whose size is not a multiple of
/// 64 KiB (0 past the end).
pub fn cluster_len(size: u64, cluster: u64) -> usize {
    size.saturating_sub(cluster_offset(cluster))
        .min(CLUSTER_BYTES) as usize
}

/// Payload bytes a cluster with `mask` takes in its extent: 4 KiB per
/// stored block, the block straddling the device end included (§6.2).
pub fn stored_len(mask: u16) -> usize {
    mask.count_ones() as usize * VMA_BLOCK_SIZE
}

/// In-device bytes of a cluster with `len` in-device bytes that `mask`
/// stores (the rest of its `len` bytes are zero blocks).
pub fn stored_in_device(mask: u16, len: usize) -> usize {
    stored_runs(mask).map(|r| r.in_device(len).len()).sum()
}

/// The mask bits a cluster with `len` in-device bytes may set: those of the
/// blocks that start inside the device (§6.2). A reader rejects any other.
pub fn valid_mask(len: usize) -> u16 {
    let blocks = len.div_ceil(VMA_BLOCK_SIZE);
    if blocks >= VMA_BLOCKS_PER_CLUSTER {
        u16::MAX
    } else {
        (1u16 << blocks) - 1
    }
}

/// Consecutive stored blocks of one cluster, and where they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRun {
    /// The run's first block in the cluster (0..16).
    pub first_block: usize,
    /// Blocks in the run (1..=16).
    pub blocks: usize,
    /// Stored blocks of the cluster before this run: its place in the
    /// cluster's payload, in blocks.
    pub stored_before: usize,
}

impl StoredRun {
    /// The run's bytes within the cluster.
    pub fn cluster_range(&self) -> Range<usize> {
        let start = self.first_block * VMA_BLOCK_SIZE;
        start..start + self.blocks * VMA_BLOCK_SIZE
    }

    /// The run's bytes within the cluster's stored payload.
    pub fn payload_range(&self) -> Range<usize> {
        let start = self.stored_before * VMA_BLOCK_SIZE;
        start..start + self.blocks * VMA_BLOCK_SIZE
    }

    /// [`cluster_range`](Self::cluster_range) cut at `len`, the cluster's
    /// in-device bytes: what of the run a restore keeps. Its length is also
    /// how many bytes at the start of [`payload_range`](Self::payload_range)
    /// are device data; the rest is the zero padding of the block that
    /// straddles the device end.
    pub fn in_device(&self, len: usize) -> Range<usize> {
        let r = self.cluster_range();
        r.start.min(len)..r.end.min(len)
    }
}

/// The runs of stored blocks of `mask`, in ascending block order (the
/// order of the payload, §5.3): 0xFFFF is one run of 16 blocks, 0 none.
pub fn stored_runs(mask: u16) -> StoredRuns {
    StoredRuns {
        rest: u32::from(mask),
        stored: 0,
    }
}

/// Iterator of [`stored_runs`]: a few bit operations per run, never a
/// loop over the 16 bits.
#[derive(Debug, Clone)]
pub struct StoredRuns {
    /// Mask bits not yet yielded (u32, so a run of 16 shifts safely).
    rest: u32,
    /// Blocks yielded so far.
    stored: usize,
}

impl Iterator for StoredRuns {
    type Item = StoredRun;

    fn next(&mut self) -> Option<StoredRun> {
        if self.rest == 0 {
            return None;
        }
        let first = self.rest.trailing_zeros();
        let blocks = (self.rest >> first).trailing_ones();
        self.rest &= !(((1u32 << blocks) - 1) << first);
        let run = StoredRun {
            first_block: first as usize,
            blocks: blocks as usize,
            stored_before: self.stored,
        };
        self.stored += blocks as usize;
        Some(run)
    }
}

impl std::iter::FusedIterator for StoredRuns {}

/// Rebuilds a cluster's in-device bytes in `out` (as long as the cluster's
/// in-device part) from its `mask` and `stored` payload: stored blocks where
/// the mask says, zeros elsewhere.
pub fn expand_into(mask: u16, stored: &[u8], out: &mut [u8]) {
    let mut pos = 0;
    for run in stored_runs(mask) {
        let r = run.in_device(out.len());
        let from = run.payload_range().start;
        out[pos..r.start].fill(0);
        out[r.clone()].copy_from_slice(&stored[from..from + r.len()]);
        pos = r.end;
    }
    out[pos..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(mask: u16) -> Vec<(usize, usize, usize)> {
        stored_runs(mask)
            .map(|r| (r.first_block, r.blocks, r.stored_before))
            .collect()
    }

    #[test]
    fn runs_of_hand_made_masks() {
        assert_eq!(runs(0), vec![]);
        assert_eq!(runs(0xFFFF), vec![(0, 16, 0)]);
        assert_eq!(runs(0x8001), vec![(0, 1, 0), (15, 1, 1)]);
        assert_eq!(runs(0x7FFE), vec![(1, 14, 0)]);
        assert_eq!(runs(0x00F0), vec![(4, 4, 0)]);
        assert_eq!(runs(0x0F0F), vec![(0, 4, 0), (8, 4, 4)]);
        let alternating: Vec<_> = (0..8).map(|i| (2 * i, 1, i)).collect();
        assert_eq!(runs(0x5555), alternating);
        let alternating: Vec<_> = (0..8).map(|i| (2 * i + 1, 1, i)).collect();
        assert_eq!(runs(0xAAAA), alternating);
        let r = stored_runs(0x0F0F).nth(1).unwrap();
        assert_eq!(r.cluster_range(), 8 * 4096..12 * 4096);
        assert_eq!(r.payload_range(), 4 * 4096..8 * 4096);
    }

    #[test]
    fn runs_cover_the_mask_exactly() {
        for mask in 0..=u16::MAX {
            let mut bits = 0u32;
            let mut stored = 0;
            for r in stored_runs(mask) {
                assert_eq!(r.stored_before, stored);
                for b in r.first_block..r.first_block + r.blocks {
                    bits |= 1 << b;
                }
                stored += r.blocks;
                // Runs are maximal: the blocks on either side are clear.
                assert!(r.first_block == 0 || mask & (1 << (r.first_block - 1)) == 0);
                assert!(
                    r.first_block + r.blocks == 16 || mask & (1 << (r.first_block + r.blocks)) == 0
                );
            }
            assert_eq!(bits, u32::from(mask));
            assert_eq!(stored * 4096, stored_len(mask));
        }
    }

    #[test]
    fn geometry_of_a_partial_last_cluster() {
        let size = 2 * 65536 + 4096 + 512;
        assert_eq!(clusters_of(size), 3);
        assert_eq!(clusters_of(65536), 1);
        assert_eq!(clusters_of(1), 1);
        assert_eq!(cluster_offset(2), 131072);
        assert_eq!(cluster_len(size, 0), 65536);
        assert_eq!(cluster_len(size, 2), 4608);
        assert_eq!(cluster_len(size, 3), 0);
        assert_eq!(valid_mask(4608), 0b11);
        assert_eq!(valid_mask(4096), 0b1);
        assert_eq!(valid_mask(1), 0b1);
        assert_eq!(valid_mask(65536), 0xFFFF);
        assert_eq!(valid_mask(65535), 0xFFFF);
        assert_eq!(valid_mask(61440), 0x7FFF);
        // The straddling block is cut at the device end.
        let r = stored_runs(0b11).next().unwrap();
        assert_eq!(r.in_device(4608), 0..4608);
        assert_eq!(r.payload_range(), 0..8192);
        let r = stored_runs(0b10).next().unwrap();
        assert_eq!(r.in_device(4608), 4096..4608);
        assert_eq!(r.in_device(100), 100..100);
    }

    #[test]
    fn expands_stored_blocks_and_zeros() {
        // Blocks 0 and 2 stored; the cluster ends 512 bytes into block 2.
        let len = 2 * 4096 + 512;
        let mut stored = vec![1u8; 4096];
        stored.extend(vec![2u8; 512]);
        stored.extend(vec![0u8; 4096 - 512]);
        let mut out = vec![9u8; len];
        expand_into(0b101, &stored, &mut out);
        assert!(out[..4096].iter().all(|&b| b == 1));
        assert!(out[4096..8192].iter().all(|&b| b == 0));
        assert!(out[8192..].iter().all(|&b| b == 2));

        let mut out = vec![9u8; 65536];
        expand_into(0, &[], &mut out);
        assert!(out.iter().all(|&b| b == 0));
        let full: Vec<u8> = (0..65536).map(|i| i as u8).collect();
        expand_into(0xFFFF, &full, &mut out);
        assert_eq!(out, full);
        expand_into(0x8000, &full[..4096], &mut out);
        assert!(out[..61440].iter().all(|&b| b == 0));
        assert_eq!(out[61440..], full[..4096]);
    }
}
