//! The connection loop, generic over the device a daemon serves ([`Device`]): frontend
//! connections served one at a time, each with a fresh backend, until the first one disconnects
//! (or, with `keep_running`, until the [`Terminator`] fires).
//!
//! Besides the protocol errors with which the backend crate ends a connection, the daemon drops
//! one itself when the frontend hands over what it cannot safely use ([`drop_connection`] with a
//! [`ConnectionFault`]): a ring descriptor that is not an eventfd, guest memory that vanished.
//! The connection then ends as after a protocol error.

use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::exit::ExitEvents;
use vm_memory::GuestMemoryMmap;

use crate::memory::{GuestMemory, Vring};
use crate::seccomp::Filtered;
use crate::socket::{is_disconnect, wait_for_frontend, DaemonError, SocketFile, Terminator, Wake};
use log::{debug, error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    Error as DaemonCrateError, ShutdownHandle, VhostUserBackend, VhostUserDaemon,
};

/// What differs between daemons: the backend built per connection, and what is done with it.
pub trait Device {
    /// The `VhostUserBackend`, one per connection, with the exit events of its workers (whose
    /// descriptors are reclaimed after each connection).
    type Backend: VhostUserBackend<Bitmap = (), Vring = Vring> + AsRef<ExitEvents> + 'static;
    /// The daemon's error, which the common errors convert into.
    type Error: From<DaemonError>;

    /// Name of the protocol thread the backend crate starts per connection.
    const PROTOCOL_THREAD: &'static str;
    /// What connecting is called in the error when it fails ("accept the frontend").
    const CONNECT_STEP: &'static str;

    /// Builds the backend for a new connection.
    ///
    /// # Errors
    ///
    /// The daemon's own.
    fn backend(&self, mem: GuestMemory) -> Result<Arc<Self::Backend>, Self::Error>;

