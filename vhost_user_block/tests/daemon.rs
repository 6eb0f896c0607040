//! The `vhost_user_block` binary: command-line errors, refusals (locked image, busy socket),
//! termination by signal, and whole sessions with the `vhost` crate's frontend over guest
//! memory in a memfd, as a VMM would drive it.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use net_util::testing::{Buf, TestDriver};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vhost_user_daemon::testing::hostile::{self, HostileSubject};
use vhost_user_daemon::testing::{
    self, file_id, handshake, is_socket, Daemon, FrontendRing, HandshakeOptions, Scratch,
    SeccompSubject, TIMEOUT,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const BIN: &str = env!("CARGO_BIN_EXE_vhost_user_block");
const IMAGE_SIZE: u64 = 1 << 20;
const MEM_SIZE: usize = 4 << 20;

fn image_byte(o: u64) -> u8 {
    (o as u8) ^ ((o >> 9) as u8) ^ 0x5a
}

fn write_image(path: &Path) -> Vec<u8> {
    let data: Vec<u8> = (0..IMAGE_SIZE).map(image_byte).collect();
    fs::write(path, &data).unwrap();
    data
}

/// Starts the daemon with `--block-backend <backend> <extra...> -v`.
trait Start {
    fn start(backend: &str, extra: &[&str], socket: &Path) -> Self;
}

impl Start for Daemon {
    fn start(backend: &str, extra: &[&str], socket: &Path) -> Self {
        // A socket already there (a stale one the daemon is to replace) does not count.
        let stale = file_id(socket);
        let mut d = Daemon::spawn(
            BIN,
            &[&["--block-backend", backend], extra, &["-v"]].concat(),
        );
        d.wait_for_socket(socket, stale);
        d
    }
}

fn run_bin(args: &[&str]) -> (ExitStatus, String, String) {
    testing::run_bin(BIN, args)
}

fn assert_one_error_line(args: &[&str], needle: &str) {
    testing::assert_one_error_line(BIN, "vhost_user_block", args, needle);
}

#[test]
fn bad_arguments_are_one_line_and_exit_1() {
    assert_one_error_line(&[], "--block-backend is required");
    assert_one_error_line(&["--block-backend"], "needs a value");
    assert_one_error_line(&["--block-backend", "path=/x"], "'socket=' is required");
    assert_one_error_line(
        &["--block-backend", "path=/x,socket=/y,num_queues=99"],
        "num_queues=99",
    );
    assert_one_error_line(
        &["--block-backend", "path=/x,socket=/y,poll=1"],
        "unknown key 'poll'",
    );
    assert_one_error_line(&["--bogus"], "unexpected argument '--bogus'");
    let (status, out, _) = run_bin(&["--help"]);
    assert!(status.success());
    assert!(out.contains("--block-backend") && out.contains("num_queues"));
    let (status, out, _) = run_bin(&["--version"]);
    assert!(status.success());
    assert!(out.starts_with("vhost_user_block "));
}

#[test]
fn refuses_missing_and_locked_images() {
    let dir = Scratch::new("refuse");
    let image = dir.file("disk.img");
    let socket = dir.file("vub.sock");
    let backend = format!("path={},socket={}", image.display(), socket.display());
    assert_one_error_line(&["--block-backend", &backend], "cannot open disk image");
    assert!(!socket.exists());

    write_image(&image);
    // Another user holds it read-write (an OFD lock, so this process counts as another user).
    let holder = block::RawFile::open(&image, false, false).unwrap();
    assert_one_error_line(&["--block-backend", &backend], "is locked");
    let ro = format!("{backend},readonly=true");
    assert_one_error_line(&["--block-backend", &ro], "is locked");
    assert!(!socket.exists(), "no socket left behind by a refused start");
    drop(holder);

    // A reader does not keep a read-only daemon out, but does keep a writer out. (The lock
    // of `holder` can outlive it briefly: a child that another test forks at that moment
    // shares its open file description until it execs.)
    let deadline = Instant::now() + TIMEOUT;
    let reader = loop {
        match block::RawFile::open(&image, true, false) {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_one_error_line(&["--block-backend", &backend], "is locked");
    let d = Daemon::start(&ro, &[], &socket);
    d.signal(libc::SIGTERM);
    let (status, err) = d.wait();
    assert!(status.success(), "{err}");
    drop(reader);
}

#[test]
fn refuses_a_busy_or_foreign_socket_path() {
    let dir = Scratch::new("busy");
    let image = dir.file("disk.img");
    write_image(&image);
    let socket = dir.file("vub.sock");
    // A regular file at the socket path is not touched.
    fs::write(&socket, b"keep me").unwrap();
    let backend = format!("path={},socket={}", image.display(), socket.display());
    assert_one_error_line(&["--block-backend", &backend], "is not a socket");
    assert_eq!(fs::read(&socket).unwrap(), b"keep me");
    fs::remove_file(&socket).unwrap();

    // A live listener: refused, and its socket stays.
    let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let ro = format!("{backend},readonly=true");
    assert_one_error_line(&["--block-backend", &ro], "is in use");
    assert!(is_socket(&socket));
    drop(live);

    // Now stale (nobody listens): replaced, and removed at exit.
    let d = Daemon::start(&ro, &[], &socket);
    d.signal(libc::SIGINT);
    let (status, err) = d.wait();
    assert!(status.success(), "{err}");
    assert!(!socket.exists());
}

#[test]
fn sigterm_while_waiting_removes_the_socket() {
    let dir = Scratch::new("sigterm");
    let image = dir.file("disk.img");
    let data = write_image(&image);
    let socket = dir.file("vub.sock");
    let backend = format!("path={},socket={}", image.display(), socket.display());
    let d = Daemon::start(&backend, &[], &socket);
    d.signal(libc::SIGTERM);
    let (status, err) = d.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!socket.exists(), "socket left behind");
    assert_eq!(fs::read(&image).unwrap(), data);
    // The lock went with the process.
    drop(block::RawFile::open(&image, false, false).unwrap());
}

/// Guest memory in a memfd, shareable with the daemon.
fn shared_memory() -> GuestMemoryMmap {
    testing::shared_memory(c"vub-test-guest-ram", MEM_SIZE)
}

/// One queue of a frontend session: rings written by a `TestDriver`, kick and call eventfds.
struct Queue {
    driver: TestDriver,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn request(&mut self, ty: u32, sector: u64, data: Option<Buf>) -> u64 {
        let mut hdr = ty.to_le_bytes().to_vec();
        hdr.extend_from_slice(&[0; 4]);
        hdr.extend_from_slice(&sector.to_le_bytes());
        let hdr = self.driver.alloc_data(&hdr);
        let status = self.driver.alloc(1, 0xff);
        let mut bufs = vec![Buf::r(hdr, 16)];
        bufs.extend(data);
        bufs.push(Buf::w(status, 1));
        self.driver.add_chain(&bufs);
        status
    }

    /// Kicks the daemon and waits for `n` used entries (and the call eventfd).
    fn kick_and_wait(&mut self, n: usize) -> Vec<(u32, u32)> {
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let mut used = Vec::new();
        while used.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} completions",
                used.len()
            );
            if self.call.read().is_ok() {
                used.extend(self.driver.take_used());
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        used
    }
}

/// A connected frontend after the full setup sequence.
struct Session {
    frontend: Frontend,
    queues: Vec<Queue>,
    config: Vec<u8>,
    features: u64,
}

/// Connects and sets the device up as a VMM does ([`handshake`]).
fn connect(socket: &Path, mem: &GuestMemoryMmap, num_queues: usize, event_idx: bool) -> Session {
    let mut frontend = Frontend::connect(socket, num_queues as u64).unwrap();
    let options = HandshakeOptions {
        config_len: 60,
        event_idx,
        queue_max_size: 128,
    };
    let h = handshake(&mut frontend, mem, num_queues, options);
    assert!(!h
        .protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    let queues = h
        .rings
        .into_iter()
        .map(|FrontendRing { driver, kick, call }| Queue { driver, kick, call });
    Session {
        frontend,
        queues: queues.collect(),
        config: h.config,
        features: h.offered,
    }
}

#[test]
fn frontend_session_then_exit_on_disconnect() {
    let dir = Scratch::new("session");
    let image = dir.file("disk.img");
    let mut data = write_image(&image);
    let socket = dir.file("vub.sock");
    let backend = format!(
        "path={},socket={},num_queues=2,serial=vub-e2e-serial",
        image.display(),
        socket.display()
    );
    let d = Daemon::start(&backend, &[], &socket);
    let mem = shared_memory();
    let mut s = connect(&socket, &mem, 2, true);
    assert_ne!(s.features & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(
        &s.config[0..8],
        &(IMAGE_SIZE / 512).to_le_bytes(),
        "capacity"
    );
    assert_eq!(&s.config[34..36], &2u16.to_le_bytes(), "num_queues");
    assert_eq!(&s.config[12..16], &126u32.to_le_bytes(), "seg_max");
    // Single-frontend mode: the socket goes once the frontend is accepted.
    testing::wait_until_removed(&socket);

    // Queue 0: write 4 KiB at sector 100, flush, read it back.
    let q = &mut s.queues[0];
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 256) as u8).collect();
    let wbuf = q.driver.alloc_data(&payload);
    let w = q.request(VIRTIO_BLK_T_OUT, 100, Some(Buf::r(wbuf, 4096)));
    let f = q.request(VIRTIO_BLK_T_FLUSH, 0, None);
    let rbuf = q.driver.alloc(4096, 0);
    let r = q.request(VIRTIO_BLK_T_IN, 100, Some(Buf::w(rbuf, 4096)));
    let used = q.kick_and_wait(3);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [1, 1, 4097]);
    for st in [w, f, r] {
        assert_eq!(q.driver.read(st, 1), [0]);
    }
    assert_eq!(q.driver.read(rbuf, 4096), payload);
    // EVENT_IDX was acked: the crate enabled it on the queue, so the device published
    // avail_event (the index of the next request it wants a kick for).
    assert_eq!(q.driver.avail_event(), 3);
    data[100 * 512..100 * 512 + 4096].copy_from_slice(&payload);

    // Queue 1 (its own worker): GET_ID and a read of the host pattern.
    let q = &mut s.queues[1];
    let id = q.driver.alloc(20, 0xee);
    let g = q.request(VIRTIO_BLK_T_GET_ID, 0, Some(Buf::w(id, 20)));
    let rbuf = q.driver.alloc(512, 0);
    let r = q.request(VIRTIO_BLK_T_IN, 7, Some(Buf::w(rbuf, 512)));
    q.kick_and_wait(2);
    assert_eq!(q.driver.read(g, 1), [0]);
    assert_eq!(&q.driver.read(id, 20)[..14], b"vub-e2e-serial");
    assert_eq!(q.driver.read(r, 1), [0]);
    assert_eq!(q.driver.read(rbuf, 512), &data[7 * 512..8 * 512]);

    // Stop the rings as a VMM does on reset: the avail index comes back.
    assert_eq!(s.frontend.get_vring_base(0).unwrap(), 3);
    assert_eq!(s.frontend.get_vring_base(1).unwrap(), 2);
    drop(s);
    let (status, err) = d.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("frontend disconnected"), "{err}");
    assert!(!socket.exists());
    assert_eq!(
        fs::read(&image).unwrap(),
        data,
        "image content after the session"
    );
}

