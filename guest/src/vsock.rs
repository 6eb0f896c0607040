//! virtio-vsock (virtio 1.2 section 5.10, device type 19): a stream-socket driver with
//! credit-based flow control, run against a host program that talks through the VMM's hybrid
//! Unix-socket backend. Keys `vsock.*` are described in docs/test-guest.md ("virtio-vsock").
//!
//! The guest listens on `vsock.listen` (answering the host's requests there, resetting any
//! other), connects `vsock.connections` streams to host port `vsock.connect`, and moves
//! `vsock.bytes` bytes each way on every stream: the guest sends the guest pattern, the host
//! the host pattern ([`PatternIter`]), each side compares what it receives byte for byte. Then
//! each stream is shut down both ways and must end with the device's RST. With
//! `vsock.reboot=1` the first boot leaves its streams open and resets the machine; the second
//! boot runs everything again.
//!
//! One page per packet: the 44-byte header, then up to 4052 bytes of payload. The guest polls
//! the used rings (one vCPU, nothing else to do).

use core::fmt::Write;

use crate::arch::{inb, outb, pause};
use crate::report::StrBuf;
use crate::stage2::{check_named, report_init, Keys};
use crate::time::Deadline;
use crate::virtio::{Buf, DmaPage, Queue, Transport, F_VERSION_1};
use crate::{expect, println};

const HEADER: usize = 44;
const PAGE: usize = 4096;
const MAX_PAYLOAD: usize = PAGE - HEADER;
const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
const SHUTDOWN_SEND: u32 = 2;
/// Receive room the guest advertises per stream (it consumes at once).
const BUF_ALLOC: u32 = 64 * 1024;
const RX_PAGES: usize = 16;
const TX_PAGES: usize = 8;
const MAX_CONNS: usize = 16;
/// First port of the guest's own connections.
const LOCAL_PORT_BASE: u32 = 40_000;
/// CMOS NVRAM byte counting vsock boots (next to the lifecycle's 0x7c).
const CMOS_VSOCK_BOOT: u8 = 0x7d;

/// The bytes of a stream from byte `i` on: byte `i` of the stream sent by the guest (`seed`
/// 0x5a) or the host (`seed` 0xa5) is `(i % 251) ^ ((i / 251) as u8 * 7) ^ seed` (a period of
/// 251 bytes that no packet size divides, so lost, repeated or reordered bytes show), computed
/// with one division per packet.
struct PatternIter {
    seed: u8,
    rem: u8,
    quot: u8,
}

impl PatternIter {
    fn at(seed: u8, i: u64) -> Self {
        PatternIter {
            seed,
            rem: (i % 251) as u8,
            quot: (i / 251) as u8,
        }
    }

    fn next_byte(&mut self) -> u8 {
        let b = self.rem ^ self.quot.wrapping_mul(7) ^ self.seed;
        if self.rem == 250 {
            self.rem = 0;
            self.quot = self.quot.wrapping_add(1);
        } else {
            self.rem += 1;
        }
        b
    }
}

const GUEST_SEED: u8 = 0x5a;
const HOST_SEED: u8 = 0xa5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// Our REQUEST is out.
    Connecting,
    Established,
    /// Our SHUTDOWN is out; waiting for the RST.
    Closing,
    /// Ended by an RST after our SHUTDOWN (clean) or without one.
    Closed { clean: bool },
}

#[derive(Clone, Copy)]
struct Conn {
    state: State,
    /// Guest port.
    local: u32,
    /// Host port.
    peer: u32,
    /// The host started it.
    accepted: bool,
    sent: u64,
    received: u64,
    mismatches: u64,
    first_bad: Option<u64>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    reported_fwd: u32,
    /// Times the guest had bytes to send and no credit.
    credit_stalls: u32,
    stalled: bool,
    host_shut: bool,
}

impl Conn {
    const EMPTY: Conn = Conn {
        state: State::Free,
        local: 0,
        peer: 0,
        accepted: false,
        sent: 0,
        received: 0,
        mismatches: 0,
        first_bad: None,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        reported_fwd: 0,
        credit_stalls: 0,
        stalled: false,
        host_shut: false,
    };

    fn credit(&self) -> u64 {
        let in_flight = (self.sent as u32).wrapping_sub(self.peer_fwd_cnt);
        u64::from(self.peer_buf_alloc.saturating_sub(in_flight))
    }

    fn fwd_cnt(&self) -> u32 {
        self.received as u32
    }
}

