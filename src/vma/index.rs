//! The archive index (`format/INDEX.md` is its specification): where every
//! cluster of an archive is, a digest of every cluster that holds data, and
//! totals per device. It is what makes an archive readable by cluster:
//! single-drive restore, instant restore and incremental backups read only
//! what they need, and every cluster they read is checked against its
//! digest (VMA itself checksums headers only).
//!
//! - [`IndexBuilder`] collects extents as they are written and encodes
//!   the index ([`IndexBuilder::finish`]).
//! - [`ArchiveIndex::decode`] checks an encoded index completely (its own
//!   digest, every count and offset, every cluster present exactly once)
//!   and answers [`ArchiveIndex::locate`].
//! - [`ArchiveIndex::from_extent_headers`] makes the same (without
//!   digests) for an archive that has no index, from its extent headers,
//!   with the same completeness checks.
//! - [`cluster_digest`] / [`stored_digest`]: the digest of a cluster's
//!   restored bytes, from those bytes or from its stored blocks.
//!
//! Pure: no files, no compression container (the index travels inside a
//! `.vma.zst` or beside a `.vma`; [`crate::sink`] and the readers put it
//! there and find it).

use std::io::Write;

use twox_hash::XxHash3_128;
use uuid::Uuid;

use super::DevId;
#[cfg(test)]
use super::Device;
use super::cluster::{clusters_of, stored_in_device, stored_len, stored_runs};
use super::consts::{VMA_EXTENT_HEADER_SIZE, VMA_MAX_DEVICES};
use super::extent::BlockInfo;
use super::header::Header;

/// First bytes of an index.
pub const INDEX_MAGIC: [u8; 8] = *b"VMAINDEX";
/// The index version this code writes and reads.
pub const INDEX_VERSION: u16 = 1;
/// Length of the fixed head in front of the compressed body.
pub const INDEX_HEAD_LEN: usize = 64;
/// Flag: the archive is a sequence of zstd frames; each extent records the
/// frame that holds it.
pub const FLAG_FRAMED: u16 = 1;
/// The frame number recorded for an extent of an archive without frames.
pub const NO_FRAME: u32 = u32::MAX;
/// Bytes of a cluster digest (XXH3-128).
pub const DIGEST_LEN: usize = 16;
/// Largest decompressed body a reader accepts: 16 GiB covers 256 TiB of
/// devices in 64 KiB clusters at 24 bytes each with room to spare, and
/// bounds what a corrupt length can make a reader allocate.
pub const MAX_BODY_LEN: u64 = 16 << 30;

/// Bytes of a device record in the body.
const DEVICE_RECORD_LEN: usize = 56;
/// Bytes of an extent record in the body, before its entries.
const EXTENT_RECORD_LEN: usize = 16;
/// Bytes of one entry of an extent record.
const ENTRY_LEN: usize = 8;
/// Bytes of the body trailer (device and extent counts, VMA header length).
const TRAILER_LEN: usize = 16;
/// zstd level of the body: digests do not compress, zero-cluster runs
/// compress at any level, so the fastest is enough.
const BODY_LEVEL: i32 = 1;

/// A 128-bit cluster digest.
pub type Digest = [u8; DIGEST_LEN];

/// The digest of a cluster from its restored bytes (its in-device bytes:
/// 64 KiB, or less for a device's last cluster): XXH3-128, big-endian.
pub fn cluster_digest(restored: &[u8]) -> Digest {
    XxHash3_128::oneshot(restored).to_be_bytes()
}

/// [`cluster_digest`] computed from a cluster's stored blocks (`mask` and
/// `stored`, as in its extent) and its in-device length `len`, without
/// expanding it.
pub fn stored_digest(mask: u16, stored: &[u8], len: usize) -> Digest {
    if stored.len() == len {
        // Every block stored, none past the end: the stored bytes are the
        // restored ones (one-shot hashing is faster than streaming).
        return cluster_digest(stored);
    }
    static ZEROS: [u8; super::consts::VMA_BLOCK_SIZE] = [0; super::consts::VMA_BLOCK_SIZE];
    let mut h = XxHash3_128::new();
    let mut at = 0;
    let feed_zeros = |h: &mut XxHash3_128, mut n: usize| {
        while n > 0 {
            let k = n.min(ZEROS.len());
            h.write(&ZEROS[..k]);
            n -= k;
        }
    };
    for run in stored_runs(mask) {
        let keep = run.in_device(len);
        if keep.is_empty() {
            break;
        }
        feed_zeros(&mut h, keep.start - at);
        let from = run.payload_range().start;
        h.write(&stored[from..from + keep.len()]);
        at = keep.end;
    }
    feed_zeros(&mut h, len - at);
    h.finish_128().to_be_bytes()
}

