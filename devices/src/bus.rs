//! An address bus: a sorted map of non-overlapping ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    /// Handles a read of `data.len()` bytes; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors changing a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a device already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// No device at that base.
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus of devices, safe to use from all vCPU threads; devices can come and go at run time.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        f.debug_list()
            .entries(ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        let before = ranges.range(..end).next_back();
        if let Some((&b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device placed at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound(base))
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        let (&base, e) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The access must lie entirely inside the device's range.
        if offset.checked_add(len as u64)? <= e.len {
            Some((offset, e.device.clone()))
        } else {
            None
        }
    }

    /// Reads from the device at `addr`. Returns false (leaving `data` untouched) if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false if none is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Scratch::default()));
        bus.insert(dev.clone(), 0x3f8, 8).expect("insert");
        assert_eq!(
            bus.insert(dev.clone(), 0x3fc, 8),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x3f0, 9),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert!(bus.insert(dev.clone(), 0x3f0, 8).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x400, &mut b));
        // An access straddling the end of the range reaches no device.
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(
            dev.lock().map(|d| d.0.clone()).unwrap_or_default(),
            vec![(1, vec![7])]
        );
        bus.remove(0x3f8).expect("remove");
        assert!(!bus.read(0x3f8, &mut b));
        assert_eq!(bus.remove(0x3f8), Err(BusError::NotFound(0x3f8)));
    }
}
