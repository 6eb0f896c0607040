//! From a subcommand to the HTTP request ch-remote sends for it: method, endpoint, JSON body
//! and the descriptors that go with it (SCM_RIGHTS).

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::Serialize;
use vm_config::kv::KvError;
use vm_config::requests::{
    RestoreConfig, RestoredNetConfig, VmDestinationData, VmReceiveMigrationData,
    VmRemoveDeviceData, VmResizeData, VmResizeDiskData, VmResizeZoneData, VmSendMigrationData,
};
use vm_config::{
    kv, ConfigError, DeviceConfig, DiskConfig, FsConfig, GenericVhostUserConfig, NetConfig,
    PmemConfig, UserDeviceConfig, VdpaConfig, VsockConfig,
};

use crate::bodies::{virtio_device_type, GenericVhostUserOptions, RestoreOptions};
use crate::cli::Command;

/// Why a subcommand's arguments do not make a request.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// A device option did not parse (through `vm_config`).
    #[error("invalid {what} syntax")]
    Config {
        /// Which option.
        what: &'static str,
        /// The cause.
        #[source]
        source: ConfigError,
    },
    /// An option did not parse (through `vm_config::kv`).
    #[error("invalid {what} syntax")]
    Kv {
        /// Which option.
        what: &'static str,
        /// The cause.
        #[source]
        source: kv::KvError,
    },
    /// A value is out of its range or of the wrong kind.
    #[error("invalid {what}: {message}")]
    Value {
        /// Which value.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The VM configuration file could not be read.
    #[error("cannot read {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Standard input could not be read.
    #[error("cannot read the VM configuration from standard input")]
    ReadStdin(#[source] io::Error),
}

/// One request to the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    /// `GET` or `PUT`.
    pub method: &'static str,
    /// The endpoint under `/api/v1/`, e.g. `vm.add-net`.
    pub endpoint: &'static str,
    /// The JSON body, if the endpoint takes one.
    pub body: Option<Vec<u8>>,
    /// Descriptors of this process sent with the request, in order.
    pub fds: Vec<RawFd>,
}

impl ApiCall {
    /// The request target.
    pub fn path(&self) -> String {
        format!("/api/v1/{}", self.endpoint)
    }

    fn get(endpoint: &'static str) -> Self {
        ApiCall {
            method: "GET",
            endpoint,
            body: None,
            fds: Vec::new(),
        }
    }

    fn put(endpoint: &'static str, body: Option<Vec<u8>>) -> Self {
        ApiCall {
            method: "PUT",
            endpoint,
            body,
            fds: Vec::new(),
        }
    }

    fn put_json<T: Serialize>(endpoint: &'static str, body: &T) -> Result<Self, CallError> {
        let json = serde_json::to_vec(body).map_err(|e| CallError::Value {
            what: "request body",
            message: e.to_string(),
        })?;
        Ok(Self::put(endpoint, Some(json)))
    }

    fn with_fds(mut self, fds: Vec<RawFd>) -> Self {
        self.fds = fds;
        self
    }
}

fn kv_parse<T: serde::de::DeserializeOwned>(what: &'static str, s: &str) -> Result<T, CallError> {
    kv::from_str(s).map_err(|source| CallError::Kv { what, source })
}

fn config_err(what: &'static str) -> impl Fn(ConfigError) -> CallError {
    move |source| CallError::Config { what, source }
}

fn syntax_err(what: &'static str) -> impl Fn(KvError) -> CallError {
    move |source| CallError::Kv { what, source }
}

fn size(what: &'static str, value: &str) -> Result<u64, CallError> {
    vm_config::parse_size(value).map_err(|message| CallError::Value { what, message })
}

