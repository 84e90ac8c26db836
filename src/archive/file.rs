//! A regular archive file that can be read at random: a plain `.vma`, or
//! a `.vma.zst` ending in a seek table. [`FileArchive`] finds which from
//! the file's tail, reads the header alone (a plain header's bytes, or
//! frame 0), and on request the stored index (the `ARCHIVE.index`
//! sidecar of a `.vma`, the index frame of a `.vma.zst`, checked against
//! the archive: a stale or foreign index is an error), a map of a plain
//! archive from its extent headers, or the archive as a stream.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::counted::CountedFile;
use super::error::ArchiveError;
use super::format::{Format, Stream};
use super::frame::read_frame;
use super::zstd_stream::{ZstdStream, frame_holds};
use crate::seekable::{
    FOOTER_LEN, FrameEntry, FrameMap, INDEX_FRAME_MAGIC, SKIPPABLE_HEADER_LEN, SeekTableError,
    decode_seek_table, seek_table_len,
};
use crate::sink::index_path;
use crate::vma::consts::{VMA_EXTENT_HEADER_SIZE, VMA_HEADER_SIZE};
use crate::vma::extent::ExtentHeader;
use crate::vma::index::IndexError;
use crate::vma::{ArchiveIndex, FormatError, Header};

/// How the archive lies in the file.
#[derive(Debug)]
pub enum Layout {
    /// Plain VMA bytes.
    Plain,
    /// Seekable zstd frames.
    Seekable {
        /// The seek table's entries.
        table: Vec<FrameEntry>,
        /// The same as offsets.
        frames: FrameMap,
        /// The frame holding the index, if any.
        index_frame: Option<u32>,
    },
}

/// A random-access archive file; see the module docs.
#[derive(Debug)]
pub struct FileArchive {
    path: PathBuf,
    file: Arc<CountedFile>,
    layout: Layout,
    header: Header,
    header_len: u64,
}

fn malformed(m: String) -> ArchiveError {
    ArchiveError::SeekTable(SeekTableError::Malformed(m))
}

impl FileArchive {
    /// A plain `.vma` file: reads its header.
    pub fn plain(file: File, path: &Path) -> Result<FileArchive, ArchiveError> {
        let len = file.metadata()?.len();
        Self::plain_from(CountedFile::new(file, len), path)
    }

    /// A plain archive in `file` (a file or an object): reads its header.
    pub fn plain_from(file: CountedFile, path: &Path) -> Result<FileArchive, ArchiveError> {
        let len = file.len();
        let file = Arc::new(file);
        let mut fixed = vec![0; VMA_HEADER_SIZE];
        let got = file.read_at(&mut fixed, 0)?;
        fixed.truncate(got);
        let size = Header::check_fixed(&fixed)?;
        if size as u64 > len {
            return Err(FormatError::Truncated {
                offset: 0,
                what: "archive header",
                need: size as u64,
                got: len,
            }
            .into());
        }
        fixed.resize(size, 0);
        let got = file.read_at(&mut fixed[VMA_HEADER_SIZE..], VMA_HEADER_SIZE as u64)?;
        if VMA_HEADER_SIZE + got < size {
            return Err(FormatError::Truncated {
                offset: 0,
                what: "archive header",
                need: size as u64,
                got: (VMA_HEADER_SIZE + got) as u64,
            }
            .into());
        }
        Ok(FileArchive {
            path: path.to_path_buf(),
            header: Header::decode(&fixed)?,
            header_len: size as u64,
            file,
            layout: Layout::Plain,
        })
    }

    /// A zstd file: seekable when it ends in a seek table (reads it and
    /// frame 0), else handed back to be read as a stream.
    pub fn seekable(file: File, path: &Path) -> Result<Result<FileArchive, File>, ArchiveError> {
        let len = file.metadata()?.len();
        Ok(Self::seekable_from(CountedFile::new(file, len), path)?
            .map_err(|c| c.into_file().expect("a file stays a file")))
    }

