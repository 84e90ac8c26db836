//! The streaming archive reader (§7 of the spec): walks an archive from any
//! [`Read`] (file, pipe, stdin) for list, verify and extract. Never writes,
//! never seeks.
//!
//! Besides every check Proxmox's reader makes, it requires at the end of
//! the stream that every cluster of every device was seen, so an archive cut
//! at an extent boundary is an error here (Proxmox's `vma verify` passes it).
//! No input can make it allocate more than [`MAX_HEADER_SIZE`] for the
//! header or one extent's payload (3.7 MiB) for data.

use std::io::{self, Read};

use super::cluster::{self, cluster_len, stored_runs, valid_mask};
use super::consts::*;
use super::extent::{BlockInfo, ExtentHeader, blockinfo_offset, payload_ranges};
use super::header::Header;
use super::{ClusterBitmap, DevId, FormatError, MissingClusters};

/// Reads until `buf` is full or EOF; returns the bytes read.
pub fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

struct DevTrack {
    size: u64,
    seen: ClusterBitmap,
}

/// Totals over the clusters read so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Clusters seen.
    pub clusters: u64,
    /// In-device bytes of those clusters.
    pub bytes: u64,
    /// Of those, bytes in blocks not stored (zero).
    pub zero_bytes: u64,
}

/// A validated archive being read; see the module docs.
pub struct Reader<R: Read> {
    inner: R,
    header: Header,
    /// The header as read (for copying an archive unchanged).
    raw_header: Vec<u8>,
    header_len: u64,
    /// Extents read so far.
    extents: u64,
    pos: u64,
    devs: Vec<Option<DevTrack>>,
    head: [u8; VMA_EXTENT_HEADER_SIZE],
    payload: Vec<u8>,
    stats: ReadStats,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and validates the header.
    pub fn new(mut inner: R) -> Result<Self, FormatError> {
        let mut fixed = vec![0u8; VMA_HEADER_SIZE];
        let got = read_full(&mut inner, &mut fixed)?;
        // Magic first, so a random file is "bad magic", not "truncated".
        if got >= 4 && fixed[..4] != VMA_MAGIC {
            return Err(FormatError::BadMagic {
                offset: 0,
                what: "archive",
                found: fixed[..4].try_into().unwrap(),
                expected: VMA_MAGIC,
            });
        }
        fixed.truncate(got);
        let header_size = Header::check_fixed(&fixed)?;
        // Grows only as bytes arrive: a lying header_size costs nothing.
        let rest = (header_size - VMA_HEADER_SIZE) as u64;
        let got = (&mut inner).take(rest).read_to_end(&mut fixed)?;
        if (got as u64) < rest {
            return Err(FormatError::Truncated {
                offset: 0,
                what: "archive header",
                need: header_size as u64,
                got: fixed.len() as u64,
            });
        }
        let header = Header::decode(&fixed)?;
        let raw_header = fixed;
        let mut devs: Vec<Option<DevTrack>> = (0..VMA_DEV_SLOTS).map(|_| None).collect();
        for d in &header.devices {
            devs[d.id.0 as usize] = Some(DevTrack {
                size: d.size,
                seen: ClusterBitmap::new(d.clusters()),
            });
        }
        Ok(Reader {
            inner,
            header,
            raw_header,
            header_len: header_size as u64,
            extents: 0,
            pos: header_size as u64,
            devs,
            head: [0; VMA_EXTENT_HEADER_SIZE],
            payload: Vec::new(),
            stats: ReadStats::default(),
            done: false,
        })
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header's bytes, exactly as read.
    pub fn raw_header(&self) -> &[u8] {
        &self.raw_header
    }

    /// Header length in bytes (offset of the first extent).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Totals so far.
    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Total clusters over all devices (for progress).
    pub fn total_clusters(&self) -> u64 {
        self.header.devices.iter().map(|d| d.clusters()).sum()
    }

    /// Reads, validates and returns the next extent; `None` at a clean end of
    /// the archive, after the completeness check passed.
    pub fn next_extent(&mut self) -> Result<Option<Extent<'_>>, FormatError> {
        if self.done {
            return Ok(None);
        }
        let at = self.pos;
        let number = self.extents;
        let failed = |what: &'static str| {
            move |source| FormatError::ReadFailed {
                offset: at,
                extent: number,
                what,
                source,
            }
        };
        let got = read_full(&mut self.inner, &mut self.head).map_err(failed("its header"))?;
        if got == 0 {
            self.done = true;
            self.check_complete()?;
            return Ok(None);
        }
        if got < VMA_EXTENT_HEADER_SIZE {
            return Err(FormatError::Truncated {
                offset: at,
                what: "extent header",
                need: VMA_EXTENT_HEADER_SIZE as u64,
                got: got as u64,
            });
        }
        let ext = ExtentHeader::decode(&self.head, &self.header.uuid, at)?;
        let len = ext.payload_len();
        self.payload.resize(len, 0);
        let got = read_full(&mut self.inner, &mut self.payload).map_err(failed("its payload"))?;
        if got < len {
            return Err(FormatError::Truncated {
                offset: at,
                what: "extent payload",
                need: (VMA_EXTENT_HEADER_SIZE + len) as u64,
                got: (VMA_EXTENT_HEADER_SIZE + got) as u64,
            });
        }
        self.pos += (VMA_EXTENT_HEADER_SIZE + len) as u64;
        self.extents += 1;
        // Validate every entry before handing out any data.
        let mut entries = Vec::with_capacity(VMA_BLOCKS_PER_EXTENT);
        for (slot, e) in ext.entries() {
            let off = blockinfo_offset(at, slot);
            let track = self.devs[e.dev as usize]
                .as_mut()
                .ok_or(FormatError::UnknownDevice {
                    offset: off,
                    dev: e.dev,
                })?;
            let dev = DevId(e.dev);
            let cluster = u64::from(e.cluster);
            if cluster >= track.seen.len() {
                return Err(FormatError::ClusterOutOfRange {
                    offset: off,
                    dev,
                    cluster,
                    clusters: track.seen.len(),
                });
            }
            let in_dev = cluster_len(track.size, cluster);
            if e.mask & !valid_mask(in_dev) != 0 {
                return Err(FormatError::MaskPastEnd {
                    offset: off,
                    dev,
                    cluster,
                    mask: e.mask,
                    size: track.size,
                });
            }
            if track.seen.set(cluster) {
                return Err(FormatError::DuplicateCluster {
                    offset: off,
                    dev,
                    cluster,
                });
            }
            let in_dev = in_dev as u64;
            self.stats.clusters += 1;
            self.stats.bytes += in_dev;
            self.stats.zero_bytes += in_dev.saturating_sub(e.stored_len() as u64);
            entries.push(e);
        }
        Ok(Some(Extent {
            offset: at,
            number,
            entries,
            head: &self.head,
            payload: &self.payload,
            sizes: &self.devs,
        }))
    }

    /// Hands out the payload buffer of the extent last returned (to be
    /// checked on another thread while the next is read) and reads the
    /// next one into `spare` (a buffer handed out earlier, so that its
    /// memory is reused: it is not zeroed again).
    pub fn take_payload(&mut self, spare: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.payload, spare)
    }

    fn check_complete(&self) -> Result<(), FormatError> {
        let mut missing = Vec::new();
        for d in &self.header.devices {
            let t = self.devs[d.id.0 as usize].as_ref().expect("registered");
            let Some(first) = t.seen.first_clear() else {
                continue;
            };
            missing.push(MissingClusters {
                dev: d.id,
                name: d.name.clone(),
                missing: t.seen.len() - t.seen.count(),
                first,
            });
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Incomplete {
                offset: self.pos,
                missing,
            })
        }
    }

    /// Reads to the end, checking everything; returns the totals.
    pub fn verify(mut self) -> Result<ReadStats, FormatError> {
        while self.next_extent()?.is_some() {}
        Ok(self.stats)
    }
}

