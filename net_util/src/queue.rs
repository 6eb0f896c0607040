//! Errors that break a virtio-net queue, and helpers shared by the transmit, receive and
//! control paths.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

/// Errors that leave a queue unusable until the driver resets the device.
///
/// The device should set `DEVICE_NEEDS_RESET` and raise a configuration change interrupt.
/// Chains completed before the error are already in the used ring.
#[derive(Debug, thiserror::Error)]
pub enum NetQueueError {
    /// The available ring could not be read, its index is more than a queue size ahead of the
    /// device's, or the queue is not ready.
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// A chain could not be put in the used ring (head index out of range, or the used ring
    /// is not in guest memory).
    #[error("cannot put descriptor chain {head} in the used ring")]
    AddUsed {
        /// Head index of the chain, as the driver wrote it in the available ring.
        head: u16,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// Notification suppression (`used.flags`, `avail_event`) or the notification decision
    /// (`used_event`) failed.
    #[error("cannot update or read the notification suppression fields")]
    Notification(#[source] virtio_queue::Error),
}

/// Takes the next available chain, if any.
pub(crate) fn pop<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
) -> Result<Option<DescriptorChain<&'m M>>, NetQueueError> {
    Ok(queue.iter(mem).map_err(NetQueueError::AvailRing)?.next())
}

/// Whether the driver has made chains available that the device has not taken yet.
pub(crate) fn has_available<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, NetQueueError> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(NetQueueError::AvailRing)?;
    Ok(avail.0 != queue.next_avail())
}

pub(crate) fn add_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<(), NetQueueError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| NetQueueError::AddUsed { head, source })
}

pub(crate) fn disable_notification<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<(), NetQueueError> {
    queue
        .disable_notification(mem)
        .map_err(NetQueueError::Notification)
}

/// Enables driver notifications again; true if chains were added meanwhile (the caller must
/// look at the queue again instead of waiting for a notification).
pub(crate) fn enable_notification<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, NetQueueError> {
    queue
        .enable_notification(mem)
        .map_err(NetQueueError::Notification)
}

pub(crate) fn needs_notification<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, NetQueueError> {
    virtio_chain::needs_notification(queue, mem).map_err(NetQueueError::Notification)
}