    /// [`seekable`](Self::seekable) for a file or an object.
    pub fn seekable_from(
        counted: CountedFile,
        path: &Path,
    ) -> Result<Result<FileArchive, CountedFile>, ArchiveError> {
        let len = counted.len();
        if len < FOOTER_LEN as u64 {
            return Ok(Err(counted));
        }
        let footer = counted
            .read_vec(len - FOOTER_LEN as u64, FOOTER_LEN)?
            .expect("inside the file");
        let table_len = match seek_table_len(&footer) {
            Ok(n) => n,
            Err(SeekTableError::Missing) => {
                return Ok(Err(counted));
            }
            Err(e) => return Err(e.into()),
        };
        if table_len > len {
            return Err(malformed(format!(
                "it claims {table_len} bytes of a {len}-byte file"
            )));
        }
        let raw = counted
            .read_vec(len - table_len, table_len as usize)?
            .expect("inside the file");
        let table = decode_seek_table(&raw)?;
        let frames = FrameMap::new(&table);
        if frames.compressed_len + table_len != len {
            return Err(malformed(format!(
                "it lists {} bytes of frames, the file has {} before it",
                frames.compressed_len,
                len - table_len
            )));
        }
        let file = Arc::new(counted);
        let index_frame = match table.len().checked_sub(1) {
            Some(last) if table[last].decompressed == 0 => {
                let (at, _, _) = frames.frame(last).expect("listed");
                let head = file.read_vec(at, 4)?.expect("inside the file");
                (head == INDEX_FRAME_MAGIC.to_le_bytes()).then_some(last as u32)
            }
            _ => None,
        };
        // Read once: a pool that keeps nothing.
        let once = crate::pool::BufferPool::new(0);
        let bytes = read_frame(&file, &frames, 0, || "the archive header".into(), &once)?;
        let size = Header::check_fixed(&bytes[..bytes.len().min(VMA_HEADER_SIZE)])?;
        if bytes.len() < size {
            return Err(ArchiveError::Frame {
                frame: 0,
                holds: "the archive header".into(),
                problem: format!(
                    "it holds {} bytes, the header has {size}: not written by vma-writer",
                    bytes.len()
                ),
            });
        }
        Ok(Ok(FileArchive {
            path: path.to_path_buf(),
            header: Header::decode(&bytes[..size])?,
            header_len: size as u64,
            file,
            layout: Layout::Seekable {
                table,
                frames,
                index_frame,
            },
        }))
    }

    /// The path it was opened as.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes of the header (the first extent's offset).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// How the archive lies in the file.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The file, shared with its count of bytes read.
    pub fn file(&self) -> &Arc<CountedFile> {
        &self.file
    }

    /// Bytes read from the file so far.
    pub fn bytes_read(&self) -> u64 {
        self.file.bytes_read()
    }

    /// Bytes of the plain VMA stream.
    pub fn stream_len(&self) -> u64 {
        match &self.layout {
            Layout::Plain => self.file.len(),
            Layout::Seekable { frames, .. } => frames.decompressed_len,
        }
    }