/// The request for `command`. Reading `create`'s file (or standard input) is the only I/O.
pub fn build(command: &Command) -> Result<ApiCall, CallError> {
    use Command as C;
    Ok(match command {
        C::AddDevice { device_config } => {
            // A VFIO cdev descriptor travels with SCM_RIGHTS, never in the JSON.
            let (fd, rest) = kv::take_keys(device_config, &["fd"]).map_err(syntax_err("device"))?;
            let fds = match fd.last() {
                Some((_, v)) => {
                    kv::int_list::<i32>(v, "file descriptors").map_err(syntax_err("device"))?
                }
                None => Vec::new(),
            };
            let device: DeviceConfig = kv_parse("device", &rest)?;
            if device.path.is_none() && fds.is_empty() {
                return Err(CallError::Value {
                    what: "device",
                    message: "path=<device_path> (or fd=<vfio_cdev_fd>) is required".into(),
                });
            }
            ApiCall::put_json("vm.add-device", &device)?.with_fds(fds)
        }
        C::AddDisk { disk_config } => {
            let disk: DiskConfig =
                vm_config::parse_option("disk", disk_config).map_err(config_err("disk"))?;
            ApiCall::put_json("vm.add-disk", &disk)?
        }
        C::AddFs { fs_config } => {
            let fs: FsConfig =
                vm_config::parse_option("fs", fs_config).map_err(config_err("fs"))?;
            ApiCall::put_json("vm.add-fs", &fs)?
        }
        C::AddGenericVhostUser {
            generic_vhost_user_config,
        } => add_generic_vhost_user(generic_vhost_user_config)?,
        C::AddNet { net_config } => {
            let mut net = NetConfig::parse(net_config).map_err(config_err("net"))?;
            // The numbers mean nothing in the VMM: the descriptors themselves are sent.
            let fds = net.fds.take().unwrap_or_default();
            ApiCall::put_json("vm.add-net", &net)?.with_fds(fds)
        }
        C::AddPmem { pmem_config } => {
            ApiCall::put_json("vm.add-pmem", &kv_parse::<PmemConfig>("pmem", pmem_config)?)?
        }
        C::AddUserDevice { device_config } => ApiCall::put_json(
            "vm.add-user-device",
            &kv_parse::<UserDeviceConfig>("user device", device_config)?,
        )?,
        C::AddVdpa { vdpa_config } => {
            ApiCall::put_json("vm.add-vdpa", &kv_parse::<VdpaConfig>("vdpa", vdpa_config)?)?
        }
        C::AddVsock { vsock_config } => ApiCall::put_json(
            "vm.add-vsock",
            &kv_parse::<VsockConfig>("vsock", vsock_config)?,
        )?,
        C::Boot => ApiCall::put("vm.boot", None),
        C::Coredump { coredump_config } => ApiCall::put_json(
            "vm.coredump",
            &VmDestinationData {
                destination_url: coredump_config.clone(),
            },
        )?,
        C::Counters => ApiCall::get("vm.counters"),
        C::Create { path } => ApiCall::put("vm.create", Some(read_config(path)?)),
        C::Delete => ApiCall::put("vm.delete", None),
        C::Info => ApiCall::get("vm.info"),
        C::Nmi => ApiCall::put("vm.nmi", None),
        C::Pause => ApiCall::put("vm.pause", None),
        C::Ping => ApiCall::get("vmm.ping"),
        C::PowerButton => ApiCall::put("vm.power-button", None),
        C::Reboot => ApiCall::put("vm.reboot", None),
        C::ReceiveMigration {
            receive_migration_config,
        } => ApiCall::put_json(
            "vm.receive-migration",
            &VmReceiveMigrationData {
                receiver_url: receive_migration_config.clone(),
            },
        )?,
        C::RemoveDevice { id } => {
            ApiCall::put_json("vm.remove-device", &VmRemoveDeviceData { id: id.clone() })?
        }
        C::Resize {
            balloon,
            cpus,
            memory,
        } => {
            let desired_vcpus = cpus
                .as_deref()
                .map(|c| {
                    c.trim().parse::<u32>().map_err(|e| CallError::Value {
                        what: "CPU count",
                        message: format!("'{c}': {e}"),
                    })
                })
                .transpose()?;
            let body = VmResizeData {
                desired_vcpus,
                desired_ram: memory
                    .as_deref()
                    .map(|m| size("memory size", m))
                    .transpose()?,
                desired_balloon: balloon
                    .as_deref()
                    .map(|b| size("balloon size", b))
                    .transpose()?,
            };
            ApiCall::put_json("vm.resize", &body)?
        }
        C::ResizeDisk { disk, size: s } => ApiCall::put_json(
            "vm.resize-disk",
            &VmResizeDiskData {
                id: disk.clone(),
                desired_size: size("disk size", s)?,
            },
        )?,
        C::ResizeZone { id, size: s } => ApiCall::put_json(
            "vm.resize-zone",
            &VmResizeZoneData {
                id: id.clone(),
                desired_ram: size("memory size", s)?,
            },
        )?,
        C::Restore { restore_config } => restore(restore_config)?,
        C::Resume => ApiCall::put("vm.resume", None),
        C::SendMigration {
            send_migration_config,
            send_migration_local,
        } => ApiCall::put_json(
            "vm.send-migration",
            &VmSendMigrationData {
                destination_url: send_migration_config.clone(),
                local: *send_migration_local,
            },
        )?,
        C::Shutdown => ApiCall::put("vm.shutdown", None),
        C::ShutdownVmm => ApiCall::put("vmm.shutdown", None),
        C::Snapshot { snapshot_config } => ApiCall::put_json(
            "vm.snapshot",
            &VmDestinationData {
                destination_url: snapshot_config.clone(),
            },
        )?,
    })
}

