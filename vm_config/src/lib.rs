//! The one VM configuration, shaped after Cloud Hypervisor's `VmConfig` JSON schema.
//!
//! The CLI (via [`kv`]), the REST API (JSON) and snapshots all produce these structs. Field names
//! are CH's JSON names; CLI spellings that differ are serde aliases. Omitted fields take CH's
//! defaults, unknown JSON fields are ignored (management stacks send fields we do not define), and
//! [`VmConfig::validate`] rejects what cannot be built, with a message naming the field.
#![deny(missing_docs)]

pub mod kv;
mod size;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use size::parse_size;

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

/// Largest vCPU count: APIC IDs are 8 bits here (no x2APIC yet), 255 is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;

/// vCPUs (CH `CpusConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpusConfig {
    /// vCPUs running at boot.
    #[serde(alias = "boot")]
    pub boot_vcpus: u8,
    /// vCPUs the VM may have (hotplug).
    #[serde(alias = "max")]
    pub max_vcpus: u8,
    /// Guest physical address width.
    pub max_phys_bits: u8,
    /// Expose Hyper-V enlightenments (not supported yet; must stay false).
    pub kvm_hyperv: bool,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: 1,
            max_vcpus: 1,
            max_phys_bits: 46,
            kvm_hyperv: false,
        }
    }
}

/// Guest RAM (CH `MemoryConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryConfig {
    /// RAM size in bytes (CLI accepts K/M/G suffixes).
    #[serde(deserialize_with = "size::deserialize")]
    pub size: u64,
    /// Ask the kernel to merge identical pages (KSM).
    pub mergeable: bool,
    /// Back RAM with shared memory (memfd), needed by vhost-user backends.
    pub shared: bool,
    /// Back RAM with huge pages.
    pub hugepages: bool,
    /// Huge page size in bytes, when `hugepages` is on.
    #[serde(deserialize_with = "size::deserialize_opt")]
    pub hugepage_size: Option<u64>,
    /// Touch all RAM at start.
    pub prefault: bool,
    /// Allow transparent huge pages on RAM.
    pub thp: bool,
    /// How RAM is hot-added: `Acpi` (CH's default) or `VirtioMem`.
    pub hotplug_method: String,
    /// RAM that may be hot-added, in bytes.
    #[serde(deserialize_with = "size::deserialize_opt")]
    pub hotplug_size: Option<u64>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            mergeable: false,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            thp: true,
            hotplug_method: "Acpi".into(),
            hotplug_size: None,
        }
    }
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

/// Where a serial port or console goes (CH `ConsoleOutputMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    /// No device at all.
    Off,
    /// A pseudo-terminal (not supported yet).
    Pty,
    /// The VMM's own standard output (and input).
    Tty,
    /// Appended to a file.
    File,
    /// A Unix socket (not supported yet).
    Socket,
    /// The device exists; output is discarded.
    Null,
}

/// A serial port or console (CH `ConsoleConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// Output file (mode `File`) or allocated PTY path (mode `Pty`).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Where output goes.
    pub mode: ConsoleOutputMode,
    /// Behind a virtual IOMMU.
    #[serde(default)]
    pub iommu: bool,
    /// Socket path (mode `Socket`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl ConsoleConfig {
    fn with_mode(mode: ConsoleOutputMode) -> Self {
        Self {
            file: None,
            mode,
            iommu: false,
            socket: None,
        }
    }

    /// Parses CH's CLI form: `off`, `null`, `tty`, `pty`, `file=PATH`, `socket=PATH`.
    pub fn parse(option: &'static str, s: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError::Console { option, message };
        let (mode, file, socket) = match s.split_once('=') {
            None => match s {
                "off" => (ConsoleOutputMode::Off, None, None),
                "null" => (ConsoleOutputMode::Null, None, None),
                "tty" => (ConsoleOutputMode::Tty, None, None),
                "pty" => (ConsoleOutputMode::Pty, None, None),
                other => {
                    return Err(err(format!(
                        "unknown mode '{other}' (off, null, tty, pty, file=PATH, socket=PATH)"
                    )))
                }
            },
            Some(("file", "")) | Some(("socket", "")) => return Err(err("empty path".into())),
            Some(("file", p)) => (ConsoleOutputMode::File, Some(PathBuf::from(p)), None),
            Some(("socket", p)) => (ConsoleOutputMode::Socket, None, Some(PathBuf::from(p))),
            Some((k, _)) => return Err(err(format!("unknown key '{k}'"))),
        };
        Ok(Self {
            file,
            mode,
            iommu: false,
            socket,
        })
    }
}

