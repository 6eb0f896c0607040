//! virtio-console, single port without MULTIPORT: what the driver puts on port 0's transmit
//! queue (queue 1) goes to the configured output; bytes pushed into the [`ConsoleInput`] fill the
//! receive queue (queue 0), waiting there while the driver has no buffers posted.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use virtio_chain::queue::{drain, QueueDrain};
use virtio_chain::QueueError;
use vm_memory::{Bytes, GuestAddressSpace};

use crate::pause::PauseError;
use crate::worker::{QueueHandler, WorkerSlot};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 128;
const RECEIVE_QUEUE: u16 = 0;
const TRANSMIT_QUEUE: u16 = 1;
/// Input bytes held for the guest at most; a producer waits when the buffer is full.
const INPUT_CAPACITY: usize = 4096;

/// Input for the guest: an input thread pushes bytes, the console's worker delivers them.
#[derive(Debug)]
pub struct ConsoleInput {
    pending: Mutex<VecDeque<u8>>,
    ready: EventFd,
}

impl ConsoleInput {
    /// An empty input buffer.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            pending: Mutex::new(VecDeque::new()),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Queues as many of `bytes` as fit and wakes the device; returns how many were taken.
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let n = bytes.len().min(INPUT_CAPACITY - pending.len());
        pending.extend(&bytes[..n]);
        drop(pending);
        if n > 0 {
            let _ = self.ready.write(1);
        }
        n
    }
}
/// Bytes taken from one transmit chain at most (the rest is dropped and logged).
const MAX_CHAIN_BYTES: u32 = 64 * 1024;

/// The console device.
pub struct Console {
    /// Shared with the worker, so it survives device resets.
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Option<Arc<ConsoleInput>>,
    name: String,
    worker: WorkerSlot,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing the guest's output to `out` and, if given, feeding it `input`; its
    /// thread is called `name`.
    pub fn new(out: Box<dyn Write + Send>, input: Option<Arc<ConsoleInput>>, name: String) -> Self {
        Self {
            out: Arc::new(Mutex::new(out)),
            input,
            name,
            worker: WorkerSlot::default(),
        }
    }
}

struct ConsoleQueues {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Option<Arc<ConsoleInput>>,
}

/// The queue logic of [`Console`] without its worker thread: what the worker runs when the
/// driver kicks queue 0 (receive) or 1 (transmit), or `input` has bytes (`on_extra`); the
/// guest's output goes to `out`. For harnesses that drive the queues directly (the fuzz targets
/// in `fuzz/`).
pub fn queue_handler(
    out: Box<dyn Write + Send>,
    input: Option<Arc<ConsoleInput>>,
) -> impl QueueHandler<Error = QueueError> {
    ConsoleQueues {
        out: Arc::new(Mutex::new(out)),
        input,
    }
}

impl ConsoleQueues {
    /// Moves pending input into the receive queue's buffers.
    fn deliver_input(
        &self,
        q: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, QueueError> {
        let Some(input) = &self.input else {
            return Ok(false);
        };
        let mem = mem.memory();
        let mut pending = input.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut drain = QueueDrain::new(&mut q.queue, &*mem, usize::MAX);
        while !pending.is_empty() {
            let Some(chain) = drain.next_chain()? else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.filter(|d| d.is_write_only()) {
                let n = (desc.len() as usize).min(pending.len());
                let bytes: Vec<u8> = pending.iter().take(n).copied().collect();
                if n == 0 || mem.write_slice(&bytes, desc.addr()).is_err() {
                    continue;
                }
                pending.drain(..n);
                written += n as u32;
            }
            drain.complete(head, written)?;
        }
        Ok(drain.finish()?.needs_notification)
    }
}

impl QueueHandler for ConsoleQueues {
    type Error = QueueError;

    fn extra_fd(&self) -> Option<std::os::fd::RawFd> {
        self.input.as_ref().map(|i| i.ready.as_raw_fd())
    }

