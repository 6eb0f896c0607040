//! The multiplexer against a fake guest (a driver writing packets into test queues) and real
//! host Unix sockets.

// Test code: a panic is how a check reports failure.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_chain::testing::{Buf, TestDriver};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::muxer::{Limits, Muxer, FIRST_HOST_PORT};
use super::packet::{op, Header, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::worker::QueueHandler;
use crate::{ActiveQueue, GuestMemoryAtomic};

const CID: u64 = 3;
const RX_SIZE: u16 = 64;
const RX_BUF: u32 = 4096 + HEADER_LEN as u32;
const TX_SIZE: u16 = 64;
const TX_SLOT: u64 = HEADER_LEN as u64 + 64 * 1024;
/// The fake guest's receive room per connection.
const GUEST_BUF: u32 = 64 * 1024;

/// A guest driver of the three queues, and the device's multiplexer.
struct FakeGuest {
    mem: GuestMemoryAtomic,
    rx: TestDriver,
    tx: TestDriver,
    rx_bufs: Vec<u64>,
    rx_next: u16,
    tx_slots: Vec<u64>,
    tx_next: usize,
    queues: Vec<ActiveQueue>,
    muxer: Muxer,
    socket: PathBuf,
    _dir: TempDir,
}

fn active(index: u16, driver: &TestDriver) -> ActiveQueue {
    ActiveQueue {
        index,
        queue: driver.queue(false),
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    }
}

impl FakeGuest {
    fn new(limits: Limits) -> Self {
        Self::with_rx_buffers(limits, RX_SIZE)
    }

    /// A guest that gives the device `buffers` receive buffers to start with.
    fn with_rx_buffers(limits: Limits, buffers: u16) -> Self {
        let raw = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut rx = TestDriver::new(&raw, RX_SIZE, 0, 1 << 20);
        let mut tx = TestDriver::new(&raw, TX_SIZE, 1 << 20, 8 << 20);
        let ev = TestDriver::new(&raw, 4, 12 << 20, 1 << 20);
        let rx_bufs: Vec<u64> = (0..RX_SIZE).map(|_| rx.alloc(RX_BUF as usize, 0)).collect();
        let tx_slots: Vec<u64> = (0..TX_SIZE)
            .map(|_| tx.alloc(TX_SLOT as usize, 0))
            .collect();
        let queues = vec![
            active(RX_QUEUE, &rx),
            active(TX_QUEUE, &tx),
            active(EVENT_QUEUE, &ev),
        ];
        let dir = TempDir::new_with_prefix("/tmp/nimbus-vsock-test").unwrap();
        let socket = dir.as_path().join("v.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let muxer = Muxer::new(CID, socket.clone(), listener, limits).unwrap();
        let mut g = FakeGuest {
            mem: GuestMemoryAtomic::new(raw),
            rx,
            tx,
            rx_bufs,
            rx_next: 0,
            tx_slots,
            tx_next: 0,
            queues,
            muxer,
            socket,
            _dir: dir,
        };
        for _ in 0..buffers {
            g.give_rx_buffer();
        }
        g
    }

    fn give_rx_buffer(&mut self) {
        let addr = self.rx_bufs[usize::from(self.rx_next)];
        self.rx.add_chain(&[Buf::w(addr, RX_BUF)]);
        self.rx_next = (self.rx_next + 1) % RX_SIZE;
    }

    /// Lets the device see host-side events and fill the receive queue.
    fn pump(&mut self) {
        for _ in 0..4 {
            self.muxer.on_extra(&mut self.queues, &self.mem).unwrap();
        }
    }

    /// Sends a packet (header and payload in two descriptors) and lets the device act on it.
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let slot = self.tx_slots[self.tx_next];
        self.tx_next = (self.tx_next + 1) % self.tx_slots.len();
        let hdr = Header {
            len: payload.len() as u32,
            ..hdr
        };
        use vm_memory::Bytes;
        let mem = self.mem.memory();
        mem.write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap();
        mem.write_slice(payload, GuestAddress(slot + HEADER_LEN as u64))
            .unwrap();
        if payload.is_empty() {
            self.tx.add_chain(&[Buf::r(slot, HEADER_LEN as u32)]);
        } else {
            self.tx.add_chain(&[
                Buf::r(slot, HEADER_LEN as u32),
                Buf::r(slot + HEADER_LEN as u64, payload.len() as u32),
            ]);
        }
        self.muxer.process(&mut self.queues[1], &self.mem).unwrap();
        assert_eq!(self.tx.take_used().len(), 1, "tx chain not returned");
        self.pump();
    }

    /// Sends raw bytes as one tx buffer.
    fn send_raw(&mut self, bytes: &[u8]) {
        let slot = self.tx_slots[self.tx_next];
        self.tx_next = (self.tx_next + 1) % self.tx_slots.len();
        use vm_memory::Bytes;
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(slot))
            .unwrap();
        self.tx.add_chain(&[Buf::r(slot, bytes.len() as u32)]);
        self.muxer.process(&mut self.queues[1], &self.mem).unwrap();
        assert_eq!(self.tx.take_used().len(), 1, "tx chain not returned");
        self.pump();
    }

    /// Packets the device put in the receive queue; their buffers go back to it.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.pump();
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used() {
            let addr = self.rx_bufs[head as usize];
            assert!(len as usize >= HEADER_LEN, "short rx packet: {len}");
            let raw = self.rx.read(addr, len as usize);
            let hdr = Header::from_bytes(raw[..HEADER_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HEADER_LEN, "{hdr:?}");
            out.push((hdr, raw[HEADER_LEN..].to_vec()));
            self.give_rx_buffer();
        }
        out
    }

    fn socket_for_port(&self, port: u32) -> PathBuf {
        let mut p = self.socket.clone().into_os_string();
        p.push(format!("_{port}"));
        p.into()
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed ^ (i >> 8) as u8)
        })
        .collect()
}

