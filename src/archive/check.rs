//! Checking what was read against the index: that an extent is where the
//! index says with the entries it says (else the index is stale), and
//! that each data cluster's bytes match its digest (else the payload is
//! corrupt). [`IndexCheck`] does both for an archive read front to back
//! (`verify`, `extract`, `convert`), hashing on a thread of its own while
//! the next extent is read; [`crate::archive::RandomArchive`] uses the same
//! two checks per read.

use std::io::Read;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use super::error::{ArchiveError, hex};
use crate::vma::cluster::cluster_len;
use crate::vma::extent::{BlockInfo, payload_ranges};
use crate::vma::index::{Digest, stored_digest};
use crate::vma::reader::ClusterData;
use crate::vma::{ArchiveIndex, DevId, Header, Reader};

/// Extents queued for hashing: while one is hashed and one read, the
/// next waits; more would only hold memory (3.7 MiB each).
const QUEUED_EXTENTS: usize = 2;

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
pub fn check_cluster(
    header: &Header,
    c: &ClusterData<'_>,
    want: &Digest,
) -> Result<(), ArchiveError> {
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

/// Checks the data clusters of extent `x`, whose payload is `payload`.
fn check_digests(
    index: &ArchiveIndex,
    header: &Header,
    x: usize,
    payload: &[u8],
) -> Result<u64, ArchiveError> {
    let entries = &index.extents[x].entries;
    let mut digests = index.extent_digests(x).iter();
    let mut n = 0;
    for (e, range) in payload_ranges(entries).filter(|(e, _)| e.mask != 0) {
        let size = header.device(DevId(e.dev)).map_or(0, |d| d.size);
        let c = ClusterData {
            dev: DevId(e.dev),
            cluster: u64::from(e.cluster),
            mask: e.mask,
            len: cluster_len(size, u64::from(e.cluster)),
            stored: &payload[range],
        };
        check_cluster(
            header,
            &c,
            digests.next().expect("one digest per data cluster"),
        )?;
        n += 1;
    }
    Ok(n)
}

struct Job {
    extent: usize,
    payload: Vec<u8>,
}

/// The hashing thread and its queues.
struct Worker {
    jobs: SyncSender<Job>,
    spare: Receiver<Vec<u8>>,
    handle: JoinHandle<Result<u64, ArchiveError>>,
}

/// Checks an archive read front to back against its index; see the
/// module docs.
pub struct IndexCheck {
    index: Arc<ArchiveIndex>,
    next: usize,
    worker: Option<Worker>,
}

impl IndexCheck {
    /// A check of the archive with `header` against `index`; starts the
    /// hashing thread when the index has digests.
    pub fn start(index: Arc<ArchiveIndex>, header: &Header) -> Result<IndexCheck, ArchiveError> {
        let worker = if index.has_digests() {
            let (jobs, rx) = sync_channel::<Job>(QUEUED_EXTENTS);
            let (back, spare) = channel();
            let (ix, header) = (index.clone(), header.clone());
            let handle = std::thread::Builder::new()
                .name("digests".into())
                .spawn(move || {
                    let mut n = 0;
                    for job in rx {
                        n += check_digests(&ix, &header, job.extent, &job.payload)?;
                        let _ = back.send(job.payload);
                    }
                    Ok(n)
                })?;
            Some(Worker {
                jobs,
                spare,
                handle,
            })
        } else {
            None
        };
        Ok(IndexCheck {
            index,
            next: 0,
            worker,
        })
    }

    /// Checks the extent `reader` returned last (at `offset`, with
    /// `entries`): where it is now, its digests on the hashing thread,
    /// which takes its payload from `reader`.
    pub fn extent<R: Read>(
        &mut self,
        reader: &mut Reader<R>,
        offset: u64,
        entries: &[BlockInfo],
    ) -> Result<(), ArchiveError> {
        let x = self.next;
        check_extent(&self.index, x, offset, entries)?;
        self.next += 1;
        let Some(w) = &self.worker else {
            return Ok(());
        };
        let spare = w.spare.try_recv().unwrap_or_default();
        let payload = reader.take_payload(spare);
        if w.jobs.send(Job { extent: x, payload }).is_err() {
            // The thread stopped at a mismatch: its error is the one.
            return self.join().map(|_| ());
        }
        Ok(())
    }

    fn join(&mut self) -> Result<u64, ArchiveError> {
        let Some(w) = self.worker.take() else {
            return Ok(0);
        };
        drop(w.jobs);
        w.handle
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the digest thread panicked").into()))
    }

    /// After the last extent: waits for the digests, and checks that the
    /// index has no more extents. Returns the clusters checked against
    /// digests.
    pub fn finish(mut self) -> Result<u64, ArchiveError> {
        let n = self.join()?;
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
        Ok(n)
    }
}
