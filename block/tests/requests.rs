//! virtio-blk request processing over real descriptor chains in guest memory.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

mod common;

use block::{
    process_chain, process_queue, process_queue_bounded, BlkStatus, BlockConfig, ChainError,
    DiskBackend, FakeDisk, FakeOp, QueueError, Request, RequestError, RequestType,
};
use common::{memory, pattern, Buf, Driver, QSIZE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::{QueueOwnedT, QueueT};

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

fn cfg() -> BlockConfig {
    BlockConfig::new(false, "nimbus-serial-0123456789")
}

/// Runs the queue once and returns the single used entry's length.
fn run_one(d: &mut Driver, disk: &dyn DiskBackend, cfg: &BlockConfig, head: u16) -> u32 {
    let outcome = process_queue(&mut d.queue, d.mem, disk, cfg).unwrap();
    assert_eq!(outcome.completed, 1);
    let used = d.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, u32::from(head));
    used[0].1
}

/// A header + data + status chain; returns (head, data address, status address).
fn simple(d: &mut Driver, ty: u32, sector: u64, data: Option<Buf>) -> (u16, u64, u64) {
    let hdr = d.header(ty, sector);
    let status = d.alloc(1, 0xff);
    let mut bufs = vec![Buf::r(hdr, 16)];
    let data_addr = data.map(|b| b.addr).unwrap_or(0);
    bufs.extend(data);
    bufs.push(Buf::w(status, 1));
    (d.add_chain(&bufs), data_addr, status)
}

#[test]
fn read_returns_disk_data() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let image = pattern(64);
    let disk = FakeDisk::with_data(image.clone());
    let buf = d.alloc(1024, 0xee);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_IN, 2, Some(Buf::w(buf, 1024)));
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1025);
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.read(buf, 1024), &image[1024..2048]);
}

#[test]
fn write_lands_on_disk() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(64 * 512);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let buf = d.alloc_data(&data);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_OUT, 3, Some(Buf::r(buf, 1024)));
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
    assert_eq!(d.byte(status), OK);
    let content = disk.contents();
    assert_eq!(&content[3 * 512..5 * 512], &data[..]);
    assert!(content[..3 * 512].iter().all(|&b| b == 0));
    assert!(content[5 * 512..].iter().all(|&b| b == 0));
}

#[test]
fn flush_reaches_disk() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(4096);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
    assert_eq!(d.byte(status), OK);
    assert_eq!(disk.ops(), vec![FakeOp::Flush]);

    // A failing flush is an I/O error.
    disk.fail_next(1);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
    assert_eq!(d.byte(status), IOERR);
}

#[test]
fn get_id_returns_serial() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(4096);
    let buf = d.alloc(20, 0xee);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(buf, 20)));
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 21);
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.read(buf, 20), b"nimbus-serial-012345");

    // Short serials are NUL-padded; a buffer shorter than 20 bytes gets what fits.
    let short = BlockConfig::new(false, "abc");
    let buf = d.alloc(20, 0xee);
    let (head, _, _) = simple(&mut d, VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(buf, 20)));
    assert_eq!(run_one(&mut d, &disk, &short, head), 21);
    assert_eq!(d.read(buf, 5), b"abc\0\0");
    let buf = d.alloc(8, 0xee);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(buf, 4)));
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 5);
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.read(buf, 8), b"nimb\xee\xee\xee\xee");
}

