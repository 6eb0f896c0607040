//! virtio-rng: fills the driver's buffers from an entropy source (`/dev/urandom` by default).

use std::fs::File;
use std::io::Read;

use nimbus_log::error_chain;
use virtio_chain::queue::QueueDrain;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};

use crate::pause::PauseError;
use crate::worker::{QueueHandler, Worker};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Bytes served per descriptor chain at most, so one huge buffer cannot stall the thread.
const MAX_BYTES_PER_CHAIN: u32 = 64 * 1024;
const QUEUE_SIZE: u16 = 256;

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    source: Option<File>,
    name: String,
    worker: Option<Worker>,
}

impl Rng {
    /// A device reading from `source`; its thread is called `name` (e.g. `_rng0`).
    pub fn new(source: File, name: String) -> Self {
        Self {
            source: Some(source),
            name,
            worker: None,
        }
    }
}

struct RngQueue {
    source: File,
}

impl RngQueue {
    /// Fills the device-writable buffers of `chain`; returns how many bytes it wrote.
    fn fill<M: GuestMemory>(
        &mut self,
        chain: DescriptorChain<&M>,
        mem: &M,
    ) -> std::io::Result<u32> {
        let mut written = 0u32;
        for desc in chain {
            if !desc.is_write_only() || written >= MAX_BYTES_PER_CHAIN {
                continue;
            }
            let len = desc.len().min(MAX_BYTES_PER_CHAIN - written);
            let mut buf = vec![0u8; len as usize];
            self.source.read_exact(&mut buf)?;
            // A descriptor outside guest memory gets nothing; the chain is still returned.
            if mem.write_slice(&buf, desc.addr()).is_ok() {
                written += len;
            }
        }
        Ok(written)
    }
}

impl QueueHandler for RngQueue {
    fn process(&mut self, q: &mut ActiveQueue, mem: &GuestMemoryAtomic) -> Result<bool, String> {
        let mem = mem.memory();
        let mut drain = QueueDrain::new(&mut q.queue, &*mem, usize::MAX);
        while let Some(chain) = drain.next_chain().map_err(|e| error_chain(&e))? {
            let head = chain.head_index();
            let written = self
                .fill(chain, &*mem)
                .map_err(|e| format!("entropy source: {e}"))?;
            drain.complete(head, written).map_err(|e| error_chain(&e))?;
        }
        Ok(drain
            .finish()
            .map_err(|e| error_chain(&e))?
            .needs_notification)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let source = match &self.source {
            Some(f) => f.try_clone().map_err(ActivateError::Resource)?,
            None => return Err(ActivateError::InvalidSetup("no entropy source".into())),
        };
        if a.queues.len() != 1 {
            return Err(ActivateError::InvalidSetup(format!(
                "{} queues enabled, want 1",
                a.queues.len()
            )));
        }
        self.worker = Some(Worker::start(&self.name, Box::new(RngQueue { source }), a)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.as_ref().map_or(Ok(()), Worker::pause)
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }
}