#[derive(Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn get(p: &DmaPage, off: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    p.read_bytes(off, &mut b[..width]);
    u64::from_le_bytes(b)
}

impl Header {
    fn read(p: &DmaPage) -> Header {
        Header {
            src_cid: get(p, 0, 8),
            dst_cid: get(p, 8, 8),
            src_port: get(p, 16, 4) as u32,
            dst_port: get(p, 20, 4) as u32,
            len: get(p, 24, 4) as u32,
            type_: get(p, 28, 2) as u16,
            op: get(p, 30, 2) as u16,
            flags: get(p, 32, 4) as u32,
            buf_alloc: get(p, 36, 4) as u32,
            fwd_cnt: get(p, 40, 4) as u32,
        }
    }

    fn write(&self, p: &DmaPage) {
        let mut b = [0u8; HEADER];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        p.write_bytes(0, &b);
    }
}

/// What the run is asked to do.
struct Plan {
    cid: u64,
    listen: Option<u32>,
    accept: usize,
    connect: Option<u32>,
    connections: usize,
    /// Bytes each stream sends (`vsock.up`, default `vsock.bytes`).
    up: u64,
    /// Bytes each stream receives (`vsock.down`, default `vsock.bytes`).
    down: u64,
    /// Accepted streams send back what they receive (`vsock.echo=1`) until the host closes.
    echo: bool,
    wait_us: u64,
    /// Leave the streams open and reset the machine (first boot only).
    reboot_now: bool,
}

struct Driver {
    cid: u64,
    rx: Queue,
    tx: Queue,
    rx_pages: [DmaPage; RX_PAGES],
    /// Which rx page descriptor head h carries.
    rx_page_of: [usize; 64],
    tx_pages: [DmaPage; TX_PAGES],
    tx_free: u32,
    tx_page_of: [usize; 64],
    /// Packets were added to the transmit queue and not notified yet.
    tx_pending: bool,
    conns: [Conn; MAX_CONNS],
    /// Requests to ports nobody listens on, answered with RST.
    refused: u32,
    /// Packets that made no sense.
    bad: u32,
}

impl Driver {
    fn give_rx(&mut self, page: usize) {
        let p = &self.rx_pages[page];
        if let Some(head) = self.rx.add(&[Buf {
            addr: p.phys(0),
            len: PAGE as u32,
            write: true,
        }]) {
            self.rx_page_of[usize::from(head)] = page;
        }
    }

    /// Takes back the transmit pages the device is done with.
    fn reap_tx(&mut self) {
        while let Some(u) = self.tx.pop_used() {
            if let Some(&page) = self.tx_page_of.get(u.id as usize) {
                if u.known {
                    self.tx_free |= 1 << page;
                }
            }
        }
    }

    /// Sends a packet; `payload(page_offset_base_buffer)` fills `len` bytes after the header.
    /// Waits (bounded) for a free page.
    fn send(&mut self, mut h: Header, fill: impl FnOnce(&DmaPage)) -> bool {
        let d = Deadline::after_us(2_000_000);
        while self.tx_free == 0 {
            self.flush_tx();
            self.reap_tx();
            if d.passed() {
                return false;
            }
            pause();
        }
        let page = self.tx_free.trailing_zeros() as usize;
        self.tx_free &= !(1 << page);
        let p = self.tx_pages[page];
        h.src_cid = self.cid;
        h.dst_cid = HOST_CID;
        h.type_ = TYPE_STREAM;
        h.buf_alloc = BUF_ALLOC;
        h.write(&p);
        fill(&p);
        let Some(head) = self.tx.add(&[Buf {
            addr: p.phys(0),
            len: HEADER as u32 + h.len,
            write: false,
        }]) else {
            self.tx_free |= 1 << page;
            return false;
        };
        self.tx_page_of[usize::from(head)] = page;
        self.tx_pending = true;
        true
    }

    /// Notifies the transmit queue of the packets added since the last time, unless the device
    /// is still working through it (each notification is a VM exit).
    fn flush_tx(&mut self) {
        if self.tx_pending {
            self.tx_pending = false;
            self.tx.kick_if_needed();
        }
    }

    fn control(&mut self, c: usize, op: u16, flags: u32) {
        let conn = self.conns[c];
        let h = Header {
            src_port: conn.local,
            dst_port: conn.peer,
            op,
            flags,
            fwd_cnt: conn.fwd_cnt(),
            ..Header::default()
        };
        self.conns[c].reported_fwd = conn.fwd_cnt();
        self.send(h, |_| {});
    }

