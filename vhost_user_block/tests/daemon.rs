//! The `vhost_user_block` binary: command-line errors, refusals (locked image, busy socket),
//! termination by signal, and whole sessions with the `vhost` crate's frontend over guest
//! memory in a memfd, as a VMM would drive it.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use net_util::testing::{Buf, TestDriver};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BIN: &str = env!("CARGO_BIN_EXE_vhost_user_block");
const IMAGE_SIZE: u64 = 1 << 20;
const MEM_SIZE: usize = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vub-test-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn image_byte(o: u64) -> u8 {
    (o as u8) ^ ((o >> 9) as u8) ^ 0x5a
}

fn write_image(path: &Path) -> Vec<u8> {
    let data: Vec<u8> = (0..IMAGE_SIZE).map(image_byte).collect();
    fs::write(path, &data).unwrap();
    data
}

/// A running daemon, killed on drop if still running.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    fn start(backend: &str, extra: &[&str], socket: &Path) -> Self {
        // A socket already there (a stale one the daemon is to replace) does not count.
        let stale = inode(socket);
        let child = Command::new(BIN)
            .arg("--block-backend")
            .arg(backend)
            .args(extra)
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        d.wait_for_socket(stale);
        d
    }

    fn wait_for_socket(&mut self, stale: Option<(u64, i64, i64)>) {
        let deadline = Instant::now() + TIMEOUT;
        while !is_socket(&self.socket) || inode(&self.socket) == stale {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited ({status}) before creating its socket: {}",
                    self.stderr()
                );
            }
            assert!(Instant::now() < deadline, "no socket after {TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: plain system call on our own child, which is not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Descriptors the daemon has open.
    fn fd_count(&self) -> usize {
        let pid = self.child.as_ref().unwrap().id();
        fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Waits for the exit; returns the status and stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let status = wait_timeout(self.child.as_mut().unwrap());
        let err = self.stderr();
        self.child = None;
        (status, err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Identifies one file at `p`: inode numbers are reused at once, so with the change time.
fn inode(p: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn wait_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon still running after {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the binary to completion with `args`.
fn run_bin(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_error_line(args: &[&str], needle: &str) {
    let (status, _, err) = run_bin(args);
    assert_eq!(status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: one line expected: {err:?}"
    );
    assert!(
        err.starts_with("vhost_user_block: error: ") && err.contains(needle),
        "{args:?}: {err:?} lacks {needle:?}"
    );
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
    let name = c"vub-test-guest-ram";
    // SAFETY: `name` is a valid C string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(file, 0), MEM_SIZE).unwrap();
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
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

/// The message sequence a VMM sends (QEMU's order): ownership, features, protocol features,
/// queue count, configuration, acked features, memory table, then per ring NUM, ADDR, BASE,
/// CALL, KICK, ENABLE.
fn connect(socket: &Path, mem: &GuestMemoryMmap, num_queues: usize, event_idx: bool) -> Session {
    let mut frontend = Frontend::connect(socket, num_queues as u64).unwrap();
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    assert_ne!(offered & PROTOCOL_FEATURES_BIT, 0);
    let protocol = frontend.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(protocol.contains(wanted), "{protocol:?}");
    assert!(!protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    frontend.set_protocol_features(wanted).unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), num_queues as u64);
    let (_, config) = frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    let mut acked = offered;
    if !event_idx {
        acked &= !(1 << VIRTIO_RING_F_EVENT_IDX);
    }
    frontend.set_features(acked).unwrap();
    let regions: Vec<_> = mem
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
        .collect();
    frontend.set_mem_table(&regions).unwrap();
    let mut queues = Vec::new();
    for i in 0..num_queues {
        let area = 0x10_0000 + 0x8_0000 * i as u64;
        let driver = TestDriver::new(mem, 64, area, 0x8_0000);
        let q = driver.queue(event_idx);
        let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let ring = VringConfigData {
            queue_max_size: 128,
            queue_size: 64,
            flags: 0,
            desc_table_addr: hva(q.desc_table()),
            used_ring_addr: hva(q.used_ring()),
            avail_ring_addr: hva(q.avail_ring()),
            log_addr: None,
        };
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        frontend.set_vring_num(i, 64).unwrap();
        frontend.set_vring_addr(i, &ring).unwrap();
        frontend.set_vring_base(i, 0).unwrap();
        frontend.set_vring_call(i, &call).unwrap();
        frontend.set_vring_kick(i, &kick).unwrap();
        frontend.set_vring_enable(i, true).unwrap();
        queues.push(Queue { driver, kick, call });
    }
    Session {
        frontend,
        queues,
        config,
        features: offered,
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
    // Single-frontend mode: the socket is gone once the frontend is accepted.
    assert!(!socket.exists(), "socket still there while serving");

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
