//! The daemon around [`NetBackend`]: the TAP interface opened and configured once, then
//! `vhost_user_daemon`'s connection loop (the listening socket or, with `client=on`, a
//! connection to the VMM's socket; frontend connections served one at a time; termination on
//! request by a [`Terminator`]) with a backend for that TAP per connection.

use std::path::PathBuf;
use std::sync::Arc;

use log::info;
use net_util::{MacAddr, NetError, Tap, TapQueue};
use vhost_user_backend::VhostUserDaemon;
use vhost_user_daemon::program::Started;
use vhost_user_daemon::{Device as DaemonDevice, DeviceRules, Filtered, GuestMemory, SocketFile};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BackendError, NetBackend};
use crate::config::BackendConfig;

pub use vhost_user_daemon::Terminator;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The TAP interface cannot be created, opened or configured.
    #[error(transparent)]
    Tap(#[from] NetError),
    /// The socket path of `client=on` is not valid UTF-8 (the backend crate takes a `&str`).
    #[error("socket path {0} is not valid UTF-8")]
    SocketPathNotUtf8(PathBuf),
    /// Creating the backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The socket, a connection or termination failed.
    #[error(transparent)]
    Daemon(#[from] vhost_user_daemon::DaemonError),
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

impl DaemonDevice for Device {
    type Backend = NetBackend;
    type Error = DaemonError;
    const PROTOCOL_THREAD: &'static str = "vun-protocol";
    const CONNECT_STEP: &'static str = "connect to the frontend";

    fn backend(&self, mem: GuestMemory) -> Result<Arc<NetBackend>, DaemonError> {
        Ok(Arc::new(NetBackend::new(
            self.taps.clone(),
            self.mac,
            self.mtu,
            self.queue_size,
            mem,
        )?))
    }

    fn prepare(
        &self,
        daemon: &mut VhostUserDaemon<Filtered<NetBackend>>,
        backend: &Arc<NetBackend>,
    ) -> Result<(), DaemonError> {
        // Each worker waits on its pair's TAP queue too. Edge-triggered: the worker reads the
        // TAP until it is empty (or the receive ring is full, when the next receive kick
        // resumes).
        for (handler, tap) in daemon.get_epoll_handlers().iter().zip(&self.taps) {
            handler
                .register_listener(
                    tap.as_raw_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    backend.tap_event(),
                )
                .map_err(|e| vhost_user_daemon::DaemonError::Os {
                    what: "registering the TAP with a worker",
                    source: e,
                })?;
        }
        Ok(())
    }
}

/// Where the frontend comes from.
#[derive(Debug)]
enum Frontend {
    /// Frontends connect to this socket.
    Listen {
        socket: SocketFile,
        keep_running: bool,
    },
    /// The daemon connects to the VMM's socket at this path (`client=on`).
    Connect(String),
}

/// The daemon once started: the TAP created and configured, the socket bound (or, with
/// `client=on`, its path checked).
pub struct NetDaemon {
    device: Device,
    frontend: Frontend,
}

impl std::fmt::Debug for NetDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDaemon")
            .field("taps", &self.device.taps)
            .field("frontend", &self.frontend)
            .finish_non_exhaustive()
    }
}

/// Starts the daemon: creates and configures the TAP interface, and creates the socket (with
/// `client=on`, only checks its path: the connection is made when serving). Then
/// [`NetDaemon::serve`] serves, under the system call filters
/// `vhost_user_daemon::program::main` installs in between.
///
/// # Errors
///
/// [`DaemonError::Tap`], [`DaemonError::SocketPathNotUtf8`] or, for the socket,
/// [`DaemonError::Daemon`].
pub fn start(config: &BackendConfig, keep_running: bool) -> Result<NetDaemon, DaemonError> {
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
    let frontend = if config.client {
        let path = config
            .socket
            .to_str()
            .ok_or_else(|| DaemonError::SocketPathNotUtf8(config.socket.clone()))?;
        Frontend::Connect(path.to_string())
    } else {
        let socket = SocketFile::bind(&config.socket)?;
        info!("listening on {}", config.socket.display());
        Frontend::Listen {
            socket,
            keep_running,
        }
    };
    Ok(NetDaemon { device, frontend })
}

impl Started for NetDaemon {
    type Error = DaemonError;

    fn seccomp_rules(&self) -> DeviceRules {
        crate::seccomp::rules(matches!(self.frontend, Frontend::Connect(_)))
    }

    fn landlock_rules(&self) -> Vec<nimbus_landlock::PathRule> {
        match &self.frontend {
            Frontend::Listen { socket, .. } => vec![socket.landlock_rule()],
            // Connecting to the VMM's socket is no file-system access Landlock governs.
            Frontend::Connect(_) => Vec::new(),
        }
    }

    /// Serves frontends one at a time until the first one disconnects (or, with
    /// `keep_running`, until `terminator` fires; the socket is removed in every case), or with
    /// `client=on` connects to the VMM's socket and serves that connection. The connection
    /// loop is [`vhost_user_daemon::serve()`]'s.
    ///
    /// # Errors
    ///
    /// A [`DaemonError`], as `serve` says.
    fn serve(self, terminator: &Terminator) -> Result<(), DaemonError> {
        match self.frontend {
            Frontend::Connect(path) => {
                info!("connecting to {path}");
                vhost_user_daemon::serve_client(&self.device, &path, terminator)
            }
            Frontend::Listen {
                socket,
                keep_running,
            } => vhost_user_daemon::serve(&self.device, socket, keep_running, terminator),
        }
    }
}
