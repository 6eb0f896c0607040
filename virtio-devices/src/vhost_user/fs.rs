//! vhost-user-fs frontend (virtio-fs, the device Kata uses with virtiofsd): the backend serves
//! FUSE requests from the guest over a high-priority queue and `num_request_queues` request
//! queues. The configuration space (tag and queue count) is Nimbus's own: virtiofsd does not
//! serve one unless started with `--tag`.

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{Backend, Endpoint, VhostUserDevice, VhostUserError};
use crate::VIRTIO_F_VERSION_1;

/// virtio device type of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Bytes of the tag field.
pub const TAG_LEN: usize = 36;
/// Ring and VERSION_1 bits; no device-specific feature (NOTIFICATION needs a queue Nimbus does
/// not set up).
const SUPPORTED: u64 =
    VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX | crate::VIRTIO_RING_F_INDIRECT_DESC;

/// Connects to the backend at `endpoint`; the guest mounts the file system by `tag`.
pub fn connect(
    endpoint: Endpoint,
    tag: &str,
    request_queues: u16,
    queue_size: u16,
    name: String,
) -> Result<VhostUserDevice, VhostUserError> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(VhostUserError::Unsupported(format!(
            "tag '{tag}' must be 1..={TAG_LEN} bytes"
        )));
    }
    let asked = 1 + request_queues.max(1);
    let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
    let (backend, mut connection) = Backend::open(endpoint, u64::from(asked), wanted)?;
    // As many request queues as the backend serves, up to those asked (the driver would
    // otherwise start queues it refuses).
    let queues = connection.max_queues.min(u64::from(asked)) as u16;
    if queues < 2 {
        return Err(VhostUserError::Unsupported(format!(
            "serves {queues} queue(s); virtio-fs needs 2 (hiprio and a request queue)"
        )));
    }
    connection.features &= SUPPORTED;
    let mut config = vec![0u8; TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_LEN..].copy_from_slice(&u32::from(queues - 1).to_le_bytes());
    Ok(VhostUserDevice::new(
        backend,
        connection,
        VIRTIO_ID_FS,
        config,
        vec![queue_size; usize::from(queues)],
        name,
        None,
    ))
}
