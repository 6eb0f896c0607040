//! vhost-user frontends: the device model stays in Nimbus (PCI, feature negotiation, config
//! space), the data path runs in a backend process. Guest RAM is shared with the backend through
//! its memfds; the queues' kick eventfds (the transport's ioeventfds) go to the backend, so a
//! guest notification reaches it without the VMM. Used-buffer notifications come back on call
//! eventfds that a relay thread turns into MSI-X interrupts (keeping per-vector masking right).
//!
//! The relay thread also watches the backend's socket: when the backend dies, the device keeps
//! its driver's setup ([`Session`]) and the relay reconnects when the backend is back (see
//! [`relay`]), so I/O resumes without a guest reset.

pub mod blk;
mod device;
pub mod fs;
pub mod net;
mod relay;
#[cfg(test)]
mod tests;

pub use device::VhostUserDevice;

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::{GuestMemoryAtomic, VIRTIO_F_VERSION_1};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a virtio-feature bit that only frontend and backend see.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// How long a backend may take to answer one message before it counts as gone.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Connecting to (or accepting) the backend failed.
    #[error("cannot connect to vhost-user backend at {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket a backend should connect to cannot be created.
    #[error("cannot listen for a vhost-user backend on {path}")]
    Listen {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A protocol step failed.
    #[error("vhost-user {step} failed")]
    Protocol {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// A protocol step got no answer within [`REPLY_TIMEOUT`]: the backend was disconnected.
    #[error("vhost-user {step} failed: the backend did not answer within {after:?}")]
    NoAnswer {
        /// What was being done.
        step: &'static str,
        /// How long Nimbus waited.
        after: Duration,
    },
    /// The backend lacks something the device needs.
    #[error("the vhost-user backend {0}")]
    Unsupported(String),
    /// The driver's setup cannot be handed to a backend (not the backend's fault).
    #[error("{0}")]
    Setup(String),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Protocol { step, source }
}

/// Where the backend is reached.
#[derive(Debug)]
pub enum Endpoint {
    /// The backend listens on `path`; Nimbus connects (Cloud Hypervisor's `vhost_mode=client`).
    Connect(PathBuf),
    /// Nimbus listens on `path`; the backend connects (`vhost_mode=server`).
    Listen {
        /// Socket path (removed when the device goes away).
        path: PathBuf,
        /// The listening socket.
        listener: UnixListener,
    },
}

impl Endpoint {
    /// Creates the listening socket at `path` for [`Endpoint::Listen`]. A socket left there by
    /// an earlier run is replaced; any other file is an error.
    pub fn listen(path: &Path) -> Result<Self, VhostUserError> {
        let err = |source| VhostUserError::Listen {
            path: path.display().to_string(),
            source,
        };
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
            Ok(_) => {
                return Err(err(std::io::Error::other(
                    "the path exists and is not a socket",
                )))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        Ok(Self::Listen {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Connect(p) | Self::Listen { path: p, .. } => p,
        }
    }

    /// A stream to the backend. With `wait`, a client retries for a second while the backend
    /// starts and a server blocks until the backend connects; without, one attempt.
    fn stream(&self, wait: bool) -> std::io::Result<UnixStream> {
        match self {
            Self::Connect(path) => {
                let mut tries = if wait { 10 } else { 1 };
                loop {
                    tries -= 1;
                    match UnixStream::connect(path) {
                        Ok(s) => return Ok(s),
                        Err(e) if tries == 0 => return Err(e),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            }
            Self::Listen { path, listener } => {
                if wait {
                    log::info!(
                        "waiting for a vhost-user backend to connect to {}",
                        path.display()
                    );
                }
                listener.set_nonblocking(!wait)?;
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(false)?;
                Ok(stream)
            }
        }
    }

    /// What to watch for a backend coming back: the listening socket (server), or nothing
    /// (client: retry on a timer).
    fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Self::Connect(_) => None,
            Self::Listen { listener, .. } => Some(listener.as_raw_fd()),
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Self::Listen { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How to reach a backend and what to ask of it; enough to connect again.
#[derive(Debug)]
pub struct Backend {
    /// Where it is.
    pub endpoint: Endpoint,
    /// Most queues the device uses.
    pub max_queues: u64,
    /// Protocol features the device would use.
    pub wanted: VhostUserProtocolFeatures,
}

impl Backend {
    /// The first connection of a device: to the backend at `endpoint` (waiting for it, see
    /// [`Endpoint`]), for at most `max_queues` queues and the protocol features `wanted`. The
    /// backend must offer `VIRTIO_F_VERSION_1`.
    fn open(
        endpoint: Endpoint,
        max_queues: u64,
        wanted: VhostUserProtocolFeatures,
    ) -> Result<(Self, Connection), VhostUserError> {
        let backend = Backend {
            endpoint,
            max_queues,
            wanted,
        };
        let connection = backend.connect(true)?;
        if connection.features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Unsupported(
                "does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        Ok((backend, connection))
    }

    /// Connects, claims ownership and negotiates protocol features.
    pub fn connect(&self, wait: bool) -> Result<Connection, VhostUserError> {
        let stream = self
            .endpoint
            .stream(wait)
            .map_err(|source| VhostUserError::Connect {
                path: self.endpoint.path().display().to_string(),
                source,
            })?;
        answered(stream.as_raw_fd(), || self.handshake(stream))
    }

    fn handshake(&self, stream: UnixStream) -> Result<Connection, VhostUserError> {
        let mut frontend = Frontend::from_stream(stream, self.max_queues);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let has_protocol_features = features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut queues = 1;
        if has_protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & self.wanted;
            frontend
                .set_protocol_features(protocol)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            // Every request then waits for the backend's verdict: a refused setup step fails
            // `start` (and counts as a refusal) instead of passing unnoticed.
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                queues = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
            }
        }
        log::debug!(
            "vhost-user backend at {}: features {features:#x}, protocol features {protocol:?}, {queues} queue(s)",
            self.endpoint.path().display()
        );
        Ok(Connection {
            frontend,
            features: features & !VHOST_USER_F_PROTOCOL_FEATURES,
            has_protocol_features,
            protocol,
            max_queues: queues.min(self.max_queues),
        })
    }
}

/// Runs `f`, which talks to the backend on `socket`, and shuts the socket down if `f` takes
/// longer than [`REPLY_TIMEOUT`]: the vhost crate waits for a reply for ever (it retries reads
/// that time out), so a frozen backend would otherwise hang the calling vCPU or relay thread
/// (or the VMM's exit). After the shutdown the pending read fails and the backend counts as
/// gone. The watchdog holds its own duplicate of the socket, so it never touches a descriptor
/// number that `f` closed.
fn with_deadline<T>(socket: RawFd, f: impl FnOnce() -> T) -> T {
    deadline(socket, f).0
}

/// [`with_deadline`] for a protocol exchange: a step that failed because the deadline passed
/// is reported as [`VhostUserError::NoAnswer`] (rather than as the broken read that follows).
fn answered<T>(
    socket: RawFd,
    f: impl FnOnce() -> Result<T, VhostUserError>,
) -> Result<T, VhostUserError> {
    let (result, expired) = deadline(socket, f);
    result.map_err(|e| match e {
        VhostUserError::Protocol { step, .. } if expired => VhostUserError::NoAnswer {
            step,
            after: REPLY_TIMEOUT,
        },
        e => e,
    })
}

/// [`with_deadline`], and whether the deadline passed (the socket was shut down).
fn deadline<T>(socket: RawFd, f: impl FnOnce() -> T) -> (T, bool) {
    // SAFETY: the caller's socket is open now; it is only borrowed to be duplicated.
    let watched = unsafe { BorrowedFd::borrow_raw(socket) }.try_clone_to_owned();
    let expired = std::sync::atomic::AtomicBool::new(false);
    let fired = &expired;
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let result = std::thread::scope(|scope| {
        if let Ok(watched) = watched {
            let spawned = nimbus_thread::spawn_scoped(
                scope,
                nimbus_thread::ThreadClass::VhostUserDeadline,
                "vhost-user-deadline",
                move || {
                    if wait.recv_timeout(REPLY_TIMEOUT) == Err(RecvTimeoutError::Timeout) {
                        fired.store(true, std::sync::atomic::Ordering::Relaxed);
                        log::warn!(
                        "the vhost-user backend did not answer within {REPLY_TIMEOUT:?}: disconnecting it"
                    );
                        // SAFETY: shutdown(2) on a socket descriptor this thread owns.
                        unsafe { libc::shutdown(watched.as_raw_fd(), libc::SHUT_RDWR) };
                    }
                },
            );
            if let Err(e) = spawned {
                log::warn!("no deadline for the vhost-user backend's answers: {e}");
            }
        }
        let result = f();
        drop(done);
        result
    });
    (result, expired.into_inner())
}

/// The vhost-user memory table of `mem`: every region with its memfd.
fn mem_table(
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            VhostUserError::Setup(format!(
                "guest memory cannot be shared ({e}); use --memory shared=on"
            ))
        })
}

/// A connected backend after feature discovery.
pub struct Connection {
    frontend: Frontend,
    /// virtio features the backend offers (without the vhost-user protocol bit).
    pub features: u64,
    /// Whether the backend speaks protocol features (then rings start disabled).
    has_protocol_features: bool,
    /// Protocol features both sides use.
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend supports.
    pub max_queues: u64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("max_queues", &self.max_queues)
            .finish_non_exhaustive()
    }
}

/// One ring as the driver set it up.
#[derive(Debug)]
struct Ring {
    index: u16,
    size: u16,
    max_size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The transport's ioeventfd: the guest's notifications, read by the backend.
    kick: EventFd,
    /// The backend's notifications, read by the relay.
    call: EventFd,
}

/// Everything the driver set up, kept so it can be handed to a backend again after a
/// reconnect: features, memory, rings, and the inflight-tracking area when the backend keeps
/// one (`INFLIGHT_SHMFD`).
pub(crate) struct Session {
    mem: GuestMemoryAtomic,
    /// virtio features the driver accepted.
    features: u64,
    rings: Vec<Ring>,
    /// The backend runs the rings whose index is below this; the others are set up but stopped
    /// (virtio-net pairs the driver does not use).
    active_rings: u16,
    /// Queues and ring size of the inflight area (all the device's queues, at their maximum).
    inflight_shape: (u16, u16),
    inflight: Option<(VhostUserInflight, File)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("features", &format_args!("{:#x}", self.features))
            .field("rings", &self.rings)
            .field(
                "inflight",
                &self.inflight.as_ref().map(|(i, _)| i.mmap_size),
            )
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Reads `len` bytes of the backend's device configuration space.
    pub fn config(&mut self, len: u32) -> Result<Vec<u8>, VhostUserError> {
        answered(self.frontend.as_raw_fd(), || self.read_config(len))
    }

    fn read_config(&mut self, len: u32) -> Result<Vec<u8>, VhostUserError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Unsupported(
                "does not serve its configuration space (CONFIG)".into(),
            ));
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(
                0,
                len,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .map_err(step("GET_CONFIG"))?;
        Ok(payload.to_vec())
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }

    /// Hands `session` to the backend, each ring resuming at `bases[i]` (the next available
    /// index it will read).
    fn start(&mut self, s: &mut Session, bases: &[u16]) -> Result<(), VhostUserError> {
        answered(self.frontend.as_raw_fd(), || self.send_session(s, bases))
    }

    fn send_session(&mut self, s: &mut Session, bases: &[u16]) -> Result<(), VhostUserError> {
        if s.features & !self.features & !VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            return Err(VhostUserError::Unsupported(format!(
                "no longer offers features {:#x} the driver uses",
                s.features & !self.features
            )));
        }
        if s.rings.len() as u64 > self.max_queues {
            return Err(VhostUserError::Unsupported(format!(
                "serves {} queues; the driver uses {}",
                self.max_queues,
                s.rings.len()
            )));
        }
        let acked = s.features
            | if self.has_protocol_features {
                VHOST_USER_F_PROTOCOL_FEATURES
            } else {
                0
            };
        let f = &mut self.frontend;
        f.set_features(acked).map_err(step("SET_FEATURES"))?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if s.inflight.is_none() {
                let (num_queues, queue_size) = s.inflight_shape;
                let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
                s.inflight = Some(f.get_inflight_fd(&ask).map_err(step("GET_INFLIGHT_FD"))?);
            }
            if let Some((info, file)) = &s.inflight {
                f.set_inflight_fd(info, file.as_raw_fd())
                    .map_err(step("SET_INFLIGHT_FD"))?;
            }
        }
        let mem = s.mem.memory();
        f.set_mem_table(&mem_table(&mem)?)
            .map_err(step("SET_MEM_TABLE"))?;
        let hva = |gpa: u64| -> Result<u64, VhostUserError> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| {
                    VhostUserError::Setup(format!("ring at {gpa:#x} is not in guest memory"))
                })
        };
        for (ring, &base) in s.rings.iter().zip(bases) {
            let i = usize::from(ring.index);
            let config = VringConfigData {
                queue_max_size: ring.max_size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: hva(ring.desc)?,
                used_ring_addr: hva(ring.used)?,
                avail_ring_addr: hva(ring.avail)?,
                log_addr: None,
            };
            f.set_vring_num(i, ring.size)
                .map_err(step("SET_VRING_NUM"))?;
            f.set_vring_addr(i, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            f.set_vring_base(i, base).map_err(step("SET_VRING_BASE"))?;
            f.set_vring_call(i, &ring.call)
                .map_err(step("SET_VRING_CALL"))?;
            f.set_vring_kick(i, &ring.kick)
                .map_err(step("SET_VRING_KICK"))?;
            if self.has_protocol_features && ring.index < s.active_rings {
                f.set_vring_enable(i, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Sends the backend the memory table of `mem` again (`SET_MEM_TABLE`; backends replace
    /// their mappings while the rings run), after RAM was hot-added.
    fn update_mem_table(&mut self, mem: &GuestMemoryAtomic) -> Result<(), VhostUserError> {
        answered(self.frontend.as_raw_fd(), || {
            let table = mem_table(&mem.memory())?;
            self.frontend
                .set_mem_table(&table)
                .map(drop)
                .map_err(step("SET_MEM_TABLE"))
        })
    }

    /// Runs the session's rings below `s.active_rings` and stops the others
    /// (`SET_VRING_ENABLE`); a backend without protocol features runs every ring.
    fn enable_rings(&mut self, s: &Session) -> Result<(), VhostUserError> {
        if !self.has_protocol_features {
            return Ok(());
        }
        answered(self.frontend.as_raw_fd(), || {
            for ring in &s.rings {
                self.frontend
                    .set_vring_enable(usize::from(ring.index), ring.index < s.active_rings)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
            Ok(())
        })
    }

    /// Stops the backend's rings (GET_VRING_BASE) so it no longer touches guest memory.
    /// False when the backend did not answer (it is gone).
    fn stop(&mut self, queues: usize) -> bool {
        with_deadline(self.frontend.as_raw_fd(), || self.stop_rings(queues))
    }

    fn stop_rings(&mut self, queues: usize) -> bool {
        for i in 0..queues {
            if self.has_protocol_features {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                log::warn!("vhost-user: stopping ring {i}: {e}");
                return false;
            }
        }
        true
    }
}
