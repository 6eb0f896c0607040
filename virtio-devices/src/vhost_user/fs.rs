//! vhost-user-fs frontend (virtio-fs, the device Kata uses with virtiofsd): the backend serves
//! FUSE requests from the guest over a high-priority queue and `num_request_queues` request
//! queues. The configuration space (tag and queue count) is Nimbus's own: virtiofsd does not
//! serve one.

use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Connection, VhostUserError};
use crate::worker::Worker;
use crate::{read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device type of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Bytes of the tag field.
pub const TAG_LEN: usize = 36;
/// Ring and VERSION_1 bits; no device-specific feature (NOTIFICATION needs a queue Nimbus does
/// not set up).
const SUPPORTED: u64 =
    VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX | crate::VIRTIO_RING_F_INDIRECT_DESC;

#[derive(Debug)]
struct Shared {
    connection: Mutex<Connection>,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    features: u64,
}

/// The device.
#[derive(Debug)]
pub struct VhostUserFs {
    shared: Arc<Shared>,
    name: String,
    relay: Option<Worker>,
}

impl VhostUserFs {
    /// Connects to the backend at `socket`; the guest mounts the file system by `tag`.
    pub fn new(
        socket: &str,
        tag: &str,
        request_queues: u16,
        queue_size: u16,
        name: String,
    ) -> Result<Self, VhostUserError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(VhostUserError::Unsupported(format!(
                "tag '{tag}' must be 1..={TAG_LEN} bytes"
            )));
        }
        let queues = 1 + request_queues.max(1);
        let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        let mut connection = Connection::connect(socket, u64::from(queues), wanted)?;
        if connection.features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Unsupported(
                "does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        connection.features &= SUPPORTED;
        let mut config = vec![0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&u32::from(queues - 1).to_le_bytes());
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

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
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
