//! One VM instance: hypervisor VM, guest RAM, platform devices, PCI devices and vCPUs, built
//! from a [`VmConfig`] on a [`Board`].
//!
//! A reset tears the instance down and the VMM builds a fresh one on the same board, so a
//! guest reboot starts from a clean machine.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arch::x86_64::{acpi, boot, cpu, layout};
use devices::Bus;
use hypervisor::{Hypervisor, Vcpu};
use vm_config::VmConfig;
use vmm_sys_util::eventfd::EventFd;

use crate::board::{Board, BoardDevice, OutputSink};
use crate::control::{EventSink, VmControl};
use crate::device_manager::{DeviceManager, DeviceRequests, PciBdf};
use crate::memory::{self, GuestMemoryMmap};
use crate::pci_devices::{PciDevices, PciError};
use crate::serial_input::SerialInput;
use crate::vcpu::VcpuContext;
use crate::vcpus::{ResizeError, VcpuSetup, Vcpus};

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
    /// A descriptor handed to the VMM cannot be used.
    #[error("handed-over descriptor")]
    Fd(#[from] crate::fds::FdError),
    /// A vCPU thread could not be pinned to its host CPUs.
    #[error("vcpu{vcpu}: cannot run on host CPUs {host_cpus:?} (cpus.affinity)")]
    Affinity {
        /// The vCPU.
        vcpu: u32,
        /// Its host CPUs.
        host_cpus: Vec<usize>,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A PTY or socket console could not be set up.
    #[error("console")]
    Console(#[from] crate::console_relay::ConsoleRelayError),
    /// A pmem file could not be opened or mapped into the guest.
    #[error("pmem device")]
    Pmem(#[from] crate::pmem::PmemAttachError),
    /// RAM could not be hot-added.
    #[error("cannot hot-add RAM")]
    MemoryHotplug(#[from] crate::memory_hotplug::MemoryHotplugError),
    /// A device thread did not pause.
    #[error("cannot pause the devices")]
    Pause(#[source] virtio_devices::pause::PauseError),
    /// A vCPU resize was refused.
    #[error("cannot resize the vCPUs")]
    Resize(#[from] ResizeError),
}

/// Maps a hypervisor error to [`VmError::Hypervisor`] saying `what` was being done.
pub(crate) fn hv_err(
    what: impl Into<String>,
) -> impl FnOnce(hypervisor::HypervisorError) -> VmError {
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

/// Where an instance sends what happens on its own: devices' activation and reset requests,
/// the guest's ejections of hot-removed devices and of vCPUs.
pub struct InstanceHandlers {
    /// Devices' activation and reset requests.
    pub requests: DeviceRequests,
    /// PCI slots the guest ejected.
    pub ejects: devices::pci_hotplug::EjectHandler,
    /// vCPUs the guest ejected.
    pub cpu_ejects: devices::cpu_hotplug::CpuEjectHandler,
}

impl std::fmt::Debug for InstanceHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceHandlers").finish_non_exhaustive()
    }
}

/// One instance of the machine: hypervisor VM, guest RAM, platform and PCI devices, vCPUs.
/// A guest reset ends the instance; the VMM builds a fresh one on the same [`Board`].
pub struct Vm {
    // Field order matters for drop: vCPU threads, devices, then the hypervisor VM, then the RAM
    // it maps.
    vcpus: Vcpus,
    devices: DeviceManager,
    ged: Arc<Mutex<devices::acpi::Ged>>,
    /// The PCI hotplug registers the DSDT's slot objects read and write.
    hotplug: Arc<Mutex<devices::pci_hotplug::PciHotplug>>,
    _interrupts: Vec<Arc<IrqfdInterrupt>>,
    hv_vm: Arc<dyn hypervisor::Vm>,
    memory: GuestMemoryMmap,
    /// The guest memory every device reads through (its contents grow with hot-added RAM).
    guest_mem: virtio_devices::GuestMemoryAtomic,
    /// ACPI memory hotplug, when the VM has it.
    memory_hotplug: Option<crate::memory_hotplug::MemoryHotplug>,
    /// The balloon, if any.
    balloon: Option<virtio_devices::balloon::BalloonHandle>,
    /// The pmem files' mappings (after `hv_vm`, whose slots use them, for drop order).
    pmem: Vec<crate::pmem::Attached>,
    /// kvmclock read at pause, written back at resume.
    paused_clock: Option<u64>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus)
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
    /// Builds the machine described by `config` (already validated, devices named) on `hv`
    /// with the host side of its devices from `board`; the instance's first power event or
    /// failure goes to `sink`, its devices' activation and reset requests to `requests`, the
    /// guest's ejections of hot-removed devices and vCPUs to `handlers`.
    pub fn new(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        board: &Board,
        sink: EventSink,
        handlers: InstanceHandlers,
    ) -> Result<Self, VmError> {
        let InstanceHandlers {
            requests,
            ejects,
            cpu_ejects,
        } = handlers;
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
        let topology = config.cpus.presented_topology().arch();
        // RAM added later goes between RAM and the 64-bit PCI window, which the segments share.
        let pci_segments = config.pci_segment_layouts().map_err(VmError::Config)?;
        let memory_hotplug = crate::memory_hotplug::MemoryHotplug::new(&config.memory);
        let rsdp = acpi::create_acpi_tables(
            &memory,
            &acpi::AcpiConfig {
                boot_cpus,
                max_cpus,
                topology: Some(topology),
                pci_segments: pci_segments.clone(),
                memory_hotplug_slots: if memory_hotplug.is_some() {
                    layout::MEMORY_HOTPLUG_SLOTS
                } else {
                    0
                },
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
                pci_segments: config.num_pci_segments(),
            },
        )
        .map_err(|source| VmError::Boot {
            path: kernel_path.display().to_string(),
            source,
        })?;
        cpu::write_boot_gdt(&memory).map_err(VmError::Cpu)?;

        let control = Arc::new(VmControl::new(sink));
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let mut interrupts = Vec::new();
        let ged = add_platform_devices(hv_vm.as_ref(), &io_bus, &control, board, &mut interrupts)?;

        // The reset register (0xcf9) shares the PCI configuration port dword (0xcf8).
        let reset_register = Arc::new(Mutex::new(devices::acpi::ResetRegister::new(
            control.clone(),
        )));
        let guest_mem = virtio_devices::GuestMemoryAtomic::new(memory.clone());
        let pci = PciDevices::new(
            hv_vm.clone(),
            &io_bus,
            &mmio_bus,
            guest_mem.clone(),
            &pci_segments,
            reset_register,
        )?;
        let hotplug = Arc::new(Mutex::new(devices::pci_hotplug::PciHotplug::new(
            pci_segments.len() as u16,
            ejects,
        )));
        io_bus
            .insert(
                hotplug.clone(),
                u64::from(layout::PCI_HOTPLUG_PORT),
                layout::PCI_HOTPLUG_PORT_LEN,
            )
            .map_err(|source| VmError::Bus {
                what: "PCI hotplug registers",
                source,
            })?;
        let cpu_registers = Arc::new(Mutex::new(devices::cpu_hotplug::CpuHotplug::new(
            u32::from(max_cpus),
            u32::from(boot_cpus),
            cpu_ejects,
        )));
        io_bus
            .insert(
                cpu_registers.clone(),
                u64::from(layout::CPU_HOTPLUG_PORT),
                layout::CPU_HOTPLUG_PORT_LEN,
            )
            .map_err(|source| VmError::Bus {
                what: "CPU hotplug registers",
                source,
            })?;
        if let Some(hp) = &memory_hotplug {
            io_bus
                .insert(
                    hp.registers(),
                    u64::from(layout::MEMORY_HOTPLUG_PORT),
                    layout::MEMORY_HOTPLUG_PORT_LEN,
                )
                .map_err(|source| VmError::Bus {
                    what: "memory hotplug registers",
                    source,
                })?;
        }
        let mut devices = DeviceManager::new(pci, requests);
        if !matches!(board.serial(), OutputSink::Off) {
            devices.add_platform("__serial");
        }
        // Devices asking for a slot go first, so the others cannot take it.
        let (placed, free): (Vec<_>, Vec<_>) =
            board.devices().iter().partition(|d| d.slot.is_some());
        let mut pmem = Vec::new();
        let mut balloon = None;
        for d in placed.into_iter().chain(free) {
            if let Some(b) = d.balloon_config() {
                let (dev, handle) = virtio_devices::balloon::Balloon::new(
                    b.size,
                    b.deflate_on_oom,
                    b.free_page_reporting,
                    d.id.clone(),
                )
                .map_err(|source| VmError::Os {
                    what: "balloon",
                    source,
                })?;
                balloon = Some(handle);
                devices.add_virtio(
                    &d.id,
                    d.kind,
                    (d.pci_segment, d.slot),
                    &d.backend,
                    Box::new(dev),
                )?;
                continue;
            }
            let dev = match d.pmem_file() {
                Some(file) => attach_pmem(hv_vm.as_ref(), &mut devices, &mut pmem, d, file)?,
                None => board.instance(d)?,
            };
            devices.add_virtio(&d.id, d.kind, (d.pci_segment, d.slot), &d.backend, dev)?;
        }

        let setup = VcpuSetup::new(hv, config)?;
        let mut boot_vcpus = Vec::with_capacity(usize::from(boot_cpus));
        for id in 0..u32::from(boot_cpus) {
            let vcpu = setup.create(hv_vm.as_ref(), id)?;
            if id == 0 {
                set_boot_registers(vcpu.as_ref(), entry)
                    .map_err(hv_err("setting up vcpu0: boot registers"))?;
            }
            boot_vcpus.push(vcpu);
        }
        let ctx = VcpuContext {
            io_bus,
            mmio_bus,
            control,
            gate: Arc::default(),
        };
        let vcpus = Vcpus::new(
            (setup, boot_vcpus),
            hv_vm.clone(),
            ctx,
            &config.cpus,
            cpu_registers,
        );
        Ok(Self {
            vcpus,
            devices,
            ged,
            hotplug,
            _interrupts: interrupts,
            hv_vm,
            memory,
            guest_mem,
            memory_hotplug,
            balloon,
            pmem,
            paused_clock: None,
        })
    }

    /// Starts every vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        self.vcpus.start()
    }

    /// Stops the guest at a consistent point: every vCPU between two instructions (its last
    /// I/O complete), then every device thread between two requests. The guest's clocks are
    /// held: kvmclock is read now and written back at [`Vm::resume`] (each vCPU keeps its TSC).
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.vcpus.pause();
        // Read as soon as the vCPUs stop, so the devices' pause does not count as guest time.
        self.paused_clock = match self.hv_vm.clock() {
            Ok(ns) => Some(ns),
            Err(e) => {
                log::warn!("cannot read kvmclock at pause: {e}");
                None
            }
        };
        if let Err(e) = self.devices.pause() {
            self.resume_vcpus();
            return Err(VmError::Pause(e));
        }
        Ok(())
    }

    /// Lets a paused guest go on where it stopped.
    pub fn resume(&mut self) {
        self.devices.resume();
        self.resume_vcpus();
    }

    /// Puts kvmclock back (as late as possible) and lets the vCPUs run.
    fn resume_vcpus(&mut self) {
        if let Some(ns) = self.paused_clock.take() {
            if let Err(e) = self.hv_vm.set_clock(ns) {
                log::warn!("cannot restore kvmclock at resume: {e}");
            }
        }
        self.vcpus.resume();
    }

    /// Injects an NMI into every vCPU.
    pub fn nmi(&self) {
        self.vcpus.nmi();
    }

    /// Presses the ACPI power button (a GED event).
    pub fn power_button(&self) -> Result<(), VmError> {
        self.notify(devices::acpi::GedEvent::PowerButton)
    }

    fn notify(&self, event: devices::acpi::GedEvent) -> Result<(), VmError> {
        notify(&self.ged, event)
    }

    fn hotplug(&self) -> std::sync::MutexGuard<'_, devices::pci_hotplug::PciHotplug> {
        self.hotplug.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `device` (just opened on `board`) on its PCI segment's bus while the guest runs and
    /// tells the guest (a GED event; its ACPI PCI hotplug driver scans the slot). Returns the
    /// device's address.
    pub fn hot_add(&mut self, board: &Board, device: &BoardDevice) -> Result<PciBdf, VmError> {
        if device.balloon_config().is_some() {
            return Err(VmError::Failed(format!(
                "{}: a balloon cannot be added to a running VM",
                device.id
            )));
        }
        let dev = match device.pmem_file() {
            Some(file) => attach_pmem(
                self.hv_vm.as_ref(),
                &mut self.devices,
                &mut self.pmem,
                device,
                file,
            )?,
            None => board.instance(device)?,
        };
        let added = self.devices.add_virtio(
            &device.id,
            device.kind,
            (device.pci_segment, device.slot),
            &device.backend,
            dev,
        );
        let bdf = match added {
            Ok(bdf) => bdf,
            Err(e) => {
                self.detach_pmem(&device.id);
                return Err(e.into());
            }
        };
        self.hotplug().slot_added(bdf.segment, bdf.device);
        self.notify(devices::acpi::GedEvent::PciHotplug)?;
        Ok(bdf)
    }

    /// Asks the guest to eject device `id` (a GED event); it goes at the guest's ejection
    /// ([`Vm::eject`]).
    pub fn request_removal(&mut self, id: &str) -> Result<(), VmError> {
        let bdf = self
            .devices
            .bdf(id)
            .ok_or_else(|| VmError::Failed(format!("no device with id {id} on the PCI bus")))?;
        self.hotplug().slot_removing(bdf.segment, bdf.device);
        self.notify(devices::acpi::GedEvent::PciHotplug)
    }

    /// The guest ejected the device in `slot` of PCI segment `segment`: takes it off the bus
    /// and releases it. Returns its id (`None`: no device there).
    pub fn eject(&mut self, segment: u16, slot: u8) -> Option<String> {
        let id = self.devices.remove_at(segment, slot)?;
        // A pmem device's region goes after the device (its threads are joined).
        self.detach_pmem(&id);
        Some(id)
    }

    /// Deletes pmem device `id`'s memory slot, unmaps its file and gives its range back.
    fn detach_pmem(&mut self, id: &str) {
        let Some(i) = self.pmem.iter().position(|p| p.id == id) else {
            return;
        };
        let p = self.pmem.remove(i);
        match self.hv_vm.unmap_memory(p.slot) {
            Ok(()) => self.devices.free_device_area(p.segment, p.addr),
            Err(e) => {
                // The slot stays: so must its mapping.
                log::error!("{id}: cannot delete memory slot {}: {e}", p.slot);
                self.pmem.push(p);
            }
        }
    }

    /// Grows RAM to `desired` bytes (ACPI memory hotplug, see [`crate::memory_hotplug`]): the
    /// new RAM is mapped, given to the hypervisor and to every device (vhost-user backends get
    /// a new memory table), then the guest is told (a GED event). `desired` equal to the
    /// current size changes nothing.
    pub fn resize_memory(&mut self, desired: u64) -> Result<(), VmError> {
        let hp = self
            .memory_hotplug
            .as_mut()
            .ok_or(crate::memory_hotplug::MemoryHotplugError::Disabled)?;
        let grown = hp.grow(self.hv_vm.as_ref(), &self.memory, desired)?;
        if grown.ranges.is_empty() {
            return Ok(());
        }
        self.memory = grown.memory.clone();
        self.guest_mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(grown.memory);
        self.devices.memory_changed();
        hp.announce(&grown.ranges)?;
        self.notify(devices::acpi::GedEvent::MemoryHotplug)
    }

    /// The registry of this instance's devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Asks the guest's balloon driver for `bytes` (a configuration change interrupt).
    pub fn resize_balloon(&self, bytes: u64) -> Result<(), VmError> {
        let Some(b) = &self.balloon else {
            return Err(VmError::Failed("the VM has no balloon".into()));
        };
        b.set_target(bytes)
            .map_err(|e| VmError::Failed(format!("balloon: {e}")))
    }

    /// The bytes the balloon holds (what the guest driver says it gave back).
    pub fn balloon_bytes(&self) -> u64 {
        self.balloon.as_ref().map_or(0, |b| b.actual_bytes())
    }

    /// Grows or shrinks the running vCPUs to `desired` (see [`Vcpus::resize`]) and tells the
    /// guest (a GED event) when something changed.
    pub fn resize_vcpus(&mut self, desired: u32) -> Result<(), VmError> {
        let ged = &self.ged;
        self.vcpus
            .resize(desired, || notify(ged, devices::acpi::GedEvent::CpuHotplug))
    }

    /// The guest ejected vCPU `id`: its thread stops (see [`Vcpus::ejected`]).
    pub fn eject_vcpu(&mut self, id: u32) -> bool {
        self.vcpus.ejected(id)
    }

    /// Runs the activation or reset device `id` asked for.
    pub fn run_device_request(&mut self, id: &str) {
        self.devices.run_pending(id);
    }
}

/// Maps pmem device `d`'s file into the VM (a memory slot in its segment's 64-bit window,
/// recorded in `pmem`) and builds its guest-facing device.
fn attach_pmem(
    hv_vm: &dyn hypervisor::Vm,
    devices: &mut DeviceManager,
    pmem: &mut Vec<crate::pmem::Attached>,
    d: &BoardDevice,
    file: &crate::pmem::PmemFile,
) -> Result<Box<dyn virtio_devices::VirtioDevice>, VmError> {
    let slot = crate::pmem::free_slot(pmem);
    let (region, addr) = crate::pmem::attach(file, hv_vm, slot, |size, align| {
        devices.allocate_device_area(d.pci_segment, size, align)
    })?;
    pmem.push(crate::pmem::Attached {
        id: d.id.clone(),
        slot,
        segment: d.pci_segment,
        addr,
        region,
    });
    log::info!("{}: {} bytes at {addr:#x}", d.id, file.size);
    Ok(Box::new(virtio_devices::pmem::Pmem::new(
        file.backend(),
        addr,
        file.size,
        d.id.clone(),
    )))
}

/// Posts `event` on the GED and interrupts the guest.
fn notify(ged: &Mutex<devices::acpi::Ged>, event: devices::acpi::GedEvent) -> Result<(), VmError> {
    ged.lock()
        .unwrap_or_else(|p| p.into_inner())
        .notify(event)
        .map_err(|source| VmError::Os {
            what: "raising the GED interrupt",
            source,
        })
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
) -> Result<Arc<Mutex<devices::acpi::Ged>>, VmError> {
    let place = |what, dev: Arc<Mutex<dyn devices::BusDevice>>, base: u16, len: u64| {
        io_bus
            .insert(dev, u64::from(base), len)
            .map_err(|source| VmError::Bus { what, source })
    };
    let power: Arc<dyn devices::PowerControl> = control.clone();
    if let Some(out) = board.serial().writer()? {
        let irq = Arc::new(IrqfdInterrupt::new(vm, layout::COM1_GSI)?);
        interrupts.push(irq.clone());
        let uart = Arc::new(Mutex::new(devices::serial::Serial::new(irq, out)));
        place("COM1", uart.clone(), layout::COM1_PORT, 8)?;
        if let Some(target) = board.serial_input() {
            *target.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(SerialInput(uart)));
        }
    }
    let (debug_sink, debug_port) = board.debug_console();
    if let Some(out) = debug_sink.writer()? {
        place(
            "debug console",
            Arc::new(Mutex::new(devices::debug_port::DebugConsole::new(out))),
            debug_port,
            1,
        )?;
    }
    place("CMOS RTC", board.cmos().clone(), layout::CMOS_PORT, 2)?;
    place(
        "i8042",
        Arc::new(Mutex::new(devices::i8042::I8042::new(power.clone()))),
        0x60,
        5,
    )?;
    place(
        "debug port",
        Arc::new(Mutex::new(devices::debug_port::DebugPort::new(
            board.start(),
        ))),
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
    let ged = Arc::new(Mutex::new(devices::acpi::Ged::new(ged_irq)));
    place("ACPI GED", ged.clone(), layout::ACPI_GED_PORT, 4)?;
    Ok(ged)
}
