//! Guest RAM: one mapping per RAM range of the layout, anonymous or memfd-backed (`shared=on`,
//! so vhost-user backends can map it), registered with the hypervisor as memory slots.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use hypervisor::Vm;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use vm_config::MemoryConfig;

/// Guest memory as the rest of the VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The backing file could not be created.
    #[error("cannot create a memfd for {size} bytes of guest RAM")]
    Memfd {
        /// Region size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The backing file could not be sealed against resizing.
    #[error("cannot seal the memfd of {size} bytes of guest RAM against resizing")]
    Seal {
        /// Region size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The mapping failed.
    #[error("cannot map {size} bytes of guest RAM at {addr:#x}{hint}")]
    Map {
        /// Guest address.
        addr: u64,
        /// Region size.
        size: u64,
        /// Advice for the user, if any.
        hint: &'static str,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The region collection was refused (overlap).
    #[error("invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// The hypervisor refused a memory slot.
    #[error("cannot register guest RAM slot {slot} at {addr:#x}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Guest address.
        addr: u64,
        /// Cause.
        #[source]
        source: hypervisor::HypervisorError,
    },
    /// The size does not fit the host's address space.
    #[error("guest RAM region of {0} bytes does not fit this host")]
    TooLarge(u64),
}

/// `memfd_create` flags for huge pages of `page_size` bytes (the host's default size when
/// none is given): the page size's log2 in the flags' upper bits.
fn hugetlb_flags(page_size: Option<u64>) -> libc::c_uint {
    let size_bits = page_size.map_or(0, |s| s.trailing_zeros() << libc::MFD_HUGE_SHIFT);
    libc::MFD_HUGETLB | size_bits
}

/// The memfd behind `size` bytes of guest RAM, sealed at that size (`F_SEAL_SHRINK`,
/// `F_SEAL_GROW`, then `F_SEAL_SEAL`) as QEMU's `memory-backend-memfd` does: a vhost-user
/// backend gets the descriptor, and could otherwise truncate it, taking the guest's RAM away
/// under the running VM (the guest then triple-faults and is reset, again and again).
fn memfd(size: u64, hugepages: Option<Option<u64>>) -> Result<File, MemoryError> {
    let err = |source| MemoryError::Memfd { size, source };
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | hugepages.map_or(0, hugetlb_flags);
    // SAFETY: the name is a valid NUL-terminated string; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"nimbus-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on a descriptor `file` owns; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(MemoryError::Seal {
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Maps guest RAM for `cfg` following the machine layout.
pub fn create_guest_memory(cfg: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = arch::x86_64::layout::ram_regions(cfg.size)
        .into_iter()
        .map(|(addr, size)| create_ram_region(cfg, addr, size))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
}

/// Maps `size` bytes of guest RAM for guest address `addr` as `cfg` asks: a sealed memfd
/// (`shared=on`, huge pages) or anonymous memory. Boot RAM and hot-added RAM are made alike.
pub fn create_ram_region(
    cfg: &MemoryConfig,
    addr: u64,
    size: u64,
) -> Result<GuestRegionMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
    let mut builder =
        MmapRegionBuilder::new(len).with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
    // MAP_NORESERVE lets a large guest start on a host that overcommits, but on hugetlbfs
    // it would turn a shortage of huge pages into SIGBUS at first touch: huge pages are
    // reserved at map time instead, so a shortage is an error here.
    let populate = if cfg.prefault { libc::MAP_POPULATE } else { 0 };
    if cfg.hugepages {
        let file = memfd(size, Some(cfg.hugepage_size))?;
        builder = builder
            .with_file_offset(FileOffset::new(file, 0))
            .with_hugetlbfs(true)
            .with_mmap_flags(libc::MAP_SHARED | populate);
    } else if cfg.shared {
        let file = memfd(size, None)?;
        builder = builder
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE | populate);
    } else {
        builder = builder.with_mmap_flags(
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | populate,
        );
    }
    let hint = if cfg.hugepages {
        " (hugepages=on: are enough huge pages free? see HugePages_Free in /proc/meminfo)"
    } else {
        ""
    };
    let region = builder.build().map_err(|source| MemoryError::Map {
        addr,
        size,
        hint,
        source,
    })?;
    advise(region.as_ptr(), len, cfg);
    GuestRegionMmap::new(region, GuestAddress(addr)).ok_or(MemoryError::TooLarge(size))
}

fn advise(ptr: *mut u8, len: usize, cfg: &MemoryConfig) {
    let mut advice = vec![if cfg.thp {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    }];
    if cfg.mergeable {
        advice.push(libc::MADV_MERGEABLE);
    }
    for a in advice {
        // SAFETY: `ptr..ptr+len` is a mapping we own; madvise only changes paging policy.
        if unsafe { libc::madvise(ptr.cast(), len, a) } != 0 {
            log::debug!(
                "madvise({a}) on guest RAM failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Registers every RAM region with the hypervisor, slot numbers from 0.
pub fn register_guest_memory(vm: &dyn Vm, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let addr = region.start_addr().0;
        // SAFETY: the mapping is owned by `mem`, which the VM keeps alive as long as the slot.
        unsafe { vm.map_memory(slot, addr, region.len(), region.as_ptr(), false) }
            .map_err(|source| MemoryError::Register { slot, addr, source })?;
    }
    Ok(())
}
