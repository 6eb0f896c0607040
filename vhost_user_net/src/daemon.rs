//! The daemon around [`NetBackend`]: the TAP interface opened and configured once, the
//! listening socket (created, checked for staleness, always removed) or, with `client=on`, a
//! connection to the VMM's socket, frontend connections served one at a time, and termination
//! on request ([`Terminator`], driven by SIGTERM/SIGINT in the binary).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, info, warn};
use net_util::{MacAddr, NetError, Tap, TapQueue};
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::{Error as DaemonCrateError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BackendError, NetBackend};
use crate::config::BackendConfig;

/// Name of the protocol thread the backend crate starts per connection.
const PROTOCOL_THREAD: &str = "vun-protocol";

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The TAP interface cannot be created, opened or configured.
    #[error(transparent)]
    Tap(#[from] NetError),
    /// The socket path of `client=on` is not valid UTF-8 (the backend crate takes a `&str`).
    #[error("socket path {0} is not valid UTF-8")]
    SocketPathNotUtf8(PathBuf),
    /// Something other than a socket is at the socket path; it is left alone.
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// Socket path.
        path: PathBuf,
    },
    /// A process accepts connections on the socket path already.
    #[error("{path} is in use: another backend is listening on it")]
    SocketInUse {
        /// Socket path.
        path: PathBuf,
    },
    /// Checking, removing or binding the socket failed.
    #[error("cannot {action} socket {path}")]
    Socket {
        /// What was being done: "inspect", "remove the stale", "create".
        action: &'static str,
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating the backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An eventfd or `poll` failed.
    #[error("{what} failed")]
    Os {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The backend crate failed to set up or accept a connection.
    #[error("cannot {step}: {message}")]
    Setup {
        /// What was being done.
        step: &'static str,
        /// The crate's error (it implements no `std::error::Error`).
        message: String,
    },
    /// The frontend connection ended with a protocol error (an invalid or unsupported
    /// message), not with a disconnection.
    #[error("frontend connection failed: {0}")]
    Protocol(String),
}

/// A Unix socket the daemon created and listens on; the file is removed when this is dropped
/// (if it is still the one created: a socket someone else put there later is left alone).
pub struct SocketFile {
    path: PathBuf,
    /// `(st_dev, st_ino)` of the socket file created.
    identity: (u64, u64),
    listener: Listener,
}

impl std::fmt::Debug for SocketFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketFile")
            .field("path", &self.path)
            .field("listener", &self.listener.as_raw_fd())
            .finish()
    }
}

impl SocketFile {
    /// Creates a socket at `path` and listens on it.
    ///
    /// An existing socket that nobody listens on (left behind by a killed daemon) is replaced;
    /// one that accepts connections, or a file that is not a socket, is an error.
    ///
    /// # Errors
    ///
    /// [`DaemonError::SocketInUse`], [`DaemonError::NotASocket`] or [`DaemonError::Socket`].
    pub fn bind(path: &Path) -> Result<Self, DaemonError> {
        let socket_err = |action, source| DaemonError::Socket {
            action,
            path: path.to_path_buf(),
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(DaemonError::SocketInUse {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    info!("removing stale socket {}", path.display());
                    fs::remove_file(path).map_err(|e| socket_err("remove the stale", e))?;
                }
                Err(e) => return Err(socket_err("inspect", e)),
            },
            Ok(_) => {
                return Err(DaemonError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(socket_err("inspect", e)),
        }
        let listener = UnixListener::bind(path).map_err(|e| socket_err("create", e))?;
        let meta = fs::symlink_metadata(path).map_err(|e| socket_err("inspect", e))?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            // From a listener, vhost's `Listener` does not remove the file itself.
            listener: Listener::from(listener),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove socket {}: {e}", self.path.display());
            }
        }
    }
}

/// A request to stop, shared between whoever asks (the signal thread) and [`run`]: wakes the
/// daemon while it waits for a frontend, and shuts the frontend connection down while one is
/// served (the workers finish the request they are executing, then stop).
pub struct Terminator {
    state: Mutex<TerminatorState>,
    wake: EventFd,
}

#[derive(Default)]
struct TerminatorState {
    requested: bool,
    connection: Option<ShutdownHandle>,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("requested", &self.is_requested())
            .finish_non_exhaustive()
    }
}

