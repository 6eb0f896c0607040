//! Scatter-gather lists: guest memory ranges read and written as one byte stream.

use std::ops::Range;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Guest memory ranges (from descriptors) seen as one contiguous byte stream.
///
/// [`split`](crate::split) checks every range against guest memory before pushing it; accesses
/// still go through the checked [`Bytes`] API, so a stale list (guest memory changed since) or
/// one built by hand cannot reach outside guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgList {
    /// Non-empty ranges, in stream order.
    segments: Vec<(GuestAddress, u32)>,
    /// Sum of the range lengths.
    len: u64,
}

impl SgList {
    /// An empty list.
    pub fn new() -> Self {
        SgList::default()
    }

    /// Appends `len` bytes at `addr` to the stream; a zero-length range is ignored.
    pub fn push(&mut self, addr: GuestAddress, len: u32) {
        if len == 0 {
            return;
        }
        self.segments.push((addr, len));
        self.len += u64::from(len);
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the stream has no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ranges as (address, length), in stream order; none is empty.
    pub fn segments(&self) -> &[(GuestAddress, u32)] {
        &self.segments
    }

    /// Removes the last byte of the stream and returns its address, or `None` if the list is
    /// empty (or, for a list built by hand, that byte's address overflows).
    ///
    /// Devices whose requests end with a status byte (virtio-blk, virtio-scsi) take it this way,
    /// whatever descriptor it is in.
    pub fn pop_last_byte(&mut self) -> Option<GuestAddress> {
        let (addr, len) = self.segments.last_mut()?;
        // Segments are never empty, so `len - 1` cannot underflow.
        let last = addr.checked_add(u64::from(*len) - 1)?;
        *len -= 1;
        if *len == 0 {
            self.segments.pop();
        }
        self.len -= 1;
        Some(last)
    }

    /// A cursor at the start of the stream.
    pub fn cursor(&self) -> SgCursor<'_> {
        SgCursor {
            list: self,
            index: 0,
            offset: 0,
            consumed: 0,
        }
    }

    /// Copies the first `out.len()` bytes of the stream into `out`.
    ///
    /// # Errors
    ///
    /// [`SgError::PastEnd`] (and `out` untouched) if the stream is shorter than `out`;
    /// [`SgError::Memory`] if guest memory refuses a read.
    pub fn read_into<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        out: &mut [u8],
    ) -> Result<(), SgError> {
        self.cursor().read(mem, out)
    }

    /// Copies as much of `data` as fits into the stream, from its start, and returns the number
    /// of bytes written: `min(data.len(), self.len())`, or fewer if guest memory refused a
    /// write (the bytes of the ranges before the refused one are written).
    pub fn write_from<M: GuestMemory + ?Sized>(&self, mem: &M, data: &[u8]) -> usize {
        let mut cursor = self.cursor();
        let n = usize::try_from(self.len)
            .unwrap_or(usize::MAX)
            .min(data.len());
        // On a memory error the cursor stops after the pieces written before it.
        let _ = cursor.write(mem, &data[..n]);
        // At most `n`, a `usize`.
        cursor.position() as usize
    }
}

/// Errors of [`SgCursor`] and [`SgList`] accesses.
#[derive(Debug, thiserror::Error)]
pub enum SgError {
    /// The access runs past the end of the stream; nothing was accessed.
    #[error("access of {wanted} bytes runs past the end of the buffers ({remaining} left)")]
    PastEnd {
        /// Bytes the access needed.
        wanted: u64,
        /// Bytes left after the cursor.
        remaining: u64,
    },
    /// Guest memory refused the access to a range.
    #[error("guest memory refused the access at {addr:#x}")]
    Memory {
        /// Guest address of the refused piece.
        addr: u64,
        /// Cause.
        #[source]
        source: GuestMemoryError,
    },
}

/// A position in an [`SgList`] that advances as bytes are read, written or skipped.
#[derive(Clone, Debug)]
pub struct SgCursor<'a> {
    list: &'a SgList,
    /// Segment the cursor is in.
    index: usize,
    /// Offset in that segment, always below its length.
    offset: u32,
    /// Bytes before the cursor.
    consumed: u64,
}

