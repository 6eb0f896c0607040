//! [`BlockBackend`]: the virtio-blk device behind the vhost-user protocol, as a
//! [`VhostUserBackend`] for the `vhost-user-backend` crate.
//!
//! The crate does the protocol (ownership, features, memory table, ring setup, one epoll worker
//! thread per entry of [`VhostUserBackend::queues_per_thread`]); this type supplies what is
//! virtio-blk: the feature bits and configuration space from the `block` crate, as Nimbus's
//! in-process device uses them, and the request processing of [`block::process_queue_bounded`]
//! (the budgeted form of the `block::process_queue` that device uses).

use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use block::{process_queue_bounded, BlockConfig, DiskBackend, VirtioBlkConfig};
use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use vhost_user_daemon::config_space::config_reply;
use vhost_user_daemon::vring::rings_in_memory;
use vhost_user_daemon::{ExitEvents, MemorySlot};
use virtio_chain::poll::{poll_queue, AdaptivePoll};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::config::BackendConfig;

pub use vhost_user_daemon::{GuestMemory, Vring};

/// Most chains a worker completes per hold of its ring's lock (see `serve_queue`).
pub const CHAINS_PER_BATCH: usize = 64;

/// Errors creating a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The eventfd that stops a worker thread could not be created.
    #[error("cannot create the exit event of worker {thread}")]
    ExitEvent {
        /// Worker thread (= queue) index.
        thread: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Per-queue state kept between events.
#[derive(Debug)]
struct QueueState {
    /// The queue failed (broken available ring, used ring outside memory); the failure was
    /// logged once and is not logged again until the driver sets the device up anew.
    broken: AtomicBool,
    /// The polling window, and when the queue was last drained and its worker went to sleep.
    poll: Mutex<(AdaptivePoll, Option<Instant>)>,
}

/// A virtio-blk device served over vhost-user: one disk, `num_queues` request queues, each
/// handled by its own worker thread.
///
/// Created per frontend connection (the backend crate keeps per-connection state in the
/// daemon), sharing the disk between connections.
pub struct BlockBackend<B: Bitmap + 'static = ()> {
    disk: Arc<dyn DiskBackend>,
    request_config: BlockConfig,
    config: VirtioBlkConfig,
    features: u64,
    num_queues: u16,
    queue_size: u16,
    mem: MemorySlot<B>,
    queues: Vec<QueueState>,
    exit_events: ExitEvents,
    event_idx: AtomicBool,
}