/// Why an index is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Too short, or not an index at all.
    #[error("not a vma-writer index: {0}")]
    NotAnIndex(&'static str),
    /// A version this code does not read.
    #[error(
        "index version {found} is not supported (this vma-writer reads version {INDEX_VERSION})"
    )]
    Version {
        /// The version found.
        found: u16,
    },
    /// The index's own digest does not match: it is corrupt.
    #[error("the index is corrupt: its digest does not match")]
    Corrupt,
    /// The index belongs to another archive.
    #[error("the index belongs to another archive (uuid {found}, the archive's is {expected})")]
    ForeignArchive {
        /// The index's uuid.
        found: Uuid,
        /// The archive's.
        expected: Uuid,
    },
    /// The index describes an archive of another length: stale or foreign.
    #[error(
        "the index describes {indexed} archive bytes, the archive has {actual}: stale or foreign index"
    )]
    Length {
        /// Bytes the index describes.
        indexed: u64,
        /// Bytes the archive has.
        actual: u64,
    },
    /// The body is inconsistent.
    #[error("the index is inconsistent: {0}")]
    Inconsistent(String),
}

fn bad(what: impl Into<String>) -> IndexError {
    IndexError::Inconsistent(what.into())
}

/// Flag of a device record's chain byte: a dirty bitmap named for the
/// archive was added to the drive at the archive's point in time.
pub const CHAIN_BITMAP: u8 = 1;
/// Flag of a device record's chain byte: the clusters QEMU did not send
/// were copied from a base archive (an incremental backup).
pub const CHAIN_FROM_BASE: u8 = 2;

/// How a device's clusters came to be in a chain of backups
/// (`format/INDEX.md` §1.2, device record). All false and 0 for an archive
/// written without a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceChain {
    /// A dirty bitmap `vma-writer-<uuid>` was added to the drive at this
    /// archive's point in time: the next incremental backup uses it.
    pub bitmap: bool,
    /// The clusters QEMU did not send were copied from a base archive.
    pub from_base: bool,
    /// In-device bytes copied from the base (0 unless `from_base`).
    pub base_bytes: u64,
}

impl DeviceChain {
    /// The chain byte of a device record.
    fn flags(&self) -> u8 {
        (if self.bitmap { CHAIN_BITMAP } else { 0 })
            | (if self.from_base { CHAIN_FROM_BASE } else { 0 })
    }

    /// Decodes the chain byte and base_bytes of the device `dev` of
    /// `size` bytes, with the rules of `format/INDEX.md` §1.3.
    fn decode(dev: DevId, flags: u8, base_bytes: u64, size: u64) -> Result<Self, IndexError> {
        if flags & !(CHAIN_BITMAP | CHAIN_FROM_BASE) != 0 {
            return Err(bad(format!(
                "device {dev}: unknown chain flags {flags:#04x}"
            )));
        }
        let from_base = flags & CHAIN_FROM_BASE != 0;
        if base_bytes > size || (!from_base && base_bytes != 0) {
            return Err(bad(format!("device {dev}: {base_bytes} bytes from a base")));
        }
        Ok(DeviceChain {
            bitmap: flags & CHAIN_BITMAP != 0,
            from_base,
            base_bytes,
        })
    }
}

/// Totals of one device, as the index records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceTotals {
    /// The device.
    pub dev: DevId,
    /// Its size in bytes.
    pub size: u64,
    /// Clusters that store data (mask not 0).
    pub data_clusters: u64,
    /// All-zero clusters (mask 0).
    pub zero_clusters: u64,
    /// Payload bytes its clusters take in the archive.
    pub stored_bytes: u64,
    /// In-device bytes of zero blocks (not stored).
    pub zero_bytes: u64,
    /// Its place in a chain of backups.
    pub chain: DeviceChain,
}

impl DeviceTotals {
    /// Zero totals for every device of `header`.
    fn none_of(header: &Header) -> Vec<DeviceTotals> {
        header
            .devices
            .iter()
            .map(|d| DeviceTotals {
                dev: d.id,
                size: d.size,
                ..Default::default()
            })
            .collect()
    }

    /// Adds one cluster of this device, stored as `e` says.
    fn count(&mut self, e: BlockInfo) {
        let len = super::cluster::cluster_len(self.size, u64::from(e.cluster)) as u64;
        let stored = stored_len(e.mask) as u64;
        if e.mask == 0 {
            self.zero_clusters += 1;
        } else {
            self.data_clusters += 1;
        }
        self.stored_bytes += stored;
        self.zero_bytes += len - stored_in_device(e.mask, len as usize) as u64;
    }
}

/// One extent as the index records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentRecord {
    /// Offset of the extent header in the plain VMA stream (the file offset
    /// in a `.vma`; the decompressed offset in a `.vma.zst`).
    pub stream_offset: u64,
    /// The zstd frame holding the extent, or [`NO_FRAME`].
    pub frame: u32,
    /// Its blockinfo entries, in slot order.
    pub entries: Vec<BlockInfo>,
    /// Index into [`ArchiveIndex::digests`] of the digest of its first
    /// entry that stores data.
    first_digest: u32,
}

impl ExtentRecord {
    /// Bytes of the extent in the stream: header plus payload.
    pub fn len(&self) -> u64 {
        (VMA_EXTENT_HEADER_SIZE + self.entries.iter().map(|e| e.stored_len()).sum::<usize>()) as u64
    }

