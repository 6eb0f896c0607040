//! Guest bytes waiting for a slow host socket: a fixed-size ring in an anonymous mapping of
//! its own.
//!
//! Not on the heap on purpose: the vsock thread runs under a filter without `openat`, and
//! glibc reads `/proc/sys/vm/overcommit_memory` the first time a thread's arena shrinks after
//! a large buffer is freed. A mapping made and unmapped by the thread never does.

use std::io;
use std::ptr::NonNull;

/// A byte ring of fixed capacity.
#[derive(Debug)]
pub struct Ring {
    base: NonNull<u8>,
    cap: usize,
    head: usize,
    len: usize,
}

// SAFETY: the ring owns its mapping exclusively; moving it to another thread moves that
// ownership.
unsafe impl Send for Ring {}

impl Ring {
    /// A ring of `cap` (> 0) bytes.
    ///
    /// # Errors
    /// When the mapping fails.
    pub fn new(cap: usize) -> io::Result<Self> {
        if cap == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty ring"));
        }
        // SAFETY: an anonymous private mapping at an address the kernel picks; the result is
        // checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("null mapping"))?;
        Ok(Self {
            base,
            cap,
            head: 0,
            len: 0,
        })
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slice(&self) -> &[u8] {
        // SAFETY: the mapping is `cap` bytes, readable and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.cap) }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.cap) }
    }

    /// Appends `data`; false (and nothing appended) when it does not fit.
    pub fn push(&mut self, data: &[u8]) -> bool {
        if data.len() > self.cap - self.len {
            return false;
        }
        let (cap, tail) = (self.cap, (self.head + self.len) % self.cap);
        let first = data.len().min(cap - tail);
        let buf = self.slice_mut();
        buf[tail..tail + first].copy_from_slice(&data[..first]);
        buf[..data.len() - first].copy_from_slice(&data[first..]);
        self.len += data.len();
        true
    }

    /// The oldest bytes, as one contiguous piece (the rest follows after [`Ring::consume`]).
    pub fn front(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.cap);
        &self.slice()[self.head..end]
    }

    /// Drops the `n` oldest bytes.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head = (self.head + n) % self.cap;
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and is not used afterwards.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.cap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let mut r = Ring::new(10).expect("ring");
        assert!(r.push(b"abcdefg"));
        assert!(!r.push(b"xyzw"), "past the capacity");
        assert_eq!(r.front(), b"abcdefg");
        r.consume(5);
        assert!(r.push(b"hijkl"));
        assert_eq!(r.len(), 7);
        let mut out = Vec::new();
        while !r.is_empty() {
            let n = r.front().len().min(3);
            out.extend_from_slice(&r.front()[..n]);
            r.consume(n);
        }
        assert_eq!(out, b"fghijkl");
    }
}
