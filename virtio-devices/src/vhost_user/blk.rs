//! vhost-user-blk frontend: a virtio-blk device whose requests a backend process serves
//! (`vhost_user_block`, `qemu-storage-daemon`, SPDK...). The configuration space comes from the
//! backend (CONFIG protocol feature); features are the backend's, filtered to what Nimbus's
//! transport supports.

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Backend, Endpoint, VhostUserDevice, VhostUserError};
use crate::{device_type, VIRTIO_F_VERSION_1};

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

/// Connects to the backend at `endpoint`, with up to `num_queues` queues of `queue_size`.
pub fn connect(
    endpoint: Endpoint,
    num_queues: u16,
    queue_size: u16,
    name: String,
) -> Result<VhostUserDevice, VhostUserError> {
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let (backend, mut connection) = Backend::open(endpoint, u64::from(num_queues.max(1)), wanted)?;
    if connection.max_queues == 0 {
        // GET_QUEUE_NUM said 0: the device would have a queue nobody serves.
        return Err(VhostUserError::Unsupported("serves no queue".into()));
    }
    let config = connection.config(CONFIG_LEN)?;
    let queues = connection.max_queues.clamp(1, u64::from(num_queues.max(1))) as u16;
    connection.features &= SUPPORTED;
    if queues < 2 {
        connection.features &= !VIRTIO_BLK_F_MQ;
    }
    Ok(VhostUserDevice::new(
        backend,
        connection,
        device_type::BLOCK,
        config,
        vec![queue_size; usize::from(queues)],
        name,
        None,
    ))
}
