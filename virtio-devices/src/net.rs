//! virtio-net over TAP queues: feature set, configuration space and data path from the
//! `net_util` crate (shared with the vhost-user daemon), one worker thread (`_net<N>`) serving
//! every queue and TAP queue of the device.
//!
//! Queue pair `i` is receive queue `2i` and transmit queue `2i + 1` on TAP queue `i`; with more
//! than one pair the control queue comes last. The worker sleeps in epoll on the queues' kick
//! eventfds, the TAP descriptors of the pairs in use (readable) and a stop eventfd:
//!
//! - a transmit kick sends the chains to the TAP;
//! - a readable TAP moves packets into the receive queue; when the receive queue has no room
//!   the TAP leaves the epoll set (it is level-triggered and would wake the thread for
//!   nothing) until the driver kicks the receive queue;
//! - a control kick answers `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: the pairs past the count are
//!   detached from the multiqueue TAP, so the kernel steers no traffic to them.
//!
//! The device starts with one pair in use, as the spec requires, whatever was negotiated.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use net_util::{
    ctrl_queue_index, features_with_offloads, num_queues, process_ctrl, tap_offload_flags,
    CtrlCommand, MacAddr, NetError, NetRx, NetTx, Offloads, QueueError, RxStop, TapQueue,
    VirtioNetConfig, MIN_MTU, VNET_HDR_LEN,
};
use nimbus_log::error_chain;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::pause::{PauseError, PauseSwitch};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VirtioInterrupt,
};

/// Most queue pairs a device may have: the PCI transport has room for 256 MSI-X vectors (one
/// per queue plus one for configuration changes).
pub const MAX_QUEUE_PAIRS: usize = 64;
/// Transmit chains handled per queue before the worker looks at its other events.
const TX_BUDGET: usize = 256;
/// Received packets handled per TAP wake-up (the TAP is level-triggered: the rest wake it
/// again).
const RX_BUDGET: usize = 64;
/// Control commands handled per wake-up.
const CTRL_BUDGET: usize = 64;

const STOP_TOKEN: u64 = u64::MAX;
const PAUSE_TOKEN: u64 = u64::MAX - 1;
/// TAP tokens are `TAP_TOKEN | pair`; queue tokens are the queue index.
const TAP_TOKEN: u64 = 1 << 32;

