//! The daemon around [`BlockBackend`]: the disk opened once, then `vhost_user_daemon`'s
//! connection loop (the listening socket, frontend connections served one at a time,
//! termination on request by a [`Terminator`]) with a backend for that disk per connection.

use std::sync::Arc;

use block::{BlockError, DiskBackend, RawFile};
use log::info;
use vhost_user_daemon::program::Started;
use vhost_user_daemon::{Device, DeviceRules, GuestMemory, SocketFile};

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

/// The daemon once started: the disk open (and locked), the socket bound.
pub struct BlockDaemon {
    disk: Arc<dyn DiskBackend>,
    config: BackendConfig,
    socket: SocketFile,
    keep_running: bool,
}

impl std::fmt::Debug for BlockDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDaemon")
            .field("disk", &self.disk)
            .field("socket", &self.socket)
            .field("keep_running", &self.keep_running)
            .finish_non_exhaustive()
    }
}

/// Starts the daemon: opens the disk (failing if another process holds a conflicting lock) and
/// creates the socket. Then [`BlockDaemon::serve`] serves frontends, under the system call
/// filters `vhost_user_daemon::program::main` installs in between.
///
/// # Errors
///
/// [`DaemonError::Disk`] or, for the socket, [`DaemonError::Daemon`].
pub fn start(config: &BackendConfig, keep_running: bool) -> Result<BlockDaemon, DaemonError> {
    let disk: Arc<dyn DiskBackend> =
        Arc::new(RawFile::open(&config.path, config.readonly, config.direct)?);
    if !config.raw {
        let format = block::detect_format(disk.as_ref())?;
        if format != block::ImageFormat::Raw {
            return Err(DaemonError::Disk(BlockError::NotRaw {
                path: config.path.clone(),
                format,
            }));
        }
    }
    let socket = SocketFile::bind(&config.socket)?;
    info!(
        "serving {} ({} bytes{}) on {}",
        config.path.display(),
        disk.size(),
        if config.readonly { ", read-only" } else { "" },
        config.socket.display()
    );
    Ok(BlockDaemon {
        disk,
        config: config.clone(),
        socket,
        keep_running,
    })
}

impl Started for BlockDaemon {
    type Error = DaemonError;

    fn seccomp_rules(&self) -> DeviceRules {
        crate::seccomp::rules()
    }

    fn landlock_rules(&self) -> Vec<nimbus_landlock::PathRule> {
        vec![self.socket.landlock_rule()]
    }

    /// Serves frontends one at a time until the first one disconnects (or, with
    /// `keep_running`, until `terminator` fires). The socket is removed in every case. The
    /// connection loop is [`vhost_user_daemon::serve()`]'s.
    ///
    /// # Errors
    ///
    /// A [`DaemonError`], as `serve` says.
    fn serve(self, terminator: &Terminator) -> Result<(), DaemonError> {
        let BlockDaemon {
            disk,
            config,
            socket,
            keep_running,
        } = self;
        let device = Disk {
            disk,
            config: &config,
        };
        vhost_user_daemon::serve(&device, socket, keep_running, terminator)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn images_that_are_not_raw_are_refused_unless_said_raw() {
        let dir = std::env::temp_dir().join(format!("vub-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (format, magic) in [
            ("qcow2", &b"QFI\xfb"[..]),
            ("vhdx", b"vhdxfile"),
            ("vmdk", b"KDMV"),
        ] {
            let image = dir.join(format!("disk.{format}"));
            let mut bytes = vec![0u8; 1 << 20];
            bytes[..magic.len()].copy_from_slice(magic);
            std::fs::write(&image, &bytes).unwrap();
            let socket = dir.join(format!("{format}.sock"));
            let config = BackendConfig::new(&image, &socket);
            let e = start(&config, false).map(|_| ()).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "disk image {} is a {format} image; Nimbus serves raw images only",
                    image.display()
                )
            );
            assert!(!socket.exists(), "no socket for a refused image");
            let raw = BackendConfig {
                raw: true,
                ..config
            };
            let daemon = start(&raw, false).unwrap();
            drop(daemon);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
