//! The connection loop, generic over the device a daemon serves ([`Device`]): frontend
//! connections served one at a time, each with a fresh backend, until the first one disconnects
//! (or, with `keep_running`, until the [`Terminator`] fires).

use std::sync::Arc;

use crate::exit::ExitEvents;
use vm_memory::GuestMemoryMmap;

use crate::memory::GuestMemory;
use crate::seccomp::Filtered;
use crate::socket::{is_disconnect, wait_for_frontend, DaemonError, SocketFile, Terminator, Wake};
use log::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    Error as DaemonCrateError, VhostUserBackend, VhostUserDaemon, VringRwLock,
};

/// What differs between daemons: the backend built per connection, and what is done with it.
pub trait Device {
    /// The `VhostUserBackend`, one per connection, with the exit events of its workers (whose
    /// descriptors are reclaimed after each connection).
    type Backend: VhostUserBackend<Bitmap = (), Vring = VringRwLock<GuestMemory>>
        + AsRef<ExitEvents>
        + 'static;
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
    match connect {
        Connect::Accept(listener) => daemon.start(listener),
        Connect::Client(path) => daemon.start_client(path),
    }
    .map_err(|e| DaemonError::Setup {
        step: D::CONNECT_STEP,
        message: e.to_string(),
    })?;
    info!("frontend connected");
    Ok(Connection { daemon, backend })
}

/// Serves a connection to its end (disconnection, error, or `terminator`).
fn serve_connection<D: Device>(
    connection: Connection<D::Backend>,
    terminator: &Terminator,
) -> Result<(), DaemonCrateError> {
    let Connection {
        mut daemon,
        backend,
    } = connection;
    terminator.attach(daemon.shutdown_handle());
    let result = daemon.wait();
    terminator.detach();
    // Sends the exit events and joins the worker threads.
    drop(daemon);
    let exit_events: &ExitEvents = (*backend).as_ref();
    // SAFETY: the daemon, the only user of the backend's exit events, was just dropped.
    unsafe { exit_events.close_orphaned() };
    result
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