    /// True for an extent without entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Where one cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Index of its extent in [`ArchiveIndex::extents`].
    pub extent: u32,
    /// Its blockinfo mask (0: all zero, nothing stored).
    pub mask: u16,
    /// Offset of its stored blocks in the plain VMA stream.
    pub stream_offset: u64,
    /// The zstd frame holding it, or [`NO_FRAME`].
    pub frame: u32,
    /// Its digest, when it stores data and the index has digests.
    pub digest: Option<Digest>,
}

/// Collects extents while an archive is written, then encodes the index;
/// see the module docs.
pub struct IndexBuilder {
    uuid: Uuid,
    header_len: u64,
    framed: bool,
    devices: Vec<DeviceTotals>,
    /// Encoded extent records, then the device records and trailer.
    body: zstd::stream::write::Encoder<'static, Vec<u8>>,
    extents: u32,
    stream_len: u64,
}

impl IndexBuilder {
    /// A builder for the archive with `header` (`header_len` bytes long);
    /// `framed` when it is written as zstd frames.
    pub fn new(header: &Header, header_len: u64, framed: bool) -> std::io::Result<Self> {
        let mut body = zstd::stream::write::Encoder::new(Vec::new(), BODY_LEVEL)?;
        body.include_checksum(true)?;
        Ok(IndexBuilder {
            uuid: header.uuid,
            header_len,
            framed,
            devices: DeviceTotals::none_of(header),
            body,
            extents: 0,
            stream_len: header_len,
        })
    }

    /// Records one extent written at `stream_offset` (into `frame`, or
    /// [`NO_FRAME`]) with `entries`; `digests` holds one digest per entry
    /// whose mask is not 0, in entry order. Extents must be added in
    /// stream order.
    pub fn add_extent(
        &mut self,
        stream_offset: u64,
        frame: u32,
        entries: &[BlockInfo],
        digests: &[Digest],
    ) -> std::io::Result<()> {
        debug_assert_eq!(
            digests.len(),
            entries.iter().filter(|e| e.mask != 0).count(),
            "one digest per data cluster"
        );
        debug_assert_eq!(stream_offset, self.stream_len, "extents in stream order");
        let mut rec = Vec::with_capacity(
            EXTENT_RECORD_LEN + entries.len() * ENTRY_LEN + digests.len() * DIGEST_LEN,
        );
        rec.extend_from_slice(&stream_offset.to_le_bytes());
        rec.extend_from_slice(&frame.to_le_bytes());
        rec.extend_from_slice(&[entries.len() as u8, 0, 0, 0]);
        let mut payload = 0u64;
        for e in entries {
            rec.extend_from_slice(&[e.dev, 0]);
            rec.extend_from_slice(&e.mask.to_le_bytes());
            rec.extend_from_slice(&e.cluster.to_le_bytes());
            let stored = stored_len(e.mask) as u64;
            payload += stored;
            if let Some(d) = self.devices.iter_mut().find(|d| d.dev.0 == e.dev) {
                d.count(*e);
            }
        }
        for d in digests {
            rec.extend_from_slice(d);
        }
        self.body.write_all(&rec)?;
        self.extents += 1;
        self.stream_len = stream_offset + VMA_EXTENT_HEADER_SIZE as u64 + payload;
        Ok(())
    }

    /// Plain VMA bytes described so far (header and extents).
    pub fn stream_len(&self) -> u64 {
        self.stream_len
    }

    /// Records the chain facts of device `dev` (any time before
    /// [`finish`](Self::finish)); unknown devices are ignored.
    pub fn set_chain(&mut self, dev: DevId, chain: DeviceChain) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.dev == dev) {
            d.chain = chain;
        }
    }

    /// Encodes the index: head and compressed body.
    pub fn finish(mut self) -> std::io::Result<Vec<u8>> {
        let mut tail = Vec::with_capacity(self.devices.len() * DEVICE_RECORD_LEN + TRAILER_LEN);
        for d in &self.devices {
            tail.extend_from_slice(&[d.dev.0, d.chain.flags(), 0, 0, 0, 0, 0, 0]);
            for v in [
                d.size,
                d.data_clusters,
                d.zero_clusters,
                d.stored_bytes,
                d.zero_bytes,
                d.chain.base_bytes,
            ] {
                tail.extend_from_slice(&v.to_le_bytes());
            }
        }
        tail.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        tail.extend_from_slice(&self.extents.to_le_bytes());
        tail.extend_from_slice(&self.header_len.to_le_bytes());
        self.body.write_all(&tail)?;
        let body = self.body.finish()?;
        let mut out = Vec::with_capacity(INDEX_HEAD_LEN + body.len());
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&(if self.framed { FLAG_FRAMED } else { 0 }).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(self.uuid.as_bytes());
        out.extend_from_slice(&self.stream_len.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let digest = head_digest(&out, &body);
        out.extend_from_slice(&digest);
        out.extend_from_slice(&body);
        debug_assert_eq!(out.len(), INDEX_HEAD_LEN + body.len());
        Ok(out)
    }
}