impl SgCursor<'_> {
    /// Bytes between the start of the stream and the cursor.
    pub fn position(&self) -> u64 {
        self.consumed
    }

    /// Bytes between the cursor and the end of the stream.
    pub fn remaining(&self) -> u64 {
        self.list.len - self.consumed
    }

    /// Copies the next `buf.len()` bytes of the stream from guest memory into `buf`.
    ///
    /// # Errors
    ///
    /// [`SgError::PastEnd`], with nothing read and the cursor unmoved, if fewer than
    /// `buf.len()` bytes remain; [`SgError::Memory`] if guest memory refuses a read, with the
    /// cursor after the pieces read before.
    pub fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), SgError> {
        self.walk(buf.len(), |addr, at| mem.read_slice(&mut buf[at], addr))
    }

    /// Copies `buf` into the next `buf.len()` bytes of the stream in guest memory.
    ///
    /// # Errors
    ///
    /// As [`read`](Self::read): nothing is written if the stream is too short.
    pub fn write<M: GuestMemory + ?Sized>(&mut self, mem: &M, buf: &[u8]) -> Result<(), SgError> {
        self.walk(buf.len(), |addr, at| mem.write_slice(&buf[at], addr))
    }

    /// Moves the cursor `count` bytes forward.
    ///
    /// # Errors
    ///
    /// [`SgError::PastEnd`], with the cursor unmoved, if fewer than `count` bytes remain.
    pub fn skip(&mut self, count: usize) -> Result<(), SgError> {
        self.walk(count, |_, _| Ok(()))
    }

    /// Calls `f(address, range)` for consecutive pieces covering the next `total` bytes (`range`
    /// being the piece's place among those bytes), advancing past each piece `f` accepts.
    /// Fails without calling `f` if fewer than `total` bytes remain.
    fn walk(
        &mut self,
        total: usize,
        mut f: impl FnMut(GuestAddress, Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), SgError> {
        let remaining = self.remaining();
        if total as u64 > remaining {
            return Err(SgError::PastEnd {
                wanted: total as u64,
                remaining,
            });
        }
        let mut done = 0usize;
        while done < total {
            let Some(&(addr, len)) = self.list.segments.get(self.index) else {
                // Unreachable: `total` bytes remain, so segments do too.
                return Err(SgError::PastEnd {
                    wanted: (total - done) as u64,
                    remaining: 0,
                });
            };
            let n = ((len - self.offset) as usize).min(total - done);
            // Only a list built by hand can have a range that wraps around.
            let Some(start) = addr.checked_add(u64::from(self.offset)) else {
                return Err(SgError::Memory {
                    addr: addr.0,
                    source: GuestMemoryError::InvalidGuestAddress(addr),
                });
            };
            f(start, done..done + n).map_err(|source| SgError::Memory {
                addr: start.0,
                source,
            })?;
            done += n;
            // `n <= len - offset`, so this fits in u32 and stays within the segment.
            self.offset += n as u32;
            self.consumed += n as u64;
            if self.offset == len {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn stream_across_segments() {
        let m = mem();
        let mut list = SgList::new();
        list.push(GuestAddress(0x1000), 3);
        list.push(GuestAddress(0x2000), 1);
        list.push(GuestAddress(0x3000), 4);
        assert_eq!(list.len(), 8);
        let mut c = list.cursor();
        c.write(&m, &[1, 2, 3, 4, 5]).unwrap();
        assert_eq!((c.position(), c.remaining()), (5, 3));
        c.write(&m, &[6, 7, 8]).unwrap();
        assert_eq!(c.remaining(), 0);
        assert!(matches!(
            c.write(&m, &[9]),
            Err(SgError::PastEnd {
                wanted: 1,
                remaining: 0
            })
        ));

        let mut back = [0u8; 2];
        m.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(back[0], 4);
        m.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert_eq!(back, [5, 6]);

        let mut c = list.cursor();
        c.skip(2).unwrap();
        let mut out = [0u8; 6];
        c.read(&m, &mut out).unwrap();
        assert_eq!(out, [3, 4, 5, 6, 7, 8]);
        assert!(c.skip(1).is_err());
    }

    #[test]
    fn too_long_accesses_touch_nothing() {
        let m = mem();
        m.write_slice(&[0xaa; 4], GuestAddress(0x1000)).unwrap();
        let mut list = SgList::new();
        list.push(GuestAddress(0x1000), 2);
        let mut c = list.cursor();
        assert!(c.write(&m, &[1, 2, 3]).is_err());
        assert_eq!(c.position(), 0);
        let mut back = [0u8; 4];
        m.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, [0xaa; 4]);
        let mut out = [0u8; 3];
        assert!(list.read_into(&m, &mut out).is_err());
        assert_eq!(out, [0; 3]);
    }

    #[test]
    fn push_ignores_empty_ranges() {
        let mut list = SgList::new();
        list.push(GuestAddress(0x1000), 0);
        assert!(list.is_empty());
        assert!(list.segments().is_empty());
        list.push(GuestAddress(0x1000), 2);
        list.push(GuestAddress(0x2000), 0);
        assert_eq!(list.segments(), &[(GuestAddress(0x1000), 2)]);
        assert!(!list.is_empty());
    }

    #[test]
    fn pop_last_byte() {
        let mut list = SgList::new();
        list.push(GuestAddress(0x1000), 2);
        list.push(GuestAddress(0x2000), 1);
        assert_eq!(list.pop_last_byte(), Some(GuestAddress(0x2000)));
        assert_eq!(list.len(), 2);
        assert_eq!(list.pop_last_byte(), Some(GuestAddress(0x1001)));
        assert_eq!(list.pop_last_byte(), Some(GuestAddress(0x1000)));
        assert_eq!(list.pop_last_byte(), None);
        assert_eq!(list.len(), 0);
        assert!(list.is_empty());
    }

    #[test]
    fn read_into_and_write_from() {
        let m = mem();
        let mut list = SgList::new();
        list.push(GuestAddress(0x1000), 3);
        list.push(GuestAddress(0x2000), 3);
        // Longer than the stream: what fits.
        assert_eq!(list.write_from(&m, &[1, 2, 3, 4, 5, 6, 7, 8]), 6);
        // Shorter: only the start.
        assert_eq!(list.write_from(&m, &[9, 9]), 2);
        let mut out = [0u8; 5];
        list.read_into(&m, &mut out).unwrap();
        assert_eq!(out, [9, 9, 3, 4, 5]);
        assert_eq!(list.write_from(&m, &[]), 0);
        assert_eq!(SgList::new().write_from(&m, &[1]), 0);
    }

    #[test]
    fn write_from_stops_at_a_refused_range() {
        let m = mem();
        let mut list = SgList::new();
        list.push(GuestAddress(0x1000), 3);
        // Not checked at push time here (`split` checks); the write must still fail.
        list.push(GuestAddress(0xfffe), 4);
        list.push(GuestAddress(0x2000), 3);
        assert_eq!(list.write_from(&m, &[7; 10]), 3);
    }

    #[test]
    fn memory_errors_are_reported() {
        let m = mem();
        let mut list = SgList::new();
        list.push(GuestAddress(0xfffe), 4);
        let mut buf = [0u8; 4];
        assert!(matches!(
            list.cursor().read(&m, &mut buf),
            Err(SgError::Memory { addr: 0xfffe, .. })
        ));
        // A hand-built range that wraps around the address space.
        let mut list = SgList::new();
        list.push(GuestAddress(u64::MAX), 2);
        let mut c = list.cursor();
        assert!(matches!(
            c.read(&m, &mut buf[..2]),
            Err(SgError::Memory { .. })
        ));
        assert_eq!(list.pop_last_byte(), None);
    }
}