/// `struct virtio_blk_discard_write_zeroes` segments.
fn segments(segs: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(sector, num, flags) in segs {
        v.extend_from_slice(&sector.to_le_bytes());
        v.extend_from_slice(&num.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
    }
    v
}

/// Sends a discard or write-zeroes with `segs`; returns the status.
fn discard_like(d: &mut Driver, disk: &dyn DiskBackend, ty: u32, segs: &[(u64, u32, u32)]) -> u8 {
    let raw = segments(segs);
    let buf = d.alloc_data(&raw);
    let (head, _, status) = simple(d, ty, 0, Some(Buf::r(buf, raw.len() as u32)));
    assert_eq!(run_one(d, disk, &cfg(), head), 1);
    d.byte(status)
}

#[test]
fn discard_and_write_zeroes() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::with_data(vec![0xaa; 64 * 512]);
    let st = discard_like(
        &mut d,
        &disk,
        VIRTIO_BLK_T_DISCARD,
        &[(2, 2, 0), (10, 1, 0)],
    );
    assert_eq!(st, OK);
    let st = discard_like(
        &mut d,
        &disk,
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[(20, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (30, 1, 0)],
    );
    assert_eq!(st, OK);
    assert_eq!(
        disk.ops(),
        vec![
            FakeOp::Discard(1024, 1024),
            FakeOp::Discard(5120, 512),
            FakeOp::WriteZeroes(10240, 2048, true),
            FakeOp::WriteZeroes(15360, 512, false),
        ]
    );
    let c = disk.contents();
    assert_eq!(c[1023], 0xaa);
    assert!(c[1024..2048].iter().all(|&b| b == 0));
    assert_eq!(c[2048], 0xaa);
    assert!(c[10240..12288].iter().all(|&b| b == 0));
}

#[test]
fn discard_and_write_zeroes_validation() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(64 * 512);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // Unknown flags, and UNMAP on a discard: unsupported.
    assert_eq!(
        discard_like(&mut d, &disk, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]),
        UNSUPP
    );
    assert_eq!(
        discard_like(&mut d, &disk, VIRTIO_BLK_T_DISCARD, &[(0, 1, unmap)]),
        UNSUPP
    );
    // Out of range, overflowing, too long, too many segments: I/O error.
    assert_eq!(
        discard_like(&mut d, &disk, VIRTIO_BLK_T_DISCARD, &[(63, 2, 0)]),
        IOERR
    );
    assert_eq!(
        discard_like(&mut d, &disk, VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)]),
        IOERR
    );
    assert_eq!(
        discard_like(
            &mut d,
            &disk,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, u32::MAX, 0)]
        ),
        IOERR
    );
    let many: Vec<_> = (0..33).map(|i| (i, 1, 0)).collect();
    assert_eq!(
        discard_like(&mut d, &disk, VIRTIO_BLK_T_DISCARD, &many),
        IOERR
    );
    // A valid segment followed by a bad one: nothing is done.
    assert_eq!(
        discard_like(
            &mut d,
            &disk,
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, 0), (64, 1, 0)]
        ),
        IOERR
    );
    // No segment, or a partial one.
    assert_eq!(
        discard_like(&mut d, &disk, VIRTIO_BLK_T_DISCARD, &[]),
        IOERR
    );
    let buf = d.alloc(24, 0);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_DISCARD, 0, Some(Buf::r(buf, 24)));
    run_one(&mut d, &disk, &cfg(), head);
    assert_eq!(d.byte(status), IOERR);
    assert!(disk.ops().is_empty(), "{:?}", disk.ops());
}

#[test]
fn out_of_range_is_ioerr() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(64 * 512);
    let buf = d.alloc(1024, 0);
    for (ty, sector, data) in [
        (VIRTIO_BLK_T_IN, 64, Buf::w(buf, 512)),
        (VIRTIO_BLK_T_IN, 63, Buf::w(buf, 1024)),
        (VIRTIO_BLK_T_IN, u64::MAX, Buf::w(buf, 512)),
        (VIRTIO_BLK_T_IN, u64::MAX / 512, Buf::w(buf, 1024)),
        (VIRTIO_BLK_T_OUT, 64, Buf::r(buf, 512)),
        (VIRTIO_BLK_T_OUT, 1 << 55, Buf::r(buf, 512)),
    ] {
        let (head, _, status) = simple(&mut d, ty, sector, Some(data));
        assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1, "sector {sector}");
        assert_eq!(d.byte(status), IOERR, "sector {sector}");
    }
    assert!(disk.ops().is_empty());
}

#[test]
fn read_only_refuses_writes() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let ro_cfg = BlockConfig::new(true, "ro");
    let disk = FakeDisk::with_data(vec![5; 8 * 512]);
    let ro_disk = FakeDisk::with_data(vec![5; 8 * 512]).make_read_only();
    for (disk, config) in [(&disk, ro_cfg.clone()), (&ro_disk, cfg())] {
        let buf = d.alloc(512, 9);
        let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_OUT, 0, Some(Buf::r(buf, 512)));
        run_one(&mut d, disk, &config, head);
        assert_eq!(d.byte(status), IOERR);
        let seg = segments(&[(0, 1, 0)]);
        for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let sbuf = d.alloc_data(&seg);
            let (head, _, status) = simple(&mut d, ty, 0, Some(Buf::r(sbuf, 16)));
            run_one(&mut d, disk, &config, head);
            assert_eq!(d.byte(status), IOERR);
        }
        assert!(disk.contents().iter().all(|&b| b == 5));
        // Reads still work.
        let rbuf = d.alloc(512, 0);
        let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_IN, 0, Some(Buf::w(rbuf, 512)));
        assert_eq!(run_one(&mut d, disk, &config, head), 513);
        assert_eq!(d.byte(status), OK);
    }
}

