//! vhost-user-net frontend: a virtio-net device whose packets a backend process moves
//! (`vhost_user_net`, DPDK...). One queue pair: the control queue that multi-queue needs is not
//! served by backends such as `vhost_user_net`, so CTRL_VQ and MQ are not offered to the guest.
//! The MAC and link status come from the backend's configuration space (CONFIG).

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Backend, Endpoint, VhostUserDevice, VhostUserError};
use crate::{device_type, VIRTIO_F_VERSION_1};

/// Size of the virtio-net configuration space read from the backend.
const CONFIG_LEN: u32 = 24;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// Device bits 0..=23 plus ring and VERSION_1 bits, minus the multi-queue control path.
const SUPPORTED: u64 = (0x00ff_ffff & !VIRTIO_NET_F_CTRL_VQ & !VIRTIO_NET_F_MQ)
    | VIRTIO_F_VERSION_1
    | crate::VIRTIO_RING_F_EVENT_IDX
    | crate::VIRTIO_RING_F_INDIRECT_DESC;

/// Connects to the backend at `endpoint` (one queue pair of `queue_size`).
pub fn connect(
    endpoint: Endpoint,
    queue_size: u16,
    name: String,
) -> Result<VhostUserDevice, VhostUserError> {
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    let backend = Backend {
        endpoint,
        max_queues: 2,
        wanted,
    };
    let mut connection = backend.connect(true)?;
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
    Ok(VhostUserDevice::new(
        backend,
        connection,
        device_type::NET,
        config,
        vec![queue_size; 2],
        name,
    ))
}
