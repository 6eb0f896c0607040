//! Whether the driver wants an interrupt for used buffers.
//!
//! virtio-queue 0.18's `needs_notification` answers from the used-event index when EVENT_IDX
//! is negotiated, but without EVENT_IDX it always answers yes: it ignores the driver's
//! `VIRTQ_AVAIL_F_NO_INTERRUPT` flag, which the spec says a device should honour (virtio 1.2
//! section 2.7.7.2). Interrupts a driver asked not to get cost it an interrupt entry each (an
//! emulated one on PVM hosts), so devices use this instead.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// True when the driver should be interrupted for the buffers just used.
pub fn needs_notification<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    // The available ring starts with its flags (le16).
    let flags: u16 = mem
        .read_obj::<u16>(GuestAddress(queue.avail_ring()))
        .map(u16::from_le)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::testing::TestDriver;

    #[test]
    fn honours_no_interrupt_without_event_idx() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let driver = TestDriver::new(&mem, 8, 0x1000, 0x1_0000);
        let mut q = driver.queue(false);
        assert_eq!(needs_notification(&mut q, &mem).ok(), Some(true));
        mem.write_obj(
            VIRTQ_AVAIL_F_NO_INTERRUPT.to_le(),
            GuestAddress(q.avail_ring()),
        )
        .expect("flags");
        assert_eq!(needs_notification(&mut q, &mem).ok(), Some(false));
    }
}
