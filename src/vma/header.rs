//! The archive header (§2): pure encoding and decoding, no IO.
//!
//! [`Header::encode`] lays out the blob table exactly as Proxmox's writer
//! does (configs in the order added, then device names), so the same inputs
//! give the same bytes. [`Header::decode`] runs Proxmox's reader checks in
//! its order, plus a few it misses (see `format/VMA.md` §7).

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::consts::*;
use super::{DevId, FormatError, cluster};

/// One config blob (e.g. `qemu-server.conf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// File name, without directories.
    pub name: String,
    /// Raw content.
    pub data: Vec<u8>,
}

/// One device (drive) of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its id in blockinfos; also its header slot.
    pub id: DevId,
    /// Name, e.g. `drive-scsi0`.
    pub name: String,
    /// Size in bytes (> 0, any value).
    pub size: u64,
}

impl Device {
    /// Number of 64 KiB clusters, the last one possibly partial.
    pub fn clusters(&self) -> u64 {
        cluster::clusters_of(self.size)
    }

    /// Bytes of `cluster` that lie inside the device: 65536, or less for the
    /// last cluster of a device whose size is not a multiple of 64 KiB.
    pub fn cluster_len(&self, cluster: u64) -> usize {
        cluster::cluster_len(self.size, cluster)
    }
}

/// A decoded (or to-be-encoded) archive header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Archive uuid, repeated in every extent.
    pub uuid: Uuid,
    /// Creation time, Unix seconds.
    pub ctime: i64,
    /// Config blobs in slot order.
    pub configs: Vec<Config>,
    /// Devices in dev_id order.
    pub devices: Vec<Device>,
}

/// Proxmox's blob table: starts at offset 1; when an entry does not fit,
/// the table's size grows by the entry's length rounded up to 512 (§3.4).
struct BlobTable {
    buf: Vec<u8>,
    pos: usize,
    /// Proxmox's size counter. It can end up one byte short of `pos` (an
    /// entry that exactly fills a step does not fit, because the table
    /// starts at 1); [`BlobTable::table_len`] mends that.
    size: usize,
}

impl BlobTable {
    fn new() -> Self {
        BlobTable {
            buf: Vec::new(),
            pos: 1,
            size: 0,
        }
    }

    fn push(&mut self, data: &[u8]) -> u32 {
        debug_assert!(data.len() <= VMA_MAX_BLOB_LEN);
        let need = self.pos + 2 + data.len();
        if self.size == 0 || self.size < need {
            self.size += (data.len() + 2).div_ceil(VMA_BLOB_TABLE_ALIGN) * VMA_BLOB_TABLE_ALIGN;
        }
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        let at = self.pos;
        self.buf[at..at + 2].copy_from_slice(&(data.len() as u16).to_le_bytes());
        self.buf[at + 2..need].copy_from_slice(data);
        self.pos = need;
        at as u32
    }