/// Parses one `--<option>` value in Cloud Hypervisor's `key=value,...` syntax into its
/// configuration struct (the command line and `nimbus-remote add-*` both use this).
pub fn parse_option<T: serde::de::DeserializeOwned>(
    option: &'static str,
    s: &str,
) -> Result<T, ConfigError> {
    kv::from_str::<T>(s).map_err(|source| ConfigError::Parse { option, source })
}

fn default_num_queues() -> usize {
    1
}

fn default_queue_size() -> u16 {
    128
}

/// A virtio-blk disk (CH `DiskConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image file or block device.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Behind a virtual IOMMU (not supported; must stay false).
    #[serde(default)]
    pub iommu: bool,
    /// Request queues.
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Served by a vhost-user backend (arrives with the split-process work).
    #[serde(default)]
    pub vhost_user: bool,
    /// vhost-user socket (CLI: `socket=`).
    #[serde(default, alias = "socket")]
    pub vhost_socket: Option<String>,
    /// Device identifier (generated when absent).
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// Microseconds the disk's worker keeps polling a queue after serving it before it sleeps
    /// (0..=1000, 0: never; a Nimbus extension, QEMU's `poll-max-ns`).
    #[serde(default = "default_poll_us")]
    pub poll_us: u32,
}

fn default_poll_us() -> u32 {
    virtio_chain::poll::DEFAULT_POLL.as_micros() as u32
}

impl DiskConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| {
            ConfigError::Device(format!(
                "disk {}: {m}",
                self.path
                    .as_deref()
                    .map_or("?".into(), |p| p.display().to_string())
            ))
        };
        if self.path.is_none() && !self.vhost_user {
            return Err(ConfigError::Device("disk: path is required".into()));
        }
        if self.vhost_user && self.vhost_socket.is_none() {
            return Err(ConfigError::Device(
                "disk: vhost_user=on needs socket=PATH".into(),
            ));
        }
        if self.iommu {
            return Err(err("iommu is not supported".into()));
        }
        if self.num_queues == 0 || self.num_queues > 64 {
            return Err(err(format!(
                "num_queues {} is not in 1..=64",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() || !(2..=1024).contains(&self.queue_size) {
            return Err(err(format!(
                "queue_size {} is not a power of two in 2..=1024",
                self.queue_size
            )));
        }
        if self.serial.as_ref().is_some_and(|s| s.len() > 20) {
            return Err(err("serial is longer than 20 bytes".into()));
        }
        if self.poll_us > 1000 {
            return Err(err(format!("poll_us {} is not in 0..=1000", self.poll_us)));
        }
        if self.pci_segment != 0 {
            return Err(err("only PCI segment 0 exists".into()));
        }
        Ok(())
    }
}

fn default_net_ip() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(192, 168, 249, 1)
}

fn default_net_mask() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(255, 255, 255, 0)
}

fn default_net_queues() -> usize {
    2
}

fn default_net_queue_size() -> u16 {
    256
}