#[test]
fn keep_running_serves_frontends_in_turn() {
    let dir = Scratch::new("keep");
    let image = dir.file("disk.img");
    let data = write_image(&image);
    let socket = dir.file("vub.sock");
    let backend = format!(
        "path={},socket={},readonly=true",
        image.display(),
        socket.display()
    );
    let d = Daemon::start(&backend, &["--keep-running"], &socket);
    let baseline = d.fd_count();
    let mem = shared_memory();
    for round in 0..3 {
        let mut s = connect(&socket, &mem, 1, round == 1);
        assert!(d.fd_count() > baseline);
        assert_ne!(s.features & (1 << VIRTIO_BLK_F_RO), 0);
        assert!(is_socket(&socket), "keep-running keeps the socket");
        let q = &mut s.queues[0];
        let wbuf = q.driver.alloc(512, 0x77);
        let w = q.request(VIRTIO_BLK_T_OUT, 1, Some(Buf::r(wbuf, 512)));
        q.kick_and_wait(1);
        assert_eq!(q.driver.read(w, 1), [1], "IOERR on a read-only disk");
        // avail_event is written only when EVENT_IDX is on (round 1).
        assert_eq!(q.driver.avail_event(), u16::from(round == 1));
        drop(s);
        // Each connection's threads and descriptors go away with it (nothing accumulates in
        // a daemon that serves frontend after frontend).
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
    // Terminated while connected: the connection is shut down, exit 0.
    let s = connect(&socket, &mem, 1, false);
    d.signal(libc::SIGTERM);
    let (status, err) = d.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!socket.exists());
    drop(s);
    assert_eq!(fs::read(&image).unwrap(), data);
}

