//! The zstd seekable format, as published with zstd
//! (`contrib/seekable_format/zstd_seekable_compression_format.md`): a
//! stream of independent frames followed by a skippable frame holding the
//! seek table (each frame's compressed and decompressed size) and a footer
//! ending in [`SEEKABLE_MAGIC`]. Standard seekable readers understand it,
//! and `zstd -d` decompresses the whole as one stream (it skips skippable
//! frames).
//!
//! Also the skippable frames vma-writer itself adds (the archive index,
//! [`INDEX_FRAME_MAGIC`]). Pure encode/decode: no files, no compression.

/// Magic of the seek table's skippable frame.
pub const SEEK_TABLE_FRAME_MAGIC: u32 = 0x184D_2A5E;
/// Magic of the skippable frame holding a vma-writer archive index
/// (`format/INDEX.md`). Any of the 16 skippable magics is legal; this one
/// is ours.
pub const INDEX_FRAME_MAGIC: u32 = 0x184D_2A56;
/// The last four bytes of a seekable stream.
pub const SEEKABLE_MAGIC: u32 = 0x8F92_EAB1;
/// Bytes of the seek table footer.
pub const FOOTER_LEN: usize = 9;
/// Bytes of a skippable frame's magic and size.
pub const SKIPPABLE_HEADER_LEN: usize = 8;
/// Most frames the format allows (zstd's reference reader's limit).
pub const MAX_FRAMES: u32 = 0x0800_0000;
/// Largest frame content we write or accept: zstd's reference reader
/// refuses more than 1 GiB per frame.
pub const MAX_FRAME_CONTENT: u32 = 1 << 30;
/// First bytes of every zstd frame (little-endian `0xFD2FB528`).
pub const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// One seek table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEntry {
    /// Bytes of the frame in the file (a skippable frame: all of it).
    pub compressed: u32,
    /// Bytes it decompresses to (0 for a skippable frame).
    pub decompressed: u32,
}

/// Why a seek table is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeekTableError {
    /// The stream does not end in a seek table.
    #[error("no zstd seek table at the end")]
    Missing,
    /// The table is malformed.
    #[error("malformed zstd seek table: {0}")]
    Malformed(String),
}

/// A skippable frame: magic, little-endian length, content.
pub fn skippable_frame(magic: u32, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SKIPPABLE_HEADER_LEN + content.len());
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&(content.len() as u32).to_le_bytes());
    out.extend_from_slice(content);
    out
}

/// The seek table frame for `frames` (without per-frame checksums: every
/// data frame carries zstd's own content checksum).
pub fn encode_seek_table(frames: &[FrameEntry]) -> Vec<u8> {
    let mut content = Vec::with_capacity(frames.len() * 8 + FOOTER_LEN);
    for f in frames {
        content.extend_from_slice(&f.compressed.to_le_bytes());
        content.extend_from_slice(&f.decompressed.to_le_bytes());
    }
    content.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    content.push(0); // descriptor: no checksums
    content.extend_from_slice(&SEEKABLE_MAGIC.to_le_bytes());
    skippable_frame(SEEK_TABLE_FRAME_MAGIC, &content)
}

/// What the last [`FOOTER_LEN`] bytes of a stream say: how many bytes the
/// whole seek table frame takes, so the caller can read it.
pub fn seek_table_len(footer: &[u8]) -> Result<u64, SeekTableError> {
    if footer.len() != FOOTER_LEN || footer[5..9] != SEEKABLE_MAGIC.to_le_bytes() {
        return Err(SeekTableError::Missing);
    }
    let frames = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes"));
    if frames > MAX_FRAMES {
        return Err(SeekTableError::Malformed(format!("{frames} frames")));
    }
    let entry = if footer[4] & 0x80 != 0 { 12 } else { 8 };
    Ok((SKIPPABLE_HEADER_LEN + FOOTER_LEN) as u64 + u64::from(frames) * entry)
}

