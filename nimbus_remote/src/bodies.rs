//! The JSON bodies of the requests, for the endpoints whose structs `vm_config` does not have
//! (disks, interfaces and virtio-fs shares use `vm_config`'s own). Each struct reads CH's
//! `key=value,...` option through `vm_config::kv` and writes the JSON Cloud Hypervisor 51.1's
//! ch-remote sends: the same fields in the same order, unset options as `null`.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// Reads a byte size given as `512M`, `1G`, `4096` (K/M/G/T suffixes, binary multiples).
fn size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = String::deserialize(d)?;
    vm_config::parse_size(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn one() -> usize {
    1
}

/// `add-pmem`: a virtio-pmem device (CH `PmemConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemBody {
    /// Backing file.
    pub file: PathBuf,
    /// Size in bytes (the file's size when absent).
    #[serde(default, deserialize_with = "size_opt")]
    pub size: Option<u64>,
    /// Behind a virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Guest writes are not written back to the file.
    #[serde(default)]
    pub discard_writes: bool,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

/// `add-vsock`: a virtio-vsock device (CH `VsockConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockBody {
    /// The guest's context id.
    pub cid: u32,
    /// Host Unix socket of the hybrid vsock.
    pub socket: PathBuf,
    /// Behind a virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

/// `add-device`: a VFIO device (CH `DeviceConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBody {
    /// The device's sysfs path. Left out of the JSON when absent (a device given by `fd=`
    /// only, Cloud Hypervisor 52+); 51.1 requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Behind a virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
    /// NVIDIA GPUDirect clique id.
    #[serde(default)]
    pub x_nv_gpudirect_clique: Option<u8>,
    /// An open VFIO cdev descriptor (`fd=N`, Cloud Hypervisor 52+): sent with SCM_RIGHTS,
    /// never in the JSON.
    #[serde(default, skip_serializing)]
    pub fd: Option<i32>,
}

/// `add-user-device`: a vfio-user device (CH `UserDeviceConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeviceBody {
    /// The vfio-user server's socket.
    pub socket: PathBuf,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

/// `add-vdpa`: a vDPA device (CH `VdpaConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdpaBody {
    /// The vhost-vdpa character device.
    pub path: PathBuf,
    /// Queues.
    #[serde(default = "one")]
    pub num_queues: usize,
    /// Behind a virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
}

/// `add-generic-vhost-user`: any virtio device served by a vhost-user backend (CH 52+
/// `GenericVhostUserConfig`; written as CH writes it, unset options left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenericVhostUserBody {
    /// Device identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Behind a virtual IOMMU (written only when on).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub iommu: bool,
    /// PCI segment.
    pub pci_segment: u16,
    /// PCI slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// The backend's socket.
    pub socket: PathBuf,
    /// Size of each queue.
    pub queue_sizes: Vec<u16>,
    /// The virtio device type number.
    pub device_type: u32,
}

/// The scalar options of `add-generic-vhost-user` (its lists are read separately).
#[derive(Debug, Deserialize)]
pub struct GenericVhostUserOptions {
    /// `device_type=`: a virtio device type number or name.
    #[serde(alias = "virtio_id")]
    pub device_type: String,
    /// `socket=`.
    pub socket: PathBuf,
    /// `id=`.
    #[serde(default)]
    pub id: Option<String>,
    /// `iommu=`.
    #[serde(default)]
    pub iommu: bool,
    /// `pci_segment=`.
    #[serde(default)]
    pub pci_segment: u16,
    /// `pci_device_id=`.
    #[serde(default)]
    pub pci_device_id: Option<u8>,
}

/// Virtio device type names CH's `device_type=` accepts, with their numbers (virtio spec 5).
const VIRTIO_DEVICE_TYPES: &[(&str, u32)] = &[
    ("net", 1),
    ("block", 2),
    ("console", 3),
    ("rng", 4),
    ("balloon", 5),
    ("iomem", 6),
    ("rpmsg", 7),
    ("scsi", 8),
    ("9p", 9),
    ("mac80211_wlan", 10),
    ("rproc_serial", 11),
    ("caif", 12),
    ("memory_balloon", 13),
    ("gpu", 16),
    ("clock", 17),
    ("input", 18),
    ("vsock", 19),
    ("crypto", 20),
    ("signal_dist", 21),
    ("pstore", 22),
    ("iommu", 23),
    ("mem", 24),
    ("sound", 25),
    ("fs", 26),
    ("pmem", 27),
    ("rpmb", 28),
    ("mac80211_hwsim", 29),
    ("video_encoder", 30),
    ("video_decoder", 31),
    ("scmi", 32),
    ("nitro_sec_mod", 33),
    ("i2c", 34),
    ("watchdog", 35),
    ("can", 36),
    ("dmabuf", 37),
    ("param_serv", 38),
    ("audio_policy", 39),
    ("bt", 40),
    ("gpio", 41),
    ("rdma", 42),
    ("camera", 43),
    ("ism", 44),
    ("spi", 45),
    ("tee", 46),
    ("cpu_balloon", 47),
    ("media", 48),
    ("usb", 49),
];

