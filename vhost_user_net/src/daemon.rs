//! The daemon around [`NetBackend`]: the TAP interface opened and configured once, then
//! `vhost_user_daemon`'s connection loop (the listening socket or, with `client=on`, a
//! connection to the VMM's socket; frontend connections served one at a time; termination on
//! request by a [`Terminator`]) with a backend for that TAP per connection.

use std::path::PathBuf;
use std::sync::Arc;

use log::info;
use net_util::{MacAddr, NetError, Tap, TapQueue};
use vhost_user_backend::VhostUserDaemon;
use vhost_user_daemon::{Device as DaemonDevice, GuestMemory, SocketFile};
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
        daemon: &mut VhostUserDaemon<Arc<NetBackend>>,
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

/// Runs the daemon: creates and configures the TAP interface, then either creates the socket
/// and serves frontends one at a time until the first one disconnects (or, with
/// `keep_running`, until `terminator` fires; the socket is removed in every case), or with
/// `client=on` connects to the VMM's socket and serves that connection.
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
        return vhost_user_daemon::serve_client(&device, path, terminator);
    }
    let socket = SocketFile::bind(&config.socket)?;
    info!("listening on {}", config.socket.display());
    vhost_user_daemon::serve(&device, socket, keep_running, terminator)
}