/// `create`'s body: the file as it is (the VMM checks it), or standard input for `-`.
fn read_config(path: &str) -> Result<Vec<u8>, CallError> {
    if path == "-" {
        let mut data = Vec::new();
        io::stdin()
            .read_to_end(&mut data)
            .map_err(CallError::ReadStdin)?;
        Ok(data)
    } else {
        std::fs::read(path).map_err(|source| CallError::ReadFile {
            path: path.into(),
            source,
        })
    }
}

fn add_generic_vhost_user(config: &str) -> Result<ApiCall, CallError> {
    const WHAT: &str = "generic vhost-user";
    let (lists, rest) = kv::take_keys(config, &["queue_sizes"]).map_err(syntax_err(WHAT))?;
    let options: GenericVhostUserOptions = kv_parse(WHAT, &rest)?;
    let queue_sizes = match lists.last() {
        Some((_, value)) => kv::int_list::<u16>(value, "queue sizes").map_err(syntax_err(WHAT))?,
        None => {
            return Err(CallError::Value {
                what: WHAT,
                message: "queue_sizes=<[size1,size2,...]> is required".into(),
            })
        }
    };
    let device_type =
        virtio_device_type(&options.device_type).map_err(|message| CallError::Value {
            what: "device_type",
            message,
        })?;
    let body = GenericVhostUserConfig {
        id: options.id,
        iommu: options.iommu,
        pci_segment: options.pci_segment,
        pci_device_id: options.pci_device_id,
        socket: options.socket,
        queue_sizes,
        device_type,
    };
    ApiCall::put_json("vm.add-generic-vhost-user", &body)
}

/// `restore`: the descriptors of `net_fds` are sent in the order given, each interface's
/// count in the body.
fn restore(config: &str) -> Result<ApiCall, CallError> {
    let (lists, rest) = kv::take_keys(config, &["net_fds"]).map_err(syntax_err("restore"))?;
    let options: RestoreOptions = kv_parse("restore", &rest)?;
    let mut fds = Vec::new();
    let net_fds = match lists.last() {
        Some((_, value)) => {
            let nets = kv::id_fd_list(value).map_err(syntax_err("restore"))?;
            let bodies = nets
                .into_iter()
                .map(|(id, net_fds)| {
                    let num_fds = net_fds.len();
                    fds.extend(net_fds);
                    RestoredNetConfig {
                        id,
                        num_fds,
                        fds: None,
                    }
                })
                .collect();
            Some(bodies)
        }
        None => None,
    };
    let body = RestoreConfig {
        source_url: options.source_url,
        prefault: options.prefault,
        net_fds,
    };
    Ok(ApiCall::put_json("vm.restore", &body)?.with_fds(fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(call: &ApiCall) -> String {
        String::from_utf8_lossy(call.body.as_deref().unwrap_or_default()).into_owned()
    }

    #[test]
    fn restore_sends_net_fds_in_order_and_counts_them() {
        let call = restore("source_url=file:///snap,net_fds=[net0@[5,6],net1@7],prefault=on")
            .expect("restore");
        assert_eq!(call.fds, vec![5, 6, 7]);
        assert_eq!(
            body(&call),
            r#"{"source_url":"file:///snap","prefault":true,"net_fds":[{"id":"net0","num_fds":2,"fds":null},{"id":"net1","num_fds":1,"fds":null}]}"#
        );
        let call = restore("source_url=file:///snap").expect("restore");
        assert_eq!(
            body(&call),
            r#"{"source_url":"file:///snap","prefault":false,"net_fds":null}"#
        );
        assert!(restore("prefault=on").is_err());
        assert!(restore("source_url=/s,net_fds=[net0@[5,x]]").is_err());
    }

    #[test]
    fn generic_vhost_user_needs_its_lists() {
        let call = add_generic_vhost_user("device_type=fs,socket=/s,queue_sizes=[1024,1024]")
            .expect("generic");
        assert_eq!(
            body(&call),
            r#"{"pci_segment":0,"socket":"/s","queue_sizes":[1024,1024],"device_type":26}"#
        );
        assert!(add_generic_vhost_user("device_type=fs,socket=/s").is_err());
        assert!(add_generic_vhost_user("device_type=iommu,socket=/s,queue_sizes=[8]").is_err());
    }
}
