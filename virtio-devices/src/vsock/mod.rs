//! virtio-vsock (virtio 1.2 section 5.10) with Cloud Hypervisor's hybrid Unix-socket backend.
//!
//! The guest reaches the host at context id 2; host programs reach the guest through one
//! listening Unix socket (`CONNECT <port>\n` → `OK <host_port>\n`), and the guest's
//! connections to host port P go to the Unix socket `<socket>_<P>` ([`muxer`] has the
//! protocol). The listening socket belongs to the board and outlives guest reboots; each
//! device instance serves it with its own connections, which all close when the instance
//! stops (driver reset, guest reboot, VM shutdown).

mod host;
pub mod muxer;
pub mod packet;
mod ring;
#[cfg(test)]
mod tests;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use virtio_chain::QueueError;

use crate::pause::PauseError;
use crate::worker::{Worker, WorkerSlot};
use crate::{device_type, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};

pub use muxer::{Limits, Muxer, MuxerStats};

/// The receive queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// The transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// The event queue (transport resets).
pub const EVENT_QUEUE: u16 = 2;
const QUEUE_SIZE: u16 = 256;

/// Errors that break a vsock device (it then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A system resource of the device failed.
    #[error("vsock: {what}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A queue is broken.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// The vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    limits: Limits,
    name: String,
    worker: WorkerSlot,
}

impl Vsock {
    /// A device for guest context id `cid` serving host clients of `listener`, which is bound
    /// at `socket`; its thread is called `name` (e.g. `_vsock0`).
    pub fn new(cid: u64, socket: PathBuf, listener: UnixListener, name: String) -> Self {
        Self {
            cid,
            socket,
            listener,
            limits: Limits::default(),
            name,
            worker: WorkerSlot::default(),
        }
    }

    /// The same device with other bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// The queue logic of [`Vsock`] without its worker thread, for harnesses that drive the queues
/// directly (the fuzz targets in `fuzz/`).
///
/// # Errors
///
/// [`VsockError::Os`] when the multiplexer's descriptors cannot be made.
pub fn queue_handler(
    cid: u64,
    socket: PathBuf,
    listener: UnixListener,
    limits: Limits,
) -> Result<Muxer, VsockError> {
    Muxer::new(cid, socket, listener, limits)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        virtio_chain::read_config(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 3 {
            return Err(ActivateError::InvalidSetup(format!(
                "{} queues enabled, want 3",
                a.queues.len()
            )));
        }
        let listener = self.listener.try_clone().map_err(ActivateError::Resource)?;
        let muxer = Muxer::new(self.cid, self.socket.clone(), listener, self.limits).map_err(
            |e| match e {
                VsockError::Os { source, .. } => ActivateError::Resource(source),
                other => ActivateError::InvalidSetup(other.to_string()),
            },
        )?;
        let worker = Worker::spawn(
            nimbus_thread::ThreadClass::Vsock,
            self.name.clone(),
            muxer,
            a.queues,
            a.mem,
            a.interrupt,
        )
        .map_err(ActivateError::Resource)?;
        self.worker.hold(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops its thread; the multiplexer goes with it and closes every
        // host connection.
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.pause()
    }

    fn resume(&mut self) {
        self.worker.resume();
    }
}
