//! The streaming archive writer (§4 of the spec).
//!
//! Configs and devices are registered on a [`WriterBuilder`]; [`WriterBuilder::start`]
//! writes the header, after which clusters may come in any order from any
//! device. Clusters are buffered until an extent is full and then handed to
//! the output as one unit ([`ArchiveOut`]), straight from the caller's
//! [`Bytes`]: the writer never copies cluster data (the only bytes it makes
//! itself are the 512-byte extent header and, for a last partial cluster,
//! zero padding from a static block). It never seeks, so any [`Write`]
//! works: file, pipe, stdout (one vectored write per unit); an output that
//! compresses cuts its frames at the units.
//!
//! With [`WriterBuilder::index`], the writer also digests every data
//! cluster and builds the archive index (`format/INDEX.md`), which
//! [`Writer::finish_indexed`] returns.

use std::io::{self, IoSlice, Write};

use bytes::Bytes;
use uuid::Uuid;

use super::cluster::{stored_len, stored_runs, valid_mask};
use super::consts::*;
use super::extent::{BlockInfo, ExtentHeader};
use super::header::{Config, Device, Header, check_name};
use super::index::{DeviceChain, Digest, IndexBuilder, NO_FRAME, cluster_digest, stored_digest};
use super::zero::block_mask;
use super::{ClusterBitmap, DevId, FormatError, MissingClusters};

/// Zero bytes used to pad the block that straddles a device's end.
static ZERO_BLOCK: [u8; VMA_BLOCK_SIZE] = [0; VMA_BLOCK_SIZE];

/// Where a [`Writer`] sends an archive: its header, then whole extents,
/// each as one unit, so that an output that compresses can make every
/// frame hold whole extents.
pub trait ArchiveOut {
    /// Writes one unit, given as parts whose concatenation is its bytes.
    /// Returns the zstd frame the unit went into, for outputs that write
    /// frames (`None` otherwise).
    fn write_unit(&mut self, parts: &[Bytes]) -> io::Result<Option<u32>>;

    /// Passes the units written so far on (no durability promise).
    fn flush_units(&mut self) -> io::Result<()>;
}

/// Any [`Write`] takes each unit with one vectored write.
impl<W: Write> ArchiveOut for W {
    fn write_unit(&mut self, parts: &[Bytes]) -> io::Result<Option<u32>> {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        write_all_vectored(self, &mut slices)?;
        Ok(None)
    }

