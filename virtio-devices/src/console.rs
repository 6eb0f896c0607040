//! virtio-console, single port without MULTIPORT: what the driver puts on port 0's transmit
//! queue (queue 1) goes to the configured output. Input (receive queue 0) is not served yet:
//! its buffers stay with the device until input support arrives.

use std::io::Write;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace};

use crate::worker::{QueueHandler, Worker};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 128;
const TRANSMIT_QUEUE: u16 = 1;
/// Bytes taken from one transmit chain at most (the rest is dropped and logged).
const MAX_CHAIN_BYTES: u32 = 64 * 1024;

/// The console device.
pub struct Console {
    /// Shared with the worker, so it survives device resets.
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    name: String,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing the guest's output to `out`; its thread is called `name`.
    pub fn new(out: Box<dyn Write + Send>, name: String) -> Self {
        Self {
            out: Arc::new(Mutex::new(out)),
            name,
            worker: None,
        }
    }
}

struct ConsoleQueues {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl QueueHandler for ConsoleQueues {
    fn process(&mut self, q: &mut ActiveQueue, mem: &GuestMemoryAtomic) -> Result<bool, String> {
        if q.index != TRANSMIT_QUEUE {
            return Ok(false);
        }
        let mem = mem.memory();
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let mut used_any = false;
        while let Some(chain) = q.queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
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
            q.queue
                .add_used(&*mem, head, 0)
                .map_err(|e| format!("used ring: {e}"))?;
            used_any = true;
        }
        if !used_any {
            return Ok(false);
        }
        q.queue
            .needs_notification(&*mem)
            .map_err(|e| format!("used ring: {e}"))
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
        };
        self.worker = Some(Worker::start(&self.name, Box::new(handler), a)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
}
