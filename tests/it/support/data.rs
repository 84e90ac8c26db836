//! Deterministic test data: the one pseudo-random generator of the test
//! kit ([`XorShift`]; the golden archives under `format/golden/` are made
//! from it, so its output must never change) and the byte patterns built
//! from it.

/// 64 KiB: the VMA cluster and QEMU's default backup cluster.
pub const CLUSTER: usize = 65536;
/// 4 KiB: the VMA block.
pub const BLOCK: usize = 4096;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 10 MiB + 1536 B: ends in the middle of a cluster and of a 4 KiB block.
pub const ODD_SIZE: u64 = 10 * MIB + 1536;

/// xorshift64*: deterministic pseudo-random bytes without the rand crate.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with non-trivial bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random bytes. Every 4 KiB block is non-zero (a zero block
/// of 4096 random bytes is impossible in practice, and we force byte 0).
pub fn random_data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    for b in v.chunks_mut(BLOCK) {
        b[0] |= 1;
    }
    v
}

/// Random data with holes: whole zero clusters, zero 4 KiB blocks and a few
/// isolated non-zero bytes in otherwise zero blocks.
pub fn holey_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = random_data(len, seed ^ 0xABCD);
    for (ci, cluster) in v.chunks_mut(CLUSTER).enumerate() {
        match (ci % 4, rng.below(3)) {
            (1, _) => cluster.fill(0),
            _ => {
                for block in cluster.chunks_mut(BLOCK) {
                    match rng.below(4) {
                        0 => block.fill(0),
                        1 => {
                            block.fill(0);
                            let i = rng.below(block.len() as u64) as usize;
                            block[i] = 0x5a;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    v
}

/// True when the 4 KiB block `i` of `data` is all zero.
pub fn block_is_zero(data: &[u8], i: usize) -> bool {
    data[i * BLOCK..((i + 1) * BLOCK).min(data.len())]
        .iter()
        .all(|&b| b == 0)
}

/// `data` as `create` archives a raw image and `extract` restores it: its
/// size rounded up to whole 512-byte sectors, the tail zero (as Proxmox's
/// `vma create` records it).
pub fn as_restored(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().next_multiple_of(512), 0);
    v
}
