//! The command line, in Cloud Hypervisor's syntax, turned into a [`VmConfig`].

use std::path::PathBuf;

use clap::Parser;
use nimbus_thread::seccomp::SeccompMode;

use vm_config::{
    kv, BalloonConfig, ConfigError, ConsoleConfig, CpusConfig, DebugConsoleConfig, DiskConfig,
    FsConfig, LandlockConfig, MemoryConfig, NetConfig, PayloadConfig, PciSegmentConfig,
    PlatformConfig, PmemConfig, RngConfig, VmConfig, VsockConfig,
};

/// Nimbus: a virtual machine monitor for cloud workloads.
#[derive(Debug, Parser)]
#[command(name = "nimbus", disable_version_flag = true)]
pub struct Cli {
    /// Kernel to boot: a vmlinux ELF with a PVH note, or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// vCPUs: boot=N[,max=M][,...] (`--help` lists every key).
    #[arg(long, value_name = "boot=N[,max=M][,...]", long_help = CPUS_HELP)]
    pub cpus: Option<String>,
    /// Guest RAM: size=SIZE[,shared=on][,hugepages=on][,...] (`--help` lists every key).
    #[arg(long, value_name = "size=SIZE[,...]", long_help = MEMORY_HELP)]
    pub memory: Option<String>,
    /// Disk: path=PATH[,...] or vhost_user=on,socket=PATH[,...]; repeat the option (or give
    /// several values) for more disks (`--help` lists every key).
    #[arg(long, value_name = "path=PATH[,...]", num_args = 1.., action = clap::ArgAction::Append,
          long_help = DISK_HELP)]
    pub disk: Vec<String>,
    /// Network interface: tap=NAME[,...], fd=N[,...] or vhost_user=on,socket=PATH[,...]; repeat
    /// for more interfaces (`--help` lists every key).
    #[arg(long, value_name = "tap=NAME[,...]", num_args = 1.., action = clap::ArgAction::Append,
          long_help = NET_HELP)]
    pub net: Vec<String>,
    /// virtio-fs share: tag=TAG,socket=PATH[,...]; repeatable (`--help` lists every key).
    #[arg(long, value_name = "tag=TAG,socket=PATH[,...]", num_args = 1.., action = clap::ArgAction::Append,
          long_help = FS_HELP)]
    pub fs: Vec<String>,
    /// virtio-pmem device: file=PATH[,size=SIZE][,discard_writes=on][,...]; repeatable
    /// (`--help` lists every key).
    #[arg(long, value_name = "file=PATH[,...]", num_args = 1.., action = clap::ArgAction::Append,
          long_help = PMEM_HELP)]
    pub pmem: Vec<String>,
    /// Memory balloon: size=SIZE[,deflate_on_oom=on][,free_page_reporting=on].
    #[arg(long, value_name = "size=SIZE[,...]", long_help = BALLOON_HELP)]
    pub balloon: Option<String>,
    /// Entropy device: src=PATH (default /dev/urandom).
    #[arg(long, value_name = "src=PATH", long_help = RNG_HELP)]
    pub rng: Option<String>,
    /// virtio-vsock with Cloud Hypervisor's hybrid Unix-socket backend: cid=N,socket=PATH.
    #[arg(long, value_name = "cid=N,socket=PATH[,...]", long_help = VSOCK_HELP)]
    pub vsock: Option<String>,
    /// 16550 serial port: off|null|tty|pty|file=PATH|socket=PATH (default null).
    #[arg(long, value_name = "MODE", long_help = SERIAL_HELP)]
    pub serial: Option<String>,
    /// virtio console: off|null|tty|pty|file=PATH|socket=PATH (default tty).
    #[arg(long, value_name = "MODE", long_help = CONSOLE_HELP)]
    pub console: Option<String>,
    /// Debug console (I/O port 0xe9): off|null|tty|pty|file=PATH|socket=PATH[,iobase=0xN]
    /// (default off).
    #[arg(long, value_name = "MODE[,iobase=0xN]", long_help = DEBUG_CONSOLE_HELP)]
    pub debug_console: Option<String>,
    /// Platform: num_pci_segments=N (1..=16 PCI segments, `--help` lists every key).
    #[arg(long, value_name = "num_pci_segments=N", long_help = PLATFORM_HELP)]
    pub platform: Option<String>,
    /// A PCI segment's share of the MMIO windows:
    /// pci_segment=N[,mmio32_aperture_weight=W][,mmio64_aperture_weight=W]; repeatable.
    #[arg(long, value_name = "pci_segment=N[,...]", num_args = 1.., action = clap::ArgAction::Append,
          long_help = PCI_SEGMENT_HELP)]
    pub pci_segment: Vec<String>,
    /// Serve Cloud Hypervisor's REST API on this Unix socket: path=PATH, fd=N (a listening
    /// socket passed by the caller) or PATH. Without --kernel the VMM waits for vm.create.
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub api_socket: Option<String>,
    /// Write lifecycle events (JSON) to this file or FIFO: path=PATH, fd=N or PATH.
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub event_monitor: Option<String>,
    /// System call filters per thread: true (default; a forbidden call ends the process),
    /// log (the kernel logs forbidden calls and lets them through) or false.
    #[arg(long, value_name = "true|false|log")]
    pub seccomp: Option<String>,
    /// Restrict file access to the paths the VM configuration names (Landlock), applied
    /// when the VM is created.
    #[arg(long)]
    pub landlock: bool,
    /// More paths the VM may use under --landlock: path=PATH,access=r|w|rw; repeatable.
    #[arg(long, value_name = "path=PATH,access=r|w|rw", num_args = 1.., action = clap::ArgAction::Append,
          long_help = LANDLOCK_RULES_HELP)]
    pub landlock_rules: Vec<String>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Write the log to this file instead of standard error.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Print the version and exit.
    #[arg(short = 'V', long)]
    pub version: bool,
}

