//! The `vhost_user_net` binary: command-line errors, termination by signal, and whole sessions
//! with the `vhost` crate's frontend over guest memory in a memfd, as a VMM would drive it,
//! with frames going through the daemon's TAP in both directions. The TAP tests run in a fresh
//! network namespace (`net_util::testing::in_new_netns`): the daemon, started from the
//! namespace's thread, creates its TAP there.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use net_util::testing::{in_new_netns, Buf, PacketSocket, TestDriver};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vhost_user_daemon::testing::hostile::{self, HostileSubject};
use vhost_user_daemon::testing::{
    self, handshake, is_socket, Daemon, FrontendRing, HandshakeOptions, Scratch, SeccompSubject,
    TIMEOUT,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const BIN: &str = env!("CARGO_BIN_EXE_vhost_user_net");
const MEM_SIZE: usize = 4 << 20;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
/// Local experimental EtherTypes, so other traffic on the TAP is easy to skip.
const ETHERTYPE_TX: u16 = 0x88b5;
const ETHERTYPE_RX: u16 = 0x88b6;
const VNET_HDR_LEN: usize = 12;
const RX_BUF_LEN: u32 = 2048;

/// Starts the daemon with `--net-backend <backend> <extra...> -vv`.
trait Start {
    /// With `wait_for`, waits until that socket exists.
    fn start(backend: &str, extra: &[&str], wait_for: Option<&Path>) -> Self;
}

impl Start for Daemon {
    fn start(backend: &str, extra: &[&str], wait_for: Option<&Path>) -> Self {
        let mut d = Daemon::spawn(
            BIN,
            &[&["--net-backend", backend], extra, &["-vv"]].concat(),
        );
        if let Some(socket) = wait_for {
            d.wait_for_socket(socket, None);
        }
        d
    }
}

fn run_bin(args: &[&str]) -> (ExitStatus, String, String) {
    testing::run_bin(BIN, args)
}

fn assert_one_error_line(args: &[&str], needle: &str) {
    testing::assert_one_error_line(BIN, "vhost_user_net", args, needle);
}

#[test]
fn bad_arguments_are_one_line_and_exit_1() {
    assert_one_error_line(&[], "--net-backend is required");
    assert_one_error_line(&["--net-backend"], "needs a value");
    assert_one_error_line(
        &["--net-backend", "ip=10.0.0.1,mask=255.0.0.0"],
        "'socket=' is required",
    );
    assert_one_error_line(
        &[
            "--net-backend",
            "ip=10.0.0.1,mask=255.0.0.0,socket=/y,num_queues=3",
        ],
        "num_queues=3",
    );
    assert_one_error_line(
        &[
            "--net-backend",
            "ip=10.0.0.1,mask=255.0.0.0,socket=/y,vhost_user=on",
        ],
        "unknown key 'vhost_user'",
    );
    assert_one_error_line(
        &[
            "--net-backend",
            "ip=10.0.0.1,mask=255.0.0.0,socket=/y,mac=nope",
        ],
        "mac=nope",
    );
    assert_one_error_line(&["--bogus"], "unexpected argument '--bogus'");
    let (status, out, _) = run_bin(&["--help"]);
    assert!(status.success());
    assert!(out.contains("--net-backend") && out.contains("host_mac"));
    let (status, out, _) = run_bin(&["--version"]);
    assert!(status.success());
    assert!(out.starts_with("vhost_user_net "));
}

/// Turns IPv6 off in the calling thread's (fresh) namespace, so the kernel sends no router
/// solicitations or MLD reports through the TAP. Best effort: the tests skip such frames.
fn quiet_netns() {
    for conf in ["all", "default"] {
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
}

/// Guest memory in a memfd, shareable with the daemon.
fn shared_memory() -> GuestMemoryMmap {
    testing::shared_memory(c"vun-test-guest-ram", MEM_SIZE)
}

/// One queue of a frontend session: rings written by a `TestDriver`, kick and call eventfds.
struct Queue {
    driver: TestDriver,
    kick: EventFd,
    call: EventFd,
    /// Receive buffers by head index.
    buffers: HashMap<u16, u64>,
}

impl Queue {
    /// Polls the used ring until `n` entries arrived; returns them.
    fn wait_used(&mut self, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + TIMEOUT;
        let mut used = Vec::new();
        while used.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} used entries",
                used.len()
            );
            let _ = self.call.read();
            used.extend(self.driver.take_used());
            std::thread::sleep(Duration::from_millis(1));
        }
        used
    }

    /// Adds `n` receive buffers and kicks.
    fn add_rx_buffers(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.driver.alloc(RX_BUF_LEN as usize, 0);
            let head = self.driver.add_chain(&[Buf::w(addr, RX_BUF_LEN)]);
            self.buffers.insert(head, addr);
        }
        self.kick.write(1).unwrap();
    }

    /// Sends `frame` (behind a zero virtio-net header) and waits for its completion.
    fn transmit(&mut self, frame: &[u8]) {
        let mut packet = vec![0u8; VNET_HDR_LEN];
        packet.extend_from_slice(frame);
        let addr = self.driver.alloc_data(&packet);
        self.driver.add_chain(&[Buf::r(addr, packet.len() as u32)]);
        self.kick.write(1).unwrap();
        let used = self.wait_used(1);
        assert_eq!(used[0].1, 0, "tx chains come back with length 0");
    }

    /// Waits for a received frame with `ethertype`; returns its virtio-net header and frame.
    fn receive(&mut self, ethertype: u16) -> (Vec<u8>, Vec<u8>) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "no frame of type {ethertype:#x} received"
            );
            for (head, len) in self.wait_used(1) {
                let addr = self.buffers[&(head as u16)];
                let data = self.driver.read(addr, len as usize);
                let (hdr, frame) = data.split_at(VNET_HDR_LEN);
                if frame.len() >= 14 && frame[12..14] == ethertype.to_be_bytes() {
                    return (hdr.to_vec(), frame.to_vec());
                }
                eprintln!("skipping a received frame of {} bytes", frame.len());
            }
        }
    }
}