impl<B: Bitmap + 'static> std::fmt::Debug for BlockBackend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBackend")
            .field("disk", &self.disk)
            .field("features", &format_args!("{:#x}", self.features))
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl<B: Bitmap + 'static> BlockBackend<B> {
    /// A backend serving `disk` as `config` describes (queues, ring size, serial, read-only),
    /// reading guest memory through `mem` (the same object given to the `VhostUserDaemon`).
    ///
    /// The device is read-only if `config.readonly` or the disk itself is. `num_queues` is
    /// kept within 1..=64 (the crate maps queues to threads with a 64-bit mask).
    ///
    /// # Errors
    ///
    /// [`BackendError::ExitEvent`] if an eventfd cannot be created.
    pub fn new(
        disk: Arc<dyn DiskBackend>,
        config: &BackendConfig,
        mem: GuestMemory<B>,
    ) -> Result<Self, BackendError> {
        let readonly = config.readonly || disk.read_only();
        let num_queues = config.num_queues.clamp(1, crate::config::MAX_NUM_QUEUES);
        let exit_events = ExitEvents::new(usize::from(num_queues))
            .map_err(|(thread, source)| BackendError::ExitEvent { thread, source })?;
        Ok(BlockBackend {
            config: VirtioBlkConfig::for_disk(disk.as_ref(), num_queues, config.queue_size),
            request_config: BlockConfig::new(readonly, config.serial_or_empty()),
            features: block::features(readonly, num_queues)
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            num_queues,
            queue_size: config.queue_size,
            mem: MemorySlot::new(mem),
            queues: (0..num_queues)
                .map(|_| QueueState {
                    broken: AtomicBool::new(false),
                    poll: Mutex::new((
                        AdaptivePoll::new(Duration::from_micros(u64::from(config.poll_us))),
                        None,
                    )),
                })
                .collect(),
            exit_events,
            event_idx: AtomicBool::new(false),
            disk,
        })
    }

    /// The configuration space the frontend reads with `GET_CONFIG`.
    pub fn config_space(&self) -> &VirtioBlkConfig {
        &self.config
    }

    /// Whether the driver negotiated `VIRTIO_RING_F_EVENT_IDX` (the crate then sets it on
    /// every queue).
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Relaxed)
    }

    /// Closes the exit event descriptors handed to the crate. vhost-user-backend 0.24 turns
    /// each into a raw descriptor for its epoll and never closes it, so without this every
    /// connection of a `--keep-running` daemon leaks one descriptor per queue.
    ///
    /// A descriptor is closed only if it still refers to the eventfd handed out (checked with
    /// `kcmp`): one that the crate closed after all, its number since reused, is left alone.
    /// Returns how many were closed.
    ///
    /// # Safety
    ///
    /// The `VhostUserDaemon` that used this backend must have been dropped, its worker threads
    /// joined: nothing may use the handed-out descriptors any more.
    pub unsafe fn close_orphaned_exit_events(&self) -> usize {
        // SAFETY: as the caller guarantees.
        unsafe { self.exit_events.close_orphaned() }
    }

    fn clear_broken(&self) {
        for q in &self.queues {
            q.broken.store(false, Ordering::Relaxed);
        }
    }

    /// Drains queue `index` (held in `vring`) and notifies the frontend whenever the driver
    /// needs it.
    ///
    /// The ring's lock is taken per batch of [`CHAINS_PER_BATCH`] chains, not for the whole
    /// drain: a driver that keeps the queue full must not keep the protocol thread (which
    /// takes the same lock to stop the ring on `GET_VRING_BASE`) waiting.
    ///
    /// After the drain the worker polls the queue for up to `poll_us` (the window adapts to
    /// the driver, [`virtio_chain::poll::AdaptivePoll`]) and serves it again if the driver made
    /// requests available meanwhile; after [`MAX_POLL_ROUNDS`] such rounds it kicks itself and returns, so the
    /// crate's loop (and its exit event) gets its turn.
    fn serve_queue(&self, index: usize, vring: &Vring<B>) {
        let Some(queue) = self.queues.get(index) else {
            return;
        };
        // Only this queue's worker takes the lock.
        let mut poll = queue.poll.lock().unwrap_or_else(PoisonError::into_inner);
        let (window, idle_since) = &mut *poll;
        // Woken by the driver's notification: how long it took to come back adapts the window.
        if let Some(since) = idle_since.take() {
            window.record(since.elapsed());
        }
        let mut rounds = 0u32;
        loop {
            let mem = self.mem.current();
            let mut state = vring.get_mut();
            // A stopped (GET_VRING_BASE) or disabled ring must not be touched; an event may
            // still arrive for it from before.
            if !state.is_enabled() || !virtio_queue::QueueT::ready(state.get_queue()) {
                debug!("queue {index}: event for a stopped or disabled ring ignored");
                return;
            }
            let guard = mem.memory();
            if !rings_in_memory(state.get_queue(), guard.deref()) {
                if !queue.broken.swap(true, Ordering::Relaxed) {
                    warn!(
                        "queue {index}: its rings run past the end of guest memory; ignoring it \
                         until the driver sets it up again"
                    );
                }
                return;
            }
            let result = process_queue_bounded(
                state.get_queue_mut(),
                guard.deref(),
                self.disk.as_ref(),
                &self.request_config,
                CHAINS_PER_BATCH,
            );
            drop(guard);
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(e) => {
                    // The queue is unusable until the driver sets it up again. Without a way
                    // to set DEVICE_NEEDS_RESET (that is the frontend's), log once so a hostile
                    // driver kicking a broken ring cannot flood the log.
                    if !queue.broken.swap(true, Ordering::Relaxed) {
                        warn!("queue {index}: {e}; ignoring it until the driver sets it up again");
                    } else {
                        debug!("queue {index}: {e}");
                    }
                    return;
                }
            };
            if let Some(bad) = &outcome.first_malformed {
                // The chains went back with length 0; the queue keeps being served.
                warn!(
                    "queue {index}: {} malformed request(s), first: head {}: {}",
                    outcome.malformed, bad.head, bad.error
                );
            }
            if outcome.needs_notification {
                if let Err(e) = state.signal_used_queue() {
                    warn!("queue {index}: cannot signal the call eventfd: {e}");
                }
            }
            if !outcome.more_pending {
                if !window.enabled() {
                    return;
                }
                rounds += 1;
                if rounds > MAX_POLL_ROUNDS {
                    drop(state);
                    kick_again(vring);
                    return;
                }
                let drained = Instant::now();
                let guard = mem.memory();
                // The ring's lock is held for the window: the protocol thread waits at most that.
                if window.window().is_zero()
                    || !poll_queue(state.get_queue_mut(), guard.deref(), window.window())
                        .unwrap_or(false)
                {
                    *idle_since = Some(drained);
                    return;
                }
                window.record(drained.elapsed());
            }
            drop(state);
            std::thread::yield_now();
        }
    }
}

