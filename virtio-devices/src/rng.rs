//! virtio-rng: fills the driver's buffers from an entropy source (`/dev/urandom` by default).

use std::fs::File;
use std::io::Read;

use virtio_chain::queue::QueueDrain;
use virtio_chain::QueueError;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};

use crate::pause::PauseError;
use crate::worker::{QueueHandler, WorkerSlot};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Bytes served per descriptor chain at most, so one huge buffer cannot stall the thread.
const MAX_BYTES_PER_CHAIN: u32 = 64 * 1024;
const QUEUE_SIZE: u16 = 256;

/// Errors that break the entropy device (it then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The entropy source could not be read.
    #[error("cannot read the entropy source")]
    Source(#[source] std::io::Error),
    /// The queue is broken.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    source: Option<File>,
    name: String,
    worker: WorkerSlot,
}

impl Rng {
    /// A device reading from `source`; its thread is called `name` (e.g. `_rng0`).
    pub fn new(source: File, name: String) -> Self {
        Self {
            source: Some(source),
            name,
            worker: WorkerSlot::default(),
        }
    }
}

struct RngQueue {
    source: File,
}

/// The queue logic of [`Rng`] without its worker thread: what the worker runs when the driver
/// kicks the queue, reading entropy from `source`. For harnesses that drive the queue directly
/// (the fuzz targets in `fuzz/`).
pub fn queue_handler(source: File) -> impl QueueHandler<Error = RngError> {
    RngQueue { source }
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
    type Error = RngError;

    fn process(&mut self, q: &mut ActiveQueue, mem: &GuestMemoryAtomic) -> Result<bool, RngError> {
        let mem = mem.memory();
        let mut drain = QueueDrain::new(&mut q.queue, &*mem, usize::MAX);
        while let Some(chain) = drain.next_chain()? {
            let head = chain.head_index();
            let written = self.fill(chain, &*mem).map_err(RngError::Source)?;
            drain.complete(head, written)?;
        }
        Ok(drain.finish()?.needs_notification)
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
        self.worker.start(&self.name, RngQueue { source }, a)?;
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
