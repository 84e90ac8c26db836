//! [`RandomArchive`]: an archive file read by cluster or by extent, from
//! any number of threads at once. A plain `.vma` is read with `pread`
//! where its index (the sidecar, or else a map made from its extent
//! headers) says; a seekable `.vma.zst` one frame at a time, through a
//! shared [`FrameCache`]. Every data cluster read is checked against its
//! digest when the index has digests: a mismatch is an error naming the
//! device and cluster, never wrong data.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::cache::{DEFAULT_CACHE_BYTES, FrameCache};
use super::check::{check_cluster, check_extent};
use super::counted::Mapping;
use super::error::ArchiveError;
use super::file::{FileArchive, Layout};
use super::frame::read_frame;
use super::source::{Input, open};
use crate::vma::cluster::{cluster_len, clusters_of, stored_len, valid_mask};
use crate::vma::consts::{VMA_CLUSTER_SIZE, VMA_EXTENT_HEADER_SIZE};
use crate::vma::extent::{ExtentHeader, payload_ranges};
use crate::vma::index::{Digest, Location};
use crate::vma::reader::ClusterData;
use crate::vma::{ArchiveIndex, DevId, FormatError, Header};

/// One cluster as stored: its mask and its stored 4 KiB blocks.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Device.
    pub dev: DevId,
    /// Cluster number.
    pub cluster: u64,
    /// Stored-block mask (0: all zero, nothing stored).
    pub mask: u16,
    /// Bytes of the cluster inside the device (64 KiB except at the end).
    pub len: usize,
    /// The stored blocks, in ascending block order.
    pub stored: Bytes,
    /// The digest it was checked against (`None`: all zero, or the index
    /// has no digests).
    pub digest: Option<Digest>,
}

impl Cluster {
    /// The cluster borrowed, with [`ClusterData::runs`] (the stored runs
    /// and where they go) and [`ClusterData::expand_into`].
    pub fn data(&self) -> ClusterData<'_> {
        ClusterData {
            dev: self.dev,
            cluster: self.cluster,
            mask: self.mask,
            len: self.len,
            stored: &self.stored,
        }
    }
}

/// An archive file read at random; see the module docs.
///
/// `Send + Sync`: one instance serves any number of threads (checked
/// below at compile time).
pub struct RandomArchive {
    file: FileArchive,
    index: Arc<ArchiveIndex>,
    cache: FrameCache,
    /// A plain archive mapped into memory ([`RandomArchive::mapped`]).
    map: Option<Mapping>,
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<RandomArchive>();
};

impl RandomArchive {
    /// Opens `path` for reading at random: a plain `.vma` (with or without
    /// its index) or a seekable `.vma.zst` with its index. Anything else
    /// is [`ArchiveError::NotRandomAccess`].
    pub fn open(path: &str) -> Result<RandomArchive, ArchiveError> {
        match open(path)? {
            Input::File(f) => RandomArchive::from_file(f),
            Input::Stream(s) => Err(ArchiveError::NotRandomAccess(format!(
                "{path} is a {} stream without a seek table",
                s.format.name()
            ))),
        }
    }

    /// Reads `file` at random: loads its index, or maps a plain archive
    /// from its extent headers.
    pub fn from_file(file: FileArchive) -> Result<RandomArchive, ArchiveError> {
        let index = match (file.load_index()?, file.layout()) {
            (Some(ix), _) => ix,
            (None, Layout::Plain) => file.map_extents()?,
            (None, Layout::Seekable { .. }) => {
                return Err(ArchiveError::NotRandomAccess(format!(
                    "{} has a seek table but no archive index",
                    file.path().display()
                )));
            }
        };
        Ok(RandomArchive {
            file,
            index: Arc::new(index),
            cache: FrameCache::new(DEFAULT_CACHE_BYTES),
            map: None,
        })
    }

    /// Reads a plain archive through a read-only mapping instead of
    /// `pread`: what is read is not copied out of the page cache (a reader
    /// that writes it elsewhere saves one copy of every byte). See
    /// [`Mapping`] for the one condition: the file must not shrink
    /// meanwhile. A `.vma.zst` is unchanged (its frames are decompressed
    /// anyway); so is a plain archive that cannot be mapped.
    pub fn mapped(mut self) -> Self {
        if matches!(self.file.layout(), Layout::Plain) {
            self.map = self.file.file().map().ok();
        }
        self
    }