fn default_true() -> bool {
    true
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
    /// TAP interface name (created when missing); generated when neither this nor `fds` is given.
    #[serde(default)]
    pub tap: Option<String>,
    /// Host-side IPv4 address of the TAP.
    #[serde(default = "default_net_ip")]
    pub ip: std::net::Ipv4Addr,
    /// Host-side netmask.
    #[serde(default = "default_net_mask")]
    pub mask: std::net::Ipv4Addr,
    /// Guest MAC address; random (locally administered) when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Host-side MAC of the TAP.
    #[serde(default)]
    pub host_mac: Option<String>,
    /// MTU offered to the guest.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Behind a virtual IOMMU (not supported; must stay false).
    #[serde(default)]
    pub iommu: bool,
    /// Queues (two per queue pair).
    #[serde(default = "default_net_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    /// Served by a vhost-user backend (arrives with the split-process work).
    #[serde(default)]
    pub vhost_user: bool,
    /// vhost-user socket (CLI: `socket=`).
    #[serde(default, alias = "socket")]
    pub vhost_socket: Option<String>,
    /// Who creates the vhost-user socket.
    #[serde(default)]
    pub vhost_mode: VhostMode,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// TAP file descriptors passed by a manager (one per queue pair). In API JSON these are
    /// ignored: fds arrive with SCM_RIGHTS.
    #[serde(default)]
    pub fds: Option<Vec<i32>>,
    /// PCI segment.
    #[serde(default)]
    pub pci_segment: u16,
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
    /// `fd=[3;4]`); the configuration field is `fds`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let parse_err = |source| ConfigError::Parse {
            option: "net",
            source,
        };
        let mut fds = None;
        let mut rest = Vec::new();
        for (k, v) in kv::split(s).map_err(parse_err)? {
            if k == "fd" {
                let list = v.trim_start_matches('[').trim_end_matches(']');
                let parsed = list
                    .split([';', ' '])
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        t.parse::<i32>()
                            .map_err(|_| kv::KvError::Invalid(format!("fd '{t}' is not a number")))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(parse_err)?;
                fds = Some(parsed);
            } else {
                rest.push(format!("{k}=\"{v}\""));
            }
        }
        let mut net = kv::from_str::<NetConfig>(&rest.join(",")).map_err(parse_err)?;
        if fds.is_some() {
            net.fds = fds;
        }
        Ok(net)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let name = self
            .tap
            .clone()
            .or_else(|| self.id.clone())
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
        if self.pci_segment != 0 {
            return Err(err("only PCI segment 0 exists".into()));
        }
        Ok(())
    }
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
    /// Tag the guest mounts (1..=36 bytes).
    pub tag: String,
    /// The backend's socket.
    pub socket: std::path::PathBuf,
    /// Request queues.
    #[serde(default = "default_fs_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    /// Device identifier.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment (Kata puts virtio-fs on segment 1; only 0 exists for now).
    #[serde(default)]
    pub pci_segment: u16,
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
        if self.pci_segment != 0 {
            return Err(err("only PCI segment 0 exists".into()));
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

/// Platform options (CH `PlatformConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlatformConfig {
    /// PCI segments (only 1 for now).
    pub num_pci_segments: u16,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            num_pci_segments: 1,
        }
    }
}

fn default_serial() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleOutputMode::Null)
}

fn default_console() -> ConsoleConfig {
    ConsoleConfig::with_mode(ConsoleOutputMode::Tty)
}

/// A whole VM (CH `VmConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What to boot.
    #[serde(default)]
    pub payload: Option<PayloadConfig>,
    /// Disks.
    #[serde(default)]
    pub disks: Option<Vec<DiskConfig>>,
    /// Network interfaces.
    #[serde(default)]
    pub net: Option<Vec<NetConfig>>,
    /// virtio-fs shares.
    #[serde(default)]
    pub fs: Option<Vec<FsConfig>>,
    /// The entropy device.
    #[serde(default)]
    pub rng: RngConfig,
    /// The 16550 UART at 0x3f8.
    #[serde(default = "default_serial")]
    pub serial: ConsoleConfig,
    /// The virtio console (PCI issue); only `Off` and the default are accepted today.
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    /// Platform options.
    #[serde(default)]
    pub platform: Option<PlatformConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: None,
            disks: None,
            net: None,
            fs: None,
            rng: RngConfig::default(),
            serial: default_serial(),
            console: default_console(),
            platform: None,
        }
    }
}

/// Id of the virtio console (Cloud Hypervisor's; it is not written into the configuration).
pub const CONSOLE_DEVICE_ID: &str = "__console";
/// Id of the entropy device (Cloud Hypervisor's; it is not written into the configuration).
pub const RNG_DEVICE_ID: &str = "__rng";

/// Smallest RAM accepted: room for the low-memory boot structures and a kernel at 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;

