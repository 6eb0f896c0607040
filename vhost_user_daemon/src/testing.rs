//! The daemons' integration-test harness (feature `test-utils`): scratch directories, the
//! daemon binary as a child process, its one-line errors, and guest memory in a memfd that a
//! `vhost` frontend can share with it.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::ffi::CStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

/// A running daemon, killed on drop if still running.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// Starts `bin` with `args`; its stderr is kept for [`wait`](Self::wait).
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Daemon { child: Some(child) }
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
        let mut s = String::new();
        if let Some(mut e) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            let _ = e.read_to_string(&mut s);
        }
        s
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

/// Whether a socket is at `p`.
pub fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Runs `bin` to completion with `args`; returns its status, stdout and stderr.
pub fn run_bin(bin: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(bin)
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
