//! The tests' virtio driver: `virtio_chain`'s `TestDriver` on one 16-entry queue at the start
//! of guest memory, with the `Queue` a device transport would configure, plus virtio-blk helpers.

#![allow(dead_code)]
// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::ops::{Deref, DerefMut};

pub use virtio_chain::testing::Buf;
use virtio_chain::testing::TestDriver;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Queue size used by the tests.
pub const QSIZE: u16 = 16;
/// Guest memory size.
pub const MEM_SIZE: u64 = 0x10_0000;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A [`TestDriver`] (reached through `Deref`) with the queue the device under test serves.
pub struct Driver<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queue: Queue,
    driver: TestDriver,
}

impl<'a> Driver<'a> {
    /// Lays out the queue the way a driver would and configures `Queue` the way a device's
    /// transport does (size, addresses, ready).
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let driver = TestDriver::new(mem, QSIZE, 0, MEM_SIZE);
        Driver {
            mem,
            queue: driver.queue(false),
            driver,
        }
    }

    /// A 16-byte request header buffer.
    pub fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&request_type.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.alloc_data(&h)
    }

    /// Writes one raw descriptor at `index`; `flags` as `virtio_bindings` spells them.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
        self.driver
            .store_desc(index, addr, len, u16::try_from(flags).unwrap(), next);
    }
}

impl Deref for Driver<'_> {
    type Target = TestDriver;

    fn deref(&self) -> &TestDriver {
        &self.driver
    }
}

impl DerefMut for Driver<'_> {
    fn deref_mut(&mut self) -> &mut TestDriver {
        &mut self.driver
    }
}

/// A disk image of `sectors` sectors whose every byte is `(offset / 512 + offset) as u8`-ish:
/// distinct per sector and position.
pub fn pattern(sectors: usize) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| ((i / 512) as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}
