//! virtio-pmem (virtio 1.2 section 5.19): a host file mapped into guest physical memory (the
//! VMM maps it as a memory slot; this device only tells the driver where) and one request
//! queue whose only request, FLUSH, makes the guest's writes durable in the file before it
//! completes.

use std::sync::Arc;

use virtio_chain::queue::QueueDrain;
use virtio_chain::{ChainError, MalformedChain, QueueError};
use vm_memory::GuestAddressSpace;

use crate::pause::PauseError;
use crate::worker::{QueueHandler, WorkerSlot};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_PMEM_REQ_TYPE_FLUSH`.
pub const REQ_FLUSH: u32 = 0;
/// The response to a request that succeeded.
pub const RESP_OK: u32 = 0;
/// The response to a request that failed (Linux's driver reports any non-zero value as EIO).
pub const RESP_EIO: u32 = 1;

/// What a pmem device writes back to: the backing file (`fdatasync` also writes back the
/// dirty pages of its shared mapping), or a fake in tests.
pub trait PmemBackend: Send + Sync + std::fmt::Debug {
    /// Makes every write to the mapping durable.
    fn flush(&self) -> std::io::Result<()>;
}

impl PmemBackend for std::fs::File {
    fn flush(&self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// A backend whose writes are discarded (`discard_writes=on`: a private mapping): a flush has
/// nothing to make durable and succeeds.
#[derive(Debug)]
pub struct DiscardWrites;

impl PmemBackend for DiscardWrites {
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The persistent-memory device.
#[derive(Debug)]
pub struct Pmem {
    backend: Arc<dyn PmemBackend>,
    /// Guest physical address and size of the mapped region (the config space).
    start: u64,
    size: u64,
    name: String,
    worker: WorkerSlot,
}

impl Pmem {
    /// A device whose region of `size` bytes the VMM mapped at guest address `start`; flushes
    /// go to `backend`; its thread is called `name` (e.g. `_pmem0`).
    pub fn new(backend: Arc<dyn PmemBackend>, start: u64, size: u64, name: String) -> Self {
        Self {
            backend,
            start,
            size,
            name,
            worker: WorkerSlot::default(),
        }
    }
}

/// Counts of one pass over the queue.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PmemOutcome {
    /// Flushes answered (successful or not).
    pub flushes: u64,
    /// Flushes the backend failed.
    pub failed: u64,
    /// Chains returned with length 0, and the first one.
    pub malformed: u64,
    /// The first malformed chain.
    pub first_malformed: Option<MalformedChain>,
}

struct PmemQueue {
    backend: Arc<dyn PmemBackend>,
}

/// The queue logic of [`Pmem`] without its worker thread, for harnesses that drive the queue
/// directly (the fuzz targets in `fuzz/`).
pub fn queue_handler(backend: Arc<dyn PmemBackend>) -> impl QueueHandler<Error = QueueError> {
    PmemQueue { backend }
}

/// Serves every available request of `queue`: a FLUSH is answered after the backend made the
/// writes durable; other request types get [`RESP_EIO`]; a chain without a 4-byte request
/// and a 4-byte response goes back with length 0.
pub fn process_queue<M: vm_memory::GuestMemory>(
    queue: &mut virtio_queue::Queue,
    mem: &M,
    backend: &dyn PmemBackend,
) -> Result<(PmemOutcome, bool), QueueError> {
    let mut out = PmemOutcome::default();
    let mut drain = QueueDrain::new(queue, mem, usize::MAX);
    while let Some(mut chain) = drain.next_chain()? {
        let head = chain.head_index();
        let used = match serve(&mut chain, mem, backend, &mut out) {
            Ok(n) => n,
            Err(error) => {
                out.malformed += 1;
                out.first_malformed
                    .get_or_insert(MalformedChain { head, error });
                0
            }
        };
        drain.complete(head, used)?;
    }
    Ok((out, drain.finish()?.needs_notification))
}

fn serve<M: vm_memory::GuestMemory>(
    chain: &mut virtio_queue::DescriptorChain<&M>,
    mem: &M,
    backend: &dyn PmemBackend,
    out: &mut PmemOutcome,
) -> Result<u32, ChainError> {
    let parts = virtio_chain::split(chain)?;
    for (what, len) in [
        ("request", parts.readable.len()),
        ("response", parts.writable.len()),
    ] {
        if len < 4 {
            return Err(ChainError::TooShort { what, len, min: 4 });
        }
    }
    let mut req = [0u8; 4];
    parts
        .readable
        .read_into(mem, &mut req)
        .map_err(|_| ChainError::MemoryAccess)?;
    let resp = if u32::from_le_bytes(req) == REQ_FLUSH {
        out.flushes += 1;
        match backend.flush() {
            Ok(()) => RESP_OK,
            Err(e) => {
                out.failed += 1;
                nimbus_log::warn_limited!("virtio-pmem flush failed: {e}");
                RESP_EIO
            }
        }
    } else {
        RESP_EIO
    };
    if parts.writable.write_from(mem, &resp.to_le_bytes()) != 4 {
        return Err(ChainError::MemoryAccess);
    }
    Ok(4)
}

impl QueueHandler for PmemQueue {
    type Error = QueueError;

    fn process(
        &mut self,
        q: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, QueueError> {
        let mem = mem.memory();
        let (outcome, notify) = process_queue(&mut q.queue, &*mem, self.backend.as_ref())?;
        if let Some(bad) = &outcome.first_malformed {
            nimbus_log::warn_limited!(
                "virtio-pmem: {} malformed request(s), first: {bad:?}",
                outcome.malformed
            );
        }
        Ok(notify)
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        device_type::PMEM
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.start.to_le_bytes());
        config[8..].copy_from_slice(&self.size.to_le_bytes());
        virtio_chain::read_config(&config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 1 {
            return Err(ActivateError::InvalidSetup(format!(
                "{} queues enabled, want 1",
                a.queues.len()
            )));
        }
        let handler = PmemQueue {
            backend: self.backend.clone(),
        };
        self.worker.start(&self.name, handler, a)
    }

    fn reset(&mut self) {
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
    use std::sync::atomic::{AtomicU32, Ordering};

    use net_util::testing::{Buf, TestDriver};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    #[derive(Debug, Default)]
    struct FakeBackend {
        flushes: AtomicU32,
        fail: bool,
    }

    impl PmemBackend for FakeBackend {
        fn flush(&self) -> std::io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
    }

    fn run(backend: &FakeBackend, chains: &[&[Buf]]) -> (PmemOutcome, Vec<(u32, u32)>, TestDriver) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut driver = TestDriver::new(&mem, 16, 0x1_0000, 0x1_0000);
        for c in chains {
            driver.add_chain(c);
        }
        let mut queue = driver.queue(false);
        let (out, _) = process_queue(&mut queue, &mem, backend).expect("queue");
        let used = driver.take_used();
        (out, used, driver)
    }

    #[test]
    fn flush_reaches_the_backend_before_the_answer() {
        let backend = FakeBackend::default();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut driver = TestDriver::new(&mem, 16, 0x1_0000, 0x1_0000);
        let req = driver.alloc_data(&REQ_FLUSH.to_le_bytes());
        let resp = driver.alloc(4, 0xff);
        driver.add_chain(&[Buf::r(req, 4), Buf::w(resp, 4)]);
        let bad_type = driver.alloc_data(&7u32.to_le_bytes());
        let resp2 = driver.alloc(4, 0xff);
        driver.add_chain(&[Buf::r(bad_type, 4), Buf::w(resp2, 4)]);
        let mut queue = driver.queue(false);
        let (out, notify) = process_queue(&mut queue, &mem, &backend).expect("queue");
        assert!(notify);
        assert_eq!((out.flushes, out.failed, out.malformed), (1, 0, 0));
        assert_eq!(backend.flushes.load(Ordering::SeqCst), 1);
        assert_eq!(driver.read(resp, 4), RESP_OK.to_le_bytes());
        assert_eq!(driver.read(resp2, 4), RESP_EIO.to_le_bytes());
        assert_eq!(
            driver.take_used().iter().map(|u| u.1).collect::<Vec<_>>(),
            [4, 4]
        );
    }

    #[test]
    fn a_failed_flush_answers_eio() {
        let backend = FakeBackend {
            fail: true,
            ..Default::default()
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut driver = TestDriver::new(&mem, 16, 0x1_0000, 0x1_0000);
        let req = driver.alloc_data(&REQ_FLUSH.to_le_bytes());
        let resp = driver.alloc(4, 0);
        driver.add_chain(&[Buf::r(req, 4), Buf::w(resp, 4)]);
        let mut queue = driver.queue(false);
        let (out, _) = process_queue(&mut queue, &mem, &backend).expect("queue");
        assert_eq!((out.flushes, out.failed), (1, 1));
        assert_eq!(driver.read(resp, 4), RESP_EIO.to_le_bytes());
    }

    #[test]
    fn malformed_chains_go_back_empty_without_a_flush() {
        let backend = FakeBackend::default();
        let (out, used, _) = run(
            &backend,
            &[
                // No response buffer.
                &[Buf::r(0x100, 4)],
                // A 2-byte request.
                &[Buf::r(0x100, 2), Buf::w(0x200, 4)],
                // Response outside guest memory.
                &[Buf::r(0x100, 4), Buf::w(0x7fff_0000, 4)],
            ],
        );
        assert_eq!(out.malformed, 3);
        assert_eq!(out.flushes, 0);
        assert_eq!(backend.flushes.load(Ordering::SeqCst), 0);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0]);
    }

    #[test]
    fn config_space_holds_the_region() {
        let dev = Pmem::new(
            Arc::new(DiscardWrites),
            0x1_0000_0000,
            4 << 20,
            "_pmem0".into(),
        );
        let mut b = [0u8; 16];
        dev.read_config(0, &mut b);
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().expect("8")),
            0x1_0000_0000
        );
        assert_eq!(u64::from_le_bytes(b[8..].try_into().expect("8")), 4 << 20);
        let mut past = [0xffu8; 4];
        dev.read_config(16, &mut past);
        assert_eq!(past, [0; 4]);
        assert_eq!(dev.device_type(), 27);
    }
}