/// Errors of a network device: bad parameters when it is created, or, in its worker, a broken
/// queue or epoll set (the device then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    /// No TAP queue was given.
    #[error("a network device needs at least one TAP queue")]
    NoTap,
    /// More TAP queues than [`MAX_QUEUE_PAIRS`].
    #[error("{0} queue pairs requested, at most {MAX_QUEUE_PAIRS}")]
    TooManyQueuePairs(usize),
    /// The queue size is not a power of two in 2..=32768.
    #[error("queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    /// The MTU is below the minimum a virtio-net device may report.
    #[error("MTU {0} is below {MIN_MTU}")]
    Mtu(u16),
    /// The guest MAC address is a group address.
    #[error("guest MAC address {0} is a multicast address")]
    MulticastMac(MacAddr),
    /// A TAP queue refused its virtio-net header size or offload settings, or to be attached
    /// or detached.
    #[error("cannot set up TAP {if_name}")]
    Tap {
        /// The interface.
        if_name: String,
        /// Cause.
        #[source]
        source: NetError,
    },
    /// The worker's epoll set cannot be waited on.
    #[error("cannot wait for the device's events")]
    Epoll(#[source] std::io::Error),
    /// A TAP cannot be added to or removed from the worker's epoll set.
    #[error("cannot poll TAP {if_name}")]
    PollTap {
        /// The interface.
        if_name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A queue is broken.
    #[error("{role} queue {index}")]
    Queue {
        /// `receive`, `transmit` or `control`.
        role: &'static str,
        /// Queue index.
        index: u16,
        /// Cause.
        #[source]
        source: QueueError,
    },
}

impl NetDeviceError {
    /// A [`NetDeviceError::Queue`] for queue `index` in `role`.
    fn queue(role: &'static str, index: u16) -> impl FnOnce(QueueError) -> Self {
        move |source| NetDeviceError::Queue {
            role,
            index,
            source,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    malformed_chains: AtomicU64,
    wakeups: AtomicU64,
}

/// Traffic counters of a [`Net`] device since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Packets delivered to the guest.
    pub rx_frames: u64,
    /// Bytes of those packets (Ethernet frames, virtio-net headers excluded).
    pub rx_bytes: u64,
    /// Packets from the TAP dropped (did not fit the guest's buffers, runts).
    pub rx_dropped: u64,
    /// Packets from the guest the TAP accepted.
    pub tx_frames: u64,
    /// Bytes of those packets.
    pub tx_bytes: u64,
    /// Packets from the guest dropped (malformed, too big, refused by the TAP).
    pub tx_dropped: u64,
    /// Descriptor chains, on any queue, that were malformed and returned with length 0.
    pub malformed_chains: u64,
    /// Times the worker thread woke up, a measure of how busy (or how spinning) it is.
    pub wakeups: u64,
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    taps: Vec<Arc<dyn TapQueue>>,
    config: VirtioNetConfig,
    mtu: Option<u16>,
    features: u64,
    queue_sizes: Vec<u16>,
    name: String,
    counters: Arc<Counters>,
    worker: Option<NetWorker>,
}

impl Net {
    /// A device with one queue pair per TAP queue in `taps` (see `net_util::Tap::open_named`
    /// and `Tap::from_fd`), guest address `mac`, queues of `queue_size` entries and, if given,
    /// an MTU to announce; its thread is called `name` (e.g. `_net0`).
    ///
    /// Each TAP queue gets the 12-byte virtio-net header and no offloads until a driver
    /// negotiates some. The TAP queues stay with the device across resets.
    ///
    /// # Errors
    ///
    /// A [`NetDeviceError`] for bad parameters or a TAP that refuses its settings.
    pub fn new<T: TapQueue + 'static>(
        taps: Vec<T>,
        mac: MacAddr,
        queue_size: u16,
        mtu: Option<u16>,
        name: String,
    ) -> Result<Self, NetDeviceError> {
        let pairs = taps.len();
        if pairs == 0 {
            return Err(NetDeviceError::NoTap);
        }
        if pairs > MAX_QUEUE_PAIRS {
            return Err(NetDeviceError::TooManyQueuePairs(pairs));
        }
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(NetDeviceError::QueueSize(queue_size));
        }
        if let Some(m) = mtu.filter(|&m| m < MIN_MTU) {
            return Err(NetDeviceError::Mtu(m));
        }
        if mac.is_multicast() {
            return Err(NetDeviceError::MulticastMac(mac));
        }
        for tap in &taps {
            tap.set_vnet_hdr_size(VNET_HDR_LEN)
                .and_then(|()| tap.set_offload(0))
                .map_err(|source| NetDeviceError::Tap {
                    if_name: tap.if_name().to_string(),
                    source,
                })?;
        }
        Ok(Net {
            taps: taps
                .into_iter()
                .map(|t| Arc::new(t) as Arc<dyn TapQueue>)
                .collect(),
            config: VirtioNetConfig::new(mac, pairs, mtu),
            mtu,
            features: features_with_offloads(pairs, mtu, Offloads::default()),
            queue_sizes: vec![queue_size; num_queues(pairs)],
            name,
            counters: Arc::new(Counters::default()),
            worker: None,
        })
    }

    /// Offers only the offloads `offloads` allows (all by default).
    pub fn with_offloads(mut self, offloads: Offloads) -> Self {
        self.features = features_with_offloads(self.taps.len(), self.mtu, offloads);
        self
    }

    /// The traffic counters.
    pub fn counters(&self) -> NetCounters {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: get(&c.rx_frames),
            rx_bytes: get(&c.rx_bytes),
            rx_dropped: get(&c.rx_dropped),
            tx_frames: get(&c.tx_frames),
            tx_bytes: get(&c.tx_bytes),
            tx_dropped: get(&c.tx_dropped),
            malformed_chains: get(&c.malformed_chains),
            wakeups: get(&c.wakeups),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio_chain::read_config(self.config.as_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let num_pairs = self.taps.len();
        let ctrl_index = ctrl_queue_index(num_pairs, a.features);
        let mut rx: Vec<Option<ActiveQueue>> = (0..num_pairs).map(|_| None).collect();
        let mut tx: Vec<Option<ActiveQueue>> = (0..num_pairs).map(|_| None).collect();
        let mut ctrl = None;
        for q in a.queues {
            let i = usize::from(q.index);
            if Some(i) == ctrl_index {
                ctrl = Some(q);
                continue;
            }
            let role = if i.is_multiple_of(2) {
                &mut rx
            } else {
                &mut tx
            };
            match role.get_mut(i / 2) {
                Some(slot) => *slot = Some(q),
                None => return Err(ActivateError::InvalidSetup(format!("no queue {i}"))),
            }
        }
        let enabled = |v: &[Option<ActiveQueue>]| matches!(v.first(), Some(Some(_)));
        if !enabled(&rx) || !enabled(&tx) {
            return Err(ActivateError::InvalidSetup(
                "receiveq1 and transmitq1 must be enabled".into(),
            ));
        }
        let offload = tap_offload_flags(a.features);
        for (i, tap) in self.taps.iter().enumerate() {
            // One pair in use until the driver asks for more (virtio 1.2, 5.1.6.5.5).
            tap.set_offload(offload)
                .and_then(|()| tap.set_queue_enabled(i == 0))
                .map_err(|e| ActivateError::Resource(std::io::Error::other(e)))?;
        }
        let pairs = self
            .taps
            .iter()
            .zip(rx.into_iter().zip(tx))
            .map(|(tap, (rx, tx))| Pair {
                tap: tap.clone(),
                rx,
                tx,
                net_rx: NetRx::new(a.features),
                net_tx: NetTx::new(),
                tap_polled: false,
                tap_failed: false,
                tx_pending: false,
            })
            .collect();
        let state = NetLoop {
            name: self.name.clone(),
            mem: a.mem,
            interrupt: a.interrupt,
            epoll: Epoll::new().map_err(ActivateError::Resource)?,
            pairs,
            ctrl,
            ctrl_pending: false,
            active_pairs: 1,
            mq: a.features & (1 << VIRTIO_NET_F_MQ) != 0,
            counters: self.counters.clone(),
            warned_tap_error: false,
            pause: Arc::new(PauseSwitch::new(&self.name).map_err(ActivateError::Resource)?),
        };
        self.worker =
            Some(NetWorker::spawn(self.name.clone(), state).map_err(ActivateError::Resource)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.as_ref().map_or(Ok(()), |w| w.pause.pause())
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.pause.resume();
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters();
        vec![
            ("rx_bytes", c.rx_bytes),
            ("rx_frames", c.rx_frames),
            ("tx_bytes", c.tx_bytes),
            ("tx_frames", c.tx_frames),
        ]
    }
}

/// The running worker thread.
#[derive(Debug)]
struct NetWorker {
    stop: EventFd,
    pause: Arc<PauseSwitch>,
    handle: Option<JoinHandle<()>>,
}

impl NetWorker {
    fn spawn(name: String, mut state: NetLoop) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        state.epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for pair in &state.pairs {
            for q in pair.rx.iter().chain(pair.tx.iter()) {
                state.epoll.ctl(
                    ControlOperation::Add,
                    q.kick.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, u64::from(q.index)),
                )?;
            }
        }
        if let Some(q) = &state.ctrl {
            state.epoll.ctl(
                ControlOperation::Add,
                q.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, u64::from(q.index)),
            )?;
        }
        let pause = state.pause.clone();
        state.epoll.ctl(
            ControlOperation::Add,
            pause.fd(),
            EpollEvent::new(EventSet::IN, PAUSE_TOKEN),
        )?;
        let handle =
            nimbus_thread::spawn(nimbus_thread::ThreadClass::DeviceWorker, name, move || {
                if let Err(e) = state.run() {
                    log::error!("{}: {}; device needs reset", state.name, error_chain(&e));
                    state.interrupt.needs_reset();
                }
            })?;
        Ok(NetWorker {
            stop,
            pause,
            handle: Some(handle),
        })
    }

    fn stop(mut self) {
        self.join();
    }

    fn join(&mut self) {
        self.pause.exit();
        let _ = self.stop.write(1);
        if let Some(Err(_)) = self.handle.take().map(JoinHandle::join) {
            log::error!("virtio-net worker thread panicked");
        }
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.join();
        }
    }
}