/// A connected frontend after the full setup sequence.
struct Session {
    frontend: Frontend,
    queues: Vec<Queue>,
    config: Vec<u8>,
    features: u64,
}

/// Sets the device up as a VMM does ([`handshake`]), acking everything offered, EVENT_IDX and
/// MRG_RXBUF included.
fn setup(mut frontend: Frontend, mem: &GuestMemoryMmap, num_queues: usize) -> Session {
    let options = HandshakeOptions {
        config_len: 24,
        event_idx: true,
        queue_max_size: 256,
    };
    let h = handshake(&mut frontend, mem, num_queues, options);
    let queues = h
        .rings
        .into_iter()
        .map(|FrontendRing { driver, kick, call }| Queue {
            driver,
            kick,
            call,
            buffers: HashMap::new(),
        });
    Session {
        frontend,
        queues: queues.collect(),
        config: h.config,
        features: h.offered,
    }
}

fn test_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..200u32).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

/// Frames both ways through queue pair `pair` of `s`, the TAP being `if_name`.
fn exchange_frames(s: &mut Session, pair: usize, if_name: &str) {
    let capture = PacketSocket::bind(if_name);
    let tag = pair as u8;
    // Guest → host: through the transmit queue, seen on the TAP.
    let out = test_frame([0xff; 6], GUEST_MAC, ETHERTYPE_TX, tag);
    s.queues[2 * pair + 1].transmit(&out);
    let seen = capture
        .recv_ethertype(ETHERTYPE_TX, TIMEOUT)
        .expect("the guest's frame never reached the TAP");
    assert_eq!(seen, out);
    // Host → guest: sent out of the TAP, into the receive queue (mergeable buffers: the
    // header says one buffer).
    s.queues[2 * pair].add_rx_buffers(16);
    let back = test_frame(GUEST_MAC, HOST_MAC, ETHERTYPE_RX, tag);
    capture.send(&back);
    let (hdr, frame) = s.queues[2 * pair].receive(ETHERTYPE_RX);
    assert_eq!(frame, back);
    assert_eq!(&hdr[10..12], &1u16.to_le_bytes(), "num_buffers");
}

