//! Draining a queue: the loop every device runs over its available ring, and the errors that
//! break a queue.
//!
//! [`drain`] takes the available chains one by one, hands each to the device and puts it in
//! the used ring with the length the device returns; [`QueueDrain`] is the same loop for a
//! device that decides itself when to stop taking chains (input that runs out). Both keep
//! driver notifications suppressed while they work, enable them again when the ring is empty
//! (looking once more, so a chain added meanwhile is not missed; with `EVENT_IDX` this
//! publishes `avail_event`), stop at a budget of chains, and decide whether the driver wants
//! an interrupt ([`needs_notification`](crate::needs_notification)).
//!
//! The single steps ([`pop`], [`add_used`], ...) are here for paths that need another order
//! (virtio-net's receive path), with the same errors.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

/// Errors that leave a queue unusable until the driver resets the device.
///
/// The device should set `DEVICE_NEEDS_RESET` and raise a configuration change interrupt.
/// Chains completed before the error are already in the used ring.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
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
///
/// # Errors
///
/// [`QueueError::AvailRing`].
pub fn pop<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
) -> Result<Option<DescriptorChain<&'m M>>, QueueError> {
    Ok(queue.iter(mem).map_err(QueueError::AvailRing)?.next())
}

/// Whether the driver has made chains available that the device has not taken yet.
///
/// # Errors
///
/// [`QueueError::AvailRing`].
pub fn has_available<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, QueueError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueError::AvailRing)?;
    Ok(avail.0 != queue.next_avail())
}

/// Puts chain `head` in the used ring with `len` bytes written.
///
/// # Errors
///
/// [`QueueError::AddUsed`].
pub fn add_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| QueueError::AddUsed { head, source })
}

/// Asks the driver not to notify the queue.
///
/// # Errors
///
/// [`QueueError::Notification`].
pub fn disable_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<(), QueueError> {
    queue
        .disable_notification(mem)
        .map_err(QueueError::Notification)
}

/// Enables driver notifications again; true if chains were added meanwhile (the caller must
/// look at the queue again instead of waiting for a notification).
///
/// # Errors
///
/// [`QueueError::Notification`].
pub fn enable_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, QueueError> {
    queue
        .enable_notification(mem)
        .map_err(QueueError::Notification)
}

/// Whether the driver wants an interrupt for the chains just used
/// ([`crate::needs_notification`]).
///
/// # Errors
///
/// [`QueueError::Notification`].
pub fn needs_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, QueueError> {
    crate::needs_notification(queue, mem).map_err(QueueError::Notification)
}

/// What a drain did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Chains put in the used ring.
    pub completed: usize,
    /// The driver must be notified (honours `EVENT_IDX` and `VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub needs_notification: bool,
    /// The drain stopped at its budget with chains still available, and driver notifications
    /// are still suppressed: drain again before waiting for a notification, which will not
    /// come for those chains.
    pub more_pending: bool,
}

/// Serves up to `max_chains` (at least one) available chains of `queue`: `serve` gets each
/// chain and returns how many bytes it wrote into it, and the chain goes to the used ring
/// with that length. A chain the device cannot use is the device's to report; it returns it
/// with length 0 and the drain goes on.
///
/// Each chain is bounded work (its walk ends at the queue size, and an available index more
/// than a queue size ahead is an error); the drain returns once the ring is empty with driver
/// notifications enabled again, or at the budget with chains left
/// ([`Drained::more_pending`]).
///
/// # Errors
///
/// A [`QueueError`] when the queue itself is broken.
///
/// # Example
///
/// ```
/// use virtio_chain::queue::drain;
/// use virtio_chain::testing::{Buf, TestDriver};
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let mut driver = TestDriver::new(&mem, 16, 0, 0x10000);
/// let reply = driver.alloc(8, 0);
/// driver.add_chain(&[Buf::w(reply, 8)]);
/// driver.add_chain(&[Buf::w(reply, 8)]);
///
/// let mut queue = driver.queue(false);
/// let done = drain(&mut queue, &mem, 64, |_chain| 8).unwrap();
/// assert_eq!((done.completed, done.needs_notification, done.more_pending), (2, true, false));
/// assert_eq!(driver.take_used(), vec![(0, 8), (1, 8)]);
/// ```
pub fn drain<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    max_chains: usize,
    mut serve: impl FnMut(DescriptorChain<&M>) -> u32,
) -> Result<Drained, QueueError> {
    let mut drain = QueueDrain::new(queue, mem, max_chains);
    while let Some(chain) = drain.next_chain()? {
        let head = chain.head_index();
        let len = serve(chain);
        drain.complete(head, len)?;
    }
    drain.finish()
}

/// [`drain`] driven by the device: it takes chains with [`QueueDrain::next_chain`] while it
/// has something for them, completes each with [`QueueDrain::complete`], and ends with
/// [`QueueDrain::finish`], which enables driver notifications again if the device stopped
/// early.
#[derive(Debug)]
pub struct QueueDrain<'q, 'm, M> {
    queue: &'q mut Queue,
    mem: &'m M,
    budget: usize,
    completed: usize,
    /// Driver notifications are disabled.
    suppressed: bool,
    /// No more chains: the ring was empty with notifications enabled, or the budget ran out.
    done: bool,
    more_pending: bool,
}

