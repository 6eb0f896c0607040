//! The one VM configuration, shaped after Cloud Hypervisor's `VmConfig` JSON schema.
//!
//! The CLI (via [`kv`]), the REST API (JSON) and snapshots all produce these structs. Field names
//! are CH's JSON names; CLI spellings that differ are serde aliases. Omitted fields take CH's
//! defaults, unknown JSON fields are ignored (management stacks send fields we do not define), and
//! [`VmConfig::validate`] rejects what cannot be built, with a message naming the field.
#![deny(missing_docs)]

mod balloon;
mod console;
mod cpus;
mod disk;
pub mod kv;
mod memory;
mod net;
mod pci;
mod pending;
mod pmem;
pub mod requests;
mod size;
mod vsock;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use balloon::{BalloonConfig, BALLOON_DEVICE_ID};
pub use console::{ConsoleConfig, ConsoleOutputMode, DebugConsoleConfig, DEBUG_CONSOLE_PORT};
pub use cpus::{CpuAffinity, CpuFeatures, CpuTopology, CpusConfig, MAX_VCPUS};
pub use disk::{DiskConfig, ImageType};
pub use memory::{HotplugMethod, MemoryConfig, MIN_MEMORY};
pub use net::{NetConfig, VhostMode};
pub use pci::PciSegmentConfig;
pub use pending::{
    DeviceConfig, GenericVhostUserConfig, LandlockConfig, ObjectList, TpmConfig, UserDeviceConfig,
    VdpaConfig,
};
pub use pmem::{PmemConfig, PMEM_ALIGN};
pub use size::parse_size;
pub use vsock::VsockConfig;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--cpus`/`cpus` is inconsistent.
    #[error("cpus: {0}")]
    Cpus(String),
    /// `--memory`/`memory` is unusable.
    #[error("memory: {0}")]
    Memory(String),
    /// The payload (kernel, initramfs, command line) is missing or unusable.
    #[error("payload: {0}")]
    Payload(String),
    /// A device option is unusable.
    #[error("{0}")]
    Device(String),
    /// A console or serial option is malformed.
    #[error("{option}: {message}")]
    Console {
        /// `serial` or `console`.
        option: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Two devices have the same id.
    #[error("device id {0} is used twice")]
    DuplicateId(String),
    /// Two devices use the same file or socket.
    #[error("{0} is used by two devices")]
    DuplicatePath(String),
    /// A setting Cloud Hypervisor has that Nimbus does not honour yet.
    #[error("{0} is not supported by Nimbus yet")]
    NotSupported(String),
    /// A `key=value` option string did not parse.
    #[error("--{option}")]
    Parse {
        /// Option name.
        option: &'static str,
        /// Parser error.
        #[source]
        source: kv::KvError,
    },
}

/// What to boot (CH `PayloadConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PayloadConfig {
    /// Firmware image (not supported yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    /// Kernel: vmlinux ELF with a PVH note, or bzImage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Initramfs image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
}

/// Parses one `--<option>` value in Cloud Hypervisor's `key=value,...` syntax into its
/// configuration struct (the command line and `nimbus-remote add-*` both use this).
pub fn parse_option<T: serde::de::DeserializeOwned>(
    option: &'static str,
    s: &str,
) -> Result<T, ConfigError> {
    kv::from_str::<T>(s).map_err(|source| ConfigError::Parse { option, source })
}

fn default_fs_queues() -> usize {
    1
}

fn default_fs_queue_size() -> u16 {
    1024
}

/// A virtio-fs share served by a vhost-user-fs backend such as virtiofsd (CH `FsConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    /// Device identifier (generated when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment, below `platform.num_pci_segments` (Kata puts virtio-fs on segment 1).
    #[serde(default)]
    pub pci_segment: u16,
    /// PCI slot on the segment's bus 0 (the first free one when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// Tag the guest mounts (1..=36 bytes).
    pub tag: String,
    /// The backend's socket.
    pub socket: PathBuf,
    /// Request queues.
    #[serde(default = "default_fs_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
}