/// The guest side of one stream: sends honouring the device's credit, receives and
/// acknowledges (credit updates) as a driver does.
struct GuestConn {
    port: u32,
    host_port: u32,
    sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    received: Vec<u8>,
    fwd_cnt: u32,
    reported_fwd: u32,
    host_shut: bool,
    reset: bool,
}

impl GuestConn {
    fn new(port: u32, host_port: u32, reply: &Header) -> Self {
        Self {
            port,
            host_port,
            sent: 0,
            peer_buf_alloc: reply.buf_alloc,
            peer_fwd_cnt: reply.fwd_cnt,
            received: Vec::new(),
            fwd_cnt: 0,
            reported_fwd: 0,
            host_shut: false,
            reset: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc - self.sent.wrapping_sub(self.peer_fwd_cnt)
    }

    fn hdr(&self, op: u16) -> Header {
        Header {
            fwd_cnt: self.fwd_cnt,
            ..guest_hdr(self.port, self.host_port, op)
        }
    }
}

/// Takes the packets of `g`'s receive queue into the connections they belong to; returns the
/// others.
fn dispatch(g: &mut FakeGuest, conns: &mut [GuestConn]) -> Vec<Header> {
    let mut others = Vec::new();
    for (hdr, data) in g.recv() {
        let Some(c) = conns
            .iter_mut()
            .find(|c| c.port == hdr.dst_port && c.host_port == hdr.src_port)
        else {
            others.push(hdr);
            continue;
        };
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, CID));
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            op::RW => {
                assert!(
                    c.received.len() as u64 + data.len() as u64
                        <= u64::from(c.fwd_cnt) + u64::from(GUEST_BUF),
                    "device sent past the guest's credit"
                );
                c.received.extend_from_slice(&data);
            }
            op::SHUTDOWN => c.host_shut |= hdr.flags & SHUTDOWN_SEND != 0,
            op::RST => c.reset = true,
            op::CREDIT_UPDATE => {}
            other => others.push(Header { op: other, ..hdr }),
        }
    }
    // The guest application consumes everything and tells the device now and then.
    for c in conns.iter_mut() {
        c.fwd_cnt = c.received.len() as u32;
        if c.fwd_cnt.wrapping_sub(c.reported_fwd) >= GUEST_BUF / 2 && !c.reset {
            c.reported_fwd = c.fwd_cnt;
            let h = c.hdr(op::CREDIT_UPDATE);
            g.send(h, &[]);
        }
    }
    others
}

