//! A small virtio driver for the tests: builds descriptor chains with `virtio_queue::mock`'s
//! descriptor table and rings in a `GuestMemoryMmap`, and reads back the used ring.

#![allow(dead_code)]
// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Queue size used by the tests.
pub const QSIZE: u16 = 16;
/// Guest memory size.
pub const MEM_SIZE: u64 = 0x10_0000;

const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const BUFFERS: u64 = 0x1_0000;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One descriptor to put in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Buf {
    pub fn r(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: false,
        }
    }
    pub fn w(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

pub struct Driver<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub desc: DescriptorTable<'a, GuestMemoryMmap>,
    pub avail: AvailRing<'a, GuestMemoryMmap>,
    pub used: UsedRing<'a, GuestMemoryMmap>,
    pub queue: Queue,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
}

impl<'a> Driver<'a> {
    /// Lays out the queue the way a driver would and configures `Queue` the way a device's
    /// transport does (size, addresses, ready).
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let desc = DescriptorTable::new(mem, GuestAddress(DESC_TABLE), QSIZE);
        let avail = AvailRing::new(mem, GuestAddress(AVAIL_RING), QSIZE);
        let used = UsedRing::new(mem, GuestAddress(USED_RING), QSIZE);
        let mut queue = Queue::new(256).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        Driver {
            mem,
            desc,
            avail,
            used,
            queue,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf: BUFFERS,
        }
    }

    /// Reserves `len` bytes of guest memory for buffers, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + len as u64 + 15) & !15;
        assert!(self.next_buf <= MEM_SIZE, "test buffers exhausted");
        self.mem
            .write_slice(&vec![fill; len], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// Reserves a buffer holding `data`.
    pub fn alloc_data(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len(), 0);
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        addr
    }

    /// A 16-byte request header buffer.
    pub fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&request_type.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.alloc_data(&h)
    }

    /// Writes one raw descriptor at `index`.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
        self.desc
            .store(
                index,
                RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next)),
            )
            .unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn push_avail(&mut self, head: u16) {
        self.avail
            .ring()
            .ref_at(usize::from(self.avail_idx % QSIZE))
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.avail.idx().store(self.avail_idx);
    }

    /// Sets the available index without adding entries (to fake a broken driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.avail.idx().store(idx);
    }

    /// Writes `bufs` as a chain of consecutive descriptors and makes it available.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let last = i + 1 == bufs.len();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.store_desc(index, b.addr, b.len, flags, (index + 1) % QSIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % QSIZE;
        self.push_avail(head);
        head
    }

    /// Writes `bufs` as an indirect table at a fresh buffer and makes a one-descriptor chain
    /// pointing at it available.
    pub fn add_indirect_chain(&mut self, bufs: &[Buf]) -> u16 {
        let table = self.alloc(bufs.len() * 16, 0);
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let d = RawDescriptor::from(Descriptor::new(b.addr, b.len, flags as u16, i as u16 + 1));
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        self.store_desc(
            head,
            table,
            (bufs.len() * 16) as u32,
            VRING_DESC_F_INDIRECT,
            0,
        );
        self.next_desc = (head + 1) % QSIZE;
        self.push_avail(head);
        head
    }

    /// Used ring entries added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used.idx().load();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e: VirtqUsedElem = self
                .used
                .ring()
                .ref_at(usize::from(self.used_seen % QSIZE))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Sets `used_event` (in the available ring), for `EVENT_IDX`.
    pub fn set_used_event(&self, value: u16) {
        let addr = AVAIL_RING + 4 + 2 * u64::from(QSIZE);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// Reads `avail_event` (in the used ring), for `EVENT_IDX`.
    pub fn avail_event(&self) -> u16 {
        let addr = USED_RING + 4 + 8 * u64::from(QSIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Reads the used ring's `flags`.
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING)).unwrap()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

/// A disk image of `sectors` sectors whose every byte is `(offset / 512 + offset) as u8`-ish:
/// distinct per sector and position.
pub fn pattern(sectors: usize) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| ((i / 512) as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}