#[test]
fn data_not_whole_sectors_is_ioerr() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    let buf = d.alloc(1024, 0x77);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_IN, 0, Some(Buf::w(buf, 700)));
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
    assert_eq!(d.byte(status), IOERR);
    assert!(
        d.read(buf, 1024).iter().all(|&b| b == 0x77),
        "guest buffer untouched"
    );
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_OUT, 0, Some(Buf::r(buf, 513)));
    run_one(&mut d, &disk, &cfg(), head);
    assert_eq!(d.byte(status), IOERR);
    assert!(disk.ops().is_empty());
}

#[test]
fn unknown_type_is_unsupported() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    for ty in [2, 3, 14, 0xdead_beef] {
        let (head, _, status) = simple(&mut d, ty, 0, None);
        assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
        assert_eq!(d.byte(status), UNSUPP, "type {ty}");
    }
}

#[test]
fn disk_errors_are_ioerr() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    disk.fail_next(1);
    let buf = d.alloc(512, 0x77);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_IN, 0, Some(Buf::w(buf, 512)));
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
    assert_eq!(d.byte(status), IOERR);
    disk.fail_next(1);
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_OUT, 0, Some(Buf::r(buf, 512)));
    run_one(&mut d, &disk, &cfg(), head);
    assert_eq!(d.byte(status), IOERR);
    // The next request works again.
    let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_OUT, 0, Some(Buf::r(buf, 512)));
    run_one(&mut d, &disk, &cfg(), head);
    assert_eq!(d.byte(status), OK);
}

/// Runs one malformed chain and returns the reported error.
fn malformed(d: &mut Driver, disk: &dyn DiskBackend, head: u16) -> RequestError {
    let outcome = process_queue(&mut d.queue, d.mem, disk, &cfg()).unwrap();
    assert_eq!(outcome.completed, 1);
    assert_eq!(outcome.malformed, 1);
    assert_eq!(d.take_used(), vec![(u32::from(head), 0)]);
    let m = outcome.first_malformed.unwrap();
    assert_eq!(m.head, head);
    m.error
}

#[test]
fn missing_or_readonly_status_is_malformed() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    // Header and data only, all device-readable.
    let hdr = d.header(VIRTIO_BLK_T_OUT, 0);
    let data = d.alloc(512, 1);
    let head = d.add_chain(&[Buf::r(hdr, 16), Buf::r(data, 512)]);
    assert!(matches!(
        malformed(&mut d, &disk, head),
        RequestError::NoStatus
    ));
    // Status descriptor device-readable, after a writable one.
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let status = d.alloc(1, 0xff);
    let head = d.add_chain(&[Buf::r(hdr, 16), Buf::w(data, 512), Buf::r(status, 1)]);
    assert!(matches!(
        malformed(&mut d, &disk, head),
        RequestError::Chain(ChainError::ReadableAfterWritable { index: 2 })
    ));
    assert_eq!(d.byte(status), 0xff);
    assert!(disk.ops().is_empty());
}

#[test]
fn header_too_short_is_malformed() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    let hdr = d.header(VIRTIO_BLK_T_FLUSH, 0);
    let status = d.alloc(1, 0xff);
    let head = d.add_chain(&[Buf::r(hdr, 12), Buf::w(status, 1)]);
    assert!(matches!(
        malformed(&mut d, &disk, head),
        RequestError::HeaderTooShort { len: 12 }
    ));
    assert_eq!(d.byte(status), 0xff, "status untouched");
}

#[test]
fn descriptor_outside_memory_is_malformed() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let status = d.alloc(1, 0xff);
    for (addr, len) in [
        (common::MEM_SIZE - 256, 512),
        (0x4000_0000, 512),
        (u64::MAX - 100, 512),
        (0x1000, 0x8000_0000),
    ] {
        let head = d.add_chain(&[Buf::r(hdr, 16), Buf::w(addr, len), Buf::w(status, 1)]);
        assert!(matches!(
            malformed(&mut d, &disk, head),
            RequestError::Chain(ChainError::OutsideMemory { index: 1, .. })
        ));
    }
    // The status descriptor itself outside memory.
    let head = d.add_chain(&[Buf::r(hdr, 16), Buf::w(u64::MAX, 1)]);
    assert!(matches!(
        malformed(&mut d, &disk, head),
        RequestError::Chain(ChainError::OutsideMemory { index: 1, .. })
    ));
    assert_eq!(d.byte(status), 0xff);
    assert!(disk.ops().is_empty());
}

