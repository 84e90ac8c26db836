//! The one thread that writes the archive. Drive exports hand it whole
//! clusters through a bounded channel; when the channel is full, senders
//! wait, which stops their NBD connections from reading more (back-pressure
//! instead of unbounded memory). Blocking file IO stays off the tokio
//! workers.
//!
//! The thread also records where every extent landed, so that archived
//! clusters can be read back from an uncompressed file (`Locations`).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use crate::sink::Sink;
use crate::vma::extent::{BlockInfo, payload_offset, payload_ranges};
use crate::vma::{DevId, Writer};

/// A cluster's content on its way to the archive.
#[derive(Debug)]
pub enum Payload {
    /// The cluster's in-device bytes; a slice of the client's WRITE buffer
    /// when the write covered the whole cluster (no copy), else the
    /// assembled partial buffer.
    Data(Bytes),
    /// An all-zero cluster (mask 0, no payload).
    Zero,
}

/// What the drive exports ask of the writer thread.
pub enum Msg {
    /// Archive one cluster (the exports guarantee each cluster once).
    Cluster {
        /// Device.
        dev: DevId,
        /// Cluster number.
        cluster: u64,
        /// Its content.
        payload: Payload,
    },
    /// Write out the pending extent; with `sync`, also fdatasync.
    Flush {
        /// fdatasync after writing.
        sync: bool,
        /// Gets the outcome.
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Stop and hand the writer back (to finish or drop it).
    Close,
}

/// Where archived clusters are in an uncompressed archive file.
#[derive(Default)]
pub struct Locations {
    /// Per extent: file offset of its header and its entries.
    extents: Vec<(u64, Vec<BlockInfo>)>,
    /// (dev, cluster) → index into `extents`.
    index: HashMap<(u8, u32), u32>,
}

impl Locations {
    /// File offset and mask of the stored blocks of `(dev, cluster)`, if
    /// its extent has been written.
    pub fn find(&self, dev: DevId, cluster: u64) -> Option<(u64, u16)> {
        let &e = self.index.get(&(dev.0, cluster as u32))?;
        let (at, entries) = &self.extents[e as usize];
        let (b, stored) = payload_ranges(entries)
            .find(|(b, _)| b.dev == dev.0 && u64::from(b.cluster) == cluster)?;
        Some((payload_offset(*at) + stored.start as u64, b.mask))
    }
}

/// Starts the writer thread; returns its join handle, which yields the
/// writer back after [`Msg::Close`] (or when every sender is gone).
pub fn spawn(
    mut writer: Writer<Sink>,
    mut rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    locations: Option<Arc<Mutex<Locations>>>,
) -> io::Result<JoinHandle<Writer<Sink>>> {
    if let Some(locs) = locations {
        writer.set_extent_observer(Box::new(move |at, entries| {
            let mut l = locs.lock().unwrap_or_else(|e| e.into_inner());
            let idx = l.extents.len() as u32;
            for b in entries {
                l.index.insert((b.dev, b.cluster), idx);
            }
            l.extents.push((at, entries.to_vec()));
        }));
    }
    std::thread::Builder::new()
        .name("vma-writer".into())
        .spawn(move || {
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    Msg::Cluster {
                        dev,
                        cluster,
                        payload,
                    } => {
                        if shared.failed() {
                            continue; // drain, so senders never block forever
                        }
                        let res = match payload {
                            Payload::Data(b) => writer.write_cluster(dev, cluster, b).map(|_| ()),
                            Payload::Zero => writer.write_zero_cluster(dev, cluster),
                        };
                        if let Err(e) = res {
                            shared.fail_with(e.into(), "writing the archive failed");
                        }
                    }
                    Msg::Flush { sync, reply } => {
                        let res = match shared.failure() {
                            Some(e) => Err(e),
                            None => writer
                                .flush_extent()
                                .map_err(io::Error::from)
                                .and_then(|_| {
                                    if sync {
                                        writer.get_mut().sync()
                                    } else {
                                        Ok(())
                                    }
                                }),
                        };
                        if let Err(e) = &res {
                            shared.fail_with(clone_err(e), "flushing the archive failed");
                        }
                        let _ = reply.send(res);
                    }
                    Msg::Close => break,
                }
            }
            writer
        })
}

/// io::Error is not Clone; keep kind, errno and text.
pub fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}
