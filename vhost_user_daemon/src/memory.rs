//! Guest memory and rings as the backend crate shares them with a daemon's backend.

use std::io;
use std::sync::{Mutex, PoisonError};

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Guest memory as the backend crate shares it: the frontend's regions, replaced as a whole on
/// every `SET_MEM_TABLE`. `B` is the dirty-page bitmap (`()`: no dirty logging).
pub type GuestMemory<B = ()> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

pub use crate::vring::Vring;

/// A backend's view of guest memory: what the crate last handed over (`update_memory`).
#[derive(Debug)]
pub struct MemorySlot<B: Bitmap + 'static = ()>(Mutex<GuestMemory<B>>);

impl<B: Bitmap + 'static> MemorySlot<B> {
    /// Starts with `mem` (the object the daemon was created with).
    pub fn new(mem: GuestMemory<B>) -> Self {
        MemorySlot(Mutex::new(mem))
    }

    /// The memory to serve a request with.
    pub fn current(&self) -> GuestMemory<B> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What `VhostUserBackend::update_memory` does with the crate's new memory.
    ///
    /// A region that extends past the end of its file (a frontend's memory table larger than
    /// the memfd it sent) is refused: touching it would kill the daemon with `SIGBUS`. The
    /// crate has already installed the new table by then, so the memory is emptied (the rings
    /// see no guest memory until a valid table arrives) and the error goes back to the
    /// frontend.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for such a table.
    pub fn replace(&self, mem: GuestMemory<B>) -> io::Result<()> {
        if let Err(e) = check_regions(&mem.memory()) {
            mem.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace(GuestMemoryMmap::<B>::new());
            *self.0.lock().unwrap_or_else(PoisonError::into_inner) = mem;
            return Err(e);
        }
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }
}

/// Checks that every file-backed region lies inside its file.
fn check_regions<B: Bitmap + 'static>(mem: &GuestMemoryMmap<B>) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let file_len = fo.file().metadata()?.len();
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at {:#x} of {:#x} bytes (file offset {:#x}) extends past the end of its {file_len}-byte file",
                    region.start_addr().0,
                    region.len(),
                    fo.start()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: a valid C string; the descriptor is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn table(file_len: u64, offset: u64, size: usize) -> GuestMemory {
        let region = MmapRegion::from_file(FileOffset::new(memfd(file_len), offset), size).unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        GuestMemoryAtomic::new(GuestMemoryMmap::from_regions(vec![region]).unwrap())
    }

    /// Found by the `vhost_user_block` and `vhost_user_net` fuzz targets: a `SET_MEM_TABLE`
    /// whose region is larger than the memfd that came with it was mapped as given, and the
    /// next `SET_VRING_ADDR` read the used ring past the end of the file: `SIGBUS`.
    #[test]
    fn a_region_past_the_end_of_its_file_is_refused_and_leaves_no_memory() {
        let slot = MemorySlot::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()));
        let good = table(0x2000, 0, 0x2000);
        slot.replace(good).unwrap();
        assert_eq!(slot.current().memory().num_regions(), 1);
        for bad in [table(0x1000, 0, 0x2000), table(0x2000, 0x1000, 0x2000)] {
            let crate_view = bad.clone();
            let err = slot.replace(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(crate_view.memory().num_regions(), 0);
            assert_eq!(slot.current().memory().num_regions(), 0);
        }
    }
}
