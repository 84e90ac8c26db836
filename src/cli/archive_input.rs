//! Opening an archive for reading: a path or `-` for stdin, plain or
//! zstd-compressed (detected by the zstd frame magic, so `.vma.zst` files
//! and `zstd -c` pipes read like plain archives).

use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::fd::AsFd;

use anyhow::Context;

/// First bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Opens `path` (`-` = stdin) as a stream of plain VMA bytes.
pub fn open(path: &str) -> anyhow::Result<Box<dyn Read + Send>> {
    let file = if path == "-" {
        // An unbuffered handle on fd 0; the reader does large reads itself.
        File::from(io::stdin().as_fd().try_clone_to_owned()?)
    } else {
        File::open(path).with_context(|| format!("cannot open archive {path}"))?
    };
    let mut file = file;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read archive {path}")),
        }
    }
    let stream = Cursor::new(magic[..got].to_vec()).chain(file);
    if got == 4 && magic == ZSTD_MAGIC {
        let dec = zstd::stream::read::Decoder::new(stream)
            .with_context(|| format!("cannot start zstd decompression of {path}"))?;
        Ok(Box::new(dec))
    } else {
        Ok(Box::new(stream))
    }
}