    /// The stored index, checked against this archive (its uuid, length,
    /// devices and, in a `.vma.zst`, that each extent lies in its frame);
    /// `None` when there is none.
    pub fn load_index(&self) -> Result<Option<ArchiveIndex>, ArchiveError> {
        let (bytes, place, framed) = match &self.layout {
            Layout::Plain if self.file.object().is_some() => {
                let url = self
                    .file
                    .object()
                    .expect("checked")
                    .url()
                    .with_suffix(".index");
                match crate::object::RemoteObject::read_whole(&url) {
                    Ok(Some(bytes)) => (bytes, url.to_string(), false),
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(ArchiveError::Io(e.into())),
                }
            }
            Layout::Plain => {
                let sidecar = index_path(&self.path);
                let bytes = match std::fs::read(&sidecar) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(ArchiveError::Io(std::io::Error::new(
                            e.kind(),
                            format!("cannot read {}: {e}", sidecar.display()),
                        )));
                    }
                };
                (bytes, sidecar.display().to_string(), false)
            }
            Layout::Seekable {
                table,
                frames,
                index_frame,
            } => {
                let Some(i) = *index_frame else {
                    return Ok(None);
                };
                let (at, _, e) = frames.frame(i as usize).expect("listed");
                let skip = SKIPPABLE_HEADER_LEN as u64;
                let len = u64::from(e.compressed).saturating_sub(skip);
                debug_assert_eq!(table[i as usize], e);
                let bytes = self
                    .file
                    .read_vec(at + skip, len as usize)?
                    .expect("inside the file");
                (bytes, format!("the index (zstd frame {i})"), true)
            }
        };
        let fail = |source: IndexError| ArchiveError::Index {
            place: place.clone(),
            source,
        };
        let index = ArchiveIndex::decode(&bytes).map_err(fail)?;
        if index.framed != framed {
            return Err(fail(IndexError::Inconsistent(format!(
                "it describes a {} archive",
                if index.framed { "zstd-framed" } else { "plain" }
            ))));
        }
        index
            .check_archive(&self.header, Some(self.stream_len()))
            .map_err(fail)?;
        if index.header_len != self.header_len {
            return Err(fail(IndexError::Inconsistent(format!(
                "its header is {} bytes, the archive's {}",
                index.header_len, self.header_len
            ))));
        }
        if let Layout::Seekable { frames, .. } = &self.layout {
            for (x, rec) in index.extents.iter().enumerate() {
                let fits = frames.frame(rec.frame as usize).is_some_and(|(_, d, e)| {
                    d <= rec.stream_offset
                        && rec.stream_offset + rec.len() <= d + u64::from(e.decompressed)
                });
                if !fits {
                    return Err(fail(IndexError::Inconsistent(format!(
                        "extent {x} does not lie in its frame {}",
                        rec.frame
                    ))));
                }
            }
        }
        Ok(Some(index))
    }

    /// A plain archive's map from its extent headers alone (one 512-byte
    /// read per extent): an index without digests.
    pub fn map_extents(&self) -> Result<ArchiveIndex, ArchiveError> {
        debug_assert!(matches!(self.layout, Layout::Plain));
        let len = self.file.len();
        let mut at = self.header_len;
        let mut extents = Vec::new();
        let mut head = [0u8; VMA_EXTENT_HEADER_SIZE];
        while at < len {
            let got = self.file.read_at(&mut head, at)?;
            if got < head.len() {
                return Err(FormatError::Truncated {
                    offset: at,
                    what: "extent header",
                    need: head.len() as u64,
                    got: got as u64,
                }
                .into());
            }
            let ext = ExtentHeader::decode(&head, &self.header.uuid, at)?;
            let next = at + (VMA_EXTENT_HEADER_SIZE + ext.payload_len()) as u64;
            if next > len {
                return Err(FormatError::Truncated {
                    offset: at,
                    what: "extent payload",
                    need: next - at,
                    got: len - at,
                }
                .into());
            }
            extents.push((at, ext.entries().map(|(_, e)| e).collect()));
            at = next;
        }
        ArchiveIndex::from_extent_headers(&self.header, self.header_len, len, extents).map_err(
            |source| ArchiveError::Index {
                place: format!("the extent headers of {}", self.path.display()),
                source,
            },
        )
    }

    /// The archive from its start as plain VMA bytes.
    pub fn stream(&self) -> Result<Stream, ArchiveError> {
        self.stream_named(None)
    }

    /// [`stream`](Self::stream), naming the extent of a frame in errors
    /// from `index`.
    pub fn stream_named(&self, index: Option<Arc<ArchiveIndex>>) -> Result<Stream, ArchiveError> {
        let all = self.file.reader(0, self.file.len())?;
        Ok(match &self.layout {
            Layout::Plain => Stream::new(Format::Vma, Box::new(all)),
            Layout::Seekable { table, .. } => Stream::new(
                Format::Zstd,
                Box::new(ZstdStream::new(all).with_table(table.clone(), index)),
            ),
        })
    }

    /// What frame `frame` holds, for messages.
    pub fn frame_holds(&self, index: Option<&ArchiveIndex>, frame: u32) -> String {
        let at = match &self.layout {
            Layout::Seekable { frames, .. } => frames.frame(frame as usize).map_or(0, |f| f.0),
            Layout::Plain => 0,
        };
        frame_holds(index, frame, at)
    }
}
