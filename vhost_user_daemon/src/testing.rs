//! The daemons' integration-test harness (feature `test-utils`): scratch directories, the
//! daemon binary as a child process, its one-line errors, guest memory in a memfd that a
//! `vhost` frontend can share with it, and the checks of the system call filters every daemon
//! has ([`assert_each_class_is_filtered`], [`assert_log_and_off_let_calls_through`]).
//!
//! [`raw`] is a frontend that writes the protocol's messages itself, whatever they hold;
//! [`hostile`] points a list of hostile frontends written with it at a daemon binary.
//!
//! The binary a test names is run unless `NIMBUS_<NAME>` (`NIMBUS_VHOST_USER_BLOCK`, ...,
//! the variables `e2e::workspace_binary` honours) names another: `scripts/seccomp-survey` runs
//! the daemons' tests with a wrapper that traces the daemon.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

pub mod hostile;
pub mod raw;

use std::ffi::{CStr, OsString};
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nimbus_thread::seccomp::FORBIDDEN_EXIT_CODE;
use nimbus_thread::{ThreadClass, SELF_TEST_ENV};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VringT;
use virtio_chain::testing::TestDriver;
use virtio_queue::QueueT;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{GuestMemory, Vring};

/// `VIRTIO_RING_F_EVENT_IDX`.
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// How long a daemon gets for anything a test waits for.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new, empty directory named after `tag`, this process and a counter.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("vhost-user-test-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// The path of `name` in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The program to run for `bin`: `$NIMBUS_<NAME>` if set (`NAME` the file name of `bin` in
/// capitals: `NIMBUS_VHOST_USER_BLOCK`), else `bin`.
pub fn program(bin: &str) -> OsString {
    let name = Path::new(bin)
        .file_name()
        .map(|n| n.to_string_lossy().to_uppercase())
        .unwrap_or_default();
    std::env::var_os(format!("NIMBUS_{name}")).unwrap_or_else(|| bin.into())
}

