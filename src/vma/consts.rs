//! Every number of the VMA format, in the spelling of Proxmox's `vma.h` where
//! one exists. No logic. Sections (§) refer to `format/VMA.md`.

/// Magic at byte 0 of an archive: "VMA\0" (§2.1).
pub const VMA_MAGIC: [u8; 4] = *b"VMA\0";
/// Magic at byte 0 of every extent header: "VMAE" (§3.1).
pub const VMA_EXTENT_MAGIC: [u8; 4] = *b"VMAE";
/// The only format version there is (§2.1).
pub const VMA_VERSION: u32 = 1;

/// log2 of [`VMA_BLOCK_SIZE`].
pub const VMA_BLOCK_BITS: u32 = 12;
/// Unit of zero detection and of the blockinfo mask: 4 KiB (§3.2).
pub const VMA_BLOCK_SIZE: usize = 1 << VMA_BLOCK_BITS;
/// log2 of [`VMA_CLUSTER_SIZE`].
pub const VMA_CLUSTER_BITS: u32 = 16;
/// Unit of addressing inside a device: 64 KiB (§3.2).
pub const VMA_CLUSTER_SIZE: usize = 1 << VMA_CLUSTER_BITS;
/// 4 KiB blocks per cluster; one mask bit each.
pub const VMA_BLOCKS_PER_CLUSTER: usize = VMA_CLUSTER_SIZE / VMA_BLOCK_SIZE;

/// Size of an extent header (§3.1).
pub const VMA_EXTENT_HEADER_SIZE: usize = 512;
/// Blockinfo slots in an extent header, i.e. the most clusters one extent
/// can hold (§3.1). Proxmox calls this `VMA_BLOCKS_PER_EXTENT`.
pub const VMA_BLOCKS_PER_EXTENT: usize = 59;
/// Clusters per extent that Proxmox's writer actually emits: it flushes when
/// 58 are buffered, so slot 58 is always empty in archives it writes (§6).
/// Our default, so that our output matches Proxmox's byte for byte.
pub const PROXMOX_CLUSTERS_PER_EXTENT: usize = VMA_BLOCKS_PER_EXTENT - 1;
/// Largest extent on disk: header plus 59 full clusters.
pub const VMA_MAX_EXTENT_SIZE: usize =
    VMA_EXTENT_HEADER_SIZE + VMA_BLOCKS_PER_EXTENT * VMA_CLUSTER_SIZE;
/// Largest legal `block_count` of an extent.
pub const VMA_MAX_EXTENT_BLOCKS: usize = VMA_BLOCKS_PER_EXTENT * VMA_BLOCKS_PER_CLUSTER;

/// Size of the fixed part of the archive header (§2.1).
pub const VMA_HEADER_SIZE: usize = 12288;
/// Config slots in the header (§2.3).
pub const VMA_MAX_CONFIGS: usize = 256;
/// Device slots in the header; slot index == dev_id, slot 0 unused (§2.2).
pub const VMA_DEV_SLOTS: usize = 256;
/// Highest dev_id a writer may hand out: Proxmox keeps 255 "for safety"
/// (§2.2), so at most 254 devices.
pub const VMA_MAX_DEVICES: usize = 254;
/// Size of one device slot (§2.2).
pub const VMA_DEV_INFO_SIZE: usize = 32;
/// Longest blob: its length prefix is a u16 (§2.4).
pub const VMA_MAX_BLOB_LEN: usize = 65535;
/// The blob table grows in steps of this size, so `header_size` is 12288
/// plus a multiple of it (§2.4).
pub const VMA_BLOB_TABLE_ALIGN: usize = 512;

/// Header field offsets (§2.1).
pub mod offset {
    /// `magic`, 4 bytes.
    pub const MAGIC: usize = 0;
    /// `version`, u32 BE.
    pub const VERSION: usize = 4;
    /// `uuid`, 16 bytes.
    pub const UUID: usize = 8;
    /// `ctime`, i64 BE Unix seconds.
    pub const CTIME: usize = 24;
    /// `md5sum`, 16 bytes, zero while hashing.
    pub const MD5SUM: usize = 32;
    /// `blob_buffer_offset`, u32 BE.
    pub const BLOB_BUFFER_OFFSET: usize = 48;
    /// `blob_buffer_size`, u32 BE.
    pub const BLOB_BUFFER_SIZE: usize = 52;
    /// `header_size`, u32 BE.
    pub const HEADER_SIZE: usize = 56;
    /// `config_names[256]`, u32 BE blob pointers.
    pub const CONFIG_NAMES: usize = 2044;
    /// `config_data[256]`, u32 BE blob pointers.
    pub const CONFIG_DATA: usize = 3068;
    /// `dev_info[256]`, 32 bytes each.
    pub const DEV_INFO: usize = 4096;

    /// Extent header: `magic`.
    pub const EXT_MAGIC: usize = 0;
    /// Extent header: `reserved1`, u16, must be 0.
    pub const EXT_RESERVED1: usize = 4;
    /// Extent header: `block_count`, u16 BE.
    pub const EXT_BLOCK_COUNT: usize = 6;
    /// Extent header: `uuid`.
    pub const EXT_UUID: usize = 8;
    /// Extent header: `md5sum`, zero while hashing.
    pub const EXT_MD5SUM: usize = 24;
    /// Extent header: `blockinfo[59]`, u64 BE each.
    pub const EXT_BLOCKINFO: usize = 40;
}

/// Largest device: cluster numbers are u32 (§8).
pub const MAX_DEVICE_SIZE: u64 = (1u64 << 32) * VMA_CLUSTER_SIZE as u64;

/// Largest header our writer produces: Proxmox's writer builds its header
/// in a 512 KiB buffer and fails past it, so no archive Proxmox could have
/// written is larger (§8).
pub const MAX_WRITE_HEADER_SIZE: usize = 512 << 10;

/// Largest `header_size` our reader accepts. Larger than any legal header
/// (12288 + 1 + 766 blobs of 65537 bytes, about 48 MiB), so only a corrupt
/// header is refused; it bounds what a hostile header can make us allocate.
pub const MAX_HEADER_SIZE: usize = 64 << 20;