    fn on_extra(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &GuestMemoryAtomic,
    ) -> Result<Vec<u16>, QueueError> {
        if let Some(input) = &self.input {
            let _ = input.ready.read();
        }
        let Some(rx) = queues.iter_mut().find(|q| q.index == RECEIVE_QUEUE) else {
            return Ok(Vec::new());
        };
        Ok(if self.deliver_input(rx, mem)? {
            vec![RECEIVE_QUEUE]
        } else {
            Vec::new()
        })
    }

    fn process(
        &mut self,
        q: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, QueueError> {
        if q.index == RECEIVE_QUEUE {
            return self.deliver_input(q, mem);
        }
        if q.index != TRANSMIT_QUEUE {
            return Ok(false);
        }
        let mem = mem.memory();
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let drained = drain(&mut q.queue, &*mem, usize::MAX, |chain| {
            let mut taken = 0u32;
            for desc in chain {
                if desc.is_write_only() || taken >= MAX_CHAIN_BYTES {
                    continue;
                }
                let len = desc.len().min(MAX_CHAIN_BYTES - taken);
                let mut buf = vec![0u8; len as usize];
                if mem.read_slice(&mut buf, desc.addr()).is_ok() {
                    taken += len;
                    if let Err(e) = out.write_all(&buf) {
                        log::warn!("console output failed: {e}");
                    }
                }
            }
            let _ = out.flush();
            0
        })?;
        Ok(drained.needs_notification)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none of their features is offered.
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let handler = ConsoleQueues {
            out: self.out.clone(),
            input: self.input.clone(),
        };
        self.worker.start(&self.name, handler, a)?;
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.pause()
    }

    fn resume(&mut self) {
        self.worker.resume();
    }
}

#[cfg(test)]
mod tests {
    use net_util::testing::{Buf, TestDriver};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn active(driver: &TestDriver, index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: driver.queue(false),
            kick: EventFd::new(0).expect("eventfd"),
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn input_waits_for_buffers_and_output_reaches_the_sink() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let input = ConsoleInput::new().expect("input");
        let sink = Sink::default();
        let mut handler = ConsoleQueues {
            out: Arc::new(Mutex::new(Box::new(sink.clone()))),
            input: Some(input.clone()),
        };
        let mut rx_driver = TestDriver::new(&mem, 8, 0x1_0000, 0x1_0000);
        let mut tx_driver = TestDriver::new(&mem, 8, 0x2_0000, 0x1_0000);
        let mut queues = vec![
            active(&rx_driver, RECEIVE_QUEUE),
            active(&tx_driver, TRANSMIT_QUEUE),
        ];

        // Input with no receive buffer waits in the device.
        assert_eq!(input.push(b"hello"), 5);
        assert_eq!(
            handler.on_extra(&mut queues, &atomic).expect("extra"),
            Vec::<u16>::new()
        );
        // The driver posts a 3-byte and a 16-byte buffer and kicks: the bytes are split over them.
        let a = rx_driver.alloc(3, 0);
        let b = rx_driver.alloc(16, 0);
        rx_driver.add_chain(&[Buf::w(a, 3)]);
        rx_driver.add_chain(&[Buf::w(b, 16)]);
        assert!(handler.process(&mut queues[0], &atomic).expect("rx"));
        let used = rx_driver.take_used();
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(rx_driver.read(a, 3), b"hel");
        assert_eq!(rx_driver.read(b, 2), b"lo");

        // Output: a transmit chain goes to the sink; device-writable parts are ignored.
        let t = tx_driver.alloc_data(b"guest says hi\n");
        let junk = tx_driver.alloc(8, 0);
        tx_driver.add_chain(&[Buf::r(t, 14), Buf::w(junk, 8)]);
        assert!(handler.process(&mut queues[1], &atomic).expect("tx"));
        assert_eq!(
            sink.0.lock().map(|v| v.clone()).unwrap_or_default(),
            b"guest says hi\n"
        );
    }

    #[test]
    fn input_is_bounded() {
        let input = ConsoleInput::new().expect("input");
        assert_eq!(input.push(&vec![b'x'; INPUT_CAPACITY + 10]), INPUT_CAPACITY);
        assert_eq!(input.push(b"y"), 0);
    }
}
