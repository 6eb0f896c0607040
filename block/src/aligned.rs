//! A zero-initialised heap buffer with a chosen alignment, for `O_DIRECT` I/O.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuffer`]: a page, which satisfies the memory alignment any
/// Linux `O_DIRECT` implementation asks for.
pub(crate) const BUFFER_ALIGN: usize = 4096;

/// An owned, zero-initialised, page-aligned byte buffer.
pub(crate) struct AlignedBuffer {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a `Vec<u8>`.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access only hands out `&[u8]`, like a `Vec<u8>`.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// Allocates `len` zero bytes aligned to [`BUFFER_ALIGN`].
    ///
    /// Aborts through [`alloc::handle_alloc_error`] when memory is exhausted, as `Vec` does.
    pub(crate) fn new(len: usize) -> Self {
        // Never allocate zero bytes (undefined for `alloc`); round up to whole pages.
        let size = len.max(1).next_multiple_of(BUFFER_ALIGN);
        let layout = match Layout::from_size_align(size, BUFFER_ALIGN) {
            Ok(l) => l,
            // Only reachable for sizes near `isize::MAX`, which callers never ask for.
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuffer { ptr, len, layout }
    }

    /// The buffer's bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed) bytes owned by
        // `self`, borrowed immutably for the returned lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer's bytes, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

thread_local! {
    /// Each I/O thread's bounce buffer, kept between requests: allocating, zeroing and
    /// unmapping a fresh 1 MiB buffer per request cost ~80% of a large read's time.
    static BOUNCE: std::cell::RefCell<Option<AlignedBuffer>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's page-aligned bounce buffer of at least `len` bytes (`f` sees
/// exactly `len`). Its contents are whatever the previous request left: callers only hand on
/// bytes they filled themselves.
pub(crate) fn with_bounce_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let buf = match slot.take() {
            Some(b) if b.len >= len => b,
            _ => AlignedBuffer::new(len),
        };
        let buf = slot.insert(buf);
        f(&mut buf.as_mut_slice()[..len])
    })
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuffer")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuffer::new(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % BUFFER_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            assert!(b.as_slice().iter().all(|&x| x == 7));
        }
    }
}
