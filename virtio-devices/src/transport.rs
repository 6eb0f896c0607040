//! The virtio 1.2 modern PCI transport (virtio spec section 4.1).
//!
//! BAR 0 (64-bit, 32 KiB) holds every structure:
//!
//! | offset | structure |
//! | --- | --- |
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue `i` at `0x3000 + 4 * i`, an ioeventfd each |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending-bit array |
//!
//! The device status machine follows the spec: FEATURES_OK is only kept when the driver's
//! features are a subset of the offer and include VERSION_1; DRIVER_OK activates the device
//! with the enabled queues; writing 0 resets it. A device that cannot start sets
//! DEVICE_NEEDS_RESET and raises a configuration interrupt instead of failing the VMM.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pci::{Bar, BarKind, MsiVectors, Msix, PciConfiguration, PciDevice, PciIds};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::{
    Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION_SIZE: u64 = 0x1000;

/// "No vector" in virtio's MSI-X vector fields.
pub const NO_VECTOR: u16 = 0xffff;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
const PCI_CAP_ID_VENDOR: u8 = 0x09;

/// Registers and removes the ioeventfds of queue notifications (the VMM's hypervisor VM).
pub trait IoEventRegistrar: Send + Sync + std::fmt::Debug {
    /// Signal `fd` on guest writes to MMIO address `addr`.
    fn register(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Stop doing so.
    fn unregister(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
}

/// The driver-visible state of one queue.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// What the device's threads use to interrupt the driver.
#[derive(Debug)]
struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: AtomicU8,
    status: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl PciInterrupt {
    /// The MSI-X table and PBA, locked.
    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self, vector: u16) {
        if vector != NO_VECTOR {
            self.msix().signal(vector);
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let v = self
            .queue_vectors
            .get(usize::from(queue))
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.signal(v);
    }

    fn signal_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.signal(self.config_vector.load(Ordering::SeqCst));
    }

    fn needs_reset(&self) {
        self.status.fetch_or(STATUS_NEEDS_RESET, Ordering::SeqCst);
        self.signal_config();
    }
}

/// PCI class/subclass per virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        crate::device_type::NET => (0x02, 0x00),
        crate::device_type::BLOCK => (0x01, 0x00),
        crate::device_type::CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<PciInterrupt>,
    msix_cap: usize,
    pcicfg_cap: usize,
    queues: Vec<QueueConfig>,
    /// Queue notification eventfds, registered as ioeventfds while BAR 0 decodes; the device
    /// gets clones (the same eventfd) when it starts.
    kicks: Vec<EventFd>,
    ioevents: Arc<dyn IoEventRegistrar>,
    mem: GuestMemoryAtomic,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    bar0: Option<u64>,
    active: bool,
    /// Where activations and resets go when they must not run on the vCPU thread that wrote
    /// the status; `None`: they run at once.
    control: Option<Arc<dyn DeviceControl>>,
    pending: Pending,
    /// The device's id, in log lines.
    name: String,
}

/// Runs a device's activation and reset away from the vCPU thread that asked for them (a
/// vCPU's system-call filter covers guest exits, not starting device threads or talking to a
/// vhost-user backend): [`DeviceControl::pending`] tells the VMM's command loop, which calls
/// [`VirtioPciDevice::run_pending`]. Until then the device's status shows the reset has not
/// happened (drivers wait for it to read 0) and the kicks of a device being activated wait in
/// their eventfds.
pub trait DeviceControl: Send + Sync + std::fmt::Debug {
    /// The device has an activation or a reset to run.
    fn pending(&self);
}

