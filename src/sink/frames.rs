//! Seekable zstd output: every unit the archive writer hands over (the
//! header, an extent) becomes one independent zstd frame with zstd's
//! content checksum, compressed on a pool of worker threads and written in
//! order; at the end come the skippable frames the caller adds (the
//! index) and the seek table (`crate::seekable`).
//!
//! Memory is bounded whatever the archive size: at most
//! [`FrameWriter::max_in_flight`] units are being compressed or waiting to
//! be written; a further unit waits for the oldest to be written
//! (back-pressure to the archive writer).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use zstd::zstd_safe::{self, CCtx, CParameter, InBuffer, OutBuffer};

use crate::seekable::{
    FrameEntry, INDEX_FRAME_MAGIC, MAX_FRAME_CONTENT, encode_seek_table, skippable_frame,
};

/// Units in flight per worker: one being compressed, one waiting to be
/// written, so the workers never wait for the writer.
const IN_FLIGHT_PER_WORKER: usize = 2;

struct Job {
    parts: Vec<Bytes>,
    len: usize,
    reply: SyncSender<io::Result<Vec<u8>>>,
}

struct Pending {
    reply: Receiver<io::Result<Vec<u8>>>,
    decompressed: u32,
}

/// A seekable zstd writer over `W`; see the module docs.
pub struct FrameWriter<W: Write> {
    out: W,
    workers: Workers,
    pending: VecDeque<Pending>,
    max_in_flight: usize,
    table: Vec<FrameEntry>,
    written: u64,
}

/// Compresses one unit into one frame with `cctx`.
fn compress(cctx: &mut CCtx<'_>, parts: &[Bytes], len: usize) -> io::Result<Vec<u8>> {
    let err = |code: usize| io::Error::other(format!("zstd: {}", zstd_safe::get_error_name(code)));
    cctx.reset(zstd_safe::ResetDirective::SessionOnly)
        .map_err(err)?;
    cctx.set_pledged_src_size(Some(len as u64)).map_err(err)?;
    let mut out: Vec<u8> = Vec::with_capacity(zstd_safe::compress_bound(len));
    {
        let mut output = OutBuffer::around(&mut out);
        for p in parts {
            let mut input = InBuffer::around(p);
            while input.pos() < p.len() {
                cctx.compress_stream2(&mut output, &mut input, zstd_sys_end(false))
                    .map_err(err)?;
            }
        }
        // With compress_bound of room, ending the frame completes at once.
        let mut empty = InBuffer::around(&[]);
        let left = cctx
            .compress_stream2(&mut output, &mut empty, zstd_sys_end(true))
            .map_err(err)?;
        if left != 0 {
            return Err(io::Error::other("zstd: a frame did not fit its bound"));
        }
    }
    Ok(out)
}

fn zstd_sys_end(end: bool) -> zstd_safe::zstd_sys::ZSTD_EndDirective {
    use zstd_safe::zstd_sys::ZSTD_EndDirective::{ZSTD_e_continue, ZSTD_e_end};
    if end { ZSTD_e_end } else { ZSTD_e_continue }
}

fn worker(level: i32, jobs: Arc<Mutex<Receiver<Job>>>) {
    let mut cctx = CCtx::create();
    let setup = cctx
        .set_parameter(CParameter::CompressionLevel(level))
        .and_then(|_| cctx.set_parameter(CParameter::ChecksumFlag(true)))
        .and_then(|_| cctx.set_parameter(CParameter::ContentSizeFlag(true)));
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let res = match setup {
            Ok(_) => compress(&mut cctx, &job.parts, job.len),
            Err(code) => Err(io::Error::other(format!(
                "zstd: cannot set up compression: {}",
                zstd_safe::get_error_name(code)
            ))),
        };
        let _ = job.reply.send(res);
    }
}

impl<W: Write> FrameWriter<W> {
    /// A writer compressing at `level` on `workers` threads (at least 1).
    pub fn new(out: W, level: i32, workers: usize) -> io::Result<Self> {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(workers);
        let rx = Arc::new(Mutex::new(rx));
        let handles = (0..workers)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("zstd-{i}"))
                    .spawn(move || worker(level, rx))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(FrameWriter {
            out,
            workers: Workers {
                jobs: Some(tx),
                handles,
            },
            pending: VecDeque::new(),
            max_in_flight: workers * IN_FLIGHT_PER_WORKER,
            table: Vec::new(),
            written: 0,
        })
    }

    /// Most units compressed or waiting at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Compressed bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The output.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Queues one unit (the concatenation of `parts`) as the next frame;
    /// returns its frame number. Waits while too many are in flight.
    pub fn submit(&mut self, parts: Vec<Bytes>) -> io::Result<u32> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        if len as u64 > u64::from(MAX_FRAME_CONTENT) {
            return Err(io::Error::other(format!(
                "a unit of {len} bytes is larger than a seekable frame may be"
            )));
        }
        while self.pending.len() >= self.max_in_flight {
            self.write_oldest()?;
        }
        let frame = (self.table.len() + self.pending.len()) as u32;
        let (reply, rx) = mpsc::sync_channel(1);
        self.workers
            .jobs
            .as_ref()
            .expect("workers run until the writer is consumed")
            .send(Job { parts, len, reply })
            .map_err(|_| io::Error::other("the zstd workers stopped"))?;
        self.pending.push_back(Pending {
            reply: rx,
            decompressed: len as u32,
        });
        Ok(frame)
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        let frame = p
            .reply
            .recv()
            .map_err(|_| io::Error::other("a zstd worker stopped"))??;
        self.out.write_all(&frame)?;
        self.written += frame.len() as u64;
        self.table.push(FrameEntry {
            compressed: frame.len() as u32,
            decompressed: p.decompressed,
        });
        Ok(())
    }

    /// Writes every queued frame out (for FLUSH: what was acknowledged is
    /// in the file afterwards).
    pub fn drain(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.out.flush()
    }

    /// Writes the remaining frames, then `index` (if any) as a skippable
    /// frame, then the seek table. Returns the output.
    pub fn finish(mut self, index: Option<&[u8]>) -> io::Result<W> {
        self.drain()?;
        if let Some(index) = index {
            if index.len() as u64 > u64::from(u32::MAX) {
                return Err(io::Error::other(
                    "the archive index is larger than a skippable frame can hold",
                ));
            }
            let frame = skippable_frame(INDEX_FRAME_MAGIC, index);
            self.out.write_all(&frame)?;
            self.written += frame.len() as u64;
            self.table.push(FrameEntry {
                compressed: frame.len() as u32,
                decompressed: 0,
            });
        }
        let table = encode_seek_table(&self.table);
        self.out.write_all(&table)?;
        self.written += table.len() as u64;
        self.out.flush()?;
        let FrameWriter { out, workers, .. } = self;
        drop(workers);
        Ok(out)
    }
}

/// The worker threads; stopped (and joined) when dropped.
struct Workers {
    jobs: Option<SyncSender<Job>>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the channel ends every worker after its current job.
        self.jobs = None;
        for w in self.handles.drain(..) {
            let _ = w.join();
        }
    }
}