#[test]
fn protocol_error_ends_the_daemon_with_1() {
    let dir = Scratch::new("proto");
    let image = dir.file("disk.img");
    write_image(&image);
    let socket = dir.file("vub.sock");
    let backend = format!("path={},socket={}", image.display(), socket.display());
    let d = Daemon::start(&backend, &[], &socket);
    let frontend = Frontend::connect(&socket, 1).unwrap();
    frontend.set_owner().unwrap();
    // A feature the backend did not offer: the crate refuses and drops the connection.
    let _ = frontend.set_features(1 << 63);
    let (status, err) = d.wait();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("frontend connection failed"), "{err}");
    assert!(!socket.exists());
}

/// The `--block-backend` of the seccomp checks: two queues, so two workers.
fn seccomp_subject_args(image: &Path) -> impl Fn(&Path) -> Vec<String> + '_ {
    move |socket| {
        vec![
            "--block-backend".into(),
            format!(
                "path={},socket={},num_queues=2",
                image.display(),
                socket.display()
            ),
        ]
    }
}

const SECCOMP_HANDSHAKE: HandshakeOptions = HandshakeOptions {
    config_len: 60,
    event_idx: true,
    queue_max_size: 128,
};

#[test]
fn each_thread_class_is_filtered() {
    let dir = Scratch::new("seccomp");
    let image = dir.file("disk.img");
    write_image(&image);
    let args = seccomp_subject_args(&image);
    testing::assert_each_class_is_filtered(&SeccompSubject {
        bin: BIN,
        args: &args,
        num_queues: 2,
        handshake: SECCOMP_HANDSHAKE,
    });
}

