//! The connections of a vsock device and the Unix sockets behind them (Cloud Hypervisor's
//! hybrid backend): the device worker's [`QueueHandler`].
//!
//! Host-initiated: a client connects to the device's listening socket and writes
//! `CONNECT <port>\n`; the guest gets a `REQUEST`; on its `RESPONSE` the client reads
//! `OK <host_port>\n` and the bytes flow; on its `RST` the client is closed without a reply.
//! Guest-initiated: a `REQUEST` to host port P connects to `<socket>_<P>`; the guest gets a
//! `RESPONSE`, or an `RST` when nothing listens there.
//!
//! Flow control is credit-based both ways: the device reads a host socket only while the
//! guest has room for the bytes (its `buf_alloc` less what it has not forwarded yet), so a
//! slow guest reader leaves the bytes in the host socket and the host writer blocks; bytes
//! from the guest the host socket does not take at once wait in a buffer of at most
//! [`Limits::buf_alloc`], the room the device advertises, so a slow host reader stops the
//! guest's sender. A guest that sends past its credit loses the connection (RST).
//!
//! The host sockets sit in an epoll set of their own whose descriptor the worker watches
//! ([`QueueHandler::extra_fd`]).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_chain::queue::{add_used, needs_notification, pop, QueueDrain};
use virtio_chain::{split, QueueError, SgList};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::host::{connect_nonblocking, peek};
use super::packet::{
    op, parse_connect_line, Header, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::ring::Ring;
use super::{VsockError, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::worker::QueueHandler;
use crate::{ActiveQueue, GuestMemoryAtomic};

/// The bounds of one device (docs/security.md, "Resource limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Host connections at once, in every state (waiting for their `CONNECT` line, for the
    /// guest's answer, established); one more is closed at once, a guest request gets an RST.
    pub max_connections: usize,
    /// Receive room the device advertises per connection: the most bytes from the guest it
    /// holds for a host socket that does not read.
    pub buf_alloc: u32,
    /// How long a host client may take to send its `CONNECT` line, and the guest to answer
    /// the request.
    pub connect_timeout: Duration,
    /// Resets queued for packets that belong to no connection; more are dropped.
    pub max_stray_resets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            buf_alloc: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_stray_resets: 256,
        }
    }
}

/// The largest payload of one packet either way (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// The first host port given to host-initiated connections (Cloud Hypervisor's choice too).
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Chains served per pass before the worker looks at its other events.
const BUDGET: usize = 256;

/// Host clients accepted per round of events.
const MAX_ACCEPTS_PER_ROUND: usize = 64;

const LISTENER: u64 = 0;
const WORK: u64 = 1;
const TIMER: u64 = 2;
const FIRST_CONN: u64 = 16;

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A host client that has not sent its `CONNECT` line yet.
    AwaitingLine { since: Instant },
    /// `REQUEST` sent to the guest for a host client; waiting for its answer.
    Connecting { since: Instant },
    /// Bytes flow.
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    key: Option<Key>,
    /// Bytes of a `CONNECT` line read so far.
    line: Vec<u8>,
    /// Guest bytes the host socket has not taken yet (at most `buf_alloc`); made the first
    /// time the host socket is slow.
    out: Option<Ring>,
    /// Guest bytes written to the host socket, ever (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    reported_fwd: u32,
    /// Bytes sent to the guest, ever (wrapping).
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host socket reached end of file (the guest was told with SHUTDOWN SEND).
    host_eof: bool,
    /// The host socket hung up: it is out of the epoll set and read until its end.
    hup: bool,
    /// The guest will send no more.
    guest_send_done: bool,
    /// The guest will receive no more.
    guest_rcv_done: bool,
    /// The host socket's write side is shut.
    host_write_shut: bool,
    /// In the ready list (its host socket may have bytes for the guest).
    queued: bool,
    /// A credit update for it is in the control list.
    credit_queued: bool,
    /// Events registered in the epoll set (`None`: not in it).
    interest: Option<u32>,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            key: None,
            line: Vec::new(),
            out: None,
            fwd_cnt: 0,
            reported_fwd: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            hup: false,
            guest_send_done: false,
            guest_rcv_done: false,
            host_write_shut: false,
            queued: false,
            credit_queued: false,
            interest: None,
        }
    }

    /// Bytes the guest has room for.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn out_len(&self) -> usize {
        self.out.as_ref().map_or(0, Ring::len)
    }

    fn can_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_rcv_done
            && self.credit() > 0
    }

    fn wanted_events(&self) -> u32 {
        match self.state {
            State::AwaitingLine { .. } => EventSet::IN.bits(),
            // Only hang-ups and errors, which epoll always reports.
            State::Connecting { .. } => 0,
            State::Established => {
                let mut e = 0;
                if self.can_read() && !self.queued {
                    e |= EventSet::IN.bits();
                }
                if self.out_len() > 0 {
                    e |= EventSet::OUT.bits();
                }
                e
            }
        }
    }
}

