//! Zero detection per 4 KiB block, the unit of the VMA blockinfo mask.

use super::consts::{VMA_BLOCK_SIZE, VMA_BLOCKS_PER_CLUSTER};

/// True when every byte of `buf` is zero.
///
/// ORs 64-byte chunks together without an early exit inside a chunk, which
/// the compiler vectorises; `iter().all(|b| *b == 0)` is about 8x slower.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The blockinfo mask of one cluster's in-device bytes: bit i is set when
/// 4 KiB block i holds a non-zero byte. `data` is at most 64 KiB; blocks
/// past its end stay clear (§4.3 of the spec: never stored).
pub fn block_mask(data: &[u8]) -> u16 {
    debug_assert!(data.len() <= VMA_BLOCK_SIZE * VMA_BLOCKS_PER_CLUSTER);
    let mut mask = 0u16;
    for (i, block) in data.chunks(VMA_BLOCK_SIZE).enumerate() {
        if !is_zero(block) {
            mask |= 1 << i;
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let mut c = vec![0u8; 65536];
        assert_eq!(block_mask(&c), 0);
        c[4096 * 3 + 4095] = 1;
        c[65535] = 9;
        assert_eq!(block_mask(&c), (1 << 3) | (1 << 15));
        assert_eq!(block_mask(&c[..4097]), 0);
        assert_eq!(block_mask(&[0, 0, 1]), 1);
        assert!(is_zero(&[]));
        assert!(!is_zero(&c[..]));
    }
}