#[test]
fn seccomp_log_and_false_let_forbidden_calls_through() {
    let dir = Scratch::new("seccomp-log");
    let image = dir.file("disk.img");
    write_image(&image);
    let args = seccomp_subject_args(&image);
    testing::assert_log_and_off_let_calls_through(&SeccompSubject {
        bin: BIN,
        args: &args,
        num_queues: 2,
        handshake: SECCOMP_HANDSHAKE,
    });
}

/// One read of sector 1 (512 bytes): a used entry of 513 bytes (data and status).
fn hostile_request(driver: &mut TestDriver) -> u32 {
    let mut hdr = VIRTIO_BLK_T_IN.to_le_bytes().to_vec();
    hdr.extend_from_slice(&[0; 4]);
    hdr.extend_from_slice(&1u64.to_le_bytes());
    let hdr = driver.alloc_data(&hdr);
    let data = driver.alloc(512, 0);
    let status = driver.alloc(1, 0xff);
    driver.add_chain(&[Buf::r(hdr, 16), Buf::w(data, 512), Buf::w(status, 1)]);
    513
}

/// Every hostile frontend of `vhost_user_daemon::testing::hostile` against this daemon: each
/// refused or survived as the case says, the daemon exiting with the documented status, and a
/// `--keep-running` daemon serving a well-behaved frontend after each.
#[test]
fn hostile_frontends_are_refused_or_survived() {
    let dir = Scratch::new("hostile");
    let image = dir.file("disk.img");
    write_image(&image);
    let args = |socket: &Path| {
        vec![
            "--block-backend".to_string(),
            format!(
                "path={},socket={},num_queues=2",
                image.display(),
                socket.display()
            ),
        ]
    };
    hostile::assert_hostile_frontends_are_survived(&HostileSubject {
        bin: BIN,
        args: &args,
        num_queues: 2,
        queue_max_size: 128,
        config_len: 60,
        serve_queue: 0,
        request: &hostile_request,
    });
}
