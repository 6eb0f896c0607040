//! BARs on the MMIO bus: [`BarMapper`], what [`PciBus`](crate::PciBus) calls when a BAR starts
//! or stops decoding, and [`MmioBarMapper`], which places each BAR on a [`devices::Bus`] as a
//! [`BarRegion`] forwarding accesses to the device.

use std::sync::{Arc, Mutex, Weak};

use devices::{Bus, BusDevice};

use crate::bus::{lock, SharedPciDevice};

/// Errors placing a BAR on the MMIO bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioError {
    /// The MMIO bus is gone (the VM is being torn down).
    #[error("no MMIO bus to map BAR {bar} at {addr:#x} on")]
    BusGone {
        /// BAR index.
        bar: usize,
        /// Where the BAR decodes.
        addr: u64,
    },
    /// The bus refused the range (it overlaps another device, or wraps).
    #[error("cannot map BAR {bar}")]
    Map {
        /// BAR index.
        bar: usize,
        /// Cause.
        #[source]
        source: devices::BusError,
    },
}

/// Places BAR ranges on the VMM's MMIO bus.
pub trait BarMapper: Send + Sync {
    /// Maps `size` bytes at `addr` to BAR `bar` of `device`.
    ///
    /// # Errors
    ///
    /// An [`MmioError`] when the range cannot be placed.
    fn map(
        &self,
        device: SharedPciDevice,
        bar: usize,
        addr: u64,
        size: u64,
    ) -> Result<(), MmioError>;
    /// Unmaps the range that starts at `addr`.
    fn unmap(&self, addr: u64);
}

/// A BAR of a PCI device, as a range on the MMIO bus.
pub struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl std::fmt::Debug for BarRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarRegion")
            .field("bar", &self.bar)
            .finish_non_exhaustive()
    }
}

impl BarRegion {
    /// BAR `bar` of `device`.
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

/// A [`BarMapper`] placing BARs on a [`devices::Bus`] as [`BarRegion`]s.
///
/// It holds the bus weakly: the MMIO bus holds ECAM, which holds the PCI bus, which holds this
/// mapper, and a strong reference would keep a torn-down VM's devices (and their threads)
/// alive.
#[derive(Debug)]
pub struct MmioBarMapper {
    mmio_bus: Weak<Bus>,
}

impl MmioBarMapper {
    /// A mapper onto `mmio_bus`.
    pub fn new(mmio_bus: &Arc<Bus>) -> Self {
        Self {
            mmio_bus: Arc::downgrade(mmio_bus),
        }
    }
}

impl BarMapper for MmioBarMapper {
    fn map(
        &self,
        device: SharedPciDevice,
        bar: usize,
        addr: u64,
        size: u64,
    ) -> Result<(), MmioError> {
        let bus = self
            .mmio_bus
            .upgrade()
            .ok_or(MmioError::BusGone { bar, addr })?;
        let region = BarRegion::new(device, bar);
        bus.insert(Arc::new(Mutex::new(region)), addr, size)
            .map_err(|source| MmioError::Map { bar, source })
    }

    fn unmap(&self, addr: u64) {
        if let Some(bus) = self.mmio_bus.upgrade() {
            let _ = bus.remove(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PciDevice;

    /// BAR accesses are recorded as `(bar, offset, len, write)`; reads return 0xab.
    #[derive(Default)]
    struct Recorder(Vec<(usize, u64, usize, bool)>);

    impl PciDevice for Recorder {
        fn read_config_register(&mut self, _reg: usize) -> u32 {
            0
        }
        fn write_config_register(&mut self, _reg: usize, _offset: u64, _data: &[u8]) {}
        fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
            Vec::new()
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.0.push((bar, offset, data.len(), false));
            data.fill(0xab);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.0.push((bar, offset, data.len(), true));
        }
        fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
    }

    #[test]
    fn bars_reach_the_device_until_unmapped_or_the_bus_is_gone() {
        let bus = Arc::new(Bus::new());
        let mapper = MmioBarMapper::new(&bus);
        let dev = Arc::new(Mutex::new(Recorder::default()));
        mapper.map(dev.clone(), 2, 0x1000, 0x100).expect("map");
        let mut d = [0u8; 4];
        assert!(bus.read(0x1010, &mut d));
        assert_eq!(d, [0xab; 4]);
        assert!(bus.write(0x10ff, &[1]));
        assert_eq!(
            dev.lock().map(|d| d.0.clone()).unwrap_or_default(),
            vec![(2, 0x10, 4, false), (2, 0xff, 1, true)]
        );
        assert!(matches!(
            mapper.map(dev.clone(), 0, 0x1080, 0x100),
            Err(MmioError::Map { bar: 0, .. })
        ));
        mapper.unmap(0x1000);
        assert!(!bus.read(0x1010, &mut d));
        drop(bus);
        assert_eq!(
            mapper.map(dev, 2, 0x1000, 0x100),
            Err(MmioError::BusGone {
                bar: 2,
                addr: 0x1000
            })
        );
    }
}
