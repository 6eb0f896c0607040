//! virtio-blk over a [`block::DiskBackend`]: configuration space and feature set from the
//! `block` crate (shared with the vhost-user daemon), one worker thread (`_disk<N>`) serving all
//! request queues, which polls a queue briefly after serving it (see [`Block::with_poll`]).
//!
//! The capacity in the configuration space is the disk's size when the driver reads it, so a
//! disk resized while the guest runs ([`block::DiskBackend::resize`]) shows its new size; the
//! VMM then announces the change through the device's [`ConfigChange`]
//! ([`Block::with_config_change`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block::{BlockConfig, DiskBackend, QueueError, VirtioBlkConfig};

use crate::config_change::ConfigChange;
use crate::pause::PauseError;
use crate::worker::{QueueHandler, WorkerSlot};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VirtioInterrupt,
};

/// The block device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<dyn DiskBackend>,
    config: VirtioBlkConfig,
    request_config: BlockConfig,
    features: u64,
    queue_sizes: Vec<u16>,
    name: String,
    poll: Duration,
    counters: Arc<IoCounters>,
    worker: WorkerSlot,
    /// Announces host-made changes of the capacity to the running driver.
    config_change: ConfigChange,
    /// The driver's interrupt this device attached to `config_change`, while it runs.
    attached: Option<Arc<dyn VirtioInterrupt>>,
}

/// Successful reads and writes since the device was created.
#[derive(Debug, Default)]
struct IoCounters {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
}

impl IoCounters {
    fn add(&self, io: &block::IoCounts) {
        for (counter, n) in [
            (&self.read_ops, io.read_ops),
            (&self.read_bytes, io.read_bytes),
            (&self.write_ops, io.write_ops),
            (&self.write_bytes, io.write_bytes),
        ] {
            if n != 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

impl Block {
    /// A device serving `disk` with `num_queues` queues of `queue_size`; `serial` answers GET_ID;
    /// its thread is called `name` (e.g. `_disk0`).
    pub fn new(
        disk: Arc<dyn DiskBackend>,
        num_queues: u16,
        queue_size: u16,
        serial: &str,
        name: String,
    ) -> Self {
        let readonly = disk.read_only();
        let config = VirtioBlkConfig::for_disk(disk.as_ref(), num_queues, queue_size);
        Self {
            features: block::features(readonly, num_queues),
            request_config: BlockConfig::new(readonly, serial),
            config,
            disk,
            queue_sizes: vec![queue_size; usize::from(num_queues.max(1))],
            name,
            poll: virtio_chain::poll::DEFAULT_POLL,
            counters: Arc::default(),
            worker: WorkerSlot::default(),
            config_change: ConfigChange::new(),
            attached: None,
        }
    }

    /// Announces capacity changes through `change` (the VMM keeps a clone and calls
    /// [`ConfigChange::notify`] after resizing the disk) instead of a private one.
    pub fn with_config_change(mut self, change: ConfigChange) -> Self {
        self.config_change = change;
        self
    }

    /// How long the worker polls a queue after serving it before it sleeps
    /// ([`virtio_chain::poll`]; default [`virtio_chain::poll::DEFAULT_POLL`], zero never polls).
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }
}

impl Block {
    /// Stops announcing capacity changes to this device's driver (the `ConfigChange` may be
    /// shared with a later instance's device, which keeps its own).
    fn detach(&mut self) {
        if let Some(i) = self.attached.take() {
            self.config_change.detach_if(&i);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.detach();
    }
}

struct BlockQueues {
    disk: Arc<dyn DiskBackend>,
    config: BlockConfig,
    poll: Duration,
    counters: Arc<IoCounters>,
}

impl QueueHandler for BlockQueues {
    type Error = QueueError;

    fn process(
        &mut self,
        q: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, QueueError> {
        use vm_memory::GuestAddressSpace;
        let mem = mem.memory();
        let outcome = block::process_queue(&mut q.queue, &*mem, self.disk.as_ref(), &self.config)?;
        self.counters.add(&outcome.io);
        if let Some(bad) = &outcome.first_malformed {
            // The chains were returned with length 0; the device keeps serving the queue.
            nimbus_log::warn_limited!(
                "virtio-blk queue {}: {} malformed request(s), first: {bad:?}",
                q.index,
                outcome.malformed
            );
        }
        Ok(outcome.needs_notification)
    }

    fn poll_window(&self) -> Duration {
        self.poll
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config
            .with_disk_size(self.disk.size())
            .read(offset, data);
    }

    fn config_generation(&self) -> u8 {
        self.config_change.generation()
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.is_empty() {
            return Err(ActivateError::InvalidSetup("no queue enabled".into()));
        }
        let handler = BlockQueues {
            disk: self.disk.clone(),
            config: self.request_config.clone(),
            poll: self.poll,
            counters: self.counters.clone(),
        };
        let interrupt = a.interrupt.clone();
        self.worker.start(&self.name, handler, a)?;
        self.config_change.attach(interrupt.clone());
        self.attached = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.detach();
        // Dropping the worker stops and joins its thread.
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.pause()
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("read_bytes", get(&c.read_bytes)),
            ("read_ops", get(&c.read_ops)),
            ("write_bytes", get(&c.write_bytes)),
            ("write_ops", get(&c.write_ops)),
        ]
    }
}
