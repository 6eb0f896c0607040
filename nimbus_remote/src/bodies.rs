//! What the command line says that no request body holds as such: the options of
//! `add-generic-vhost-user` (a device type by name) and `restore` (its `net_fds` list is read
//! separately). Every body itself is one of `vm_config`'s types, which the VMM reads.

use std::path::PathBuf;

use serde::Deserialize;

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

/// The scalar options of `restore` (`net_fds` is read separately).
#[derive(Debug, Deserialize)]
pub struct RestoreOptions {
    /// `source_url=`.
    pub source_url: PathBuf,
    /// `prefault=`.
    #[serde(default)]
    pub prefault: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

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
