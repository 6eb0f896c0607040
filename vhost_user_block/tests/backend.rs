//! [`BlockBackend`] as the backend crate's worker threads drive it: rings set up through the
//! `VringT` calls the protocol handler makes, requests written by `net_util`'s `TestDriver`,
//! `handle_event` called as for a kick, results read from the used ring, the call eventfd and a
//! `FakeDisk`. Also the configuration space and the feature/protocol negotiation values.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use block::{FakeDisk, FakeOp, VirtioBlkConfig};
use net_util::testing::Buf;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use vhost_user_block::{BackendConfig, BlockBackend};
use vhost_user_daemon::testing::DeviceRing;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const OK: u8 = 0;
const IOERR: u8 = 1;
const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 16;
const SERIAL: &str = "vub-serial-test";

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// A backend over `disk` plus the guest memory it reads.
struct Setup {
    mem: GuestMemoryMmap,
    atomic: Mem,
    backend: BlockBackend,
}

fn setup(config: &BackendConfig, disk: Arc<FakeDisk>) -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let backend = BlockBackend::new(disk, config, atomic.clone()).unwrap();
    Setup {
        mem,
        atomic,
        backend,
    }
}

fn config(num_queues: u16) -> BackendConfig {
    let mut c = BackendConfig::new("unused.img", "unused.sock");
    c.num_queues = num_queues;
    c.serial = Some(SERIAL.into());
    c
}

/// A data pattern for the disk: byte `i` is `i * 7 + i / 512`.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

/// One ring: the driver side in guest memory and the device side as the protocol handler
/// would have set it up (SET_VRING_NUM/ADDR, KICK, CALL, ENABLE).
type Ring = DeviceRing;

fn ring(s: &Setup, area: u64, event_idx: bool) -> Ring {
    ring_of(s, QSIZE, area, event_idx)
}

fn ring_of(s: &Setup, size: u16, area: u64, event_idx: bool) -> Ring {
    DeviceRing::new(&s.mem, &s.atomic, size, 1024, area, event_idx)
}

/// Virtio-blk requests on a test ring.
trait Requests {
    /// Header + optional data + status; returns (head, status address).
    fn request(&mut self, ty: u32, sector: u64, data: Option<Buf>) -> (u16, u64);
    /// The status byte at `addr`.
    fn status(&self, addr: u64) -> u8;
}

impl Requests for Ring {
    /// Header + optional data + status; returns (head, status address).
    fn request(&mut self, ty: u32, sector: u64, data: Option<Buf>) -> (u16, u64) {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&ty.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&sector.to_le_bytes());
        let hdr = self.driver.alloc_data(&hdr);
        let status = self.driver.alloc(1, 0xff);
        let mut bufs = vec![Buf::r(hdr, 16)];
        bufs.extend(data);
        bufs.push(Buf::w(status, 1));
        (self.driver.add_chain(&bufs), status)
    }

    fn status(&self, addr: u64) -> u8 {
        self.driver.read(addr, 1)[0]
    }
}

/// What the worker thread of queue `queue` does on a kick.
fn kick(backend: &BlockBackend, ring: &Ring, queue: usize) {
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&ring.vring), queue)
        .unwrap();
}