    fn flush_units(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// Collects configs and devices; nothing is written until [`start`](Self::start).
#[derive(Debug, Clone)]
pub struct WriterBuilder {
    uuid: Uuid,
    ctime: Option<i64>,
    configs: Vec<Config>,
    devices: Vec<Device>,
    per_extent: usize,
    index: bool,
}

impl Default for WriterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl WriterBuilder {
    /// A builder with a random uuid, ctime taken at [`start`](Self::start),
    /// and Proxmox's 58 clusters per extent.
    pub fn new() -> Self {
        WriterBuilder {
            uuid: Uuid::new_v4(),
            ctime: None,
            configs: Vec::new(),
            devices: Vec::new(),
            per_extent: PROXMOX_CLUSTERS_PER_EXTENT,
            index: false,
        }
    }

    /// Builds the archive index while writing (digesting every data
    /// cluster); [`Writer::finish_indexed`] returns it.
    pub fn index(mut self, index: bool) -> Self {
        self.index = index;
        self
    }

    /// Uses a fixed uuid (reproducible output, tests).
    pub fn uuid(mut self, uuid: Uuid) -> Self {
        self.uuid = uuid;
        self
    }

    /// Uses a fixed creation time instead of the time of `start`.
    pub fn ctime(mut self, ctime: i64) -> Self {
        self.ctime = Some(ctime);
        self
    }

    /// Clusters per extent, 1..=59. Proxmox writes 58; 59 is legal.
    pub fn clusters_per_extent(mut self, n: usize) -> Result<Self, FormatError> {
        if n == 0 || n > VMA_BLOCKS_PER_EXTENT {
            return Err(FormatError::ClustersPerExtent {
                got: n,
                max: VMA_BLOCKS_PER_EXTENT,
            });
        }
        self.per_extent = n;
        Ok(self)
    }

    /// Adds a config blob. `name` is stored as given (callers pass a base
    /// name, as Proxmox stores only the file name).
    pub fn add_config(&mut self, name: &str, data: &[u8]) -> Result<(), FormatError> {
        check_name("config", name)?;
        if self.configs.len() >= VMA_MAX_CONFIGS {
            return Err(FormatError::TooManyConfigs {
                max: VMA_MAX_CONFIGS,
            });
        }
        if data.len() > VMA_MAX_BLOB_LEN {
            return Err(FormatError::BlobTooLarge {
                what: format!("config '{name}'"),
                len: data.len(),
                max: VMA_MAX_BLOB_LEN,
            });
        }
        if self.configs.iter().any(|c| c.name == name) {
            return Err(FormatError::DuplicateName {
                what: "config",
                name: name.into(),
            });
        }
        self.configs.push(Config {
            name: name.into(),
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Registers a device and returns its id (1, 2, ... in order).
    pub fn add_device(&mut self, name: &str, size: u64) -> Result<DevId, FormatError> {
        check_name("device", name)?;
        if self.devices.len() >= VMA_MAX_DEVICES {
            return Err(FormatError::TooManyDevices {
                max: VMA_MAX_DEVICES,
            });
        }
        if size == 0 {
            return Err(FormatError::ZeroSizeDevice(name.into()));
        }
        if size > MAX_DEVICE_SIZE {
            return Err(FormatError::DeviceTooLarge {
                name: name.into(),
                size,
                max: MAX_DEVICE_SIZE,
            });
        }
        if self.devices.iter().any(|d| d.name == name) {
            return Err(FormatError::DuplicateName {
                what: "device",
                name: name.into(),
            });
        }
        let id = DevId(self.devices.len() as u8 + 1);
        self.devices.push(Device {
            id,
            name: name.into(),
            size,
        });
        Ok(id)
    }

    /// The header as it will be written (ctime filled with now if unset).
    pub fn header(&self) -> Header {
        Header {
            uuid: self.uuid,
            ctime: self.ctime.unwrap_or_else(|| chrono::Utc::now().timestamp()),
            configs: self.configs.clone(),
            devices: self.devices.clone(),
        }
    }

    /// Writes the header to `out` and returns the writer for the clusters.
    pub fn start<W: ArchiveOut>(self, mut out: W) -> Result<Writer<W>, FormatError> {
        let header = self.header();
        let bytes = header.encode()?;
        let header_len = bytes.len() as u64;
        let frame = out.write_unit(&[Bytes::from(bytes)])?;
        let index = if self.index {
            Some(IndexBuilder::new(&header, header_len, frame.is_some())?)
        } else {
            None
        };
        let devs = header
            .devices
            .iter()
            .map(|d| DevState {
                seen: ClusterBitmap::new(d.clusters()),
                archived: 0,
                zero_bytes: 0,
                dev: d.clone(),
            })
            .collect();
        Ok(Writer {
            out,
            uuid: header.uuid,
            devs,
            pending: Vec::with_capacity(self.per_extent),
            per_extent: self.per_extent,
            pos: header_len,
            header_len,
            poisoned: false,
            observer: None,
            extents: 0,
            index,
        })
    }
}

struct DevState {
    dev: Device,
    /// Clusters already archived (or pending).
    seen: ClusterBitmap,
    archived: u64,
    zero_bytes: u64,
}

struct Pending {
    info: BlockInfo,
    /// The cluster's bytes; `None` for an all-zero cluster.
    data: Option<Data>,
    /// Its digest, for the index.
    digest: Option<Digest>,
}

/// A pending cluster's bytes, in the form the caller had them.
enum Data {
    /// Its in-device bytes: the stored blocks are sliced out when the
    /// extent is written.
    InDevice(Bytes),
    /// Its stored blocks, as an extent holds them.
    Stored(Bytes),
}

/// Called after each extent is written with its archive offset and entries.
pub type ExtentObserver = Box<dyn FnMut(u64, &[BlockInfo]) + Send>;

/// Per-device progress, for `-v` output and summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStats {
    /// The device.
    pub dev: DevId,
    /// Its name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// In-device bytes of the clusters archived so far.
    pub transferred: u64,
    /// Of those, bytes in all-zero 4 KiB blocks (not stored).
    pub zero_bytes: u64,
}

/// Writes clusters of a started archive; see the module docs.
pub struct Writer<W: ArchiveOut> {
    out: W,
    uuid: Uuid,
    devs: Vec<DevState>,
    pending: Vec<Pending>,
    per_extent: usize,
    pos: u64,
    header_len: u64,
    poisoned: bool,
    observer: Option<ExtentObserver>,
    extents: u64,
    index: Option<IndexBuilder>,
}

impl<W: ArchiveOut> Writer<W> {
    /// The archive uuid.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Bytes written to the output so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Length of the header.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// The output.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// The output, mutably (e.g. to fsync a file).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Registers a function called after every extent write.
    pub fn set_extent_observer(&mut self, f: ExtentObserver) {
        self.observer = Some(f);
    }

    /// The device `dev`.
    pub fn device(&self, dev: DevId) -> Option<&Device> {
        self.devs.get(Self::index(dev)?).map(|d| &d.dev)
    }

    fn index(dev: DevId) -> Option<usize> {
        (dev.0 as usize).checked_sub(1)
    }

    fn check(&self, dev: DevId, cluster: u64) -> Result<usize, FormatError> {
        if self.poisoned {
            return Err(io::Error::other("an earlier write to the archive failed").into());
        }
        let idx = Self::index(dev)
            .filter(|&i| i < self.devs.len())
            .ok_or(FormatError::NoSuchDevice(dev))?;
        let d = &self.devs[idx];
        let clusters = d.dev.clusters();
        if cluster >= clusters {
            return Err(FormatError::ClusterOutOfRange {
                offset: 0,
                dev,
                cluster,
                clusters,
            });
        }
        if d.seen.get(cluster) {
            return Err(FormatError::DuplicateCluster {
                offset: 0,
                dev,
                cluster,
            });
        }
        Ok(idx)
    }

    /// Archives one cluster. `data` holds exactly the cluster's bytes inside
    /// the device: 64 KiB, or less for the last cluster of a device whose
    /// size is not a multiple of 64 KiB. All-zero 4 KiB blocks are not
    /// stored. Returns the cluster's mask.
    pub fn write_cluster(
        &mut self,
        dev: DevId,
        cluster: u64,
        data: Bytes,
    ) -> Result<u16, FormatError> {
        let idx = self.check(dev, cluster)?;
        let expected = self.devs[idx].dev.cluster_len(cluster);
        if data.len() != expected {
            return Err(FormatError::ClusterLength {
                dev,
                cluster,
                expected,
                got: data.len(),
            });
        }
        let mask = block_mask(&data);
        let zero = (expected as u64).saturating_sub(stored_len(mask) as u64);
        let digest = (mask != 0 && self.index.is_some()).then(|| cluster_digest(&data));
        self.push(
            idx,
            cluster,
            mask,
            (mask != 0).then_some(Data::InDevice(data)),
            digest,
            expected as u64,
            zero,
        )?;
        Ok(mask)
    }

    /// Archives one cluster given as stored: its `mask` and its stored
    /// 4 KiB blocks, as an extent holds them (e.g. read from another
    /// archive), with the digest of its restored bytes when the caller
    /// knows it. Nothing is zero-scanned, and the digest is computed (from
    /// the stored blocks) only when the index needs one and none is given.
    pub fn write_stored_cluster(
        &mut self,
        dev: DevId,
        cluster: u64,
        mask: u16,
        stored: Bytes,
        digest: Option<Digest>,
    ) -> Result<(), FormatError> {
        let idx = self.check(dev, cluster)?;
        let d = &self.devs[idx].dev;
        let len = d.cluster_len(cluster);
        if mask & !valid_mask(len) != 0 {
            return Err(FormatError::MaskPastEnd {
                offset: 0,
                dev,
                cluster,
                mask,
                size: d.size,
            });
        }
        if stored.len() != stored_len(mask) {
            return Err(FormatError::ClusterLength {
                dev,
                cluster,
                expected: stored_len(mask),
                got: stored.len(),
            });
        }
        let zero = (len as u64).saturating_sub(stored_len(mask) as u64);
        let digest = (mask != 0 && self.index.is_some())
            .then(|| digest.unwrap_or_else(|| stored_digest(mask, &stored, len)));
        let data = (mask != 0).then_some(Data::Stored(stored));
        self.push(idx, cluster, mask, data, digest, len as u64, zero)
    }

    /// Records how device `dev`'s clusters came to be in a backup chain,
    /// for the index (`format/INDEX.md` §1.2); any time before
    /// [`finish_indexed`](Self::finish_indexed). Without an index it is
    /// not recorded anywhere.
    pub fn set_device_chain(&mut self, dev: DevId, chain: DeviceChain) {
        if let Some(ix) = self.index.as_mut() {
            ix.set_chain(dev, chain);
        }
    }

    /// Archives one all-zero cluster (mask 0, no payload).
    pub fn write_zero_cluster(&mut self, dev: DevId, cluster: u64) -> Result<(), FormatError> {
        let idx = self.check(dev, cluster)?;
        let len = self.devs[idx].dev.cluster_len(cluster) as u64;
        self.push(idx, cluster, 0, None, None, len, len)
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        idx: usize,
        cluster: u64,
        mask: u16,
        data: Option<Data>,
        digest: Option<Digest>,
        len: u64,
        zero: u64,
    ) -> Result<(), FormatError> {
        // Like Proxmox: flush a full extent lazily, before adding to it, so
        // the last extent is never empty when there are clusters.
        if self.pending.len() >= self.per_extent {
            self.write_extent()?;
        }
        let d = &mut self.devs[idx];
        d.seen.set(cluster);
        d.archived += len;
        d.zero_bytes += zero;
        self.pending.push(Pending {
            info: BlockInfo {
                mask,
                dev: d.dev.id.0,
                cluster: cluster as u32,
            },
            data,
            digest,
        });
        Ok(())
    }

    /// Writes the buffered clusters as a (short) extent now, if there are
    /// any. Used to make acknowledged data durable on request.
    pub fn flush_extent(&mut self) -> Result<(), FormatError> {
        if !self.pending.is_empty() {
            self.write_extent()?;
        }
        Ok(())
    }

    /// [`flush_extent`](Self::flush_extent), then flushes the output.
    pub fn flush(&mut self) -> Result<(), FormatError> {
        self.flush_extent()?;
        self.out.flush_units()?;
        Ok(())
    }

    fn write_extent(&mut self) -> Result<(), FormatError> {
        let entries: Vec<BlockInfo> = self.pending.iter().map(|p| p.info).collect();
        let head = ExtentHeader::encode(&self.uuid, &entries);
        let mut parts = Vec::with_capacity(1 + 2 * self.pending.len());
        parts.push(Bytes::copy_from_slice(&head));
        let mut len = head.len();
        for p in &self.pending {
            match &p.data {
                Some(Data::InDevice(d)) => len += push_stored(&mut parts, d, p.info.mask),
                Some(Data::Stored(d)) => {
                    parts.push(d.clone());
                    len += d.len();
                }
                None => {}
            }
        }
        let at = self.pos;
        let frame = match self.out.write_unit(&parts) {
            Ok(f) => f,
            Err(e) => {
                self.poisoned = true;
                return Err(e.into());
            }
        };
        if let Some(ix) = self.index.as_mut() {
            let digests: Vec<Digest> = self.pending.iter().filter_map(|p| p.digest).collect();
            ix.add_extent(at, frame.unwrap_or(NO_FRAME), &entries, &digests)?;
        }
        self.pos += len as u64;
        self.extents += 1;
        self.pending.clear();
        if let Some(f) = self.observer.as_mut() {
            f(at, &entries);
        }
        Ok(())
    }

    /// Devices with clusters not yet archived.
    pub fn missing(&self) -> Vec<MissingClusters> {
        self.devs
            .iter()
            .filter_map(|d| {
                Some(MissingClusters {
                    first: d.seen.first_clear()?,
                    dev: d.dev.id,
                    name: d.dev.name.clone(),
                    missing: d.seen.len() - d.seen.count(),
                })
            })
            .collect()
    }

    /// Bytes in zero blocks over all devices so far (not stored).
    pub fn zero_bytes(&self) -> u64 {
        self.devs.iter().map(|d| d.zero_bytes).sum()
    }

    /// Progress of every device.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.devs
            .iter()
            .map(|d| DeviceStats {
                dev: d.dev.id,
                name: d.dev.name.clone(),
                size: d.dev.size,
                transferred: d.archived,
                zero_bytes: d.zero_bytes,
            })
            .collect()
    }

    /// Completes the archive: checks that every cluster of every device was
    /// written, writes the last extent, flushes the output and returns it.
    /// The last extent is written when clusters are pending, and also when
    /// no extent was written at all (an archive without devices is a header
    /// plus one empty extent, as Proxmox writes it).
    ///
    /// On error nothing more is written, so the output lacks its last
    /// extent and a strict reader reports the missing clusters.
    pub fn finish(self) -> Result<W, FormatError> {
        Ok(self.finish_indexed()?.0)
    }

    /// [`finish`](Self::finish), and the encoded archive index when the
    /// writer was built with [`WriterBuilder::index`].
    pub fn finish_indexed(mut self) -> Result<(W, Option<Vec<u8>>), FormatError> {
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(FormatError::Unfinished(missing));
        }
        if self.poisoned {
            return Err(io::Error::other("an earlier write to the archive failed").into());
        }
        if !self.pending.is_empty() || self.extents == 0 {
            self.write_extent()?;
        }
        self.out.flush_units()?;
        let index = match self.index.take() {
            Some(ix) => Some(ix.finish()?),
            None => None,
        };
        Ok((self.out, index))
    }
}

/// Appends the stored blocks of one cluster to `parts`, one slice per run
/// of stored blocks (a full cluster is one slice, no copy); returns their
/// length on disk (a multiple of 4 KiB).
fn push_stored(parts: &mut Vec<Bytes>, data: &Bytes, mask: u16) -> usize {
    for run in stored_runs(mask) {
        let r = run.in_device(data.len());
        let pad = run.payload_range().len() - r.len();
        parts.push(data.slice(r));
        if pad > 0 {
            // The block straddling the device end: pad with zeros.
            parts.push(Bytes::from_static(&ZERO_BLOCK[..pad]));
        }
    }
    stored_len(mask)
}

/// `write_all` for a list of slices (std's `write_all_vectored` is unstable).
pub fn write_all_vectored<W: Write + ?Sized>(
    out: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match out.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_blocks_of_a_partial_last_cluster() {
        let mut data = vec![0u8; 4096 + 512];
        data[0] = 1;
        data[4096 + 10] = 2;
        let mask = block_mask(&data);
        assert_eq!(mask, 0b11);
        let mut slices = Vec::new();
        assert_eq!(
            push_stored(&mut slices, &Bytes::from(data.clone()), mask),
            8192
        );
        assert_eq!(slices.len(), 2, "one run, then the padding");
        let flat: Vec<u8> = slices.iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(flat.len(), 8192);
        assert_eq!(&flat[..data.len()], &data[..]);
        assert!(flat[data.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn writer_errors() {
        let mut b = WriterBuilder::new();
        assert!(matches!(
            b.add_device("z", 0),
            Err(FormatError::ZeroSizeDevice(_))
        ));
        let d = b.add_device("d", 65536 + 512).unwrap();
        assert!(matches!(
            b.add_device("d", 1),
            Err(FormatError::DuplicateName { .. })
        ));
        assert!(matches!(
            b.add_config("big", &vec![0; 65536]),
            Err(FormatError::BlobTooLarge { .. })
        ));
        let mut w = b.start(Vec::new()).unwrap();
        assert!(matches!(
            w.write_cluster(d, 2, Bytes::from(vec![0; 65536])),
            Err(FormatError::ClusterOutOfRange { .. })
        ));
        assert!(matches!(
            w.write_cluster(d, 1, Bytes::from(vec![0; 65536])),
            Err(FormatError::ClusterLength { .. })
        ));
        assert!(matches!(
            w.write_zero_cluster(DevId(2), 0),
            Err(FormatError::NoSuchDevice(_))
        ));
        w.write_zero_cluster(d, 1).unwrap();
        assert!(matches!(
            w.write_zero_cluster(d, 1),
            Err(FormatError::DuplicateCluster { .. })
        ));
        let Err(FormatError::Unfinished(m)) = w.finish() else {
            panic!("finish must refuse an incomplete archive")
        };
        assert_eq!((m[0].missing, m[0].first), (1, 0));
    }

    #[test]
    fn stored_clusters_make_the_same_archive_and_index() {
        // The last cluster straddles a block: 4096 + 100 bytes.
        let size = 2 * 65536 + 4096 + 100;
        let mut a = vec![0u8; 65536];
        a[5000] = 1;
        let b = vec![0u8; 65536];
        let mut c = vec![7u8; 4196];
        c[..4096].fill(0);
        let clusters = [a, b, c];
        let archive = |stored: bool| {
            let mut builder = WriterBuilder::new().uuid(Uuid::nil()).ctime(0).index(true);
            let d = builder.add_device("d", size).unwrap();
            let mut w = builder.start(Vec::new()).unwrap();
            for (i, data) in clusters.iter().enumerate() {
                let data = Bytes::from(data.clone());
                if stored {
                    let mask = block_mask(&data);
                    let mut parts = Vec::new();
                    push_stored(&mut parts, &data, mask);
                    let blocks: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
                    // The digest is computed when not given.
                    let digest = (i == 0).then(|| cluster_digest(&data));
                    w.write_stored_cluster(d, i as u64, mask, Bytes::from(blocks), digest)
                        .unwrap();
                } else {
                    w.write_cluster(d, i as u64, data).unwrap();
                }
            }
            w.finish_indexed().unwrap()
        };
        let (plain, plain_index) = archive(false);
        let (stored, stored_index) = archive(true);
        assert_eq!(plain, stored);
        assert_eq!(plain_index, stored_index);
        // Refusals: blocks past the end, a wrong payload length.
        let mut builder = WriterBuilder::new();
        let d = builder.add_device("d", size).unwrap();
        let mut w = builder.start(Vec::new()).unwrap();
        assert!(matches!(
            w.write_stored_cluster(d, 2, 0b100, Bytes::from(vec![0; 4096]), None),
            Err(FormatError::MaskPastEnd { .. })
        ));
        assert!(matches!(
            w.write_stored_cluster(d, 0, 0b11, Bytes::from(vec![0; 4096]), None),
            Err(FormatError::ClusterLength { .. })
        ));
    }

    #[test]
    fn limits() {
        let mut b = WriterBuilder::new();
        for i in 0..VMA_MAX_DEVICES {
            b.add_device(&format!("d{i}"), 1).unwrap();
        }
        assert!(matches!(
            b.add_device("x", 1),
            Err(FormatError::TooManyDevices { .. })
        ));
        for i in 0..VMA_MAX_CONFIGS {
            b.add_config(&format!("c{i}"), b"x").unwrap();
        }
        assert!(matches!(
            b.add_config("x", b"x"),
            Err(FormatError::TooManyConfigs { .. })
        ));
        assert!(WriterBuilder::new().clusters_per_extent(60).is_err());
        assert!(WriterBuilder::new().clusters_per_extent(59).is_ok());
    }
}
