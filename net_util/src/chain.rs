//! Descriptor chains checked against guest memory and seen as lists of ranges.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Why a descriptor chain is not usable; it goes back to the used ring with length 0.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain yielded no descriptor (head index out of range, unreadable descriptor table,
    /// or an invalid indirect table).
    #[error("descriptor chain is empty or its head is invalid")]
    Empty,
    /// The chain stopped while its last descriptor still had `NEXT` set: a loop, a chain longer
    /// than the queue, a `next` index out of range, a bad indirect table, or more than 4 GiB.
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
    /// A transmit or control chain has device-writable buffers where only readable ones
    /// belong, or a receive chain has device-readable ones.
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
    /// parsed (memory changed meanwhile).
    #[error("guest memory refused the access to the buffers")]
    MemoryAccess,
    /// A transmit chain is longer than the largest packet.
    #[error("packet of {len} bytes is longer than {max}")]
    TooLong {
        /// The chain's device-readable length.
        len: u64,
        /// The maximum (`VNET_HDR_LEN + MAX_FRAME_LEN`).
        max: u64,
    },
}

/// A chain that was not usable; it went to the used ring with length 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedChain {
    /// Head index of the chain.
    pub head: u16,
    /// What was wrong with it.
    pub error: ChainError,
}

/// Guest memory ranges (from descriptors), each checked to lie in guest memory, seen as one
/// byte stream. Accesses still go through the checked [`Bytes`] API.
#[derive(Clone, Debug, Default)]
pub(crate) struct Segments {
    ranges: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Segments {
    fn push(&mut self, addr: GuestAddress, len: u32) {
        self.ranges.push((addr, len));
        self.len += u64::from(len);
    }

    /// Total length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the first `out.len()` bytes of the stream into `out`.
    pub(crate) fn read_into<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        out: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0usize;
        for &(addr, len) in &self.ranges {
            if done == out.len() {
                break;
            }
            let n = (len as usize).min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], addr)?;
            done += n;
        }
        if done < out.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: out.len(),
                completed: done,
            });
        }
        Ok(())
    }

    /// Copies as much of `data` as fits into the stream, from its start; returns the number of
    /// bytes written (fewer than fit only if guest memory refused a write).
    pub(crate) fn write_from<M: GuestMemory + ?Sized>(&self, mem: &M, data: &[u8]) -> usize {
        let mut done = 0usize;
        for &(addr, len) in &self.ranges {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            if mem.write_slice(&data[done..done + n], addr).is_err() {
                break;
            }
            done += n;
        }
        done
    }
}

/// A descriptor chain split into its device-readable and device-writable parts.
#[derive(Clone, Debug)]
pub(crate) struct ParsedChain {
    pub(crate) readable: Segments,
    pub(crate) writable: Segments,
}

/// Walks every descriptor of `chain`, checking each buffer lies in guest memory and that no
/// readable buffer follows a writable one. Zero-length descriptors are skipped. Bounded: the
/// chain iterator stops at the queue (or indirect table) size and at 4 GiB.
pub(crate) fn parse<M>(mut chain: DescriptorChain<M>) -> Result<ParsedChain, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut parsed = ParsedChain {
        readable: Segments::default(),
        writable: Segments::default(),
    };
    let mut count = 0usize;
    let mut last_has_next = false;
    while let Some(desc) = chain.next() {
        let index = count;
        count += 1;
        last_has_next = desc.has_next();
        let writable = desc.is_write_only();
        if !writable && !parsed.writable.is_empty() {
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
            parsed.writable.push(desc.addr(), desc.len());
        } else {
            parsed.readable.push(desc.addr(), desc.len());
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated { descriptors: count });
    }
    Ok(parsed)
}