impl FsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::Device(format!("fs {}: {m}", self.tag));
        if self.tag.is_empty() || self.tag.len() > 36 {
            return Err(ConfigError::Device(format!(
                "fs: tag '{}' must be 1..=36 bytes",
                self.tag
            )));
        }
        if self.num_queues == 0 || self.num_queues > 16 {
            return Err(err(format!(
                "num_queues {} is not in 1..=16",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() || !(2..=1024).contains(&self.queue_size) {
            return Err(err(format!(
                "queue_size {} is not a power of two in 2..=1024",
                self.queue_size
            )));
        }
        if self.pci_device_id.is_some_and(|s| s == 0 || s > 31) {
            return Err(err("pci_device_id must be in 1..=31".into()));
        }
        Ok(())
    }
}

/// The entropy device (CH `RngConfig`); Cloud Hypervisor always has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RngConfig {
    /// Entropy source.
    pub src: PathBuf,
    /// Behind a virtual IOMMU (not supported; must stay false).
    #[serde(skip_serializing_if = "is_false")]
    pub iommu: bool,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            src: PathBuf::from("/dev/urandom"),
            iommu: false,
        }
    }
}

fn default_iommu_address_width() -> u8 {
    64
}

/// Platform options (CH `PlatformConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlatformConfig {
    /// PCI segments, 1..=16, each a host bridge with its own ECAM area and windows.
    pub num_pci_segments: u16,
    /// Segments behind the virtual IOMMU (not supported yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    /// The virtual IOMMU's address width.
    #[serde(default = "default_iommu_address_width")]
    pub iommu_address_width_bits: u8,
    /// SMBIOS serial number (not supported yet: Nimbus has no SMBIOS tables).
    #[serde(
        alias = "system_serial_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub serial_number: Option<String>,
    /// SMBIOS UUID (not supported yet).
    #[serde(alias = "system_uuid", skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// SMBIOS OEM strings (not supported yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            num_pci_segments: 1,
            iommu_segments: None,
            iommu_address_width_bits: 64,
            serial_number: None,
            uuid: None,
            oem_strings: None,
        }
    }
}

impl PlatformConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.iommu_segments.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(not_yet("platform.iommu_segments"));
        }
        if self.serial_number.is_some() || self.uuid.is_some() || self.oem_strings.is_some() {
            return Err(not_yet(
                "platform SMBIOS strings (serial_number, uuid, oem_strings)",
            ));
        }
        Ok(())
    }
}

fn default_serial() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleOutputMode::Null)
}

fn default_console() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleOutputMode::Tty)
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// The error for a setting Cloud Hypervisor has and Nimbus does not honour yet.
pub(crate) fn not_yet(what: &str) -> ConfigError {
    ConfigError::NotSupported(what.to_string())
}

/// A whole VM (CH `VmConfig`).
///
/// Sections Nimbus does not implement yet are kept as JSON (so `vm.info` echoes them) and
/// refused by [`VmConfig::validate`] when they ask for something.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What to boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadConfig>,
    /// Rate limiter groups (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_groups: Option<ObjectList>,
    /// Disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<NetConfig>>,
    /// The entropy device.
    #[serde(default)]
    pub rng: RngConfig,
    /// The memory balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// virtio-fs shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<Vec<FsConfig>>,
    /// Persistent memory devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pmem: Option<Vec<PmemConfig>>,
    /// The 16550 UART at 0x3f8.
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    /// The virtio console.
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    /// The debug console at port 0xe9.
    #[serde(default)]
    pub debug_console: DebugConsoleConfig,
    /// VFIO devices (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceConfig>>,
    /// vfio-user devices (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_devices: Option<Vec<UserDeviceConfig>>,
    /// vDPA devices (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdpa: Option<Vec<VdpaConfig>>,
    /// The vsock device (hybrid Unix-socket backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A pvpanic device (not supported yet).
    #[serde(default)]
    pub pvpanic: bool,
    /// A virtual IOMMU (not supported).
    #[serde(default)]
    pub iommu: bool,
    /// NUMA nodes (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<ObjectList>,
    /// A watchdog device (not supported yet).
    #[serde(default)]
    pub watchdog: bool,
    /// Per-segment PCI options: the segments' shares of the MMIO windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<Vec<PciSegmentConfig>>,
    /// Platform options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    /// A TPM (not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmConfig>,
    /// Restrict file-system access to the paths the configuration names (Landlock).
    #[serde(default)]
    pub landlock_enable: bool,
    /// Paths the VM may use besides those it names (hot-added disks, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_rules: Option<Vec<LandlockConfig>>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            rate_limit_groups: None,
            disks: None,
            net: None,
            rng: RngConfig::default(),
            balloon: None,
            fs: None,
            pmem: None,
            serial: default_serial(),
            console: default_console(),
            debug_console: DebugConsoleConfig::default(),
            devices: None,
            user_devices: None,
            vdpa: None,
            vsock: None,
            pvpanic: false,
            iommu: false,
            numa: None,
            watchdog: false,
            pci_segments: None,
            platform: None,
            tpm: None,
            landlock_enable: false,
            landlock_rules: None,
        }
    }
}