#[test]
fn looping_chain_terminates() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    let hdr = d.header(VIRTIO_BLK_T_IN, 0);
    let buf = d.alloc(512, 0);
    // 0 -> 1 -> 0 -> ...
    d.store_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1);
    d.store_desc(1, buf, 512, VRING_DESC_F_NEXT, 0);
    d.push_avail(0);
    assert!(matches!(
        malformed(&mut d, &disk, 0),
        RequestError::Chain(ChainError::Truncated { descriptors }) if descriptors == usize::from(QSIZE)
    ));
    // A `next` index past the table.
    d.store_desc(2, hdr, 16, VRING_DESC_F_NEXT, 200);
    d.push_avail(2);
    assert!(matches!(
        malformed(&mut d, &disk, 2),
        RequestError::Chain(ChainError::Truncated { descriptors: 1 })
    ));
    assert!(disk.ops().is_empty());
}

#[test]
fn header_split_across_descriptors() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let image = pattern(16);
    let disk = FakeDisk::with_data(image.clone());
    for split in [1u64, 3, 8, 15] {
        let hdr = d.header(VIRTIO_BLK_T_IN, 5);
        let buf = d.alloc(512, 0);
        let status = d.alloc(1, 0xff);
        let head = d.add_chain(&[
            Buf::r(hdr, split as u32),
            Buf::r(hdr + split, 16 - split as u32),
            Buf::w(buf, 512),
            Buf::w(status, 1),
        ]);
        assert_eq!(run_one(&mut d, &disk, &cfg(), head), 513);
        assert_eq!(d.byte(status), OK);
        assert_eq!(d.read(buf, 512), &image[5 * 512..6 * 512]);
    }
}

#[test]
fn any_layout_and_zero_length_descriptors() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::with_data(pattern(16));

    // OUT: header and data in one readable descriptor.
    let mut out = Vec::new();
    out.extend_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&7u64.to_le_bytes());
    out.extend_from_slice(&[0x42; 512]);
    let req = d.alloc_data(&out);
    let status = d.alloc(1, 0xff);
    let head = d.add_chain(&[Buf::r(req, 528), Buf::r(0, 0), Buf::w(status, 1)]);
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1);
    assert_eq!(d.byte(status), OK);
    assert!(disk.contents()[7 * 512..8 * 512].iter().all(|&b| b == 0x42));

    // IN: data and status in one writable descriptor, split data, zero-length descriptors.
    let hdr = d.header(VIRTIO_BLK_T_IN, 7);
    let a = d.alloc(100, 0);
    let b = d.alloc(413, 0xff);
    let head = d.add_chain(&[
        Buf::r(hdr, 16),
        Buf::w(a, 0),
        Buf::w(a, 100),
        Buf::w(b, 413),
        Buf::w(0, 0),
    ]);
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 513);
    assert!(d.read(a, 100).iter().all(|&x| x == 0x42));
    assert!(d.read(b, 412).iter().all(|&x| x == 0x42));
    assert_eq!(d.byte(b + 412), OK);
}

#[test]
fn indirect_chain() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let image = pattern(16);
    let disk = FakeDisk::with_data(image.clone());
    let hdr = d.header(VIRTIO_BLK_T_IN, 1);
    let a = d.alloc(512, 0);
    let b = d.alloc(512, 0);
    let status = d.alloc(1, 0xff);
    let head = d.add_indirect_chain(&[
        Buf::r(hdr, 16),
        Buf::w(a, 512),
        Buf::w(b, 512),
        Buf::w(status, 1),
    ]);
    assert_eq!(run_one(&mut d, &disk, &cfg(), head), 1025);
    assert_eq!(d.byte(status), OK);
    assert_eq!(d.read(a, 512), &image[512..1024]);
    assert_eq!(d.read(b, 512), &image[1024..1536]);
}

#[test]
fn many_requests_wrap_the_rings() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let image = pattern(64);
    let disk = FakeDisk::with_data(image.clone());
    let mut total = 0;
    for round in 0..6u64 {
        let mut expected = Vec::new();
        for i in 0..5u64 {
            let sector = (round * 5 + i) % 64;
            let buf = d.alloc(512, 0);
            let (head, _, status) = simple(&mut d, VIRTIO_BLK_T_IN, sector, Some(Buf::w(buf, 512)));
            expected.push((head, buf, status, sector));
        }
        let outcome = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap();
        assert_eq!(outcome.completed, 5);
        assert!(!outcome.more_pending);
        let used = d.take_used();
        assert_eq!(used.len(), 5);
        for ((head, buf, status, sector), (id, len)) in expected.into_iter().zip(used) {
            assert_eq!(id, u32::from(head));
            assert_eq!(len, 513);
            assert_eq!(d.byte(status), OK);
            let s = sector as usize * 512;
            assert_eq!(d.read(buf, 512), &image[s..s + 512]);
        }
        total += 5;
    }
    assert_eq!(total, 30);
    assert_eq!(d.queue.next_used(), 30);
}