    fn reset_unknown(&mut self, h: &Header) {
        let r = Header {
            src_port: h.dst_port,
            dst_port: h.src_port,
            op: OP_RST,
            ..Header::default()
        };
        self.send(r, |_| {});
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.local == local
                && c.peer == peer
                && matches!(
                    c.state,
                    State::Connecting | State::Established | State::Closing
                )
        })
    }

    /// Handles the packets the device delivered.
    fn poll_rx(&mut self, plan: &Plan) {
        let mut returned = false;
        while let Some(u) = self.rx.pop_used() {
            returned = true;
            let page = self.rx_page_of[u.id as usize];
            let p = self.rx_pages[page];
            if (u.len as usize) < HEADER {
                self.bad += 1;
            } else {
                let h = Header::read(&p);
                self.packet(&h, &p, u.len as usize - HEADER, plan);
            }
            self.give_rx(page);
        }
        if returned {
            self.rx.kick();
        }
    }

    fn packet(&mut self, h: &Header, p: &DmaPage, len: usize, plan: &Plan) {
        if h.src_cid != HOST_CID || h.dst_cid != self.cid || h.type_ != TYPE_STREAM {
            self.bad += 1;
            return;
        }
        let Some(c) = self.find(h.dst_port, h.src_port) else {
            if h.op == OP_REQUEST {
                let accepted = self.conns.iter().filter(|c| c.accepted).count();
                if Some(h.dst_port) == plan.listen && accepted < plan.accept {
                    if let Some(c) = self.conns.iter().position(|c| c.state == State::Free) {
                        self.conns[c] = Conn {
                            state: State::Established,
                            local: h.dst_port,
                            peer: h.src_port,
                            accepted: true,
                            peer_buf_alloc: h.buf_alloc,
                            peer_fwd_cnt: h.fwd_cnt,
                            ..Conn::EMPTY
                        };
                        self.control(c, OP_RESPONSE, 0);
                        return;
                    }
                }
                self.refused += 1;
                self.reset_unknown(h);
            } else if h.op != OP_RST {
                self.bad += 1;
                self.reset_unknown(h);
            }
            return;
        };
        let conn = &mut self.conns[c];
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if conn.state == State::Connecting => conn.state = State::Established,
            OP_RST => {
                conn.state = State::Closed {
                    clean: conn.state == State::Closing,
                }
            }
            OP_SHUTDOWN => conn.host_shut |= h.flags & SHUTDOWN_SEND != 0,
            OP_RW if plan.echo && conn.accepted => {
                if len != h.len as usize || len > MAX_PAYLOAD || conn.credit() < len as u64 {
                    self.bad += 1;
                    return;
                }
                conn.received += len as u64;
                let (local, peer, fwd) = (conn.local, conn.peer, conn.fwd_cnt());
                let reply = Header {
                    src_port: local,
                    dst_port: peer,
                    op: OP_RW,
                    len: len as u32,
                    fwd_cnt: fwd,
                    ..Header::default()
                };
                if self.send(reply, |out| {
                    for i in 0..len {
                        out.write8(HEADER + i, p.read8(HEADER + i));
                    }
                }) {
                    self.conns[c].sent += len as u64;
                    self.conns[c].reported_fwd = fwd;
                }
            }
            OP_RW => {
                if len != h.len as usize || len > MAX_PAYLOAD {
                    self.bad += 1;
                    return;
                }
                let mut want = PatternIter::at(HOST_SEED, conn.received);
                for i in 0..len {
                    if p.read8(HEADER + i) != want.next_byte() {
                        conn.mismatches += 1;
                        conn.first_bad.get_or_insert(conn.received + i as u64);
                    }
                }
                conn.received += len as u64;
                if conn.fwd_cnt().wrapping_sub(conn.reported_fwd) >= BUF_ALLOC / 2 {
                    self.control(c, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.control(c, OP_CREDIT_UPDATE, 0),
            _ => self.bad += 1,
        }
    }

    /// Sends what credit allows on every established stream; shuts finished ones down.
    fn pump_tx(&mut self, plan: &Plan) {
        for c in 0..MAX_CONNS {
            let conn = self.conns[c];
            if conn.state != State::Established {
                continue;
            }
            if plan.echo && conn.accepted {
                if conn.host_shut {
                    self.conns[c].state = State::Closing;
                    self.control(c, OP_SHUTDOWN, SHUTDOWN_BOTH);
                }
                continue;
            }
            if conn.sent < plan.up {
                let credit = conn.credit();
                if credit == 0 {
                    if !conn.stalled {
                        self.conns[c].stalled = true;
                        self.conns[c].credit_stalls += 1;
                    }
                    continue;
                }
                self.conns[c].stalled = false;
                let n = (plan.up - conn.sent).min(credit).min(MAX_PAYLOAD as u64);
                let h = Header {
                    src_port: conn.local,
                    dst_port: conn.peer,
                    op: OP_RW,
                    len: n as u32,
                    fwd_cnt: conn.fwd_cnt(),
                    ..Header::default()
                };
                let start = conn.sent;
                if self.send(h, |p| {
                    let mut bytes = PatternIter::at(GUEST_SEED, start);
                    for i in 0..n as usize {
                        p.write8(HEADER + i, bytes.next_byte());
                    }
                }) {
                    self.conns[c].sent += n;
                    self.conns[c].reported_fwd = conn.fwd_cnt();
                }
            } else if conn.received >= plan.down && !plan.reboot_now {
                self.conns[c].state = State::Closing;
                self.control(c, OP_SHUTDOWN, SHUTDOWN_BOTH);
            }
        }
    }
}

fn page_array<const N: usize>() -> Option<[DmaPage; N]> {
    let first = DmaPage::alloc()?;
    let mut pages = [first; N];
    for p in pages.iter_mut().skip(1) {
        *p = DmaPage::alloc()?;
    }
    Some(pages)
}

fn cmos(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

fn cmos_write(reg: u8, v: u8) {
    outb(0x70, reg);
    outb(0x71, v);
}

fn number(keys: &Keys<'_>, n: usize, key: &str, default: u64) -> u64 {
    keys.get("vsock", n, key)
        .and_then(expect::parse_u64)
        .unwrap_or(default)
}

/// Drives vsock device `n` (see the module comment).
pub fn run(mut t: Transport, n: usize, keys: &Keys<'_>, apic_id: u32) {
    let mut name: StrBuf<24> = StrBuf::new();
    let _ = write!(name, "virtio.vsock{n}");
    let name = name.as_str();
    let boot = cmos(CMOS_VSOCK_BOOT);
    let reboot = keys.get("vsock", n, "reboot") == Some("1");
    let plan = Plan {
        cid: number(keys, n, "cid", 3),
        listen: keys
            .get("vsock", n, "listen")
            .and_then(expect::parse_u64)
            .map(|p| p as u32),
        accept: number(keys, n, "accept", 0) as usize,
        connect: keys
            .get("vsock", n, "connect")
            .and_then(expect::parse_u64)
            .map(|p| p as u32),
        connections: number(keys, n, "connections", 0) as usize,
        up: number(keys, n, "up", number(keys, n, "bytes", 65536)),
        down: number(keys, n, "down", number(keys, n, "bytes", 65536)),
        echo: keys.get("vsock", n, "echo") == Some("1"),
        wait_us: number(keys, n, "wait", 60).saturating_mul(1_000_000),
        reboot_now: reboot && boot == 0,
    };
    if plan.accept + plan.connections > MAX_CONNS {
        check_named(name, "init", false, format_args!("more than {MAX_CONNS} streams asked"));
        return;
    }
    let setup = t.negotiate(F_VERSION_1).and_then(|()| {
        let msix = t.setup_msix(4, apic_id).err();
        let rx = t.setup_queue(0)?;
        let tx = t.setup_queue(1)?;
        let ev = t.setup_queue(2)?;
        t.driver_ok()?;
        Ok((rx, tx, ev, msix))
    });
    let (mut rx, mut tx, mut ev, msix) = match setup {
        Ok(q) => q,
        Err(w) => {
            t.fail();
            check_named(name, "init", false, format_args!("{} {w}", t.func.bdf));
            return;
        }
    };
    report_init(name, &t, &[]);
    // The guest polls the used rings: an interrupt would only cost it a (slow) kernel entry.
    rx.set_interrupts(false);
    tx.set_interrupts(false);
    if let Some(w) = msix {
        println!("INFO {name} msix: {w} (polling)");
    }
    let cid = t
        .read_config(|r| u64::from(r.r32(0)) | (u64::from(r.r32(4)) << 32))
        .unwrap_or(0);
    check_named(
        name,
        "cid",
        cid == plan.cid,
        format_args!("guest_cid={cid} expected {}", plan.cid),
    );
    let pages = page_array::<RX_PAGES>()
        .and_then(|r| Some((r, page_array::<TX_PAGES>()?, DmaPage::alloc()?)));
    let Some((rx_pages, tx_pages, event_page)) = pages else {
        check_named(name, "data", false, format_args!("out of DMA memory"));
        return;
    };
    // The event queue holds one buffer for a transport reset.
    ev.add(&[Buf {
        addr: event_page.phys(0),
        len: 8,
        write: true,
    }]);
    ev.kick();
    let mut d = Driver {
        cid,
        rx,
        tx,
        rx_pages,
        rx_page_of: [0; 64],
        tx_pages,
        tx_free: (1 << TX_PAGES) - 1,
        tx_page_of: [0; 64],
        tx_pending: false,
        conns: [Conn::EMPTY; MAX_CONNS],
        refused: 0,
        bad: 0,
    };
    for page in 0..RX_PAGES {
        d.give_rx(page);
    }
    d.rx.kick();
    println!(
        "INFO {name}.ready boot={boot} cid={cid} listen={} accept={} connect={} connections={} bytes={}",
        plan.listen.unwrap_or(0),
        plan.accept,
        plan.connect.unwrap_or(0),
        plan.connections,
        plan.up
    );
    if let Some(port) = plan.connect {
        for k in 0..plan.connections {
            d.conns[k] = Conn {
                state: State::Connecting,
                local: LOCAL_PORT_BASE + k as u32,
                peer: port,
                ..Conn::EMPTY
            };
            d.control(k, OP_REQUEST, 0);
        }
    }
    let deadline = Deadline::after_us(plan.wait_us);
    let t0 = crate::arch::rdtsc();
    let wanted = plan.accept + if plan.connect.is_some() { plan.connections } else { 0 };
    loop {
        d.poll_rx(&plan);
        d.pump_tx(&plan);
        d.flush_tx();
        d.reap_tx();
        let streams = d.conns.iter().filter(|c| c.state != State::Free);
        let done = if plan.reboot_now {
            streams.clone().count() == wanted
                && streams
                    .clone()
                    .all(|c| c.sent >= plan.up && c.received >= plan.down)
        } else {
            streams.clone().count() == wanted
                && streams.clone().all(|c| matches!(c.state, State::Closed { .. }))
        };
        if done || deadline.passed() {
            break;
        }
        pause();
    }
    let us = crate::time::us_since(t0).max(1);
    let streams = d.conns.iter().filter(|c| c.state != State::Free);
    let (mut moved, mut stalls) = (0u64, 0u32);
    let mut problems: StrBuf<300> = StrBuf::new();
    for c in streams.clone() {
        moved += c.sent + c.received;
        stalls += c.credit_stalls;
        let complete = if plan.echo && c.accepted {
            c.sent == c.received
        } else {
            c.sent >= plan.up && c.received == plan.down
        };
        if !complete || c.mismatches != 0 {
            let _ = write!(
                problems,
                " port {}->{}: sent {} received {} mismatches {} first_bad {:?};",
                c.local, c.peer, c.sent, c.received, c.mismatches, c.first_bad
            );
        }
    }
    let accepted = streams.clone().filter(|c| c.accepted).count();
    let connected = streams.clone().filter(|c| !c.accepted).count();
    check_named(
        name,
        "connect",
        connected == if plan.connect.is_some() { plan.connections } else { 0 },
        format_args!("{connected} guest-initiated stream(s) established"),
    );
    check_named(
        name,
        "accept",
        accepted == plan.accept,
        format_args!("{accepted} host-initiated stream(s) accepted, {} request(s) refused", d.refused),
    );
    check_named(
        name,
        "data",
        problems.is_empty() && d.bad == 0,
        format_args!(
            "{} stream(s), {} bytes up and {} down each, {moved} bytes in {us} us ({} MB/s), {stalls} credit stall(s), {} bad packet(s){problems}",
            streams.clone().count(),
            plan.up,
            plan.down,
            moved / us,
            d.bad
        ),
    );
    if plan.reboot_now {
        cmos_write(CMOS_VSOCK_BOOT, boot.wrapping_add(1));
        println!("INFO {name} rebooting with {} stream(s) open", streams.count());
        outb(0xcf9, 0x06);
        crate::time::delay_us(1_000_000);
        println!("FAULT reset-ignored method=cf9");
        return;
    }
    let clean = streams
        .clone()
        .filter(|c| c.state == State::Closed { clean: true })
        .count();
    let host_shut = streams.clone().filter(|c| c.host_shut).count();
    check_named(
        name,
        "close",
        clean == streams.count(),
        format_args!(
            "{clean} stream(s) shut down and reset by the device ({host_shut} shut by the host first)"
        ),
    );
}
