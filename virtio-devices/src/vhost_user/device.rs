//! The device half every vhost-user frontend shares: the connection (kept across guest reboots),
//! what was learnt from the backend, and the relay of its interrupts while the driver runs.

use std::sync::{Arc, Mutex};

use super::Connection;
use crate::worker::Worker;
use crate::{read_config_bytes, ActivateError, Activation, VirtioDevice};

#[derive(Debug)]
struct Shared {
    connection: Mutex<Connection>,
    device_type: u32,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    features: u64,
}

/// A virtio device whose data path runs in a vhost-user backend.
#[derive(Debug)]
pub struct VhostUserDevice {
    shared: Arc<Shared>,
    name: String,
    relay: Option<Worker>,
}

impl VhostUserDevice {
    /// A device of `device_type` on `connection`, offering the connection's features, with
    /// `config` as its configuration space and one queue per entry of `queue_sizes`.
    pub(super) fn new(
        connection: Connection,
        device_type: u32,
        config: Vec<u8>,
        queue_sizes: Vec<u16>,
        name: String,
    ) -> Self {
        let shared = Shared {
            features: connection.features,
            connection: Mutex::new(connection),
            device_type,
            config,
            queue_sizes,
        };
        Self {
            shared: Arc::new(shared),
            name,
            relay: None,
        }
    }

    /// A device for a new VM instance on the same backend connection.
    pub fn fresh(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            name: self.name.clone(),
            relay: None,
        }
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.shared
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.shared.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.shared.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.shared.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.is_empty() {
            return Err(ActivateError::InvalidSetup("no queue enabled".into()));
        }
        let relay = self.connection().start(a, &self.name)?;
        self.relay = Some(relay);
        Ok(())
    }

    fn reset(&mut self) {
        if self.relay.take().is_some() {
            let queues = self.shared.queue_sizes.len();
            self.connection().stop(queues);
        }
    }
}