#[test]
fn frames_both_ways_then_exit_on_disconnect() {
    in_new_netns("frames_both_ways_then_exit_on_disconnect", || {
        quiet_netns();
        let dir = Scratch::new("session");
        let socket = dir.file("vun.sock");
        let backend = format!(
            "ip=192.168.249.1,mask=255.255.255.0,mac=52:54:00:12:34:56,socket={},tap=vuntest0,\
             host_mac=52:54:00:ab:cd:ef,mtu=1400,num_queues=2,queue_size=256",
            socket.display()
        );
        let d = Daemon::start(&backend, &[], Some(&socket));
        // The TAP exists, configured, before the socket does.
        let tap = net_util::Tap::open_named("vuntest0", 1);
        assert!(
            tap.is_err(),
            "the daemon's single-queue TAP is attached already"
        );
        let mem = shared_memory();
        let mut s = setup(Frontend::connect(&socket, 2).unwrap(), &mem, 2);
        // Single-frontend mode: the socket goes once the frontend is accepted.
        testing::wait_until_removed(&socket);
        for bit in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MTU,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(s.features & (1 << bit), 0, "feature {bit}");
        }
        assert_eq!(s.features & (1 << VIRTIO_NET_F_MQ), 0, "one pair: no MQ");
        assert_eq!(s.features & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
        assert_eq!(&s.config[0..6], &GUEST_MAC, "mac");
        assert_eq!(&s.config[6..8], &1u16.to_le_bytes(), "status: LINK_UP");
        assert_eq!(&s.config[8..10], &1u16.to_le_bytes(), "max_virtqueue_pairs");
        assert_eq!(&s.config[10..12], &1400u16.to_le_bytes(), "mtu");

        exchange_frames(&mut s, 0, "vuntest0");
        // EVENT_IDX is on: the device published avail_event on the transmit ring.
        assert_eq!(s.queues[1].driver.avail_event(), 1);

        // Stop the rings as a VMM does on reset: the avail index comes back.
        assert_eq!(s.frontend.get_vring_base(1).unwrap(), 1);
        let rx_base = s.frontend.get_vring_base(0).unwrap();
        assert!((1..=16).contains(&rx_base), "{rx_base}");
        drop(s);
        let (status, err) = d.wait();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(err.contains("frontend disconnected"), "{err}");
        assert!(!socket.exists());
    });
}