impl Terminator {
    /// A terminator nobody has triggered yet.
    ///
    /// # Errors
    ///
    /// If the eventfd cannot be created.
    pub fn new() -> io::Result<Self> {
        Ok(Terminator {
            state: Mutex::new(TerminatorState::default()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the daemon to stop. Idempotent; safe from any thread.
    pub fn request(&self) {
        let mut state = self.lock();
        state.requested = true;
        if let Some(connection) = &state.connection {
            connection.shutdown();
        }
        drop(state);
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the daemon: {e}");
        }
    }

    /// Whether [`request`](Self::request) was called.
    pub fn is_requested(&self) -> bool {
        self.lock().requested
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TerminatorState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers the current connection so a later request shuts it down; if the request came
    /// already, shuts it down now.
    fn attach(&self, connection: Option<ShutdownHandle>) {
        let mut state = self.lock();
        if state.requested {
            if let Some(c) = &connection {
                c.shutdown();
            }
        }
        state.connection = connection;
    }

    fn detach(&self) {
        self.lock().connection = None;
    }
}

/// What woke [`wait_for_frontend`].
enum Wake {
    Frontend,
    Terminate,
}

/// Sleeps until a frontend connects to `socket` or `terminator` is triggered.
fn wait_for_frontend(socket: &SocketFile, terminator: &Terminator) -> Result<Wake, DaemonError> {
    loop {
        if terminator.is_requested() {
            return Ok(Wake::Terminate);
        }
        let mut fds = [
            libc::pollfd {
                fd: socket.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: terminator.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures for the duration of the
        // call, and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DaemonError::Os {
                what: "waiting for a frontend",
                source: e,
            });
        }
        if fds[1].revents != 0 {
            return Ok(Wake::Terminate);
        }
        if fds[0].revents != 0 {
            return Ok(Wake::Frontend);
        }
    }
}

/// Whether an error that ended a connection is just the frontend going away.
fn is_disconnect(e: &DaemonCrateError) -> bool {
    matches!(
        e,
        DaemonCrateError::HandleRequest(
            ProtocolError::Disconnected
                | ProtocolError::PartialMessage
                | ProtocolError::SocketBroken(_)
        )
    )
}

/// Creates (or attaches to) the TAP interface with one queue per pair, and configures it as
/// `config` says: address and netmask, MAC (`host_mac`), MTU, up.
///
/// # Errors
///
/// [`DaemonError::Tap`].
pub fn open_tap(config: &BackendConfig) -> Result<Vec<Tap>, DaemonError> {
    let taps = Tap::open_named(
        config.tap.as_deref().unwrap_or(""),
        config.num_queue_pairs(),
    )?;
    let Some(first) = taps.first() else {
        return Err(DaemonError::Tap(NetError::InvalidQueueCount(0)));
    };
    if let Some(mac) = config.host_mac {
        first.set_mac(mac)?;
    }
    if let Some(mtu) = config.mtu {
        first.set_mtu(mtu)?;
    }
    first.set_ip_addr(config.ip, config.mask)?;
    first.set_up()?;
    Ok(taps)
}

/// What the connection loop shares between connections.
struct Device {
    taps: Vec<Arc<dyn TapQueue>>,
    mac: MacAddr,
    mtu: Option<u16>,
    queue_size: u16,
}

/// How a connection is made.
enum Connect<'a> {
    /// Accept on the daemon's listening socket.
    Accept(&'a mut Listener),
    /// Connect to the VMM's socket.
    Client(&'a str),
}

/// A connected frontend: the backend crate's daemon (protocol thread and workers) and our
/// backend.
struct Connection {
    daemon: VhostUserDaemon<Arc<NetBackend>>,
    backend: Arc<NetBackend>,
}

/// Makes a connection to a frontend and starts serving it.
fn connect(device: &Device, connect: Connect<'_>) -> Result<Connection, DaemonError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let backend = Arc::new(NetBackend::new(
        device.taps.clone(),
        device.mac,
        device.mtu,
        device.queue_size,
        mem.clone(),
    )?);
    let mut daemon = VhostUserDaemon::new(PROTOCOL_THREAD.to_string(), backend.clone(), mem)
        .map_err(|e| DaemonError::Setup {
            step: "start the worker threads",
            message: e.to_string(),
        })?;
    // Each worker waits on its pair's TAP queue too. Edge-triggered: the worker reads the TAP
    // until it is empty (or the receive ring is full, when the next receive kick resumes).
    for (handler, tap) in daemon.get_epoll_handlers().iter().zip(&device.taps) {
        handler
            .register_listener(
                tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.tap_event(),
            )
            .map_err(|e| DaemonError::Os {
                what: "registering the TAP with a worker",
                source: e,
            })?;
    }
    match connect {
        Connect::Accept(listener) => daemon.start(listener),
        Connect::Client(path) => daemon.start_client(path),
    }
    .map_err(|e| DaemonError::Setup {
        step: "connect to the frontend",
        message: e.to_string(),
    })?;
    info!("frontend connected");
    Ok(Connection { daemon, backend })
}

/// Serves a connection to its end (disconnection, error, or `terminator`).
fn serve(connection: Connection, terminator: &Terminator) -> Result<(), DaemonCrateError> {
    let Connection {
        mut daemon,
        backend,
    } = connection;
    terminator.attach(daemon.shutdown_handle());
    let result = daemon.wait();
    terminator.detach();
    // Sends the exit events and joins the worker threads.
    drop(daemon);
    // SAFETY: the daemon, the only user of the backend's exit events, was just dropped.
    unsafe { backend.close_orphaned_exit_events() };
    result
}

/// Runs the daemon: creates and configures the TAP interface, then either creates the socket
/// and serves frontends one at a time until the first one disconnects (or, with
/// `keep_running`, until `terminator` fires; the socket is removed in every case), or with
/// `client=on` connects to the VMM's socket and serves that connection.
///
/// With `keep_running` false, the socket is removed as soon as the frontend is accepted: no
/// second frontend can connect to a daemon that will not serve it.
///
/// # Errors
///
/// A [`DaemonError`] for anything that stops the daemon other than a disconnection or a
/// termination request.
pub fn run(
    config: &BackendConfig,
    keep_running: bool,
    terminator: &Terminator,
) -> Result<(), DaemonError> {
    let taps = open_tap(config)?;
    let if_name = taps
        .first()
        .map(|t| t.if_name().to_string())
        .unwrap_or_default();
    let device = Device {
        taps: taps
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn TapQueue>)
            .collect(),
        mac: config.mac.unwrap_or_else(MacAddr::random_local),
        mtu: config.mtu,
        queue_size: config.queue_size,
    };
    info!(
        "TAP {if_name} ({}/{}, {} queue pair(s)), guest MAC {}",
        config.ip,
        config.mask,
        config.num_queue_pairs(),
        device.mac
    );
    if config.client {
        let path = config
            .socket
            .to_str()
            .ok_or_else(|| DaemonError::SocketPathNotUtf8(config.socket.clone()))?;
        info!("connecting to {path}");
        let connection = connect(&device, Connect::Client(path))?;
        return finish(serve(connection, terminator), false, terminator).map(|_| ());
    }
    let mut socket = Some(SocketFile::bind(&config.socket)?);
    info!("listening on {}", config.socket.display());
    while let Some(listening) = socket.as_mut() {
        if let Wake::Terminate = wait_for_frontend(listening, terminator)? {
            info!("terminating");
            return Ok(());
        }
        let connection = connect(&device, Connect::Accept(&mut listening.listener))?;
        if !keep_running {
            // Removes the socket and closes the listener.
            socket = None;
        }
        if finish(serve(connection, terminator), keep_running, terminator)? {
            return Ok(());
        }
    }
    Ok(())
}

/// Judges how a connection ended; `Ok(true)` when the daemon is to stop.
fn finish(
    result: Result<(), DaemonCrateError>,
    keep_running: bool,
    terminator: &Terminator,
) -> Result<bool, DaemonError> {
    match result {
        Ok(()) => info!("frontend disconnected"),
        Err(e) if is_disconnect(&e) => info!("frontend disconnected ({e})"),
        Err(e) if terminator.is_requested() => debug!("connection ended: {e}"),
        Err(e) if keep_running => warn!("frontend connection failed: {e}"),
        Err(e) => return Err(DaemonError::Protocol(e.to_string())),
    }
    if terminator.is_requested() {
        info!("terminating");
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vun-daemon-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn socket_file_lifecycle() {
        let dir = scratch("sock");
        let path = dir.join("s");
        let s = SocketFile::bind(&path).unwrap();
        assert_eq!(s.path(), path);
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        // Someone listens on it: refused.
        assert!(matches!(
            SocketFile::bind(&path),
            Err(DaemonError::SocketInUse { .. })
        ));
        drop(s);
        assert!(!path.exists());

        // A stale socket (bound, listener closed, file left) is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let s = SocketFile::bind(&path).unwrap();
        // Replaced by somebody else meanwhile: their file stays.
        fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop(s);
        assert!(path.exists());
        drop(theirs);
        fs::remove_file(&path).unwrap();

        // Not a socket: refused and left alone.
        fs::write(&path, b"data").unwrap();
        assert!(matches!(
            SocketFile::bind(&path),
            Err(DaemonError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"data");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn terminator_wakes_the_wait() {
        let dir = scratch("term");
        let socket = SocketFile::bind(&dir.join("s")).unwrap();
        let t = Arc::new(Terminator::new().unwrap());
        assert!(!t.is_requested());
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            t2.request();
        });
        assert!(matches!(
            wait_for_frontend(&socket, &t).unwrap(),
            Wake::Terminate
        ));
        h.join().unwrap();
        assert!(t.is_requested());
        t.request();
        drop(socket);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_connection_wakes_the_wait() {
        let dir = scratch("conn");
        let path = dir.join("s");
        let socket = SocketFile::bind(&path).unwrap();
        let t = Terminator::new().unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert!(matches!(
            wait_for_frontend(&socket, &t).unwrap(),
            Wake::Frontend
        ));
        drop(socket);
        fs::remove_dir_all(&dir).unwrap();
    }
}