#[test]
fn negotiation_values() {
    let s = setup(&config(1), Arc::new(FakeDisk::new(1 << 20)));
    let b = &s.backend;
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    // Exactly the in-process device's set plus the vhost-user protocol bit.
    assert_eq!(
        f,
        block::features(false, 1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    );
    let p = b.protocol_features();
    assert!(p.contains(VhostUserProtocolFeatures::MQ));
    assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
    assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
    assert!(!p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    assert_eq!(b.num_queues(), 1);
    assert_eq!(b.max_queue_size(), 128);
    assert_eq!(b.queues_per_thread(), vec![1]);

    let mut c = config(4);
    c.readonly = true;
    c.queue_size = 256;
    let s = setup(&c, Arc::new(FakeDisk::new(1 << 20)));
    let f = s.backend.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(s.backend.queues_per_thread(), vec![1, 2, 4, 8]);
    assert_eq!(s.backend.max_queue_size(), 256);
}

#[test]
fn config_space_bytes() {
    let mut c = config(2);
    c.queue_size = 256;
    let disk = Arc::new(FakeDisk::new((10 << 20) + 100).with_logical_block_size(4096));
    let s = setup(&c, disk.clone());
    let b = &s.backend;
    let expected = VirtioBlkConfig::for_disk(disk.as_ref(), 2, 256);
    assert_eq!(b.config_space(), &expected);
    let all = b.get_config(0, 60);
    assert_eq!(all, expected.as_bytes());
    // Field by field, as the driver sees them.
    assert_eq!(&all[0..8], &(10u64 << 11).to_le_bytes(), "capacity");
    assert_eq!(&all[12..16], &254u32.to_le_bytes(), "seg_max");
    assert_eq!(&all[20..24], &4096u32.to_le_bytes(), "blk_size");
    assert_eq!(&all[34..36], &2u16.to_le_bytes(), "num_queues");
    assert_eq!(
        &all[44..48],
        &8u32.to_le_bytes(),
        "discard_sector_alignment"
    );
    assert_eq!(all[56], 1, "write_zeroes_may_unmap");
    // A larger read (newer struct virtio_blk_config) is zero-filled.
    let big = b.get_config(0, 96);
    assert_eq!(big.len(), 96);
    assert_eq!(&big[..60], &all[..]);
    assert!(big[60..].iter().all(|&x| x == 0));
    // Partial reads, and Cloud Hypervisor's offset convention (0x100 = start).
    assert_eq!(b.get_config(34, 2), 2u16.to_le_bytes());
    assert_eq!(b.get_config(0x100, 60), all);
    assert_eq!(b.get_config(0x100 + 12, 4), 254u32.to_le_bytes());
    assert_eq!(b.get_config(58, 4), [0, 0, 0, 0]);
    assert_eq!(b.get_config(0xfff, 1), [0]);
    // Larger than the protocol allows: an empty (error) answer.
    assert!(b.get_config(0, 0x1001).is_empty());
    // Writes are ignored and do not fail (which would drop the connection).
    b.set_config(32, &[1]).unwrap();
    assert_eq!(b.get_config(0, 60), all);
}

#[test]
fn requests_through_handle_event() {
    let image = pattern(64 * 512);
    let disk = Arc::new(FakeDisk::with_data(image.clone()));
    let s = setup(&config(1), disk.clone());
    let mut r = ring(&s, 0x1000, false);

    // Write 1 KiB at sector 4.
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    let buf = r.driver.alloc_data(&data);
    let (w, w_status) = r.request(VIRTIO_BLK_T_OUT, 4, Some(Buf::r(buf, 1024)));
    // Flush.
    let (f, f_status) = r.request(VIRTIO_BLK_T_FLUSH, 0, None);
    // Read sectors 3..6 back.
    let rbuf = r.driver.alloc(1536, 0xee);
    let (rd, r_status) = r.request(VIRTIO_BLK_T_IN, 3, Some(Buf::w(rbuf, 1536)));
    // GET_ID.
    let id = r.driver.alloc(20, 0xee);
    let (g, g_status) = r.request(VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(id, 20)));
    // Past the end: IOERR.
    let oob = r.driver.alloc(512, 0);
    let (o, o_status) = r.request(VIRTIO_BLK_T_IN, 64, Some(Buf::w(oob, 512)));
    // Malformed: no status byte at all (only a readable header).
    let hdr = r.driver.alloc(16, 0);
    let bad = r.driver.add_chain(&[Buf::r(hdr, 16)]);

    kick(&s.backend, &r, 0);
    assert!(r.called(), "the driver must be notified");
    let used = r.driver.take_used();
    let heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    assert_eq!(
        heads,
        [w, f, rd, g, o, bad].map(u32::from).to_vec(),
        "completed in order"
    );
    assert_eq!(used[0].1, 1, "write: status byte only");
    assert_eq!(used[2].1, 1537, "read: data and status");
    assert_eq!(used[5].1, 0, "malformed: length 0");
    assert_eq!(r.status(w_status), OK);
    assert_eq!(r.status(f_status), OK);
    assert_eq!(r.status(r_status), OK);
    assert_eq!(r.status(g_status), OK);
    assert_eq!(r.status(o_status), IOERR);

    let mut expected = image.clone();
    expected[4 * 512..6 * 512].copy_from_slice(&data);
    assert_eq!(disk.contents(), expected);
    assert_eq!(r.driver.read(rbuf, 1536), &expected[3 * 512..6 * 512]);
    let mut serial = [0u8; 20];
    serial[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    assert_eq!(r.driver.read(id, 20), serial);
    assert!(disk.ops().contains(&FakeOp::Flush));

    // Nothing new: no used entries, no notification.
    kick(&s.backend, &r, 0);
    assert!(r.driver.take_used().is_empty());
    assert!(!r.called());
}

#[test]
fn read_only_device_fails_writes() {
    let image = pattern(16 * 512);
    let disk = Arc::new(FakeDisk::with_data(image.clone()));
    let mut c = config(1);
    c.readonly = true;
    let s = setup(&c, disk.clone());
    let mut r = ring(&s, 0x1000, false);
    let buf = r.driver.alloc(512, 0x55);
    let (_, w_status) = r.request(VIRTIO_BLK_T_OUT, 1, Some(Buf::r(buf, 512)));
    let seg = r.driver.alloc_data(&[0u8; 16]);
    let (_, z_status) = r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(Buf::r(seg, 16)));
    kick(&s.backend, &r, 0);
    assert_eq!(r.driver.take_used().len(), 2);
    assert_eq!(r.status(w_status), IOERR);
    assert_ne!(r.status(z_status), OK);
    assert_eq!(disk.contents(), image);
}

#[test]
fn each_queue_is_its_own_worker() {
    let disk = Arc::new(FakeDisk::with_data(pattern(32 * 512)));
    let s = setup(&config(2), disk.clone());
    let mut r0 = ring(&s, 0x1000, false);
    let mut r1 = ring(&s, 0x40000, false);
    let b0 = r0.driver.alloc(512, 0);
    let (_, s0) = r0.request(VIRTIO_BLK_T_IN, 1, Some(Buf::w(b0, 512)));
    let b1 = r1.driver.alloc(512, 0);
    let (_, s1) = r1.request(VIRTIO_BLK_T_IN, 2, Some(Buf::w(b1, 512)));
    // Worker 1's event touches only queue 1.
    kick(&s.backend, &r1, 1);
    assert!(r1.called());
    assert!(!r0.called());
    assert_eq!(r1.driver.take_used().len(), 1);
    assert!(r0.driver.take_used().is_empty());
    assert_eq!(r1.status(s1), OK);
    assert_eq!(r1.driver.read(b1, 512), &pattern(32 * 512)[1024..1536]);
    kick(&s.backend, &r0, 0);
    assert!(r0.called());
    assert_eq!(r0.status(s0), OK);
    assert_eq!(r0.driver.read(b0, 512), &pattern(32 * 512)[512..1024]);
}

#[test]
fn event_idx_suppresses_notifications() {
    let disk = Arc::new(FakeDisk::new(64 * 512));
    let s = setup(&config(1), disk);
    // The crate sets the queue flag on SET_FEATURES and tells the backend.
    s.backend.set_event_idx(true);
    assert!(s.backend.event_idx());
    let mut r = ring(&s, 0x1000, true);
    // The driver wants an interrupt only after the used index passes 2.
    r.driver.set_used_event(2);
    let (_, _) = r.request(VIRTIO_BLK_T_FLUSH, 0, None);
    kick(&s.backend, &r, 0);
    assert_eq!(r.driver.take_used().len(), 1);
    assert!(!r.called(), "used_event=2 not reached after one request");
    // The device published avail_event so that the next request kicks it.
    assert_eq!(r.driver.avail_event(), 1);
    r.request(VIRTIO_BLK_T_FLUSH, 0, None);
    r.request(VIRTIO_BLK_T_FLUSH, 0, None);
    kick(&s.backend, &r, 0);
    assert_eq!(r.driver.take_used().len(), 2);
    assert!(r.called(), "used index went past used_event");
}

#[test]
fn stopped_disabled_and_broken_rings() {
    let disk = Arc::new(FakeDisk::new(64 * 512));
    let s = setup(&config(1), disk.clone());
    let mut r = ring(&s, 0x1000, false);
    r.request(VIRTIO_BLK_T_FLUSH, 0, None);

    // Disabled (SET_VRING_ENABLE 0): the pending request stays pending.
    r.vring.set_enabled(false);
    kick(&s.backend, &r, 0);
    assert!(r.driver.take_used().is_empty());
    // Stopped (GET_VRING_BASE marks the queue not ready).
    r.vring.set_enabled(true);
    r.vring.set_queue_ready(false);
    kick(&s.backend, &r, 0);
    assert!(r.driver.take_used().is_empty());
    assert!(disk.ops().is_empty());
    // Started again: served.
    r.vring.set_queue_ready(true);
    kick(&s.backend, &r, 0);
    assert_eq!(r.driver.take_used().len(), 1);
    assert!(r.called());

    // A hostile available index (far more than a queue ahead): the queue is reported broken,
    // handle_event still succeeds (an error would end the worker thread) and nothing runs.
    r.driver.set_avail_idx(r.driver.size().wrapping_mul(100));
    for _ in 0..3 {
        kick(&s.backend, &r, 0);
    }
    assert!(r.driver.take_used().is_empty());
    assert!(!r.called());
    assert_eq!(disk.ops(), [FakeOp::Flush]);

    // Events the backend must not act on: no IN bit, or a ring index it does not have.
    s.backend
        .handle_event(0, EventSet::HANG_UP, std::slice::from_ref(&r.vring), 0)
        .unwrap();
    assert!(s
        .backend
        .handle_event(1, EventSet::IN, std::slice::from_ref(&r.vring), 0)
        .is_err());
}

#[test]
fn descriptors_outside_guest_memory() {
    let disk = Arc::new(FakeDisk::with_data(pattern(16 * 512)));
    let s = setup(&config(1), disk.clone());
    let mut r = ring(&s, 0x1000, false);
    let hdr = r.driver.alloc_data(&{
        let mut h = VIRTIO_BLK_T_IN.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 12]);
        h
    });
    let status = r.driver.alloc(1, 0xff);
    // Data buffer beyond the end of guest memory, and one wrapping around the address space.
    r.driver.add_chain(&[
        Buf::r(hdr, 16),
        Buf::w(MEM_SIZE as u64 - 256, 512),
        Buf::w(status, 1),
    ]);
    r.driver.add_chain(&[
        Buf::r(hdr, 16),
        Buf::w(u64::MAX - 8, 512),
        Buf::w(status, 1),
    ]);
    kick(&s.backend, &r, 0);
    let used = r.driver.take_used();
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|u| u.1 == 0), "malformed chains: {used:?}");
    assert!(disk.ops().is_empty());
}

#[test]
fn a_full_queue_is_drained_in_batches() {
    let disk = Arc::new(FakeDisk::new(64 * 512));
    let s = setup(&config(1), disk.clone());
    let mut r = ring_of(&s, 512, 0x1000, false);
    let n = 3 * vhost_user_block::backend::CHAINS_PER_BATCH + 5;
    let statuses: Vec<u64> = (0..n)
        .map(|_| r.request(VIRTIO_BLK_T_FLUSH, 0, None).1)
        .collect();
    // One kick: every chain is completed (the lock is released between batches, the drain
    // goes on), and the driver is notified.
    kick(&s.backend, &r, 0);
    assert_eq!(r.driver.take_used().len(), n);
    assert!(statuses.iter().all(|&st| r.status(st) == OK));
    assert!(r.called());
    assert_eq!(disk.ops().len(), n);
}