    /// The table as written: Proxmox's size, plus one more 512-byte step
    /// where Proxmox would write past its table (and produce a header its
    /// own reader refuses).
    fn table_len(&self) -> usize {
        let mut len = self.size;
        while len < self.pos {
            len += VMA_BLOB_TABLE_ALIGN;
        }
        len
    }
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().unwrap())
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Lower-case hex of an md5 digest, for error messages.
pub(crate) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a config or device name for what every VMA writer must refuse.
pub fn check_name(what: &'static str, name: &str) -> Result<(), FormatError> {
    let bad = |rule| {
        Err(FormatError::InvalidName {
            what,
            name: name.to_string(),
            rule,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    if name.len() + 1 > VMA_MAX_BLOB_LEN {
        return bad("longer than a blob can hold");
    }
    Ok(())
}

/// Checks that `name` works as a file name inside a directory, as
/// `extract` needs of config and device names: not empty, not `.` or `..`,
/// no `/`, no NUL. Not a format rule (VMA allows any NUL-free name), so the
/// writer does not enforce it; the CLI does for the names it is given.
pub fn check_file_name(what: &'static str, name: &str) -> Result<(), FormatError> {
    let rule = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "a directory reference"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(FormatError::InvalidName {
        what,
        name: name.to_string(),
        rule,
    })
}

impl Header {
    /// Encodes the whole header, `header_size` bytes, md5 filled in.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.configs.len() > VMA_MAX_CONFIGS {
            return Err(FormatError::TooManyConfigs {
                max: VMA_MAX_CONFIGS,
            });
        }
        if self.devices.len() > VMA_MAX_DEVICES {
            return Err(FormatError::TooManyDevices {
                max: VMA_MAX_DEVICES,
            });
        }
        let mut fixed = vec![0u8; VMA_HEADER_SIZE];
        let mut blobs = BlobTable::new();
        fixed[offset::MAGIC..offset::MAGIC + 4].copy_from_slice(&VMA_MAGIC);
        put32(&mut fixed, offset::VERSION, VMA_VERSION);
        fixed[offset::UUID..offset::UUID + 16].copy_from_slice(self.uuid.as_bytes());
        fixed[offset::CTIME..offset::CTIME + 8].copy_from_slice(&self.ctime.to_be_bytes());
        for (i, c) in self.configs.iter().enumerate() {
            check_name("config", &c.name)?;
            if c.data.len() > VMA_MAX_BLOB_LEN {
                return Err(FormatError::BlobTooLarge {
                    what: format!("config '{}'", c.name),
                    len: c.data.len(),
                    max: VMA_MAX_BLOB_LEN,
                });
            }
            let mut name = c.name.as_bytes().to_vec();
            name.push(0);
            let name_ptr = blobs.push(&name);
            let data_ptr = blobs.push(&c.data);
            put32(&mut fixed, offset::CONFIG_NAMES + 4 * i, name_ptr);
            put32(&mut fixed, offset::CONFIG_DATA + 4 * i, data_ptr);
        }
        for d in &self.devices {
            check_name("device", &d.name)?;
            if d.size == 0 {
                return Err(FormatError::ZeroSizeDevice(d.name.clone()));
            }
            let slot = d.id.0 as usize;
            if slot == 0 || slot > VMA_MAX_DEVICES {
                return Err(FormatError::NoSuchDevice(d.id));
            }
            let mut name = d.name.as_bytes().to_vec();
            name.push(0);
            let ptr = blobs.push(&name);
            let at = offset::DEV_INFO + slot * VMA_DEV_INFO_SIZE;
            put32(&mut fixed, at, ptr);
            fixed[at + 8..at + 16].copy_from_slice(&d.size.to_be_bytes());
        }
        if blobs.size == 0 {
            // header_size would be 12288, which Proxmox's reader rejects.
            return Err(FormatError::EmptyArchive);
        }
        let mut table = std::mem::take(&mut blobs.buf);
        table.resize(blobs.table_len(), 0);
        let header_size = VMA_HEADER_SIZE + table.len();
        if header_size > MAX_WRITE_HEADER_SIZE {
            return Err(FormatError::HeaderTooLarge {
                size: header_size,
                max: MAX_WRITE_HEADER_SIZE,
            });
        }
        put32(
            &mut fixed,
            offset::BLOB_BUFFER_OFFSET,
            VMA_HEADER_SIZE as u32,
        );
        // Proxmox records the used bytes (including unused byte 0), not the
        // allocated table size.
        put32(&mut fixed, offset::BLOB_BUFFER_SIZE, blobs.pos as u32);
        put32(&mut fixed, offset::HEADER_SIZE, header_size as u32);
        fixed.extend_from_slice(&table);
        let digest = md5::compute(&fixed);
        fixed[offset::MD5SUM..offset::MD5SUM + 16].copy_from_slice(&digest.0);
        Ok(fixed)
    }

    /// Checks the first [`VMA_HEADER_SIZE`] bytes far enough to know how
    /// many header bytes follow: magic and `header_size` bounds. Returns
    /// `header_size`.
    pub fn check_fixed(fixed: &[u8]) -> Result<usize, FormatError> {
        if fixed.len() < VMA_HEADER_SIZE {
            return Err(FormatError::Truncated {
                offset: 0,
                what: "archive header",
                need: VMA_HEADER_SIZE as u64,
                got: fixed.len() as u64,
            });
        }
        let magic: [u8; 4] = fixed[..4].try_into().unwrap();
        if magic != VMA_MAGIC {
            return Err(FormatError::BadMagic {
                offset: 0,
                what: "archive",
                found: magic,
                expected: VMA_MAGIC,
            });
        }
        let header_size = be32(fixed, offset::HEADER_SIZE) as usize;
        if header_size <= VMA_HEADER_SIZE {
            return Err(FormatError::BadHeaderField {
                offset: offset::HEADER_SIZE as u64,
                field: "header_size",
                value: header_size as u64,
                rule: "must be larger than the 12288-byte fixed header",
            });
        }
        if header_size > MAX_HEADER_SIZE {
            return Err(FormatError::BadHeaderField {
                offset: offset::HEADER_SIZE as u64,
                field: "header_size",
                value: header_size as u64,
                rule: "larger than any legal header (64 MiB)",
            });
        }
        Ok(header_size)
    }

    /// Decodes and validates a complete header (`buf` is exactly
    /// `header_size` bytes, as returned by [`Header::check_fixed`]).
    pub fn decode(buf: &[u8]) -> Result<Header, FormatError> {
        let header_size = Self::check_fixed(buf)?;
        if buf.len() != header_size {
            return Err(FormatError::Truncated {
                offset: 0,
                what: "archive header",
                need: header_size as u64,
                got: buf.len() as u64,
            });
        }
        let stored: [u8; 16] = buf[offset::MD5SUM..offset::MD5SUM + 16].try_into().unwrap();
        let mut ctx = md5::Context::new();
        ctx.consume(&buf[..offset::MD5SUM]);
        ctx.consume([0u8; 16]);
        ctx.consume(&buf[offset::MD5SUM + 16..]);
        let computed = ctx.finalize();
        if computed.0 != stored {
            return Err(FormatError::BadChecksum {
                offset: 0,
                what: "archive header",
                stored: hex(&stored),
                computed: hex(&computed.0),
            });
        }
        let version = be32(buf, offset::VERSION);
        if version != VMA_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let blob_off = be32(buf, offset::BLOB_BUFFER_OFFSET) as usize;
        let blob_size = be32(buf, offset::BLOB_BUFFER_SIZE) as usize;
        if blob_off < VMA_HEADER_SIZE {
            return Err(FormatError::BadHeaderField {
                offset: offset::BLOB_BUFFER_OFFSET as u64,
                field: "blob_buffer_offset",
                value: blob_off as u64,
                rule: "must not point into the fixed header (< 12288)",
            });
        }
        if blob_off + blob_size > header_size {
            return Err(FormatError::BadHeaderField {
                offset: offset::BLOB_BUFFER_SIZE as u64,
                field: "blob_buffer_size",
                value: blob_size as u64,
                rule: "blob area extends past header_size",
            });
        }
        // Only the entries some pointer names are kept: a 64 MiB blob area
        // of empty entries holds 33 million of them.
        let mut wanted = HashSet::new();
        for slot in 1..=VMA_MAX_DEVICES {
            wanted.insert(be32(buf, offset::DEV_INFO + slot * VMA_DEV_INFO_SIZE));
        }
        for i in 0..VMA_MAX_CONFIGS {
            wanted.insert(be32(buf, offset::CONFIG_NAMES + 4 * i));
            wanted.insert(be32(buf, offset::CONFIG_DATA + 4 * i));
        }
        let blobs = Blobs::parse(&buf[blob_off..blob_off + blob_size], &wanted);

        let mut devices = Vec::new();
        let mut names = HashSet::new();
        // Slot 255 is never written and Proxmox's tools ignore it (§3.2).
        for slot in 1..=VMA_MAX_DEVICES {
            let at = offset::DEV_INFO + slot * VMA_DEV_INFO_SIZE;
            let ptr = be32(buf, at);
            let size = be64(buf, at + 8);
            if size == 0 && ptr == 0 {
                continue;
            }
            if size == 0 {
                // Proxmox's reader skips such a slot; a writer never makes one.
                continue;
            }
            if size > MAX_DEVICE_SIZE {
                return Err(FormatError::BadHeaderField {
                    offset: (at + 8) as u64,
                    field: "device size",
                    value: size,
                    rule: "larger than 2^32 clusters of 64 KiB (256 TiB)",
                });
            }
            // Stricter than Proxmox, which silently drops a slot whose name
            // does not resolve: a sized slot is a device, and its name must
            // be valid (§10).
            let what = format!("device {slot} name");
            let name = blobs.string(ptr, at as u64, what)?;
            if !names.insert(name.clone()) {
                return Err(FormatError::DuplicateName {
                    what: "device",
                    name,
                });
            }
            devices.push(Device {
                id: DevId(slot as u8),
                name,
                size,
            });
        }
        let mut configs = Vec::new();
        for i in 0..VMA_MAX_CONFIGS {
            let name_at = offset::CONFIG_NAMES + 4 * i;
            let data_at = offset::CONFIG_DATA + 4 * i;
            let name_ptr = be32(buf, name_at);
            let data_ptr = be32(buf, data_at);
            if name_ptr == 0 || data_ptr == 0 {
                continue;
            }
            let name = blobs.string(name_ptr, name_at as u64, format!("config {i} name"))?;
            let data = blobs
                .get(data_ptr)
                .ok_or_else(|| FormatError::BadBlobPointer {
                    offset: data_at as u64,
                    what: format!("config '{name}' data"),
                    ptr: data_ptr,
                })?
                .to_vec();
            configs.push(Config { name, data });
        }
        Ok(Header {
            uuid: Uuid::from_bytes(buf[offset::UUID..offset::UUID + 16].try_into().unwrap()),
            ctime: i64::from_be_bytes(buf[offset::CTIME..offset::CTIME + 8].try_into().unwrap()),
            configs,
            devices,
        })
    }

    /// The device with id `dev`.
    pub fn device(&self, dev: DevId) -> Option<&Device> {
        self.devices.iter().find(|d| d.id == dev)
    }

    /// The config named `name`.
    pub fn config(&self, name: &str) -> Option<&Config> {
        self.configs.iter().find(|c| c.name == name)
    }
}

/// The entries of a blob area that pointers name, keyed by their start
/// offset.
struct Blobs<'a> {
    entries: HashMap<u32, &'a [u8]>,
}

