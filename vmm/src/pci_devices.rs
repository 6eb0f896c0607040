//! The PCI side of the machine: bus 0 behind ECAM and the 0xcf8 ports, BAR address allocation
//! from the 32-bit and 64-bit windows, BAR ranges on the MMIO bus (`pci::MmioBarMapper`), and
//! virtio devices on it.

use std::sync::{Arc, Mutex};

use arch::x86_64::layout;
use devices::{Bus, BusDevice};
use hypervisor::{IoEventAddress, Vm};
use pci::{AddressAllocator, MmioBarMapper, PciBus, PciConfigIo, PciEcam, SharedPciDevice};
use virtio_devices::transport::{DeviceControl, IoEventRegistrar, VirtioPciDevice, BAR0_SIZE};
use virtio_devices::{GuestMemoryAtomic, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::InterruptManager;

/// Errors adding PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No address space left in the BAR window.
    #[error("no room for a {size:#x}-byte BAR in the PCI window")]
    NoBarSpace {
        /// BAR size.
        size: u64,
    },
    /// The bus refused the device.
    #[error("PCI bus")]
    Bus(#[from] pci::PciBusError),
    /// The virtio transport could not be built.
    #[error("virtio-pci transport")]
    Transport(#[from] virtio_devices::transport::TransportError),
    /// Interrupt vectors could not be set up.
    #[error("MSI-X vectors")]
    Interrupts(#[source] std::io::Error),
    /// A platform range could not be placed.
    #[error("cannot place {what}")]
    Place {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: devices::BusError,
    },
}

#[derive(Debug)]
struct VmIoEvents(Arc<dyn Vm>);

impl IoEventRegistrar for VmIoEvents {
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .register_ioevent(fd, IoEventAddress::Mmio(addr), None)
            .map_err(std::io::Error::other)
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(fd, IoEventAddress::Mmio(addr), None)
            .map_err(std::io::Error::other)
    }
}

/// A device put on the bus.
#[derive(Debug)]
pub struct AddedDevice {
    /// Its slot on bus 0.
    pub slot: u8,
    /// The device.
    pub device: Arc<Mutex<VirtioPciDevice>>,
    /// The GSIs of its MSI-X vectors: the first and how many.
    pub msi_gsis: (u32, u32),
}

/// Bus 0 and what hangs off it.
pub struct PciDevices {
    bus: Arc<Mutex<PciBus>>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    interrupts: Arc<InterruptManager>,
    ioevents: Arc<dyn IoEventRegistrar>,
    mem: GuestMemoryAtomic,
}

impl std::fmt::Debug for PciDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciDevices")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl PciDevices {
    /// Puts bus 0 behind ECAM (MMIO) and 0xcf8 (ports, with `reset_register` at 0xcf9).
    pub fn new(
        vm: Arc<dyn Vm>,
        io_bus: &Bus,
        mmio_bus: &Arc<Bus>,
        mem: GuestMemoryAtomic,
        ram_size: u64,
        reset_register: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<Self, PciError> {
        let mapper = Arc::new(MmioBarMapper::new(mmio_bus));
        let bus = Arc::new(Mutex::new(PciBus::new(mapper)));
        mmio_bus
            .insert(
                Arc::new(Mutex::new(PciEcam::new(bus.clone()))),
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
            )
            .map_err(|source| PciError::Place {
                what: "ECAM",
                source,
            })?;
        let cf8 = PciConfigIo::new(bus.clone()).with_reset_register(reset_register);
        io_bus
            .insert(Arc::new(Mutex::new(cf8)), 0xcf8, 8)
            .map_err(|source| PciError::Place {
                what: "PCI config ports",
                source,
            })?;
        Ok(Self {
            bus,
            mmio32: AddressAllocator::new(layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            mmio64: AddressAllocator::new(
                layout::pci_mmio64_start(ram_size),
                layout::PCI_MMIO64_SIZE,
            ),
            interrupts: Arc::new(InterruptManager::new(vm.clone())),
            ioevents: Arc::new(VmIoEvents(vm)),
            mem,
        })
    }

    /// Takes `size` bytes aligned to `align` from the 64-bit window for a region that is not
    /// a BAR (a pmem device's memory).
    pub fn allocate_mmio64(&mut self, size: u64, align: u64) -> Option<u64> {
        self.mmio64.allocate_aligned(size, align)
    }

    /// Adds a virtio device in `slot` (or the first free one); its BAR 0 comes from the 64-bit
    /// window (the 32-bit one when that is full).
    pub fn add_virtio(
        &mut self,
        id: &str,
        device: Box<dyn VirtioDevice>,
        slot: Option<u8>,
        control: Arc<dyn DeviceControl>,
    ) -> Result<AddedDevice, PciError> {
        let vectors = self
            .interrupts
            .msi_vectors(device.queue_max_sizes().len() as u16 + 1)
            .map_err(PciError::Interrupts)?;
        let msi_gsis = vectors.gsis();
        let bar0 = self
            .mmio64
            .allocate(BAR0_SIZE)
            .or_else(|| self.mmio32.allocate(BAR0_SIZE))
            .ok_or(PciError::NoBarSpace { size: BAR0_SIZE })?;
        let dev = VirtioPciDevice::new(
            device,
            bar0,
            vectors,
            self.ioevents.clone(),
            self.mem.clone(),
        )?
        .with_control(control)
        .named(id);
        let dev = Arc::new(Mutex::new(dev));
        let shared: SharedPciDevice = dev.clone();
        let slot = self
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_device(shared, slot)?;
        Ok(AddedDevice {
            slot,
            device: dev,
            msi_gsis,
        })
    }
}