/// Id of the virtio console (Cloud Hypervisor's; it is not written into the configuration).
pub const CONSOLE_DEVICE_ID: &str = "__console";
/// Id of the entropy device (Cloud Hypervisor's; it is not written into the configuration).
pub const RNG_DEVICE_ID: &str = "__rng";

/// A list section that asks for something: present and not empty.
fn asks<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_some_and(|l| !l.is_empty())
}

const NEEDS_SHARED: &str =
    "vhost-user devices need guest memory the backend can map: add shared=on to --memory";

impl VmConfig {
    /// Gives every disk, network interface and virtio-fs share without an id one, by Cloud
    /// Hypervisor's rule: a prefix per kind (`_disk`, `_net`, `_fs`) and one counter shared by
    /// all kinds, skipping ids in use (one disk and one interface become `_disk0` and `_net1`);
    /// and every TAP interface without a guest MAC a random locally administered one. What is
    /// generated is written here, so `vm.info` shows it and reboots keep it.
    pub fn name_devices(&mut self) {
        let mut used: std::collections::HashSet<String> = self.device_ids().collect();
        let mut counter = 0u32;
        let mut next = |prefix: &str| loop {
            let id = format!("{prefix}{counter}");
            counter += 1;
            if used.insert(id.clone()) {
                return id;
            }
        };
        for d in self.disks.iter_mut().flatten() {
            if d.id.is_none() {
                d.id = Some(next("_disk"));
            }
        }
        for n in self.net.iter_mut().flatten() {
            if n.id.is_none() {
                n.id = Some(next("_net"));
            }
            if n.mac.is_none() && !n.vhost_user {
                n.mac = Some(net_util::MacAddr::random_local().to_string());
            }
        }
        for f in self.fs.iter_mut().flatten() {
            if f.id.is_none() {
                f.id = Some(next("_fs"));
            }
        }
        if let Some(v) = &mut self.vsock {
            if v.id.is_none() {
                v.id = Some(next("_vsock"));
            }
        }
        for p in self.pmem.iter_mut().flatten() {
            if p.id.is_none() {
                p.id = Some(next("_pmem"));
            }
        }
    }