/// Decodes a whole seek table frame (as [`seek_table_len`] sized it).
pub fn decode_seek_table(frame: &[u8]) -> Result<Vec<FrameEntry>, SeekTableError> {
    let malformed = |m: &str| SeekTableError::Malformed(m.to_string());
    if frame.len() < SKIPPABLE_HEADER_LEN + FOOTER_LEN {
        return Err(SeekTableError::Missing);
    }
    let footer = &frame[frame.len() - FOOTER_LEN..];
    if seek_table_len(footer)? != frame.len() as u64 {
        return Err(malformed("its length does not match its footer"));
    }
    if frame[..4] != SEEK_TABLE_FRAME_MAGIC.to_le_bytes() {
        return Err(malformed("wrong skippable frame magic"));
    }
    let size = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes")) as usize;
    if size != frame.len() - SKIPPABLE_HEADER_LEN {
        return Err(malformed("wrong skippable frame size"));
    }
    let descriptor = footer[4];
    if descriptor & 0x7C != 0 {
        return Err(malformed("reserved descriptor bits set"));
    }
    let entry = if descriptor & 0x80 != 0 { 12 } else { 8 };
    let table = &frame[SKIPPABLE_HEADER_LEN..frame.len() - FOOTER_LEN];
    Ok(table
        .chunks_exact(entry)
        .map(|e| FrameEntry {
            compressed: u32::from_le_bytes(e[..4].try_into().expect("4 bytes")),
            decompressed: u32::from_le_bytes(e[4..8].try_into().expect("4 bytes")),
        })
        .collect())
}

/// A seek table turned into offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameMap {
    /// Per frame: (compressed offset, decompressed offset, entry).
    frames: Vec<(u64, u64, FrameEntry)>,
    /// Bytes of all frames (where the seek table starts).
    pub compressed_len: u64,
    /// Bytes the frames decompress to.
    pub decompressed_len: u64,
}

impl FrameMap {
    /// Offsets for `entries`.
    pub fn new(entries: &[FrameEntry]) -> FrameMap {
        let (mut c, mut d) = (0u64, 0u64);
        let frames = entries
            .iter()
            .map(|&e| {
                let at = (c, d, e);
                c += u64::from(e.compressed);
                d += u64::from(e.decompressed);
                at
            })
            .collect();
        FrameMap {
            frames,
            compressed_len: c,
            decompressed_len: d,
        }
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when there are no frames.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frame `i`: (compressed offset, decompressed offset, entry).
    pub fn frame(&self, i: usize) -> Option<(u64, u64, FrameEntry)> {
        self.frames.get(i).copied()
    }

    /// The data frame whose decompressed bytes hold `offset`.
    pub fn frame_at(&self, offset: u64) -> Option<usize> {
        let i = self
            .frames
            .partition_point(|f| f.1 + u64::from(f.2.decompressed) <= offset);
        (i < self.frames.len() && self.frames[i].2.decompressed > 0).then_some(i)
    }

    /// Every frame, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, FrameEntry)> + '_ {
        self.frames.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_table_bytes_match_the_published_layout() {
        let t = encode_seek_table(&[
            FrameEntry {
                compressed: 0x10,
                decompressed: 0x3000,
            },
            FrameEntry {
                compressed: 0x20,
                decompressed: 0,
            },
        ]);
        #[rustfmt::skip]
        let want = [
            0x5E, 0x2A, 0x4D, 0x18, // skippable magic 0x184D2A5E
            25, 0, 0, 0,            // frame size: 2 x 8 + 9
            0x10, 0, 0, 0, 0x00, 0x30, 0, 0, // frame 0
            0x20, 0, 0, 0, 0, 0, 0, 0,       // frame 1 (skippable)
            2, 0, 0, 0,             // Number_Of_Frames
            0,                      // descriptor: no checksums
            0xB1, 0xEA, 0x92, 0x8F, // seekable magic 0x8F92EAB1
        ];
        assert_eq!(t, want);
        assert_eq!(
            seek_table_len(&t[t.len() - FOOTER_LEN..]),
            Ok(t.len() as u64)
        );
        let back = decode_seek_table(&t).unwrap();
        let map = FrameMap::new(&back);
        assert_eq!((map.compressed_len, map.decompressed_len), (0x30, 0x3000));
        assert_eq!(map.frame_at(0), Some(0));
        assert_eq!(map.frame_at(0x2FFF), Some(0));
        assert_eq!(map.frame_at(0x3000), None);
    }

    #[test]
    fn malformed_tables_are_refused() {
        let t = encode_seek_table(&[FrameEntry {
            compressed: 1,
            decompressed: 1,
        }]);
        assert_eq!(
            seek_table_len(&[0; FOOTER_LEN]),
            Err(SeekTableError::Missing)
        );
        let mut bad = t.clone();
        bad[0] ^= 1;
        assert!(decode_seek_table(&bad).is_err());
        let mut bad = t.clone();
        let d = bad.len() - 5;
        bad[d] = 0x04; // reserved bit
        assert!(decode_seek_table(&bad).is_err());
        assert!(decode_seek_table(&t[1..]).is_err());
    }
}