/// A running daemon, killed on drop if still running. Its stderr is collected as it comes
/// ([`wait_for_log`](Self::wait_for_log), [`stderr`](Self::stderr)).
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Starts `bin` with `args`; its stderr is kept for [`wait`](Self::wait).
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        Self::spawn_env(bin, args, &[])
    }

    /// As [`spawn`](Self::spawn), with the variables `env` added to the environment.
    pub fn spawn_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(program(bin))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        Daemon {
            child: Some(child),
            stderr,
            reader: Some(reader),
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until a socket is at `socket` that is not the file `stale` identified (see
    /// [`file_id`]).
    ///
    /// # Panics
    ///
    /// If the daemon exits first or [`TIMEOUT`] passes.
    pub fn wait_for_socket(&mut self, socket: &Path, stale: Option<(u64, i64, i64)>) {
        let deadline = Instant::now() + TIMEOUT;
        while !is_socket(socket) || file_id(socket) == stale {
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

    /// Waits until the daemon has written `needle` on stderr.
    ///
    /// # Panics
    ///
    /// If the daemon exits first or [`TIMEOUT`] passes.
    pub fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.log_so_far().contains(needle) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited ({status}) before logging {needle:?}: {}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} after {TIMEOUT:?}: {}",
                self.log_so_far()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What the daemon wrote on stderr so far.
    pub fn log_so_far(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: plain system call on our own child, which is not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Descriptors the daemon has open.
    pub fn fd_count(&self) -> usize {
        let pid = self.child.as_ref().unwrap().id();
        fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
    }

    /// What the daemon wrote on stderr (read to its end: call once it exits).
    pub fn stderr(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log_so_far()
    }

    /// Waits for the exit; returns the status and stderr.
    ///
    /// # Panics
    ///
    /// If the daemon is still running after [`TIMEOUT`] (it is killed).
    pub fn wait(mut self) -> (ExitStatus, String) {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon still running after {TIMEOUT:?}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
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
pub fn file_id(p: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Waits until `socket` is gone: a single-frontend daemon's main thread removes it once the
/// frontend is accepted, while the protocol thread already answers.
///
/// # Panics
///
/// If it is still there after [`TIMEOUT`].
pub fn wait_until_removed(socket: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while socket.exists() {
        assert!(
            Instant::now() < deadline,
            "socket still there while serving"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a socket is at `p`.
pub fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Runs `bin` to completion with `args`; returns its status, stdout and stderr.
pub fn run_bin(bin: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(program(bin))
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

/// Asserts that `bin` (called `program`) fails with `args`: exit status 1 and one line on
/// stderr, `<program>: error: ...` containing `needle`.
pub fn assert_one_error_line(bin: &str, program: &str, args: &[&str], needle: &str) {
    let (status, _, err) = run_bin(bin, args);
    assert_eq!(status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: one line expected: {err:?}"
    );
    assert!(
        err.starts_with(&format!("{program}: error: ")) && err.contains(needle),
        "{args:?}: {err:?} lacks {needle:?}"
    );
}

/// `size` bytes of guest memory at address 0 in a memfd called `name`, shareable with the
/// daemon.
pub fn shared_memory(name: &CStr, size: usize) -> GuestMemoryMmap {
    // SAFETY: `name` is a valid C string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size).unwrap();
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// One ring a frontend set up: written by a `TestDriver`, with its kick and call eventfds.
#[derive(Debug)]
pub struct FrontendRing {
    /// The driver side of the ring, in guest memory.
    pub driver: TestDriver,
    /// Written to kick the daemon.
    pub kick: EventFd,
    /// Written by the daemon when it signals the ring.
    pub call: EventFd,
}

/// What [`handshake`] negotiated and set up.
#[derive(Debug)]
pub struct Handshake {
    /// The protocol features the daemon offered.
    pub protocol: VhostUserProtocolFeatures,
    /// The features the daemon offered.
    pub offered: u64,
    /// The configuration space read (`GET_CONFIG`).
    pub config: Vec<u8>,
    /// The rings, enabled.
    pub rings: Vec<FrontendRing>,
}

/// How [`handshake`] sets the device up.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeOptions {
    /// How many bytes of configuration space to read.
    pub config_len: usize,
    /// Whether the rings use `VIRTIO_RING_F_EVENT_IDX` (acked only then).
    pub event_idx: bool,
    /// The `queue_max_size` of the rings' configuration.
    pub queue_max_size: u16,
}

/// The message sequence a VMM sends (QEMU's order): ownership, features, protocol features
/// (MQ, CONFIG, REPLY_ACK, which the daemon must offer), queue count, configuration, acked
/// features (everything offered, less EVENT_IDX without `event_idx`), memory table, then per
/// ring NUM, ADDR, BASE, CALL, KICK, ENABLE. Each ring has 64 entries.
pub fn handshake(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap,
    num_queues: usize,
    options: HandshakeOptions,
) -> Handshake {
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let protocol = frontend.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(protocol.contains(wanted), "{protocol:?}");
    frontend.set_protocol_features(wanted).unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), num_queues as u64);
    let len = options.config_len;
    let (_, config) = frontend
        .get_config(
            0,
            len as u32,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; len],
        )
        .unwrap();
    let mut acked = offered;
    if !options.event_idx {
        acked &= !(1 << VIRTIO_RING_F_EVENT_IDX);
    }
    frontend.set_features(acked).unwrap();
    let regions: Vec<_> = mem
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
        .collect();
    frontend.set_mem_table(&regions).unwrap();
    let mut rings = Vec::new();
    for i in 0..num_queues {
        let area = 0x10_0000 + 0x8_0000 * i as u64;
        let driver = TestDriver::new(mem, 64, area, 0x8_0000);
        let q = driver.queue(options.event_idx);
        let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let ring = VringConfigData {
            queue_max_size: options.queue_max_size,
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
        rings.push(FrontendRing { driver, kick, call });
    }
    Handshake {
        protocol,
        offered,
        config,
        rings,
    }
}

/// A ring as vhost-user-backend's protocol handler sets it up for a worker (SET_VRING_NUM and
/// ADDR, CALL, ENABLE, ready), with its driver side in guest memory: what a backend's unit
/// tests hand to `handle_event`.
pub struct DeviceRing {
    /// The driver side, in `mem`.
    pub driver: TestDriver,
    /// The device side.
    pub vring: Vring,
    /// The reading end of the ring's call eventfd.
    pub call: EventConsumer,
}

impl std::fmt::Debug for DeviceRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRing").finish_non_exhaustive()
    }
}

impl DeviceRing {
    /// `size` entries (the ring accepts up to `max`), the rings and buffers in the 128 KiB at
    /// `area` of `mem`, which `atomic` shares with the backend.
    pub fn new(
        mem: &GuestMemoryMmap,
        atomic: &GuestMemory,
        size: u16,
        max: u16,
        area: u64,
        event_idx: bool,
    ) -> Self {
        let driver = TestDriver::new(mem, size, area, 0x2_0000);
        let q = driver.queue(event_idx);
        let vring = Vring::new(atomic.clone(), max).unwrap();
        vring.set_queue_size(q.size());
        vring
            .set_queue_info(q.desc_table(), q.avail_ring(), q.used_ring())
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let (call, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        // SAFETY: into_raw_fd hands over the notifier's descriptor, which the File then owns.
        let file = unsafe { File::from_raw_fd(notifier.into_raw_fd()) };
        vring.set_call(Some(file));
        DeviceRing {
            driver,
            vring,
            call,
        }
    }

    /// Whether the call eventfd was written since the last look.
    pub fn called(&self) -> bool {
        match self.call.consume() {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("reading the call eventfd: {e}"),
        }
    }
}

/// The classes of a daemon's threads, each with what makes its threads apply their filter:
/// the main and signal threads at start, the protocol thread at the first message that reaches
/// the backend, a worker at its first event.
pub const DAEMON_CLASSES: [ThreadClass; 4] = [
    ThreadClass::Main,
    ThreadClass::Signal,
    ThreadClass::DaemonProtocol,
    ThreadClass::DaemonWorker,
];

/// A daemon as the checks of its system call filters start it.
pub struct SeccompSubject<'a> {
    /// The binary.
    pub bin: &'a str,
    /// The daemon's arguments for a socket at the path given (its backend option), without
    /// `--seccomp` and `-v`.
    pub args: &'a dyn Fn(&Path) -> Vec<String>,
    /// How many queues a frontend sets up.
    pub num_queues: usize,
    /// How it sets them up.
    pub handshake: HandshakeOptions,
}

impl std::fmt::Debug for SeccompSubject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeccompSubject")
            .field("bin", &self.bin)
            .field("num_queues", &self.num_queues)
            .finish_non_exhaustive()
    }
}

/// The line the SIGSYS handler writes when a thread of `class` calls acct(2) (after the
/// thread's name).
fn forbidden_acct_line(class: ThreadClass) -> String {
    format!(
        "({}) made a forbidden system call {} (acct); ending the process",
        class.as_str(),
        libc::SYS_acct
    )
}

/// What the daemon logs (`-vv`) when a thread of the backend crate's of `class` went through
/// its filter's set-up, the self-test included (see `crate::seccomp`).
fn entered_line(class: ThreadClass) -> String {
    format!("({}): system call filter", class.as_str())
}

/// Starts `subject` in `dir` with `extra` arguments and the self-test of `class`; returns the
/// daemon and its socket (not waited for).
fn start_self_test(
    subject: &SeccompSubject<'_>,
    dir: &Scratch,
    class: ThreadClass,
    extra: &[&str],
) -> (Daemon, PathBuf) {
    let socket = dir.file(&format!("{}.sock", class.as_str().replace(' ', "-")));
    let args = (subject.args)(&socket);
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(extra);
    all.push("-vv");
    let daemon = Daemon::spawn_env(subject.bin, &all, &[(SELF_TEST_ENV, class.as_str())]);
    (daemon, socket)
}

/// Connects to `socket` and sets `subject`'s queues up; `None` if the daemon went away during
/// the handshake (whose steps panic on an error: the panic is caught).
fn session(
    subject: &SeccompSubject<'_>,
    socket: &Path,
    mem: &GuestMemoryMmap,
) -> Option<(Frontend, Handshake)> {
    let mut frontend = Frontend::connect(socket, subject.num_queues as u64).ok()?;
    let (num_queues, options) = (subject.num_queues, subject.handshake);
    let h = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handshake(&mut frontend, mem, num_queues, options)
    }))
    .ok()?;
    Some((frontend, h))
}

/// Checks that every class of `subject`'s threads is filtered by default: the self-test's
/// forbidden call (acct) from a thread of each class ends the daemon with
/// [`FORBIDDEN_EXIT_CODE`] and the SIGSYS handler's line naming the thread, its class and the
/// call. The protocol thread makes it at the first message that reaches the backend
/// (`GET_FEATURES`), a worker at the first kick.
///
/// # Panics
///
/// On the first class that is not.
pub fn assert_each_class_is_filtered(subject: &SeccompSubject<'_>) {
    let mem = shared_memory(c"seccomp-test-guest-ram", 4 << 20);
    for class in DAEMON_CLASSES {
        let dir = Scratch::new("seccomp-trap");
        let (mut daemon, socket) = start_self_test(subject, &dir, class, &[]);
        // The connection stays open until the daemon ends: a disconnection would end it too.
        let mut connection = None;
        let mut session_of_worker = None;
        match class {
            ThreadClass::DaemonProtocol => {
                daemon.wait_for_socket(&socket, None);
                let frontend = Frontend::connect(&socket, subject.num_queues as u64).unwrap();
                frontend.set_owner().unwrap();
                // Answered by the backend: the protocol thread applies its filter first.
                let _ = frontend.get_features();
                connection = Some(frontend);
            }
            ThreadClass::DaemonWorker => {
                daemon.wait_for_socket(&socket, None);
                session_of_worker = session(subject, &socket, &mem);
                if let Some((_, h)) = &session_of_worker {
                    for ring in &h.rings {
                        ring.kick.write(1).unwrap();
                    }
                }
            }
            // Both apply their filters at start.
            _ => {}
        }
        let (status, err) = daemon.wait();
        drop((connection, session_of_worker));
        let line = forbidden_acct_line(class);
        assert_eq!(
            status.code(),
            Some(FORBIDDEN_EXIT_CODE),
            "class {}: {status}\n{err}",
            class.as_str()
        );
        assert!(
            err.lines()
                .any(|l| l.starts_with("nimbus: seccomp: thread ") && l.ends_with(&line)),
            "class {}: no line ending in {line:?}:\n{err}",
            class.as_str()
        );
    }
}

/// Checks that with `--seccomp log` and `--seccomp false` the self-test's forbidden call from
/// a thread of each class goes through (with `log` the kernel logs it): the daemon serves a
/// whole session (every thread class runs its self-test: the frontend kicks every queue), is
/// terminated by SIGTERM while connected, and exits 0 without a SIGSYS line.
///
/// # Panics
///
/// On the first mode and class for which it does not.
pub fn assert_log_and_off_let_calls_through(subject: &SeccompSubject<'_>) {
    let mem = shared_memory(c"seccomp-test-guest-ram", 4 << 20);
    for mode in ["log", "false"] {
        for class in DAEMON_CLASSES {
            let what = format!("--seccomp {mode}, class {}", class.as_str());
            let dir = Scratch::new("seccomp-log");
            let (mut daemon, socket) = start_self_test(subject, &dir, class, &["--seccomp", mode]);
            daemon.wait_for_socket(&socket, None);
            daemon.wait_for_log(&format!("system call filters: {mode}"));
            let (frontend, h) = session(subject, &socket, &mem)
                .unwrap_or_else(|| panic!("{what}: the session failed: {}", daemon.log_so_far()));
            daemon.wait_for_log(&entered_line(ThreadClass::DaemonProtocol));
            for ring in &h.rings {
                ring.kick.write(1).unwrap();
            }
            daemon.wait_for_log(&entered_line(ThreadClass::DaemonWorker));
            daemon.signal(libc::SIGTERM);
            let (status, err) = daemon.wait();
            assert_eq!(status.code(), Some(0), "{what}: {status}\n{err}");
            assert!(err.contains("signal 15: terminating"), "{what}:\n{err}");
            assert!(!err.contains("nimbus: seccomp:"), "{what}:\n{err}");
            drop((frontend, h));
        }
    }
}
