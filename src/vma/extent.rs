//! Extent headers and blockinfo words (§3): pure encoding and decoding, no
//! IO.

use uuid::Uuid;

use std::ops::Range;

use super::consts::*;
use super::header::hex;
use super::{FormatError, cluster};

/// One blockinfo word (§3.2): which cluster of which device, and which of
/// its 4 KiB blocks are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// Bit i set: block i of the cluster is stored; clear: it is zero.
    pub mask: u16,
    /// Device; 0 marks an unused slot.
    pub dev: u8,
    /// Cluster number within the device.
    pub cluster: u32,
}

impl BlockInfo {
    /// Packs into the on-disk u64: mask 63..48, reserved 47..40, dev_id
    /// 39..32, cluster 31..0.
    pub fn encode(self) -> u64 {
        (u64::from(self.mask) << 48) | (u64::from(self.dev) << 32) | u64::from(self.cluster)
    }

    /// Unpacks the on-disk u64; the reserved byte is ignored, as Proxmox's
    /// reader ignores it.
    pub fn decode(v: u64) -> Self {
        BlockInfo {
            mask: (v >> 48) as u16,
            dev: (v >> 32) as u8,
            cluster: v as u32,
        }
    }

    /// Number of stored 4 KiB blocks.
    pub fn blocks(self) -> usize {
        self.mask.count_ones() as usize
    }

    /// Bytes of payload the cluster takes in its extent.
    pub fn stored_len(self) -> usize {
        cluster::stored_len(self.mask)
    }
}

/// A decoded extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentHeader {
    /// Payload blocks that follow the header.
    pub block_count: u16,
    /// The archive uuid.
    pub uuid: Uuid,
    /// All 59 blockinfo slots; slots with dev_id 0 are unused.
    pub slots: [BlockInfo; VMA_BLOCKS_PER_EXTENT],
}

impl ExtentHeader {
    /// The used slots in order, with their slot index.
    pub fn entries(&self) -> impl Iterator<Item = (usize, BlockInfo)> + '_ {
        self.slots
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, b)| b.dev != 0)
    }

    /// Bytes of payload after the 512-byte header.
    pub fn payload_len(&self) -> usize {
        self.block_count as usize * VMA_BLOCK_SIZE
    }

    /// Encodes the 512-byte header with its md5. `entries` fill the first
    /// slots; the rest stay zero. `block_count` is derived from the masks.
    pub fn encode(uuid: &Uuid, entries: &[BlockInfo]) -> [u8; VMA_EXTENT_HEADER_SIZE] {
        assert!(entries.len() <= VMA_BLOCKS_PER_EXTENT);
        let mut b = [0u8; VMA_EXTENT_HEADER_SIZE];
        let blocks: usize = entries.iter().map(|e| e.blocks()).sum();
        b[offset::EXT_MAGIC..offset::EXT_MAGIC + 4].copy_from_slice(&VMA_EXTENT_MAGIC);
        b[offset::EXT_BLOCK_COUNT..offset::EXT_BLOCK_COUNT + 2]
            .copy_from_slice(&(blocks as u16).to_be_bytes());
        b[offset::EXT_UUID..offset::EXT_UUID + 16].copy_from_slice(uuid.as_bytes());
        for (i, e) in entries.iter().enumerate() {
            let at = offset::EXT_BLOCKINFO + 8 * i;
            b[at..at + 8].copy_from_slice(&e.encode().to_be_bytes());
        }
        let digest = md5::compute(b);
        b[offset::EXT_MD5SUM..offset::EXT_MD5SUM + 16].copy_from_slice(&digest.0);
        b
    }

    /// Decodes and checks an extent header found at archive offset `at`:
    /// md5, uuid, magic and reserved1, then block_count against the masks
    /// (Proxmox's order).
    pub fn decode(
        b: &[u8; VMA_EXTENT_HEADER_SIZE],
        uuid: &Uuid,
        at: u64,
    ) -> Result<Self, FormatError> {
        let stored: [u8; 16] = b[offset::EXT_MD5SUM..offset::EXT_MD5SUM + 16]
            .try_into()
            .unwrap();
        let mut copy = *b;
        copy[offset::EXT_MD5SUM..offset::EXT_MD5SUM + 16].fill(0);
        let computed = md5::compute(copy);
        if computed.0 != stored {
            // A wrong magic is the likelier story when the md5 fails too;
            // say so, since "bad md5" hides that we are not at an extent.
            check_magic(b, at)?;
            return Err(FormatError::BadChecksum {
                offset: at,
                what: "extent header",
                stored: hex(&stored),
                computed: hex(&computed.0),
            });
        }
        let found = Uuid::from_bytes(
            b[offset::EXT_UUID..offset::EXT_UUID + 16]
                .try_into()
                .unwrap(),
        );
        if found != *uuid {
            return Err(FormatError::UuidMismatch {
                offset: at,
                found,
                expected: *uuid,
            });
        }
        check_magic(b, at)?;
        let reserved = u16::from_be_bytes([b[4], b[5]]);
        if reserved != 0 {
            return Err(FormatError::ReservedNotZero {
                offset: at + offset::EXT_RESERVED1 as u64,
                field: "reserved1",
                value: reserved.into(),
            });
        }
        let block_count = u16::from_be_bytes([b[6], b[7]]);
        let mut slots = [BlockInfo {
            mask: 0,
            dev: 0,
            cluster: 0,
        }; VMA_BLOCKS_PER_EXTENT];
        let mut mask_blocks = 0u64;
        for (i, slot) in slots.iter_mut().enumerate() {
            let p = offset::EXT_BLOCKINFO + 8 * i;
            *slot = BlockInfo::decode(u64::from_be_bytes(b[p..p + 8].try_into().unwrap()));
            if slot.dev != 0 {
                mask_blocks += slot.blocks() as u64;
            }
        }
        if mask_blocks != u64::from(block_count) {
            return Err(FormatError::BlockCountMismatch {
                offset: at + offset::EXT_BLOCK_COUNT as u64,
                block_count: block_count.into(),
                mask_blocks,
            });
        }
        Ok(ExtentHeader {
            block_count,
            uuid: found,
            slots,
        })
    }
}