impl<'a> Blobs<'a> {
    /// Walks entries from offset 1 while two length bytes remain, as
    /// Proxmox's reader does; an entry that does not fit ends the walk.
    /// Keeps the entries that start at one of the `wanted` offsets.
    fn parse(area: &'a [u8], wanted: &HashSet<u32>) -> Self {
        let mut entries = HashMap::new();
        let mut pos = 1usize;
        while pos + 2 <= area.len() {
            let len = u16::from_le_bytes([area[pos], area[pos + 1]]) as usize;
            let end = pos + 2 + len;
            if end > area.len() {
                break;
            }
            if wanted.contains(&(pos as u32)) {
                entries.insert(pos as u32, &area[pos + 2..end]);
            }
            pos = end;
        }
        Blobs { entries }
    }

    fn get(&self, ptr: u32) -> Option<&'a [u8]> {
        self.entries.get(&ptr).copied()
    }

    fn string(&self, ptr: u32, field_offset: u64, what: String) -> Result<String, FormatError> {
        let blob = self.get(ptr).ok_or_else(|| FormatError::BadBlobPointer {
            offset: field_offset,
            what: what.clone(),
            ptr,
        })?;
        let bad = || FormatError::BadName {
            offset: field_offset,
            what: what.clone(),
            ptr,
        };
        let (last, body) = blob.split_last().ok_or_else(bad)?;
        if *last != 0 || body.contains(&0) {
            return Err(bad());
        }
        String::from_utf8(body.to_vec()).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            uuid: Uuid::from_bytes([7; 16]),
            ctime: 1_700_000_000,
            configs: vec![Config {
                name: "qemu-server.conf".into(),
                data: vec![b'x'; 417],
            }],
            devices: vec![Device {
                id: DevId(1),
                name: "drive-scsi0".into(),
                size: 10 << 20,
            }],
        }
    }

    #[test]
    fn layout_matches_the_worked_example() {
        let buf = sample().encode().unwrap();
        assert_eq!(buf.len(), 12800);
        assert_eq!(be32(&buf, offset::HEADER_SIZE), 12800);
        assert_eq!(be32(&buf, offset::BLOB_BUFFER_SIZE), 453);
        assert_eq!(be32(&buf, offset::CONFIG_NAMES), 1);
        assert_eq!(be32(&buf, offset::CONFIG_DATA), 20);
        assert_eq!(be32(&buf, offset::DEV_INFO + 32), 439);
        assert_eq!(&buf[12288 + 1..12288 + 3], &17u16.to_le_bytes());
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
        let empty = Header {
            configs: vec![],
            devices: vec![],
            ..sample()
        };
        // No blobs at all would give header_size 12288, which readers refuse.
        assert!(matches!(empty.encode(), Err(FormatError::EmptyArchive)));
    }

    #[test]
    fn every_corruption_is_named() {
        let good = sample().encode().unwrap();
        let fix_md5 = |b: &mut Vec<u8>| {
            b[offset::MD5SUM..offset::MD5SUM + 16].fill(0);
            let d = md5::compute(&b[..]);
            b[offset::MD5SUM..offset::MD5SUM + 16].copy_from_slice(&d.0);
        };
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[100] ^= 1;
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadChecksum { .. })
        ));
        let mut b = good.clone();
        put32(&mut b, offset::VERSION, 2);
        fix_md5(&mut b);
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::UnsupportedVersion(2))
        ));
        let mut b = good.clone();
        put32(&mut b, offset::DEV_INFO + 32, 440);
        fix_md5(&mut b);
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadBlobPointer { .. })
        ));
        let mut b = good.clone();
        b[12288 + 439 + 2 + 11] = b'!'; // overwrite the NUL of "drive-scsi0"
        fix_md5(&mut b);
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadName { .. })
        ));
        let mut b = good.clone();
        put32(&mut b, offset::BLOB_BUFFER_SIZE, 1000);
        fix_md5(&mut b);
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadHeaderField { .. })
        ));
        let mut b = good.clone();
        put32(&mut b, offset::HEADER_SIZE, u32::MAX);
        assert!(matches!(
            Header::check_fixed(&b),
            Err(FormatError::BadHeaderField { .. })
        ));
    }
}
