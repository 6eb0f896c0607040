//! One VM instance: hypervisor VM, guest RAM, platform devices, vCPUs, from a [`VmConfig`].
//!
//! A reset tears the instance down and builds a fresh one from the same configuration, in the
//! same process ([`run`]), so a guest reboot starts from a clean machine.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::x86_64::{acpi, boot, cpu, cpuid, layout};
use devices::Bus;
use hypervisor::{Hypervisor, Vcpu};
use virtio_devices::vhost_user::Endpoint;
use vmm_sys_util::eventfd::EventFd;

use vm_config::{ConfigError, ConsoleConfig, ConsoleOutputMode, VhostMode, VmConfig};
use crate::control::{VmControl, VmEvent};
use crate::memory::{self, GuestMemoryMmap};
use crate::pci_devices::{PciDevices, PciError};
use crate::serial_input::{spawn_forwarder, InputSink, InputTarget, SerialInput};
use crate::vcpu::{VcpuContext, VcpuThread};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] vm_config::ConfigError),
    /// The hypervisor failed.
    #[error("{what}")]
    Hypervisor {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: hypervisor::HypervisorError,
    },
    /// Guest RAM could not be set up.
    #[error("guest memory")]
    Memory(#[from] memory::MemoryError),
    /// A file named in the configuration could not be opened.
    #[error("cannot open {what} {path}")]
    Open {
        /// `kernel`, `initramfs`, `serial file`.
        what: &'static str,
        /// Its path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel could not be loaded.
    #[error("cannot load kernel {path}")]
    Boot {
        /// Kernel path.
        path: String,
        /// Cause.
        #[source]
        source: boot::BootError,
    },
    /// The ACPI tables could not be built.
    #[error("cannot build the ACPI tables")]
    Acpi(#[source] acpi::AcpiError),
    /// vCPU boot state could not be written.
    #[error("cannot set up the boot CPU")]
    Cpu(#[source] cpu::CpuSetupError),
    /// A device could not be placed on a bus.
    #[error("cannot place {what} on the bus")]
    Bus {
        /// Device.
        what: &'static str,
        /// Cause.
        #[source]
        source: devices::BusError,
    },
    /// An OS resource (thread, eventfd) could not be created.
    #[error("{what}")]
    Os {
        /// What was being created.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk image could not be opened.
    #[error("disk {path}")]
    Disk {
        /// Image path.
        path: String,
        /// Cause.
        #[source]
        source: block::BlockError,
    },
    /// A vhost-user backend could not be reached or used.
    #[error("vhost-user backend {socket}")]
    VhostUser {
        /// Socket path.
        socket: String,
        /// Cause.
        #[source]
        source: virtio_devices::vhost_user::VhostUserError,
    },
    /// A network interface could not be set up.
    #[error("net {name}")]
    Net {
        /// TAP name.
        name: String,
        /// Cause.
        #[source]
        source: Box<net_util::NetError>,
    },
    /// PCI devices could not be set up.
    #[error("PCI devices")]
    Pci(#[from] PciError),
    /// A vCPU or device failed while the guest ran.
    #[error("the VM failed: {0}")]
    Failed(String),
}

fn hv_err(what: impl Into<String>) -> impl FnOnce(hypervisor::HypervisorError) -> VmError {
    let what = what.into();
    move |source| VmError::Hypervisor { what, source }
}

/// An edge-triggered interrupt line backed by an irqfd.
#[derive(Debug)]
struct IrqfdInterrupt {
    fd: EventFd,
}

impl IrqfdInterrupt {
    fn new(vm: &dyn hypervisor::Vm, gsi: u32) -> Result<Self, VmError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Os {
            what: "eventfd",
            source,
        })?;
        vm.register_irqfd(&fd, gsi)
            .map_err(hv_err(format!("registering an irqfd for GSI {gsi}")))?;
        Ok(Self { fd })
    }
}

impl devices::Interrupt for IrqfdInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.fd.write(1)
    }
}

/// Where a serial port's or console's output goes, opened once per VMM process so reboots keep
/// appending.
#[derive(Debug)]
pub enum OutputSink {
    /// No device at all.
    Off,
    /// Device present, output dropped.
    Null,
    /// The VMM's standard output.
    Stdout,
    /// A file.
    File(File),
}

impl OutputSink {
    /// Opens the sink for a serial port or console (`what` names it in errors).
    pub fn open(cons: &ConsoleConfig, what: &'static str) -> Result<Self, VmError> {
        Ok(match cons.mode {
            ConsoleOutputMode::Off => Self::Off,
            ConsoleOutputMode::Null => Self::Null,
            ConsoleOutputMode::Tty => Self::Stdout,
            ConsoleOutputMode::File => {
                let path = cons.file.as_deref().unwrap_or(Path::new(""));
                let file = File::create(path).map_err(|source| VmError::Open {
                    what,
                    path: path.display().to_string(),
                    source,
                })?;
                Self::File(file)
            }
            // Rejected by validation.
            ConsoleOutputMode::Pty | ConsoleOutputMode::Socket => Self::Null,
        })
    }

    fn writer(&self) -> Result<Option<Box<dyn Write + Send>>, VmError> {
        Ok(match self {
            Self::Off => None,
            Self::Null => Some(Box::new(std::io::sink())),
            Self::Stdout => Some(Box::new(std::io::stdout())),
            Self::File(f) => Some(Box::new(f.try_clone().map_err(|source| VmError::Os {
                what: "output file handle",
                source,
            })?)),
        })
    }
}

/// What outlives a guest reset: the serial sink (a file keeps growing across reboots) and the
/// battery-backed CMOS (clock offset and NVRAM), as on a physical machine.
#[derive(Debug)]
pub struct Board {
    serial: OutputSink,
    console: OutputSink,
    /// Where standard input goes: the virtio console when it is `tty`, else the serial port.
    input: InputTarget,
    cmos: Arc<Mutex<devices::rtc::Rtc>>,
    /// Disk images, opened (and locked) once for the VMM's lifetime.
    disks: Vec<OpenDisk>,
    /// TAP queues, opened once (passed fds cannot be reopened).
    nets: Vec<OpenNet>,
    /// virtio-fs backend connections.
    fs: Vec<virtio_devices::vhost_user::VhostUserDevice>,
    start: Instant,
}

/// A disk and how the guest sees it.
#[derive(Debug)]
enum OpenDisk {
    /// An image served by Nimbus itself.
    Image {
        image: Arc<dyn block::DiskBackend>,
        num_queues: u16,
        queue_size: u16,
        serial: String,
        poll: std::time::Duration,
    },
    /// A connection to a vhost-user-blk backend.
    VhostUser(virtio_devices::vhost_user::VhostUserDevice),
}

/// A network interface: TAP queues served by Nimbus, or a vhost-user backend.
#[derive(Debug)]
enum OpenNet {
    /// TAP queues and the guest's view of them.
    Tap {
        taps: Vec<net_util::Tap>,
        mac: net_util::MacAddr,
        queue_size: u16,
        mtu: Option<u16>,
        offloads: net_util::Offloads,
    },
    /// A connection to a vhost-user-net backend.
    VhostUser(virtio_devices::vhost_user::VhostUserDevice),
}

fn open_nets(config: &VmConfig) -> Result<Vec<OpenNet>, VmError> {
    let mut nets = Vec::new();
    for (i, n) in config.net.iter().flatten().enumerate() {
        if n.vhost_user {
            let socket = n.vhost_socket.clone().unwrap_or_default();
            let err = |source| VmError::VhostUser {
                socket: socket.clone(),
                source,
            };
            let endpoint = match n.vhost_mode {
                VhostMode::Client => Endpoint::Connect(socket.clone().into()),
                VhostMode::Server => Endpoint::listen(socket.as_ref()).map_err(err)?,
            };
            let dev = virtio_devices::vhost_user::net::connect(
                endpoint,
                (n.num_queues / 2) as u16,
                n.queue_size,
                format!("_net{i}"),
            )
            .map_err(err)?;
            nets.push(OpenNet::VhostUser(dev));
            continue;
        }
        let name = n.tap.clone().unwrap_or_default();
        let err = |source: net_util::NetError| VmError::Net {
            name: name.clone(),
            source: Box::new(source),
        };
        let pairs = n.num_queues / 2;
        let taps = match &n.fds {
            Some(fds) => fds
                .iter()
                .map(|&fd| {
                    // SAFETY: the fds were handed to this process (CLI or SCM_RIGHTS) to own; each
                    // is claimed once, here.
                    unsafe { net_util::Tap::from_raw_fd(fd) }
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?,
            None => {
                let taps = net_util::Tap::open_named(&name, pairs).map_err(err)?;
                if let Some(first) = taps.first() {
                    first.set_ip_addr(n.ip, n.mask).map_err(err)?;
                    if let Some(host_mac) = &n.host_mac {
                        let mac = host_mac.parse().map_err(|e| {
                            VmError::Config(ConfigError::Device(format!("net {name}: {e}")))
                        })?;
                        first.set_mac(mac).map_err(err)?;
                    }
                    if let Some(mtu) = n.mtu {
                        first.set_mtu(mtu).map_err(err)?;
                    }
                    first.set_up().map_err(err)?;
                }
                taps
            }
        };
        // A random MAC is chosen once, so it stays the same across guest reboots.
        let mac = match &n.mac {
            Some(m) => m
                .parse()
                .map_err(|e| VmError::Config(ConfigError::Device(format!("net {name}: {e}"))))?,
            None => net_util::MacAddr::random_local(),
        };
        let offloads = net_util::Offloads {
            csum: n.offload_csum,
            tso: n.offload_tso,
            ufo: n.offload_ufo,
        };
        nets.push(OpenNet::Tap {
            taps,
            mac,
            queue_size: n.queue_size,
            mtu: n.mtu,
            offloads,
        });
    }
    Ok(nets)
}

fn open_fs(config: &VmConfig) -> Result<Vec<virtio_devices::vhost_user::VhostUserDevice>, VmError> {
    let mut shares = Vec::new();
    for (i, f) in config.fs.iter().flatten().enumerate() {
        let socket = f.socket.display().to_string();
        let dev = virtio_devices::vhost_user::fs::connect(
            Endpoint::Connect(f.socket.clone()),
            &f.tag,
            f.num_queues as u16,
            f.queue_size,
            format!("_fs{i}"),
        )
        .map_err(|source| VmError::VhostUser { socket, source })?;
        shares.push(dev);
    }
    Ok(shares)
}

fn open_disks(config: &VmConfig) -> Result<Vec<OpenDisk>, VmError> {
    let mut disks = Vec::new();
    for (i, d) in config.disks.iter().flatten().enumerate() {
        if d.vhost_user {
            let socket = d.vhost_socket.clone().unwrap_or_default();
            let dev = virtio_devices::vhost_user::blk::connect(
                Endpoint::Connect(socket.clone().into()),
                d.num_queues as u16,
                d.queue_size,
                format!("_disk{i}"),
            )
            .map_err(|source| VmError::VhostUser { socket, source })?;
            disks.push(OpenDisk::VhostUser(dev));
            continue;
        }
        let path = d.path.clone().unwrap_or_default();
        let image =
            block::RawFile::open(&path, d.readonly, d.direct).map_err(|source| VmError::Disk {
                path: path.display().to_string(),
                source,
            })?;
        // GET_ID answers the configured serial, else the device id (`_disk<N>` by default).
        let serial = d
            .serial
            .clone()
            .or_else(|| d.id.clone())
            .unwrap_or_else(|| format!("_disk{i}"));
        disks.push(OpenDisk::Image {
            image: Arc::new(image),
            num_queues: d.num_queues as u16,
            queue_size: d.queue_size,
            serial,
            poll: std::time::Duration::from_micros(u64::from(d.poll_us)),
        });
    }
    Ok(disks)
}

impl Board {
    /// The board for `config`; `start` is the VMM's process start (for boot-progress timing).
    pub fn new(config: &VmConfig, start: Instant) -> Result<Self, VmError> {
        let serial = OutputSink::open(&config.serial, "serial file")?;
        let console = OutputSink::open(&config.console, "console file")?;
        let input = InputTarget::default();
        if matches!(serial, OutputSink::Stdout) || matches!(console, OutputSink::Stdout) {
            spawn_forwarder(std::io::stdin(), input.clone()).map_err(|source| VmError::Os {
                what: "serial input thread",
                source,
            })?;
        }
        Ok(Self {
            serial,
            console,
            input,
            cmos: Arc::new(Mutex::new(devices::rtc::Rtc::default())),
            disks: open_disks(config)?,
            nets: open_nets(config)?,
            fs: open_fs(config)?,
            start,
        })
    }
}

/// A built VM, ready to boot.
pub struct Vm {
    // Field order matters for drop: vCPUs, then the hypervisor VM, then the RAM it maps.
    vcpus: Vec<(u32, Box<dyn Vcpu>)>,
    hv_vm: Arc<dyn hypervisor::Vm>,
    memory: GuestMemoryMmap,
    ctx: VcpuContext,
    _interrupts: Vec<Arc<IrqfdInterrupt>>,
    _pci: PciDevices,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

fn open(what: &'static str, path: &Path) -> Result<File, VmError> {
    File::open(path).map_err(|source| VmError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl Vm {
    /// Builds the machine described by `config` (already validated) on `hv`.
    pub fn new(hv: &dyn Hypervisor, config: &VmConfig, board: &Board) -> Result<Self, VmError> {
        let payload = config.payload.clone().unwrap_or_default();
        let kernel_path = payload.kernel.clone().unwrap_or_default();
        let mut kernel = open("kernel", &kernel_path)?;
        let mut initramfs = payload
            .initramfs
            .as_deref()
            .map(|p| open("initramfs", p))
            .transpose()?;

        let hv_vm = hv.create_vm().map_err(hv_err("creating the VM"))?;
        let memory = memory::create_guest_memory(&config.memory)?;
        memory::register_guest_memory(hv_vm.as_ref(), &memory)?;
        // After the memory slots: creating the irqchip first makes each slot registration slow.
        hv_vm
            .create_irqchip()
            .map_err(hv_err("creating the interrupt controller"))?;

        let boot_cpus = config.cpus.boot_vcpus;
        let max_cpus = config.cpus.max_vcpus;
        let mmio64 = layout::pci_mmio64_start(config.memory.size);
        let rsdp = acpi::create_acpi_tables(
            &memory,
            &acpi::AcpiConfig {
                boot_cpus,
                max_cpus,
                pci_mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
                pci_mmio64: (mmio64, layout::PCI_MMIO64_SIZE),
            },
        )
        .map_err(VmError::Acpi)?;
        let entry = boot::load_kernel(
            &memory,
            boot::BootSpec {
                kernel: &mut kernel,
                initramfs: initramfs.as_mut(),
                cmdline: payload.cmdline.as_deref().unwrap_or(""),
                ram_size: config.memory.size,
                rsdp: rsdp.0,
            },
        )
        .map_err(|source| VmError::Boot {
            path: kernel_path.display().to_string(),
            source,
        })?;
        cpu::write_boot_gdt(&memory).map_err(VmError::Cpu)?;

        let control = Arc::new(VmControl::default());
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let mut interrupts = Vec::new();
        add_platform_devices(hv_vm.as_ref(), &io_bus, &control, board, &mut interrupts)?;

        // The reset register (0xcf9) shares the PCI configuration port dword (0xcf8).
        let reset_register = Arc::new(Mutex::new(devices::acpi::ResetRegister::new(
            control.clone(),
        )));
        let guest_mem = virtio_devices::GuestMemoryAtomic::new(memory.clone());
        let mut pci = PciDevices::new(
            hv_vm.clone(),
            &io_bus,
            &mmio_bus,
            guest_mem,
            config.memory.size,
            reset_register,
        )?;
        let rng_source = open("rng source", &config.rng.src)?;
        for (i, d) in board.disks.iter().enumerate() {
            let dev: Box<dyn virtio_devices::VirtioDevice> = match d {
                OpenDisk::Image {
                    image,
                    num_queues,
                    queue_size,
                    serial,
                    poll,
                } => Box::new(
                    virtio_devices::block::Block::new(
                        image.clone(),
                        *num_queues,
                        *queue_size,
                        serial,
                        format!("_disk{i}"),
                    )
                    .with_poll(*poll),
                ),
                OpenDisk::VhostUser(dev) => Box::new(dev.fresh()),
            };
            pci.add_virtio(dev)?;
        }
        for (i, n) in board.nets.iter().enumerate() {
            let dev: Box<dyn virtio_devices::VirtioDevice> = match n {
                OpenNet::Tap {
                    taps,
                    mac,
                    queue_size,
                    mtu,
                    offloads,
                } => {
                    let taps = taps
                        .iter()
                        .map(net_util::Tap::try_clone)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|source| VmError::Net {
                            name: format!("_net{i}"),
                            source: Box::new(source),
                        })?;
                    Box::new(
                        virtio_devices::net::Net::new(
                            taps,
                            *mac,
                            *queue_size,
                            *mtu,
                            format!("_net{i}"),
                        )
                        .map_err(|e| VmError::Failed(format!("net {i}: {e}")))?
                        .with_offloads(*offloads),
                    )
                }
                OpenNet::VhostUser(dev) => Box::new(dev.fresh()),
            };
            pci.add_virtio(dev)?;
        }
        for share in &board.fs {
            pci.add_virtio(Box::new(share.fresh()))?;
        }
        if let Some(out) = board.console.writer()? {
            // A `tty` console takes standard input (the serial port then gets none).
            let input = match board.console {
                OutputSink::Stdout => {
                    let input = virtio_devices::console::ConsoleInput::new().map_err(|source| {
                        VmError::Os {
                            what: "console input",
                            source,
                        }
                    })?;
                    let sink: Arc<dyn InputSink> = input.clone();
                    *board.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
                    Some(input)
                }
                _ => None,
            };
            let console = virtio_devices::console::Console::new(out, input, "_console".into());
            pci.add_virtio(Box::new(console))?;
        }
        pci.add_virtio(Box::new(virtio_devices::rng::Rng::new(
            rng_source,
            "_rng0".into(),
        )))?;

        let mut supported = hv
            .supported_cpuid()
            .map_err(hv_err("reading the supported CPUID"))?;
        cpuid::fill_brand_string(&mut supported, &cpuid::host_brand_leaves());
        let hwcr = cpuid::amd_hwcr(&supported);
        let mut vcpus = Vec::with_capacity(usize::from(boot_cpus));
        for id in 0..u32::from(boot_cpus) {
            let vcpu = hv_vm
                .create_vcpu(id)
                .map_err(hv_err(format!("creating vcpu{id}")))?;
            let err = |what: &str| hv_err(format!("setting up vcpu{id}: {what}"));
            vcpu.set_cpuid(&cpuid::vcpu_cpuid(&supported, id as u8, max_cpus))
                .map_err(err("CPUID"))?;
            vcpu.set_msrs(&cpu::boot_msrs()).map_err(err("MSRs"))?;
            if let Some(msr) = hwcr {
                // Best effort: older KVM refuses writes to HWCR; the guest then only logs a warning.
                if let Err(e) = vcpu.set_msrs(&[msr]) {
                    log::debug!("vcpu{id}: HWCR.TscFreqSel not settable: {e}");
                }
            }
            vcpu.set_fpu(&cpu::boot_fpu()).map_err(err("FPU"))?;
            let mut lapic = vcpu.lapic().map_err(err("LAPIC"))?;
            cpu::set_lint_pins(&mut lapic);
            vcpu.set_lapic(&lapic).map_err(err("LAPIC"))?;
            if id == 0 {
                set_boot_registers(vcpu.as_ref(), entry).map_err(err("boot registers"))?;
            }
            vcpus.push((id, vcpu));
        }
        Ok(Self {
            vcpus,
            hv_vm,
            memory,
            ctx: VcpuContext {
                io_bus,
                mmio_bus,
                control,
            },
            _interrupts: interrupts,
            _pci: pci,
        })
    }

    /// Starts every vCPU and blocks until the VM powers off, resets or fails.
    pub fn run(mut self) -> Result<VmEvent, VmError> {
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for (id, vcpu) in self.vcpus.drain(..) {
            match VcpuThread::spawn(id, vcpu, self.ctx.clone()) {
                Ok(t) => threads.push(t),
                Err(source) => {
                    spawn_error = Some(VmError::Os {
                        what: "spawning a vCPU thread",
                        source,
                    });
                    self.ctx
                        .control
                        .post(VmEvent::Failed("vCPU thread spawn failed".into()));
                    break;
                }
            }
        }
        let event = self.ctx.control.wait();
        for t in threads {
            t.stop();
        }
        drop(self.hv_vm);
        match spawn_error {
            Some(e) => Err(e),
            None => Ok(event),
        }
    }
}

fn set_boot_registers(vcpu: &dyn Vcpu, entry: boot::BootEntry) -> hypervisor::Result<()> {
    let current = vcpu.sregs()?;
    match entry {
        boot::BootEntry::Pvh { entry } => {
            vcpu.set_sregs(&cpu::pvh_boot_sregs(&current))?;
            vcpu.set_regs(&cpu::pvh_boot_regs(entry))
        }
        boot::BootEntry::Linux64 {
            entry,
            zero_page,
            pml4,
            stack,
        } => {
            vcpu.set_sregs(&cpu::long_mode_sregs(&current, pml4))?;
            vcpu.set_regs(&hypervisor::StandardRegisters {
                rip: entry,
                rsi: zero_page,
                rsp: stack,
                rbp: stack,
                rflags: 0x2,
                ..Default::default()
            })
        }
    }
}

fn add_platform_devices(
    vm: &dyn hypervisor::Vm,
    io_bus: &Bus,
    control: &Arc<VmControl>,
    board: &Board,
    interrupts: &mut Vec<Arc<IrqfdInterrupt>>,
) -> Result<(), VmError> {
    let place = |what, dev: Arc<Mutex<dyn devices::BusDevice>>, base: u16, len: u64| {
        io_bus
            .insert(dev, u64::from(base), len)
            .map_err(|source| VmError::Bus { what, source })
    };
    let power: Arc<dyn devices::PowerControl> = control.clone();
    if let Some(out) = board.serial.writer()? {
        let irq = Arc::new(IrqfdInterrupt::new(vm, layout::COM1_GSI)?);
        interrupts.push(irq.clone());
        let uart = Arc::new(Mutex::new(devices::serial::Serial::new(irq, out)));
        place("COM1", uart.clone(), layout::COM1_PORT, 8)?;
        if !matches!(board.console, OutputSink::Stdout) {
            let sink: Arc<dyn InputSink> = Arc::new(SerialInput(uart));
            *board.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
        }
    }
    place("CMOS RTC", board.cmos.clone(), layout::CMOS_PORT, 2)?;
    place(
        "i8042",
        Arc::new(Mutex::new(devices::i8042::I8042::new(power.clone()))),
        0x60,
        5,
    )?;
    place(
        "debug port",
        Arc::new(Mutex::new(devices::debug_port::DebugPort::new(board.start))),
        layout::DEBUG_PORT,
        1,
    )?;
    place(
        "ACPI sleep registers",
        Arc::new(Mutex::new(devices::acpi::SleepRegisters::new(
            power.clone(),
            layout::ACPI_S5_SLP_TYP,
        ))),
        layout::ACPI_SLEEP_CONTROL_PORT,
        2,
    )?;
    let ged_irq = Arc::new(IrqfdInterrupt::new(vm, layout::ACPI_GED_GSI)?);
    interrupts.push(ged_irq.clone());
    place(
        "ACPI GED",
        Arc::new(Mutex::new(devices::acpi::Ged::new(ged_irq))),
        layout::ACPI_GED_PORT,
        4,
    )?;
    Ok(())
}

/// Runs the VM described by `config` until it powers off (Ok) or fails (Err), rebuilding it in
/// place on every guest reset.
pub fn run(hv: &dyn Hypervisor, config: &VmConfig, start: Instant) -> Result<(), VmError> {
    config.validate()?;
    let board = Board::new(config, start)?;
    let mut boots = 0u64;
    loop {
        let vm = Vm::new(hv, config, &board)?;
        log::info!(
            "VM built ({} vCPUs, {} MiB); booting",
            config.cpus.boot_vcpus,
            config.memory.size >> 20
        );
        boots += 1;
        let event = vm.run();
        // Input typed while no VM runs waits for the next boot's UART.
        *board.input.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match event? {
            VmEvent::PowerOff => {
                log::info!("guest powered off after {boots} boot(s)");
                return Ok(());
            }
            VmEvent::Reset => log::info!("guest reset; rebooting"),
            VmEvent::Failed(why) => return Err(VmError::Failed(why)),
        }
    }
}