/// Device types no vhost-user backend can serve (the VMM must see an IOMMU's translations and
/// a watchdog's resets), refused as CH refuses them.
const UNSUPPORTED_VHOST_USER_TYPES: &[u32] = &[23, 35];

/// The virtio device type number of `device_type=` (a name or a number from 1).
pub fn virtio_device_type(value: &str) -> Result<u32, String> {
    let number = match VIRTIO_DEVICE_TYPES.iter().find(|(name, _)| *name == value) {
        Some((_, number)) => *number,
        None => value
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("'{value}' is not a virtio device type name or number"))?,
    };
    if UNSUPPORTED_VHOST_USER_TYPES.contains(&number) {
        return Err(format!(
            "device type '{value}' cannot be served by a vhost-user backend"
        ));
    }
    Ok(number)
}

/// `remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoveDeviceBody {
    /// The device's id.
    pub id: String,
}

/// `resize`: every field is sent, unset ones as `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResizeBody {
    /// New vCPU count.
    pub desired_vcpus: Option<u32>,
    /// New RAM size in bytes.
    pub desired_ram: Option<u64>,
    /// New balloon size in bytes.
    pub desired_balloon: Option<u64>,
}

/// `resize-zone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResizeZoneBody {
    /// The memory zone's id.
    pub id: String,
    /// New size in bytes.
    pub desired_ram: u64,
}

/// `resize-disk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResizeDiskBody {
    /// The disk's id.
    pub id: String,
    /// New size in bytes.
    pub desired_size: u64,
}

/// `snapshot` and `coredump`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationBody {
    /// Where the snapshot or dump goes (`file:///dir` for a snapshot).
    pub destination_url: String,
}

/// `send-migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SendMigrationBody {
    /// Where the VM goes (`unix:<path>` or `tcp:<host>:<port>`).
    pub destination_url: String,
    /// Local migration: memory is handed over, not copied.
    pub local: bool,
}

/// `receive-migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceiveMigrationBody {
    /// Where the migration arrives.
    pub receiver_url: String,
}

/// The scalar options of `restore` (`net_fds` is read separately).
#[derive(Debug, Deserialize)]
pub struct RestoreOptions {
    /// `source_url=`.
    pub source_url: PathBuf,
    /// `prefault=`.
    #[serde(default)]
    pub prefault: bool,
}

/// `restore` (CH `RestoreConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreBody {
    /// The snapshot (`file:///dir`).
    pub source_url: PathBuf,
    /// Touch all of RAM while restoring.
    pub prefault: bool,
    /// Interfaces that get new descriptors, in the order the descriptors are sent.
    pub net_fds: Option<Vec<RestoredNetBody>>,
}

/// One interface of `restore`'s `net_fds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoredNetBody {
    /// The interface's id.
    pub id: String,
    /// How many of the sent descriptors are this interface's.
    pub num_fds: usize,
    /// Always `null`: the descriptors travel with SCM_RIGHTS (as ch-remote sends it).
    pub fds: Option<Vec<i32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap_or_default()
    }

    #[test]
    fn pmem_reads_sizes_and_writes_cloud_hypervisors_fields() {
        let pmem: PmemBody =
            vm_config::kv::from_str("file=/pm,size=2G,discard_writes=on").expect("pmem");
        assert_eq!(
            json(&pmem),
            r#"{"file":"/pm","size":2147483648,"iommu":false,"discard_writes":true,"id":null,"pci_segment":0}"#
        );
        assert!(vm_config::kv::from_str::<PmemBody>("size=1G").is_err());
        assert!(vm_config::kv::from_str::<PmemBody>("file=/pm,size=1Q").is_err());
    }

    #[test]
    fn device_fd_stays_out_of_the_json() {
        let device: DeviceBody = vm_config::kv::from_str("fd=7,id=gpu0").expect("device");
        assert_eq!(device.fd, Some(7));
        assert_eq!(
            json(&device),
            r#"{"iommu":false,"id":"gpu0","pci_segment":0,"x_nv_gpudirect_clique":null}"#
        );
    }

    #[test]
    fn device_types_by_name_or_number() {
        assert_eq!(virtio_device_type("fs"), Ok(26));
        assert_eq!(virtio_device_type("26"), Ok(26));
        assert_eq!(virtio_device_type("usb"), Ok(49));
        assert!(virtio_device_type("watchdog").is_err());
        assert!(virtio_device_type("23").is_err());
        assert!(virtio_device_type("0").is_err());
        assert!(virtio_device_type("toaster").is_err());
    }
}