    /// Prepares the backend crate's daemon before the connection starts (registering extra
    /// descriptors with the workers, say). Nothing by default. The crate's daemon holds the
    /// backend as [`Filtered`], through which its threads apply their system call filters.
    ///
    /// # Errors
    ///
    /// The daemon's own.
    fn prepare(
        &self,
        _daemon: &mut VhostUserDaemon<Filtered<Self::Backend>>,
        _backend: &Arc<Self::Backend>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Why the daemon drops a frontend's connection itself.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionFault {
    /// A ring's kick, call or error descriptor is not an eventfd: reading or writing it could
    /// block a worker (holding the ring) for ever, or fail for ever.
    #[error("the frontend's {role} descriptor for a ring is {kind}, not an eventfd")]
    NotAnEventfd {
        /// "kick", "call" or "error".
        role: &'static str,
        /// What it is instead.
        kind: &'static str,
    },
    /// A ring's descriptor could not be inspected or made non-blocking.
    #[error("cannot prepare the frontend's {role} descriptor for a ring")]
    Descriptor {
        /// "kick", "call" or "error".
        role: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A ring size that is not a power of two (`SET_VRING_NUM`): the backend crate lets it
    /// through, and the ring would keep its previous size unknown to the frontend.
    #[error("the frontend asked for a ring of {size} entries, not a power of two")]
    RingSize {
        /// The size asked.
        size: u16,
    },
    /// Reading a ring's kick eventfd failed otherwise than for want of a kick.
    #[error("cannot read a ring's kick eventfd")]
    Kick(#[source] io::Error),
    /// An access to guest memory hit a page past the end of its region's file: the frontend
    /// shrank the file (a memfd truncated) after the daemon mapped it.
    #[error(
        "guest memory at host address {address:#x} is past the end of its file: the frontend \
         shrank a memory region's file under the daemon"
    )]
    MemoryVanished {
        /// The address that faulted.
        address: usize,
    },
}

/// The connection being served, for [`drop_connection`]: the crate's handle on it, whether it
/// is being started (the crate's protocol thread runs before its handle is attached), and why
/// the daemon dropped it (first reason only).
struct Current {
    handle: Option<ShutdownHandle>,
    starting: bool,
    dropped: Option<String>,
}

static CURRENT: Mutex<Current> = Mutex::new(Current {
    handle: None,
    starting: false,
    dropped: None,
});

/// Signalled when a connection's handle is attached or its start fails.
static ATTACHED: Condvar = Condvar::new();

/// How long a fault raised while a connection starts waits for its handle: the main thread
/// attaches it right after the crate's start returns; the bound only guards a start that
/// never returns.
const ATTACH_WAIT: Duration = Duration::from_secs(10);

fn current() -> std::sync::MutexGuard<'static, Current> {
    CURRENT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops the frontend connection being served because of `fault` (logged once, as an error):
/// the socket is shut down, the crate's protocol thread ends, and the connection ends as after a
/// protocol error (exit status 1, or the next frontend with `--keep-running`). Only the first
/// fault of a connection counts. One raised on the crate's protocol thread before the main
/// thread attached the connection's handle waits for it, so the crate's reply to the faulty
/// message (an acknowledgement it would send regardless) finds the socket shut. Safe from any
/// of the connection's threads.
pub fn drop_connection(fault: ConnectionFault) {
    let mut current = current();
    if current.dropped.is_some() {
        return;
    }
    let reason = nimbus_log::error_chain(&fault);
    error!("{reason}; dropping the connection");
    current.dropped = Some(reason);
    if current.handle.is_none() && current.starting {
        current = ATTACHED
            .wait_timeout_while(current, ATTACH_WAIT, |c| c.handle.is_none() && c.starting)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    if let Some(handle) = &current.handle {
        handle.shutdown();
    }
}

/// Marks a connection as starting (its faults wait for its handle) or no longer.
fn set_starting(starting: bool) {
    current().starting = starting;
    ATTACHED.notify_all();
}

/// Makes `handle` the connection [`drop_connection`] shuts down (shutting it down at once if a
/// fault came already).
fn attach_current(handle: Option<ShutdownHandle>) {
    let mut current = current();
    if current.dropped.is_some() {
        if let Some(h) = &handle {
            h.shutdown();
        }
    }
    current.handle = handle;
    current.starting = false;
    ATTACHED.notify_all();
}

/// Forgets the connection that ended; returns why the daemon dropped it, if it did.
fn detach_current() -> Option<String> {
    let mut current = current();
    current.handle = None;
    current.dropped.take()
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
struct Connection<B: VhostUserBackend + 'static> {
    daemon: VhostUserDaemon<Filtered<B>>,
    backend: Arc<B>,
}

/// Makes a connection to a frontend and starts serving it.
fn connect<D: Device>(
    device: &D,
    connect: Connect<'_>,
) -> Result<Connection<D::Backend>, D::Error> {
    // Nothing of an earlier connection counts against this one.
    let _ = detach_current();
    let _ = crate::fault::take();
    let mem = GuestMemory::new(GuestMemoryMmap::<()>::new());
    let backend = device.backend(mem.clone())?;
    let filtered = Filtered::new(backend.clone(), D::PROTOCOL_THREAD);
    let mut daemon =
        VhostUserDaemon::new(D::PROTOCOL_THREAD.to_string(), filtered, mem).map_err(|e| {
            DaemonError::Setup {
                step: "start the worker threads",
                message: e.to_string(),
            }
        })?;
    device.prepare(&mut daemon, &backend)?;
    set_starting(true);
    let started = match connect {
        Connect::Accept(listener) => daemon.start(listener),
        Connect::Client(path) => daemon.start_client(path),
    };
    if started.is_err() {
        set_starting(false);
    }
    started.map_err(|e| DaemonError::Setup {
        step: D::CONNECT_STEP,
        message: e.to_string(),
    })?;
    info!("frontend connected");
    Ok(Connection { daemon, backend })
}

/// How a connection ended: the crate's verdict, and the daemon's own reason if it dropped it.
struct Ended {
    result: Result<(), DaemonCrateError>,
    dropped: Option<String>,
}

/// Serves a connection to its end (disconnection, error, [`drop_connection`] or `terminator`).
fn serve_connection<D: Device>(
    connection: Connection<D::Backend>,
    terminator: &Terminator,
) -> Ended {
    let Connection {
        mut daemon,
        backend,
    } = connection;
    terminator.attach(daemon.shutdown_handle());
    attach_current(daemon.shutdown_handle());
    let result = daemon.wait();
    terminator.detach();
    // Sends the exit events and joins the worker threads.
    drop(daemon);
    // After the workers: they may drop the connection to the last.
    let dropped = detach_current();
    let exit_events: &ExitEvents = (*backend).as_ref();
    // SAFETY: the daemon, the only user of the backend's exit events, was just dropped.
    unsafe { exit_events.close_orphaned() };
    Ended { result, dropped }
}

/// Judges how a connection ended; `Ok(true)` when the daemon is to stop.
fn finish(ended: Ended, keep_running: bool, terminator: &Terminator) -> Result<bool, DaemonError> {
    let Ended { result, dropped } = ended;
    match (result, dropped) {
        (_, Some(_)) if terminator.is_requested() => {}
        (_, Some(reason)) if keep_running => warn!("frontend connection failed: {reason}"),
        (_, Some(reason)) => return Err(DaemonError::Protocol(reason)),
        (result, None) => judge(result, keep_running, terminator)?,
    }
    if terminator.is_requested() {
        info!("terminating");
        return Ok(true);
    }
    Ok(false)
}

/// Judges the crate's verdict on a connection the daemon did not drop itself.
fn judge(
    result: Result<(), DaemonCrateError>,
    keep_running: bool,
    terminator: &Terminator,
) -> Result<(), DaemonError> {
    match result {
        Ok(()) => info!("frontend disconnected"),
        Err(e) if is_disconnect(&e) => info!("frontend disconnected ({e})"),
        Err(e) if terminator.is_requested() => debug!("connection ended: {e}"),
        Err(e) if keep_running => warn!("frontend connection failed: {e}"),
        Err(e) => return Err(DaemonError::Protocol(e.to_string())),
    }
    Ok(())
}

/// Serves frontends connecting to `socket` one at a time until the first one disconnects (or,
/// with `keep_running`, until `terminator` fires). The socket is removed in every case.
///
/// With `keep_running` false, the socket is removed as soon as the frontend is accepted: no
/// second frontend can connect to a daemon that will not serve it.
///
/// # Errors
///
/// The daemon's error for anything that stops it other than a disconnection or a termination
/// request.
pub fn serve<D: Device>(
    device: &D,
    socket: SocketFile,
    keep_running: bool,
    terminator: &Terminator,
) -> Result<(), D::Error> {
    let mut socket = Some(socket);
    while let Some(listening) = socket.as_mut() {
        if let Wake::Terminate = wait_for_frontend(listening, terminator)? {
            info!("terminating");
            return Ok(());
        }
        let connection = connect(device, Connect::Accept(&mut listening.listener))?;
        if !keep_running {
            // Removes the socket and closes the listener.
            socket = None;
        }
        if finish(
            serve_connection::<D>(connection, terminator),
            keep_running,
            terminator,
        )? {
            return Ok(());
        }
    }
    Ok(())
}

/// Connects to the frontend listening on `path` and serves that one connection.
///
/// # Errors
///
/// As [`serve`].
pub fn serve_client<D: Device>(
    device: &D,
    path: &str,
    terminator: &Terminator,
) -> Result<(), D::Error> {
    let connection = connect(device, Connect::Client(path))?;
    finish(
        serve_connection::<D>(connection, terminator),
        false,
        terminator,
    )?;
    Ok(())
}
