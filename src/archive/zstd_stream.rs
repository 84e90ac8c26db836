//! Sequential zstd decompression that knows its frames: counts them, checks
//! each against the seek table when there is one (compressed and
//! decompressed size), and names the frame (and, given the index, the
//! extent it holds) in every error: a corrupt frame (zstd's content
//! checksum), a frame cut short by the end of the file. Skippable frames
//! (the index, the seek table) are passed over; zstd's own checksum is
//! checked as the frames decompress.

use std::io::{self, Read};
use std::sync::Arc;

use zstd::zstd_safe::{self, DCtx, InBuffer, OutBuffer};

use super::error::ArchiveError;
use crate::seekable::FrameEntry;
use crate::vma::ArchiveIndex;

/// What a frame holds, for messages: the archive header, an extent (from
/// the index), or else where the frame starts.
pub fn frame_holds(index: Option<&ArchiveIndex>, frame: u32, compressed_at: u64) -> String {
    match index {
        Some(_) if frame == 0 => "the archive header".into(),
        Some(ix) => match ix.extent_of_frame(frame) {
            Some(x) => format!("extent {x}"),
            None => format!("no extent, compressed offset {compressed_at}"),
        },
        None => format!("compressed offset {compressed_at}"),
    }
}

/// A zstd stream read as its decompressed bytes; see the module docs.
pub struct ZstdStream<R: Read> {
    inner: R,
    dctx: DCtx<'static>,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// The seek table's entries, when known.
    table: Option<Vec<FrameEntry>>,
    /// For naming the extent of a frame.
    index: Option<Arc<ArchiveIndex>>,
    /// The current frame: its number, where it starts, and its bytes so far.
    frame: u32,
    frame_at: u64,
    frame_in: u64,
    frame_out: u64,
}

impl<R: Read> ZstdStream<R> {
    /// Decompresses `inner`.
    pub fn new(inner: R) -> Self {
        ZstdStream {
            inner,
            dctx: DCtx::create(),
            buf: vec![0; DCtx::in_size()],
            pos: 0,
            end: 0,
            eof: false,
            table: None,
            index: None,
            frame: 0,
            frame_at: 0,
            frame_in: 0,
            frame_out: 0,
        }
    }

    /// Checks every frame against `table`; names extents from `index`.
    pub fn with_table(mut self, table: Vec<FrameEntry>, index: Option<Arc<ArchiveIndex>>) -> Self {
        self.table = Some(table);
        self.index = index;
        self
    }

    fn error(&self, problem: impl Into<String>) -> io::Error {
        ArchiveError::Frame {
            frame: self.frame,
            holds: frame_holds(self.index.as_deref(), self.frame, self.frame_at),
            problem: problem.into(),
        }
        .into()
    }

    /// The current frame ended: checks it against the seek table.
    fn end_frame(&mut self) -> io::Result<()> {
        if let Some(e) = self.table.as_ref().and_then(|t| t.get(self.frame as usize)) {
            let (c, d) = (u64::from(e.compressed), u64::from(e.decompressed));
            if (c, d) != (self.frame_in, self.frame_out) {
                return Err(self.error(format!(
                    "{} compressed bytes decompress to {}; the seek table says {c} and {d}",
                    self.frame_in, self.frame_out
                )));
            }
        }
        self.frame += 1;
        self.frame_at += self.frame_in;
        self.frame_in = 0;
        self.frame_out = 0;
        Ok(())
    }
}

impl<R: Read> Read for ZstdStream<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos == self.end && !self.eof {
                let n = loop {
                    match self.inner.read(&mut self.buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        r => break r?,
                    }
                };
                (self.pos, self.end, self.eof) = (0, n, n == 0);
            }
            if self.pos == self.end {
                if self.frame_in > 0 || self.frame_out > 0 {
                    return Err(self.error(format!(
                        "truncated: the file ends {} bytes into the frame",
                        self.frame_in
                    )));
                }
                if let Some(t) = &self.table
                    && (self.frame as usize) < t.len()
                {
                    return Err(self.error(format!(
                        "missing: the file ends after {} of the seek table's {} frames",
                        self.frame,
                        t.len()
                    )));
                }
                return Ok(0);
            }
            let mut input = InBuffer::around(&self.buf[self.pos..self.end]);
            let mut output = OutBuffer::around(&mut *out);
            let hint = self
                .dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| self.error(zstd_safe::get_error_name(code)))?;
            let produced = output.pos();
            let consumed = input.pos();
            self.pos += consumed;
            self.frame_in += consumed as u64;
            self.frame_out += produced as u64;
            if hint == 0 {
                self.end_frame()?;
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> (Vec<u8>, Vec<FrameEntry>) {
        let mut out = Vec::new();
        let mut table = Vec::new();
        for p in parts {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            enc.include_checksum(true).unwrap();
            std::io::Write::write_all(&mut enc, p).unwrap();
            let f = enc.finish().unwrap();
            table.push(FrameEntry {
                compressed: f.len() as u32,
                decompressed: p.len() as u32,
            });
            out.extend(f);
        }
        (out, table)
    }

    #[test]
    fn reads_frames_and_checks_them() {
        let a = vec![1u8; 100_000];
        let b: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (bytes, table) = frames(&[&a, &b]);
        let mut back = Vec::new();
        ZstdStream::new(&bytes[..])
            .with_table(table.clone(), None)
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, [a.clone(), b.clone()].concat());

        // Cut inside frame 1.
        let e = ZstdStream::new(&bytes[..bytes.len() - 10])
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("zstd frame 1"), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        // A flipped byte inside frame 1's data: checksum or corruption.
        let mut bad = bytes.clone();
        let at = table[0].compressed as usize + 100;
        bad[at] ^= 0x55;
        let e = ZstdStream::new(&bad[..])
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("zstd frame 1"), "{e}");

        // A seek table that disagrees.
        let mut wrong = table.clone();
        wrong[0].decompressed += 1;
        let e = ZstdStream::new(&bytes[..])
            .with_table(wrong, None)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("the seek table says"), "{e}");
        let mut longer = table.clone();
        longer.push(table[0]);
        let e = ZstdStream::new(&bytes[..])
            .with_table(longer, None)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