/// A packet the device owes the guest that carries no data.
#[derive(Clone, Copy, Debug)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

/// Counts of what the device did, for `vm.counters` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    /// Payload bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Payload bytes taken from the guest.
    pub tx_bytes: u64,
    /// Host clients refused for the connection limit.
    pub refused_connections: u64,
    /// Malformed or misaddressed packets from the guest.
    pub bad_packets: u64,
}

/// The connection multiplexer: the vsock device's queue logic.
#[derive(Debug)]
pub struct Muxer {
    cid: u64,
    socket: PathBuf,
    limits: Limits,
    listener: UnixListener,
    epoll: Epoll,
    work: EventFd,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<u64, Conn>,
    by_key: HashMap<Key, u64>,
    next_token: u64,
    next_host_port: u32,
    control: VecDeque<Control>,
    stray_resets: usize,
    ready: VecDeque<u64>,
    /// An rx chain taken but not filled: (head, its writable buffers).
    held: Option<(u16, SgList)>,
    /// The tx queue has chains left after a pass.
    tx_more: bool,
    /// The listener is out of the epoll set after an accept error, until the next tick.
    listener_paused: bool,
    scratch: Vec<u8>,
    stats: MuxerStats,
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VsockError {
    move |source| VsockError::Os { what, source }
}

impl Muxer {
    /// A multiplexer for the guest `cid`, taking host clients from `listener` (bound at
    /// `socket`, whose `<socket>_<port>` siblings the guest connects to).
    ///
    /// # Errors
    ///
    /// [`VsockError::Os`] when the epoll set, eventfd or timer cannot be made.
    pub fn new(
        cid: u64,
        socket: PathBuf,
        listener: UnixListener,
        limits: Limits,
    ) -> Result<Self, VsockError> {
        listener
            .set_nonblocking(true)
            .map_err(os("non-blocking listener"))?;
        let epoll = Epoll::new().map_err(os("epoll set"))?;
        let work = EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?;
        let timer = TimerFd::new().map_err(|e| VsockError::Os {
            what: "timerfd",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER),
            (work.as_raw_fd(), WORK),
            (timer.as_raw_fd(), TIMER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(os("epoll_ctl"))?;
        }
        Ok(Self {
            cid,
            socket,
            limits,
            listener,
            epoll,
            work,
            timer,
            timer_armed: false,
            // Sized for the limits up front, on the creating thread: the vsock thread's own
            // heap then stays small (see `ring`).
            conns: HashMap::with_capacity(limits.max_connections + 1),
            by_key: HashMap::with_capacity(limits.max_connections + 1),
            next_token: FIRST_CONN,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::with_capacity(4 * limits.max_connections + limits.max_stray_resets),
            stray_resets: 0,
            ready: VecDeque::with_capacity(limits.max_connections + 1),
            held: None,
            tx_more: false,
            listener_paused: false,
            scratch: vec![0u8; MAX_PAYLOAD as usize],
            stats: MuxerStats::default(),
        })
    }

    /// What the device did so far.
    pub fn stats(&self) -> MuxerStats {
        self.stats
    }

    /// Host connections in any state.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Packets without data the device owes the guest (responses, resets, credit updates).
    pub fn pending_packets(&self) -> usize {
        self.control.len()
    }

    /// Handles every ready host-side event (accepts, `CONNECT` lines, readable and writable
    /// host sockets, hang-ups, timeouts) without blocking.
    pub fn host_events(&mut self) -> Result<(), VsockError> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(()),
            Err(e) => {
                return Err(VsockError::Os {
                    what: "epoll_wait",
                    source: e,
                })
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => self.accept(),
                WORK => {
                    let _ = self.work.read();
                }
                TIMER => {
                    let _ = self.timer.wait();
                    self.expire();
                }
                token => self.conn_event(token, ev.events()),
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        // Level-triggered: clients past this wait for the next round, after the queues.
        let mut accepted = 0;
        while accepted < MAX_ACCEPTS_PER_ROUND {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, for instance: the client waits in the backlog, and
                    // the listener leaves the epoll set until the next tick (it would wake the
                    // thread again and again).
                    nimbus_log::warn_limited!("vsock: cannot accept a host connection: {e}");
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Delete,
                            self.listener.as_raw_fd(),
                            EpollEvent::default(),
                        )
                        .is_ok()
                    {
                        self.listener_paused = true;
                        self.arm_timer();
                    }
                    return;
                }
            };
            accepted += 1;
            if self.conns.len() >= self.limits.max_connections || self.control_full() {
                self.stats.refused_connections += 1;
                nimbus_log::warn_limited!(
                    "vsock: host connection refused: {} connections open",
                    self.conns.len()
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.insert(Conn::new(
                stream,
                State::AwaitingLine {
                    since: Instant::now(),
                },
            ));
            self.arm_timer();
        }
    }