    /// Keeps up to `bytes` of decompressed frames (default
    /// [`DEFAULT_CACHE_BYTES`]).
    pub fn with_cache_size(mut self, bytes: usize) -> Self {
        self.cache = FrameCache::new(bytes);
        self
    }

    /// The archive header.
    pub fn header(&self) -> &Header {
        self.file.header()
    }

    /// The index (with digests when the archive has one; a map from the
    /// extent headers otherwise).
    pub fn index(&self) -> &Arc<ArchiveIndex> {
        &self.index
    }

    /// The file.
    pub fn file(&self) -> &FileArchive {
        &self.file
    }

    /// True when every data cluster read is checked against a digest.
    pub fn has_digests(&self) -> bool {
        self.index.has_digests()
    }

    /// Bytes read from the file so far, by every thread (opening included).
    pub fn bytes_read(&self) -> u64 {
        self.file.bytes_read()
    }

    /// Frames decompressed so far.
    pub fn frames_decompressed(&self) -> u64 {
        self.cache.loads()
    }

    /// The bytes of the plain stream from `offset`, `len` long, all inside
    /// extent `x`.
    fn stream_bytes(&self, x: usize, offset: u64, len: usize) -> Result<Bytes, ArchiveError> {
        if let Some(m) = &self.map {
            return m.bytes(offset, len).ok_or_else(|| {
                FormatError::Truncated {
                    offset,
                    what: "extent",
                    need: len as u64,
                    got: self.file.file().len().saturating_sub(offset),
                }
                .into()
            });
        }
        match self.file.layout() {
            Layout::Plain => self
                .file
                .file()
                .read_vec(offset, len)?
                .map(Bytes::from)
                .ok_or_else(|| {
                    FormatError::Truncated {
                        offset,
                        what: "extent",
                        need: len as u64,
                        got: self.file.file().len().saturating_sub(offset),
                    }
                    .into()
                }),
            Layout::Seekable { frames, .. } => {
                let frame = self.index.extents[x].frame;
                let bytes = self.cache.get(frame, || {
                    read_frame(
                        self.file.file(),
                        frames,
                        frame,
                        || format!("extent {x}"),
                        self.cache.buffers(),
                    )
                })?;
                let (_, start, _) = frames.frame(frame as usize).expect("checked at open");
                let at = (offset - start) as usize;
                Ok(bytes.slice(at..at + len))
            }
        }
    }

    /// Size of device `dev` (0 when there is none).
    fn device_size(&self, dev: DevId) -> u64 {
        self.header().device(dev).map_or(0, |d| d.size)
    }

    /// Where cluster `cluster` of `dev` (a device of `size` bytes) is.
    fn locate(&self, dev: DevId, size: u64, cluster: u64) -> Result<Location, ArchiveError> {
        self.index.locate(dev, cluster).ok_or_else(|| {
            ArchiveError::Format(FormatError::ClusterOutOfRange {
                offset: 0,
                dev,
                cluster,
                clusters: clusters_of(size),
            })
        })
    }

    /// Cluster `cluster` of `dev`, checked against its digest.
    pub fn read_cluster(&self, dev: DevId, cluster: u64) -> Result<Cluster, ArchiveError> {
        let size = self.device_size(dev);
        let loc = self.locate(dev, size, cluster)?;
        let stored = if loc.mask == 0 {
            Bytes::new()
        } else {
            self.stream_bytes(loc.extent as usize, loc.stream_offset, stored_len(loc.mask))?
        };
        let c = Cluster {
            dev,
            cluster,
            mask: loc.mask,
            len: cluster_len(size, cluster),
            stored,
            digest: loc.digest,
        };
        if let Some(want) = &loc.digest {
            check_cluster(self.header(), &c.data(), want)?;
        }
        Ok(c)
    }

