//! vhost-user-net frontend: a virtio-net device whose packets a backend process moves
//! (`vhost_user_net`, DPDK...). The MAC and link status come from the backend's configuration
//! space (CONFIG).
//!
//! With more than one queue pair the device offers `MQ` and `CTRL_VQ`, and Nimbus serves the
//! control queue itself, as vhost-user backends expect: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`
//! becomes `SET_VRING_ENABLE` on the backend's rings (only the first pair runs until the
//! driver asks for more, virtio 1.2, 5.1.6.5.5). Other control commands get `VIRTIO_NET_ERR`,
//! and the features that would send them are not offered.

use std::sync::Arc;

use net_util::{process_ctrl, CtrlCommand, QueueError};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use vm_memory::GuestAddressSpace;

use super::device::LocalQueue;
use super::{Backend, Endpoint, VhostUserDevice, VhostUserError};
use crate::{device_type, ActiveQueue, GuestMemoryAtomic, VIRTIO_F_VERSION_1};

/// Size of the virtio-net configuration space read from the backend.
const CONFIG_LEN: u32 = 24;
/// Offset of `max_virtqueue_pairs` (le16) in the configuration space.
const MAX_PAIRS_OFFSET: usize = 8;
/// Most queue pairs a vhost-user interface may have (as for the in-process device).
pub const MAX_QUEUE_PAIRS: u16 = 16;
const CTRL_VQ: u64 = 1 << VIRTIO_NET_F_CTRL_VQ;
const MQ: u64 = 1 << VIRTIO_NET_F_MQ;
/// Device bits 0..=23 plus ring and VERSION_1 bits, minus the control-queue commands Nimbus
/// does not implement (`CTRL_RX`, `CTRL_VLAN`, `CTRL_RX_EXTRA`, `GUEST_ANNOUNCE`,
/// `CTRL_MAC_ADDR`: bits 18 to 21 and 23) and the multi-queue pair, which [`connect`] adds back when there is more than
/// one pair.
const SUPPORTED: u64 = (0x00ff_ffff & !CTRL_VQ & !MQ & !(0b1111 << 18) & !(1 << 23))
    | VIRTIO_F_VERSION_1
    | crate::VIRTIO_RING_F_EVENT_IDX
    | crate::VIRTIO_RING_F_INDIRECT_DESC;

/// Connects to the backend at `endpoint` and makes a device of up to `pairs` queue pairs of
/// `queue_size` (fewer when the backend serves fewer).
pub fn connect(
    endpoint: Endpoint,
    pairs: u16,
    queue_size: u16,
    name: String,
) -> Result<VhostUserDevice, VhostUserError> {
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK;
    let asked = pairs.clamp(1, MAX_QUEUE_PAIRS);
    let (backend, mut connection) = Backend::open(endpoint, 2 * u64::from(asked), wanted)?;
    if connection.max_queues < 2 {
        return Err(VhostUserError::Unsupported(format!(
            "serves {} queues; a pair needs 2",
            connection.max_queues
        )));
    }
    let mut config = connection.config(CONFIG_LEN)?;
    let offered_pairs = if connection.features & MQ != 0 {
        config
            .get(MAX_PAIRS_OFFSET..MAX_PAIRS_OFFSET + 2)
            .map_or(1, |b| u16::from_le_bytes([b[0], b[1]]))
    } else {
        1
    };
    let pairs = asked
        .min(offered_pairs)
        .min((connection.max_queues / 2) as u16)
        .max(1);
    if pairs < asked {
        log::info!(
            "{name}: the vhost-user backend serves {pairs} queue pair(s) of the {asked} asked"
        );
    }
    if let Some(field) = config.get_mut(MAX_PAIRS_OFFSET..MAX_PAIRS_OFFSET + 2) {
        field.copy_from_slice(&pairs.to_le_bytes());
    }
    connection.features &= SUPPORTED;
    let mut queue_sizes = vec![queue_size; 2 * usize::from(pairs)];
    let ctrl = (pairs > 1).then(|| {
        connection.features |= CTRL_VQ | MQ;
        queue_sizes.push(CTRL_QUEUE_SIZE);
        Arc::new(ControlQueue {
            pairs,
            name: name.clone(),
        }) as Arc<dyn LocalQueue>
    });
    Ok(VhostUserDevice::new(
        backend,
        connection,
        device_type::NET,
        config,
        queue_sizes,
        name,
        ctrl,
    ))
}

/// Size of the control queue: commands are rare and answered at once.
const CTRL_QUEUE_SIZE: u16 = 64;

/// The control queue of a multi-queue interface, served in Nimbus.
#[derive(Debug)]
struct ControlQueue {
    /// Queue pairs of the device.
    pairs: u16,
    /// The device's name, for log lines.
    name: String,
}

impl LocalQueue for ControlQueue {
    fn index(&self, features: u64) -> Option<u16> {
        net_util::ctrl_queue_index(usize::from(self.pairs), features).map(|i| i as u16)
    }

    fn initial_rings(&self) -> u16 {
        // The first pair, with or without MQ: without it the driver has only that pair.
        2
    }

    fn process(
        &self,
        queue: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
        features: u64,
        use_rings: &mut dyn FnMut(u16),
    ) -> Result<bool, QueueError> {
        let mq = features & MQ != 0;
        let (pairs, name) = (self.pairs, &self.name);
        let mem = mem.memory();
        // Every waiting command, answered at once: drivers send few (VQ_PAIRS_SET when they
        // start and when the pair count changes).
        let out = process_ctrl(&mut queue.queue, &*mem, usize::MAX, &mut |cmd| match cmd {
            CtrlCommand::MqVqPairsSet(n) if mq && (1..=pairs).contains(&n) => {
                use_rings(2 * n);
                true
            }
            CtrlCommand::MqVqPairsSet(n) => {
                log::warn!("{name}: driver asked for {n} queue pairs of {pairs}");
                false
            }
            CtrlCommand::Unsupported { class, command } => {
                log::debug!("{name}: unsupported control command {class}.{command}");
                false
            }
        })?;
        if let Some(bad) = &out.first_malformed {
            log::warn!(
                "{name}: control queue {}: {} malformed chain(s), first: head {}: {}",
                queue.index,
                out.malformed,
                bad.head,
                bad.error
            );
        }
        Ok(out.needs_notification)
    }
}