impl<'q, 'm, M: GuestMemory> QueueDrain<'q, 'm, M> {
    /// A drain of up to `max_chains` (at least one) chains of `queue`.
    pub fn new(queue: &'q mut Queue, mem: &'m M, max_chains: usize) -> Self {
        QueueDrain {
            queue,
            mem,
            budget: max_chains.max(1),
            completed: 0,
            suppressed: false,
            done: false,
            more_pending: false,
        }
    }

    /// The next available chain; `None` once the ring is empty (notifications are then
    /// enabled again) or the budget is spent.
    ///
    /// # Errors
    ///
    /// A [`QueueError`] when the queue is broken.
    pub fn next_chain(&mut self) -> Result<Option<DescriptorChain<&'m M>>, QueueError> {
        while !self.done {
            if !self.suppressed {
                disable_notification(self.queue, self.mem)?;
                self.suppressed = true;
            }
            if self.completed < self.budget {
                if let Some(chain) = pop(self.queue, self.mem)? {
                    return Ok(Some(chain));
                }
            } else if has_available(self.queue, self.mem)? {
                // Notifications stay off: the caller comes back for these.
                self.more_pending = true;
                self.done = true;
                break;
            }
            self.suppressed = false;
            // Chains added between the last look and the re-enabling: look again.
            self.done = !enable_notification(self.queue, self.mem)?;
        }
        Ok(None)
    }

    /// Puts chain `head` (taken with [`QueueDrain::next_chain`]) in the used ring with `len`
    /// bytes written.
    ///
    /// # Errors
    ///
    /// [`QueueError::AddUsed`].
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        add_used(self.queue, self.mem, head, len)?;
        self.completed += 1;
        Ok(())
    }

    /// Ends the drain: enables driver notifications again if the device stopped taking chains
    /// before the ring was empty (the chains left wait for the device's next drain), and
    /// decides whether the driver wants an interrupt.
    ///
    /// # Errors
    ///
    /// A [`QueueError`] when the queue is broken.
    pub fn finish(self) -> Result<Drained, QueueError> {
        if self.suppressed && !self.more_pending {
            enable_notification(self.queue, self.mem)?;
        }
        let needs_notification = self.completed > 0 && needs_notification(self.queue, self.mem)?;
        Ok(Drained {
            completed: self.completed,
            needs_notification,
            more_pending: self.more_pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::testing::{Buf, TestDriver};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem")
    }

    /// `VIRTQ_USED_F_NO_NOTIFY` is set in the used ring's flags.
    fn suppressed(driver: &TestDriver) -> bool {
        driver.used_flags() & 1 != 0
    }

    #[test]
    fn a_budget_leaves_the_rest_pending_with_notifications_off() {
        let mem = mem();
        let mut driver = TestDriver::new(&mem, 16, 0x1000, 0x8000);
        let buf = driver.alloc(16, 0);
        for _ in 0..5 {
            driver.add_chain(&[Buf::r(buf, 16)]);
        }
        let mut queue = driver.queue(false);
        let done = drain(&mut queue, &mem, 2, |_| 0).expect("drain");
        assert_eq!((done.completed, done.more_pending), (2, true));
        assert!(suppressed(&driver));
        let done = drain(&mut queue, &mem, 2, |_| 0).expect("drain");
        assert_eq!((done.completed, done.more_pending), (2, true));
        let done = drain(&mut queue, &mem, 2, |_| 0).expect("drain");
        assert_eq!((done.completed, done.more_pending), (1, false));
        assert!(!suppressed(&driver));
        // A budget spent exactly on the last chain is not "more pending".
        driver.add_chain(&[Buf::r(buf, 16)]);
        let done = drain(&mut queue, &mem, 1, |_| 0).expect("drain");
        assert_eq!((done.completed, done.more_pending), (1, false));
        assert!(!suppressed(&driver));
        // Nothing used: no interrupt.
        let done = drain(&mut queue, &mem, 1, |_| 0).expect("drain");
        assert_eq!(done, Drained::default());
    }

    #[test]
    fn a_device_that_stops_early_gets_notifications_back() {
        let mem = mem();
        let mut driver = TestDriver::new(&mem, 16, 0x1000, 0x8000);
        let buf = driver.alloc(16, 0);
        for _ in 0..3 {
            driver.add_chain(&[Buf::w(buf, 16)]);
        }
        let mut queue = driver.queue(false);
        let mut d = QueueDrain::new(&mut queue, &mem, usize::MAX);
        let chain = d.next_chain().expect("chain").expect("available");
        d.complete(chain.head_index(), 4).expect("used");
        let done = d.finish().expect("finish");
        assert_eq!(done.completed, 1);
        assert!(done.needs_notification && !done.more_pending);
        assert!(!suppressed(&driver));
        assert_eq!(driver.take_used(), vec![(0, 4)]);
        // The other two wait for the next drain.
        assert_eq!(
            drain(&mut queue, &mem, 8, |_| 0).expect("drain").completed,
            2
        );
    }

    #[test]
    fn a_broken_ring_is_an_error() {
        let mem = mem();
        let mut driver = TestDriver::new(&mem, 16, 0x1000, 0x8000);
        driver.push_avail(100);
        let mut queue = driver.queue(false);
        let err = drain(&mut queue, &mem, 8, |_| 0).expect_err("head out of range");
        assert!(
            matches!(err, QueueError::AddUsed { head: 100, .. }),
            "{err:?}"
        );
    }
}
