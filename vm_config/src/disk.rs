//! virtio-blk disks (Cloud Hypervisor's `DiskConfig`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{is_false, not_yet, ConfigError};

/// An image's format (CH `ImageType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    /// A fixed VHD (not supported yet).
    #[serde(alias = "vhd")]
    FixedVhd,
    /// QCOW2 (not supported yet).
    #[serde(alias = "qcow2")]
    Qcow2,
    /// Raw bytes.
    #[serde(alias = "raw")]
    Raw,
    /// VHDX (not supported yet).
    #[serde(alias = "vhdx")]
    Vhdx,
    /// Found out when the image is opened (and written back).
    #[default]
    #[serde(alias = "unknown")]
    Unknown,
}

fn default_num_queues() -> usize {
    1
}

fn default_queue_size() -> u16 {
    128
}

fn default_true() -> bool {
    true
}

fn default_poll_us() -> u32 {
    virtio_chain::poll::DEFAULT_POLL.as_micros() as u32
}

/// A virtio-blk disk (CH `DiskConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Device identifier (generated when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Behind a virtual IOMMU (not supported; must stay false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
    /// PCI slot on the segment's bus 0 (the first free one when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// Image file or block device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Request queues.
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Served by a vhost-user backend.
    #[serde(default)]
    pub vhost_user: bool,
    /// vhost-user socket (CLI: `socket=`).
    #[serde(default, alias = "socket", skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// Rate limiter group (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    /// Rate limiter (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    /// Cloud Hypervisor's io_uring switch: Nimbus does not use io_uring either way.
    #[serde(default)]
    pub disable_io_uring: bool,
    /// Cloud Hypervisor's Linux AIO switch: Nimbus does not use AIO either way.
    #[serde(default)]
    pub disable_aio: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Queue-to-host-CPU pinning (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<serde_json::Value>,
    /// Open backing files of layered images (not supported yet).
    #[serde(default)]
    pub backing_files: bool,
    /// Discarded ranges free host space (only `true` for now).
    #[serde(default = "default_true")]
    pub sparse: bool,
    /// The image's format; `Unknown` is probed when the image is opened.
    #[serde(default)]
    pub image_type: ImageType,
    /// Microseconds the disk's worker keeps polling a queue after serving it before it sleeps
    /// (0..=1000, 0: never; a Nimbus extension, QEMU's `poll-max-ns`).
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
}

impl DiskConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let name = self
            .id
            .clone()
            .or_else(|| self.path.as_ref().map(|p| p.display().to_string()))
            .or_else(|| self.vhost_socket.clone())
            .unwrap_or_else(|| "?".into());
        let err = |m: String| Err(ConfigError::Device(format!("disk {name}: {m}")));
        if self.path.is_none() && !self.vhost_user {
            return err("path is required".into());
        }
        if self.vhost_user && self.vhost_socket.is_none() {
            return err("vhost_user=on needs socket=PATH".into());
        }
        if self.iommu {
            return err("iommu is not supported".into());
        }
        if self.num_queues == 0 || self.num_queues > 64 {
            return err(format!("num_queues {} is not in 1..=64", self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || !(2..=1024).contains(&self.queue_size) {
            return err(format!(
                "queue_size {} is not a power of two in 2..=1024",
                self.queue_size
            ));
        }
        if self.serial.as_ref().is_some_and(|s| s.len() > 20) {
            return err("serial is longer than 20 bytes".into());
        }
        if self.poll_us > 1000 {
            return err(format!("poll_us {} is not in 0..=1000", self.poll_us));
        }
        if self.pci_device_id.is_some_and(|s| s == 0 || s > 31) {
            return err("pci_device_id must be in 1..=31".into());
        }
        if self.rate_limit_group.is_some() {
            return Err(not_yet("disk rate_limit_group"));
        }
        if self
            .rate_limiter_config
            .as_ref()
            .is_some_and(|r| !r.is_null())
        {
            return Err(not_yet("disk rate_limiter_config"));
        }
        if self.queue_affinity.as_ref().is_some_and(|q| !q.is_null()) {
            return Err(not_yet("disk queue_affinity"));
        }
        if self.backing_files {
            return Err(not_yet("disk backing_files"));
        }
        if !self.sparse {
            return Err(not_yet("disk sparse=off"));
        }
        if !matches!(self.image_type, ImageType::Raw | ImageType::Unknown) {
            return err(format!(
                "image_type {:?} is not supported yet (raw images only)",
                self.image_type
            ));
        }
        Ok(())
    }
}