    /// The ids given to devices.
    pub fn device_ids(&self) -> impl Iterator<Item = String> + '_ {
        let disks = self.disks.iter().flatten().filter_map(|d| d.id.clone());
        let nets = self.net.iter().flatten().filter_map(|n| n.id.clone());
        let fs = self.fs.iter().flatten().filter_map(|f| f.id.clone());
        let vsock = self.vsock.iter().filter_map(|v| v.id.clone());
        let pmem = self.pmem.iter().flatten().filter_map(|p| p.id.clone());
        disks.chain(nets).chain(fs).chain(vsock).chain(pmem)
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cpus.validate()?;
        self.memory.validate()?;
        // RAM (and the space kept for hot-added RAM) above the hole, then the 64-bit PCI
        // window, must stay inside the guest physical address width.
        let phys_limit = 1u64
            .checked_shl(u32::from(self.cpus.max_phys_bits.min(52)))
            .unwrap_or(u64::MAX);
        let top = arch::x86_64::layout::pci_mmio64_start(self.memory.reserved_size())
            .saturating_add(arch::x86_64::layout::PCI_MMIO64_SIZE);
        if top > phys_limit {
            return Err(ConfigError::Memory(format!(
                "size {} (plus hotplug_size {}) does not fit in {} physical address bits",
                self.memory.size,
                self.memory.hotplug_size.unwrap_or(0),
                self.cpus.max_phys_bits
            )));
        }
        let Some(payload) = &self.payload else {
            return Err(ConfigError::Payload("no kernel given (--kernel)".into()));
        };
        if payload.firmware.is_some() {
            return Err(ConfigError::Payload(
                "firmware boot is not supported; use a kernel".into(),
            ));
        }
        if payload.kernel.is_none() {
            return Err(ConfigError::Payload("no kernel given (--kernel)".into()));
        }
        let shared = self.memory.shared || self.memory.hugepages;
        for disk in self.disks.iter().flatten() {
            disk.validate()?;
            if disk.vhost_user && !shared {
                return Err(ConfigError::Memory(NEEDS_SHARED.into()));
            }
        }
        for net in self.net.iter().flatten() {
            net.validate()?;
            if net.vhost_user && !shared {
                return Err(ConfigError::Memory(NEEDS_SHARED.into()));
            }
        }
        for fs in self.fs.iter().flatten() {
            fs.validate()?;
            if !shared {
                return Err(ConfigError::Memory(NEEDS_SHARED.into()));
            }
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        for pmem in self.pmem.iter().flatten() {
            pmem.validate()?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate(self.memory.size)?;
        }
        self.validate_ids_and_paths()?;
        if self.rng.iommu {
            return Err(ConfigError::Device("rng: iommu is not supported".into()));
        }
        self.serial.validate("serial")?;
        self.console.validate("console")?;
        self.debug_console.validate()?;
        if let Some(p) = &self.platform {
            p.validate()?;
        }
        self.validate_pci_segments()?;
        for (name, asked) in [
            ("rate_limit_groups", asks(&self.rate_limit_groups)),
            ("devices (VFIO)", asks(&self.devices)),
            ("user_devices", asks(&self.user_devices)),
            ("vdpa", asks(&self.vdpa)),
            ("numa", asks(&self.numa)),
            ("tpm", self.tpm.is_some()),
        ] {
            if asked {
                return Err(not_yet(name));
            }
        }
        for (name, on) in [
            ("pvpanic", self.pvpanic),
            ("iommu", self.iommu),
            ("watchdog", self.watchdog),
        ] {
            if on {
                return Err(not_yet(name));
            }
        }
        self.validate_landlock()
    }

    /// Landlock rules need Landlock on, and each access is r, w or rw.
    fn validate_landlock(&self) -> Result<(), ConfigError> {
        let rules = self.landlock_rules.iter().flatten();
        if asks(&self.landlock_rules) && !self.landlock_enable {
            return Err(ConfigError::Device(
                "landlock_rules need landlock_enable (--landlock)".into(),
            ));
        }
        for rule in rules {
            nimbus_landlock::Access::parse(&rule.access).map_err(|e| {
                ConfigError::Device(format!("landlock_rules: {}: {e}", rule.path.display()))
            })?;
        }
        Ok(())
    }

