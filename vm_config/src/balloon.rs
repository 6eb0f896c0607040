//! The memory balloon (CH `BalloonConfig`).

use serde::{Deserialize, Serialize};

use crate::{size, ConfigError};

/// Id of the balloon device (Cloud Hypervisor's; it is not written into the configuration).
pub const BALLOON_DEVICE_ID: &str = "__balloon";

/// The memory balloon (CH `BalloonConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// The balloon's target size in bytes (what the guest is asked to give back); `vm.resize`
    /// `desired_balloon` changes it.
    #[serde(deserialize_with = "size::deserialize")]
    pub size: u64,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest may deflate when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`: the guest reports free pages, which the host drops.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// The size must leave the guest some RAM: below `ram` bytes.
    pub(crate) fn validate(&self, ram: u64) -> Result<(), ConfigError> {
        if self.size >= ram {
            return Err(ConfigError::Device(format!(
                "balloon: size {} is not below the RAM size {ram}",
                self.size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_keys_defaults_and_validation() {
        let b: BalloonConfig =
            crate::kv::from_str("size=64M,deflate_on_oom=on,free_page_reporting=on").expect("kv");
        assert_eq!(b.size, 64 << 20);
        assert!(b.deflate_on_oom && b.free_page_reporting);
        b.validate(128 << 20).expect("fits");
        let e = b.validate(64 << 20).expect_err("all of RAM").to_string();
        assert!(e.contains("not below the RAM size"), "{e}");
        let b: BalloonConfig = serde_json::from_str(r#"{"size":0}"#).expect("json");
        assert!(!b.deflate_on_oom && !b.free_page_reporting);
        assert_eq!(
            serde_json::to_string(&b).expect("json"),
            r#"{"size":0,"deflate_on_oom":false,"free_page_reporting":false}"#
        );
    }
}
