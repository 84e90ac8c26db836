//! Checking what was read against the index: that an extent is where the
//! index says with the entries it says (else the index is stale), and
//! that each data cluster's bytes match its digest (else the payload is
//! corrupt). [`IndexCheck`] does both for an archive read front to back
//! (`verify`, `extract`, `convert`); [`crate::archive::RandomArchive`]
//! uses the same two checks per read.

use super::error::{ArchiveError, hex};
use crate::vma::index::{Digest, stored_digest};
use crate::vma::reader::{ClusterData, Extent};
use crate::vma::{ArchiveIndex, Header, extent::BlockInfo};

/// Checks that extent `x` of `index` is at `offset` with `entries`.
pub fn check_extent(
    index: &ArchiveIndex,
    x: usize,
    offset: u64,
    entries: &[BlockInfo],
) -> Result<(), ArchiveError> {
    let mismatch = |problem: String| ArchiveError::IndexMismatch {
        extent: x as u64,
        offset,
        problem,
    };
    let Some(rec) = index.extents.get(x) else {
        return Err(mismatch(format!(
            "the index lists only {} extents",
            index.extents.len()
        )));
    };
    if rec.stream_offset != offset {
        return Err(mismatch(format!(
            "the index puts it at {}",
            rec.stream_offset
        )));
    }
    if rec.entries != entries {
        let k = rec
            .entries
            .iter()
            .zip(entries)
            .position(|(a, b)| a != b)
            .unwrap_or(rec.entries.len().min(entries.len()));
        return Err(mismatch(format!(
            "its entry {k} differs from the index's ({} entries in the archive, {} in the index)",
            entries.len(),
            rec.entries.len()
        )));
    }
    Ok(())
}

/// Checks one data cluster against its digest.
pub fn check_cluster(header: &Header, c: &ClusterData<'_>, want: &Digest) -> Result<(), ArchiveError> {
    let found = stored_digest(c.mask, c.stored, c.len);
    if found == *want {
        return Ok(());
    }
    Err(ArchiveError::Digest {
        dev: c.dev,
        name: header
            .device(c.dev)
            .map_or_else(String::new, |d| d.name.clone()),
        cluster: c.cluster,
        expected: hex(want),
        found: hex(&found),
    })
}

/// Checks an archive read front to back against its index; see the
/// module docs.
pub struct IndexCheck<'a> {
    index: &'a ArchiveIndex,
    header: &'a Header,
    next: usize,
    clusters: u64,
}

impl<'a> IndexCheck<'a> {
    /// A check of the archive with `header` against `index`.
    pub fn new(index: &'a ArchiveIndex, header: &'a Header) -> Self {
        IndexCheck {
            index,
            header,
            next: 0,
            clusters: 0,
        }
    }

    /// Checks the next extent and every data cluster in it.
    pub fn extent(&mut self, ext: &Extent<'_>) -> Result<(), ArchiveError> {
        let x = self.next;
        check_extent(self.index, x, ext.offset, ext.entries())?;
        self.next += 1;
        if !self.index.has_digests() {
            return Ok(());
        }
        let digests = self.index.extent_digests(x);
        for (c, want) in ext.clusters().filter(|c| c.mask != 0).zip(digests) {
            check_cluster(self.header, &c, want)?;
            self.clusters += 1;
        }
        Ok(())
    }

    /// After the last extent: checks that the index has no more. Returns
    /// the clusters checked against digests.
    pub fn finish(self) -> Result<u64, ArchiveError> {
        if self.next != self.index.extents.len() {
            return Err(ArchiveError::IndexMismatch {
                extent: self.next as u64,
                offset: self.index.stream_len,
                problem: format!(
                    "the archive ends after {} extents, the index lists {}",
                    self.next,
                    self.index.extents.len()
                ),
            });
        }
        Ok(self.clusters)
    }
}
