//! virtio devices and their PCI transport.
//!
//! A device implements [`VirtioDevice`]: what it offers (type, queues, features, config space)
//! and what it does once the driver has set it up ([`VirtioDevice::activate`], usually starting a
//! [`worker`] thread that waits on the queues' kick eventfds). The transport
//! ([`transport::VirtioPciDevice`]) speaks virtio 1.2 modern PCI to the guest and calls the
//! device; devices never see PCI.
#![deny(missing_docs)]

pub mod balloon;
pub mod block;
pub mod config_change;
pub mod console;
pub mod net;
pub mod pause;
pub mod pmem;
pub mod rng;
pub mod transport;
pub mod vhost_user;
pub mod vsock;
pub mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it (swappable for memory hotplug).
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>;

/// virtio device type numbers (virtio 1.2 section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// Persistent memory.
    pub const PMEM: u32 = 27;
}

/// `VIRTIO_F_VERSION_1`: every device offers it, every driver must accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM` (not offered: no IOMMU).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// How a running device reaches the guest.
pub trait VirtioInterrupt: Send + Sync + std::fmt::Debug {
    /// The device used buffers of queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// The device's configuration changed.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from: set DEVICE_NEEDS_RESET and tell the driver.
    fn needs_reset(&self);
}

/// A queue the driver enabled, ready for the device.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index.
    pub index: u16,
    /// The queue, with the driver's addresses and size.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub kick: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryAtomic,
    /// Features the driver accepted.
    pub features: u64,
    /// Interrupts towards the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The enabled queues.
    pub queues: Vec<ActiveQueue>,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set the device up in a way it cannot use.
    #[error("invalid setup: {0}")]
    InvalidSetup(String),
    /// A worker thread or other resource could not be created.
    #[error("cannot start the device")]
    Resource(#[source] std::io::Error),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the device configuration space; bytes beyond it read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A counter the device bumps each time it changes its configuration space on its own
    /// (see [`config_change`]); the transport adds it to `config_generation`. Default 0: the
    /// configuration only changes by the driver's writes.
    fn config_generation(&self) -> u8 {
        0
    }
    /// Writes the device configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device (joins its workers) and forgets the queues.
    fn reset(&mut self);
    /// Parks the device's threads between two requests until [`VirtioDevice::resume`]; a
    /// device that is not running has nothing to park.
    fn pause(&mut self) -> Result<(), pause::PauseError>;
    /// Lets paused threads go on where they stopped.
    fn resume(&mut self);
    /// Cloud Hypervisor's `vm.counters` for this device (e.g. `read_bytes`, `rx_frames`);
    /// empty when it keeps none.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Guest memory gained regions (hot-added RAM): the [`GuestMemoryAtomic`] the device was
    /// activated with already holds them. Devices that read memory through it need nothing;
    /// a device that hands the memory to another process (vhost-user) tells it here.
    fn memory_changed(&mut self) {}
}