/// One queue pair, as the worker sees it.
struct Pair {
    tap: Arc<dyn TapQueue>,
    rx: Option<ActiveQueue>,
    tx: Option<ActiveQueue>,
    net_rx: NetRx,
    net_tx: NetTx,
    /// The TAP is in the epoll set.
    tap_polled: bool,
    /// Reading the TAP failed: it is not polled again until the next activation.
    tap_failed: bool,
    /// The transmit budget ran out with chains left.
    tx_pending: bool,
}

/// Adds or removes the TAP of pair `index` from the epoll set.
fn poll_tap(epoll: &Epoll, pair: &mut Pair, index: usize, on: bool) -> Result<(), NetDeviceError> {
    if pair.tap_polled == on {
        return Ok(());
    }
    let fd = pair.tap.as_raw_fd();
    let result = if on {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TAP_TOKEN | index as u64),
        )
    } else {
        epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    };
    result.map_err(|source| NetDeviceError::PollTap {
        if_name: pair.tap.if_name().to_string(),
        source,
    })?;
    pair.tap_polled = on;
    Ok(())
}

/// The worker thread's state.
struct NetLoop {
    name: String,
    mem: GuestMemoryAtomic,
    interrupt: Arc<dyn VirtioInterrupt>,
    epoll: Epoll,
    pairs: Vec<Pair>,
    ctrl: Option<ActiveQueue>,
    ctrl_pending: bool,
    /// Pairs the driver uses (`VQ_PAIRS_SET`); TAPs of the others are detached and not polled.
    active_pairs: usize,
    mq: bool,
    counters: Arc<Counters>,
    warned_tap_error: bool,
    pause: Arc<PauseSwitch>,
}

