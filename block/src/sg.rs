//! A list of guest memory ranges read or written as one byte stream.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Guest memory ranges (from descriptors) seen as one contiguous byte stream.
///
/// Every range was checked against guest memory when the list was built; accesses still go
/// through the checked [`Bytes`] API, so a stale list cannot reach outside guest memory.
#[derive(Clone, Debug, Default)]
pub(crate) struct SgList {
    segments: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl SgList {
    /// Appends a range of `len > 0` bytes.
    pub(crate) fn push(&mut self, addr: GuestAddress, len: u32) {
        debug_assert!(len > 0);
        self.segments.push((addr, len));
        self.len += u64::from(len);
    }

    /// Total length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Removes the last byte of the stream and returns its address, or `None` if empty.
    pub(crate) fn pop_last_byte(&mut self) -> Option<GuestAddress> {
        let (addr, len) = self.segments.last_mut()?;
        let last = addr.checked_add(u64::from(*len) - 1)?;
        *len -= 1;
        if *len == 0 {
            self.segments.pop();
        }
        self.len -= 1;
        Some(last)
    }

    /// A cursor at the start of the stream.
    pub(crate) fn cursor(&self) -> SgCursor<'_> {
        SgCursor {
            list: self,
            index: 0,
            offset: 0,
            consumed: 0,
        }
    }
}

/// Errors of [`SgCursor`] accesses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SgError {
    /// The access runs past the end of the list.
    #[error("access past the end of the descriptor buffers")]
    PastEnd,
    /// Guest memory refused the access.
    #[error("guest memory access failed")]
    Memory(#[source] GuestMemoryError),
}

/// A position in an [`SgList`] that advances as bytes are read or written.
#[derive(Debug)]
pub(crate) struct SgCursor<'a> {
    list: &'a SgList,
    index: usize,
    offset: u32,
    /// Bytes before the cursor.
    consumed: u64,
}

impl SgCursor<'_> {
    /// Calls `f(address, length)` for consecutive pieces covering the next `total` bytes, then
    /// advances past them. Fails without calling `f` if fewer than `total` bytes remain.
    fn walk(
        &mut self,
        total: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), GuestMemoryError>,
    ) -> Result<(), SgError> {
        let mut done = 0usize;
        let (mut index, mut offset) = (self.index, self.offset);
        while done < total {
            let Some(&(addr, len)) = self.list.segments.get(index) else {
                return Err(SgError::PastEnd);
            };
            let here = (len - offset) as usize;
            let n = here.min(total - done);
            // `offset < len` and the whole segment was range-checked, so this cannot overflow
            // in practice; fail cleanly if it ever does.
            let start = addr
                .checked_add(u64::from(offset))
                .ok_or(SgError::PastEnd)?;
            f(start, done, n).map_err(SgError::Memory)?;
            done += n;
            // `n <= here <= len - offset`, so this fits in u32.
            offset += n as u32;
            if offset == len {
                index += 1;
                offset = 0;
            }
        }
        self.index = index;
        self.offset = offset;
        self.consumed += total as u64;
        Ok(())
    }

    /// Number of bytes between the cursor and the end of the list.
    pub(crate) fn remaining(&self) -> u64 {
        self.list.len - self.consumed
    }

    /// Copies the next `buf.len()` bytes of the stream from guest memory into `buf`.
    pub(crate) fn read<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), SgError> {
        if (buf.len() as u64) > self.remaining() {
            return Err(SgError::PastEnd);
        }
        self.walk(buf.len(), |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Copies `buf` into the next `buf.len()` bytes of the stream in guest memory.
    pub(crate) fn write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &[u8],
    ) -> Result<(), SgError> {
        if (buf.len() as u64) > self.remaining() {
            return Err(SgError::PastEnd);
        }
        self.walk(buf.len(), |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)
        })
    }

    /// Moves the cursor `count` bytes forward.
    pub(crate) fn skip(&mut self, count: usize) -> Result<(), SgError> {
        if (count as u64) > self.remaining() {
            return Err(SgError::PastEnd);
        }
        self.walk(count, |_, _, _| Ok(()))
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
        let mut list = SgList::default();
        list.push(GuestAddress(0x1000), 3);
        list.push(GuestAddress(0x2000), 1);
        list.push(GuestAddress(0x3000), 4);
        assert_eq!(list.len(), 8);
        let mut c = list.cursor();
        c.write(&m, &[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(c.remaining(), 3);
        c.write(&m, &[6, 7, 8]).unwrap();
        assert_eq!(c.remaining(), 0);
        assert!(matches!(c.write(&m, &[9]), Err(SgError::PastEnd)));

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
    fn pop_last_byte() {
        let mut list = SgList::default();
        list.push(GuestAddress(0x1000), 2);
        list.push(GuestAddress(0x2000), 1);
        assert_eq!(list.pop_last_byte(), Some(GuestAddress(0x2000)));
        assert_eq!(list.len(), 2);
        assert_eq!(list.pop_last_byte(), Some(GuestAddress(0x1001)));
        assert_eq!(list.pop_last_byte(), Some(GuestAddress(0x1000)));
        assert_eq!(list.pop_last_byte(), None);
        assert_eq!(list.len(), 0);
    }

    #[test]
    fn memory_errors_are_reported() {
        let m = mem();
        let mut list = SgList::default();
        // Not checked at push time here (the parser checks); the access must still fail.
        list.push(GuestAddress(0xfffe), 4);
        let mut buf = [0u8; 4];
        assert!(matches!(
            list.cursor().read(&m, &mut buf),
            Err(SgError::Memory(_))
        ));
    }
}
