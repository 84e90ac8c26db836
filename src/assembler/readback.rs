//! Reading archived clusters back from an uncompressed archive file, to
//! answer NBD reads and to compare replayed writes: where every extent
//! landed (recorded by the writer thread as it writes them) and the read
//! itself. Compressed or streamed archives have none of this.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use super::shared::lock;
use crate::vma::DevId;
use crate::vma::cluster::{expand_into, stored_len};
use crate::vma::extent::{BlockInfo, payload_offset, payload_ranges};

/// The archive file being written, open for reading, and where its
/// clusters are.
pub struct ReadBack {
    file: File,
    locations: Mutex<Locations>,
}

/// Where archived clusters are in the file.
#[derive(Default)]
struct Locations {
    /// Per extent: file offset of its header and its entries.
    extents: Vec<(u64, Vec<BlockInfo>)>,
    /// (dev, cluster) → index into `extents`.
    index: HashMap<(u8, u32), u32>,
}

impl ReadBack {
    /// Opens `path`, the archive file being written, for reading.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(ReadBack {
            file: File::open(path)?,
            locations: Mutex::default(),
        })
    }

    /// Records an extent written at file offset `at` (the writer's extent
    /// observer calls this).
    pub fn record(&self, at: u64, entries: &[BlockInfo]) {
        let mut l = lock(&self.locations);
        let idx = l.extents.len() as u32;
        for b in entries {
            l.index.insert((b.dev, b.cluster), idx);
        }
        l.extents.push((at, entries.to_vec()));
    }

    /// File offset and mask of the stored blocks of `(dev, cluster)`, if
    /// its extent has been written.
    pub fn find(&self, dev: DevId, cluster: u64) -> Option<(u64, u16)> {
        let l = lock(&self.locations);
        let &e = l.index.get(&(dev.0, cluster as u32))?;
        let (at, entries) = &l.extents[e as usize];
        let (b, stored) = payload_ranges(entries)
            .find(|(b, _)| b.dev == dev.0 && u64::from(b.cluster) == cluster)?;
        Some((payload_offset(*at) + stored.start as u64, b.mask))
    }

    /// The `len` in-device bytes of a cluster stored at file offset `at`
    /// with `mask` (as [`find`](Self::find) returned them).
    pub fn read(&self, at: u64, mask: u16, len: usize) -> io::Result<Vec<u8>> {
        let mut stored = vec![0u8; stored_len(mask)];
        self.file.read_exact_at(&mut stored, at)?;
        let mut out = vec![0u8; len];
        expand_into(mask, &stored, &mut out);
        Ok(out)
    }
}