    fn insert(&mut self, conn: Conn) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        if let Some(key) = conn.key {
            self.by_key.insert(key, token);
        }
        self.conns.insert(token, conn);
        self.refresh(token);
        token
    }

    /// Registers the events `token`'s connection wants now.
    fn refresh(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.hup {
            return;
        }
        let want = conn.wanted_events();
        if conn.interest == Some(want) {
            return;
        }
        let (op, what) = if conn.interest.is_some() {
            (ControlOperation::Modify, "modify")
        } else {
            (ControlOperation::Add, "add")
        };
        let event = EpollEvent::new(EventSet::from_bits_truncate(want), token);
        match self.epoll.ctl(op, conn.stream.as_raw_fd(), event) {
            Ok(()) => conn.interest = Some(want),
            Err(e) => {
                nimbus_log::warn_limited!("vsock: epoll {what} of a host socket: {e}");
                self.reset(token);
            }
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            let tick = (self.limits.connect_timeout / 4).max(Duration::from_millis(10));
            if self.timer.reset(tick, Some(tick)).is_ok() {
                self.timer_armed = true;
            }
        }
    }

    /// Closes host clients that did not send their line in time and connections the guest
    /// did not answer in time.
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.limits.connect_timeout;
        let mut waiting = false;
        let mut late = Vec::new();
        for (&token, c) in &self.conns {
            match c.state {
                State::AwaitingLine { since } | State::Connecting { since } => {
                    if now.duration_since(since) >= timeout {
                        late.push(token);
                    } else {
                        waiting = true;
                    }
                }
                State::Established => {}
            }
        }
        for token in late {
            log::debug!("vsock: host connection timed out before it was established");
            self.reset(token);
        }
        if self.listener_paused {
            let back = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            );
            self.listener_paused = back.is_err();
            waiting |= self.listener_paused;
        }
        if !waiting && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    fn conn_event(&mut self, token: u64, events: u32) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let hup = events & (EventSet::HANG_UP.bits() | EventSet::ERROR.bits()) != 0;
        match conn.state {
            State::AwaitingLine { .. } => self.read_line(token),
            State::Connecting { .. } => {
                if hup {
                    // The client left before the guest answered.
                    self.reset(token);
                }
            }
            State::Established => {
                if events & EventSet::ERROR.bits() != 0 {
                    self.reset(token);
                    return;
                }
                if events & EventSet::OUT.bits() != 0 {
                    self.flush(token);
                }
                let Some(conn) = self.conns.get_mut(&token) else {
                    return;
                };
                if hup && !conn.hup {
                    // The peer closed both ways: what it wrote is still readable, what the
                    // guest sends cannot arrive. Read the rest without epoll (it would report
                    // the hang-up again and again).
                    if conn.out_len() > 0 {
                        self.reset(token);
                        return;
                    }
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        conn.stream.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    conn.interest = None;
                    conn.hup = true;
                }
                if events & EventSet::IN.bits() != 0 || hup {
                    self.mark_ready(token);
                }
                self.refresh(token);
            }
        }
    }

    fn mark_ready(&mut self, token: u64) {
        if let Some(conn) = self.conns.get_mut(&token) {
            if !conn.queued && conn.can_read() {
                conn.queued = true;
                self.ready.push_back(token);
            }
        }
    }

    /// Reads what there is of a host client's `CONNECT` line, never past its newline.
    fn read_line(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - conn.line.len();
        let n = match peek(&conn.stream, &mut buf[..room]) {
            Ok(0) => return self.remove(token),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return self.remove(token),
        };
        let end = buf[..n].iter().position(|&b| b == b'\n').map(|i| i + 1);
        let take = end.unwrap_or(n);
        if conn.stream.read_exact(&mut buf[..take]).is_err() {
            return self.remove(token);
        }
        conn.line.extend_from_slice(&buf[..take]);
        if end.is_none() {
            if conn.line.len() >= MAX_CONNECT_LINE {
                nimbus_log::warn_limited!("vsock: host client sent no CONNECT line");
                self.remove(token);
            }
            return;
        }
        let Some(port) = parse_connect_line(&conn.line) else {
            nimbus_log::warn_limited!(
                "vsock: host client sent {:?}, not CONNECT <port>",
                String::from_utf8_lossy(&conn.line)
            );
            return self.remove(token);
        };
        let host_port = self.allocate_port();
        let key = (host_port, port);
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.line = Vec::new();
        conn.key = Some(key);
        conn.state = State::Connecting {
            since: Instant::now(),
        };
        self.by_key.insert(key, token);
        self.refresh(token);
        self.send_control(key, op::REQUEST, 0);
    }

    /// A host port ≥ 2^30 no connection uses.
    fn allocate_port(&mut self) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.by_key.keys().any(|k| k.0 == port) {
                return port;
            }
        }
    }

    /// The control list is as long as the bounds allow: new connections are refused until
    /// the guest takes some (a peer opening and dropping connections while the guest reads
    /// nothing would otherwise grow it without end).
    fn control_full(&self) -> bool {
        self.control.len() >= 2 * self.limits.max_connections + self.limits.max_stray_resets
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        self.control.push_back(Control { key, op, flags });
    }

    /// An RST for a packet that belongs to no connection, if the bound allows.
    fn stray_reset(&mut self, key: Key) {
        if self.stray_resets < self.limits.max_stray_resets {
            self.stray_resets += 1;
            self.send_control(key, op::RST, 0);
        }
    }

    /// Tells the guest the connection is gone (unless it never knew it) and forgets it.
    fn reset(&mut self, token: u64) {
        if let Some(conn) = self.conns.get(&token) {
            if let (Some(key), false) = (conn.key, matches!(conn.state, State::AwaitingLine { .. }))
            {
                self.send_control(key, op::RST, 0);
            }
        }
        self.remove(token);
    }

    /// Forgets a connection and closes its host socket.
    fn remove(&mut self, token: u64) {
        if let Some(conn) = self.conns.remove(&token) {
            if let Some(key) = conn.key {
                self.by_key.remove(&key);
            }
            // Closing the socket takes it out of the epoll set.
        }
    }

    /// Writes buffered guest bytes to the host socket.
    fn flush(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        while let Some(out) = conn.out.as_mut().filter(|o| !o.is_empty()) {
            match conn.stream.write(out.front()) {
                Ok(0) => break,
                Ok(n) => {
                    out.consume(n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.reset(token),
            }
        }
        self.after_forward(token);
    }

    /// After guest bytes went to the host: a credit update when the guest may be waiting for
    /// one, the end of the connection when both sides are done.
    fn after_forward(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let unreported = conn.fwd_cnt.wrapping_sub(conn.reported_fwd);
        if unreported >= self.limits.buf_alloc / 4 && !conn.credit_queued {
            conn.credit_queued = true;
            if let Some(key) = conn.key {
                self.send_control(key, op::CREDIT_UPDATE, 0);
            }
        }
        self.maybe_finish(token);
    }

    fn maybe_finish(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.out_len() > 0 {
            self.refresh(token);
            return;
        }
        if conn.guest_send_done && !conn.host_write_shut {
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.host_write_shut = true;
        }
        let done = conn.guest_send_done && (conn.guest_rcv_done || conn.host_eof);
        if done {
            // Both ways are closed: the RST ends it (virtio 1.2 5.10.6.5).
            self.reset(token);
        } else {
            self.refresh(token);
        }
    }

    /// Serves the transmit queue: the guest's packets.
    fn process_tx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, QueueError> {
        let mut drain = QueueDrain::new(queue, mem, BUDGET);
        while let Some(mut chain) = drain.next_chain()? {
            let head = chain.head_index();
            match split(&mut chain) {
                Ok(parts) => self.guest_packet(&parts.readable, mem),
                Err(e) => {
                    self.stats.bad_packets += 1;
                    nimbus_log::warn_limited!("vsock: tx chain {head}: {e}");
                }
            }
            drain.complete(head, 0)?;
        }
        let done = drain.finish()?;
        self.tx_more = done.more_pending;
        Ok(done.needs_notification)
    }

    fn bad_packet(&mut self, why: std::fmt::Arguments<'_>) {
        self.stats.bad_packets += 1;
        nimbus_log::warn_limited!("vsock: guest packet dropped: {why}");
    }

    /// One packet from the guest.
    fn guest_packet<M: GuestMemory>(&mut self, data: &SgList, mem: &M) {
        let mut cursor = data.cursor();
        let mut raw = [0u8; HEADER_LEN];
        if cursor.read(mem, &mut raw).is_err() {
            return self.bad_packet(format_args!("{} bytes, no header", data.len()));
        }
        let hdr = Header::from_bytes(&raw);
        if hdr.len > MAX_PAYLOAD || u64::from(hdr.len) > cursor.remaining() {
            return self.bad_packet(format_args!(
                "payload of {} bytes, {} in the buffers",
                hdr.len,
                cursor.remaining()
            ));
        }
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            let cid = self.cid;
            return self.bad_packet(format_args!(
                "from cid {} to cid {} (the guest is {cid})",
                hdr.src_cid, hdr.dst_cid
            ));
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.stray_reset(key);
            }
            return self.bad_packet(format_args!("socket type {}", hdr.type_));
        }
        let Some(&token) = self.by_key.get(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(&hdr),
                op::RST => {}
                _ => self.stray_reset(key),
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let had_credit = conn.credit() > 0;
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        let credit_opened = !had_credit && conn.credit() > 0;
        match hdr.op {
            op::RESPONSE => self.guest_accepted(token),
            op::RST => self.remove(token),
            op::SHUTDOWN => {
                conn.guest_send_done |= hdr.flags & SHUTDOWN_SEND != 0;
                conn.guest_rcv_done |= hdr.flags & SHUTDOWN_RCV != 0;
                self.maybe_finish(token);
            }
            op::RW => {
                let len = hdr.len as usize;
                if conn.state != State::Established || conn.guest_send_done {
                    return self.reset(token);
                }
                if conn.out_len() + len > self.limits.buf_alloc as usize {
                    nimbus_log::warn_limited!(
                        "vsock: guest port {} sent past its credit; connection reset",
                        hdr.src_port
                    );
                    return self.reset(token);
                }
                let buf = &mut self.scratch[..len];
                if cursor.read(mem, buf).is_err() {
                    return self.bad_packet(format_args!("unreadable payload"));
                }
                self.stats.tx_bytes += len as u64;
                let mut written = 0;
                if conn.out_len() == 0 {
                    loop {
                        match conn.stream.write(&buf[written..]) {
                            Ok(n) => {
                                written += n;
                                if written == len || n == 0 {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(_) => return self.reset(token),
                        }
                    }
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(written as u32);
                }
                if written < len {
                    if conn.out.is_none() {
                        match Ring::new(self.limits.buf_alloc as usize) {
                            Ok(r) => conn.out = Some(r),
                            Err(e) => {
                                nimbus_log::warn_limited!(
                                    "vsock: no buffer for a slow host socket: {e}"
                                );
                                return self.reset(token);
                            }
                        }
                    }
                    // The credit check above makes room.
                    if !conn.out.as_mut().is_some_and(|o| o.push(&buf[written..])) {
                        return self.reset(token);
                    }
                }
                self.after_forward(token);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if !conn.credit_queued {
                    conn.credit_queued = true;
                    self.send_control(key, op::CREDIT_UPDATE, 0);
                }
            }
            // A second request for a live connection, or an unknown operation.
            _ => self.reset(token),
        }
        if credit_opened {
            self.mark_ready(token);
            self.refresh(token);
        }
    }

    /// The guest connects to host port `hdr.dst_port`: connect to `<socket>_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.len() >= self.limits.max_connections || self.control_full() {
            nimbus_log::warn_limited!(
                "vsock: guest connection to port {} refused: {} connections open",
                hdr.dst_port,
                self.conns.len()
            );
            return self.stray_reset(key);
        }
        let mut path = self.socket.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(path.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connection to {}: {e}",
                    PathBuf::from(path).display()
                );
                return self.stray_reset(key);
            }
        };
        let mut conn = Conn::new(stream, State::Established);
        conn.key = Some(key);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        let token = self.insert(conn);
        self.send_control(key, op::RESPONSE, 0);
        self.mark_ready(token);
        self.refresh(token);
    }

    /// The guest accepted a host client's connection: the client gets `OK <host_port>\n`.
    fn guest_accepted(&mut self, token: u64) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let (State::Connecting { .. }, Some(key)) = (conn.state, conn.key) else {
            return self.reset(token);
        };
        let reply = format!("OK {}\n", key.0);
        // A fresh socket's buffer takes a dozen bytes; a client that cannot is reset.
        match conn.stream.write(reply.as_bytes()) {
            Ok(n) if n == reply.len() => {}
            _ => return self.reset(token),
        }
        conn.state = State::Established;
        self.mark_ready(token);
        self.refresh(token);
    }

    /// Takes an rx chain for a packet: the held one, else the next available one.
    fn rx_chain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Option<(u16, SgList)>, QueueError> {
        if let Some(held) = self.held.take() {
            return Ok(Some(held));
        }
        while let Some(mut chain) = pop(queue, mem)? {
            let head = chain.head_index();
            match split(&mut chain) {
                Ok(parts)
                    if parts.readable.is_empty() && parts.writable.len() >= HEADER_LEN as u64 =>
                {
                    return Ok(Some((head, parts.writable)));
                }
                Ok(_) => {
                    self.stats.bad_packets += 1;
                    nimbus_log::warn_limited!("vsock: rx chain {head} is not a receive buffer");
                }
                Err(e) => {
                    self.stats.bad_packets += 1;
                    nimbus_log::warn_limited!("vsock: rx chain {head}: {e}");
                }
            }
            add_used(queue, mem, head, 0)?;
        }
        Ok(None)
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self
            .by_key
            .get(&key)
            .and_then(|t| self.conns.get(t))
            .map_or((0, 0), |c| (self.limits.buf_alloc, c.fwd_cnt));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Fills the receive queue with what the device owes the guest: control packets first,
    /// then data of the ready host sockets, in turn. Returns whether the driver must be
    /// interrupted.
    fn fill_rx<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<bool, QueueError> {
        let mut used = false;
        for _ in 0..BUDGET {
            if self.control.is_empty() && self.ready.is_empty() {
                break;
            }
            let Some((head, buffers)) = self.rx_chain(queue, mem)? else {
                break;
            };
            let len = if let Some(ctl) = self.control.pop_front() {
                if ctl.op != op::RST && !self.by_key.contains_key(&ctl.key) {
                    // For a connection gone meanwhile (its RST follows or went out).
                    self.held = Some((head, buffers));
                    continue;
                }
                self.write_control(ctl, &buffers, mem)
            } else {
                match self.write_data(&buffers, mem) {
                    Some(len) => len,
                    None => {
                        self.held = Some((head, buffers));
                        continue;
                    }
                }
            };
            add_used(queue, mem, head, len)?;
            used = true;
        }
        if !self.control.is_empty() || !self.ready.is_empty() {
            // Out of budget (or of buffers: the driver's kick brings the worker back).
            if self.held.is_some() || virtio_chain::queue::has_available(queue, mem)? {
                let _ = self.work.write(1);
            }
        }
        Ok(used && needs_notification(queue, mem)?)
    }

    fn write_control<M: GuestMemory>(&mut self, ctl: Control, buffers: &SgList, mem: &M) -> u32 {
        let hdr = self.header(ctl.key, ctl.op, ctl.flags, 0);
        if ctl.op == op::RST && !self.by_key.contains_key(&ctl.key) {
            self.stray_resets = self.stray_resets.saturating_sub(1);
        }
        if let Some(conn) = self
            .by_key
            .get(&ctl.key)
            .and_then(|t| self.conns.get_mut(t))
        {
            conn.reported_fwd = conn.fwd_cnt;
            if ctl.op == op::CREDIT_UPDATE {
                conn.credit_queued = false;
            }
        }
        if buffers.cursor().write(mem, &hdr.to_bytes()).is_err() {
            return 0;
        }
        HEADER_LEN as u32
    }

    /// Data (or the end of the stream) of the first ready host socket into `buffers`; `None`
    /// when no socket had anything after all (the chain stays unused).
    fn write_data<M: GuestMemory>(&mut self, buffers: &SgList, mem: &M) -> Option<u32> {
        let room = (buffers.len() - HEADER_LEN as u64).min(u64::from(MAX_PAYLOAD)) as u32;
        while let Some(token) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            conn.queued = false;
            let (Some(key), true) = (conn.key, conn.can_read()) else {
                self.refresh(token);
                continue;
            };
            let want = room.min(conn.credit()) as usize;
            if want == 0 {
                // A buffer with room for the header only: a credit update will do.
                let ctl = Control {
                    key,
                    op: op::CREDIT_UPDATE,
                    flags: 0,
                };
                self.ready.push_front(token);
                if let Some(c) = self.conns.get_mut(&token) {
                    c.queued = true;
                }
                return Some(self.write_control(ctl, buffers, mem));
            }
            let read = loop {
                match conn.stream.read(&mut self.scratch[..want]) {
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            match read {
                Ok(0) => {
                    conn.host_eof = true;
                    let len = self.write_control(
                        Control {
                            key,
                            op: op::SHUTDOWN,
                            flags: SHUTDOWN_SEND,
                        },
                        buffers,
                        mem,
                    );
                    self.maybe_finish(token);
                    return Some(len);
                }
                Ok(n) => {
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    conn.reported_fwd = conn.fwd_cnt;
                    conn.queued = true;
                    self.ready.push_back(token);
                    self.stats.rx_bytes += n as u64;
                    let hdr = self.header(key, op::RW, 0, n as u32);
                    let mut cursor = buffers.cursor();
                    if cursor.write(mem, &hdr.to_bytes()).is_err()
                        || cursor.write(mem, &self.scratch[..n]).is_err()
                    {
                        // The guest's buffer is not writable: the bytes are lost, and so is
                        // the stream.
                        self.reset(token);
                        return Some(0);
                    }
                    return Some(HEADER_LEN as u32 + n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.refresh(token),
                Err(_) => self.reset(token),
            }
        }
        None
    }

    fn queue_work<M: GuestMemory>(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &M,
    ) -> Result<Vec<u16>, QueueError> {
        let mut signal = Vec::new();
        if self.tx_more {
            if let Some(q) = queues.iter_mut().find(|q| q.index == TX_QUEUE) {
                if self.process_tx(&mut q.queue, mem)? {
                    signal.push(TX_QUEUE);
                }
                if self.tx_more {
                    let _ = self.work.write(1);
                }
            }
        }
        if let Some(q) = queues.iter_mut().find(|q| q.index == RX_QUEUE) {
            if self.fill_rx(&mut q.queue, mem)? {
                signal.push(RX_QUEUE);
            }
        }
        Ok(signal)
    }
}

impl QueueHandler for Muxer {
    type Error = VsockError;

    fn process(
        &mut self,
        q: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, VsockError> {
        let mem = mem.memory();
        match q.index {
            TX_QUEUE => {
                let notify = self.process_tx(&mut q.queue, &*mem)?;
                if self.tx_more || !self.control.is_empty() || !self.ready.is_empty() {
                    // The replies go out on the rx queue, from `on_extra`.
                    let _ = self.work.write(1);
                }
                Ok(notify)
            }
            RX_QUEUE => Ok(self.fill_rx(&mut q.queue, &*mem)?),
            // The event queue's buffers wait for a transport reset.
            EVENT_QUEUE => Ok(false),
            _ => Ok(false),
        }
    }

    fn extra_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn on_extra(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &GuestMemoryAtomic,
    ) -> Result<Vec<u16>, VsockError> {
        self.host_events()?;
        let mem = mem.memory();
        Ok(self.queue_work(queues, &*mem)?)
    }
}