#[test]
fn event_idx_suppresses_notifications() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.queue.set_event_idx(true);
    let disk = FakeDisk::new(8 * 512);
    // The driver wants an interrupt once used idx passes 2 (i.e. after the third completion).
    d.set_used_event(2);
    let mut notified = Vec::new();
    for _ in 0..4 {
        let (_head, _, _) = simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
        let outcome = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap();
        assert_eq!(outcome.completed, 1);
        notified.push(outcome.needs_notification);
        // The device publishes where it wants the next kick.
        assert_eq!(d.avail_event(), d.queue.next_avail());
    }
    assert_eq!(notified, vec![false, false, true, false]);

    // Nothing processed: never a notification.
    let outcome = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap();
    assert_eq!(outcome.completed, 0);
    assert!(!outcome.needs_notification);

    // A batch crossing used_event notifies once.
    d.set_used_event(5);
    for _ in 0..3 {
        simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    }
    let outcome = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap();
    assert_eq!(outcome.completed, 3);
    assert!(outcome.needs_notification);
}

#[test]
fn without_event_idx_every_batch_notifies() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    let outcome = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap();
    assert_eq!(outcome.completed, 2);
    assert!(outcome.needs_notification);
    // Driver notifications are enabled again when the queue is drained.
    assert_eq!(d.used_flags() & VRING_USED_F_NO_NOTIFY as u16, 0);
    let outcome = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap();
    assert_eq!(outcome.completed, 0);
    assert!(!outcome.needs_notification);
}

#[test]
fn invalid_avail_index_is_an_error() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    d.set_avail_idx(QSIZE + 1);
    let err = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap_err();
    assert!(matches!(err, QueueError::AvailRing(_)), "{err:?}");
    assert!(d.take_used().is_empty());
}

#[test]
fn head_index_out_of_range_is_an_error() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    d.push_avail(QSIZE + 3);
    let err = process_queue(&mut d.queue, &mem, &disk, &cfg()).unwrap_err();
    assert!(
        matches!(err, QueueError::AddUsed { head, .. } if head == QSIZE + 3),
        "{err:?}"
    );
}

#[test]
fn queue_not_ready_is_an_error() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    d.queue.set_ready(false);
    let disk = FakeDisk::new(8 * 512);
    assert!(process_queue(&mut d.queue, &mem, &disk, &cfg()).is_err());
}

#[test]
fn parse_and_process_chain_directly() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::with_data(pattern(8));
    let buf = d.alloc(1024, 0);
    simple(&mut d, VIRTIO_BLK_T_IN, 4, Some(Buf::w(buf, 1024)));
    simple(&mut d, VIRTIO_BLK_T_IN, 6, Some(Buf::w(buf, 1024)));

    let mut chain = d.queue.iter(&mem).unwrap().next().unwrap();
    let request = Request::parse(&mut chain).unwrap();
    assert_eq!(request.request_type(), RequestType::In);
    assert_eq!(request.sector(), 4);
    assert_eq!(request.data_len(), 1024);
    let done = request.execute(&mem, &disk, &cfg()).unwrap();
    assert_eq!(done.status, BlkStatus::Ok);
    assert_eq!(done.used_len, 1025);

    let chain = d.queue.iter(&mem).unwrap().next().unwrap();
    let done = process_chain(chain, &disk, &cfg()).unwrap();
    // Sectors 6 and 7 exist; 8 does not.
    assert_eq!(done.status, BlkStatus::Ok);
}

#[test]
fn bounded_processing_reports_pending_chains() {
    let mem = memory();
    let mut d = Driver::new(&mem);
    let disk = FakeDisk::new(8 * 512);
    for _ in 0..5 {
        simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    }
    let mut runs = Vec::new();
    for _ in 0..3 {
        let o = process_queue_bounded(&mut d.queue, &mem, &disk, &cfg(), 2).unwrap();
        assert!(o.needs_notification);
        runs.push((o.completed, o.more_pending));
    }
    assert_eq!(runs, vec![(2, true), (2, true), (1, false)]);
    assert_eq!(d.take_used().len(), 5);
    // Exactly at the budget with nothing left: nothing pending.
    simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    simple(&mut d, VIRTIO_BLK_T_FLUSH, 0, None);
    let o = process_queue_bounded(&mut d.queue, &mem, &disk, &cfg(), 2).unwrap();
    assert_eq!((o.completed, o.more_pending), (2, false));
    assert_eq!(d.used_flags() & VRING_USED_F_NO_NOTIFY as u16, 0);
}
