//! The one error type of the format module: every variant names the rule
//! that was broken and, for reader errors, the archive offset where it was.

use std::io;

use super::DevId;

/// A device the reader found incomplete at the end of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingClusters {
    /// The device.
    pub dev: DevId,
    /// Its name.
    pub name: String,
    /// How many of its clusters never appeared.
    pub missing: u64,
    /// The lowest missing cluster number.
    pub first: u64,
}

impl std::fmt::Display for MissingClusters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {} '{}': {} cluster(s) missing, first missing cluster {}",
            self.dev, self.name, self.missing, self.first
        )
    }
}

fn join(m: &[MissingClusters]) -> String {
    m.iter()
        .map(|m| m.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Everything that can go wrong encoding, writing or reading a VMA archive.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing the underlying stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    // ---- reader: framing ----
    /// Reading an extent from the underlying stream failed (a broken
    /// pipe, a corrupt compressed frame, a failed decompressor).
    #[error("extent {extent} (offset {offset}): cannot read {what}: {source}")]
    ReadFailed {
        /// Where the extent starts.
        offset: u64,
        /// Its number (0: the first extent).
        extent: u64,
        /// Which part of it.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The stream ended inside a structure.
    #[error("offset {offset}: archive truncated inside {what} ({got} of {need} bytes present)")]
    Truncated {
        /// Where the structure starts.
        offset: u64,
        /// Which structure.
        what: &'static str,
        /// Bytes it needs.
        need: u64,
        /// Bytes that were there.
        got: u64,
    },
    /// A magic number did not match.
    #[error("offset {offset}: bad {what} magic {found:02x?} (expected {expected:02x?})")]
    BadMagic {
        /// Where the magic is.
        offset: u64,
        /// Archive or extent header.
        what: &'static str,
        /// Bytes found.
        found: [u8; 4],
        /// Bytes required.
        expected: [u8; 4],
    },
    /// A stored md5 did not match the computed one.
    #[error("offset {offset}: {what} md5 mismatch (stored {stored}, computed {computed})")]
    BadChecksum {
        /// Where the checksummed structure starts.
        offset: u64,
        /// Archive or extent header.
        what: &'static str,
        /// md5 in the file, hex.
        stored: String,
        /// md5 of the bytes, hex.
        computed: String,
    },
    /// The header's version field is not 1.
    #[error("offset 4: unsupported VMA version {0} (only 1 exists)")]
    UnsupportedVersion(u32),
    /// A header size/offset field is out of bounds.
    #[error("offset {offset}: {field} = {value} is invalid: {rule}")]
    BadHeaderField {
        /// Offset of the field.
        offset: u64,
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A blob pointer does not point at the start of a blob entry.
    #[error("offset {offset}: {what} pointer {ptr} does not point at a blob in the blob area")]
    BadBlobPointer {
        /// Offset of the pointer field.
        offset: u64,
        /// What the pointer names.
        what: String,
        /// The pointer value.
        ptr: u32,
    },
    /// A name blob lacks its NUL terminator or is not UTF-8.
    #[error("offset {offset}: {what} at blob {ptr} is not a NUL-terminated UTF-8 string")]
    BadName {
        /// Offset of the pointer field.
        offset: u64,
        /// What the string names.
        what: String,
        /// The pointer value.
        ptr: u32,
    },
    /// The same name is used twice.
    #[error("duplicate {what} name '{name}'")]
    DuplicateName {
        /// Config or device.
        what: &'static str,
        /// The name.
        name: String,
    },

    // ---- reader: extents ----
    /// An extent header's uuid differs from the archive's.
    #[error("offset {offset}: extent uuid {found} does not match archive uuid {expected}")]
    UuidMismatch {
        /// Extent offset.
        offset: u64,
        /// uuid in the extent.
        found: uuid::Uuid,
        /// uuid of the archive.
        expected: uuid::Uuid,
    },
    /// A reserved field that must be zero is not.
    #[error("offset {offset}: reserved field {field} is {value:#x}, must be 0")]
    ReservedNotZero {
        /// Offset of the field.
        offset: u64,
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// `block_count` disagrees with the masks.
    #[error(
        "offset {offset}: extent block_count {block_count} but its masks mark {mask_blocks} blocks"
    )]
    BlockCountMismatch {
        /// Extent offset.
        offset: u64,
        /// Stored block_count.
        block_count: u64,
        /// Sum of mask popcounts.
        mask_blocks: u64,
    },
    /// A blockinfo names a dev_id the header does not define.
    #[error("offset {offset}: blockinfo names unknown device {dev}")]
    UnknownDevice {
        /// Offset of the blockinfo.
        offset: u64,
        /// The dev_id.
        dev: u8,
    },
    /// A cluster number is at or past the device end.
    #[error(
        "offset {offset}: cluster {cluster} of device {dev} is past its end ({clusters} clusters)"
    )]
    ClusterOutOfRange {
        /// Offset of the blockinfo (0 for writer errors).
        offset: u64,
        /// The device.
        dev: DevId,
        /// The cluster number.
        cluster: u64,
        /// Clusters the device has.
        clusters: u64,
    },
    /// A mask bit is set for a 4 KiB block wholly past the device end.
    #[error(
        "offset {offset}: cluster {cluster} of device {dev} has mask {mask:#06x}, which stores blocks past the device end (size {size})"
    )]
    MaskPastEnd {
        /// Offset of the blockinfo.
        offset: u64,
        /// The device.
        dev: DevId,
        /// The cluster number.
        cluster: u64,
        /// The mask.
        mask: u16,
        /// Device size in bytes.
        size: u64,
    },
    /// A cluster appears a second time.
    #[error("offset {offset}: cluster {cluster} of device {dev} appears twice")]
    DuplicateCluster {
        /// Offset of the second blockinfo (0 for writer errors).
        offset: u64,
        /// The device.
        dev: DevId,
        /// The cluster number.
        cluster: u64,
    },
    /// Clusters are missing at the end of the stream.
    #[error("offset {offset}: archive ends with clusters missing: {}", join(.missing))]
    Incomplete {
        /// End-of-stream offset.
        offset: u64,
        /// The incomplete devices.
        missing: Vec<MissingClusters>,
    },

    // ---- writer ----
    /// More than 254 devices.
    #[error("too many devices: at most {max} fit in an archive")]
    TooManyDevices {
        /// The limit.
        max: usize,
    },
    /// More than 256 configs.
    #[error("too many configs: at most {max} fit in an archive")]
    TooManyConfigs {
        /// The limit.
        max: usize,
    },
    /// A blob longer than 65535 bytes.
    #[error("{what} is {len} bytes, more than the {max} a VMA blob can hold")]
    BlobTooLarge {
        /// What the blob is.
        what: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A device of size 0.
    #[error("device '{0}' has size 0; VMA devices must not be empty")]
    ZeroSizeDevice(String),
    /// A device larger than 2^32 clusters.
    #[error("device '{name}' is {size} bytes, more than VMA's {max} bytes")]
    DeviceTooLarge {
        /// Device name.
        name: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// An empty name or one with a NUL byte.
    #[error("invalid {what} name {name:?}: {rule}")]
    InvalidName {
        /// Config or device.
        what: &'static str,
        /// The name.
        name: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A dev_id the writer never handed out.
    #[error("unknown device {0}")]
    NoSuchDevice(DevId),
    /// Cluster data of the wrong length.
    #[error("cluster {cluster} of device {dev} must be {expected} bytes, got {got}")]
    ClusterLength {
        /// The device.
        dev: DevId,
        /// The cluster.
        cluster: u64,
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// Clusters-per-extent setting out of range.
    #[error("clusters per extent must be 1..={max}, got {got}")]
    ClustersPerExtent {
        /// Given value.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// The header does not fit the limits.
    #[error("header would be {size} bytes, more than {max}")]
    HeaderTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Neither a config nor a device: the header would have no blob table,
    /// and readers (Proxmox's too) refuse a header of exactly 12288 bytes.
    #[error("an archive needs at least one config or one device")]
    EmptyArchive,
    /// `finish` was called with clusters still missing.
    #[error("archive incomplete: {}", join(.0))]
    Unfinished(Vec<MissingClusters>),
}

impl From<FormatError> for io::Error {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}
