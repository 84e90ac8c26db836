//! Reading one zstd frame of a seekable `.vma.zst` at random: its
//! compressed bytes where the seek table puts them, decompressed in one
//! call and checked: exactly one frame, the size the seek table says,
//! zstd's content checksum. Errors name the frame and what it holds.
//! Both the compressed and the decompressed bytes live in buffers from a
//! [`BufferPool`], so reading frame after frame reuses the same few
//! buffers instead of leaving freed megabytes in every thread's heap.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use zstd::zstd_safe::{self, DCtx};

use super::counted::CountedFile;
use super::error::ArchiveError;
use crate::pool::BufferPool;
use crate::seekable::{FrameMap, MAX_FRAME_CONTENT};

thread_local! {
    /// One decompression context per thread, reused across frames.
    static DCTX: RefCell<DCtx<'static>> = RefCell::new(DCtx::create());
}

/// Reads and decompresses frame `frame` of `frames` from `file`, in
/// buffers from `pool`; `holds` says what the frame holds (for messages).
pub fn read_frame(
    file: &CountedFile,
    frames: &FrameMap,
    frame: u32,
    holds: impl Fn() -> String,
    pool: &Arc<BufferPool>,
) -> Result<Bytes, ArchiveError> {
    let fail = |problem: String| ArchiveError::Frame {
        frame,
        holds: holds(),
        problem,
    };
    let (at, _, entry) = frames
        .frame(frame as usize)
        .ok_or_else(|| fail("not in the seek table".into()))?;
    let clen = entry.compressed as usize;
    let len = entry.decompressed as usize;
    if len > MAX_FRAME_CONTENT as usize {
        return Err(fail(format!(
            "the seek table says {len} bytes, more than a frame may hold ({MAX_FRAME_CONTENT})"
        )));
    }
    let mut compressed = pool.get_filled(clen);
    if file.read_at(&mut compressed, at)? < clen {
        return Err(fail(format!(
            "truncated: the file ends before its {clen} bytes"
        )));
    }
    let mut out = pool.get(len);
    decode_frame_into(&compressed, len, &mut out).map_err(fail)?;
    Ok(out.freeze())
}

/// Decompresses `compressed`, which must be one whole frame of `len`
/// decompressed bytes.
pub fn decode_frame(compressed: &[u8], len: usize) -> Result<Bytes, String> {
    if len > MAX_FRAME_CONTENT as usize {
        return Err(format!(
            "the seek table says {len} bytes, more than a frame may hold ({MAX_FRAME_CONTENT})"
        ));
    }
    let mut out: Vec<u8> = Vec::with_capacity(len);
    decode_frame_into(compressed, len, &mut out)?;
    Ok(Bytes::from(out))
}

/// [`decode_frame`] into `out` (emptied first; it grows to `len`).
fn decode_frame_into(compressed: &[u8], len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    match zstd_safe::find_frame_compressed_size(compressed) {
        Ok(n) if n == compressed.len() => {}
        Ok(n) => {
            return Err(format!(
                "the frame is {n} bytes; the seek table says {}",
                compressed.len()
            ));
        }
        Err(code) => {
            return Err(format!(
                "truncated or corrupt: {}",
                zstd_safe::get_error_name(code)
            ));
        }
    }
    match zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(n)) if n == len as u64 => {}
        Ok(Some(n)) => {
            return Err(format!("it holds {n} bytes; the seek table says {len}"));
        }
        Ok(None) | Err(_) => {}
    }
    out.clear();
    out.reserve(len);
    DCTX.with(|d| d.borrow_mut().decompress(out, compressed))
        .map_err(|code| format!("corrupt: {}", zstd_safe::get_error_name(code)))?;
    if out.len() != len {
        return Err(format!(
            "it decompresses to {} bytes; the seek table says {len}",
            out.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_size_and_content() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_checksum(true).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let frame = enc.finish().unwrap();
        assert_eq!(decode_frame(&frame, data.len()).unwrap(), data);
        let e = decode_frame(&frame, data.len() + 1).unwrap_err();
        assert!(e.contains("seek table says"), "{e}");
        let e = decode_frame(&frame[..frame.len() - 3], data.len()).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        // The last 4 bytes are the content checksum.
        let mut bad = frame.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let e = decode_frame(&bad, data.len()).unwrap_err();
        assert!(e.contains("corrupt"), "{e}");
    }
}