/// The guest connects to host port `port`, where `listener` listens; returns both ends.
fn guest_connect(
    g: &mut FakeGuest,
    listener: &UnixListener,
    port: u32,
    src: u32,
) -> (GuestConn, UnixStream) {
    g.send(guest_hdr(src, port, op::REQUEST), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    let reply = got[0].0;
    assert_eq!(reply.op, op::RESPONSE, "{reply:?}");
    assert_eq!((reply.src_port, reply.dst_port), (port, src));
    let (host, _) = listener.accept().unwrap();
    (GuestConn::new(src, port, &reply), host)
}

/// A host client connects to the device's socket and asks for guest port `port`; the guest
/// accepts.
fn host_connect(g: &mut FakeGuest, port: u32, extra: &[u8]) -> (GuestConn, UnixStream) {
    let mut client = UnixStream::connect(&g.socket).unwrap();
    let mut line = format!("CONNECT {port}\n").into_bytes();
    line.extend_from_slice(extra);
    client.write_all(&line).unwrap();
    let got = g.recv();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(req.dst_port, port);
    assert!(req.src_port >= FIRST_HOST_PORT, "{req:?}");
    let conn = GuestConn::new(port, req.src_port, &req);
    g.send(conn.hdr(op::RESPONSE), &[]);
    let mut ok = Vec::new();
    let mut b = [0u8; 1];
    while !ok.ends_with(b"\n") {
        client.read_exact(&mut b).unwrap();
        ok.push(b[0]);
    }
    assert_eq!(ok, format!("OK {}\n", req.src_port).into_bytes());
    (conn, client)
}

#[test]
fn a_guest_connection_reaches_the_host_listener_and_bytes_flow_both_ways() {
    let mut g = FakeGuest::new(Limits::default());
    let listener = UnixListener::bind(g.socket_for_port(1234)).unwrap();
    let (mut gc, mut host) = guest_connect(&mut g, &listener, 1234, 50_000);

    // Guest to host: 1 MiB in credit-sized pieces, the host reading as it comes.
    let up = pattern(1 << 20, 7);
    host.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut off = 0;
    while got.len() < up.len() {
        let n = (gc.credit() as usize).min(up.len() - off).min(16 * 1024);
        if n > 0 {
            let h = gc.hdr(op::RW);
            g.send(h, &up[off..off + n]);
            gc.sent += n as u32;
            off += n;
        }
        let mut buf = [0u8; 65536];
        match host.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        dispatch(&mut g, std::slice::from_mut(&mut gc));
    }
    assert_eq!(checksum(&got), checksum(&up));

    // Host to guest: 1 MiB written by a thread, delivered within the guest's credit.
    let down = pattern(1 << 20, 9);
    host.set_nonblocking(false).unwrap();
    let mut writer = host.try_clone().unwrap();
    let data = down.clone();
    let t = std::thread::spawn(move || writer.write_all(&data).unwrap());
    wait_until(
        || {
            dispatch(&mut g, std::slice::from_mut(&mut gc));
            gc.received.len() >= down.len()
        },
        "the host's megabyte in the guest",
    );
    t.join().unwrap();
    assert_eq!(checksum(&gc.received), checksum(&down));
    assert_eq!(g.muxer.stats().rx_bytes, 1 << 20);
    assert_eq!(g.muxer.stats().tx_bytes, 1 << 20);

    // The guest closes: the host sees the end, the guest gets the RST that completes it.
    g.send(
        gc.hdr(op::SHUTDOWN)
            .with_flags(SHUTDOWN_RCV | SHUTDOWN_SEND),
        &[],
    );
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    dispatch(&mut g, std::slice::from_mut(&mut gc));
    assert!(gc.reset, "no RST after the guest's shutdown");
    assert_eq!(g.muxer.connections(), 0);
}

impl Header {
    fn with_flags(self, flags: u32) -> Self {
        Self { flags, ..self }
    }
}

#[test]
fn a_guest_connection_to_a_port_nobody_listens_on_is_reset() {
    let mut g = FakeGuest::new(Limits::default());
    g.send(guest_hdr(40_000, 77, op::REQUEST), &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    let (rst, _) = got[0];
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 77, 40_000));
    assert_eq!(g.muxer.connections(), 0);
}

