//! [`TestDriver`]: the driver side of a split virtqueue in guest memory, for device tests.
//!
//! The descriptor table, available ring and used ring are laid out one after the other (no
//! overlap, whatever the queue size) at the start of an area the test gives; buffers are
//! allocated after them in the same area. Chains are written as a driver would, then a device
//! under test pops them from [`TestDriver::queue`] and the test reads the used ring back.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One buffer of a chain the test adds.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

const fn align(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// A virtio driver for one split queue.
#[derive(Debug)]
pub struct TestDriver {
    mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
    end: u64,
}

impl TestDriver {
    /// A driver for a queue of `size` entries whose rings and buffers live in
    /// `area..area + area_len` of `mem` (a clone of the memory the device uses).
    pub fn new(mem: &GuestMemoryMmap, size: u16, area: u64, area_len: u64) -> Self {
        assert!(size.is_power_of_two());
        let desc = align(area, 16);
        let avail = desc + 16 * u64::from(size);
        let used = align(avail + 6 + 2 * u64::from(size), 4);
        let next_buf = align(used + 6 + 8 * u64::from(size), 16);
        let end = area + area_len;
        assert!(next_buf < end, "area too small for the rings");
        mem.write_slice(&vec![0u8; (next_buf - desc) as usize], GuestAddress(desc))
            .unwrap();
        TestDriver {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf,
            end,
        }
    }

    /// The queue as a transport would configure it after the driver enabled it.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size.max(256)).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Reserves `len` bytes for buffers, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let addr = self.next_buf;
        self.next_buf = align(addr + len as u64, 16);
        assert!(self.next_buf <= self.end, "test buffers exhausted");
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

    /// Writes descriptor `index` of the table.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc + 16 * u64::from(index % self.size);
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn push_avail(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_slice(&head.to_le_bytes(), GuestAddress(slot))
            .unwrap();
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// Sets the available index (also to fake a broken driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .store(idx.to_le(), GuestAddress(self.avail + 2), Ordering::Release)
            .unwrap();
    }

    /// Writes `bufs` as a chain of consecutive descriptors and makes it available.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_desc(index, b.addr, b.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_avail(head);
        head
    }

    /// Writes `bufs` as an indirect table and makes a one-descriptor chain pointing at it
    /// available.
    pub fn add_indirect_chain(&mut self, bufs: &[Buf]) -> u16 {
        let table = self.alloc(bufs.len() * 16, 0);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        self.store_desc(
            head,
            table,
            (bufs.len() * 16) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.next_desc = (head + 1) % self.size;
        self.push_avail(head);
        head
    }

    /// Used ring entries added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = u16::from_le(
            self.mem
                .load(GuestAddress(self.used + 2), Ordering::Acquire)
                .unwrap(),
        );
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let mut e = [0u8; 8];
            self.mem.read_slice(&mut e, GuestAddress(at)).unwrap();
            out.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Sets `used_event` (after the available ring), for `EVENT_IDX`.
    pub fn set_used_event(&self, value: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem
            .write_slice(&value.to_le_bytes(), GuestAddress(at))
            .unwrap();
    }

    /// Reads `avail_event` (after the used ring), for `EVENT_IDX`.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        let mut v = [0u8; 2];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        u16::from_le_bytes(v)
    }

    /// Reads the used ring's `flags` (`VRING_USED_F_NO_NOTIFY` is bit 0).
    pub fn used_flags(&self) -> u16 {
        let mut v = [0u8; 2];
        self.mem
            .read_slice(&mut v, GuestAddress(self.used))
            .unwrap();
        u16::from_le_bytes(v)
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Reads the byte of guest memory at `addr` (a status byte, say).
    pub fn byte(&self, addr: u64) -> u8 {
        let mut v = [0u8; 1];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v[0]
    }
}
