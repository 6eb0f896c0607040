//! [`NetBackend`]: the virtio-net device behind the vhost-user protocol, as a
//! [`VhostUserBackend`] for the `vhost-user-backend` crate.
//!
//! The crate does the protocol (ownership, features, memory table, ring setup, one epoll worker
//! thread per entry of [`VhostUserBackend::queues_per_thread`]); this type supplies what is
//! virtio-net, from `net_util` exactly as Nimbus's in-process device uses it: the feature bits
//! ([`net_util::features`]), the configuration space ([`VirtioNetConfig`]), the TAP offloads
//! ([`tap_offload_flags`]) and the data path ([`NetTx::process`], [`NetRx::process`]).
//!
//! Queue pair `i` (receive queue `2i`, transmit queue `2i + 1`) is served by worker thread `i`,
//! which also waits on the pair's TAP queue: the daemon registers that descriptor with the
//! worker's epoll under [`NetBackend::tap_event`].

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use net_util::{tap_offload_flags, MacAddr, NetRx, NetTx, RxStop, TapQueue, VirtioNetConfig};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use vhost_user_daemon::config_space::config_reply;
use vhost_user_daemon::vring::rings_in_memory;
use vhost_user_daemon::{ExitEvents, MemorySlot};
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

pub use vhost_user_daemon::{GuestMemory, Vring};

/// Most packets moved per hold of a ring's lock: the protocol thread (which takes the same
/// lock to stop a ring) never waits long behind a busy queue.
pub const PACKETS_PER_BATCH: usize = 64;

/// Errors creating a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The TAP queues do not match the queue pairs.
    #[error("{taps} TAP queue(s) for {pairs} queue pair(s)")]
    TapCount {
        /// TAP queues given.
        taps: usize,
        /// Queue pairs.
        pairs: usize,
    },
    /// A TAP queue could not be detached while its pair is not in use.
    #[error("cannot detach TAP queue {queue}")]
    Detach {
        /// TAP queue (= queue pair) index.
        queue: usize,
        /// Cause.
        #[source]
        source: net_util::NetError,
    },
    /// The eventfd that stops a worker thread could not be created.
    #[error("cannot create the exit event of worker {thread}")]
    ExitEvent {
        /// Worker thread (= queue pair) index.
        thread: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The data path state of one queue pair, kept between events.
#[derive(Debug)]
struct PairState {
    rx: NetRx,
    tx: NetTx,
    /// A queue failed (broken ring); logged once until the driver sets the device up again.
    rx_broken: bool,
    tx_broken: bool,
    /// Reading the TAP failed; logged once.
    tap_failed: bool,
    /// Attaching or detaching the TAP queue failed; logged once.
    steer_failed: bool,
}

impl PairState {
    fn new(negotiated: u64) -> Self {
        PairState {
            rx: NetRx::new(negotiated),
            tx: NetTx::new(),
            rx_broken: false,
            tx_broken: false,
            tap_failed: false,
            steer_failed: false,
        }
    }
}

/// A virtio-net device served over vhost-user: `num_queue_pairs` rx/tx pairs, pair `i` on TAP
/// queue `i` and worker thread `i`.
///
/// Created per frontend connection, sharing the TAP queues between connections.
pub struct NetBackend<B: Bitmap + 'static = ()> {
    taps: Vec<Arc<dyn TapQueue>>,
    config: VirtioNetConfig,
    features: u64,
    queue_size: u16,
    mem: MemorySlot<B>,
    pairs: Vec<Mutex<PairState>>,
    acked: AtomicU64,
    exit_events: ExitEvents,
    event_idx: AtomicBool,
}

impl<B: Bitmap + 'static> std::fmt::Debug for NetBackend<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("taps", &self.taps)
            .field("features", &format_args!("{:#x}", self.features))
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

