//! The one thread that writes the archive. Drive exports hand it whole
//! clusters through a bounded channel; when the channel is full, senders
//! wait, which stops their NBD connections from reading more (back-pressure
//! instead of unbounded memory). Blocking file IO stays off the tokio
//! workers.
//!
//! The thread also tells the [`ReadBack`] where every extent landed, so
//! that archived clusters can be read back from an uncompressed file.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::readback::ReadBack;
use super::shared::{Msg, Payload, Shared, clone_err};
use crate::sink::Sink;
use crate::vma::Writer;

/// Starts the writer thread; returns its join handle, which yields the
/// writer back after [`Msg::Close`] (or when every sender is gone).
pub fn spawn(
    mut writer: Writer<Sink>,
    mut rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    readback: Option<Arc<ReadBack>>,
) -> io::Result<JoinHandle<Writer<Sink>>> {
    if let Some(rb) = readback {
        writer.set_extent_observer(Box::new(move |at, entries| rb.record(at, entries)));
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
                    Msg::StoredCluster {
                        dev,
                        cluster,
                        mask,
                        stored,
                        digest,
                    } => {
                        if shared.failed() {
                            continue;
                        }
                        if let Err(e) =
                            writer.write_stored_cluster(dev, cluster, mask, stored, digest)
                        {
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
