//! The statistics Proxmox's `vma verify -v` and `vma extract -v` print while
//! they read an archive, computed with Proxmox's own arithmetic so that our
//! lines equal its lines (qmrestore and scripts parse them):
//!
//! - progress is clusters read against the sum of `size / 64 KiB` over the
//!   devices (rounded *down*, so it passes 100 % when a device ends in a
//!   partial cluster), printed whenever the integer percentage changes
//!   (never for 0 %);
//! - "bytes read" are whole clusters, 64 KiB each;
//! - "sparse bytes" are the 512-byte sectors of every block a mask leaves
//!   out, up to the device's last whole sector; those inside clusters that
//!   store some data are also the "4K zero blocks" of the second total line,
//!   taken as a share of the data that remains.
//!
//! Nothing here prints; the CLI decides where the lines go.

use super::Device;
use super::consts::{VMA_BLOCK_SIZE, VMA_BLOCKS_PER_CLUSTER, VMA_CLUSTER_SIZE};

/// Proxmox's reader works in sectors of this size.
const SECTOR: u64 = 512;

/// Name of the legacy VM-state stream, which has no size bound.
const VMSTATE: &str = "vmstate";

/// Running totals; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct RestoreStats {
    cluster_count: u64,
    clusters_read: u64,
    zero_bytes: u64,
    partial_zero_bytes: u64,
    last_percent: u64,
    start: Option<std::time::SystemTime>,
}

impl RestoreStats {
    /// Totals for reading `devices` (every device of the archive, also
    /// those an extract skips: Proxmox counts them too).
    pub fn new<'a>(devices: impl IntoIterator<Item = &'a Device>) -> Self {
        RestoreStats {
            cluster_count: devices
                .into_iter()
                .map(|d| d.size / VMA_CLUSTER_SIZE as u64)
                .sum(),
            start: Some(std::time::SystemTime::now()),
            ..Default::default()
        }
    }

    /// Counts one cluster of `dev` stored with `mask`. Returns the new
    /// progress line when the percentage changed.
    pub fn add_cluster(&mut self, dev: &Device, cluster: u64, mask: u16) -> Option<String> {
        self.clusters_read += 1;
        if mask != u16::MAX {
            let max_sector = if dev.name == VMSTATE {
                u64::MAX
            } else {
                dev.size / SECTOR
            };
            let base = cluster * VMA_CLUSTER_SIZE as u64;
            for block in 0..VMA_BLOCKS_PER_CLUSTER {
                if mask & (1 << block) != 0 {
                    continue;
                }
                let first = (base + (block * VMA_BLOCK_SIZE) as u64) / SECTOR;
                let end = (first + VMA_BLOCK_SIZE as u64 / SECTOR).min(max_sector);
                if end > first {
                    let bytes = (end - first) * SECTOR;
                    self.zero_bytes += bytes;
                    if mask != 0 {
                        self.partial_zero_bytes += bytes;
                    }
                }
            }
        }
        // Proxmox divides by zero here when every device is smaller than
        // a cluster; we print no progress then.
        let percent = (self.clusters_read * 100).checked_div(self.cluster_count)?;
        if percent == self.last_percent {
            return None;
        }
        self.last_percent = percent;
        let duration = self
            .start
            .and_then(|s| s.elapsed().ok())
            .map_or(0, |d| d.as_secs());
        Some(format!(
            "progress {percent}% (read {} bytes, duration {duration} sec)",
            self.bytes_read()
        ))
    }

    /// Whole clusters read, in bytes.
    pub fn bytes_read(&self) -> u64 {
        self.clusters_read * VMA_CLUSTER_SIZE as u64
    }

    /// The closing lines.
    pub fn summary(&self) -> Vec<String> {
        if self.clusters_read == 0 {
            return vec!["vma archive contains no image data".to_string()];
        }
        let read = self.bytes_read();
        let mut lines = vec![format!(
            "total bytes read {read}, sparse bytes {} ({}%)",
            self.zero_bytes,
            format_g3(100.0 * self.zero_bytes as f64 / read as f64)
        )];
        let data = read - self.zero_bytes;
        if data != 0 {
            lines.push(format!(
                "space reduction due to 4K zero blocks {}%",
                format_g3(100.0 * self.partial_zero_bytes as f64 / data as f64)
            ));
        }
        lines
    }
}

/// C's `printf("%.3g", x)` for the non-negative finite values percentages
/// take: three significant digits, trailing zeros removed, scientific
/// notation below 1e-4 and from 1e3 on.
pub fn format_g3(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return if x == 0.0 { "0".into() } else { x.to_string() };
    }
    // The exponent after rounding to three digits (99.96 becomes 100).
    let sci = format!("{x:.2e}");
    let (mantissa, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if !(-4..3).contains(&exp) {
        let m = trim_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{x:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vma::DevId;

    #[test]
    fn g3_matches_printf() {
        for (x, s) in [
            (50.893, "50.9"),
            (55.1515, "55.2"),
            (5.08, "5.08"),
            (0.818, "0.818"),
            (100.0, "100"),
            (99.96, "100"),
            (98.5, "98.5"),
            (7.0, "7"),
            (0.0, "0"),
            (0.00012345, "0.000123"),
            (0.000012345, "1.23e-05"),
            (1234.0, "1.23e+03"),
            (10.0, "10"),
            (0.5, "0.5"),
        ] {
            assert_eq!(format_g3(x), s, "{x}");
        }
    }

    #[test]
    fn counts_like_proxmox() {
        // One device of 70,000 bytes: clusters 0 (full) and 1 (4,464
        // bytes: 8 whole sectors and a partial one, which Proxmox drops).
        let dev = Device {
            id: DevId(1),
            name: "d".into(),
            size: 70_000,
        };
        let mut s = RestoreStats::new([&dev]);
        // Cluster 0: every block but block 3 stored.
        let line = s.add_cluster(&dev, 0, !(1 << 3)).unwrap();
        assert!(
            line.starts_with("progress 100% (read 65536 bytes"),
            "{line}"
        );
        // Cluster 1 all zero: only its 8 whole in-device sectors count.
        assert!(
            s.add_cluster(&dev, 1, 0)
                .unwrap()
                .starts_with("progress 200%")
        );
        assert_eq!(s.zero_bytes, 4096 + 8 * 512);
        assert_eq!(s.partial_zero_bytes, 4096);
        assert_eq!(
            s.summary(),
            [
                "total bytes read 131072, sparse bytes 8192 (6.25%)",
                "space reduction due to 4K zero blocks 3.33%"
            ]
        );
        let empty = RestoreStats::new([&dev]);
        assert_eq!(empty.summary(), ["vma archive contains no image data"]);
    }
}
