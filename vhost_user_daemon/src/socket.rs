//! The listening socket (created, checked for staleness, always removed), termination on
//! request ([`Terminator`], driven by SIGTERM/SIGINT in the binary), and the errors of both.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use log::{info, warn};
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::{Error as DaemonCrateError, ShutdownHandle};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors that stop a daemon, whatever its device.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
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

/// Binds a listening socket at `path` so that the file appears only once the socket listens: a
/// frontend that connects as soon as it sees the file (as tests and orchestrators do) is never
/// refused. The socket is made under a temporary name beside `path` and renamed, without
/// replacing a file another process put at `path` meanwhile. A directory whose temporary name
/// would not fit in a socket address binds `path` directly.
fn bind_listening(path: &Path) -> io::Result<UnixListener> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temporary = dir.join(format!(".vhost-user-{}.sock", std::process::id()));
    let _ = fs::remove_file(&temporary);
    let listener = match UnixListener::bind(&temporary) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return UnixListener::bind(path),
        Err(e) => return Err(e),
    };
    let renamed = rename_no_replace(&temporary, path);
    if renamed.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    renamed.map(|()| listener)
}

/// `rename(2)` that fails with `EEXIST` rather than replace `to`.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A Unix socket the daemon created and listens on; the file is removed when this is dropped
/// (if it is still the one created: a socket someone else put there later is left alone).
pub struct SocketFile {
    path: PathBuf,
    /// `(st_dev, st_ino)` of the socket file created.
    identity: (u64, u64),
    pub(crate) listener: Listener,
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
    /// What removing the socket at exit needs under Landlock: removing entries in its
    /// directory.
    pub fn landlock_rule(&self) -> nimbus_landlock::PathRule {
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        nimbus_landlock::PathRule::new(dir, nimbus_landlock::Access::RemoveEntries)
    }

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
        let listener = bind_listening(path).map_err(|e| socket_err("create", e))?;
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

/// A request to stop, shared between whoever asks (the signal thread) and the daemon: wakes the
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
    pub(crate) fn attach(&self, connection: Option<ShutdownHandle>) {
        let mut state = self.lock();
        if state.requested {
            if let Some(c) = &connection {
                c.shutdown();
            }
        }
        state.connection = connection;
    }

    pub(crate) fn detach(&self) {
        self.lock().connection = None;
    }
}

/// What woke [`wait_for_frontend`].
pub(crate) enum Wake {
    /// A frontend is connecting.
    Frontend,
    /// Termination was requested.
    Terminate,
}

/// Sleeps until a frontend connects to `socket` or `terminator` is triggered.
pub(crate) fn wait_for_frontend(
    socket: &SocketFile,
    terminator: &Terminator,
) -> Result<Wake, DaemonError> {
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
pub(crate) fn is_disconnect(e: &DaemonCrateError) -> bool {
    matches!(
        e,
        DaemonCrateError::HandleRequest(
            ProtocolError::Disconnected
                | ProtocolError::PartialMessage
                | ProtocolError::SocketBroken(_)
        )
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vud-daemon-{tag}-{}", std::process::id()));
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