/// What a device with a [`DeviceControl`] still has to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nothing,
    Activate,
    Reset,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("type", &self.device.device_type())
            .field("bar0", &self.bar0)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Errors creating the transport, or taking the queues the driver set up at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The PCI configuration could not be built.
    #[error("PCI configuration")]
    Configuration(#[from] pci::configuration::ConfigurationError),
    /// An eventfd could not be created or registered.
    #[error("queue notification eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device's maximum size for a queue is not one virtio-queue accepts.
    #[error("queue {index} cannot be created")]
    Queue {
        /// Queue index.
        index: u16,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// The driver set a queue size that is not a power of two up to the maximum.
    #[error("queue {index} has size {size} (max {max})")]
    QueueSize {
        /// Queue index.
        index: u16,
        /// The size the driver set.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// The driver placed a ring at a misaligned address (virtio 1.2 section 2.7).
    #[error("queue {index} has misaligned rings {desc:#x}/{avail:#x}/{used:#x}")]
    RingAlignment {
        /// Queue index.
        index: u16,
        /// Descriptor table.
        desc: u64,
        /// Driver (available) ring.
        avail: u64,
        /// Device (used) ring.
        used: u64,
    },
    /// The driver placed a ring outside guest memory.
    #[error("queue {index} has rings outside guest memory ({desc:#x}/{avail:#x}/{used:#x})")]
    RingsOutsideMemory {
        /// Queue index.
        index: u16,
        /// Descriptor table.
        desc: u64,
        /// Driver (available) ring.
        avail: u64,
        /// Device (used) ring.
        used: u64,
    },
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        PCI_CAP_ID_VENDOR,
        0,
        16 + extra.len() as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPciDevice {
    /// Wraps `device` with BAR 0 at `bar0_addr` (32 KiB aligned); MSI-X vectors go through
    /// `vectors` (one per queue plus one for configuration changes).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar0_addr: u64,
        vectors: Arc<dyn MsiVectors>,
        ioevents: Arc<dyn IoEventRegistrar>,
        mem: GuestMemoryAtomic,
    ) -> Result<Self, TransportError> {
        let dtype = device.device_type();
        let (class, subclass) = class_of(dtype);
        let mut config = PciConfiguration::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + dtype as u16,
            revision: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar(
            Bar {
                index: 0,
                size: BAR0_SIZE,
                kind: BarKind::Memory64,
                prefetchable: false,
            },
            bar0_addr,
        )?;
        let max_sizes = device.queue_max_sizes();
        let msix = Msix::new(max_sizes.len() as u16 + 1, vectors);
        config.add_capability(
            &vendor_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, 0x40, &[]),
            None,
        )?;
        config.add_capability(
            &vendor_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                REGION_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            None,
        )?;
        config.add_capability(
            &vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            None,
        )?;
        config.add_capability(
            &vendor_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, REGION_SIZE, &[]),
            None,
        )?;
        // PCI configuration access: bar, offset, length and the data window are the driver's.
        let mut pcicfg_mask = vec![0u8; 20];
        pcicfg_mask[4] = 0xff;
        pcicfg_mask[8..20].fill(0xff);
        let pcicfg_cap = config.add_capability(
            &vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]),
            Some(&pcicfg_mask),
        )?;
        let (msix_body, msix_mask) =
            msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&msix_body, Some(&msix_mask))?;
        let kicks = (0..max_sizes.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(msix)),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: max_sizes
                .iter()
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
        });
        Ok(Self {
            config,
            interrupt,
            msix_cap,
            pcicfg_cap,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            kicks,
            device,
            ioevents,
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            bar0: None,
            active: false,
            control: None,
            pending: Pending::Nothing,
            name: "virtio".to_string(),
        })
    }

    /// Activations and resets go through `control` instead of running at once.
    pub fn with_control(mut self, control: Arc<dyn DeviceControl>) -> Self {
        self.control = Some(control);
        self
    }

    /// Names the device `name` (its id) in log lines.
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Runs the activation or reset the driver asked for (see [`DeviceControl`]).
    pub fn run_pending(&mut self) {
        match std::mem::replace(&mut self.pending, Pending::Nothing) {
            Pending::Nothing => {}
            Pending::Reset => self.reset(),
            Pending::Activate => {
                let ready =
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
                let status = self.status();
                if !self.active && status & ready == ready && status & STATUS_FAILED == 0 {
                    self.activate();
                }
            }
        }
    }

    /// Asks for `what` to run later, or runs it now without a [`DeviceControl`] (or when it
    /// is the reset of a device that is not running: that only clears registers). A pending
    /// reset stays pending whatever the driver asks before it has run (a driver must wait for
    /// the status to read 0).
    fn request(&mut self, what: Pending) {
        if self.pending == Pending::Reset {
            return;
        }
        self.pending = what;
        match &self.control {
            Some(control) if self.active || what == Pending::Activate => control.pending(),
            _ => self.run_pending(),
        }
    }

    fn status(&self) -> u8 {
        self.interrupt.status.load(Ordering::SeqCst)
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.request(Pending::Reset);
            return;
        }
        let old = self.status();
        // Bits are only ever added by the driver; clearing any needs a reset.
        let mut new = old | value;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                log::debug!(
                    "{}: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.name,
                    self.driver_features
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.interrupt.status.store(new, Ordering::SeqCst);
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if !self.active && new & ready == ready && new & STATUS_FAILED == 0 {
            self.request(Pending::Activate);
        }
    }

    fn activate(&mut self) {
        let mem = self.mem.memory();
        let mut queues = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.enabled {
                continue;
            }
            let q = match build_queue(i as u16, qc, self.driver_features, &*mem) {
                Ok(q) => q,
                Err(e) => {
                    nimbus_log::warn_limited!(
                        "{}: {}; device needs reset",
                        self.name,
                        nimbus_log::error_chain(&e)
                    );
                    self.interrupt.needs_reset();
                    return;
                }
            };
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    log::warn!("{}: queue {i}: {e}", self.name);
                    self.interrupt.needs_reset();
                    return;
                }
            };
            log::debug!(
                "{}: queue {i}: size {}, descriptors {:#x}, driver ring {:#x}, device ring {:#x}, \
                 MSI-X vector {}",
                self.name,
                qc.size,
                qc.desc,
                qc.avail,
                qc.used,
                self.interrupt.queue_vectors[i].load(Ordering::SeqCst)
            );
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                kick,
            });
        }
        drop(mem);
        log::debug!(
            "{}: driver ready: features {:#x} of {:#x} offered, {} queues",
            self.name,
            self.driver_features,
            self.device.features(),
            queues.len()
        );
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
            queues,
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                nimbus_log::warn_limited!("{}: cannot start: {e}", self.name);
                self.interrupt.needs_reset();
            }
        }
    }

    /// Parks the device's threads (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) -> Result<(), crate::pause::PauseError> {
        if self.active {
            self.device.pause()?;
        }
        Ok(())
    }

    /// Lets the device's threads go on.
    pub fn resume(&mut self) {
        if self.active {
            self.device.resume();
        }
    }

    /// Guest memory gained regions (see [`VirtioDevice::memory_changed`]).
    pub fn memory_changed(&mut self) {
        if self.active {
            self.device.memory_changed();
        }
    }

    /// The device's `vm.counters`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.device.counters()
    }

    /// Where BAR 0 decodes now, if it does.
    pub fn bar0(&self) -> Option<u64> {
        self.bar0
    }

    fn reset(&mut self) {
        if self.active {
            log::debug!("{}: reset by the driver", self.name);
            self.device.reset();
            self.active = false;
        }
        for q in self.queues.iter_mut() {
            *q = QueueConfig::new(q.max_size);
        }
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let status = self.status();
        let qsel = self.queue_select;
        let q = self.queues.get(usize::from(qsel)).copied();
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.interrupt.config_vector.load(Ordering::SeqCst)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(status),
            (0x15, 1) => u64::from(
                self.config_generation
                    .wrapping_add(self.device.config_generation()),
            ),
            (0x16, 2) => u64::from(qsel),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => q.map_or(u64::from(NO_VECTOR), |_| {
                u64::from(self.interrupt.queue_vectors[usize::from(qsel)].load(Ordering::SeqCst))
            }),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(qsel)),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used >> 32),
            (0x20, 8) => q.map_or(0, |q| q.desc),
            (0x28, 8) => q.map_or(0, |q| q.avail),
            (0x30, 8) => q.map_or(0, |q| q.used),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        // Queue fields are frozen once the queue is enabled or the device is running.
        let driver_ok = self.status() & STATUS_DRIVER_OK != 0;
        let frozen = |q: &QueueConfig| q.enabled || driver_ok;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if self.status() & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
                    _ => {}
                }
            }
            (0x10, 2) => self
                .interrupt
                .config_vector
                .store(self.checked_vector(value as u16), Ordering::SeqCst),
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) => {
                if let Some(q) = self.selected_queue().filter(|q| !frozen(q)) {
                    q.size = value as u16;
                }
            }
            (0x1a, 2) => {
                let v = self.checked_vector(value as u16);
                if let Some(slot) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(v, Ordering::SeqCst);
                }
            }
            (0x1c, 2) => {
                if let Some(q) = self.selected_queue().filter(|q| !frozen(q)) {
                    q.enabled = value == 1;
                }
            }
            (0x20..=0x37, 4) | (0x20 | 0x28 | 0x30, 8) => {
                if let Some(q) = self.selected_queue().filter(|q| !frozen(q)) {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = match (offset & 7, data.len()) {
                        (0, 8) => value,
                        (0, _) => (*field & !0xffff_ffff) | value,
                        _ => (*field & 0xffff_ffff) | value << 32,
                    };
                }
            }
            _ => log::debug!(
                "{}: ignored common config write at {offset:#x} ({} bytes)",
                self.name,
                data.len()
            ),
        }
    }

    /// A vector number the device can use, or NO_VECTOR (the driver reads it back to see).
    fn checked_vector(&self, v: u16) -> u16 {
        let count = self.interrupt.msix().count();
        if v < count {
            v
        } else {
            NO_VECTOR
        }
    }

    fn notify_addr(&self, base: u64, queue: usize) -> u64 {
        base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    fn move_ioevents(&mut self, old: Option<u64>, new: Option<u64>) {
        for (i, fd) in self.kicks.iter().enumerate() {
            if let Some(base) = old {
                let _ = self.ioevents.unregister(fd, self.notify_addr(base, i));
            }
            if let Some(base) = new {
                if let Err(e) = self.ioevents.register(fd, self.notify_addr(base, i)) {
                    // Notifications still work through MMIO exits (write_bar), just slower.
                    log::warn!("{}: queue {i} ioeventfd: {e}", self.name);
                }
            }
        }
        self.bar0 = new;
    }

    /// The capability's (bar, offset, length) for PCI configuration access.
    fn pcicfg_window(&self) -> (u8, u64, usize) {
        let reg = self.pcicfg_cap / 4;
        let bar = (self.config.read_reg(reg + 1) & 0xff) as u8;
        let offset = u64::from(self.config.read_reg(reg + 2));
        let length = self.config.read_reg(reg + 3) as usize;
        (bar, offset, length)
    }
}