// `--help`'s text of the device options: every key the option's configuration struct accepts
// (docs/cli.md describes them; vmm/tests/docs.rs checks that both name the same keys).

const CPUS_HELP: &str = "\
vCPUs.

boot=N, boot_vcpus=N      vCPUs at boot, 1..=254 (default 1)
max=M, max_vcpus=M        the most vCPUs the VM may have (default: boot)
topology=T:C:D:P          threads per core (1 or 2), cores per die, dies per package,
                          packages; their product is max (default 1:max:1:1); shown to
                          the guest in CPUID and the MADT's APIC IDs
affinity=[V@[H,...],...]  host CPUs each vCPU's thread vcpuV may run on, e.g.
                          [0@[0,1],1@[2-3]]
features=[amx]            optional CPU features: amx is refused until implemented
nested=on|off             offer the host's VMX/SVM to the guest (default on)
max_phys_bits=N           address width RAM and hotplug_size must fit in (default 46)
kvm_hyperv=on|off         Hyper-V enlightenments: on is refused until implemented";

const MEMORY_HELP: &str = "\
Guest RAM.

size=SIZE                 RAM (default 512M; K, M, G, T suffixes)
shared=on                 back RAM with a memfd (vhost-user devices need it)
hugepages=on              back RAM with huge pages, reserved at start
hugepage_size=SIZE        their size (with hugepages=on; default the host's)
prefault=on               populate all RAM at start
thp=on|off                transparent huge pages (default on)
mergeable=on              let KSM merge identical pages
hotplug_size=SIZE         address space kept free above RAM for RAM added later
hotplug_method=acpi|virtio-mem  how RAM is added (acpi; virtio-mem is refused until
                          implemented; adding RAM is not implemented yet)
Refused until implemented: hotplugged_size=SIZE (other than 0), zones=....";

const DISK_HELP: &str = "\
A virtio-blk disk; repeat the option (or give several values) for more disks.

path=PATH                 raw image or block device (required unless vhost_user=on)
readonly=on               the guest may not write
direct=on                 open the image with O_DIRECT
image_type=raw|unknown    unknown (default): refuse qcow2, vhdx, vmdk and vhd headers
serial=S                  the GET_ID answer, at most 20 bytes (default: the id)
num_queues=N              request queues, 1..=64 (default 1)
queue_size=N              descriptors per queue, a power of two <= 1024 (default 128)
poll_us=N                 how long the worker polls a queue after serving it, in us,
                          0..=1000 (default 32)
id=ID                     device id (default _diskN)
pci_segment=N             PCI segment, below --platform num_pci_segments (default 0)
pci_device_id=N           PCI slot, 1..=31 (default: the first free one)
vhost_user=on             served by a vhost-user-blk backend (needs --memory shared=on)
socket=PATH, vhost_socket=PATH  the backend's socket
sparse=on                 discards free host space (default on)
disable_io_uring=on|off, disable_aio=on|off  accepted, without effect
iommu=off                 on is refused
Refused until implemented: rate_limit_group=ID, rate_limiter_config=...,
queue_affinity=..., backing_files=on, sparse=off, image_type=qcow2|vhdx|vhd.";

const NET_HELP: &str = "\
A virtio-net interface; repeat the option (or give several values) for more interfaces.

tap=NAME                  TAP to use, created when missing (default: named by the kernel)
fd=N, fd=[N,M,...]        TAPs the caller opened, one per queue pair
ip=IP, mask=MASK          host address of a TAP Nimbus opens (mask default 255.255.255.0)
host_mac=MAC              the TAP's MAC
mtu=N                     MTU offered to the guest and set on a TAP Nimbus opens
mac=MAC                   the guest's MAC (default: random, locally administered)
num_queues=N              queues, two per pair: even, 2..=32 (default 2)
queue_size=N              descriptors per queue, a power of two <= 1024 (default 256)
offload_csum=on|off, offload_tso=on|off, offload_ufo=on|off  offloads offered (default on)
id=ID                     device id (default _netN)
pci_segment=N             PCI segment, below --platform num_pci_segments (default 0)
pci_device_id=N           PCI slot, 1..=31 (default: the first free one)
vhost_user=on             served by a vhost-user-net backend that owns the TAP
                          (needs --memory shared=on)
socket=PATH, vhost_socket=PATH  the backend's socket
vhost_mode=client|server  client (default): the backend listens; server: Nimbus does
iommu=off                 on is refused
Refused until implemented: rate_limiter_config=....";

const FS_HELP: &str = "\
A virtio-fs share served by a vhost-user-fs backend (virtiofsd); needs --memory shared=on;
repeatable.

tag=TAG                   what the guest mounts, 1..=36 bytes (required)
socket=PATH               the backend's socket (required)
num_queues=N              request queues, 1..=16 (default 1)
queue_size=N              descriptors per queue, a power of two <= 1024 (default 1024)
id=ID                     device id (default _fsN)
pci_segment=N             PCI segment, below --platform num_pci_segments (default 0)
pci_device_id=N           PCI slot, 1..=31 (default: the first free one)";

const PMEM_HELP: &str = "\
A virtio-pmem device: a host file mapped into the guest's physical address space above
RAM, which the guest uses as persistent memory (Linux: /dev/pmem<N>); repeatable.

file=PATH                 a regular file (required)
size=SIZE                 bytes, a multiple of 2M (default: the file's size, which must be
                          one); a shorter file is extended
discard_writes=on|off     on: the guest's writes stay in the VMM's memory, never in the
                          file (the file is opened read-only) (default off)
id=ID                     device id (default _pmemN)
pci_segment=0             PCI segment (only 0 exists)
iommu=off                 on is refused";

const BALLOON_HELP: &str = "\
The virtio memory balloon (id __balloon): the guest gives back the pages it puts in it, and the
host drops them from its memory; vm.resize desired_balloon changes the size while running.

size=SIZE                 bytes asked of the guest at boot, below the RAM size (required)
deflate_on_oom=on|off     the guest may take pages back when it runs out of memory (default off)
free_page_reporting=on|off  the guest reports free pages, which the host drops (default off)";

const RNG_HELP: &str = "\
The virtio-rng device (every VM has one).

src=PATH                  entropy source (default /dev/urandom)
iommu=off                 on is refused";

const VSOCK_HELP: &str = "\
virtio-vsock with Cloud Hypervisor's hybrid Unix-socket backend: host programs connect to
the socket and write `CONNECT <port>\\n`; the guest's connections to host port P go to the
Unix socket PATH_P.

cid=N                     the guest's context id, 3 and up (required)
socket=PATH               the Unix socket Nimbus listens on (required)
id=ID                     device id (default _vsockN)
pci_segment=0             PCI segment (only 0 exists)
iommu=off                 on is refused";

const SERIAL_HELP: &str = "\
The 16550 serial port at 0x3f8: one mode.

off                       no device
null                      output discarded (default)
tty                       standard output (and standard input, unless the console is tty)
pty                       a new pseudo-terminal (vm.info shows its path in serial.file)
file=PATH                 a file, truncated at start
socket=PATH               a Unix socket Nimbus creates; one client at a time (a new one
                          replaces it); output kept (64 KiB) until a client attaches";

const CONSOLE_HELP: &str = "\
The virtio console: one mode.

off                       no device
null                      output discarded
tty                       standard output, and standard input goes to the guest (default)
pty                       a new pseudo-terminal (vm.info shows its path in console.file)
file=PATH                 a file, truncated at start
socket=PATH               a Unix socket Nimbus creates, as for the serial port
iommu=off                 on is refused";

const DEBUG_CONSOLE_HELP: &str = "\
The debug console: what the guest writes to one I/O port. One mode:

off                       no device (default)
null                      output discarded
tty                       standard output
pty                       a new pseudo-terminal (vm.info shows its path in
                          debug_console.file)
file=PATH                 a file, truncated at start
socket=PATH               a Unix socket Nimbus creates, as for the serial port
iobase=0xN                the I/O port, in hex (default 0xe9)";

const PLATFORM_HELP: &str = "\
Platform options.

num_pci_segments=N        PCI segments (host bridges), 1..=16 (default 1)
iommu_address_width_bits=N  accepted, without effect (there is no virtual IOMMU)
Refused until implemented: iommu_segments=[...], serial_number=S, system_serial_number=S,
uuid=U, system_uuid=U, oem_strings=[...].";

const PCI_SEGMENT_HELP: &str = "\
A PCI segment's share of the 32-bit and 64-bit MMIO windows; repeatable.

pci_segment=N             the segment, below num_pci_segments (required)
mmio32_aperture_weight=W  its weight in the split of the 32-bit window (default 1)
mmio64_aperture_weight=W  its weight in the split of the 64-bit window (default 1)";

const LANDLOCK_RULES_HELP: &str = "\
More paths the VM may use under --landlock (a directory covers everything beneath it);
repeat the option or give several values for more paths.

path=PATH                 an existing file or directory
access=r|w|rw             read (and list, execute), write (and create, remove), or both";

impl Cli {
    /// Whether the command line describes a VM (a kernel to boot).
    pub fn has_payload(&self) -> bool {
        self.kernel.is_some()
    }

    /// The VM options given besides the payload, by name (they need `--kernel`).
    pub fn vm_options_without_payload(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        for (name, present) in [
            ("--initramfs", self.initramfs.is_some()),
            ("--cmdline", self.cmdline.is_some()),
            ("--cpus", self.cpus.is_some()),
            ("--memory", self.memory.is_some()),
            ("--disk", !self.disk.is_empty()),
            ("--net", !self.net.is_empty()),
            ("--fs", !self.fs.is_empty()),
            ("--pmem", !self.pmem.is_empty()),
            ("--balloon", self.balloon.is_some()),
            ("--rng", self.rng.is_some()),
            ("--vsock", self.vsock.is_some()),
            ("--serial", self.serial.is_some()),
            ("--console", self.console.is_some()),
            ("--debug-console", self.debug_console.is_some()),
            ("--platform", self.platform.is_some()),
            ("--pci-segment", !self.pci_segment.is_empty()),
            ("--landlock", self.landlock),
            ("--landlock-rules", !self.landlock_rules.is_empty()),
        ] {
            if present {
                given.push(name);
            }
        }
        given
    }

    /// `--seccomp`'s mode: `true` (the default: a forbidden system call ends the process),
    /// `log` (the kernel logs it and lets it through) or `false` (no filters).
    pub fn seccomp_mode(&self) -> Result<SeccompMode, ConfigError> {
        SeccompMode::parse(self.seccomp.as_deref().unwrap_or("true"))
            .map_err(|e| ConfigError::Device(e.to_string()))
    }

    /// The VM configuration the options describe (not yet validated).
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        let mut config = VmConfig::default();
        if let Some(s) = &self.cpus {
            config.cpus = kv::from_str::<CpusConfig>(s).map_err(|source| ConfigError::Parse {
                option: "cpus",
                source,
            })?;
            let max_given =
                kv::split(s).is_ok_and(|p| p.iter().any(|(k, _)| k == "max" || k == "max_vcpus"));
            if !max_given {
                config.cpus.max_vcpus = config.cpus.boot_vcpus;
            }
        }
        if let Some(s) = &self.memory {
            config.memory = vm_config::parse_option::<MemoryConfig>("memory", s)?;
        }
        config.disks = parse_each::<DiskConfig>("disk", &self.disk)?;
        if !self.net.is_empty() {
            let nets = self
                .net
                .iter()
                .map(|s| NetConfig::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            config.net = Some(nets);
        }
        config.fs = parse_each::<FsConfig>("fs", &self.fs)?;
        config.pmem = parse_each::<PmemConfig>("pmem", &self.pmem)?;
        if let Some(s) = &self.balloon {
            config.balloon = Some(vm_config::parse_option::<BalloonConfig>("balloon", s)?);
        }
        if let Some(s) = &self.rng {
            config.rng = vm_config::parse_option::<RngConfig>("rng", s)?;
        }
        if let Some(s) = &self.vsock {
            config.vsock = Some(vm_config::parse_option::<VsockConfig>("vsock", s)?);
        }
        if let Some(s) = &self.serial {
            config.serial = ConsoleConfig::parse("serial", s)?;
        }
        if let Some(s) = &self.console {
            config.console = ConsoleConfig::parse("console", s)?;
        }
        if let Some(s) = &self.debug_console {
            config.debug_console = DebugConsoleConfig::parse(s)?;
        }
        if let Some(s) = &self.platform {
            config.platform = Some(vm_config::parse_option::<PlatformConfig>("platform", s)?);
        }
        config.pci_segments = parse_each::<PciSegmentConfig>("pci-segment", &self.pci_segment)?;
        config.landlock_enable = self.landlock;
        config.landlock_rules =
            parse_each::<LandlockConfig>("landlock-rules", &self.landlock_rules)?;
        if self.kernel.is_some() || self.initramfs.is_some() || self.cmdline.is_some() {
            config.payload = Some(PayloadConfig {
                kernel: self.kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
                firmware: None,
            });
        }
        Ok(config)
    }
}

/// Each value of a repeatable option, parsed; `None` when the option was not given.
fn parse_each<T: serde::de::DeserializeOwned>(
    option: &'static str,
    values: &[String],
) -> Result<Option<Vec<T>>, ConfigError> {
    if values.is_empty() {
        return Ok(None);
    }
    values
        .iter()
        .map(|s| vm_config::parse_option::<T>(option, s))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The version line, in the form management stacks written for Cloud Hypervisor parse
/// (libvirt reads `cloud-hypervisor vX.Y.Z` and gates features on the version): Nimbus takes
/// the options libvirt passes (`--api-socket fd=N`, `--event-monitor`).
pub fn version_line() -> String {
    let own = env!("CARGO_PKG_VERSION");
    format!("cloud-hypervisor v{CH_COMPAT_VERSION} (nimbus {own})")
}

/// The Cloud Hypervisor release whose API and CLI Nimbus follows.
pub const CH_COMPAT_VERSION: &str = "51.1.0";

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        let mut argv = vec!["nimbus"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map_err(|e| ConfigError::Payload(e.to_string()))?
            .vm_config()
    }

    #[test]
    fn options_fill_the_config() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--cmdline",
            "a b",
            "--cpus",
            "boot=2",
            "--memory",
            "size=128M",
            "--serial",
            "tty",
        ])
        .expect("config");
        assert_eq!((c.cpus.boot_vcpus, c.cpus.max_vcpus), (2, 2));
        assert_eq!(c.memory.size, 128 << 20);
        assert_eq!(
            c.payload.as_ref().and_then(|p| p.cmdline.clone()),
            Some("a b".into())
        );
        c.validate().expect("valid");
        let c = parse(&["--kernel", "/k", "--cpus", "boot=2,max=8"]).expect("config");
        assert_eq!(c.cpus.max_vcpus, 8);
    }

    #[test]
    fn malformed_options_are_errors() {
        let e = parse(&["--cpus", "boot=x"]).expect_err("bad");
        assert_eq!(e.to_string(), "--cpus");
        assert!(std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("'x'")));
        assert!(parse(&["--memory", "size=12Q"]).is_err());
        assert!(parse(&["--memory", "bogus=1"]).is_err());
        assert!(parse(&["--serial", "loud"]).is_err());
    }

    #[test]
    fn disks() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--disk",
            "path=/a,readonly=on",
            "path=/b,num_queues=2,serial=S1",
            "--disk",
            "path=/c",
        ])
        .expect("config");
        let disks = c.disks.clone().unwrap_or_default();
        assert_eq!(disks.len(), 3);
        assert!(disks[0].readonly && !disks[1].readonly);
        assert_eq!(
            (
                disks[1].num_queues,
                disks[1].queue_size,
                disks[1].serial.as_deref()
            ),
            (2, 128, Some("S1"))
        );
        c.validate().expect("valid");
        let bad = parse(&["--kernel", "/k", "--disk", "path=/a,queue_size=100"]).expect("parses");
        assert!(bad
            .validate()
            .expect_err("queue size")
            .to_string()
            .contains("queue_size 100"));
        let bad = parse(&["--kernel", "/k", "--disk", "readonly=on"]).expect("parses");
        assert!(bad.validate().is_err(), "no path");
        let dup =
            parse(&["--kernel", "/k", "--disk", "path=/a,id=d", "path=/b,id=d"]).expect("parses");
        assert!(dup
            .validate()
            .expect_err("dup")
            .to_string()
            .contains("used twice"));
    }

    #[test]
    fn nets() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56,ip=10.0.0.1,mask=255.0.0.0",
            "fd=[3,4],num_queues=4",
        ])
        .expect("config");
        let nets = c.net.clone().unwrap_or_default();
        assert_eq!(nets[0].tap.as_deref(), Some("tap0"));
        assert_eq!(nets[0].ip, Some(std::net::Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!((nets[0].num_queues, nets[0].queue_size), (2, 256));
        assert_eq!(nets[1].fds, Some(vec![3, 4]));
        c.validate().expect("valid");
        for bad in [
            "tap=t,mac=52:54:00:12:34",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,num_queues=3",
            "fd=3,num_queues=4",
            "tap=a-very-long-tap-name0",
        ] {
            let c = parse(&["--kernel", "/k", "--net", bad]).expect("parses");
            assert!(c.validate().is_err(), "{bad} must be rejected");
        }
        assert!(parse(&["--kernel", "/k", "--net", "tap=t,ip=10.0.0"]).is_err());
        // Empty values are unset, as in Cloud Hypervisor's README (`tap=,mac=`).
        let c = parse(&["--kernel", "/k", "--net", "tap=,mac=,ip=,mask=,fd="]).expect("empty");
        let n = &c.net.clone().unwrap_or_default()[0];
        assert_eq!((&n.tap, &n.mac, n.ip, &n.fds), (&None, &None, None, &None));
        c.validate().expect("valid");
        let e = parse(&["--kernel", "/k", "--net", "fd=[3,x]"]).expect_err("bad fd");
        let chain = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert_eq!(
            chain,
            "--net: fd=[3,x]: '[3,x]' is not a list of file descriptors such as 3, [3,4] or [3-5]"
        );
        assert!(parse(&["--kernel", "/k", "--net", "fd=x"]).is_err());
        assert!(parse(&["--kernel", "/k", "--net", "vhost_mode=sideways"]).is_err());
    }

    #[test]
    fn vhost_user_net_modes() {
        use vm_config::VhostMode;
        let c = parse(&[
            "--kernel",
            "/k",
            "--net",
            "vhost_user=on,socket=/s1",
            "vhost_user=on,socket=/s2,vhost_mode=server",
            "vhost_user=on,socket=/s3,vhost_mode=client",
        ])
        .expect("config");
        let modes: Vec<_> = c.net.iter().flatten().map(|n| n.vhost_mode).collect();
        assert_eq!(
            modes,
            [VhostMode::Client, VhostMode::Server, VhostMode::Client]
        );
        // Cloud Hypervisor's JSON spelling.
        let n: vm_config::NetConfig = serde_json::from_str(
            r#"{"vhost_user":true,"vhost_socket":"/s","vhost_mode":"Server"}"#,
        )
        .expect("json");
        assert_eq!(n.vhost_mode, VhostMode::Server);
    }

    #[test]
    fn fs_shares() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--memory",
            "size=1G,shared=on",
            "--fs",
            "tag=myfs,socket=/run/fs.sock",
        ])
        .expect("config");
        let fs = c.fs.clone().unwrap_or_default();
        assert_eq!(
            (fs[0].tag.as_str(), fs[0].num_queues, fs[0].queue_size),
            ("myfs", 1, 1024)
        );
        c.validate().expect("valid");
        let no_shared = parse(&["--kernel", "/k", "--fs", "tag=myfs,socket=/s"]).expect("parses");
        assert!(no_shared
            .validate()
            .expect_err("shared")
            .to_string()
            .contains("shared=on"));
        let long_tag = parse(&[
            "--kernel",
            "/k",
            "--memory",
            "size=1G,shared=on",
            "--fs",
            &format!("tag={},socket=/s", "t".repeat(37)),
        ])
        .expect("parses");
        assert!(long_tag.validate().is_err());
        assert!(
            parse(&["--kernel", "/k", "--fs", "socket=/s"]).is_err(),
            "tag is required"
        );
    }

    /// libvirt's reading of the version line: after "cloud-hypervisor ", past the last '/',
    /// without a leading 'v', cut at the first '-', then major.minor.micro.
    fn libvirt_version(line: &str) -> Option<(u32, u32, u32)> {
        let rest = line.strip_prefix("cloud-hypervisor ")?;
        let rest = rest.rsplit('/').next()?;
        let rest = rest.strip_prefix('v').unwrap_or(rest);
        let rest = rest.split('-').next()?;
        let mut parts = rest.split('.').map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u32>()
                .ok()
        });
        Some((parts.next()??, parts.next()??, parts.next()??))
    }

    #[test]
    fn version_line_is_what_libvirt_parses() {
        let line = version_line();
        assert!(!line.contains('\n'));
        assert_eq!(libvirt_version(&line), Some((51, 1, 0)));
    }

    #[test]
    fn control_plane_options() {
        let cli = Cli::try_parse_from([
            "nimbus",
            "--api-socket",
            "fd=3",
            "--event-monitor",
            "path=/tmp/ev",
            "--seccomp",
            "false",
        ])
        .expect("parse");
        assert_eq!(cli.api_socket.as_deref(), Some("fd=3"));
        assert!(!cli.has_payload());
        assert!(cli.vm_options_without_payload().is_empty());
        assert_eq!(cli.seccomp_mode().ok(), Some(SeccompMode::Off));
        let cli = Cli::try_parse_from(["nimbus", "--seccomp", "true", "--disk", "path=/d"])
            .expect("parse");
        assert_eq!(cli.seccomp_mode().ok(), Some(SeccompMode::Trap));
        assert_eq!(cli.vm_options_without_payload(), ["--disk"]);
        let cli = Cli::try_parse_from(["nimbus", "--seccomp", "maybe"]).expect("parse");
        assert!(cli.seccomp_mode().is_err());
        let cli = Cli::try_parse_from(["nimbus"]).expect("parse");
        assert_eq!(
            cli.seccomp_mode().ok(),
            Some(SeccompMode::Trap),
            "on by default"
        );
    }
}
