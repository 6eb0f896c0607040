//! The daemon around [`BlockBackend`]: the disk opened once, then `vhost_user_daemon`'s
//! connection loop (the listening socket, frontend connections served one at a time,
//! termination on request by a [`Terminator`]) with a backend for that disk per connection.

use std::sync::Arc;

use block::{BlockError, DiskBackend, RawFile};
use log::info;
use vhost_user_daemon::{Device, GuestMemory, SocketFile};

use crate::backend::{BackendError, BlockBackend};
use crate::config::BackendConfig;

pub use vhost_user_daemon::Terminator;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The disk image cannot be opened or is locked by another process.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// Creating the backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The socket, a connection or termination failed.
    #[error(transparent)]
    Daemon(#[from] vhost_user_daemon::DaemonError),
}

/// The disk, shared between connections.
struct Disk<'a> {
    disk: Arc<dyn DiskBackend>,
    config: &'a BackendConfig,
}

impl Device for Disk<'_> {
    type Backend = BlockBackend;
    type Error = DaemonError;
    const PROTOCOL_THREAD: &'static str = "vub-protocol";
    const CONNECT_STEP: &'static str = "accept the frontend";

    fn backend(&self, mem: GuestMemory) -> Result<Arc<BlockBackend>, DaemonError> {
        Ok(Arc::new(BlockBackend::new(
            self.disk.clone(),
            self.config,
            mem,
        )?))
    }
}

/// Runs the daemon: opens the disk (failing if another process holds a conflicting lock),
/// creates the socket, and serves frontends one at a time until the first one disconnects
/// (or, with `keep_running`, until `terminator` fires). The socket is removed in every case.
/// The connection loop is [`vhost_user_daemon::serve`]'s.
///
/// # Errors
///
/// A [`DaemonError`], as `serve` says.
pub fn run(
    config: &BackendConfig,
    keep_running: bool,
    terminator: &Terminator,
) -> Result<(), DaemonError> {
    let disk: Arc<dyn DiskBackend> =
        Arc::new(RawFile::open(&config.path, config.readonly, config.direct)?);
    let socket = SocketFile::bind(&config.socket)?;
    info!(
        "serving {} ({} bytes{}) on {}",
        config.path.display(),
        disk.size(),
        if config.readonly { ", read-only" } else { "" },
        config.socket.display()
    );
    vhost_user_daemon::serve(&Disk { disk, config }, socket, keep_running, terminator)
}
