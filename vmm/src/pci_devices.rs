//! The PCI side of the machine: one bus per PCI segment, each behind its own ECAM area (segment
//! 0 also behind the 0xcf8 ports), BAR address allocation from each segment's share of the
//! 32-bit and 64-bit windows, BAR ranges on the MMIO bus (`pci::MmioBarMapper`), and virtio
//! devices on them.

use std::sync::{Arc, Mutex};

use arch::x86_64::layout::PciSegmentLayout;
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
    /// No address space left in the segment's BAR windows.
    #[error("no room for a {size:#x}-byte BAR in PCI segment {segment}'s windows")]
    NoBarSpace {
        /// The segment.
        segment: u16,
        /// BAR size.
        size: u64,
    },
    /// The device names a segment the machine does not have.
    #[error("PCI segment {segment} does not exist ({count} segments)")]
    NoSegment {
        /// The segment asked for.
        segment: u16,
        /// How many there are.
        count: usize,
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

/// A device put on a bus.
#[derive(Debug)]
pub struct AddedDevice {
    /// Its slot on its segment's bus 0.
    pub slot: u8,
    /// The device.
    pub device: Arc<Mutex<VirtioPciDevice>>,
    /// The GSIs of its MSI-X vectors: the first and how many.
    pub msi_gsis: (u32, u32),
}

/// One PCI segment: its bus 0, what is left of its windows, and the BAR 0 address each
/// slot's device took from them.
#[derive(Debug)]
struct Segment {
    bus: Arc<Mutex<PciBus>>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    bars: std::collections::BTreeMap<u8, u64>,
}

/// The segments' buses and what hangs off them.
pub struct PciDevices {
    segments: Vec<Segment>,
    interrupts: Arc<InterruptManager>,
    ioevents: Arc<dyn IoEventRegistrar>,
    mem: GuestMemoryAtomic,
}

impl std::fmt::Debug for PciDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciDevices")
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

impl PciDevices {
    /// Puts one bus per segment of `layouts` (segment `i` at index `i`, at least one) behind its
    /// ECAM area (MMIO), and segment 0's also behind 0xcf8 (ports, with `reset_register` at
    /// 0xcf9).
    pub fn new(
        vm: Arc<dyn Vm>,
        io_bus: &Bus,
        mmio_bus: &Arc<Bus>,
        mem: GuestMemoryAtomic,
        layouts: &[PciSegmentLayout],
        reset_register: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<Self, PciError> {
        let mapper: Arc<MmioBarMapper> = Arc::new(MmioBarMapper::new(mmio_bus));
        let mut segments = Vec::with_capacity(layouts.len());
        let buses: Vec<Arc<Mutex<PciBus>>> = layouts
            .iter()
            .map(|_| Arc::new(Mutex::new(PciBus::new(mapper.clone()))))
            .collect();
        // The buses share the MMIO space: a range one frees may be where another's BAR waits.
        let peers_of = |i: usize| -> Vec<Arc<Mutex<PciBus>>> {
            let others = buses.iter().enumerate().filter(|&(j, _)| j != i);
            others.map(|(_, b)| b.clone()).collect()
        };
        for (i, l) in layouts.iter().enumerate() {
            let bus = buses[i].clone();
            mmio_bus
                .insert(
                    Arc::new(Mutex::new(
                        PciEcam::new(bus.clone()).with_peers(peers_of(i)),
                    )),
                    l.ecam.0,
                    l.ecam.1,
                )
                .map_err(|source| PciError::Place {
                    what: "ECAM",
                    source,
                })?;
            segments.push(Segment {
                bus,
                mmio32: AddressAllocator::new(l.mmio32.0, l.mmio32.1),
                mmio64: AddressAllocator::new(l.mmio64.0, l.mmio64.1),
                bars: std::collections::BTreeMap::new(),
            });
        }
        let Some(first) = segments.first() else {
            return Err(PciError::NoSegment {
                segment: 0,
                count: 0,
            });
        };
        let cf8 = PciConfigIo::new(first.bus.clone())
            .with_peers(peers_of(0))
            .with_reset_register(reset_register);
        io_bus
            .insert(Arc::new(Mutex::new(cf8)), 0xcf8, 8)
            .map_err(|source| PciError::Place {
                what: "PCI config ports",
                source,
            })?;
        Ok(Self {
            segments,
            interrupts: Arc::new(InterruptManager::new(vm.clone())),
            ioevents: Arc::new(VmIoEvents(vm)),
            mem,
        })
    }

    /// Takes `size` bytes aligned to `align` from segment `segment`'s 64-bit window for a
    /// region that is not a BAR (a pmem device's memory).
    pub fn allocate_mmio64(&mut self, segment: u16, size: u64, align: u64) -> Option<u64> {
        self.segments
            .get_mut(usize::from(segment))?
            .mmio64
            .allocate_aligned(size, align)
    }

    /// Gives back a range [`PciDevices::allocate_mmio64`] handed out.
    pub fn free_mmio64(&mut self, segment: u16, addr: u64) {
        if let Some(seg) = self.segments.get_mut(usize::from(segment)) {
            seg.mmio64.free(addr);
        }
    }

    /// Adds a virtio device on segment `segment` in `slot` (or the first free one); its BAR 0
    /// comes from the segment's 64-bit window (its 32-bit one when that is full).
    pub fn add_virtio(
        &mut self,
        id: &str,
        device: Box<dyn VirtioDevice>,
        (segment, slot): (u16, Option<u8>),
        control: Arc<dyn DeviceControl>,
    ) -> Result<AddedDevice, PciError> {
        let count = self.segments.len();
        let seg = self
            .segments
            .get_mut(usize::from(segment))
            .ok_or(PciError::NoSegment { segment, count })?;
        let bar0 = seg
            .mmio64
            .allocate(BAR0_SIZE)
            .or_else(|| seg.mmio32.allocate(BAR0_SIZE))
            .ok_or(PciError::NoBarSpace {
                segment,
                size: BAR0_SIZE,
            })?;
        let vectors = self
            .interrupts
            .msi_vectors(device.queue_max_sizes().len() as u16 + 1)
            .map_err(PciError::Interrupts)?;
        let msi_gsis = vectors.gsis();
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
        let added = seg
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_device(shared, slot);
        let slot = match added {
            Ok(slot) => slot,
            Err(e) => {
                seg.give_back(bar0);
                return Err(e.into());
            }
        };
        seg.bars.insert(slot, bar0);
        Ok(AddedDevice {
            slot,
            device: dev,
            msi_gsis,
        })
    }

    /// Takes the device in `slot` of segment `segment` off its bus (hot removal): its BARs
    /// are unmapped and their addresses go back to the segment's windows. The device itself
    /// goes when its last holder drops it.
    pub fn remove(&mut self, segment: u16, slot: u8) -> Option<SharedPciDevice> {
        let seg = self.segments.get_mut(usize::from(segment))?;
        let device = seg
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove_device(slot)?;
        if let Some(bar0) = seg.bars.remove(&slot) {
            seg.give_back(bar0);
        }
        Some(device)
    }
}

impl Segment {
    /// Returns a BAR address to the window it came from.
    fn give_back(&mut self, addr: u64) {
        self.mmio64.free(addr);
        self.mmio32.free(addr);
    }
}