#[test]
fn two_queue_pairs_each_on_its_own_tap_queue() {
    in_new_netns("two_queue_pairs_each_on_its_own_tap_queue", || {
        quiet_netns();
        let dir = Scratch::new("mq");
        let socket = dir.file("vun.sock");
        let backend = format!(
            "ip=192.168.250.1,mask=255.255.255.0,mac=52:54:00:12:34:56,socket={},tap=vunmq0,\
             num_queues=4",
            socket.display()
        );
        let d = Daemon::start(&backend, &[], Some(&socket));
        let mem = shared_memory();
        let mut s = setup(Frontend::connect(&socket, 4).unwrap(), &mem, 4);
        assert_ne!(s.features & (1 << VIRTIO_NET_F_MQ), 0);
        assert_ne!(s.features & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
        assert_eq!(&s.config[8..10], &2u16.to_le_bytes(), "max_virtqueue_pairs");
        // Transmit works on both pairs; the TAP spreads received frames over its queues by
        // flow, so reception is checked on whichever pair gets the frame.
        let capture = PacketSocket::bind("vunmq0");
        for pair in 0..2 {
            let out = test_frame([0xff; 6], GUEST_MAC, ETHERTYPE_TX, pair as u8);
            s.queues[2 * pair + 1].transmit(&out);
            assert_eq!(capture.recv_ethertype(ETHERTYPE_TX, TIMEOUT).unwrap(), out);
            s.queues[2 * pair].add_rx_buffers(8);
        }
        let back = test_frame(GUEST_MAC, HOST_MAC, ETHERTYPE_RX, 9);
        capture.send(&back);
        let deadline = Instant::now() + TIMEOUT;
        'found: loop {
            assert!(
                Instant::now() < deadline,
                "the frame reached no receive queue"
            );
            for pair in 0..2 {
                let q = &mut s.queues[2 * pair];
                for (head, len) in q.driver.take_used() {
                    let data = q.driver.read(q.buffers[&(head as u16)], len as usize);
                    if data[VNET_HDR_LEN..] == back[..] {
                        break 'found;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(s);
        let (status, err) = d.wait();
        assert_eq!(status.code(), Some(0), "{err}");
    });
}

#[test]
fn sigterm_while_waiting_removes_the_socket() {
    in_new_netns("sigterm_while_waiting_removes_the_socket", || {
        let dir = Scratch::new("sigterm");
        let socket = dir.file("vun.sock");
        let backend = format!(
            "ip=192.168.251.1,mask=255.255.255.0,socket={},tap=vunterm0",
            socket.display()
        );
        let d = Daemon::start(&backend, &[], Some(&socket));
        d.signal(libc::SIGTERM);
        let (status, err) = d.wait();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(!socket.exists(), "socket left behind");
    });
}

#[test]
fn keep_running_then_sigterm_while_connected() {
    in_new_netns("keep_running_then_sigterm_while_connected", || {
        quiet_netns();
        let dir = Scratch::new("keep");
        let socket = dir.file("vun.sock");
        let backend = format!(
            "ip=192.168.252.1,mask=255.255.255.0,mac=52:54:00:12:34:56,socket={},tap=vunkeep0",
            socket.display()
        );
        let d = Daemon::start(&backend, &["--keep-running"], Some(&socket));
        let mem = shared_memory();
        let baseline = d.fd_count();
        for round in 0..3 {
            let mut s = setup(Frontend::connect(&socket, 2).unwrap(), &mem, 2);
            assert!(is_socket(&socket), "keep-running keeps the socket");
            exchange_frames(&mut s, 0, "vunkeep0");
            drop(s);
            // Each connection's threads and descriptors (exit events included) go with it.
            let deadline = Instant::now() + TIMEOUT;
            while d.fd_count() != baseline {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {} descriptors open, {baseline} before",
                    d.fd_count()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _s = setup(Frontend::connect(&socket, 2).unwrap(), &mem, 2);
        d.signal(libc::SIGTERM);
        let (status, err) = d.wait();
        assert_eq!(status.code(), Some(0), "{err}");
        assert!(!socket.exists());
    });
}

#[test]
fn client_mode_connects_to_the_vmm() {
    in_new_netns("client_mode_connects_to_the_vmm", || {
        quiet_netns();
        let dir = Scratch::new("client");
        let socket = dir.file("vmm.sock");
        // The VMM's side: it listens, the daemon connects.
        let listener = UnixListener::bind(&socket).unwrap();
        let backend = format!(
            "ip=192.168.253.1,mask=255.255.255.0,mac=52:54:00:12:34:56,socket={},tap=vuncl0,\
             client=on",
            socket.display()
        );
        let d = Daemon::start(&backend, &[], None);
        let (stream, _) = listener.accept().unwrap();
        let mem = shared_memory();
        let mut s = setup(Frontend::from_stream(stream, 2), &mem, 2);
        exchange_frames(&mut s, 0, "vuncl0");
        drop(s);
        let (status, err) = d.wait();
        assert_eq!(status.code(), Some(0), "{err}");
        // The socket is the VMM's: left alone.
        assert!(is_socket(&socket));
    });
}

#[test]
fn client_mode_without_a_listener_fails() {
    let dir = Scratch::new("noclient");
    let socket = dir.file("none.sock");
    if net_util::testing::tap_tests_unavailable().is_some() {
        eprintln!("SKIPPED: needs root and /dev/net/tun");
        return;
    }
    in_new_netns("client_mode_without_a_listener_fails", move || {
        let backend = format!(
            "ip=192.168.254.1,mask=255.255.255.0,socket={},tap=vunnc0,client=on",
            socket.display()
        );
        assert_one_error_line(
            &["--net-backend", &backend],
            "cannot connect to the frontend",
        );
    });
}

#[test]
fn protocol_error_ends_the_daemon_with_1() {
    in_new_netns("protocol_error_ends_the_daemon_with_1", || {
        let dir = Scratch::new("proto");
        let socket = dir.file("vun.sock");
        let backend = format!(
            "ip=192.168.248.1,mask=255.255.255.0,socket={},tap=vunproto0",
            socket.display()
        );
        let d = Daemon::start(&backend, &[], Some(&socket));
        let frontend = Frontend::connect(&socket, 2).unwrap();
        frontend.set_owner().unwrap();
        // A feature the backend did not offer: the crate refuses and drops the connection.
        let _ = frontend.set_features(1 << 63);
        let (status, err) = d.wait();
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains("frontend connection failed"), "{err}");
        assert!(!socket.exists());
    });
}

/// The `--net-backend` of the seccomp checks: two queue pairs, so two workers.
fn seccomp_subject_args(socket: &Path) -> Vec<String> {
    vec![
        "--net-backend".into(),
        format!(
            "ip=192.168.247.1,mask=255.255.255.0,socket={},tap=vunsc0,num_queues=4",
            socket.display()
        ),
    ]
}

const SECCOMP_HANDSHAKE: HandshakeOptions = HandshakeOptions {
    config_len: 24,
    event_idx: true,
    queue_max_size: 256,
};

#[test]
fn each_thread_class_is_filtered() {
    in_new_netns("each_thread_class_is_filtered", || {
        quiet_netns();
        testing::assert_each_class_is_filtered(&SeccompSubject {
            bin: BIN,
            args: &seccomp_subject_args,
            num_queues: 4,
            handshake: SECCOMP_HANDSHAKE,
        });
    });
}

#[test]
fn seccomp_log_and_false_let_forbidden_calls_through() {
    in_new_netns("seccomp_log_and_false_let_forbidden_calls_through", || {
        quiet_netns();
        testing::assert_log_and_off_let_calls_through(&SeccompSubject {
            bin: BIN,
            args: &seccomp_subject_args,
            num_queues: 4,
            handshake: SECCOMP_HANDSHAKE,
        });
    });
}

/// One frame on the transmit queue (a zero virtio-net header and 60 bytes): a used entry of
/// length 0.
fn hostile_request(driver: &mut TestDriver) -> u32 {
    let mut packet = vec![0u8; VNET_HDR_LEN];
    packet.extend_from_slice(&test_frame([0xff; 6], GUEST_MAC, ETHERTYPE_TX, 0x77)[..60]);
    let addr = driver.alloc_data(&packet);
    driver.add_chain(&[Buf::r(addr, packet.len() as u32)]);
    0
}

/// Every hostile frontend of `vhost_user_daemon::testing::hostile` against this daemon: each
/// refused or survived as the case says, the daemon exiting with the documented status, and a
/// `--keep-running` daemon serving a well-behaved frontend after each.
#[test]
fn hostile_frontends_are_refused_or_survived() {
    in_new_netns("hostile_frontends_are_refused_or_survived", || {
        quiet_netns();
        let args = |socket: &Path| {
            vec![
                "--net-backend".to_string(),
                format!(
                    "ip=192.168.246.1,mask=255.255.255.0,mac=52:54:00:12:34:56,socket={},\
                     tap=vunhostile0",
                    socket.display()
                ),
            ]
        };
        hostile::assert_hostile_frontends_are_survived(&HostileSubject {
            bin: BIN,
            args: &args,
            num_queues: 2,
            queue_max_size: 256,
            config_len: 24,
            serve_queue: 1,
            request: &hostile_request,
        });
    });
}
