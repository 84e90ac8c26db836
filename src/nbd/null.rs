//! [`NullBackend`]: an export that discards writes and reads as zeros.
//!
//! Used by benchmarks (it measures the protocol layer alone) and by tests
//! that only care about the conversation, not the data.

use std::io;

use bytes::Bytes;

use super::backend::{Backend, BackendCaps, BlockStatus};

/// Size of the shared zero buffer reads are served from; reads up to this
/// length cost no allocation. Matches the largest payload we accept.
const ZERO_BUF_LEN: usize = 32 << 20;

/// Never written: reads of untouched pages map the kernel's zero page, so this
/// costs no resident memory.
static ZEROS: [u8; ZERO_BUF_LEN] = [0; ZERO_BUF_LEN];

/// Discards every write; every read returns zeros; block status reports one
/// hole. Flush is trivially global, so multi-conn is advertised.
#[derive(Debug, Clone)]
pub struct NullBackend {
    size: u64,
    read_only: bool,
}

impl NullBackend {
    /// A writable null export of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
        }
    }

    /// A read-only null export of `size` bytes.
    pub fn read_only(size: u64) -> Self {
        Self {
            size,
            read_only: true,
        }
    }
}

impl Backend for NullBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            read_only: self.read_only,
            flush_is_global: true,
            fast_zero: true,
            trim: true,
        }
    }

    async fn write(&self, _offset: u64, _data: Bytes) -> io::Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _may_trim: bool) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn read(&self, _offset: u64, len: u32) -> io::Result<Bytes> {
        let len = len as usize;
        if len <= ZERO_BUF_LEN {
            Ok(Bytes::from_static(&ZEROS[..len]))
        } else {
            Ok(Bytes::from(vec![0u8; len]))
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<BlockStatus>> {
        let len = len.min(self.size.saturating_sub(offset));
        Ok(vec![BlockStatus {
            len,
            flags: BlockStatus::HOLE | BlockStatus::ZERO,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_zeros_and_reports_a_hole() {
        let b = NullBackend::new(1 << 20);
        b.write(0, Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(&b.read(0, 3).await.unwrap()[..], &[0, 0, 0]);
        assert_eq!(
            b.block_status(4096, 1 << 20).await.unwrap(),
            vec![BlockStatus {
                len: (1 << 20) - 4096,
                flags: 3
            }]
        );
        assert!(b.caps().flush_is_global);
        assert!(NullBackend::read_only(1).caps().read_only);
    }
}