#[test]
fn a_host_client_connects_with_connect_and_nothing_past_the_newline_is_consumed() {
    let mut g = FakeGuest::new(Limits::default());
    // The bytes after the line are the stream's first bytes.
    let (mut gc, mut client) = host_connect(&mut g, 1024, b"early bytes");
    wait_until(
        || {
            dispatch(&mut g, std::slice::from_mut(&mut gc));
            gc.received.len() >= 11
        },
        "the early bytes",
    );
    assert_eq!(gc.received, b"early bytes");
    g.send(gc.hdr(op::RW), b"pong");
    gc.sent += 4;
    let mut b = [0u8; 4];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");

    // Lower case, as Kata's Rust runtime sends it; a second host port.
    let mut c2 = UnixStream::connect(&g.socket).unwrap();
    c2.write_all(b"connect 1024\n").unwrap();
    let got = g.recv();
    assert_eq!(got[0].0.op, op::REQUEST);
    assert_ne!(got[0].0.src_port, gc.host_port);

    // The host closes: the guest hears the end of the stream.
    drop(client);
    wait_until(
        || {
            dispatch(&mut g, std::slice::from_mut(&mut gc));
            gc.host_shut
        },
        "SHUTDOWN after the host closed",
    );
}

#[test]
fn a_refused_host_connection_is_closed_without_a_reply() {
    let mut g = FakeGuest::new(Limits::default());
    let mut client = UnixStream::connect(&g.socket).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let got = g.recv();
    let req = got[0].0;
    assert_eq!(req.op, op::REQUEST);
    g.send(guest_hdr(9, req.src_port, op::RST), &[]);
    let mut all = Vec::new();
    client.read_to_end(&mut all).unwrap();
    assert!(all.is_empty(), "refused client got {all:?}");
    assert_eq!(g.muxer.connections(), 0);
}

#[test]
fn bad_lines_and_silent_clients_are_closed() {
    let limits = Limits {
        connect_timeout: Duration::from_millis(100),
        ..Limits::default()
    };
    let mut g = FakeGuest::new(limits);
    let mut bad = UnixStream::connect(&g.socket).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let mut long = UnixStream::connect(&g.socket).unwrap();
    long.write_all(&[b'7'; 100]).unwrap();
    let mut silent = UnixStream::connect(&g.socket).unwrap();
    // A client the guest never answers is closed after the timeout and the guest reset.
    let mut unanswered = UnixStream::connect(&g.socket).unwrap();
    unanswered.write_all(b"CONNECT 5\n").unwrap();
    g.pump();
    let req = g.recv();
    assert_eq!(req.len(), 1);
    for s in [&mut bad, &mut long, &mut silent, &mut unanswered] {
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    }
    let closed = |s: &mut UnixStream| {
        let mut b = [0u8; 8];
        // Closed with unread bytes: a reset rather than the end of the stream.
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    assert!(closed(&mut bad));
    assert!(closed(&mut long));
    wait_until(
        || {
            g.pump();
            closed(&mut silent) && closed(&mut unanswered)
        },
        "the timeout",
    );
    let rst = g.recv();
    assert!(
        rst.iter()
            .any(|(h, _)| h.op == op::RST && h.src_port == req[0].0.src_port),
        "{rst:?}"
    );
    assert_eq!(g.muxer.connections(), 0);
}

#[test]
fn a_stalled_host_reader_stops_the_guest_and_loses_nothing() {
    let mut g = FakeGuest::new(Limits::default());
    let listener = UnixListener::bind(g.socket_for_port(2000)).unwrap();
    let (mut gc, mut host) = guest_connect(&mut g, &listener, 2000, 1);
    let data = pattern(4 << 20, 3);
    let mut off = 0;
    // The host does not read: the guest runs out of credit after the socket buffer and the
    // device's buffer are full.
    loop {
        dispatch(&mut g, std::slice::from_mut(&mut gc));
        let n = (gc.credit() as usize).min(32 * 1024).min(data.len() - off);
        if n == 0 {
            break;
        }
        g.send(gc.hdr(op::RW), &data[off..off + n]);
        gc.sent += n as u32;
        off += n;
    }
    assert!(off < data.len(), "the guest never ran out of credit");
    // Sending past the credit would reset the stream: the device never holds more than that.
    // The host resumes: everything arrives, in order.
    host.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let mut buf = [0u8; 65536];
        match host.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                g.pump();
                dispatch(&mut g, std::slice::from_mut(&mut gc));
                let n = (gc.credit() as usize).min(32 * 1024).min(data.len() - off);
                if n > 0 {
                    g.send(gc.hdr(op::RW), &data[off..off + n]);
                    gc.sent += n as u32;
                    off += n;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(checksum(&got), checksum(&data));
}

#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let limits = Limits {
        buf_alloc: 8192,
        ..Limits::default()
    };
    let mut g = FakeGuest::new(limits);
    let listener = UnixListener::bind(g.socket_for_port(3000)).unwrap();
    let (mut gc, _host) = guest_connect(&mut g, &listener, 3000, 1);
    // The host never reads; the socket buffer takes some, the device 8 KiB, then RST.
    let chunk = vec![0x5a; 60_000];
    for _ in 0..100 {
        g.send(gc.hdr(op::RW), &chunk);
        dispatch(&mut g, std::slice::from_mut(&mut gc));
        if gc.reset {
            break;
        }
    }
    assert!(gc.reset, "no RST for a guest past its credit");
    assert_eq!(g.muxer.connections(), 0);
}

