//! The vsock device (CH `VsockConfig`): virtio-vsock with Cloud Hypervisor's hybrid Unix-socket
//! backend.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{is_false, ConfigError};

/// A virtio-vsock device with Cloud Hypervisor's hybrid Unix-socket backend (CH `VsockConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 and up; 0-2 and `u32::MAX` are reserved).
    pub cid: u32,
    /// The host Unix socket Nimbus listens on; guest connections to host port P go to
    /// `<socket>_<P>`.
    pub socket: PathBuf,
    /// Behind a virtual IOMMU (not supported; must stay false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Device identifier (generated, `_vsock<N>`, when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment (only 0 exists for now).
    #[serde(default)]
    pub pci_segment: u16,
}

impl VsockConfig {
    /// Checks the context id, the socket path and what Nimbus does not support.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Device`] naming the problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::Device(format!("vsock: {m}"));
        if self.cid < 3 || self.cid == u32::MAX {
            return Err(err(format!(
                "cid {} is reserved (the guest's must be in 3..{})",
                self.cid,
                u32::MAX
            )));
        }
        // sockaddr_un holds 107 bytes; `_<port>` adds up to 11.
        let len = self.socket.as_os_str().len();
        if len == 0 || len + 11 > 107 {
            return Err(err(format!(
                "socket path {} must be 1..=96 bytes",
                self.socket.display()
            )));
        }
        if self.iommu {
            return Err(err("iommu is not supported".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> VsockConfig {
        crate::parse_option("vsock", s).expect(s)
    }

    #[test]
    fn cloud_hypervisors_keys_and_checks() {
        let v = parse("cid=3,socket=/run/v.sock,id=vs,pci_segment=0");
        assert_eq!((v.cid, v.id.as_deref()), (3, Some("vs")));
        assert!(v.validate().is_ok());
        for bad in [
            "cid=2,socket=/v",
            "cid=4294967295,socket=/v",
            "cid=3,socket=/v,iommu=on",
        ] {
            assert!(parse(bad).validate().is_err(), "{bad}");
        }
        let long = format!("cid=3,socket=/{}", "x".repeat(100));
        assert!(parse(&long).validate().is_err());
        assert!(crate::parse_option::<VsockConfig>("vsock", "socket=/v").is_err());
    }
}
