//! virtio-console: the console's queue handler (`virtio_devices::console::queue_handler`, what
//! its worker runs) taking the guest's output from the transmit queue and delivering input into
//! the receive queue.
//!
//! Input: a [`QueueInput`] for the transmit queue (queue 1), then `[len: u16]` and that many
//! input bytes, then a second [`QueueInput`] image for the receive queue (queue 0). Byte 3 of
//! the header: rounds of (input pushed, receive queue kicked, transmit queue kicked).
//!
//! Checks: queue errors are the only failures; the output never exceeds 64 KiB per chain
//! the transmit queue holds; the input buffer keeps its bound.
#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::QueueInput;
use virtio_devices::console::ConsoleInput;
use virtio_devices::worker::QueueHandler;
use virtio_devices::{ActiveQueue, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<usize>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        *nimbus_fuzz::lock(&self.0) += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn active(index: u16, input: &QueueInput) -> ActiveQueue {
    ActiveQueue {
        index,
        queue: input.queue(),
        kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut tx_input = QueueInput::new(data);
    let typed = tx_input.rest.piece().to_vec();
    let rx_input = QueueInput::new(tx_input.rest.rest());
    let sink = Sink::default();
    let console_in = ConsoleInput::new().expect("console input");
    let mut handler =
        virtio_devices::console::queue_handler(Box::new(sink.clone()), Some(console_in.clone()));
    // Each queue in its own guest memory: the handler gets the memory with each call.
    let tx_mem = GuestMemoryAtomic::new(tx_input.mem.clone());
    let rx_mem = GuestMemoryAtomic::new(rx_input.mem.clone());
    let mut tx = active(1, &tx_input);
    let mut rx = [active(0, &rx_input)];
    let rounds = 1 + usize::from(tx_input.extra % 4);
    let chunk = typed.len().div_ceil(rounds).max(1);
    let mut pieces = typed.chunks(chunk);
    for _ in 0..rounds {
        if let Some(p) = pieces.next() {
            console_in.push(p);
        }
        if handler.on_extra(&mut rx, &rx_mem).is_err() {
            break;
        }
        if handler.process(&mut rx[0], &rx_mem).is_err() {
            break;
        }
        if handler.process(&mut tx, &tx_mem).is_err() {
            break;
        }
    }
    let out = *nimbus_fuzz::lock(&sink.0);
    assert!(
        out as u64 <= 64 * 1024 * u64::from(u16::MAX),
        "{out} bytes of output"
    );
});