    /// Ids are unique and not Nimbus's own; no two devices use the same file or socket.
    fn validate_ids_and_paths(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for id in self.device_ids() {
            if id.starts_with("__") || id.starts_with("_virtio-pci-") {
                return Err(ConfigError::Device(format!(
                    "device id {id} is reserved (ids starting with __ or _virtio-pci- are Nimbus's)"
                )));
            }
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateId(id));
            }
        }
        let mut paths = std::collections::HashSet::new();
        let disk_paths = self.disks.iter().flatten().map(|d| {
            if d.vhost_user {
                d.vhost_socket.clone().map(PathBuf::from)
            } else {
                d.path.clone()
            }
        });
        let net_sockets = self
            .net
            .iter()
            .flatten()
            .map(|n| n.vhost_socket.clone().map(PathBuf::from));
        let fs_sockets = self.fs.iter().flatten().map(|f| Some(f.socket.clone()));
        let vsock_socket = self.vsock.iter().map(|v| Some(v.socket.clone()));
        let pmem_files = self.pmem.iter().flatten().map(|p| Some(p.file.clone()));
        let all = disk_paths
            .chain(net_sockets)
            .chain(fs_sockets)
            .chain(vsock_socket)
            .chain(pmem_files);
        for path in all.flatten() {
            if !paths.insert(path.clone()) {
                return Err(ConfigError::DuplicatePath(path.display().to_string()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> VmConfig {
        VmConfig {
            payload: Some(PayloadConfig {
                kernel: Some("/k".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn json_defaults_match_cloud_hypervisor() {
        let c: VmConfig =
            serde_json::from_str(r#"{"payload":{"kernel":"/k"},"unknown_field":1}"#).expect("json");
        assert_eq!(
            c.cpus,
            CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
                max_phys_bits: 46,
                nested: true,
                ..Default::default()
            }
        );
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.serial.mode, ConsoleOutputMode::Null);
        assert_eq!(c.console.mode, ConsoleOutputMode::Tty);
        c.validate().expect("valid");
        let json = serde_json::to_value(&c).expect("serialize");
        assert_eq!(json["cpus"]["max_phys_bits"], 46);
        assert_eq!(json["serial"]["mode"], "Null");
    }

    #[test]
    fn cli_strings_fill_the_same_structs() {
        let cpus: CpusConfig = kv::from_str("boot=2,max=4").expect("cpus");
        assert_eq!((cpus.boot_vcpus, cpus.max_vcpus), (2, 4));
        let mem: MemoryConfig = kv::from_str("size=1G,shared=on").expect("memory");
        assert_eq!((mem.size, mem.shared), (1 << 30, true));
        let mem: MemoryConfig = serde_json::from_str(r#"{"size": 1073741824}"#).expect("json");
        assert_eq!(mem.size, 1 << 30);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = valid();
        c.cpus.boot_vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(_))));
        let mut c = valid();
        c.cpus = CpusConfig {
            boot_vcpus: 4,
            max_vcpus: 2,
            ..Default::default()
        };
        assert!(c
            .validate()
            .expect_err("max<boot")
            .to_string()
            .contains("below boot_vcpus"));
        let mut c = valid();
        c.memory.size = 0;
        assert!(c
            .validate()
            .expect_err("size 0")
            .to_string()
            .starts_with("memory: size 0"));
        let mut c = valid();
        c.memory.size = (1 << 30) + 1;
        assert!(matches!(c.validate(), Err(ConfigError::Memory(_))));
        let mut c = valid();
        c.payload = None;
        assert!(matches!(c.validate(), Err(ConfigError::Payload(_))));
        let mut c = valid();
        c.memory.size = 1 << 50;
        assert!(c
            .validate()
            .expect_err("too big")
            .to_string()
            .contains("physical address bits"));
    }

    #[test]
    fn console_modes() {
        assert_eq!(
            ConsoleConfig::parse("serial", "tty").map(|c| c.mode),
            Ok(ConsoleOutputMode::Tty)
        );
        let f = ConsoleConfig::parse("serial", "file=/tmp/x").expect("file");
        assert_eq!(
            (f.mode, f.file),
            (ConsoleOutputMode::File, Some("/tmp/x".into()))
        );
        let e = |option, s| ConsoleConfig::parse(option, s).expect_err(s).to_string();
        assert_eq!(
            e("serial", "file="),
            "serial: no mode given (one of off, null, tty, pty, file=PATH, socket=PATH)"
        );
        assert_eq!(
            e("serial", "loud"),
            "serial: unknown mode 'loud' (allowed: off, null, tty, pty, file=PATH, socket=PATH)"
        );
        assert_eq!(
            e("serial", "path=/x"),
            "serial: unknown key 'path' (in 'path=/x'; allowed: off, null, tty, pty, \
             file=PATH, socket=PATH)"
        );
        assert_eq!(
            e("serial", "iommu=on,tty"),
            "serial: unknown key 'iommu' (in 'iommu=on'; allowed: off, null, tty, pty, \
             file=PATH, socket=PATH)"
        );
        assert_eq!(
            e("console", "tty,pty"),
            "console: one mode only, not tty and pty (off, null, tty, pty, file=PATH, socket=PATH)"
        );
        assert_eq!(
            e("console", "pty,iommu=maybe"),
            "console: iommu=maybe: not allowed (on, off, true, false)"
        );
        let pty = ConsoleConfig::parse("console", "pty,iommu=off,file=").expect("pty");
        assert_eq!(
            (pty.mode, pty.file, pty.iommu),
            (ConsoleOutputMode::Pty, None, false)
        );
        let s = ConsoleConfig::parse("serial", "socket=\"/run/a,b.sock\"").expect("socket");
        assert_eq!(
            (s.mode, s.socket),
            (ConsoleOutputMode::Socket, Some("/run/a,b.sock".into()))
        );
        let json: ConsoleConfig =
            serde_json::from_str(r#"{"mode": "Socket", "socket": "/s"}"#).expect("json");
        assert_eq!(json, s_with_socket("/s"));
        json.validate("serial").expect("socket with a path");
        let no_socket: ConsoleConfig = serde_json::from_str(r#"{"mode": "Socket"}"#).expect("json");
        assert_eq!(
            no_socket
                .validate("serial")
                .expect_err("no path")
                .to_string(),
            "serial: mode Socket needs a socket path"
        );
    }

    fn s_with_socket(path: &str) -> ConsoleConfig {
        ConsoleConfig {
            file: None,
            mode: ConsoleOutputMode::Socket,
            iommu: false,
            socket: Some(path.into()),
        }
    }

    #[test]
    fn debug_console_modes_and_port() {
        assert_eq!(DebugConsoleConfig::default().port(), 0xe9);
        let d = DebugConsoleConfig::parse("file=/tmp/dbg,iobase=0x402").expect("file");
        assert_eq!(
            (d.mode, d.file.as_deref(), d.port()),
            (
                ConsoleOutputMode::File,
                Some(std::path::Path::new("/tmp/dbg")),
                0x402
            )
        );
        for (mode, want) in [
            ("off", ConsoleOutputMode::Off),
            ("null", ConsoleOutputMode::Null),
            ("tty", ConsoleOutputMode::Tty),
            ("pty,iobase=", ConsoleOutputMode::Pty),
            ("socket=/s", ConsoleOutputMode::Socket),
        ] {
            let d = DebugConsoleConfig::parse(mode).expect(mode);
            assert_eq!((d.mode, d.port()), (want, 0xe9), "{mode}");
        }
        for (bad, message) in [
            (
                "tty,iobase=233",
                "debug-console: iobase=233: not an I/O port (0x0 to 0xffff, in hex with 0x as \
                 Cloud Hypervisor takes it)",
            ),
            (
                "tty,iobase=0x10000",
                "debug-console: iobase=0x10000: not an I/O port (0x0 to 0xffff, in hex with 0x \
                 as Cloud Hypervisor takes it)",
            ),
            (
                "tty,iommu=on",
                "debug-console: unknown key 'iommu' (in 'iommu=on'; allowed: off, null, tty, \
                 pty, file=PATH, socket=PATH, iobase=)",
            ),
            (
                "iobase=0xe9",
                "debug-console: no mode given (one of off, null, tty, pty, file=PATH, socket=PATH)",
            ),
        ] {
            let e = DebugConsoleConfig::parse(bad).expect_err(bad);
            assert_eq!(e.to_string(), message, "{bad}");
        }
        let json: DebugConsoleConfig =
            serde_json::from_str(r#"{"mode": "Pty", "iobase": 1026}"#).expect("json");
        assert_eq!((json.mode, json.port()), (ConsoleOutputMode::Pty, 0x402));
    }

    /// Kata's Go runtime's `vm.create` body, without the devices Nimbus does not have yet.
    const KATA_GO_BODY: &str = r#"{
        "cpus": {"boot_vcpus": 1, "max_vcpus": 4, "kvm_hyperv": false, "nested": true,
                 "topology": {"threads_per_core": 1, "cores_per_die": 4,
                              "dies_per_package": 1, "packages": 1}},
        "memory": {"size": 2147483648, "hotplug_method": "Acpi", "hotplug_size": 4294967296,
                   "shared": true, "hugepages": false, "thp": true},
        "payload": {"kernel": "/k", "cmdline": "console=hvc0", "initramfs": null},
        "disks": [{"path": "/img", "readonly": true, "num_queues": 1, "queue_size": 128,
                   "iommu": false, "image_type": "Raw"}],
        "rng": {"src": "/dev/urandom", "iommu": false},
        "serial": {"mode": "Off"}, "console": {"mode": "Tty", "iommu": false},
        "iommu": false, "watchdog": false, "pvpanic": false, "landlock_enable": false,
        "devices": [], "something_new": {"x": 1}
    }"#;

    #[test]
    fn a_kata_go_body_is_accepted_and_echoed_without_nulls() {
        let c: VmConfig = serde_json::from_str(KATA_GO_BODY).expect("json");
        c.validate().expect("valid");
        assert_eq!(c.memory.hotplug_size, Some(4 << 30));
        assert_eq!(c.memory.reserved_size(), 6 << 30);
        let text = serde_json::to_string(&c).expect("serialize");
        assert!(!text.contains("null"), "{text}");
        assert!(!text.contains("something_new"), "{text}");
        let back: VmConfig = serde_json::from_str(&text).expect("round trip");
        assert_eq!(back, c);
        let json: serde_json::Value = serde_json::from_str(&text).expect("value");
        assert_eq!(json["cpus"]["max_phys_bits"], 46);
        assert_eq!(json["serial"]["mode"], "Off");
        assert_eq!(json["debug_console"]["iobase"], 233);
    }

    #[test]
    fn settings_nimbus_cannot_honour_are_refused_by_name() {
        for (patch, name) in [
            (
                r#"{"vsock": {"cid": 3, "socket": "/s", "pci_segment": 1}}"#,
                "pci_segment 1 does not exist",
            ),
            (
                r#"{"devices": [{"path": "/sys/bus/pci/devices/0000:00:01.0/"}]}"#,
                "VFIO",
            ),
            (r#"{"pvpanic": true}"#, "pvpanic"),
            (
                r#"{"memory": {"size": 1073741824, "zones": [{"id": "z", "size": 1}]}}"#,
                "zones",
            ),
            (
                r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": {"threads_per_core": 2, "cores_per_die": 2, "dies_per_package": 1, "packages": 1}}}"#,
                "topology 2:2:1:1 describes 4 vCPUs",
            ),
            (
                r#"{"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "features": {"amx": true}}}"#,
                "amx",
            ),
            (
                r#"{"disks": [{"path": "/d", "image_type": "Qcow2"}]}"#,
                "Qcow2",
            ),
            (
                r#"{"disks": [{"path": "/d", "rate_limiter_config": {"ops": null}}]}"#,
                "rate_limiter",
            ),
            (r#"{"serial": {"mode": "Socket"}}"#, "socket"),
            (
                r#"{"memory": {"size": 1073741824, "hotplug_method": "VirtioMem"}}"#,
                "virtio-mem",
            ),
            (r#"{"debug_console": {"mode": "File"}}"#, "debug-console"),
        ] {
            let mut c: serde_json::Value =
                serde_json::from_str(r#"{"payload": {"kernel": "/k"}}"#).expect("base");
            let p: serde_json::Value = serde_json::from_str(patch).expect("patch");
            for (k, v) in p.as_object().expect("object") {
                c[k] = v.clone();
            }
            let c: VmConfig = serde_json::from_value(c).expect(patch);
            let e = c.validate().expect_err(patch);
            assert!(
                nimbus_chain(&e).contains(name),
                "{patch}: '{}' does not name {name}",
                nimbus_chain(&e)
            );
        }
    }

    fn nimbus_chain(e: &ConfigError) -> String {
        let mut text = e.to_string();
        let mut next = std::error::Error::source(e);
        while let Some(s) = next {
            text.push_str(&format!(": {s}"));
            next = s.source();
        }
        text
    }

    #[test]
    fn devices_get_cloud_hypervisors_ids_and_a_mac() {
        let mut c: VmConfig = serde_json::from_str(
            r#"{"payload": {"kernel": "/k"},
                "disks": [{"path": "/a"}, {"path": "/b", "id": "_disk1"}],
                "net": [{"tap": "t0"}, {"vhost_user": true, "vhost_socket": "/s"}],
                "memory": {"size": 1073741824, "shared": true},
                "fs": [{"tag": "f", "socket": "/fs"}]}"#,
        )
        .expect("json");
        c.name_devices();
        let ids: Vec<String> = c.device_ids().collect();
        assert_eq!(ids, ["_disk0", "_disk1", "_net1", "_net2", "_fs3"]);
        let nets = c.net.clone().unwrap_or_default();
        assert!(nets[0].mac.is_some(), "a TAP interface gets a MAC");
        assert!(nets[1].mac.is_none(), "the vhost-user backend owns its MAC");
        let before = c.clone();
        c.name_devices();
        assert_eq!(c, before, "naming twice changes nothing");
        c.validate().expect("valid");
    }

    #[test]
    fn descriptor_numbers_in_json_are_ignored() {
        let n: NetConfig =
            serde_json::from_str(r#"{"fds": [3, 4], "num_queues": 4}"#).expect("json");
        assert_eq!(n.fds, None);
        let n = NetConfig::parse("fd=[3,4],num_queues=4").expect("cli");
        assert_eq!(n.fds, Some(vec![3, 4]));
        assert_eq!(
            serde_json::to_value(&n).expect("json")["fds"],
            serde_json::json!([3, 4])
        );
    }

    #[test]
    fn duplicate_ids_and_paths_are_their_own_errors() {
        let mut c = valid();
        c.disks = Some(vec![
            parse_option::<DiskConfig>("disk", "path=/a,id=x").expect("a"),
            parse_option::<DiskConfig>("disk", "path=/b,id=x").expect("b"),
        ]);
        assert_eq!(c.validate(), Err(ConfigError::DuplicateId("x".into())));
        c.disks = Some(vec![
            parse_option::<DiskConfig>("disk", "path=/a").expect("a"),
            parse_option::<DiskConfig>("disk", "path=/a").expect("b"),
        ]);
        assert_eq!(c.validate(), Err(ConfigError::DuplicatePath("/a".into())));
    }

    #[test]
    fn absurd_sizes_are_errors_not_overflows() {
        for memory in [
            r#"{"size": 18446744073709547520}"#,
            r#"{"size": 1073741824, "hotplug_size": 18446744073707454464}"#,
        ] {
            let c: VmConfig = serde_json::from_str(&format!(
                r#"{{"payload": {{"kernel": "/k"}}, "memory": {memory}}}"#
            ))
            .expect(memory);
            let e = c.validate().expect_err(memory);
            assert!(e.to_string().contains("physical address bits"), "{e}");
        }
    }

    #[test]
    fn sections_of_the_wrong_shape_do_not_parse() {
        for body in [
            r#"{"vsock": []}"#,
            r#"{"balloon": []}"#,
            r#"{"tpm": [1]}"#,
            r#"{"pmem": {"file": "/p"}}"#,
            r#"{"numa": [1, 2]}"#,
        ] {
            assert!(serde_json::from_str::<VmConfig>(body).is_err(), "{body}");
        }
        let c: VmConfig =
            serde_json::from_str(r#"{"payload": {"kernel": "/k"}, "devices": [], "pmem": []}"#)
                .expect("empty lists");
        c.validate().expect("empty lists ask for nothing");
    }
}
