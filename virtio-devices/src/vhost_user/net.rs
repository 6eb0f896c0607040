//! vhost-user-net frontend: a virtio-net device whose packets a backend process moves
//! (`vhost_user_net`, DPDK...). One queue pair: the control queue that multi-queue needs is not
//! served by backends such as `vhost_user_net`, so CTRL_VQ and MQ are not offered to the guest.
//! The MAC and link status come from the backend's configuration space (CONFIG).

use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Connection, VhostUserError};
use crate::worker::Worker;
use crate::{
    device_type, read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Size of the virtio-net configuration space read from the backend.
const CONFIG_LEN: u32 = 24;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// Device bits 0..=23 plus ring and VERSION_1 bits, minus the multi-queue control path.
const SUPPORTED: u64 = (0x00ff_ffff & !VIRTIO_NET_F_CTRL_VQ & !VIRTIO_NET_F_MQ)
    | VIRTIO_F_VERSION_1
    | crate::VIRTIO_RING_F_EVENT_IDX
    | crate::VIRTIO_RING_F_INDIRECT_DESC;

#[derive(Debug)]
struct Shared {
    connection: Mutex<Connection>,
    config: Vec<u8>,
    queue_size: u16,
    features: u64,
}

/// The device.
#[derive(Debug)]
pub struct VhostUserNet {
    shared: Arc<Shared>,
    name: String,
    relay: Option<Worker>,
}

impl VhostUserNet {
    /// Connects to the backend at `socket` (one queue pair of `queue_size`).
    pub fn new(socket: &str, queue_size: u16, name: String) -> Result<Self, VhostUserError> {
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        let mut connection = Connection::connect(socket, 2, wanted)?;
        if connection.features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Unsupported(
                "does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        if connection.max_queues < 2 {
            return Err(VhostUserError::Unsupported(format!(
                "serves {} queues; a pair needs 2",
                connection.max_queues
            )));
        }
        let mut config = connection.config(CONFIG_LEN)?;
        // max_virtqueue_pairs (offset 8): the guest sees one pair.
        if let Some(pairs) = config.get_mut(8..10) {
            pairs.copy_from_slice(&1u16.to_le_bytes());
        }
        connection.features &= SUPPORTED;
        let shared = Shared {
            features: connection.features,
            connection: Mutex::new(connection),
            config,
            queue_size,
        };
        Ok(Self {
            shared: Arc::new(shared),
            name,
            relay: None,
        })
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

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.shared.queue_size; 2]
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.shared.config, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if a.queues.len() != 2 {
            return Err(ActivateError::InvalidSetup(format!(
                "{} queues enabled, want the rx/tx pair",
                a.queues.len()
            )));
        }
        let relay = self.connection().start(a, &self.name)?;
        self.relay = Some(relay);
        Ok(())
    }

    fn reset(&mut self) {
        if self.relay.take().is_some() {
            self.connection().stop(2);
        }
    }
}