impl<B: Bitmap + 'static> NetBackend<B> {
    /// A backend with one queue pair per TAP queue of `taps` (at most 32), guest address
    /// `mac`, optional `mtu`, rings of at most `queue_size`, reading guest memory through `mem`
    /// (the same object given to the `VhostUserDaemon`).
    ///
    /// # Errors
    ///
    /// [`BackendError::TapCount`] for no TAP queue or more than 32, or
    /// [`BackendError::ExitEvent`] if an eventfd cannot be created.
    pub fn new(
        taps: Vec<Arc<dyn TapQueue>>,
        mac: MacAddr,
        mtu: Option<u16>,
        queue_size: u16,
        mem: GuestMemory<B>,
    ) -> Result<Self, BackendError> {
        let pairs = taps.len();
        let max_pairs = usize::from(crate::config::MAX_NUM_QUEUES / 2);
        if pairs == 0 || pairs > max_pairs {
            return Err(BackendError::TapCount {
                taps: pairs,
                pairs: pairs.clamp(1, max_pairs),
            });
        }
        let exit_events = ExitEvents::new(pairs)
            .map_err(|(thread, source)| BackendError::ExitEvent { thread, source })?;
        // Only the first pair runs until the driver asks for more.
        for (queue, tap) in taps.iter().enumerate().skip(1) {
            tap.set_queue_enabled(false)
                .map_err(|source| BackendError::Detach { queue, source })?;
        }
        Ok(NetBackend {
            config: VirtioNetConfig::new(mac, pairs, mtu),
            features: net_util::features(pairs, mtu)
                | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            queue_size,
            mem: MemorySlot::new(mem),
            pairs: (0..pairs).map(|_| Mutex::new(PairState::new(0))).collect(),
            acked: AtomicU64::new(0),
            exit_events,
            event_idx: AtomicBool::new(false),
            taps,
        })
    }

    /// The configuration space the frontend reads with `GET_CONFIG`.
    pub fn config_space(&self) -> &VirtioNetConfig {
        &self.config
    }

    /// Queue pairs.
    pub fn num_queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// The epoll data value under which the daemon registers TAP queue `i` with worker `i`
    /// (`VringEpollHandler::register_listener`): the crate reserves `0..=num_queues` for the
    /// rings and the exit event.
    pub fn tap_event(&self) -> u64 {
        2 * self.pairs.len() as u64 + 1
    }

    /// The features the driver accepted (0 before `SET_FEATURES`).
    pub fn acked_features_value(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Whether the driver negotiated `VIRTIO_RING_F_EVENT_IDX`.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Relaxed)
    }

    fn pair(&self, index: usize) -> Option<MutexGuard<'_, PairState>> {
        self.pairs
            .get(index)
            .map(|p| p.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forgets the data path state (a packet waiting for buffers, chains held for it) of every
    /// pair, or of pair `only`, for a driver that negotiated `negotiated`.
    fn reset_pairs(&self, negotiated: u64, only: Option<usize>) {
        for (i, p) in self.pairs.iter().enumerate() {
            if only.is_none_or(|o| o == i) {
                *p.lock().unwrap_or_else(PoisonError::into_inner) = PairState::new(negotiated);
            }
        }
    }

    /// Closes the exit event descriptors handed to the crate, which vhost-user-backend 0.24
    /// never closes (see `vhost_user_block`'s backend for the same work-around). A descriptor
    /// is closed only if it still refers to the eventfd handed out (checked with `kcmp`).
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

    /// Sends what the driver queued on the transmit ring of pair `pair` to its TAP.
    fn serve_tx(&self, pair: usize, vring: &Vring<B>, tap: &dyn TapQueue) {
        loop {
            let Some(mut state) = self.pair(pair) else {
                return;
            };
            let mem = self.mem.current();
            let mut ring = vring.get_mut();
            if !ring.is_enabled() || !virtio_queue::QueueT::ready(ring.get_queue()) {
                return;
            }
            let guard = mem.memory();
            if !rings_in_memory(ring.get_queue(), guard.deref()) {
                if !std::mem::replace(&mut state.tx_broken, true) {
                    warn!(
                        "tx queue {}: its rings run past the end of guest memory; ignoring it \
                         until the driver sets it up again",
                        2 * pair + 1
                    );
                }
                return;
            }
            let result =
                state
                    .tx
                    .process(ring.get_queue_mut(), guard.deref(), tap, PACKETS_PER_BATCH);
            drop(guard);
            let outcome = match result {
                Ok(o) => o,
                Err(e) => {
                    if !std::mem::replace(&mut state.tx_broken, true) {
                        warn!(
                            "tx queue {}: {e}; ignoring it until the driver sets it up again",
                            2 * pair + 1
                        );
                    }
                    return;
                }
            };
            if let Some(bad) = &outcome.first_malformed {
                warn!(
                    "tx queue {}: {} malformed chain(s), first: head {}: {}",
                    2 * pair + 1,
                    outcome.malformed,
                    bad.head,
                    bad.error
                );
            }
            if let Some(e) = &outcome.first_tap_error {
                debug!(
                    "tx queue {}: {} packet(s) refused by {}: {e}",
                    2 * pair + 1,
                    outcome.tap_errors,
                    tap.if_name()
                );
            }
            if outcome.needs_notification {
                if let Err(e) = ring.signal_used_queue() {
                    warn!(
                        "tx queue {}: cannot signal the call eventfd: {e}",
                        2 * pair + 1
                    );
                }
            }
            if !outcome.more_pending {
                return;
            }
            drop(ring);
            drop(state);
            std::thread::yield_now();
        }
    }

    /// Keeps the TAP queue of pair `pair` attached while its receive ring runs (the first
    /// pair's always), so the kernel steers packets only to queues whose ring takes them. The
    /// frontend switches rings with `SET_VRING_ENABLE` (the driver's `VQ_PAIRS_SET`), which
    /// the backend crate does not report; the next event of the pair's worker catches up: the
    /// frontend kicks a ring it starts, and a stopped pair's TAP queue wakes the worker with
    /// the first packet steered to it.
    fn steer(&self, pair: usize, rx: &Vring<B>, tap: &dyn TapQueue) {
        let wanted = pair == 0 || rx.get_ref().is_enabled();
        if let Err(e) = tap.set_queue_enabled(wanted) {
            if let Some(mut state) = self.pair(pair) {
                if !std::mem::replace(&mut state.steer_failed, true) {
                    warn!(
                        "pair {pair}: cannot {} TAP queue {pair} of {}: {e}",
                        if wanted { "attach" } else { "detach" },
                        tap.if_name()
                    );
                }
            }
        }
    }

    /// Moves packets waiting on the TAP of pair `pair` into its receive ring.
    fn serve_rx(&self, pair: usize, vring: &Vring<B>, tap: &dyn TapQueue) {
        loop {
            let Some(mut state) = self.pair(pair) else {
                return;
            };
            if state.tap_failed {
                return;
            }
            let mem = self.mem.current();
            let mut ring = vring.get_mut();
            if !ring.is_enabled() || !virtio_queue::QueueT::ready(ring.get_queue()) {
                return;
            }
            let guard = mem.memory();
            if !rings_in_memory(ring.get_queue(), guard.deref()) {
                if !std::mem::replace(&mut state.rx_broken, true) {
                    warn!(
                        "rx queue {}: its rings run past the end of guest memory; ignoring it \
                         until the driver sets it up again",
                        2 * pair
                    );
                }
                return;
            }
            let result =
                state
                    .rx
                    .process(ring.get_queue_mut(), guard.deref(), tap, PACKETS_PER_BATCH);
            drop(guard);
            let outcome = match result {
                Ok(o) => o,
                Err(e) => {
                    if !std::mem::replace(&mut state.rx_broken, true) {
                        warn!(
                            "rx queue {}: {e}; ignoring it until the driver sets it up again",
                            2 * pair
                        );
                    }
                    return;
                }
            };
            if let Some(bad) = &outcome.first_malformed {
                warn!(
                    "rx queue {}: {} malformed chain(s), first: head {}: {}",
                    2 * pair,
                    outcome.malformed,
                    bad.head,
                    bad.error
                );
            }
            if outcome.needs_notification {
                if let Err(e) = ring.signal_used_queue() {
                    warn!("rx queue {}: cannot signal the call eventfd: {e}", 2 * pair);
                }
            }
            match outcome.stop {
                RxStop::Budget => {}
                // Wait for the TAP (edge-triggered: it was read until empty) or for the
                // driver's next kick on the receive queue.
                RxStop::TapEmpty | RxStop::NeedBuffers => return,
                RxStop::TapFailed(e) => {
                    state.tap_failed = true;
                    warn!(
                        "rx queue {}: reading {} failed: {e}; receiving stops",
                        2 * pair,
                        tap.if_name()
                    );
                    return;
                }
            }
            drop(ring);
            drop(state);
            std::thread::yield_now();
        }
    }
}

