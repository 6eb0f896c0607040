//! The host side of virtio-pmem devices: the backing file, opened and checked once per boot
//! (the board), and its mapping into one VM instance's guest physical memory, a memory slot in
//! the 64-bit device area above RAM.
//!
//! The VMM itself never reads or writes the mapping (only the guest does, through the
//! hypervisor), so a file that shrinks under the running VM cannot raise SIGBUS in the VMM; the
//! guest's access to the missing pages fails its vCPU instead. The file must be a regular file,
//! and sizes are checked here rather than trusted.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

use vm_config::{PmemConfig, PMEM_ALIGN};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;

/// Errors setting up a pmem device.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    /// The file could not be opened, examined or extended.
    #[error("pmem {path}: cannot {what}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not usable as it is.
    #[error("pmem {path}: {problem}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The mapping failed.
    #[error("pmem {path}: cannot map {size} bytes")]
    Map {
        /// The file.
        path: PathBuf,
        /// Size.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// A pmem device's backing file, checked and sized.
#[derive(Debug, Clone)]
pub struct PmemFile {
    /// The open file (read-only with `discard_writes`).
    pub file: Arc<File>,
    /// Bytes the guest sees: a non-zero multiple of 2 MiB, within the file.
    pub size: u64,
    /// Guest writes stay in a private mapping.
    pub discard_writes: bool,
    /// The path, for logs and errors.
    pub path: PathBuf,
}

impl PmemFile {
    /// Opens and checks the file of `cfg`: a regular file; without `size`, its length must be
    /// a non-zero multiple of 2 MiB; with `size`, a shorter file is extended (refused with
    /// `discard_writes`, whose file is opened read-only).
    pub fn open(cfg: &PmemConfig) -> Result<Self, PmemError> {
        let path = cfg.file.clone();
        let file_err = |what, source| PmemError::File {
            path: path.clone(),
            what,
            source,
        };
        let unusable = |problem: String| PmemError::Unusable {
            path: path.clone(),
            problem,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.discard_writes)
            .open(&path)
            .map_err(|e| file_err("open it", e))?;
        let meta = file.metadata().map_err(|e| file_err("read its size", e))?;
        if !meta.file_type().is_file() {
            return Err(unusable("not a regular file".into()));
        }
        let len = meta.len();
        let size = match cfg.size {
            Some(size) => size,
            None if len == 0 || len % PMEM_ALIGN != 0 => {
                return Err(unusable(format!(
                    "its size {len} is not a non-zero multiple of 2 MiB (give size=)"
                )))
            }
            None => len,
        };
        if size == 0 || size % PMEM_ALIGN != 0 {
            return Err(unusable(format!(
                "size {size} is not a non-zero multiple of 2 MiB"
            )));
        }
        if len < size {
            if cfg.discard_writes {
                return Err(unusable(format!(
                    "the file has {len} bytes, fewer than size {size}, and discard_writes=on \
                     opens it read-only"
                )));
            }
            file.set_len(size).map_err(|e| file_err("extend it", e))?;
        }
        Ok(Self {
            file: Arc::new(file),
            size,
            discard_writes: cfg.discard_writes,
            path,
        })
    }

    /// Maps the file for one VM instance: shared (guest writes reach the file), or private
    /// with `discard_writes` (they stay in the VMM's memory and go at the instance's end).
    pub fn map(&self) -> Result<MmapRegion, PmemError> {
        let err = |source| PmemError::Map {
            path: self.path.clone(),
            size: self.size,
            source,
        };
        let len = usize::try_from(self.size).map_err(|_| PmemError::Unusable {
            path: self.path.clone(),
            problem: format!("size {} does not fit this host", self.size),
        })?;
        let file = self.file.try_clone().map_err(|source| PmemError::File {
            path: self.path.clone(),
            what: "duplicate its descriptor",
            source,
        })?;
        let sharing = if self.discard_writes {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_SHARED
        };
        MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(sharing | libc::MAP_NORESERVE)
            .build()
            .map_err(err)
    }

    /// The flush target of the device: the file, or nothing to flush with `discard_writes`.
    pub fn backend(&self) -> Arc<dyn virtio_devices::pmem::PmemBackend> {
        if self.discard_writes {
            Arc::new(virtio_devices::pmem::DiscardWrites)
        } else {
            self.file.clone()
        }
    }
}

/// Memory slots of pmem regions start here, clear of RAM's (and of hot-added RAM's).
pub const FIRST_SLOT: u32 = 512;

/// Errors attaching a pmem region to a VM instance.
#[derive(Debug, thiserror::Error)]
pub enum PmemAttachError {
    /// The file could not be mapped.
    #[error(transparent)]
    File(#[from] PmemError),
    /// No room in the 64-bit device area.
    #[error("pmem {path}: no room for {size} bytes in the 64-bit device area")]
    NoRoom {
        /// The file.
        path: PathBuf,
        /// Size.
        size: u64,
    },
    /// The hypervisor refused the memory slot.
    #[error("pmem {path}: cannot map it into the guest at {addr:#x} (slot {slot})")]
    Slot {
        /// The file.
        path: PathBuf,
        /// Guest address.
        addr: u64,
        /// Slot.
        slot: u32,
        /// Cause.
        #[source]
        source: hypervisor::HypervisorError,
    },
}

/// A pmem file mapped into one VM instance: device `id`'s memory slot, where it lies (PCI
/// segment and guest address, from that segment's 64-bit window) and the host mapping the slot
/// uses (kept as long as the slot exists).
#[derive(Debug)]
pub struct Attached {
    /// The device.
    pub id: String,
    /// Its memory slot.
    pub slot: u32,
    /// The PCI segment whose window holds it.
    pub segment: u16,
    /// Guest physical address.
    pub addr: u64,
    /// The host mapping.
    pub region: MmapRegion,
}

/// The first memory slot for pmem not used by `attached`.
pub fn free_slot(attached: &[Attached]) -> u32 {
    (FIRST_SLOT..)
        .find(|s| attached.iter().all(|a| a.slot != *s))
        .unwrap_or(FIRST_SLOT)
}

/// One VM instance's view of a pmem file: mapped, placed at `addr` by `allocate` (size and
/// 2 MiB alignment), and registered with `vm` as memory slot `slot`. The returned region must
/// outlive the VM's use of the slot (the VM instance keeps it).
pub fn attach(
    file: &PmemFile,
    vm: &dyn hypervisor::Vm,
    slot: u32,
    allocate: impl FnOnce(u64, u64) -> Option<u64>,
) -> Result<(MmapRegion, u64), PmemAttachError> {
    let region = file.map()?;
    let addr = allocate(file.size, PMEM_ALIGN).ok_or_else(|| PmemAttachError::NoRoom {
        path: file.path.clone(),
        size: file.size,
    })?;
    // SAFETY: the mapping is `file.size` bytes long and is returned to the caller, which keeps
    // it for as long as the VM (and so the slot) exists.
    unsafe { vm.map_memory(slot, addr, file.size, region.as_ptr(), false) }.map_err(|source| {
        PmemAttachError::Slot {
            path: file.path.clone(),
            addr,
            slot,
            source,
        }
    })?;
    Ok((region, addr))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use super::*;

    fn cfg(path: &Path, extra: &str) -> PmemConfig {
        vm_config::kv::from_str(&format!("file={}{extra}", path.display())).expect("cfg")
    }

    #[test]
    fn files_are_checked_and_sized() {
        let dir = e2e::ScratchDir::new("pmem-unit");
        let path = dir.path().join("p");
        let mut f = File::create(&path).expect("create");
        f.write_all(&[1; 4096]).expect("write");
        let e = PmemFile::open(&cfg(&path, "")).expect_err("4 KiB");
        assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
        let e = PmemFile::open(&cfg(&path, ",size=2M,discard_writes=on")).expect_err("ro");
        assert!(e.to_string().contains("read-only"), "{e}");
        let p = PmemFile::open(&cfg(&path, ",size=4M")).expect("extended");
        assert_eq!(p.size, 4 << 20);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 4 << 20);
        let p = PmemFile::open(&cfg(&path, "")).expect("4 MiB now");
        assert_eq!(p.size, 4 << 20);
        let e = PmemFile::open(&cfg(dir.path(), ",size=2M")).expect_err("dir");
        assert!(e.to_string().contains("cannot open it") || e.to_string().contains("regular"));
        let e = PmemFile::open(&cfg(Path::new("/dev/null"), ",size=2M")).expect_err("chr");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn shared_mappings_reach_the_file_and_private_ones_do_not() {
        let dir = e2e::ScratchDir::new("pmem-unit");
        let path = dir.path().join("p");
        File::create(&path)
            .and_then(|f| f.set_len(2 << 20))
            .expect("create");
        for (discard, want) in [(false, 0x5a), (true, 0)] {
            let extra = if discard { ",discard_writes=on" } else { "" };
            let p = PmemFile::open(&cfg(&path, extra)).expect("open");
            let region = p.map().expect("map");
            // SAFETY: the region is 2 MiB long and mapped read-write.
            unsafe { region.as_ptr().add(100).write_volatile(0x5a) };
            drop(region);
            p.backend().flush().expect("flush");
            let byte = std::fs::read(&path).expect("read")[100];
            assert_eq!(byte, want, "discard_writes={discard}");
            std::fs::write(&path, vec![0u8; 2 << 20]).expect("reset");
        }
    }
}
