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

/// Whether a read may wait for the disk or a decompression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
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
    /// extent `x`. With [`Wait::No`], `None` when getting them would wait
    /// (file pages not cached, a frame not decompressed yet).
    fn stream_bytes(
        &self,
        x: usize,
        offset: u64,
        len: usize,
        wait: Wait,
    ) -> Result<Option<Bytes>, ArchiveError> {
        let truncated = || -> ArchiveError {
            FormatError::Truncated {
                offset,
                what: "extent",
                need: len as u64,
                got: self.file.file().len().saturating_sub(offset),
            }
            .into()
        };
        if let Some(m) = &self.map {
            // Touching a mapping may wait for the disk.
            if wait == Wait::No {
                return Ok(None);
            }
            return m.bytes(offset, len).map(Some).ok_or_else(truncated);
        }
        match self.file.layout() {
            Layout::Plain if wait == Wait::No => {
                let mut buf = vec![0; len];
                match self.file.file().read_at_cached(&mut buf, offset)? {
                    None => Ok(None),
                    Some(got) if got < len => Err(truncated()),
                    Some(_) => Ok(Some(Bytes::from(buf))),
                }
            }
            Layout::Plain => self
                .file
                .file()
                .read_vec(offset, len)?
                .map(|v| Some(Bytes::from(v)))
                .ok_or_else(truncated),
            Layout::Seekable { frames, .. } => {
                let frame = self.index.extents[x].frame;
                let bytes = if wait == Wait::No {
                    match self.cache.peek(frame) {
                        Some(b) => b,
                        None => return Ok(None),
                    }
                } else {
                    self.cache.get(frame, || {
                        read_frame(
                            self.file.file(),
                            frames,
                            frame,
                            || format!("extent {x}"),
                            self.cache.buffers(),
                        )
                    })?
                };
                let (_, start, _) = frames.frame(frame as usize).expect("checked at open");
                let at = (offset - start) as usize;
                Ok(Some(bytes.slice(at..at + len)))
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
            let (x, len) = (loc.extent as usize, stored_len(loc.mask));
            self.stream_bytes(x, loc.stream_offset, len, Wait::Yes)?
                .expect("a blocking read has its bytes")
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
        let done = self.read_into_waiting(dev, offset, out, Wait::Yes)?;
        debug_assert!(done, "a blocking read completes");
        Ok(())
    }

    /// [`read_into`](Self::read_into) if everything it needs is in memory
    /// already (file pages in the page cache, frames in the frame cache),
    /// so that it never waits for the disk or a decompression: for callers
    /// that must not block, before they hand the read to a thread that
    /// may. `Ok(false)` when something is not (`out` is then unspecified).
    pub fn read_into_if_cached(
        &self,
        dev: DevId,
        offset: u64,
        out: &mut [u8],
    ) -> Result<bool, ArchiveError> {
        self.read_into_waiting(dev, offset, out, Wait::No)
    }

    fn read_into_waiting(
        &self,
        dev: DevId,
        offset: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, ArchiveError> {
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
                if !self.read_in_place(
                    dev,
                    size,
                    cluster..next,
                    loc.stream_offset,
                    &mut out[pos..pos + run],
                    wait,
                )? {
                    return Ok(false);
                }
                pos += run;
                continue;
            }
            let part = &mut out[pos..pos + n];
            if !self.read_cluster_part(dev, size, cluster, &loc, in_cluster, part, wait)? {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }

    /// Reads `clusters` of `dev`, stored back to back from `stream_offset`
    /// with every block, straight into `out`, and checks each. `false`
    /// when [`Wait::No`] and the bytes are not cached.
    fn read_in_place(
        &self,
        dev: DevId,
        size: u64,
        clusters: Range<u64>,
        stream_offset: u64,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, ArchiveError> {
        let got = match wait {
            Wait::Yes => self.file.file().read_at(out, stream_offset)?,
            Wait::No => match self.file.file().read_at_cached(out, stream_offset)? {
                Some(got) => got,
                None => return Ok(false),
            },
        };
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
            return Ok(true);
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
        Ok(true)
    }

    /// The bytes of cluster `cluster` (at `loc`) from `at` on into `out`;
    /// see [`read_into`](Self::read_into). `false` when [`Wait::No`] and
    /// the bytes are not in memory.
    #[allow(clippy::too_many_arguments)]
    fn read_cluster_part(
        &self,
        dev: DevId,
        size: u64,
        cluster: u64,
        loc: &Location,
        at: usize,
        out: &mut [u8],
        wait: Wait,
    ) -> Result<bool, ArchiveError> {
        if loc.mask == 0 {
            out.fill(0);
            return Ok(true);
        }
        let len = cluster_len(size, cluster);
        let (x, stored_bytes) = (loc.extent as usize, stored_len(loc.mask));
        let Some(stored) = self.stream_bytes(x, loc.stream_offset, stored_bytes, wait)? else {
            return Ok(false);
        };
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
        Ok(true)
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

    /// The frames holding the stored data of clusters `clusters` of `dev`,
    /// in order, each once, up to `budget` bytes of decompressed frames
    /// (at least one); empty for a plain archive, which has no frames.
    pub fn frames_holding(&self, dev: DevId, clusters: Range<u64>, budget: u64) -> Vec<u32> {
        let Layout::Seekable { frames: table, .. } = self.file.layout() else {
            return Vec::new();
        };
        let clusters = clusters.start..clusters.end.min(clusters_of(self.device_size(dev)));
        let mut frames: Vec<u32> = Vec::new();
        let mut bytes = 0u64;
        for c in clusters {
            let Some(loc) = self.index.locate(dev, c) else {
                break;
            };
            if loc.mask == 0 || frames.last() == Some(&loc.frame) || frames.contains(&loc.frame) {
                continue;
            }
            let Some((_, _, entry)) = table.frame(loc.frame as usize) else {
                break;
            };
            bytes += u64::from(entry.decompressed);
            if bytes > budget && !frames.is_empty() {
                break;
            }
            frames.push(loc.frame);
        }
        frames
    }

    /// True when frame `frame` is decompressed in the frame cache now (not
    /// merely being loaded).
    pub fn frame_loaded(&self, frame: u32) -> bool {
        self.cache.peek(frame).is_some()
    }

    /// Decompresses frame `frame` into the frame cache (blocks; waits for
    /// a load of it already under way instead of starting another).
    pub fn load_frame(&self, frame: u32) -> Result<(), ArchiveError> {
        let Layout::Seekable { frames, .. } = self.file.layout() else {
            return Ok(());
        };
        if frames.frame(frame as usize).is_none() {
            return Ok(());
        }
        self.cache.get(frame, || {
            read_frame(
                self.file.file(),
                frames,
                frame,
                || self.file.frame_holds(Some(&self.index), frame),
                self.cache.buffers(),
            )
        })?;
        Ok(())
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
        let bytes = self
            .stream_bytes(x, rec.stream_offset, rec.len() as usize, Wait::Yes)?
            .expect("a blocking read has its bytes");
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