impl NetLoop {
    /// Serves the device until the stop eventfd fires; an error means the device is broken.
    fn run(&mut self) -> Result<(), NetDeviceError> {
        // Buffers and packets may be waiting from before activation.
        for p in 0..self.pairs.len() {
            self.rx(p)?;
            self.tx(p)?;
        }
        self.ctrl()?;
        let mut events = vec![EpollEvent::default(); 2 * self.pairs.len() + 8];
        loop {
            let busy = self.ctrl_pending || self.pairs.iter().any(|p| p.tx_pending);
            let n = match self.epoll.wait(if busy { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetDeviceError::Epoll(e)),
            };
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            for ev in &events[..n] {
                let token = ev.data();
                if token == STOP_TOKEN {
                    return Ok(());
                }
                if token == PAUSE_TOKEN {
                    if !self.pause.park_if_asked() {
                        return Ok(());
                    }
                    // Events gathered before the pause may be stale: wait again.
                    break;
                }
                if token & TAP_TOKEN != 0 {
                    self.rx((token & !TAP_TOKEN) as usize)?;
                    continue;
                }
                self.kicked(token as usize)?;
            }
            for p in 0..self.pairs.len() {
                if self.pairs[p].tx_pending {
                    self.tx(p)?;
                }
            }
            if self.ctrl_pending {
                self.ctrl()?;
            }
        }
    }

    /// The driver notified queue `index`.
    fn kicked(&mut self, index: usize) -> Result<(), NetDeviceError> {
        if self.ctrl.as_ref().map(|q| usize::from(q.index)) == Some(index) {
            if let Some(q) = &self.ctrl {
                let _ = q.kick.read();
            }
            return self.ctrl();
        }
        let pair = index / 2;
        let Some(p) = self.pairs.get(pair) else {
            return Ok(());
        };
        let q = if index.is_multiple_of(2) {
            &p.rx
        } else {
            &p.tx
        };
        if let Some(q) = q {
            let _ = q.kick.read();
        }
        if index.is_multiple_of(2) {
            // New receive buffers: deliver a waiting packet and poll the TAP again.
            self.rx(pair)
        } else {
            self.tx(pair)
        }
    }

    fn rx(&mut self, index: usize) -> Result<(), NetDeviceError> {
        let active = index < self.active_pairs;
        let Some(pair) = self.pairs.get_mut(index) else {
            return Ok(());
        };
        let Some(q) = pair.rx.as_mut().filter(|_| active && !pair.tap_failed) else {
            return poll_tap(&self.epoll, pair, index, false);
        };
        let mem = self.mem.memory();
        let out = pair
            .net_rx
            .process(&mut q.queue, &*mem, pair.tap.as_ref(), RX_BUDGET)
            .map_err(NetDeviceError::queue("receive", q.index))?;
        let c = &self.counters;
        c.rx_frames.fetch_add(out.frames as u64, Ordering::Relaxed);
        c.rx_bytes.fetch_add(out.bytes, Ordering::Relaxed);
        c.rx_dropped
            .fetch_add(out.dropped as u64, Ordering::Relaxed);
        c.malformed_chains
            .fetch_add(out.malformed as u64, Ordering::Relaxed);
        if let Some(bad) = &out.first_malformed {
            nimbus_log::warn_limited!(
                "{}: receive queue {}: {} malformed chain(s), first {}: {}",
                self.name,
                q.index,
                out.malformed,
                bad.head,
                bad.error
            );
        }
        if out.needs_notification {
            self.interrupt.signal_queue(q.index);
        }
        let poll = match out.stop {
            RxStop::TapEmpty | RxStop::Budget => true,
            RxStop::NeedBuffers => false,
            RxStop::TapFailed(e) => {
                log::error!(
                    "{}: TAP {} cannot be read, receiving stops: {e}",
                    self.name,
                    pair.tap.if_name()
                );
                pair.tap_failed = true;
                false
            }
        };
        poll_tap(&self.epoll, pair, index, poll)
    }

    fn tx(&mut self, index: usize) -> Result<(), NetDeviceError> {
        let Some(pair) = self.pairs.get_mut(index) else {
            return Ok(());
        };
        let Some(q) = pair.tx.as_mut() else {
            return Ok(());
        };
        let mem = self.mem.memory();
        let out = pair
            .net_tx
            .process(&mut q.queue, &*mem, pair.tap.as_ref(), TX_BUDGET)
            .map_err(NetDeviceError::queue("transmit", q.index))?;
        pair.tx_pending = out.more_pending;
        let c = &self.counters;
        c.tx_frames.fetch_add(out.frames as u64, Ordering::Relaxed);
        c.tx_bytes.fetch_add(out.bytes, Ordering::Relaxed);
        c.tx_dropped
            .fetch_add((out.malformed + out.tap_errors) as u64, Ordering::Relaxed);
        c.malformed_chains
            .fetch_add(out.malformed as u64, Ordering::Relaxed);
        if let Some(bad) = &out.first_malformed {
            nimbus_log::warn_limited!(
                "{}: transmit queue {}: {} malformed chain(s), first {}: {}",
                self.name,
                q.index,
                out.malformed,
                bad.head,
                bad.error
            );
        }
        if let Some(e) = &out.first_tap_error {
            // A TAP that is down refuses every packet: say it once per activation.
            if !self.warned_tap_error {
                log::warn!(
                    "{}: TAP {} refuses packets ({e}); dropping them",
                    self.name,
                    pair.tap.if_name()
                );
                self.warned_tap_error = true;
            }
        }
        if out.needs_notification {
            self.interrupt.signal_queue(q.index);
        }
        Ok(())
    }