impl VmConfig {
    /// Gives every disk, network interface and virtio-fs share without an id one, by Cloud
    /// Hypervisor's rule: a prefix per kind (`_disk`, `_net`, `_fs`) and one counter shared by
    /// all kinds, skipping ids in use (one disk and one interface become `_disk0` and `_net1`);
    /// and every interface without a guest MAC a random locally administered one. What is
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
    }

    /// The ids given to devices.
    pub fn device_ids(&self) -> impl Iterator<Item = String> + '_ {
        let disks = self.disks.iter().flatten().filter_map(|d| d.id.clone());
        let nets = self.net.iter().flatten().filter_map(|n| n.id.clone());
        let fs = self.fs.iter().flatten().filter_map(|f| f.id.clone());
        disks.chain(nets).chain(fs)
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cpus;
        if c.boot_vcpus == 0 {
            return Err(ConfigError::Cpus("boot_vcpus must be at least 1".into()));
        }
        if c.max_vcpus < c.boot_vcpus {
            return Err(ConfigError::Cpus(format!(
                "max_vcpus ({}) is below boot_vcpus ({})",
                c.max_vcpus, c.boot_vcpus
            )));
        }
        if c.max_vcpus > MAX_VCPUS {
            return Err(ConfigError::Cpus(format!(
                "max_vcpus ({}) exceeds {MAX_VCPUS}",
                c.max_vcpus
            )));
        }
        if c.kvm_hyperv {
            return Err(ConfigError::Cpus("kvm_hyperv is not supported".into()));
        }
        let m = &self.memory;
        if m.size < MIN_MEMORY {
            return Err(ConfigError::Memory(format!(
                "size {} is below the minimum of {} MiB",
                m.size,
                MIN_MEMORY >> 20
            )));
        }
        if !m.size.is_multiple_of(4096) {
            return Err(ConfigError::Memory(format!(
                "size {} is not a multiple of 4 KiB",
                m.size
            )));
        }
        // RAM above the hole must stay inside the guest physical address width.
        let phys_limit = 1u64
            .checked_shl(u32::from(c.max_phys_bits.min(52)))
            .unwrap_or(u64::MAX);
        let ram_top = arch::x86_64::layout::pci_mmio64_start(m.size)
            .saturating_add(arch::x86_64::layout::PCI_MMIO64_SIZE);
        if ram_top > phys_limit {
            return Err(ConfigError::Memory(format!(
                "size {} does not fit in {} physical address bits",
                m.size, c.max_phys_bits
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
        for disk in self.disks.iter().flatten() {
            disk.validate()?;
            if disk.vhost_user && !(self.memory.shared || self.memory.hugepages) {
                return Err(ConfigError::Memory(
                    "vhost-user devices need guest memory the backend can map: add shared=on to --memory".into(),
                ));
            }
        }
        for net in self.net.iter().flatten() {
            net.validate()?;
            if net.vhost_user && !(self.memory.shared || self.memory.hugepages) {
                return Err(ConfigError::Memory(
                    "vhost-user devices need guest memory the backend can map: add shared=on to --memory".into(),
                ));
            }
        }
        for fs in self.fs.iter().flatten() {
            fs.validate()?;
            if !(self.memory.shared || self.memory.hugepages) {
                return Err(ConfigError::Memory(
                    "vhost-user devices need guest memory the backend can map: add shared=on to --memory".into(),
                ));
            }
        }
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
        for path in disk_paths.chain(net_sockets).chain(fs_sockets).flatten() {
            if !paths.insert(path.clone()) {
                return Err(ConfigError::DuplicatePath(path.display().to_string()));
            }
        }
        if self.rng.iommu {
            return Err(ConfigError::Device("rng: iommu is not supported".into()));
        }
        for (option, cons) in [("serial", &self.serial), ("console", &self.console)] {
            match cons.mode {
                ConsoleOutputMode::Pty | ConsoleOutputMode::Socket => {
                    return Err(ConfigError::Console {
                        option,
                        message: format!("mode {:?} is not supported yet", cons.mode),
                    })
                }
                ConsoleOutputMode::File if cons.file.is_none() => {
                    return Err(ConfigError::Console {
                        option,
                        message: "mode File needs a file".into(),
                    })
                }
                _ => {}
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
                kvm_hyperv: false
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
        assert!(ConsoleConfig::parse("serial", "file=").is_err());
        assert!(ConsoleConfig::parse("serial", "loud").is_err());
        assert!(ConsoleConfig::parse("serial", "path=/x").is_err());
    }
}