impl<B: Bitmap + 'static> AsRef<ExitEvents> for NetBackend<B> {
    fn as_ref(&self) -> &ExitEvents {
        &self.exit_events
    }
}

impl<B> VhostUserBackend for NetBackend<B>
where
    B: Bitmap + Send + Sync + 'static,
{
    type Bitmap = B;
    type Vring = Vring<B>;

    /// Receive and transmit queue of each pair. The control queue that [`net_util::features`]
    /// offers with more than one pair (`CTRL_VQ`) is not counted: the frontend serves it.
    fn num_queues(&self) -> usize {
        2 * self.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    /// [`net_util::features`] plus `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64 {
        self.features
    }

    /// A new driver session: fresh receive state for the negotiated features (`MRG_RXBUF`,
    /// `GUEST_CSUM`), and the TAP offloads that match them.
    fn acked_features(&self, features: u64) {
        debug!("driver features {features:#x}");
        self.acked.store(features, Ordering::Relaxed);
        self.reset_pairs(features, None);
        let flags = tap_offload_flags(features);
        for tap in &self.taps {
            if let Err(e) = tap.set_offload(flags) {
                warn!("{e}");
            }
        }
    }

    /// `MQ`, `CONFIG` and `REPLY_ACK`.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.reset_pairs(self.acked_features_value(), None);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// [`vhost_user_daemon::config_space::config_reply`] over the device's configuration.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_reply(offset, size, |at, buf| self.config.read(at, buf))
    }

    /// Ignored: the configuration space is read-only for a `VERSION_1` driver. Succeeding
    /// keeps the connection up (the crate drops it on an error).
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

    /// One worker thread per queue pair: thread `i` has rings `2i` (rx) and `2i + 1` (tx).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len()).map(|i| 0b11u64 << (2 * i)).collect()
    }

    /// A ring stopped (`GET_VRING_BASE`): a receive ring's held chains and waiting packet are
    /// dropped, as they belong to the ring's previous life.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if queue_index & 1 == 0 {
            self.reset_pairs(self.acked_features_value(), Some(queue_index as usize / 2));
        }
        Ok(())
    }

    /// The crate asks once per worker when the daemon is created; without an exit event a
    /// worker never ends and dropping the daemon (which joins the workers) hangs.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.take(thread_index)
    }

    /// A kick on the pair's receive (event 0) or transmit (event 1) ring, a ring just enabled,
    /// or the TAP queue became readable ([`tap_event`](Self::tap_event)). Whatever the event,
    /// the transmit ring is drained and then the TAP read until it is empty or the receive
    /// ring is full: cheap when there is nothing to do, and no edge of the edge-triggered TAP
    /// registration can be lost.
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
            debug!("pair {thread_id}: ignoring event set {evset:?} for {device_event}");
            return Ok(());
        }
        // An error return ends the worker thread for good; only an impossible call gets one.
        let (Some(rx), Some(tx), Some(tap)) =
            (vrings.first(), vrings.get(1), self.taps.get(thread_id))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("worker {thread_id} has no queue pair"),
            ));
        };
        self.steer(thread_id, rx, tap.as_ref());
        self.serve_tx(thread_id, tx, tap.as_ref());
        self.serve_rx(thread_id, rx, tap.as_ref());
        Ok(())
    }
}