    /// Bytes `[offset, offset + out.len())` of device `dev` as a restore
    /// writes them: zeros for zero clusters and zero blocks, stored data
    /// elsewhere. Every data cluster touched is checked against its digest
    /// (so the whole cluster is read however little of it is wanted); a
    /// mismatch is [`ArchiveError::Digest`] and `out` is then unspecified.
    pub fn read_into(&self, dev: DevId, offset: u64, out: &mut [u8]) -> Result<(), ArchiveError> {
        let size = self.device_size(dev);
        let cluster_bytes = VMA_CLUSTER_SIZE as u64;
        let plain = matches!(self.file.layout(), Layout::Plain);
        let mut pos = 0usize;
        while pos < out.len() {
            let at = offset + pos as u64;
            let cluster = at / cluster_bytes;
            let in_cluster = (at % cluster_bytes) as usize;
            let n = (VMA_CLUSTER_SIZE - in_cluster).min(out.len() - pos);
            let loc = self.locate(dev, size, cluster)?;
            let in_place =
                |loc: &Location, len: usize| loc.mask != 0 && loc.mask == valid_mask(len);
            if plain && n == cluster_len(size, cluster) && in_place(&loc, n) {
                // A plain archive's cluster with every block stored is its
                // own in-device bytes, and the next clusters often follow
                // it in the file: read the whole run in place, in one call.
                let mut run = n;
                let mut next = cluster + 1;
                loop {
                    let len = cluster_len(size, next);
                    if len == 0 || run + len > out.len() - pos {
                        break;
                    }
                    let l = self.locate(dev, size, next)?;
                    if !in_place(&l, len) || l.stream_offset != loc.stream_offset + run as u64 {
                        break;
                    }
                    run += len;
                    next += 1;
                }
                self.read_in_place(
                    dev,
                    size,
                    cluster..next,
                    loc.stream_offset,
                    &mut out[pos..pos + run],
                )?;
                pos += run;
                continue;
            }
            self.read_cluster_part(dev, size, cluster, &loc, in_cluster, &mut out[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    /// Reads `clusters` of `dev`, stored back to back from `stream_offset`
    /// with every block, straight into `out`, and checks each.
    fn read_in_place(
        &self,
        dev: DevId,
        size: u64,
        clusters: Range<u64>,
        stream_offset: u64,
        out: &mut [u8],
    ) -> Result<(), ArchiveError> {
        let got = self.file.file().read_at(out, stream_offset)?;
        if got < out.len() {
            return Err(FormatError::Truncated {
                offset: stream_offset,
                what: "cluster",
                need: out.len() as u64,
                got: got as u64,
            }
            .into());
        }
        if !self.has_digests() {
            return Ok(());
        }
        let mut at = 0;
        for cluster in clusters {
            let loc = self.locate(dev, size, cluster)?;
            let len = cluster_len(size, cluster);
            let c = ClusterData {
                dev,
                cluster,
                mask: loc.mask,
                len,
                stored: &out[at..at + len],
            };
            check_cluster(
                self.header(),
                &c,
                &loc.digest.expect("an index with digests"),
            )?;
            at += len;
        }
        Ok(())
    }

    /// The bytes of cluster `cluster` (at `loc`) from `at` on into `out`;
    /// see [`read_into`](Self::read_into).
    fn read_cluster_part(
        &self,
        dev: DevId,
        size: u64,
        cluster: u64,
        loc: &Location,
        at: usize,
        out: &mut [u8],
    ) -> Result<(), ArchiveError> {
        if loc.mask == 0 {
            out.fill(0);
            return Ok(());
        }
        let len = cluster_len(size, cluster);
        let stored =
            self.stream_bytes(loc.extent as usize, loc.stream_offset, stored_len(loc.mask))?;
        let c = ClusterData {
            dev,
            cluster,
            mask: loc.mask,
            len,
            stored: &stored,
        };
        if let Some(want) = &loc.digest {
            check_cluster(self.header(), &c, want)?;
        }
        if at == 0 && out.len() == len {
            c.expand_into(out);
        } else {
            let mut whole = [0u8; VMA_CLUSTER_SIZE];
            c.expand_into(&mut whole);
            out.copy_from_slice(&whole[at..at + out.len()]);
        }
        Ok(())
    }

    /// Warms what reading clusters `clusters` of `dev` will need, up to
    /// `budget` bytes of it: a seekable archive's frames holding them are
    /// decompressed into the cache (unless held or loading already; this
    /// blocks while they decompress), a plain archive's stored blocks are
    /// read ahead by the kernel (`POSIX_FADV_WILLNEED`, at once). Returns
    /// the frames it decompressed.
    pub fn prefetch(
        &self,
        dev: DevId,
        clusters: Range<u64>,
        budget: u64,
    ) -> Result<usize, ArchiveError> {
        let size = self.device_size(dev);
        let clusters = clusters.start..clusters.end.min(clusters_of(size));
        match self.file.layout() {
            Layout::Plain => {
                // Stored blocks of consecutive clusters are often adjacent
                // in the file: one hint per adjacent run.
                let mut run: Option<(u64, u64)> = None;
                let mut advised = 0u64;
                for c in clusters {
                    let loc = self.locate(dev, size, c)?;
                    let len = stored_len(loc.mask) as u64;
                    if len == 0 {
                        continue;
                    }
                    if advised >= budget {
                        break;
                    }
                    advised += len;
                    run = match run {
                        Some((start, end)) if end == loc.stream_offset => Some((start, end + len)),
                        Some((start, end)) => {
                            self.file.file().advise_willneed(start, end - start);
                            Some((loc.stream_offset, loc.stream_offset + len))
                        }
                        None => Some((loc.stream_offset, loc.stream_offset + len)),
                    };
                }
                if let Some((start, end)) = run {
                    self.file.file().advise_willneed(start, end - start);
                }
                Ok(0)
            }
            Layout::Seekable { frames, .. } => {
                let mut loaded = 0;
                let mut warmed = 0u64;
                let mut last = None;
                for c in clusters {
                    let loc = self.locate(dev, size, c)?;
                    if loc.mask == 0 || last == Some(loc.frame) {
                        continue;
                    }
                    last = Some(loc.frame);
                    let (_, _, entry) = frames.frame(loc.frame as usize).expect("checked at open");
                    warmed += u64::from(entry.decompressed);
                    if warmed > budget {
                        break;
                    }
                    if self.cache.contains(loc.frame) {
                        continue;
                    }
                    let x = loc.extent;
                    self.cache.get(loc.frame, || {
                        let holds = || format!("extent {x}");
                        read_frame(
                            self.file.file(),
                            frames,
                            loc.frame,
                            holds,
                            self.cache.buffers(),
                        )
                    })?;
                    loaded += 1;
                }
                Ok(loaded)
            }
        }
    }

    /// Bytes of decompressed frames the cache keeps (0 for a plain
    /// archive, which has no frames).
    pub fn cache_budget(&self) -> usize {
        match self.file.layout() {
            Layout::Plain => 0,
            Layout::Seekable { .. } => self.cache.budget(),
        }
    }

    /// The clusters of extent `x` whose device `want` accepts, after
    /// checking the extent header against the index and each returned
    /// data cluster against its digest. Reads the whole extent.
    pub fn read_extent(
        &self,
        x: usize,
        want: impl Fn(DevId) -> bool,
    ) -> Result<Vec<Cluster>, ArchiveError> {
        self.read_extent_clusters(x, |dev, _| want(dev))
    }

    /// [`read_extent`](Self::read_extent) for the clusters `want` accepts
    /// by device and cluster number: only those are checked and returned.
    pub fn read_extent_clusters(
        &self,
        x: usize,
        want: impl Fn(DevId, u64) -> bool,
    ) -> Result<Vec<Cluster>, ArchiveError> {
        let rec = &self.index.extents[x];
        let bytes = self.stream_bytes(x, rec.stream_offset, rec.len() as usize)?;
        let head: &[u8; VMA_EXTENT_HEADER_SIZE] = bytes[..VMA_EXTENT_HEADER_SIZE]
            .try_into()
            .expect("an extent has a header");
        let ext = ExtentHeader::decode(head, &self.header().uuid, rec.stream_offset)?;
        let entries: Vec<_> = ext.entries().map(|(_, e)| e).collect();
        check_extent(&self.index, x, rec.stream_offset, &entries)?;
        let payload = bytes.slice(VMA_EXTENT_HEADER_SIZE..);
        let digests = self.index.extent_digests(x);
        let mut data = 0;
        let mut out = Vec::new();
        for (e, range) in payload_ranges(&entries) {
            let digest = (e.mask != 0).then(|| digests.get(data)).flatten();
            data += usize::from(e.mask != 0);
            let dev = DevId(e.dev);
            if !want(dev, u64::from(e.cluster)) {
                continue;
            }
            let size = self.header().device(dev).map_or(0, |d| d.size);
            let c = Cluster {
                dev,
                cluster: u64::from(e.cluster),
                mask: e.mask,
                len: cluster_len(size, u64::from(e.cluster)),
                stored: payload.slice(range),
                digest: digest.copied(),
            };
            if let Some(d) = digest {
                check_cluster(self.header(), &c.data(), d)?;
            }
            out.push(c);
        }
        Ok(out)
    }
}