/// Serve-and-poll rounds in a row before a worker returns to the crate's loop.
const MAX_POLL_ROUNDS: u32 = 1024;

/// Makes the ring's kick eventfd readable, so the worker serves the ring again after its epoll
/// round (requests are waiting with driver notifications suppressed).
fn kick_again<B: Bitmap + 'static>(vring: &Vring<B>) {
    if let Some(kick) = vring.get_ref().get_kick() {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) of 8 bytes from a live buffer to the ring's kick eventfd, which the
        // crate keeps open while the ring's state is borrowed.
        let _ = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl<B: Bitmap + 'static> AsRef<ExitEvents> for BlockBackend<B> {
    fn as_ref(&self) -> &ExitEvents {
        &self.exit_events
    }
}

impl<B> VhostUserBackend for BlockBackend<B>
where
    B: Bitmap + Send + Sync + 'static,
{
    type Bitmap = B;
    type Vring = Vring<B>;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    /// [`block::features`] plus `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        debug!("driver features {features:#x}");
        // A new SET_FEATURES starts a new driver session: report queue failures again.
        self.clear_broken();
    }

    /// `MQ`, `CONFIG` and `REPLY_ACK`. Not `INFLIGHT_SHMFD`: the crate's protocol handler
    /// refuses `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD` whatever the backend says.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.clear_broken();
    }

    /// Recorded for [`event_idx`](Self::event_idx); the crate itself sets the flag on each
    /// queue, which is what [`block::process_queue_bounded`] looks at.
    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// [`vhost_user_daemon::config_space::config_reply`] over the device's configuration.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_reply(offset, size, |at, buf| self.config.read(at, buf))
    }

    /// Ignored, like the in-process device's: `CONFIG_WCE` is not offered, so no field is
    /// writable. Succeeding keeps the connection up (the crate drops it on an error).
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        debug!(
            "ignoring a {}-byte configuration write at {offset:#x}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory<B>) -> io::Result<()> {
        self.mem.replace(mem)
    }

    /// One worker thread per queue: queue `i` is thread `i`'s only ring.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    /// The crate asks once per worker when the daemon is created; without an exit event a
    /// worker never ends and dropping the daemon (which joins the workers) hangs.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.take(thread_index)
    }

    /// A kick on queue `thread_id` (each worker has one ring, so `device_event` is 0 and
    /// `vrings` holds that ring), or the ring was just enabled.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            debug!("queue {thread_id}: ignoring event set {evset:?}");
            return Ok(());
        }
        // An error return ends the worker thread for good; only an impossible event gets one.
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("worker {thread_id}: event {device_event} names no ring"),
            )
        })?;
        self.serve_queue(thread_id, vring);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use block::FakeDisk;
    use vm_memory::GuestMemoryMmap;

    fn backend(config: &BackendConfig, disk: FakeDisk) -> BlockBackend {
        let mem = GuestMemory::new(GuestMemoryMmap::<()>::new());
        BlockBackend::new(Arc::new(disk), config, mem).unwrap()
    }

    #[test]
    fn exit_events_are_handed_out_once_each() {
        let mut c = BackendConfig::new("p", "s");
        c.num_queues = 2;
        let b = backend(&c, FakeDisk::new(4096));
        let (consumer, notifier) = b.exit_event(1).unwrap();
        notifier.notify().unwrap();
        consumer.consume().unwrap();
        assert!(b.exit_event(0).is_some());
        // Asked again: a fresh pair rather than None (which would hang the daemon's drop).
        let (consumer, notifier) = b.exit_event(0).unwrap();
        notifier.notify().unwrap();
        consumer.consume().unwrap();
        assert!(b.exit_event(7).is_some());
    }

    #[test]
    fn queue_count_is_bounded() {
        let mut c = BackendConfig::new("p", "s");
        c.num_queues = 200;
        let b = backend(&c, FakeDisk::new(4096));
        assert_eq!(b.num_queues(), 64);
        assert_eq!(b.queues_per_thread().last(), Some(&(1u64 << 63)));
        c.num_queues = 0;
        assert_eq!(backend(&c, FakeDisk::new(4096)).num_queues(), 1);
    }

    #[test]
    fn read_only_disk_makes_a_read_only_device() {
        let b = backend(
            &BackendConfig::new("p", "s"),
            FakeDisk::new(4096).make_read_only(),
        );
        assert_ne!(
            b.features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO),
            0
        );
        assert!(b.request_config.read_only);
    }
}
