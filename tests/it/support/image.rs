//! The one image maker: raw images on disk, sparse where the data is zero,
//! from bytes the test holds ([`write_image`]) or from pseudo-random
//! islands ([`sparse_image`] and its shorthands); other formats through
//! `qemu-img create` ([`super::qemu_img_create`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BLOCK, CLUSTER, XorShift};

/// How [`write_image`] puts bytes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every byte written, zeros included.
    Dense,
    /// Only non-zero 4 KiB blocks written; the rest are file holes.
    Sparse,
}

/// Writes `data` as the raw image `path`.
pub fn write_image(path: &Path, data: &[u8], layout: Layout) {
    let f = File::create(path).unwrap();
    match layout {
        Layout::Dense => f.write_all_at(data, 0).unwrap(),
        Layout::Sparse => {
            f.set_len(data.len() as u64).unwrap();
            for (i, b) in data.chunks(BLOCK).enumerate() {
                if b.iter().any(|&x| x != 0) {
                    f.write_all_at(b, (i * BLOCK) as u64).unwrap();
                }
            }
        }
    }
}

/// Creates a sparse raw image of `size` bytes whose `islands` (offset,
/// length) hold pseudo-random data from `seed`; everything else is a
/// hole. Returns the path.
pub fn sparse_image(path: &Path, size: u64, islands: &[(u64, u64)], seed: u64) -> PathBuf {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = XorShift::new(seed);
    let mut buf = Vec::new();
    for &(off, len) in islands {
        assert!(off + len <= size, "island {off}+{len} past {size}");
        buf.resize(len as usize, 0);
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
    path.to_path_buf()
}

/// [`sparse_image`] returning the image's whole contents as well.
pub fn sparse_image_contents(path: &Path, size: u64, islands: &[(u64, u64)], seed: u64) -> Vec<u8> {
    sparse_image(path, size, islands, seed);
    std::fs::read(path).unwrap()
}

/// A dense raw image of `size` random bytes (nothing for QEMU to skip, so
/// a throttled backup really takes size/speed seconds).
pub fn dense_random(path: &Path, size: u64, seed: u64) -> PathBuf {
    sparse_image(path, size, &[(0, size)], seed)
}

/// A sparse raw image of `size` bytes with `count` islands at random,
/// unaligned offsets of up to `max_len` bytes, plus one island straddling a
/// cluster boundary and one ending exactly at the end of the image.
pub fn raw_islands(path: &Path, size: u64, seed: u64, count: usize, max_len: u64) -> PathBuf {
    let cluster = CLUSTER as u64;
    let mut rng = XorShift::new(seed ^ 0x15_1a_4d);
    let mut islands: Vec<(u64, u64)> = (0..count)
        .map(|_| {
            let len = 1 + rng.below(max_len.min(size));
            (rng.below(size - len + 1), len)
        })
        .collect();
    let edge = (size / 2) / cluster * cluster;
    islands.push((edge - 777, 1500.min(size - edge + 777)));
    let tail = 3000.min(size);
    islands.push((size - tail, tail));
    sparse_image(path, size, &islands, seed)
}