    fn ctrl(&mut self) -> Result<(), NetDeviceError> {
        let Some(q) = self.ctrl.as_mut() else {
            return Ok(());
        };
        let mem = self.mem.memory();
        let (name, mq, epoll) = (&self.name, self.mq, &self.epoll);
        let (pairs, active) = (&mut self.pairs, &mut self.active_pairs);
        let before = *active;
        let out = process_ctrl(&mut q.queue, &*mem, CTRL_BUDGET, &mut |cmd| match cmd {
            CtrlCommand::MqVqPairsSet(n) => {
                let n = usize::from(n);
                if !mq || n == 0 || n > pairs.len() {
                    log::warn!(
                        "{name}: driver asked for {n} queue pairs of {}",
                        pairs.len()
                    );
                    return false;
                }
                match set_active_pairs(epoll, pairs, n) {
                    Ok(()) => {
                        *active = n;
                        true
                    }
                    Err(e) => {
                        log::warn!("{name}: cannot use {n} queue pairs: {}", error_chain(&e));
                        false
                    }
                }
            }
            CtrlCommand::Unsupported { class, command } => {
                log::debug!("{name}: unsupported control command {class}.{command}");
                false
            }
        })
        .map_err(NetDeviceError::queue("control", q.index))?;
        self.ctrl_pending = out.more_pending;
        self.counters
            .malformed_chains
            .fetch_add(out.malformed as u64, Ordering::Relaxed);
        if out.needs_notification {
            self.interrupt.signal_queue(q.index);
        }
        drop(mem);
        if self.active_pairs > before {
            // Newly used pairs may hold packets read before they were set aside.
            for p in before..self.active_pairs {
                self.rx(p)?;
            }
        }
        Ok(())
    }
}

