//! virtio-pmem devices (CH `PmemConfig`): a host file mapped into the guest's physical address
//! space as persistent memory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{is_false, size, ConfigError};

/// Granularity of a pmem device's size: the guest maps it in 2 MiB pages (Linux refuses
/// regions that are not aligned so).
pub const PMEM_ALIGN: u64 = 2 << 20;

/// A virtio-pmem device (CH `PmemConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemConfig {
    /// Backing file (a regular file).
    pub file: PathBuf,
    /// Size in bytes (the file's size when absent; CLI accepts K/M/G suffixes); a file shorter
    /// than this is extended.
    #[serde(
        default,
        deserialize_with = "size::deserialize_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub size: Option<u64>,
    /// Behind a virtual IOMMU (not supported).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Guest writes are not written back to the file (a private mapping).
    #[serde(default)]
    pub discard_writes: bool,
    /// Device identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

impl PmemConfig {
    /// Checks what can be checked without touching the file.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let name = self
            .id
            .clone()
            .unwrap_or_else(|| self.file.display().to_string());
        let err = |m: String| Err(ConfigError::Device(format!("pmem {name}: {m}")));
        if self.file.as_os_str().is_empty() {
            return err("file is required".into());
        }
        if self.iommu {
            return err("iommu is not supported".into());
        }
        if let Some(size) = self.size {
            if size == 0 || size % PMEM_ALIGN != 0 {
                return err(format!("size {size} is not a non-zero multiple of 2 MiB"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pmem(s: &str) -> PmemConfig {
        crate::kv::from_str(s).expect("parses")
    }

    #[test]
    fn cli_keys_and_defaults() {
        let p = pmem("file=/p,size=4M,discard_writes=on,id=pm");
        assert_eq!(p.file, PathBuf::from("/p"));
        assert_eq!(p.size, Some(4 << 20));
        assert!(p.discard_writes && !p.iommu);
        assert_eq!(p.id.as_deref(), Some("pm"));
        p.validate().expect("valid");
        let p: PmemConfig = serde_json::from_str(r#"{"file":"/p"}"#).expect("json");
        assert_eq!((p.size, p.discard_writes, p.pci_segment), (None, false, 0));
        assert_eq!(
            serde_json::to_string(&p).expect("json"),
            r#"{"file":"/p","discard_writes":false,"pci_segment":0}"#
        );
    }

    #[test]
    fn validation_names_the_field() {
        for (s, want) in [
            ("file=/p,size=3M", "multiple of 2 MiB"),
            ("file=/p,size=0", "multiple of 2 MiB"),
            ("file=/p,iommu=on", "iommu"),
        ] {
            let e = pmem(s).validate().expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        let empty: PmemConfig = serde_json::from_str(r#"{"file":""}"#).expect("json");
        let e = empty.validate().expect_err("empty").to_string();
        assert!(e.contains("file is required"), "{e}");
    }
}