/// The index's own digest: XXH3-128 of its first 48 bytes and the
/// compressed body.
fn head_digest(head: &[u8], body: &[u8]) -> Digest {
    let mut h = XxHash3_128::new();
    h.write(&head[..48]);
    h.write(body);
    h.finish_128().to_be_bytes()
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The fields of an index head, read without the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexHead {
    /// The archive's uuid.
    pub uuid: Uuid,
    /// Plain VMA bytes of the archive.
    pub stream_len: u64,
    /// The archive is zstd-framed.
    pub framed: bool,
    /// Bytes of the compressed body after the head.
    pub body_len: u64,
}

impl IndexHead {
    /// Decodes and checks the 64-byte head (not the body's digest).
    pub fn decode(b: &[u8]) -> Result<IndexHead, IndexError> {
        if b.len() < INDEX_HEAD_LEN {
            return Err(IndexError::NotAnIndex("shorter than its head"));
        }
        if b[..8] != INDEX_MAGIC {
            return Err(IndexError::NotAnIndex("wrong magic"));
        }
        let version = le_u16(b, 8);
        if version != INDEX_VERSION {
            return Err(IndexError::Version { found: version });
        }
        let flags = le_u16(b, 10);
        if flags & !FLAG_FRAMED != 0 || le_u32(b, 12) != 0 {
            return Err(IndexError::NotAnIndex("unknown flags"));
        }
        Ok(IndexHead {
            uuid: Uuid::from_bytes(b[16..32].try_into().expect("16 bytes")),
            stream_len: le_u64(b, 32),
            framed: flags & FLAG_FRAMED != 0,
            body_len: le_u64(b, 40),
        })
    }
}

/// A decoded, checked index; see the module docs.
#[derive(Debug, Clone)]
pub struct ArchiveIndex {
    /// The archive's uuid.
    pub uuid: Uuid,
    /// Plain VMA bytes of the archive.
    pub stream_len: u64,
    /// Length of the VMA header (the first extent's offset).
    pub header_len: u64,
    /// The archive is zstd-framed.
    pub framed: bool,
    /// Totals per device, in dev_id order.
    pub devices: Vec<DeviceTotals>,
    /// Every extent, in stream order.
    pub extents: Vec<ExtentRecord>,
    /// Digests of the data clusters, in extent and entry order.
    pub digests: Vec<Digest>,
    /// Per device slot (dev_id): for each cluster, the extent holding it.
    map: Vec<Vec<u32>>,
    /// `digests` holds one digest per data cluster (else it is empty).
    has_digests: bool,
}

/// Checks extents as they are added (back to back from the header, every
/// cluster of a known device at most once) and builds the map from
/// clusters to extents; then that every cluster was there. What
/// [`ArchiveIndex::decode`] and [`ArchiveIndex::from_extent_headers`]
/// share.
struct Mapper {
    framed: bool,
    has_digests: bool,
    header_len: u64,
    map: Vec<Vec<u32>>,
    extents: Vec<ExtentRecord>,
    digests: Vec<Digest>,
    next_offset: u64,
}

impl Mapper {
    /// `max_entries` is the most cluster entries the source can hold (from
    /// its length): devices with more clusters than that cannot be complete,
    /// and are refused before their map (4 bytes per cluster) is allocated,
    /// so a few bytes claiming 256 TiB devices cost nothing.
    fn new(
        devices: &[DeviceTotals],
        header_len: u64,
        framed: bool,
        has_digests: bool,
        max_entries: u64,
    ) -> Result<Mapper, IndexError> {
        let clusters = devices
            .iter()
            .map(|d| clusters_of(d.size.min(super::consts::MAX_DEVICE_SIZE)))
            .sum::<u64>();
        if clusters > max_entries {
            return Err(bad(format!(
                "its devices have {clusters} clusters, more than the {max_entries} it can list"
            )));
        }
        let mut map: Vec<Vec<u32>> = vec![Vec::new(); 256];
        for (i, d) in devices.iter().enumerate() {
            if d.dev.0 == 0 || !map[d.dev.0 as usize].is_empty() || d.size == 0 {
                return Err(bad(format!("device record {i} (dev_id {})", d.dev)));
            }
            if d.size > super::consts::MAX_DEVICE_SIZE {
                return Err(bad(format!("device {} is larger than any device", d.dev)));
            }
            map[d.dev.0 as usize] = vec![u32::MAX; clusters_of(d.size) as usize];
        }
        Ok(Mapper {
            framed,
            has_digests,
            header_len,
            map,
            extents: Vec::new(),
            digests: Vec::new(),
            next_offset: header_len,
        })
    }

    /// Adds the next extent; `digests` has one digest per data entry when
    /// the index has digests (else it is not read).
    fn add(
        &mut self,
        stream_offset: u64,
        frame: u32,
        entries: Vec<BlockInfo>,
        digests: impl Iterator<Item = Digest>,
    ) -> Result<(), IndexError> {
        let x = self.extents.len();
        if stream_offset != self.next_offset {
            return Err(bad(format!(
                "extent {x} at stream offset {stream_offset}, expected {}",
                self.next_offset
            )));
        }
        if self.framed == (frame == NO_FRAME) {
            return Err(bad(format!("extent {x}: frame number {frame}")));
        }
        if entries.len() > super::consts::VMA_BLOCKS_PER_EXTENT {
            return Err(bad(format!("extent {x} has {} entries", entries.len())));
        }
        for info in &entries {
            let slots = &mut self.map[info.dev as usize];
            let c = info.cluster as usize;
            if c >= slots.len() {
                return Err(bad(format!(
                    "extent {x}: cluster {c} of dev_id {} is not in a device",
                    info.dev
                )));
            }
            if slots[c] != u32::MAX {
                return Err(bad(format!(
                    "cluster {c} of dev_id {} appears twice",
                    info.dev
                )));
            }
            slots[c] = x as u32;
        }
        let first_digest = self.digests.len() as u32;
        if self.has_digests {
            let data = entries.iter().filter(|e| e.mask != 0).count();
            self.digests.extend(digests.take(data));
            if self.digests.len() != first_digest as usize + data {
                return Err(bad(format!("extent {x} lacks digests")));
            }
        }
        let rec = ExtentRecord {
            stream_offset,
            frame,
            entries,
            first_digest,
        };
        self.next_offset = stream_offset
            .checked_add(rec.len())
            .ok_or_else(|| bad(format!("extent {x} ends past 2^64")))?;
        self.extents.push(rec);
        Ok(())
    }

    fn finish(
        self,
        uuid: Uuid,
        stream_len: u64,
        devices: Vec<DeviceTotals>,
    ) -> Result<ArchiveIndex, IndexError> {
        if self.next_offset != stream_len {
            return Err(bad(format!(
                "the extents end at {}, the stream at {stream_len}",
                self.next_offset
            )));
        }
        for d in &devices {
            let slots = &self.map[d.dev.0 as usize];
            if let Some(c) = slots.iter().position(|&x| x == u32::MAX) {
                return Err(bad(format!("cluster {c} of dev_id {} is missing", d.dev)));
            }
            // Values from the index: checked, so that huge ones cannot wrap
            // around to the right total.
            if d.data_clusters.checked_add(d.zero_clusters) != Some(slots.len() as u64) {
                return Err(bad(format!("device {} totals", d.dev)));
            }
        }
        Ok(ArchiveIndex {
            uuid,
            stream_len,
            header_len: self.header_len,
            framed: self.framed,
            devices,
            extents: self.extents,
            digests: self.digests,
            map: self.map,
            has_digests: self.has_digests,
        })
    }
}

impl ArchiveIndex {
    /// Decodes `b` (head and body), checking its digest and that it
    /// describes a complete archive: every cluster of every device exactly
    /// once, extents back to back from the header to `stream_len`.
    pub fn decode(b: &[u8]) -> Result<ArchiveIndex, IndexError> {
        let head = IndexHead::decode(b)?;
        let body_end = (INDEX_HEAD_LEN as u64)
            .checked_add(head.body_len)
            .filter(|&e| e == b.len() as u64)
            .ok_or(IndexError::NotAnIndex("its length does not match its head"))?;
        let body = &b[INDEX_HEAD_LEN..body_end as usize];
        if head_digest(b, body)[..] != b[48..64] {
            return Err(IndexError::Corrupt);
        }
        let mut raw = Vec::new();
        let mut dec = zstd::stream::read::Decoder::new(body).map_err(|_| IndexError::Corrupt)?;
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut dec, MAX_BODY_LEN + 1),
            &mut raw,
        )
        .map_err(|_| IndexError::Corrupt)?;
        if raw.len() as u64 > MAX_BODY_LEN {
            return Err(bad("the body is larger than any index"));
        }
        Self::decode_body(head, &raw)
    }

    fn decode_body(head: IndexHead, raw: &[u8]) -> Result<ArchiveIndex, IndexError> {
        if raw.len() < TRAILER_LEN {
            return Err(bad("the body is shorter than its trailer"));
        }
        let t = raw.len() - TRAILER_LEN;
        let device_count = le_u32(raw, t) as usize;
        let extent_count = le_u32(raw, t + 4) as usize;
        let header_len = le_u64(raw, t + 8);
        if device_count > VMA_MAX_DEVICES + 1 {
            return Err(bad(format!("{device_count} devices")));
        }
        let dev_start = t
            .checked_sub(device_count * DEVICE_RECORD_LEN)
            .ok_or_else(|| bad("the device table does not fit"))?;
        let devices: Vec<DeviceTotals> = (0..device_count)
            .map(|i| {
                let r = &raw[dev_start + i * DEVICE_RECORD_LEN..][..DEVICE_RECORD_LEN];
                let (dev, size) = (DevId(r[0]), le_u64(r, 8));
                Ok(DeviceTotals {
                    dev,
                    size,
                    data_clusters: le_u64(r, 16),
                    zero_clusters: le_u64(r, 24),
                    stored_bytes: le_u64(r, 32),
                    zero_bytes: le_u64(r, 40),
                    chain: DeviceChain::decode(dev, r[1], le_u64(r, 48), size)?,
                })
            })
            .collect::<Result<_, IndexError>>()?;
        if extent_count > dev_start / EXTENT_RECORD_LEN {
            return Err(bad(format!("{extent_count} extents do not fit")));
        }
        let max_entries = (extent_count as u64 * super::consts::VMA_BLOCKS_PER_EXTENT as u64)
            .min((dev_start / ENTRY_LEN) as u64);
        let mut mapper = Mapper::new(&devices, header_len, head.framed, true, max_entries)?;
        let mut at = 0usize;
        for x in 0..extent_count {
            if at + EXTENT_RECORD_LEN > dev_start {
                return Err(bad(format!("extent record {x} is cut short")));
            }
            let r = &raw[at..];
            let stream_offset = le_u64(r, 0);
            let frame = le_u32(r, 8);
            let count = r[12] as usize;
            if count > super::consts::VMA_BLOCKS_PER_EXTENT {
                return Err(bad(format!("extent {x} has {count} entries")));
            }
            at += EXTENT_RECORD_LEN;
            if at + count * ENTRY_LEN > dev_start {
                return Err(bad(format!("extent record {x} is cut short")));
            }
            let entries: Vec<BlockInfo> = (0..count)
                .map(|k| {
                    let e = &raw[at + k * ENTRY_LEN..];
                    BlockInfo {
                        dev: e[0],
                        mask: le_u16(e, 2),
                        cluster: le_u32(e, 4),
                    }
                })
                .collect();
            at += count * ENTRY_LEN;
            let data = entries.iter().filter(|e| e.mask != 0).count();
            if at + data * DIGEST_LEN > dev_start {
                return Err(bad(format!("extent record {x} is cut short")));
            }
            let digests = raw[at..at + data * DIGEST_LEN]
                .chunks_exact(DIGEST_LEN)
                .map(|d| d.try_into().expect("16 bytes"));
            mapper.add(stream_offset, frame, entries, digests)?;
            at += data * DIGEST_LEN;
        }
        if at != dev_start {
            return Err(bad("bytes left between the extents and the device table"));
        }
        mapper.finish(head.uuid, head.stream_len, devices)
    }

    /// An index without digests for an archive that has none, from its
    /// header and its extent headers (`(stream offset, entries)` in stream
    /// order, e.g. read one 512-byte header at a time from a plain `.vma`),
    /// with the same completeness checks as [`decode`](Self::decode).
    /// `stream_len` is the archive's length: the extents must end there.
    pub fn from_extent_headers(
        header: &Header,
        header_len: u64,
        stream_len: u64,
        extents: impl IntoIterator<Item = (u64, Vec<BlockInfo>)>,
    ) -> Result<ArchiveIndex, IndexError> {
        let mut devices = DeviceTotals::none_of(header);
        let max_extents = stream_len.saturating_sub(header_len) / VMA_EXTENT_HEADER_SIZE as u64;
        let max_entries = max_extents * super::consts::VMA_BLOCKS_PER_EXTENT as u64;
        let mut mapper = Mapper::new(&devices, header_len, false, false, max_entries)?;
        for (stream_offset, entries) in extents {
            for e in &entries {
                if let Some(d) = devices.iter_mut().find(|d| d.dev.0 == e.dev) {
                    d.count(*e);
                }
            }
            mapper.add(stream_offset, NO_FRAME, entries, std::iter::empty())?;
        }
        mapper.finish(header.uuid, stream_len, devices)
    }

    /// True when the index holds a digest of every data cluster (an index
    /// [`decode`](Self::decode)d from an archive); false for one made
    /// [`from_extent_headers`](Self::from_extent_headers).
    pub fn has_digests(&self) -> bool {
        self.has_digests
    }

    /// The extent whose bytes hold plain-stream offset `offset`.
    pub fn extent_at(&self, offset: u64) -> Option<usize> {
        let i = self
            .extents
            .partition_point(|e| e.stream_offset + e.len() <= offset);
        (i < self.extents.len() && self.extents[i].stream_offset <= offset).then_some(i)
    }

    /// The first extent held by zstd frame `frame`.
    pub fn extent_of_frame(&self, frame: u32) -> Option<usize> {
        let i = self.extents.partition_point(|e| e.frame < frame);
        (i < self.extents.len() && self.extents[i].frame == frame).then_some(i)
    }

    /// Checks that the index describes the archive with `header`, whose
    /// plain stream is `stream_len` bytes long (when known).
    pub fn check_archive(
        &self,
        header: &Header,
        stream_len: Option<u64>,
    ) -> Result<(), IndexError> {
        if header.uuid != self.uuid {
            return Err(IndexError::ForeignArchive {
                found: self.uuid,
                expected: header.uuid,
            });
        }
        if let Some(actual) = stream_len
            && actual != self.stream_len
        {
            return Err(IndexError::Length {
                indexed: self.stream_len,
                actual,
            });
        }
        let sizes: Vec<(DevId, u64)> = self.devices.iter().map(|d| (d.dev, d.size)).collect();
        let want: Vec<(DevId, u64)> = header.devices.iter().map(|d| (d.id, d.size)).collect();
        if sizes != want {
            return Err(bad("its devices differ from the archive header's"));
        }
        Ok(())
    }

    /// Where cluster `cluster` of `dev` is; `None` if there is no such
    /// cluster.
    pub fn locate(&self, dev: DevId, cluster: u64) -> Option<Location> {
        let x = *self.map.get(dev.0 as usize)?.get(cluster as usize)?;
        let rec = &self.extents[x as usize];
        let mut offset = rec.stream_offset + VMA_EXTENT_HEADER_SIZE as u64;
        let mut digest = rec.first_digest as usize;
        for e in &rec.entries {
            if e.dev == dev.0 && u64::from(e.cluster) == cluster {
                return Some(Location {
                    extent: x,
                    mask: e.mask,
                    stream_offset: offset,
                    frame: rec.frame,
                    digest: (e.mask != 0 && self.has_digests).then(|| self.digests[digest]),
                });
            }
            offset += e.stored_len() as u64;
            if e.mask != 0 {
                digest += 1;
            }
        }
        unreachable!("the map points at an extent holding the cluster")
    }

    /// The digests of an extent's data clusters, in entry order (none
    /// when the index has no digests).
    pub fn extent_digests(&self, extent: usize) -> &[Digest] {
        let rec = &self.extents[extent];
        if !self.has_digests {
            return &[];
        }
        let n = rec.entries.iter().filter(|e| e.mask != 0).count();
        &self.digests[rec.first_digest as usize..][..n]
    }

    /// The blockinfo mask of every cluster of `dev`, in cluster order (0:
    /// an all-zero cluster); empty for an unknown device. Two bytes per
    /// 64 KiB cluster, from the index alone: what answers "which blocks
    /// hold data" without reading the archive.
    pub fn cluster_masks(&self, dev: DevId) -> Vec<u16> {
        let Some(slots) = self.map.get(dev.0 as usize) else {
            return Vec::new();
        };
        let mut masks = vec![0u16; slots.len()];
        let mut last = None;
        for &x in slots {
            if last == Some(x) {
                continue;
            }
            last = Some(x);
            for e in &self.extents[x as usize].entries {
                if e.dev == dev.0 {
                    masks[e.cluster as usize] = e.mask;
                }
            }
        }
        masks
    }

    /// The extents holding clusters of any of `devs`, in stream order.
    pub fn extents_of(&self, devs: &[DevId]) -> Vec<usize> {
        let mut marks = vec![false; self.extents.len()];
        for d in devs {
            if let Some(slots) = self.map.get(d.0 as usize) {
                for &x in slots {
                    marks[x as usize] = true;
                }
            }
        }
        marks
            .iter()
            .enumerate()
            .filter_map(|(i, &m)| m.then_some(i))
            .collect()
    }

    /// Totals of `dev`.
    pub fn device(&self, dev: DevId) -> Option<&DeviceTotals> {
        self.devices.iter().find(|d| d.dev == dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vma::consts::VMA_BLOCK_SIZE;

    fn dev(id: u8, size: u64) -> Device {
        Device {
            id: DevId(id),
            name: format!("d{id}"),
            size,
        }
    }

    fn builder_for(devices: &[Device], uuid: Uuid, header_len: u64, framed: bool) -> IndexBuilder {
        let header = Header {
            uuid,
            ctime: 0,
            configs: Vec::new(),
            devices: devices.to_vec(),
        };
        IndexBuilder::new(&header, header_len, framed).unwrap()
    }

    fn info(dev: u8, cluster: u32, mask: u16) -> BlockInfo {
        BlockInfo { mask, dev, cluster }
    }

    fn sample() -> (Vec<u8>, Vec<Digest>) {
        let devs = [dev(1, 3 * 65536), dev(2, 4096 + 10)];
        let mut b = builder_for(&devs, Uuid::from_u128(7), 12800, true);
        let d: Vec<Digest> = (0..3).map(|i| [i as u8 + 1; 16]).collect();
        // Extent 0: d1 c2 (full), d2 c0 (two blocks), d1 c0 (zero).
        let e0 = [info(1, 2, 0xFFFF), info(2, 0, 0b11), info(1, 0, 0)];
        b.add_extent(12800, 1, &e0, &d[..2]).unwrap();
        let next = 12800 + 512 + 18 * VMA_BLOCK_SIZE as u64;
        b.add_extent(next, 2, &[info(1, 1, 0b100)], &d[2..])
            .unwrap();
        let len = b.stream_len();
        assert_eq!(len, next + 512 + 4096);
        let chain = DeviceChain {
            bitmap: true,
            from_base: true,
            base_bytes: 65536,
        };
        b.set_chain(DevId(1), chain);
        (b.finish().unwrap(), d)
    }

    #[test]
    fn round_trip_and_lookup() {
        let (bytes, d) = sample();
        let idx = ArchiveIndex::decode(&bytes).unwrap();
        assert!(idx.framed);
        assert_eq!(idx.header_len, 12800);
        assert_eq!(idx.extents.len(), 2);
        let l = idx.locate(DevId(2), 0).unwrap();
        assert_eq!(
            (l.extent, l.mask, l.stream_offset, l.frame, l.digest),
            (0, 0b11, 12800 + 512 + 65536, 1, Some(d[1]))
        );
        let l = idx.locate(DevId(1), 0).unwrap();
        assert_eq!((l.mask, l.digest), (0, None));
        assert_eq!(idx.locate(DevId(1), 1).unwrap().digest, Some(d[2]));
        assert_eq!(idx.locate(DevId(1), 3), None);
        assert_eq!(idx.extents_of(&[DevId(2)]), [0]);
        assert_eq!(idx.extents_of(&[DevId(1)]), [0, 1]);
        assert_eq!(idx.cluster_masks(DevId(1)), [0, 0b100, 0xFFFF]);
        assert_eq!(idx.cluster_masks(DevId(2)), [0b11]);
        assert!(idx.cluster_masks(DevId(9)).is_empty());
        let t = idx.device(DevId(1)).unwrap();
        assert_eq!(
            (t.data_clusters, t.zero_clusters, t.stored_bytes),
            (2, 1, 65536 + 4096)
        );
        assert_eq!(t.zero_bytes, 65536 + 15 * 4096);
        assert_eq!(idx.device(DevId(2)).unwrap().zero_bytes, 0);
        assert_eq!(
            t.chain,
            DeviceChain {
                bitmap: true,
                from_base: true,
                base_bytes: 65536
            }
        );
        assert_eq!(idx.device(DevId(2)).unwrap().chain, DeviceChain::default());
    }

    #[test]
    fn chain_fields_follow_their_rules() {
        let ok = DeviceChain::decode(DevId(1), CHAIN_BITMAP, 0, 100).unwrap();
        assert!(ok.bitmap && !ok.from_base);
        for (flags, base, why) in [
            (4, 0, "unknown chain flags"),
            (CHAIN_BITMAP, 10, "10 bytes from a base"),
            (CHAIN_FROM_BASE, 101, "101 bytes from a base"),
        ] {
            let e = DeviceChain::decode(DevId(1), flags, base, 100).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let (bytes, _) = sample();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(ArchiveIndex::decode(&b).is_err(), "byte {i}");
        }
        assert!(ArchiveIndex::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn incomplete_or_inconsistent_bodies_are_refused() {
        let devs = [dev(1, 2 * 65536)];
        // A cluster missing.
        let mut b = builder_for(&devs, Uuid::nil(), 12800, false);
        b.add_extent(12800, NO_FRAME, &[info(1, 0, 0)], &[])
            .unwrap();
        let e = ArchiveIndex::decode(&b.finish().unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("cluster 1 of dev_id 1 is missing"),
            "{e}"
        );
        // A cluster twice.
        let mut b = builder_for(&devs, Uuid::nil(), 12800, false);
        let twice = [info(1, 0, 0), info(1, 1, 0), info(1, 0, 0)];
        b.add_extent(12800, NO_FRAME, &twice, &[]).unwrap();
        let e = ArchiveIndex::decode(&b.finish().unwrap()).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        // A frame number in an unframed index.
        let mut b = builder_for(&devs, Uuid::nil(), 12800, false);
        b.add_extent(12800, 3, &[info(1, 0, 0), info(1, 1, 0)], &[])
            .unwrap();
        assert!(ArchiveIndex::decode(&b.finish().unwrap()).is_err());
    }

    #[test]
    fn checks_the_archive_it_describes() {
        let (bytes, _) = sample();
        let idx = ArchiveIndex::decode(&bytes).unwrap();
        let header = Header {
            uuid: Uuid::from_u128(7),
            ctime: 0,
            configs: vec![],
            devices: vec![dev(1, 3 * 65536), dev(2, 4096 + 10)],
        };
        idx.check_archive(&header, Some(idx.stream_len)).unwrap();
        assert!(matches!(
            idx.check_archive(&header, Some(idx.stream_len + 1)),
            Err(IndexError::Length { .. })
        ));
        let other = Header {
            uuid: Uuid::from_u128(8),
            ..header.clone()
        };
        assert!(matches!(
            idx.check_archive(&other, None),
            Err(IndexError::ForeignArchive { .. })
        ));
    }

    #[test]
    fn stored_digest_equals_the_digest_of_the_restored_bytes() {
        let len = 3 * VMA_BLOCK_SIZE + 100;
        let mut restored = vec![0u8; len];
        restored[5] = 1; // block 0
        restored[2 * VMA_BLOCK_SIZE + 7] = 2; // block 2
        restored[3 * VMA_BLOCK_SIZE + 99] = 3; // block 3, straddling the end
        let mask = crate::vma::zero::block_mask(&restored);
        assert_eq!(mask, 0b1101);
        let mut stored = Vec::new();
        for b in [0, 2, 3] {
            let mut block = restored[b * VMA_BLOCK_SIZE..].to_vec();
            block.resize(VMA_BLOCK_SIZE, 0);
            stored.extend_from_slice(&block);
        }
        assert_eq!(stored_digest(mask, &stored, len), cluster_digest(&restored));
        let full = vec![9u8; 65536];
        assert_eq!(stored_digest(0xFFFF, &full, 65536), cluster_digest(&full));
        assert_ne!(cluster_digest(&full[..65535]), cluster_digest(&full));
    }
}
