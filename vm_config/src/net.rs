//! virtio-net interfaces (Cloud Hypervisor's `NetConfig`).

use serde::{Deserialize, Deserializer, Serialize};

use crate::{is_false, kv, not_yet, ConfigError};

fn default_net_queues() -> usize {
    2
}

fn default_net_queue_size() -> u16 {
    256
}

fn default_true() -> bool {
    true
}

/// Descriptor numbers in a JSON body mean nothing to this process: descriptors come with
/// `SCM_RIGHTS` (or as `fd=` on the command line, see [`NetConfig::parse`]).
pub(crate) fn ignore_fds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<i32>>, D::Error> {
    let _ = serde::de::IgnoredAny::deserialize(d)?;
    Ok(None)
}

/// Which side of a vhost-user socket listens (CH `VhostMode`; CLI `client`/`server`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    /// The backend listens, Nimbus connects.
    #[default]
    #[serde(alias = "client")]
    Client,
    /// Nimbus listens, the backend connects (e.g. `vhost_user_net --net-backend client=on`).
    #[serde(alias = "server")]
    Server,
}

/// A virtio-net interface over a TAP (CH `NetConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
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
    /// TAP interface name (created when missing); generated when neither this nor `fds` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Host-side IPv4 address given to a TAP Nimbus opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Host-side netmask (255.255.255.0 when only `ip` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<std::net::Ipv4Addr>,
    /// Guest MAC address; a random locally administered one is chosen at boot when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host-side MAC of the TAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    /// MTU offered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Queues (two per queue pair).
    #[serde(default = "default_net_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    /// Served by a vhost-user backend.
    #[serde(default)]
    pub vhost_user: bool,
    /// vhost-user socket (CLI: `socket=`).
    #[serde(default, alias = "socket", skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// Who creates the vhost-user socket.
    #[serde(default)]
    pub vhost_mode: VhostMode,
    /// TAP descriptors handed to Nimbus (one per queue pair), by their number in this process.
    #[serde(
        default,
        deserialize_with = "ignore_fds",
        skip_serializing_if = "Option::is_none"
    )]
    pub fds: Option<Vec<i32>>,
    /// Rate limiter (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    /// Offer TSO to the guest.
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    /// Offer UFO to the guest.
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    /// Offer checksum offload to the guest.
    #[serde(default = "default_true")]
    pub offload_csum: bool,
}

impl NetConfig {
    /// Parses one `--net` value: Cloud Hypervisor spells the passed descriptors `fd=3` (or
    /// `fd=[3,4]`); the configuration field is `fds`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let parse_err = |source| ConfigError::Parse {
            option: "net",
            source,
        };
        let mut fds = None;
        let mut rest = Vec::new();
        for (k, v) in kv::split(s).map_err(parse_err)? {
            if k == "fd" {
                // An empty value is unset, as for every key.
                if !v.is_empty() {
                    let list = kv::int_list(&v, "file descriptors").map_err(|e| {
                        parse_err(kv::KvError::BadValue {
                            key: k.clone(),
                            value: v.clone(),
                            message: e.to_string(),
                        })
                    })?;
                    fds = Some(list);
                }
            } else {
                rest.push(format!("{k}=\"{v}\""));
            }
        }
        let mut net = kv::from_str::<NetConfig>(&rest.join(",")).map_err(|e| match e {
            // The command line names the descriptors `fd`.
            kv::KvError::UnknownKeys { keys, allowed } => parse_err(kv::KvError::UnknownKeys {
                keys,
                allowed: allowed.replace("fds", "fd"),
            }),
            other => parse_err(other),
        })?;
        if fds.is_some() {
            net.fds = fds;
        }
        Ok(net)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let name = self
            .id
            .clone()
            .or_else(|| self.tap.clone())
            .or_else(|| self.vhost_socket.clone())
            .unwrap_or_else(|| "?".into());
        let err = |m: String| ConfigError::Device(format!("net {name}: {m}"));
        if self.vhost_user {
            if self.vhost_socket.is_none() {
                return Err(err("vhost_user=on needs socket=PATH".into()));
            }
            if self.tap.is_some() || self.fds.is_some() {
                return Err(err(
                    "a vhost-user interface has no tap or fd: the backend owns the TAP".into(),
                ));
            }
        }
        if self.iommu {
            return Err(err("iommu is not supported".into()));
        }
        if self.num_queues < 2 || !self.num_queues.is_multiple_of(2) || self.num_queues > 32 {
            return Err(err(format!(
                "num_queues {} must be an even number in 2..=32",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() || !(2..=1024).contains(&self.queue_size) {
            return Err(err(format!(
                "queue_size {} is not a power of two in 2..=1024",
                self.queue_size
            )));
        }
        for mac in [&self.mac, &self.host_mac].into_iter().flatten() {
            let parsed: net_util::MacAddr = mac.parse().map_err(|e| err(format!("{e}")))?;
            if parsed.is_multicast() {
                return Err(err(format!("MAC {mac} is a multicast address")));
            }
        }
        if let Some(fds) = &self.fds {
            if fds.len() * 2 != self.num_queues {
                return Err(err(format!(
                    "{} fds given for {} queues (one fd per queue pair)",
                    fds.len(),
                    self.num_queues
                )));
            }
        }
        if self
            .tap
            .as_ref()
            .is_some_and(|t| t.is_empty() || t.len() > 15)
        {
            return Err(err("tap name must be 1..=15 bytes".into()));
        }
        if self.pci_device_id.is_some_and(|s| s == 0 || s > 31) {
            return Err(err("pci_device_id must be in 1..=31".into()));
        }
        if self
            .rate_limiter_config
            .as_ref()
            .is_some_and(|r| !r.is_null())
        {
            return Err(not_yet("net rate_limiter_config"));
        }
        Ok(())
    }
}