/// Attaches the TAP queues of the first `n` pairs, detaches the others, and polls accordingly.
fn set_active_pairs(epoll: &Epoll, pairs: &mut [Pair], n: usize) -> Result<(), NetDeviceError> {
    for (i, pair) in pairs.iter_mut().enumerate() {
        let on = i < n;
        pair.tap
            .set_queue_enabled(on)
            .map_err(|source| NetDeviceError::Tap {
                if_name: pair.tap.if_name().to_string(),
                source,
            })?;
        let poll = on && pair.rx.is_some() && !pair.tap_failed;
        poll_tap(epoll, pair, i, poll)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use net_util::testing::{in_new_netns, Buf, PacketSocket, TestDriver};
    use net_util::{features, FakeTap, FakeTapPeer, Tap, CTRL_ACK_ERR, CTRL_ACK_OK};
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF,
    };
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::VIRTIO_F_VERSION_1;

    const MEM_SIZE: u64 = 0x80_0000;
    const AREA: u64 = 0x10_0000;
    const QSIZE: u16 = 16;

    #[derive(Debug, Default)]
    struct FakeInterrupt {
        queues: Mutex<Vec<u16>>,
        needs_reset: AtomicBool,
    }

    impl VirtioInterrupt for FakeInterrupt {
        fn signal_queue(&self, queue: u16) {
            self.queues.lock().unwrap().push(queue);
        }
        fn signal_config(&self) {}
        fn needs_reset(&self) {
            self.needs_reset.store(true, Ordering::SeqCst);
        }
    }

    impl FakeInterrupt {
        fn signalled(&self, queue: u16) -> bool {
            self.queues.lock().unwrap().contains(&queue)
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A guest: memory, one test driver per queue, the kick eventfds and the interrupts.
    struct Guest {
        mem: GuestMemoryMmap,
        drivers: Vec<TestDriver>,
        kicks: Vec<EventFd>,
        interrupt: Arc<FakeInterrupt>,
    }

    impl Guest {
        fn new(num_queues: usize) -> Self {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .unwrap();
            let drivers = (0..num_queues)
                .map(|i| TestDriver::new(&mem, QSIZE, AREA * (i as u64 + 1), AREA))
                .collect();
            let kicks = (0..num_queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect();
            Guest {
                mem,
                drivers,
                kicks,
                interrupt: Arc::new(FakeInterrupt::default()),
            }
        }

        fn activation(&self, features: u64) -> Activation {
            let event_idx = features & crate::VIRTIO_RING_F_EVENT_IDX != 0;
            Activation {
                mem: GuestMemoryAtomic::new(self.mem.clone()),
                features,
                interrupt: self.interrupt.clone(),
                queues: self
                    .drivers
                    .iter()
                    .zip(&self.kicks)
                    .enumerate()
                    .map(|(i, (d, k))| ActiveQueue {
                        index: i as u16,
                        queue: d.queue(event_idx),
                        kick: k.try_clone().unwrap(),
                    })
                    .collect(),
            }
        }

        fn kick(&self, queue: usize) {
            self.kicks[queue].write(1).unwrap();
        }

        /// Waits for `n` used entries on `queue`.
        fn wait_used(&mut self, queue: usize, n: usize) -> Vec<(u32, u32)> {
            let mut used = Vec::new();
            let d = &mut self.drivers[queue];
            wait_until("used buffers", || {
                used.extend(d.take_used());
                used.len() >= n
            });
            used
        }
    }

    fn packet(len: usize, seed: u8) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p.extend((0..len).map(|i| (i as u8).wrapping_mul(3) ^ seed));
        p
    }

    fn mac() -> MacAddr {
        "52:54:00:12:34:56".parse().unwrap()
    }

    fn fake_taps(n: usize) -> (Vec<FakeTap>, Vec<FakeTapPeer>) {
        (0..n)
            .map(|i| FakeTap::new(&format!("fake{i}")).unwrap())
            .unzip()
    }

    #[test]
    fn config_features_and_parameters() {
        let (taps, peers) = fake_taps(1);
        let net = Net::new(taps, mac(), 256, Some(1400), "_net0".into()).unwrap();
        assert_eq!(peers[0].vnet_hdr_size(), VNET_HDR_LEN);
        assert_eq!(net.device_type(), device_type::NET);
        assert_eq!(net.queue_max_sizes(), vec![256, 256]);
        assert_eq!(net.features(), features(1, Some(1400)));
        let mut cfg = [0u8; 12];
        net.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &mac().bytes());
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400);

        let (taps, _peers) = fake_taps(2);
        let net = Net::new(taps, mac(), 64, None, "_net1".into())
            .unwrap()
            .with_offloads(Offloads {
                tso: false,
                ..Default::default()
            });
        assert_eq!(net.queue_max_sizes().len(), 5);
        assert_ne!(net.features() & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
        assert_eq!(tap_offload_flags(net.features()) & libc::TUN_F_TSO4, 0);

        assert!(matches!(
            Net::new(Vec::<FakeTap>::new(), mac(), 256, None, "x".into()),
            Err(NetDeviceError::NoTap)
        ));
        assert!(matches!(
            Net::new(fake_taps(1).0, mac(), 100, None, "x".into()),
            Err(NetDeviceError::QueueSize(100))
        ));
        assert!(matches!(
            Net::new(fake_taps(1).0, mac(), 256, Some(67), "x".into()),
            Err(NetDeviceError::Mtu(67))
        ));
        let group = MacAddr::from_bytes([1, 0, 0x5e, 0, 0, 1]);
        assert!(matches!(
            Net::new(fake_taps(1).0, group, 256, None, "x".into()),
            Err(NetDeviceError::MulticastMac(_))
        ));
        assert!(matches!(
            Net::new(fake_taps(65).0, mac(), 256, None, "x".into()),
            Err(NetDeviceError::TooManyQueuePairs(65))
        ));
    }

    #[test]
    fn packets_flow_both_ways_through_the_worker() {
        for event_idx in [false, true] {
            let (taps, peers) = fake_taps(1);
            let mut net = Net::new(taps, mac(), QSIZE, None, "_net0".into()).unwrap();
            let mut g = Guest::new(2);
            let mut feats = VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_GUEST_CSUM);
            if event_idx {
                feats |= crate::VIRTIO_RING_F_EVENT_IDX;
            }
            net.activate(g.activation(feats)).unwrap();
            assert_eq!(peers[0].offload(), libc::TUN_F_CSUM);

            // Transmit.
            let p = packet(300, 1);
            let a = g.drivers[1].alloc_data(&p);
            g.drivers[1].add_chain(&[Buf::r(a, 12), Buf::r(a + 12, 300)]);
            g.kick(1);
            let got = peers[0].recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(got.unwrap(), p);
            assert_eq!(g.wait_used(1, 1), vec![(0, 0)]);
            wait_until("tx interrupt", || g.interrupt.signalled(1));

            // Receive: the packet waits in the device until the driver adds a buffer.
            let q = packet(500, 2);
            peers[0].send(&q).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            assert!(g.drivers[0].take_used().is_empty());
            let b = g.drivers[0].alloc(2048, 0);
            g.drivers[0].add_chain(&[Buf::w(b, 2048)]);
            g.kick(0);
            assert_eq!(g.wait_used(0, 1), vec![(0, 512)]);
            let mut expect = q.clone();
            expect[10] = 1; // num_buffers
            assert_eq!(g.drivers[0].read(b, 512), expect);
            wait_until("rx interrupt", || g.interrupt.signalled(0));

            let c = net.counters();
            assert_eq!(
                (c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes),
                (1, 300, 1, 500)
            );
            net.reset();
            assert!(!g.interrupt.needs_reset.load(Ordering::SeqCst));
        }
    }

    #[test]
    fn an_empty_receive_queue_does_not_make_the_worker_spin() {
        let (taps, peers) = fake_taps(1);
        let mut net = Net::new(taps, mac(), QSIZE, None, "_net0".into()).unwrap();
        let mut g = Guest::new(2);
        net.activate(g.activation(VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MRG_RXBUF)))
            .unwrap();
        // Packets wait in the TAP; with the TAP still polled the thread would spin.
        for i in 0..3 {
            peers[0].send(&packet(100, i)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let wakeups = net.counters().wakeups;
        assert!(wakeups < 10, "{wakeups} wake-ups while waiting for buffers");
        // Buffers arrive: all three packets are delivered.
        for _ in 0..3 {
            let b = g.drivers[0].alloc(1600, 0);
            g.drivers[0].add_chain(&[Buf::w(b, 1600)]);
        }
        g.kick(0);
        assert_eq!(g.wait_used(0, 3).len(), 3);
        assert_eq!(net.counters().rx_frames, 3);

        // A TAP that fails (here: end of file) is dropped from the set, not spun on.
        drop(peers);
        std::thread::sleep(Duration::from_millis(200));
        let before = net.counters().wakeups;
        std::thread::sleep(Duration::from_millis(200));
        assert!(net.counters().wakeups - before < 5);
        net.reset();
    }

    #[test]
    fn malformed_chains_are_counted_and_a_broken_ring_needs_reset() {
        let (taps, peers) = fake_taps(1);
        let mut net = Net::new(taps, mac(), QSIZE, None, "_net0".into()).unwrap();
        let mut g = Guest::new(2);
        net.activate(g.activation(VIRTIO_F_VERSION_1)).unwrap();
        let a = g.drivers[1].alloc_data(&packet(64, 0));
        // Outside memory, huge, then fine.
        g.drivers[1].add_chain(&[Buf::r(MEM_SIZE, 76)]);
        g.drivers[1].add_chain(&[Buf::r(a, u32::MAX)]);
        g.drivers[1].add_chain(&[Buf::r(a, 76)]);
        g.kick(1);
        assert_eq!(g.wait_used(1, 3), vec![(0, 0), (1, 0), (2, 0)]);
        assert!(peers[0]
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some());
        let c = net.counters();
        assert_eq!((c.malformed_chains, c.tx_dropped, c.tx_frames), (2, 2, 1));
        assert!(!g.interrupt.needs_reset.load(Ordering::SeqCst));

        // A head index beyond the queue: the device stops and asks for a reset.
        g.drivers[1].push_avail(1000);
        g.kick(1);
        wait_until("needs reset", || {
            g.interrupt.needs_reset.load(Ordering::SeqCst)
        });
        net.reset();
    }

    #[test]
    fn control_queue_sets_the_queue_pairs_in_use() {
        let (taps, peers) = fake_taps(2);
        let mut net = Net::new(taps, mac(), QSIZE, None, "_net0".into()).unwrap();
        let mut g = Guest::new(5);
        let feats = net.features() & !crate::VIRTIO_RING_F_EVENT_IDX;
        net.activate(g.activation(feats)).unwrap();
        assert!(peers[0].queue_enabled());
        assert!(!peers[1].queue_enabled(), "only the first pair at start");

        // A packet on the second TAP queue waits until the pair is in use.
        peers[1].send(&packet(80, 7)).unwrap();
        let b = g.drivers[2].alloc(1600, 0);
        g.drivers[2].add_chain(&[Buf::w(b, 1600)]);
        g.kick(2);
        std::thread::sleep(Duration::from_millis(20));
        assert!(g.drivers[2].take_used().is_empty());

        let cmd = g.drivers[4].alloc_data(&[4, 0, 2, 0]);
        let ack = g.drivers[4].alloc(1, 0xff);
        g.drivers[4].add_chain(&[Buf::r(cmd, 4), Buf::w(ack, 1)]);
        let bad = g.drivers[4].alloc_data(&[4, 0, 3, 0]);
        let ack2 = g.drivers[4].alloc(1, 0xff);
        g.drivers[4].add_chain(&[Buf::r(bad, 4), Buf::w(ack2, 1)]);
        g.kick(4);
        assert_eq!(g.wait_used(4, 2), vec![(0, 1), (2, 1)]);
        assert_eq!(g.drivers[4].read(ack, 1)[0], CTRL_ACK_OK);
        assert_eq!(g.drivers[4].read(ack2, 1)[0], CTRL_ACK_ERR);
        assert!(peers[1].queue_enabled());
        assert_eq!(g.wait_used(2, 1), vec![(0, 92)]);
        wait_until("rx interrupt on queue 2", || g.interrupt.signalled(2));

        // Transmit on the second pair goes to its TAP queue.
        let p = packet(64, 9);
        let a = g.drivers[3].alloc_data(&p);
        g.drivers[3].add_chain(&[Buf::r(a, 76)]);
        g.kick(3);
        assert_eq!(
            peers[1]
                .recv_timeout(Duration::from_secs(5))
                .unwrap()
                .unwrap(),
            p
        );

        // Back to one pair.
        let one = g.drivers[4].alloc_data(&[4, 0, 1, 0]);
        let ack3 = g.drivers[4].alloc(1, 0xff);
        g.drivers[4].add_chain(&[Buf::r(one, 4), Buf::w(ack3, 1)]);
        g.kick(4);
        g.wait_used(4, 1);
        assert_eq!(g.drivers[4].read(ack3, 1)[0], CTRL_ACK_OK);
        assert!(!peers[1].queue_enabled());
        net.reset();
    }

    #[test]
    fn reset_stops_the_worker_and_the_device_starts_again() {
        let (taps, peers) = fake_taps(1);
        let mut net = Net::new(taps, mac(), QSIZE, None, "_net7".into()).unwrap();
        let g = Guest::new(2);
        net.activate(g.activation(VIRTIO_F_VERSION_1)).unwrap();
        net.reset();
        net.reset();
        // A fresh driver after the reset.
        let mut g = Guest::new(2);
        net.activate(g.activation(VIRTIO_F_VERSION_1)).unwrap();
        let a = g.drivers[1].alloc_data(&packet(64, 0));
        g.drivers[1].add_chain(&[Buf::r(a, 76)]);
        g.kick(1);
        assert!(peers[0]
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some());
        g.wait_used(1, 1);
        // Only the transmit queue enabled: refused.
        let mut act = g.activation(VIRTIO_F_VERSION_1);
        act.queues.remove(0);
        net.reset();
        assert!(matches!(
            net.activate(act),
            Err(ActivateError::InvalidSetup(_))
        ));
        // Dropping a running device joins its thread.
        net.activate(g.activation(VIRTIO_F_VERSION_1)).unwrap();
        drop(net);
    }

    #[test]
    fn real_tap_in_a_network_namespace() {
        in_new_netns("real_tap_in_a_network_namespace", || {
            let taps = Tap::open_named("nimbus-dev0", 1).unwrap();
            taps[0].set_up().unwrap();
            let sock = PacketSocket::bind("nimbus-dev0");
            let mut net = Net::new(taps, mac(), QSIZE, None, "_net0".into()).unwrap();
            let mut g = Guest::new(2);
            let feats = net.features() & !crate::VIRTIO_RING_F_EVENT_IDX;
            net.activate(g.activation(feats)).unwrap();
            let b = g.drivers[0].alloc(4096, 0);
            g.drivers[0].add_chain(&[Buf::w(b, 4096)]);
            g.kick(0);

            // Guest → wire.
            let mut frame = vec![0xff; 6];
            frame.extend_from_slice(&mac().bytes());
            frame.extend_from_slice(&0x88b5u16.to_be_bytes());
            frame.extend((0..100).map(|i| i as u8));
            let mut p = vec![0u8; VNET_HDR_LEN];
            p.extend_from_slice(&frame);
            let a = g.drivers[1].alloc_data(&p);
            g.drivers[1].add_chain(&[Buf::r(a, p.len() as u32)]);
            g.kick(1);
            let seen = sock.recv_ethertype(0x88b5, Duration::from_secs(5)).unwrap();
            assert_eq!(seen, frame);

            // Wire → guest (other traffic, such as IPv6 router solicitations, may come first).
            let mut back = mac().bytes().to_vec();
            back.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            back.extend_from_slice(&0x88b5u16.to_be_bytes());
            back.extend((0..200).map(|i| (i as u8) ^ 0x5a));
            sock.send(&back);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let used = g.wait_used(0, 1);
                let len = used[0].1 as usize;
                let got = g.drivers[0].read(b, len);
                if got[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5] {
                    assert_eq!(&got[VNET_HDR_LEN..], &back[..]);
                    break;
                }
                assert!(Instant::now() < deadline);
                g.drivers[0].add_chain(&[Buf::w(b, 4096)]);
                g.kick(0);
            }
            net.reset();
        });
    }
}
