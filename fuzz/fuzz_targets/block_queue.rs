//! virtio-blk requests: descriptor chains of a request queue parsed and executed by the
//! `block` crate (`Request::parse`, `Request::execute`, `process_queue_bounded`) on an in-memory
//! disk, as the in-process device and `vhost_user_block` run them.
//!
//! Input: a [`QueueInput`] (flags bit 1: read-only disk; bit 2: drain with
//! `process_queue_bounded` instead of request by request; budget: chains per call).
//!
//! Checks, per request: the payload length never exceeds the bytes its descriptors hold, the
//! used length never exceeds the device-writable bytes, and the status byte in guest memory is
//! the one reported; the disk is only touched inside its size, and not written when read-only.
#![no_main]

use block::{process_queue_bounded, BlockConfig, FakeDisk, FakeOp, Request, RequestType};
use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::{chain_lengths, QueueInput};
use vm_memory::Bytes;

const DISK_SIZE: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let input = QueueInput::new(data);
    let read_only = input.flags & 2 != 0;
    let disk = if read_only {
        FakeDisk::new(DISK_SIZE).make_read_only()
    } else {
        FakeDisk::new(DISK_SIZE)
    };
    let cfg = BlockConfig::new(false, "fuzz-disk");
    let mem = &input.mem;
    let mut queue = input.queue();
    let budget = usize::from(input.budget).max(1);
    if input.flags & 4 != 0 {
        let _ = process_queue_bounded(&mut queue, mem, &disk, &cfg, budget);
    } else {
        let _ = virtio_chain::queue::drain(&mut queue, mem, budget, |mut chain| {
            let (readable, writable) = chain_lengths(&chain);
            let Ok(request) = Request::parse(&mut chain) else {
                return 0;
            };
            match request.request_type() {
                RequestType::In | RequestType::GetId => assert!(request.data_len() < writable),
                RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                    assert!(request.data_len() + 16 <= readable)
                }
                _ => assert_eq!(request.data_len(), 0),
            }
            let Ok(done) = request.execute(mem, &disk, &cfg) else {
                return 0;
            };
            assert!(
                u64::from(done.used_len) <= writable,
                "used length past the buffers"
            );
            assert!(done.used_len >= 1, "the status byte is always written");
            let mut status = [0u8];
            mem.read_slice(&mut status, request.status_addr())
                .expect("status byte readable");
            assert_eq!(status[0], done.status as u8, "status byte in memory");
            done.used_len
        });
    }
    assert_eq!(disk.contents().len(), DISK_SIZE, "the disk changed size");
    for op in disk.ops() {
        match op {
            FakeOp::Read(o, l)
            | FakeOp::Write(o, l)
            | FakeOp::Discard(o, l)
            | FakeOp::WriteZeroes(o, l, _) => {
                assert!(
                    o.checked_add(l).is_some_and(|e| e <= DISK_SIZE as u64),
                    "{op:?} outside the disk"
                );
            }
            FakeOp::Flush => {}
            FakeOp::Resize(_) => panic!("a request resized the disk"),
        }
        if read_only {
            assert!(
                matches!(op, FakeOp::Read(..) | FakeOp::Flush),
                "{op:?} on a read-only disk"
            );
        }
    }
});