#[test]
fn a_guest_without_credit_leaves_the_bytes_in_the_host_socket() {
    let mut g = FakeGuest::new(Limits::default());
    let listener = UnixListener::bind(g.socket_for_port(4000)).unwrap();
    let (mut gc, mut host) = guest_connect(&mut g, &listener, 4000, 1);
    host.set_nonblocking(true).unwrap();
    let data = pattern(2 << 20, 1);
    let mut written = 0;
    // The guest takes the packets but its application reads nothing (no credit updates).
    for _ in 0..200 {
        match host.write(&data[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        for (h, d) in g.recv() {
            assert_eq!(h.op, op::RW);
            gc.received.extend_from_slice(&d);
        }
    }
    assert_eq!(
        gc.received.len() as u32,
        GUEST_BUF,
        "the device ignored the credit"
    );
    assert!(written < data.len(), "the host writer was never held back");
    // The application reads: the rest flows.
    host.set_nonblocking(false).unwrap();
    let mut writer = host.try_clone().unwrap();
    let rest = data[written..].to_vec();
    let t = std::thread::spawn(move || writer.write_all(&rest).unwrap());
    wait_until(
        || {
            dispatch(&mut g, std::slice::from_mut(&mut gc));
            gc.received.len() >= data.len()
        },
        "the rest of the data",
    );
    t.join().unwrap();
    assert_eq!(checksum(&gc.received), checksum(&data));
}

#[test]
fn hundreds_of_connections_at_once_and_the_limit() {
    let limits = Limits {
        max_connections: 300,
        ..Limits::default()
    };
    let mut g = FakeGuest::new(limits);
    let listener = UnixListener::bind(g.socket_for_port(5000)).unwrap();
    let mut conns = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..150 {
        let (gc, host) = guest_connect(&mut g, &listener, 5000, 10_000 + i);
        conns.push(gc);
        hosts.push(host);
    }
    let mut clients = Vec::new();
    for i in 0..150u32 {
        let (gc, client) = host_connect(&mut g, 6000 + i, &[]);
        conns.push(gc);
        clients.push(client);
    }
    assert_eq!(g.muxer.connections(), 300);
    // One more of either kind is refused.
    let mut extra = UnixStream::connect(&g.socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    g.pump();
    let mut b = [0u8; 1];
    assert_eq!(extra.read(&mut b).unwrap(), 0);
    g.send(guest_hdr(99, 5000, op::REQUEST), &[]);
    assert!(g
        .recv()
        .iter()
        .any(|(h, _)| h.op == op::RST && h.dst_port == 99));
    assert_eq!(g.muxer.stats().refused_connections, 1);

    // Every stream carries its own bytes, host to guest.
    for (i, s) in hosts.iter_mut().chain(clients.iter_mut()).enumerate() {
        s.write_all(&pattern(3000, i as u8)).unwrap();
    }
    wait_until(
        || {
            dispatch(&mut g, &mut conns);
            conns.iter().all(|c| c.received.len() >= 3000)
        },
        "3000 bytes on every stream",
    );
    for (i, c) in conns.iter().enumerate() {
        assert_eq!(c.received, pattern(3000, i as u8), "stream {i}");
    }
    // Dropping the device (a guest reboot, a VM shutdown) closes every host socket.
    drop(g);
    for s in hosts.iter_mut().chain(clients.iter_mut()) {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
}

#[test]
fn malformed_and_misaddressed_packets_are_dropped() {
    let mut g = FakeGuest::new(Limits::default());
    g.send_raw(&[1, 2, 3]);
    let mut h = guest_hdr(1, 2, op::RW);
    h.len = 1 << 20;
    g.send_raw(&h.to_bytes());
    let mut h = guest_hdr(1, 2, op::REQUEST);
    h.src_cid = 7;
    g.send(h, &[]);
    let mut h = guest_hdr(1, 2, op::REQUEST);
    h.dst_cid = 9;
    g.send(h, &[]);
    assert_eq!(g.muxer.stats().bad_packets, 4);
    // Packets of no connection get an RST (a SEQPACKET request too); an RST gets nothing.
    g.send(guest_hdr(1, 2, op::RW), b"x");
    let mut h = guest_hdr(1, 3, op::REQUEST);
    h.type_ = 2;
    g.send(h, &[]);
    g.send(guest_hdr(1, 4, op::RST), &[]);
    let got = g.recv();
    let rsts: Vec<_> = got.iter().map(|(h, _)| (h.op, h.src_port)).collect();
    assert_eq!(rsts, vec![(op::RST, 2), (op::RST, 3)]);
    assert_eq!(g.muxer.connections(), 0);
}

#[test]
fn stray_resets_are_bounded_when_the_guest_reads_none() {
    let limits = Limits {
        max_stray_resets: 8,
        ..Limits::default()
    };
    let mut g = FakeGuest::with_rx_buffers(limits, 0);
    for i in 0..50 {
        g.send(guest_hdr(i, 1, op::RW), b"junk");
    }
    assert!(g.recv().is_empty());
    // The driver gives buffers: only the bounded number of resets was kept.
    for _ in 0..RX_SIZE {
        g.give_rx_buffer();
    }
    g.muxer.process(&mut g.queues[0], &g.mem).unwrap();
    let got = g.recv();
    assert_eq!(got.len(), 8);
    assert!(got.iter().all(|(h, _)| h.op == op::RST));
}

#[test]
fn host_clients_churning_while_the_guest_reads_nothing_are_bounded() {
    let limits = Limits {
        max_connections: 8,
        max_stray_resets: 4,
        ..Limits::default()
    };
    let mut g = FakeGuest::with_rx_buffers(limits, 0);
    for _ in 0..200 {
        let mut c = UnixStream::connect(&g.socket).unwrap();
        c.write_all(b"CONNECT 1024\n").unwrap();
        g.pump();
        drop(c);
        g.pump();
        assert!(
            g.muxer.pending_packets() <= 2 * 8 + 4,
            "{}",
            g.muxer.pending_packets()
        );
    }
    assert!(g.muxer.stats().refused_connections > 0);
    // The guest reads again: what is left goes out, and new clients are served.
    for _ in 0..RX_SIZE {
        g.give_rx_buffer();
    }
    g.muxer.process(&mut g.queues[0], &g.mem).unwrap();
    for _ in 0..10 {
        let got = g.recv();
        assert!(got
            .iter()
            .all(|(h, _)| h.op == op::RST || h.op == op::REQUEST));
        if got.is_empty() && g.muxer.pending_packets() == 0 {
            break;
        }
    }
    assert_eq!(g.muxer.pending_packets(), 0);
    let (_gc, _client) = host_connect(&mut g, 1024, &[]);
}