/// Queue `index` as the driver set it up in `qc`, checked against the device's maximum size,
/// the ring alignments and guest memory.
fn build_queue<M: vm_memory::GuestMemory>(
    index: u16,
    qc: &QueueConfig,
    features: u64,
    mem: &M,
) -> Result<Queue, TransportError> {
    let mut q =
        Queue::new(qc.max_size).map_err(|source| TransportError::Queue { index, source })?;
    if !qc.size.is_power_of_two() || qc.size > qc.max_size {
        return Err(TransportError::QueueSize {
            index,
            size: qc.size,
            max: qc.max_size,
        });
    }
    let (desc, avail, used) = (qc.desc, qc.avail, qc.used);
    // Ring alignment (virtio 1.2 section 2.7): descriptors 16, driver ring 2, device ring 4.
    if !desc.is_multiple_of(16) || !avail.is_multiple_of(2) || !used.is_multiple_of(4) {
        return Err(TransportError::RingAlignment {
            index,
            desc,
            avail,
            used,
        });
    }
    q.set_size(qc.size);
    q.set_desc_table_address(Some(qc.desc as u32), Some((qc.desc >> 32) as u32));
    q.set_avail_ring_address(Some(qc.avail as u32), Some((qc.avail >> 32) as u32));
    q.set_used_ring_address(Some(qc.used as u32), Some((qc.used >> 32) as u32));
    q.set_event_idx(features & crate::VIRTIO_RING_F_EVENT_IDX != 0);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(TransportError::RingsOutsideMemory {
            index,
            desc,
            avail,
            used,
        });
    }
    Ok(q)
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pcicfg_cap / 4 + 4 {
            // pci_cfg_data: a BAR read through configuration space.
            let (bar, offset, length) = self.pcicfg_window();
            let mut data = [0u8; 4];
            if bar == 0 && matches!(length, 1 | 2 | 4) {
                self.read_bar(0, offset, &mut data[..length]);
            }
            return u32::from_le_bytes(data);
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg == self.pcicfg_cap / 4 + 4 {
            let (bar, win_offset, length) = self.pcicfg_window();
            if bar == 0 && length == data.len() && offset == 0 {
                self.write_bar(0, win_offset, data);
            }
            return;
        }
        // BARs: the bus reads `decoded_bars` before and after and moves mappings.
        self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let control = (self.config.read_reg(reg) >> 16) as u16;
            self.interrupt.msix().set_control(control);
        }
    }

    fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        self.config
            .decoded_bar(0)
            .map(|(a, s)| vec![(0, a, s)])
            .unwrap_or_default()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 || data.len() > 8 {
            return;
        }
        let region = offset & !(REGION_SIZE - 1);
        let within = offset - region;
        match region {
            COMMON_OFFSET => self.read_common(within, data),
            ISR_OFFSET if within == 0 => {
                // Reading the ISR clears it.
                let isr = self.interrupt.isr.swap(0, Ordering::SeqCst);
                if let Some(b) = data.first_mut() {
                    *b = isr;
                }
            }
            DEVICE_OFFSET => self.device.read_config(within, data),
            MSIX_TABLE_OFFSET => self.interrupt.msix().read_table(within, data),
            MSIX_PBA_OFFSET => self.interrupt.msix().read_pba(within, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.len() > 8 {
            return;
        }
        let region = offset & !(REGION_SIZE - 1);
        let within = offset - region;
        match region {
            COMMON_OFFSET => self.write_common(within, data),
            DEVICE_OFFSET => {
                self.device.write_config(within, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            NOTIFY_OFFSET => {
                // Reached only when the ioeventfd is not registered.
                let q = (within / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(q) {
                    let _ = kick.write(1);
                }
            }
            MSIX_TABLE_OFFSET => self.interrupt.msix().write_table(within, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar == 0 {
            self.move_ioevents(old, new);
        }
    }
}

impl VirtioPciDevice {
    /// Gives the device's notification addresses back to the hypervisor, for a device taken
    /// off a running VM (its BAR range may go to the next device). Not needed when the whole
    /// VM goes: closing the VM drops them all at once, and each unregistration costs the
    /// hypervisor a grace period (milliseconds at teardown).
    pub fn release_notifications(&mut self) {
        self.move_ioevents(self.bar0, None);
    }
}

impl Drop for VirtioPciDevice {
    /// Stops the device's threads.
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use pci::MsiMessage;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    #[derive(Debug, Default)]
    struct Vectors(Mutex<Vec<u16>>);
    impl MsiVectors for Vectors {
        fn update(&self, _v: u16, _m: MsiMessage, _e: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn trigger(&self, v: u16) -> std::io::Result<()> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(v);
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct IoEvents(Mutex<Vec<(bool, u64)>>);
    impl IoEventRegistrar for IoEvents {
        fn register(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((true, addr));
            Ok(())
        }
        fn unregister(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((false, addr));
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct Dummy {
        activations: Arc<Mutex<Vec<(u64, usize)>>>,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            crate::device_type::RNG
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            virtio_chain::read_config(&[0xa1, 0xa2, 0xa3, 0xa4], offset, data);
        }
        fn activate(&mut self, a: Activation) -> Result<(), crate::ActivateError> {
            self.activations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((a.features, a.queues.len()));
            Ok(())
        }
        fn reset(&mut self) {}
        fn pause(&mut self) -> Result<(), crate::pause::PauseError> {
            Ok(())
        }
        fn resume(&mut self) {}
    }

    struct Harness {
        dev: VirtioPciDevice,
        vectors: Arc<Vectors>,
        ioevents: Arc<IoEvents>,
        activations: Arc<Mutex<Vec<(u64, usize)>>>,
    }

    fn harness() -> Harness {
        let dummy = Dummy::default();
        let activations = dummy.activations.clone();
        Harness {
            activations,
            ..harness_with(Box::new(dummy))
        }
    }

    /// A transport over `device` (`activations` stays empty unless it is a [`Dummy`]).
    fn harness_with(device: Box<dyn VirtioDevice>) -> Harness {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let vectors = Arc::new(Vectors::default());
        let ioevents = Arc::new(IoEvents::default());
        let activations = Arc::default();
        let dev = VirtioPciDevice::new(
            device,
            0x1_0000_0000,
            vectors.clone(),
            ioevents.clone(),
            GuestMemoryAtomic::new(mem),
        )
        .expect("transport");
        Harness {
            dev,
            vectors,
            ioevents,
            activations,
        }
    }

    impl Harness {
        fn w(&mut self, off: u64, v: u64, len: usize) {
            self.dev.write_bar(0, off, &v.to_le_bytes()[..len]);
        }
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.read_bar(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn status(&mut self) -> u8 {
            self.r(0x14, 1) as u8
        }
        fn negotiate(&mut self, features: u64) {
            self.w(0x14, 0, 1);
            self.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
            self.w(0x08, 0, 4);
            self.w(0x0c, features & 0xffff_ffff, 4);
            self.w(0x08, 1, 4);
            self.w(0x0c, features >> 32, 4);
            self.w(0x14, u64::from(STATUS_FEATURES_OK), 1);
        }
        fn setup_queue(&mut self, q: u64, desc: u64, avail: u64, used: u64) {
            self.w(0x16, q, 2);
            self.w(0x18, 16, 2);
            self.w(0x20, desc, 8);
            self.w(0x28, avail & 0xffff_ffff, 4);
            self.w(0x2c, avail >> 32, 4);
            self.w(0x30, used, 8);
            self.w(0x1c, 1, 2);
        }
        fn enable_msix(&mut self) {
            let reg = self.dev.msix_cap / 4;
            let control = ((1u32 << 15) | (self.dev.config.read_reg(reg) >> 16)) as u16;
            self.dev
                .write_config_register(reg, 2, &control.to_le_bytes());
            for v in 0..3u64 {
                self.w(MSIX_TABLE_OFFSET + v * 16 + 12, 0, 4);
            }
        }
    }

    #[test]
    fn handshake_activates_with_enabled_queues() {
        let mut h = harness();
        assert_eq!(h.r(0x12, 2), 2, "num_queues");
        h.w(0x00, 1, 4);
        assert_eq!(h.r(0x04, 4), 1, "VERSION_1 is bit 32");
        h.negotiate(VIRTIO_F_VERSION_1 | 1);
        assert_ne!(h.status() & STATUS_FEATURES_OK, 0);
        h.setup_queue(0, 0x1000, 0x2000, 0x3000);
        h.w(0x14, u64::from(STATUS_DRIVER_OK), 1);
        assert_eq!(
            h.activations.lock().map(|a| a.clone()).unwrap_or_default(),
            vec![(VIRTIO_F_VERSION_1 | 1, 1)]
        );
        // Reset brings everything back.
        h.w(0x14, 0, 1);
        assert_eq!(h.status(), 0);
        h.w(0x16, 0, 2);
        assert_eq!(h.r(0x1c, 2), 0, "queue disabled after reset");
        assert_eq!(h.r(0x20, 8), 0);
    }

    /// Counts the requests a device makes of the VMM's command loop.
    #[derive(Debug, Default)]
    struct Requests(std::sync::atomic::AtomicUsize);
    impl DeviceControl for Requests {
        fn pending(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn with_a_control_activation_and_reset_wait_for_run_pending() {
        let mut h = harness();
        let requests = Arc::new(Requests::default());
        h.dev = h.dev.with_control(requests.clone());
        let activated = |h: &Harness| h.activations.lock().map(|a| a.len()).unwrap_or(0);
        let asked = || requests.0.load(Ordering::SeqCst);
        // Resetting a device that is not running is done at once.
        h.negotiate(VIRTIO_F_VERSION_1);
        assert_eq!(asked(), 0);
        h.setup_queue(0, 0x1000, 0x2000, 0x3000);
        h.w(0x14, u64::from(STATUS_DRIVER_OK), 1);
        assert_eq!(activated(&h), 0, "activated on the writing thread");
        assert_eq!(asked(), 1);
        h.dev.run_pending();
        assert_eq!(activated(&h), 1);
        h.dev.run_pending();
        assert_eq!(activated(&h), 1, "nothing left to run");
        // Resetting a running device is not done until it has run: the driver sees the old
        // status meanwhile, and what it writes before that does not count.
        h.w(0x14, 0, 1);
        assert_eq!(asked(), 2);
        assert_ne!(h.status(), 0);
        h.w(0x14, u64::from(STATUS_ACKNOWLEDGE), 1);
        h.dev.run_pending();
        assert_eq!(h.status(), 0);
        h.dev.run_pending();
        assert_eq!((activated(&h), h.status()), (1, 0));
    }

    #[test]
    fn unacceptable_features_leave_features_ok_clear() {
        let mut h = harness();
        h.negotiate(1); // no VERSION_1
        assert_eq!(h.status() & STATUS_FEATURES_OK, 0);
        h.negotiate(VIRTIO_F_VERSION_1 | 1 << 7); // not offered
        assert_eq!(h.status() & STATUS_FEATURES_OK, 0);
        h.w(0x14, u64::from(STATUS_DRIVER_OK), 1);
        assert!(
            h.activations.lock().map(|a| a.is_empty()).unwrap_or(false),
            "no activation without FEATURES_OK"
        );
    }

    #[test]
    fn bad_queue_setup_sets_needs_reset_and_raises_a_config_interrupt() {
        for (size, desc) in [(16u64, 0x10_0000_0000u64), (16, 0x1001), (12, 0x1000)] {
            let mut h = harness();
            h.enable_msix();
            h.negotiate(VIRTIO_F_VERSION_1);
            h.w(0x10, 2, 2); // config vector (after the reset that negotiate starts with)
            h.setup_queue(0, desc, 0x2000, 0x3000);
            h.w(0x16, 0, 2);
            h.dev.queues[0].size = size as u16;
            h.w(0x14, u64::from(STATUS_DRIVER_OK), 1);
            assert_ne!(
                h.status() & STATUS_NEEDS_RESET,
                0,
                "desc {desc:#x} size {size}"
            );
            assert!(h.activations.lock().map(|a| a.is_empty()).unwrap_or(false));
            assert_eq!(
                h.vectors.0.lock().map(|v| v.clone()).unwrap_or_default(),
                vec![2]
            );
            assert_eq!(h.r(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
            assert_eq!(h.r(ISR_OFFSET, 1), 0, "ISR clears on read");
        }
    }

    #[test]
    fn a_resized_disk_shows_its_capacity_after_a_configuration_change_interrupt() {
        use block::DiskBackend;
        let disk = Arc::new(block::FakeDisk::new(1 << 20));
        let change = crate::config_change::ConfigChange::new();
        let blk = crate::block::Block::new(disk.clone(), 1, 16, "s", "_disk0".into())
            .with_config_change(change.clone());
        let mut h = harness_with(Box::new(blk));
        assert!(!change.notify(), "no driver: nothing to interrupt");
        h.enable_msix();
        h.negotiate(VIRTIO_F_VERSION_1);
        h.w(0x10, 1, 2); // config vector
        h.setup_queue(0, 0x1000, 0x2000, 0x3000);
        h.w(0x14, u64::from(STATUS_DRIVER_OK), 1);
        assert_eq!(h.r(DEVICE_OFFSET, 8), 2048, "capacity in sectors");
        let generation = h.r(0x15, 1);

        disk.resize(3 << 20).expect("resize");
        assert!(change.notify());
        assert_eq!(h.r(DEVICE_OFFSET, 4), 6144);
        assert_eq!(h.r(DEVICE_OFFSET + 4, 4), 0);
        assert_ne!(h.r(0x15, 1), generation, "config_generation moved");
        assert_eq!(
            h.vectors.0.lock().map(|v| v.clone()).unwrap_or_default(),
            vec![1],
            "the configuration vector fired"
        );
        assert_eq!(h.r(ISR_OFFSET, 1), u64::from(ISR_CONFIG));

        // After a reset nothing is interrupted.
        h.w(0x14, 0, 1);
        assert!(!change.notify());
    }

    #[test]
    fn queue_fields_freeze_once_enabled_and_vectors_are_checked() {
        let mut h = harness();
        h.setup_queue(1, 0x1000, 0x2000, 0x3000);
        h.w(0x20, 0x5000, 8);
        h.w(0x18, 4, 2);
        assert_eq!((h.r(0x20, 8), h.r(0x18, 2)), (0x1000, 16));
        h.w(0x1a, 1, 2);
        assert_eq!(h.r(0x1a, 2), 1);
        h.w(0x1a, 99, 2);
        assert_eq!(
            h.r(0x1a, 2),
            u64::from(NO_VECTOR),
            "out-of-range vector reads back as NO_VECTOR"
        );
        h.w(0x16, 7, 2); // no such queue
        h.w(0x18, 8, 2);
        assert_eq!(h.r(0x18, 2), 0);
        // Odd sizes and offsets are ignored, not fatal.
        h.w(0x03, 0xff, 1);
        h.w(0x7ff8, 1, 8);
        let mut big = [0u8; 16];
        h.dev.read_bar(0, 0, &mut big);
    }

    #[test]
    fn ioeventfds_follow_bar0() {
        let mut h = harness();
        h.dev.bar_moved(0, None, Some(0xc000_0000));
        h.dev.bar_moved(0, Some(0xc000_0000), Some(0xd000_0000));
        let log = h.ioevents.0.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(
            log,
            vec![
                (true, 0xc000_3000),
                (true, 0xc000_3004),
                (false, 0xc000_3000),
                (true, 0xd000_3000),
                (false, 0xc000_3004),
                (true, 0xd000_3004),
            ]
        );
    }

    #[test]
    fn pci_config_access_window_reads_the_bar() {
        let mut h = harness();
        let reg = h.dev.pcicfg_cap / 4;
        h.dev.write_config_register(reg + 1, 0, &[0]); // bar 0
        h.dev
            .write_config_register(reg + 2, 0, &(DEVICE_OFFSET as u32).to_le_bytes());
        h.dev.write_config_register(reg + 3, 0, &4u32.to_le_bytes());
        assert_eq!(h.dev.read_config_register(reg + 4), 0xa4a3_a2a1);
        // A bogus window reads as zero instead of faulting.
        h.dev.write_config_register(reg + 3, 0, &3u32.to_le_bytes());
        assert_eq!(h.dev.read_config_register(reg + 4), 0);
    }
}
