//! Draining a virtio-blk request queue: [`process_queue`].

use log::debug;
use virtio_chain::QueueError;
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use crate::disk::DiskBackend;
use crate::request::{BlockConfig, Request, RequestError};
use crate::{BlkStatus, RequestType};

/// A chain that was not a usable request; it went to the used ring with length 0.
pub type MalformedChain = virtio_chain::MalformedChain<RequestError>;

/// What a [`process_queue`] call did.
#[derive(Debug, Default)]
pub struct QueueOutcome {
    /// Chains put in the used ring, malformed ones included.
    pub completed: usize,
    /// How many of those were malformed (used length 0).
    pub malformed: usize,
    /// The first malformed chain, for the device's log or its `DEVICE_NEEDS_RESET` decision.
    pub first_malformed: Option<MalformedChain>,
    /// The driver must be notified (used buffer notification, i.e. the queue's interrupt).
    /// Honours `VIRTIO_RING_F_EVENT_IDX` when the queue has it enabled.
    pub needs_notification: bool,
    /// Only from [`process_queue_bounded`]: the call stopped at its budget with chains still
    /// available. Call again before waiting for the next driver notification, which will not
    /// come for those chains.
    pub more_pending: bool,
    /// Reads and writes that completed successfully.
    pub io: IoCounts,
}

/// Successful data requests, as Cloud Hypervisor's `vm.counters` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// `IN` requests.
    pub read_ops: u64,
    /// Bytes they read.
    pub read_bytes: u64,
    /// `OUT` requests.
    pub write_ops: u64,
    /// Bytes they wrote.
    pub write_bytes: u64,
}

impl IoCounts {
    fn count(&mut self, request: &Request) {
        let len = request.data_len();
        match request.request_type() {
            RequestType::In => {
                self.read_ops += 1;
                self.read_bytes += len;
            }
            RequestType::Out => {
                self.write_ops += 1;
                self.write_bytes += len;
            }
            _ => {}
        }
    }
}

/// Processes every available request on `queue`: pops each chain, executes it on `disk`, puts
/// it in the used ring, and finally decides whether the driver needs a notification.
///
/// Driver notifications are disabled while the queue is drained and enabled again before
/// returning, re-checking the available ring so a request added meanwhile is not missed (with
/// `EVENT_IDX` this also publishes `avail_event`). Malformed chains are completed with length 0
/// and reported in the outcome; processing goes on with the next chain. A chain that loops or
/// is too long ends at the queue size, and an available index more than a queue size ahead is
/// an error, so each chain is bounded work; the call returns once the driver stops adding
/// chains. Use [`process_queue_bounded`] to also bound the number of chains per call.
///
/// # Errors
///
/// A [`QueueError`] when the queue itself is broken (see there).
///
/// # Example
///
/// ```
/// use block::{process_queue, BlockConfig, FakeDisk};
/// use virtio_queue::{Queue, QueueT};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let mut queue = Queue::new(256).unwrap();
/// queue.set_size(16);
/// queue.set_desc_table_address(Some(0x1000), Some(0));
/// queue.set_avail_ring_address(Some(0x2000), Some(0));
/// queue.set_used_ring_address(Some(0x3000), Some(0));
/// queue.set_event_idx(true);
/// queue.set_ready(true);
/// assert!(queue.is_valid(&mem));
///
/// let disk = FakeDisk::new(1 << 20);
/// let cfg = BlockConfig::new(false, "disk0");
/// let outcome = process_queue(&mut queue, &mem, &disk, &cfg).unwrap();
/// assert_eq!(outcome.completed, 0);
/// assert!(!outcome.needs_notification);
/// ```
pub fn process_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    disk: &dyn DiskBackend,
    cfg: &BlockConfig,
) -> Result<QueueOutcome, QueueError> {
    process_queue_bounded(queue, mem, disk, cfg, usize::MAX)
}

/// [`process_queue`] handling at most `max_chains` chains (at least one), for a thread that
/// serves several queues or must watch other events while a driver keeps the queue full.
///
/// When it stops at the budget with chains left it sets [`QueueOutcome::more_pending`] and
/// leaves driver notifications disabled: the caller must call again (after its other work)
/// rather than wait for a notification.
///
/// # Errors
///
/// As [`process_queue`].
pub fn process_queue_bounded<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    disk: &dyn DiskBackend,
    cfg: &BlockConfig,
    max_chains: usize,
) -> Result<QueueOutcome, QueueError> {
    let mut outcome = QueueOutcome::default();
    let drained = virtio_chain::queue::drain(queue, mem, max_chains, |mut chain| {
        let head = chain.head_index();
        let done = Request::parse(&mut chain).and_then(|request| {
            let completion = request.execute(mem, disk, cfg)?;
            if completion.status == BlkStatus::Ok {
                outcome.io.count(&request);
            }
            Ok(completion)
        });
        match done {
            Ok(completion) => completion.used_len,
            Err(error) => {
                debug!("virtio-blk: malformed descriptor chain {head}: {error}");
                outcome.malformed += 1;
                outcome
                    .first_malformed
                    .get_or_insert(MalformedChain { head, error });
                0
            }
        }
    })?;
    outcome.completed = drained.completed;
    outcome.needs_notification = drained.needs_notification;
    outcome.more_pending = drained.more_pending;
    Ok(outcome)
}
