//! vhost-user-blk frontend: a virtio-blk device whose requests a backend process serves
//! (`vhost_user_block`, `qemu-storage-daemon`, SPDK...). The configuration space comes from the
//! backend (CONFIG protocol feature); features are the backend's, filtered to what Nimbus's
//! transport supports.

use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Connection, VhostUserError};
use crate::worker::Worker;
use crate::{
    device_type, read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Size of the virtio-blk configuration space read from the backend.
const CONFIG_LEN: u32 = 60;
/// `VIRTIO_BLK_F_MQ`.
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Feature bits the transport and the guest may use: device-specific bits 0..=23 plus the ring
/// and VERSION_1 bits. Not ACCESS_PLATFORM (no IOMMU), not packed rings.
const SUPPORTED: u64 = 0x00ff_ffff
    | VIRTIO_F_VERSION_1
    | crate::VIRTIO_RING_F_EVENT_IDX
    | crate::VIRTIO_RING_F_INDIRECT_DESC;

/// What outlives one VM instance: the connection (a backend may exit when its frontend
/// disconnects, and a guest reboot rebuilds the VM) and what was learnt from the backend.
#[derive(Debug)]
struct Shared {
    connection: Mutex<Connection>,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    features: u64,
}

/// The device.
#[derive(Debug)]
pub struct VhostUserBlk {
    shared: Arc<Shared>,
    name: String,
    relay: Option<Worker>,
}

impl VhostUserBlk {
    /// Connects to the backend at `socket`, with up to `num_queues` queues of `queue_size`.
    pub fn new(
        socket: &str,
        num_queues: u16,
        queue_size: u16,
        name: String,
    ) -> Result<Self, VhostUserError> {
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        let mut connection = Connection::connect(socket, u64::from(num_queues.max(1)), wanted)?;
        if connection.features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Unsupported(
                "does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let config = connection.config(CONFIG_LEN)?;
        let queues = connection.max_queues.clamp(1, u64::from(num_queues.max(1))) as u16;
        connection.features &= SUPPORTED;
        if queues < 2 {
            connection.features &= !VIRTIO_BLK_F_MQ;
        }
        let shared = Shared {
            features: connection.features,
            connection: Mutex::new(connection),
            config,
            queue_sizes: vec![queue_size; usize::from(queues)],
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

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
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
