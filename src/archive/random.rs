//! [`RandomArchive`]: an archive file read by cluster or by extent, from
//! any number of threads at once. A plain `.vma` is read with `pread`
//! where its index (the sidecar, or else a map made from its extent
//! headers) says; a seekable `.vma.zst` one frame at a time, through a
//! shared [`FrameCache`]. Every data cluster read is checked against its
//! digest when the index has digests: a mismatch is an error naming the
//! device and cluster, never wrong data.

use std::sync::Arc;

use bytes::Bytes;

use super::cache::{DEFAULT_CACHE_BYTES, FrameCache};
use super::check::{check_cluster, check_extent};
use super::counted::Mapping;
use super::error::ArchiveError;
use super::file::{FileArchive, Layout};
use super::frame::read_frame;
use super::source::{Input, open};
use crate::vma::cluster::{cluster_len, stored_len};
use crate::vma::consts::VMA_EXTENT_HEADER_SIZE;
use crate::vma::extent::{ExtentHeader, payload_ranges};
use crate::vma::index::Digest;
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
                    read_frame(self.file.file(), frames, frame, || format!("extent {x}"))
                })?;
                let (_, start, _) = frames.frame(frame as usize).expect("checked at open");
                let at = (offset - start) as usize;
                Ok(bytes.slice(at..at + len))
            }
        }
    }

    /// Cluster `cluster` of `dev`, checked against its digest.
    pub fn read_cluster(&self, dev: DevId, cluster: u64) -> Result<Cluster, ArchiveError> {
        let size = self.header().device(dev).map_or(0, |d| d.size);
        let loc = self.index.locate(dev, cluster).ok_or_else(|| {
            ArchiveError::Format(FormatError::ClusterOutOfRange {
                offset: 0,
                dev,
                cluster,
                clusters: crate::vma::cluster::clusters_of(size),
            })
        })?;
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
