//! PCI segments: `platform.num_pci_segments`, the per-segment aperture weights
//! (`pci_segments`, CH's `PciSegmentConfig`) and every device's `pci_segment`.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, VmConfig};
use arch::x86_64::layout::{self, PciSegmentLayout};

fn one() -> u32 {
    1
}

/// How much of the PCI MMIO windows one segment gets (CH `PciSegmentConfig`): its share of each
/// window is proportional to its weight among all segments' weights (1 each by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSegmentConfig {
    /// The segment, below `platform.num_pci_segments`.
    pub pci_segment: u16,
    /// Weight of its share of the 32-bit window.
    #[serde(default = "one")]
    pub mmio32_aperture_weight: u32,
    /// Weight of its share of the 64-bit window.
    #[serde(default = "one")]
    pub mmio64_aperture_weight: u32,
}

impl VmConfig {
    /// The number of PCI segments (`platform.num_pci_segments`, 1 without `platform`).
    pub fn num_pci_segments(&self) -> u16 {
        self.platform.as_ref().map_or(1, |p| p.num_pci_segments)
    }

    /// Where each segment lives: ECAM area and its shares of the MMIO windows, segment `i` at
    /// index `i`.
    pub fn pci_segment_layouts(&self) -> Result<Vec<PciSegmentLayout>, ConfigError> {
        let mut weights = vec![(1, 1); usize::from(self.num_pci_segments())];
        for s in self.pci_segments.iter().flatten() {
            if let Some(w) = weights.get_mut(usize::from(s.pci_segment)) {
                *w = (s.mmio32_aperture_weight, s.mmio64_aperture_weight);
            }
        }
        layout::pci_segments(self.memory.reserved_size(), &weights)
            .map_err(|e| ConfigError::Device(format!("platform: {e}")))
    }

    /// `num_pci_segments` is 1..=16, each `pci_segments` entry names an existing segment once
    /// with usable weights, and every device sits on an existing segment.
    pub(crate) fn validate_pci_segments(&self) -> Result<(), ConfigError> {
        let count = self.num_pci_segments();
        if count == 0 || count > layout::MAX_PCI_SEGMENTS {
            return Err(ConfigError::Device(format!(
                "platform: num_pci_segments {count} is not in 1..={}",
                layout::MAX_PCI_SEGMENTS
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for s in self.pci_segments.iter().flatten() {
            if s.pci_segment >= count {
                return Err(ConfigError::Device(format!(
                    "pci_segments: segment {} does not exist (num_pci_segments {count})",
                    s.pci_segment
                )));
            }
            if !seen.insert(s.pci_segment) {
                return Err(ConfigError::Device(format!(
                    "pci_segments: segment {} is configured twice",
                    s.pci_segment
                )));
            }
        }
        self.pci_segment_layouts()?;
        let disks = self
            .disks
            .iter()
            .flatten()
            .map(|d| ("disk", &d.id, d.pci_segment));
        let nets = self
            .net
            .iter()
            .flatten()
            .map(|n| ("net", &n.id, n.pci_segment));
        let fs = self
            .fs
            .iter()
            .flatten()
            .map(|f| ("fs", &f.id, f.pci_segment));
        let vsock = self.vsock.iter().map(|v| ("vsock", &v.id, v.pci_segment));
        let pmem = self
            .pmem
            .iter()
            .flatten()
            .map(|p| ("pmem", &p.id, p.pci_segment));
        for (kind, id, segment) in disks.chain(nets).chain(fs).chain(vsock).chain(pmem) {
            if segment >= count {
                let id = id.as_deref().unwrap_or("(no id)");
                return Err(ConfigError::Device(format!(
                    "{kind} {id}: pci_segment {segment} does not exist (num_pci_segments \
                     {count}; set platform num_pci_segments)"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> VmConfig {
        let mut c: serde_json::Value = serde_json::from_str(
            r#"{"payload": {"kernel": "/k"}, "memory": {"size": 1073741824, "shared": true}}"#,
        )
        .expect("base");
        let p: serde_json::Value = serde_json::from_str(json).expect("patch");
        for (k, v) in p.as_object().expect("object") {
            c[k] = v.clone();
        }
        serde_json::from_value(c).expect(json)
    }

    #[test]
    fn devices_on_existing_segments_are_accepted() {
        let c = config(
            r#"{"platform": {"num_pci_segments": 16},
                "disks": [{"path": "/d", "pci_segment": 15}],
                "net": [{"tap": "t0", "pci_segment": 3}],
                "fs": [{"tag": "t", "socket": "/s", "pci_segment": 1}],
                "pci_segments": [{"pci_segment": 1, "mmio32_aperture_weight": 4}]}"#,
        );
        c.validate().expect("valid");
        let l = c.pci_segment_layouts().expect("layouts");
        assert_eq!(l.len(), 16);
        // 512 MiB / 19 units of weight = 26 MiB each; segment 1 has 4 of them.
        assert_eq!(l[1].mmio32.1, 4 * (26 << 20));
        assert_eq!(l[0].mmio32.1, 26 << 20);
        assert_eq!(l[1].mmio64.1, l[0].mmio64.1);
    }

    #[test]
    fn bad_segments_are_refused_by_name() {
        for (json, needle) in [
            (
                r#"{"platform": {"num_pci_segments": 0}}"#,
                "num_pci_segments 0 is not in 1..=16",
            ),
            (
                r#"{"platform": {"num_pci_segments": 17}}"#,
                "num_pci_segments 17",
            ),
            (
                r#"{"disks": [{"path": "/d", "pci_segment": 1}]}"#,
                "disk (no id): pci_segment 1 does not exist",
            ),
            (
                r#"{"platform": {"num_pci_segments": 2}, "fs": [{"id": "myfs", "tag": "t", "socket": "/s", "pci_segment": 2}]}"#,
                "fs myfs: pci_segment 2",
            ),
            (
                r#"{"net": [{"tap": "t0", "pci_segment": 65535}]}"#,
                "net (no id): pci_segment 65535",
            ),
            (
                r#"{"pci_segments": [{"pci_segment": 1}]}"#,
                "segment 1 does not exist",
            ),
            (
                r#"{"platform": {"num_pci_segments": 2}, "pci_segments": [{"pci_segment": 1}, {"pci_segment": 1}]}"#,
                "configured twice",
            ),
            (
                r#"{"pci_segments": [{"pci_segment": 0, "mmio64_aperture_weight": 0}]}"#,
                "aperture weight of 0",
            ),
            (
                r#"{"pci_segments": [{"pci_segment": 0, "mmio32_aperture_weight": 4294967295}]}"#,
                "mmio32 aperture weights add up to 4294967295",
            ),
        ] {
            let e = config(json).validate().expect_err(json).to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }
}
