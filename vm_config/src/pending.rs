//! Devices and sections of Cloud Hypervisor's configuration that Nimbus reads but cannot build
//! yet. They are typed like Cloud Hypervisor's, so a malformed one is a clear parse error and a
//! well-formed one round-trips through `vm.info`; [`crate::VmConfig::validate`] refuses them by
//! name when they ask for something.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::is_false;

fn one() -> usize {
    1
}

/// A VFIO passthrough device (CH `DeviceConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// The device's sysfs path (absent for a device given by descriptor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Behind a virtual IOMMU.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Device identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
    /// NVIDIA GPUDirect clique id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_nv_gpudirect_clique: Option<u8>,
}

/// A vfio-user device (CH `UserDeviceConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeviceConfig {
    /// The vfio-user server's socket.
    pub socket: PathBuf,
    /// Device identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

/// A vDPA device (CH `VdpaConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdpaConfig {
    /// The vhost-vdpa character device.
    pub path: PathBuf,
    /// Queues.
    #[serde(default = "one")]
    pub num_queues: usize,
    /// Behind a virtual IOMMU.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Device identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

/// Any virtio device served by a vhost-user backend (CH 52+ `GenericVhostUserConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenericVhostUserConfig {
    /// Device identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Behind a virtual IOMMU.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
    /// PCI slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// The backend's socket.
    pub socket: PathBuf,
    /// Size of each queue.
    pub queue_sizes: Vec<u16>,
    /// The virtio device type number.
    pub device_type: u32,
}

/// A TPM behind a swtpm socket (CH `TpmConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmConfig {
    /// The swtpm control socket.
    pub socket: PathBuf,
}

/// A Landlock rule (CH `LandlockConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockConfig {
    /// The path the rule is about.
    pub path: PathBuf,
    /// Allowed access (`r`, `w`, `rw`).
    pub access: String,
}

/// A list section whose elements are kept as JSON objects (NUMA nodes, per-segment PCI
/// options, rate-limiter groups).
pub type ObjectList = Vec<serde_json::Map<String, serde_json::Value>>;
