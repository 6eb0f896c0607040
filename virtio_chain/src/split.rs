//! Splitting a descriptor chain into its device-readable and device-writable parts.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions};

use crate::sg::SgList;

/// Why a descriptor chain is not usable; it goes back to the used ring with length 0.
///
/// [`split`] reports the first four variants; the others are for the checks a device makes on
/// the parts it got (direction, length, contents).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain yielded no descriptor (head index out of range, unreadable descriptor table,
    /// or an invalid indirect table).
    #[error("descriptor chain is empty or its head is invalid")]
    Empty,
    /// The chain stopped while its last descriptor still had `NEXT` set: a loop, a chain longer
    /// than the queue, a `next` index out of range, an unreadable descriptor, a bad indirect
    /// table, or more than 4 GiB in total.
    #[error("descriptor chain is cut short after {descriptors} descriptors")]
    Truncated {
        /// Descriptors read before the chain stopped.
        descriptors: usize,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor {index} follows a device-writable one")]
    ReadableAfterWritable {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A descriptor's buffer is not entirely inside guest memory.
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is outside guest memory")]
    OutsideMemory {
        /// Position of the descriptor in the chain.
        index: usize,
        /// Guest address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// The chain has buffers of a direction its queue does not allow (device-writable ones on
    /// a transmit or control queue, device-readable ones on a receive queue).
    #[error("descriptor chain has {0} buffers the queue does not allow")]
    WrongDirection(&'static str),
    /// The chain is shorter than its contents need.
    #[error("{what} is {len} bytes, shorter than {min}")]
    TooShort {
        /// What was measured.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The minimum.
        min: u64,
    },
    /// Guest memory refused an access to a buffer that was inside it when the chain was
    /// split (memory changed meanwhile).
    #[error("guest memory refused the access to the buffers")]
    MemoryAccess,
    /// The chain is longer than the device accepts.
    #[error("packet of {len} bytes is longer than {max}")]
    TooLong {
        /// The length that was measured.
        len: u64,
        /// The maximum.
        max: u64,
    },
}

/// A chain that was not usable; it went to the used ring with length 0.
///
/// `E` is the device's error type when it has its own (virtio-blk's request errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedChain<E = ChainError> {
    /// Head index of the chain.
    pub head: u16,
    /// What was wrong with it.
    pub error: E,
}

/// A descriptor chain split into its device-readable and device-writable parts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// The device-readable buffers, in chain order.
    pub readable: SgList,
    /// The device-writable buffers, in chain order.
    pub writable: SgList,
    /// Descriptors in the chain, zero-length ones included (an indirect chain's table entries,
    /// not the descriptor pointing at the table).
    pub descriptors: usize,
}

/// Walks every descriptor of `chain` (consuming its iterator) and splits the buffers into the
/// device-readable and the device-writable part.
///
/// Each buffer is checked to lie inside guest memory, and no device-readable descriptor may
/// follow a device-writable one: a zero-length descriptor carries no byte and is left out of
/// the parts, but its `WRITE` flag still counts for that order. The walk is bounded: the chain
/// iterator stops at the queue (or indirect table) size and at 4 GiB.
///
/// # Errors
///
/// [`ChainError::Empty`], [`ChainError::Truncated`], [`ChainError::ReadableAfterWritable`] or
/// [`ChainError::OutsideMemory`].
pub fn split<M>(chain: &mut DescriptorChain<M>) -> Result<Split, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut split = Split::default();
    let mut last_has_next = false;
    let mut seen_writable = false;
    // Not a `for` loop: the body needs `chain.memory()`.
    #[allow(clippy::while_let_on_iterator)]
    while let Some(desc) = chain.next() {
        let index = split.descriptors;
        split.descriptors += 1;
        last_has_next = desc.has_next();
        let writable = desc.is_write_only();
        if writable {
            seen_writable = true;
        } else if seen_writable {
            return Err(ChainError::ReadableAfterWritable { index });
        }
        if desc.len() == 0 {
            continue;
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !chain
            .memory()
            .check_range(desc.addr(), desc.len() as usize, access)
        {
            return Err(ChainError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        if writable {
            split.writable.push(desc.addr(), desc.len());
        } else {
            split.readable.push(desc.addr(), desc.len());
        }
    }
    if split.descriptors == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated {
            descriptors: split.descriptors,
        });
    }
    Ok(split)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{Buf, TestDriver};
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Guest memory with one queue; `next` splits the chain the driver made available next.
    struct Guest {
        mem: GuestMemoryMmap,
        queue: Queue,
        drv: TestDriver,
    }

    impl Guest {
        fn new() -> Self {
            let size = MEM_SIZE as usize;
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
            let drv = TestDriver::new(&mem, QSIZE, 0, MEM_SIZE);
            Guest {
                queue: drv.queue(false),
                mem,
                drv,
            }
        }

        fn next(&mut self) -> Result<Split, ChainError> {
            let mut chain = self.queue.iter(&self.mem).unwrap().next().unwrap();
            split(&mut chain)
        }
    }

    const MEM_SIZE: u64 = 0x10_0000;
    const QSIZE: u16 = 16;

    fn ranges(list: &SgList) -> Vec<(u64, u32)> {
        list.segments().iter().map(|&(a, l)| (a.0, l)).collect()
    }

    #[test]
    fn parts_in_order_without_empty_descriptors() {
        let mut s = Guest::new();
        let (a, b, c) = (s.drv.alloc(10, 0), s.drv.alloc(20, 0), s.drv.alloc(30, 0));
        s.drv.add_chain(&[
            Buf::r(a, 10),
            Buf::r(0, 0),
            Buf::r(b, 5),
            Buf::w(b + 5, 15),
            Buf::w(0, 0),
            Buf::w(c, 30),
        ]);
        let parts = s.next().unwrap();
        assert_eq!(parts.descriptors, 6);
        assert_eq!(ranges(&parts.readable), vec![(a, 10), (b, 5)]);
        assert_eq!(ranges(&parts.writable), vec![(b + 5, 15), (c, 30)]);
        assert_eq!((parts.readable.len(), parts.writable.len()), (15, 45));
    }

    #[test]
    fn indirect_chain() {
        let mut s = Guest::new();
        let (a, b) = (s.drv.alloc(16, 0), s.drv.alloc(16, 0));
        s.drv
            .add_indirect_chain(&[Buf::r(a, 16), Buf::w(b, 8), Buf::w(b + 8, 8)]);
        let parts = s.next().unwrap();
        assert_eq!(parts.descriptors, 3);
        assert_eq!(ranges(&parts.readable), vec![(a, 16)]);
        assert_eq!(parts.writable.len(), 16);
    }

    #[test]
    fn readable_after_writable() {
        let mut s = Guest::new();
        let a = s.drv.alloc(16, 0);
        s.drv
            .add_chain(&[Buf::r(a, 4), Buf::w(a + 4, 4), Buf::r(a + 8, 4)]);
        assert_eq!(
            s.next(),
            Err(ChainError::ReadableAfterWritable { index: 2 })
        );
        // An empty writable descriptor carries no byte but still ends the readable part.
        s.drv.add_chain(&[Buf::w(a, 0), Buf::r(a, 4)]);
        assert_eq!(
            s.next(),
            Err(ChainError::ReadableAfterWritable { index: 1 })
        );
    }

    #[test]
    fn outside_memory() {
        let mut s = Guest::new();
        let a = s.drv.alloc(16, 0);
        for (index, bufs) in [
            (1, [Buf::r(a, 16), Buf::w(MEM_SIZE - 8, 16)]),
            (0, [Buf::r(u64::MAX - 4, 16), Buf::w(a, 16)]),
            (1, [Buf::r(a, 16), Buf::w(0x1000, 0x8000_0000)]),
        ] {
            let (addr, len) = (bufs[index].addr, bufs[index].len);
            s.drv.add_chain(&bufs);
            assert_eq!(
                s.next(),
                Err(ChainError::OutsideMemory { index, addr, len })
            );
        }
    }

    #[test]
    fn loops_and_bad_next_are_truncated() {
        let mut s = Guest::new();
        let a = s.drv.alloc(16, 0);
        let next = VRING_DESC_F_NEXT as u16;
        // 0 -> 1 -> 0 -> ...
        s.drv.store_desc(0, a, 16, next, 1);
        s.drv.store_desc(1, a, 16, next, 0);
        s.drv.push_avail(0);
        assert_eq!(
            s.next(),
            Err(ChainError::Truncated {
                descriptors: usize::from(QSIZE)
            })
        );
        // A `next` index past the table.
        s.drv.store_desc(2, a, 16, next, 200);
        s.drv.push_avail(2);
        assert_eq!(s.next(), Err(ChainError::Truncated { descriptors: 1 }));
    }

    #[test]
    fn head_out_of_range_is_empty() {
        let mut s = Guest::new();
        s.drv.push_avail(QSIZE + 3);
        assert_eq!(s.next(), Err(ChainError::Empty));
    }
}