/// One validated extent, borrowed from the reader until the next call.
pub struct Extent<'a> {
    /// Archive offset of the extent header.
    pub offset: u64,
    /// Its place in the archive: 0 for the first extent.
    pub number: u64,
    entries: Vec<BlockInfo>,
    head: &'a [u8; VMA_EXTENT_HEADER_SIZE],
    payload: &'a [u8],
    sizes: &'a [Option<DevTrack>],
}

impl<'a> Extent<'a> {
    /// The clusters of this extent, in order.
    pub fn clusters(&self) -> impl Iterator<Item = ClusterData<'a>> + '_ {
        payload_ranges(&self.entries).map(|(e, stored)| {
            let size = self.sizes[e.dev as usize].as_ref().map_or(0, |t| t.size);
            ClusterData {
                dev: DevId(e.dev),
                cluster: u64::from(e.cluster),
                mask: e.mask,
                len: cluster_len(size, u64::from(e.cluster)),
                stored: &self.payload[stored],
            }
        })
    }

    /// Its used blockinfo entries, in slot order.
    pub fn entries(&self) -> &[BlockInfo] {
        &self.entries
    }

    /// The 512-byte extent header, exactly as read.
    pub fn raw_head(&self) -> &'a [u8; VMA_EXTENT_HEADER_SIZE] {
        self.head
    }

    /// The payload (every stored block), exactly as read.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Number of clusters in this extent.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True for an extent without clusters.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One cluster as stored: its mask and the concatenated stored blocks.
#[derive(Debug, Clone, Copy)]
pub struct ClusterData<'a> {
    /// Device.
    pub dev: DevId,
    /// Cluster number.
    pub cluster: u64,
    /// Stored-block mask.
    pub mask: u16,
    /// Bytes of the cluster inside the device (64 KiB except at the end).
    pub len: usize,
    /// The stored 4 KiB blocks, in ascending block order.
    pub stored: &'a [u8],
}

impl<'a> ClusterData<'a> {
    /// Byte offset of the cluster in its device.
    pub fn device_offset(&self) -> u64 {
        cluster::cluster_offset(self.cluster)
    }

    /// Runs of stored data as `(offset within the cluster, bytes)`, clamped
    /// to the device end; consecutive stored blocks form one run.
    pub fn runs(&self) -> impl Iterator<Item = (usize, &'a [u8])> + '_ {
        stored_runs(self.mask).map(|run| {
            let r = run.in_device(self.len);
            let from = run.payload_range().start;
            (r.start, &self.stored[from..from + r.len()])
        })
    }

    /// Writes the cluster's in-device bytes into `out` (`len` bytes), zeros
    /// where blocks are not stored.
    pub fn expand_into(&self, out: &mut [u8]) {
        cluster::expand_into(self.mask, self.stored, &mut out[..self.len]);
    }
}