/// The extent magic of the header at archive offset `at`.
fn check_magic(b: &[u8; VMA_EXTENT_HEADER_SIZE], at: u64) -> Result<(), FormatError> {
    let magic: [u8; 4] = b[offset::EXT_MAGIC..offset::EXT_MAGIC + 4]
        .try_into()
        .unwrap();
    if magic != VMA_EXTENT_MAGIC {
        return Err(FormatError::BadMagic {
            offset: at,
            what: "extent",
            found: magic,
            expected: VMA_EXTENT_MAGIC,
        });
    }
    Ok(())
}

/// Offset, within an extent, of blockinfo slot `i` (for error messages).
pub fn blockinfo_offset(extent_at: u64, slot: usize) -> u64 {
    extent_at + (offset::EXT_BLOCKINFO + 8 * slot) as u64
}

/// Archive offset of the payload of the extent whose header is at
/// `extent_at`.
pub fn payload_offset(extent_at: u64) -> u64 {
    extent_at + VMA_EXTENT_HEADER_SIZE as u64
}

/// The used entries of an extent, in order, each with the bytes of the
/// payload that hold its stored blocks (§5.3).
pub fn payload_ranges(
    entries: &[BlockInfo],
) -> impl Iterator<Item = (BlockInfo, Range<usize>)> + '_ {
    let mut pos = 0;
    entries.iter().map(move |&e| {
        let start = pos;
        pos += e.stored_len();
        (e, start..pos)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blockinfo_bit_layout() {
        let b = BlockInfo {
            mask: 0x0005,
            dev: 3,
            cluster: 0x0102_0304,
        };
        assert_eq!(b.encode(), 0x0005_0003_0102_0304);
        assert_eq!(BlockInfo::decode(0x0005_ff03_0102_0304), b);
    }

    #[test]
    fn round_trip_and_rejections() {
        let u = Uuid::from_bytes([9; 16]);
        let entries = [
            BlockInfo {
                mask: 0xffff,
                dev: 1,
                cluster: 7,
            },
            BlockInfo {
                mask: 0,
                dev: 2,
                cluster: 0,
            },
            BlockInfo {
                mask: 0x0005,
                dev: 1,
                cluster: 3,
            },
        ];
        let b = ExtentHeader::encode(&u, &entries);
        let h = ExtentHeader::decode(&b, &u, 0).unwrap();
        assert_eq!(h.block_count, 18);
        assert_eq!(h.entries().map(|(_, e)| e).collect::<Vec<_>>(), entries);
        let ranges: Vec<_> = payload_ranges(&entries).map(|(_, r)| r).collect();
        assert_eq!(ranges, [0..65536, 65536..65536, 65536..73728]);
        assert_eq!(payload_offset(1000), 1512);

        let other = Uuid::from_bytes([1; 16]);
        assert!(matches!(
            ExtentHeader::decode(&b, &other, 0),
            Err(FormatError::UuidMismatch { .. })
        ));
        let mut bad = b;
        bad[100] ^= 1;
        assert!(matches!(
            ExtentHeader::decode(&bad, &u, 0),
            Err(FormatError::BadChecksum { .. })
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            ExtentHeader::decode(&bad, &u, 0),
            Err(FormatError::BadMagic { .. })
        ));
        let reseal = |mut x: [u8; 512]| {
            x[24..40].fill(0);
            let d = md5::compute(x);
            x[24..40].copy_from_slice(&d.0);
            x
        };
        let mut bad = b;
        bad[7] = 17;
        assert!(matches!(
            ExtentHeader::decode(&reseal(bad), &u, 0),
            Err(FormatError::BlockCountMismatch { .. })
        ));
        let mut bad = b;
        bad[5] = 1;
        assert!(matches!(
            ExtentHeader::decode(&reseal(bad), &u, 0),
            Err(FormatError::ReservedNotZero { .. })
        ));
    }
}
