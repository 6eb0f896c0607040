//! [`RawFile`]: a raw disk image (regular file or block device) behind [`DiskBackend`].

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use log::debug;
use vm_memory::VolatileSlice;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::aligned::{AlignedBuffer, BUFFER_ALIGN};
use crate::disk::{check_range, BlockError, DiskBackend};
use crate::vectored::{self, Direction};

/// Direct-I/O alignment assumed when the kernel does not report one (`statx` `STATX_DIOALIGN`
/// needs Linux 6.1) and the image is a regular file: 4096 is a multiple of every logical block
/// size in use, so it is always accepted.
const FALLBACK_DIRECT_ALIGN: u64 = 4096;

/// Largest bounce buffer used for unaligned direct I/O and for writing zeros.
const BOUNCE_MAX: usize = 1 << 20;

/// Block-device ioctls (from `<linux/fs.h>`).
mod ioctls {
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
    vmm_sys_util::ioctl_io_nr!(BLKSSZGET, 0x12, 104);
}

/// A raw disk image: a regular file or a block device, read and written in place.
///
/// # Locking
///
/// [`RawFile::open`] takes an OFD (open file description) advisory lock on the whole image:
/// exclusive when opened read-write, shared when read-only. So an image in use read-write by one
/// Nimbus cannot be opened at all by another, and an image open read-only anywhere cannot be
/// opened read-write. OFD locks belong to the open file description, not the process, so two
/// opens of one image inside the same process conflict too (two disks of one VM on one image).
/// The lock is released when the `RawFile` is dropped. Like every advisory lock it only binds
/// programs that take it (Nimbus, Cloud Hypervisor, QEMU).
///
/// # Direct I/O
///
/// With `direct`, the image is opened `O_DIRECT`, bypassing the host page cache. The kernel then
/// wants the file offset, the length and the buffer address aligned; the alignment is the one
/// `statx(STATX_DIOALIGN)` reports, else the block device's logical block size (`BLKSSZGET`),
/// else 4096 for regular files. Accesses that are not aligned go through an aligned bounce
/// buffer; unaligned writes become read-modify-write of the enclosing blocks, serialised
/// against other writes. A regular file opened direct must be a whole number of such blocks.
///
/// The logical block size advertised to the guest ([`DiskBackend::logical_block_size`]) is 512
/// for regular files, whatever the direct-I/O alignment, so images keep their 512-byte-sector
/// partition tables; for block devices it is the device's logical block size.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    read_only: bool,
    direct: bool,
    /// Size in bytes ([`DiskBackend::resize`] changes it while the disk is in use).
    size: AtomicU64,
    /// Whether the image is a block device (which cannot be resized from here).
    block_device: bool,
    logical_block_size: u32,
    /// File offset and length alignment for `O_DIRECT` (1 when not direct).
    direct_align: u64,
    /// Buffer address alignment for `O_DIRECT` (1 when not direct).
    mem_align: u64,
    /// Aligned direct writes take it shared; read-modify-write cycles take it exclusive, so a
    /// concurrent write to the same block cannot be lost.
    rmw: RwLock<()>,
}

impl RawFile {
    /// Opens the image at `path`, locks it (see [Locking](#locking)) and reads its size.
    ///
    /// `read_only` opens it read-only with a shared lock; `direct` opens it `O_DIRECT`.
    ///
    /// # Errors
    ///
    /// [`BlockError::Locked`] when another open holds a conflicting lock; [`BlockError::Open`],
    /// [`BlockError::Lock`], [`BlockError::Size`], [`BlockError::NotADisk`] or
    /// [`BlockError::UnalignedSize`] otherwise, each naming the path.
    pub fn open(path: impl AsRef<Path>, read_only: bool, direct: bool) -> Result<Self, BlockError> {
        let path = path.as_ref();
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;

        lock(&file, path, !read_only)?;

        let size_err = |source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        };
        let metadata = file.metadata().map_err(size_err)?;
        let file_type = metadata.file_type();
        let (size, device_block_size) = if file_type.is_block_device() {
            let size = block_device_size(&file).map_err(size_err)?;
            let block = block_device_sector_size(&file).map_err(size_err)?;
            (size, Some(block))
        } else if file_type.is_file() {
            (metadata.len(), None)
        } else {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        };

        let (direct_align, mem_align) = if direct {
            match (direct_io_alignment(&file), device_block_size) {
                (Some(aligns), _) => aligns,
                (None, Some(block)) => (u64::from(block), u64::from(block)),
                (None, None) => (FALLBACK_DIRECT_ALIGN, FALLBACK_DIRECT_ALIGN),
            }
        } else {
            (1, 1)
        };
        if direct && !size.is_multiple_of(direct_align) {
            return Err(BlockError::UnalignedSize {
                path: path.to_path_buf(),
                size,
                align: direct_align,
            });
        }

        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            read_only,
            direct,
            size: AtomicU64::new(size),
            block_device: device_block_size.is_some(),
            logical_block_size: device_block_size.unwrap_or(512),
            direct_align,
            mem_align,
            rmw: RwLock::new(()),
        })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// File offset and length alignment used for `O_DIRECT` (1 when not direct).
    pub fn direct_alignment(&self) -> u64 {
        self.direct_align
    }

    fn io_error(&self, op: &'static str, offset: u64, len: u64, source: io::Error) -> BlockError {
        BlockError::Io {
            path: self.path.clone(),
            op,
            offset,
            len,
            source,
        }
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Whether an access can go to the kernel as is.
    fn is_aligned(&self, offset: u64, len: usize, addr: usize) -> bool {
        !self.direct
            || (offset.is_multiple_of(self.direct_align)
                && (len as u64).is_multiple_of(self.direct_align)
                && (addr as u64).is_multiple_of(self.mem_align))
    }

    /// A vectored read or write: straight between `bufs` and the file when the kernel takes
    /// them as they are, else (unaligned direct I/O, or `EINVAL` from it) through a bounce
    /// buffer.
    fn transfer_vectored(
        &self,
        direction: Direction,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        let len = vectored::total_len(bufs);
        check_range(&self.path, self.size(), offset, len)?;
        if self.vectored_aligned(offset, bufs) {
            // Writes exclude read-modify-write cycles of the same blocks (see `rmw`).
            let _shared = matches!(direction, Direction::Write)
                .then(|| self.rmw.read().unwrap_or_else(PoisonError::into_inner));
            match vectored::transfer(self.file.as_raw_fd(), direction, offset, bufs) {
                Ok(()) => return Ok(()),
                Err(e) if !(self.direct && e.raw_os_error() == Some(libc::EINVAL)) => {
                    return Err(self.io_error(direction.op(), offset, len, e))
                }
                Err(_) => debug!(
                    "{}: direct {} refused, bouncing",
                    self.path.display(),
                    direction.op()
                ),
            }
        }
        vectored::bounced(self, direction, offset, bufs)
    }

    /// Whether a vectored access can go to the kernel as is: with direct I/O the offset and
    /// total length must be aligned, and every buffer's address and length too.
    fn vectored_aligned(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> bool {
        !self.direct
            || (offset.is_multiple_of(self.direct_align)
                && vectored::total_len(bufs).is_multiple_of(self.direct_align)
                && bufs.iter().all(|b| {
                    (b.ptr_guard().as_ptr() as u64).is_multiple_of(self.mem_align)
                        && (b.len() as u64).is_multiple_of(self.mem_align)
                }))
    }

    /// Size of a bounce buffer for an access of `len` bytes starting `skip` bytes into an
    /// aligned block: a whole number of aligned blocks, at most about [`BOUNCE_MAX`].
    fn bounce_len(&self, skip: usize, len: usize) -> usize {
        let align = usize::try_from(self.direct_align).unwrap_or(BUFFER_ALIGN);
        let cap = BOUNCE_MAX.next_multiple_of(align);
        skip.saturating_add(len)
            .checked_next_multiple_of(align)
            .unwrap_or(cap)
            .min(cap)
    }

    /// Walks an access of `len` bytes at `offset` in aligned blocks through one bounce buffer:
    /// `step` gets each block's part of the buffer (`span` bytes of the file from
    /// [`BounceStep::start`]) and where the caller's bytes lie in it and in the caller's buffer.
    fn bounce_steps(
        &self,
        offset: u64,
        len: usize,
        mut step: impl FnMut(&mut [u8], BounceStep) -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        let align = self.direct_align;
        let first_skip = (offset % align) as usize;
        let mut bounce = AlignedBuffer::new(self.bounce_len(first_skip, len));
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            let start = pos - pos % align;
            let skip = (pos - start) as usize;
            let want = len - done;
            let span = self.bounce_len(skip, want);
            let n = want.min(span - skip);
            let block = &mut bounce.as_mut_slice()[..span];
            step(
                block,
                BounceStep {
                    start,
                    in_block: skip..skip + n,
                    in_buf: done..done + n,
                },
            )?;
            done += n;
        }
        Ok(())
    }

    /// Reads an unaligned range through an aligned bounce buffer.
    fn read_bounced(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.bounce_steps(offset, buf.len(), |block, s| {
            self.file
                .read_exact_at(block, s.start)
                .map_err(|e| self.io_error("read", s.start, block.len() as u64, e))?;
            buf[s.in_buf].copy_from_slice(&block[s.in_block]);
            Ok(())
        })
    }

    /// Writes an unaligned range by read-modify-write of the enclosing aligned blocks.
    fn write_bounced(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let _exclusive = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
        self.bounce_steps(offset, buf.len(), |block, s| {
            let span = block.len() as u64;
            if s.in_block != (0..block.len()) {
                self.file
                    .read_exact_at(block, s.start)
                    .map_err(|e| self.io_error("read", s.start, span, e))?;
            }
            block[s.in_block].copy_from_slice(&buf[s.in_buf]);
            self.file
                .write_all_at(block, s.start)
                .map_err(|e| self.io_error("write", s.start, span, e))
        })
    }

    /// Writes zeros over the range with ordinary writes (the fallback when the file system
    /// supports neither `FALLOC_FL_ZERO_RANGE` nor `FALLOC_FL_PUNCH_HOLE`).
    fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let chunk = usize::try_from(len).unwrap_or(BOUNCE_MAX).min(BOUNCE_MAX);
        let zeros = AlignedBuffer::new(chunk);
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).unwrap_or(chunk).min(chunk);
            self.write_at(offset + done, &zeros.as_slice()[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// One aligned block of a bounced access (see `RawFile::bounce_steps`).
struct BounceStep {
    /// File offset of the block.
    start: u64,
    /// The caller's bytes within the block.
    in_block: Range<usize>,
    /// The same bytes within the caller's buffer.
    in_buf: Range<usize>,
}

impl AsRawFd for RawFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(&self.path, self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.is_aligned(offset, buf.len(), buf.as_ptr() as usize) {
            return self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.io_error("read", offset, buf.len() as u64, e));
        }
        self.read_bounced(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.is_aligned(offset, buf.len(), buf.as_ptr() as usize) {
            let _shared = self.rmw.read().unwrap_or_else(PoisonError::into_inner);
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(|e| self.io_error("write", offset, buf.len() as u64, e));
        }
        self.write_bounced(offset, buf)
    }

    /// `preadv` straight into `bufs`; through a bounce buffer when direct I/O cannot take
    /// them as they are (unaligned, or refused with `EINVAL`).
    fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.transfer_vectored(Direction::Read, offset, bufs)
    }

    /// `pwritev` straight from `bufs`, or through a bounce buffer as for reads.
    fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.check_writable()?;
        self.transfer_vectored(Direction::Write, offset, bufs)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_error("flush", 0, self.size(), e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EOPNOTSUPP => {
                // Discard is a hint; a file system that cannot punch holes just keeps the data.
                debug!("{}: discard not supported, ignored", self.path.display());
                Ok(())
            }
            Err(e) => Err(self.io_error("discard", offset, len, e.into())),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Punching a hole reads back as zeros on regular files, and on block devices Linux
        // implements it as a zero-out that may unmap.
        let modes = if may_unmap {
            [
                Some(FallocateMode::PunchHole),
                Some(FallocateMode::ZeroRange),
            ]
        } else {
            [Some(FallocateMode::ZeroRange), None]
        };
        for mode in modes.into_iter().flatten() {
            match fallocate(&self.file, mode, true, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.errno() == libc::EOPNOTSUPP => continue,
                Err(e) => return Err(self.io_error("write-zeroes", offset, len, e.into())),
            }
        }
        self.write_zeroes_by_writing(offset, len)
    }

    /// A regular file gets `new_size` bytes (`ftruncate`: growing adds a hole that reads as
    /// zeros, shrinking drops the tail). Accesses see the new size once the file has it when
    /// growing, and before it loses its tail when shrinking, so none reaches past the end.
    ///
    /// A block device cannot be resized here: the call only succeeds when the device already
    /// has `new_size` bytes (resized by its provider), and then the disk takes that size.
    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        let align = self.direct_align.max(512);
        if !new_size.is_multiple_of(align) {
            return Err(BlockError::UnalignedResize {
                path: self.path.clone(),
                size: new_size,
                align,
            });
        }
        if self.block_device {
            let actual = block_device_size(&self.file).map_err(|source| BlockError::Size {
                path: self.path.clone(),
                source,
            })?;
            if actual != new_size {
                return Err(BlockError::BlockDeviceSize {
                    path: self.path.clone(),
                    actual,
                    wanted: new_size,
                });
            }
            self.size.store(new_size, Ordering::SeqCst);
            return Ok(());
        }
        // Exclude read-modify-write cycles, which may touch the tail.
        let _exclusive = self.rmw.write().unwrap_or_else(PoisonError::into_inner);
        let old = self.size();
        if new_size < old {
            self.size.store(new_size, Ordering::SeqCst);
        }
        if let Err(e) = self.file.set_len(new_size) {
            self.size.store(old, Ordering::SeqCst);
            return Err(self.io_error("resize", 0, new_size, e));
        }
        self.size.store(new_size, Ordering::SeqCst);
        Ok(())
    }
}

/// Takes the OFD lock described on [`RawFile`]: exclusive or shared, over the whole file.
fn lock(file: &File, path: &Path, exclusive: bool) -> Result<(), BlockError> {
    // SAFETY: `flock` is plain old data for which all-zero bytes are a valid value.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    let lock_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    };
    request.l_type = lock_type as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    // `l_start` and `l_len` stay 0: the whole file, however far it grows. `l_pid` must be 0 for
    // OFD locks.
    // SAFETY: the descriptor is valid for the lifetime of `file`, and `request` is a valid
    // `flock` that outlives the call; F_OFD_SETLK only reads it.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::Locked {
            path: path.to_path_buf(),
            wanted_write: exclusive,
        }),
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Size in bytes of a block device.
fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
    let ret =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, ioctls::BLKGETSIZE64(), &mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical block (sector) size in bytes of a block device.
fn block_device_sector_size(file: &File) -> io::Result<u32> {
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to `sector`.
    let ret =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, ioctls::BLKSSZGET(), &mut sector) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(sector)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad logical block size"))
}

/// Direct-I/O (offset/length, memory) alignment the kernel reports for `file`, if it does.
fn direct_io_alignment(file: &File) -> Option<(u64, u64)> {
    // SAFETY: `statx` is plain old data for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is valid for the lifetime of `file`; the empty C string with
    // AT_EMPTY_PATH makes statx describe that descriptor; `stx` is a valid output buffer.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let offset_align = u64::from(stx.stx_dio_offset_align);
    let mem_align = u64::from(stx.stx_dio_mem_align);
    if !offset_align.is_power_of_two() || !mem_align.is_power_of_two() {
        return None;
    }
    Some((offset_align, mem_align))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A temporary image file removed on drop.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(name: &str, content: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!(
                "nimbus-block-raw-{}-{name}.img",
                std::process::id()
            ));
            std::fs::write(&path, content).unwrap();
            TempImage(path)
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const MIB: usize = 1 << 20;

    #[test]
    fn write_lands_at_offset_and_reads_back() {
        let img = TempImage::new("rw", &vec![0u8; MIB]);
        let disk = RawFile::open(&img.0, false, false).unwrap();
        assert_eq!(disk.size(), MIB as u64);
        assert!(!disk.read_only());
        assert_eq!(disk.logical_block_size(), 512);
        disk.write_at(4096 + 512, &[0xab; 512]).unwrap();
        disk.flush().unwrap();
        let content = std::fs::read(&img.0).unwrap();
        assert!(content[4096 + 512..4096 + 1024].iter().all(|&b| b == 0xab));
        assert!(content[..4096 + 512].iter().all(|&b| b == 0));
        assert!(content[4096 + 1024..].iter().all(|&b| b == 0));
        let mut back = [0u8; 1024];
        disk.read_at(4096, &mut back).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn out_of_range_is_refused_and_file_not_grown() {
        let img = TempImage::new("range", &vec![0u8; 8192]);
        let disk = RawFile::open(&img.0, false, false).unwrap();
        assert!(matches!(
            disk.write_at(8192 - 256, &[1; 512]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(u64::MAX, &mut [0; 2]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.discard(4096, 8192),
            Err(BlockError::OutOfRange { .. })
        ));
        assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 8192);
    }

    #[test]
    fn read_only_refuses_writes() {
        let img = TempImage::new("ro", &vec![7u8; 4096]);
        let disk = RawFile::open(&img.0, true, false).unwrap();
        assert!(disk.read_only());
        assert!(matches!(
            disk.write_at(0, &[0; 512]),
            Err(BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            disk.discard(0, 512),
            Err(BlockError::ReadOnly { .. })
        ));
        assert!(matches!(
            disk.write_zeroes(0, 512, true),
            Err(BlockError::ReadOnly { .. })
        ));
        let mut buf = [0u8; 512];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        disk.flush().unwrap();
    }

    #[test]
    fn discard_punches_a_hole() {
        let img = TempImage::new("discard", &vec![0x5a; 4 * MIB]);
        let disk = RawFile::open(&img.0, false, false).unwrap();
        disk.flush().unwrap();
        let before = std::fs::metadata(&img.0).unwrap().blocks();
        disk.discard(MIB as u64, 2 * MIB as u64).unwrap();
        let after = std::fs::metadata(&img.0).unwrap();
        assert_eq!(after.len(), 4 * MIB as u64, "size kept");
        // 2 MiB is 4096 512-byte blocks.
        assert!(
            after.blocks() + 4000 <= before,
            "blocks {before} -> {}",
            after.blocks()
        );
        let mut buf = vec![1u8; 2 * MIB];
        disk.read_at(MIB as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let mut edge = [0u8; 1];
        disk.read_at(MIB as u64 - 1, &mut edge).unwrap();
        assert_eq!(edge[0], 0x5a);
        disk.read_at(3 * MIB as u64, &mut edge).unwrap();
        assert_eq!(edge[0], 0x5a);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let img = TempImage::new("zeroes", &vec![0xff; MIB]);
        let disk = RawFile::open(&img.0, false, false).unwrap();
        disk.write_zeroes(512, 1024, false).unwrap();
        disk.write_zeroes(65536, 131072, true).unwrap();
        disk.write_zeroes_by_writing(8192, 100).unwrap();
        let content = std::fs::read(&img.0).unwrap();
        assert_eq!(content.len(), MIB);
        assert_eq!(content[511], 0xff);
        assert!(content[512..1536].iter().all(|&b| b == 0));
        assert_eq!(content[1536], 0xff);
        assert!(content[8192..8292].iter().all(|&b| b == 0));
        assert_eq!(content[8292], 0xff);
        assert!(content[65536..196608].iter().all(|&b| b == 0));
        assert_eq!(content[196608], 0xff);
    }

    #[test]
    fn second_read_write_open_is_locked() {
        let img = TempImage::new("lock-rw", &vec![0u8; 4096]);
        let first = RawFile::open(&img.0, false, false).unwrap();
        let err = RawFile::open(&img.0, false, false).unwrap_err();
        assert!(
            matches!(&err, BlockError::Locked { path, .. } if *path == img.0),
            "{err:?}"
        );
        assert!(err.to_string().contains("another process"), "{err}");
        // A writer also keeps readers out.
        assert!(matches!(
            RawFile::open(&img.0, true, false),
            Err(BlockError::Locked { .. })
        ));
        drop(first);
        let _again = RawFile::open(&img.0, false, false).unwrap();
    }

    #[test]
    fn read_only_opens_share_and_exclude_writers() {
        let img = TempImage::new("lock-ro", &vec![0u8; 4096]);
        let a = RawFile::open(&img.0, true, false).unwrap();
        let b = RawFile::open(&img.0, true, false).unwrap();
        assert!(matches!(
            RawFile::open(&img.0, false, false),
            Err(BlockError::Locked { .. })
        ));
        drop(a);
        drop(b);
        let _writer = RawFile::open(&img.0, false, false).unwrap();
    }

    #[test]
    fn open_errors_name_the_path() {
        let missing = std::env::temp_dir().join(format!(
            "nimbus-block-raw-{}-missing.img",
            std::process::id()
        ));
        let err = RawFile::open(&missing, true, false).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
        assert!(err.to_string().contains(&*missing.to_string_lossy()));

        let dir = std::env::temp_dir();
        assert!(matches!(
            RawFile::open(&dir, true, false),
            Err(BlockError::NotADisk { .. })
        ));
    }

    /// Opens `img` with `O_DIRECT`, or returns `None` when the file system refuses it.
    fn open_direct(img: &TempImage) -> Option<RawFile> {
        match RawFile::open(&img.0, false, true) {
            Ok(d) => Some(d),
            Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("O_DIRECT not supported on {}, skipped", img.0.display());
                None
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn direct_io_aligned_and_unaligned() {
        let img = TempImage::new("direct", &vec![0x11; MIB]);
        let Some(disk) = open_direct(&img) else {
            return;
        };
        assert!(disk.is_direct());
        let align = disk.direct_alignment();
        assert!(align.is_power_of_two() && align >= 512, "{align}");

        // Aligned buffer, offset and length: straight to the kernel.
        let mut aligned = AlignedBuffer::new(8192);
        aligned.as_mut_slice().fill(0x22);
        disk.write_at(8192, aligned.as_slice()).unwrap();

        // Unaligned everything: bounce buffer and read-modify-write.
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        disk.write_at(100_001, &data).unwrap();
        // Unaligned buffer address with aligned offset/length.
        let mut storage = vec![0x33u8; 4096 + 1];
        disk.write_at(65536, &storage[1..]).unwrap();
        disk.flush().unwrap();

        let content = std::fs::read(&img.0).unwrap();
        assert!(content[8192..16384].iter().all(|&b| b == 0x22));
        assert_eq!(content[8191], 0x11);
        assert_eq!(content[16384], 0x11);
        assert_eq!(&content[100_001..103_001], &data[..]);
        assert_eq!(content[100_000], 0x11);
        assert_eq!(content[103_001], 0x11);
        assert!(content[65536..69632].iter().all(|&b| b == 0x33));

        let mut back = vec![0u8; 3000];
        disk.read_at(100_001, &mut back).unwrap();
        assert_eq!(back, data);
        disk.read_at(65536, &mut storage[1..]).unwrap();
        assert!(storage[1..].iter().all(|&b| b == 0x33));

        // Larger than the bounce buffer, unaligned.
        let big: Vec<u8> = (0..(BOUNCE_MAX + 5000)).map(|i| (i % 13) as u8).collect();
        disk.write_at(7, &big[..MIB - 7]).unwrap();
        let mut big_back = vec![0u8; MIB - 7];
        disk.read_at(7, &mut big_back).unwrap();
        assert_eq!(&big_back[..], &big[..MIB - 7]);

        disk.write_zeroes(3, 10_000, false).unwrap();
        let mut z = vec![1u8; 10_000];
        disk.read_at(3, &mut z).unwrap();
        assert!(z.iter().all(|&b| b == 0));
    }

    /// Writes `pieces` (lengths) of a pattern at `offset` as one vectored write, reads them
    /// back as one vectored read into differently cut buffers, and checks the file.
    fn vectored_round_trip(disk: &RawFile, img: &TempImage, offset: u64, pieces: &[usize]) {
        let total: usize = pieces.iter().sum();
        let data: Vec<u8> = (0..total).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        let mut src = data.clone();
        let mut rest = src.as_mut_slice();
        let mut bufs = Vec::new();
        for &n in pieces {
            let (head, tail) = rest.split_at_mut(n);
            bufs.push(VolatileSlice::from(head));
            rest = tail;
        }
        disk.write_vectored_at(offset, &bufs).unwrap();
        disk.flush().unwrap();
        let content = std::fs::read(&img.0).unwrap();
        let at = offset as usize;
        assert_eq!(content[at..at + total], data[..]);

        let mut dst = vec![0u8; total];
        let bufs: Vec<_> = dst
            .chunks_mut(total / 3 + 1)
            .map(VolatileSlice::from)
            .collect();
        disk.read_vectored_at(offset, &bufs).unwrap();
        assert_eq!(dst, data);
    }

    #[test]
    fn vectored_io_lands_in_place_and_checks_range() {
        let img = TempImage::new("vectored", &vec![0u8; 4 * MIB]);
        let disk = RawFile::open(&img.0, false, false).unwrap();
        vectored_round_trip(&disk, &img, 512, &[512, 1 << 20, 7, 505, 4096]);
        let content = std::fs::read(&img.0).unwrap();
        assert!(content[..512].iter().all(|&b| b == 0));
        let end = 512 + 512 + (1 << 20) + 7 + 505 + 4096;
        assert!(content[end..].iter().all(|&b| b == 0));

        let mut two = [0u8; 1024];
        let past_end = [VolatileSlice::from(&mut two[..])];
        assert!(matches!(
            disk.read_vectored_at(4 * MIB as u64 - 512, &past_end),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_vectored_at(4 * MIB as u64 - 512, &past_end),
            Err(BlockError::OutOfRange { .. })
        ));
        assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 4 * MIB as u64);

        drop(disk);
        let read_only = RawFile::open(&img.0, true, false).unwrap();
        assert!(matches!(
            read_only.write_vectored_at(0, &past_end),
            Err(BlockError::ReadOnly { .. })
        ));
    }

    #[test]
    fn direct_vectored_io_aligned_and_unaligned() {
        let img = TempImage::new("direct-vectored", &vec![0u8; 4 * MIB]);
        let Some(disk) = open_direct(&img) else {
            return;
        };
        // Page-aligned buffers and offset: straight to the kernel.
        let mut a = AlignedBuffer::new(MIB);
        let mut b = AlignedBuffer::new(8192);
        a.as_mut_slice().fill(0x44);
        b.as_mut_slice().fill(0x55);
        let bufs = [
            VolatileSlice::from(a.as_mut_slice()),
            VolatileSlice::from(b.as_mut_slice()),
        ];
        assert!(disk.vectored_aligned(MIB as u64, &bufs));
        disk.write_vectored_at(MIB as u64, &bufs).unwrap();
        let content = std::fs::read(&img.0).unwrap();
        assert!(content[MIB..2 * MIB].iter().all(|&v| v == 0x44));
        assert!(content[2 * MIB..2 * MIB + 8192].iter().all(|&v| v == 0x55));
        a.as_mut_slice().fill(0);
        let bufs = [VolatileSlice::from(a.as_mut_slice())];
        disk.read_vectored_at(MIB as u64 + 4096, &bufs).unwrap();
        assert!(a.as_slice()[..MIB - 4096].iter().all(|&v| v == 0x44));
        assert!(a.as_slice()[MIB - 4096..].iter().all(|&v| v == 0x55));

        // Unaligned pieces and offset: bounced, with read-modify-write.
        vectored_round_trip(&disk, &img, 3 * MIB as u64 + 3, &[100, 4096, 1, 999]);
    }

    #[test]
    fn direct_refuses_unaligned_file_size() {
        let img = TempImage::new("direct-odd", &vec![0u8; 4096 + 100]);
        match RawFile::open(&img.0, false, true) {
            Err(BlockError::UnalignedSize { size, .. }) => assert_eq!(size, 4196),
            Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn resize_grows_and_shrinks_the_file_and_the_checked_range() {
        let img = TempImage::new("resize", &vec![0x11u8; 8192]);
        let disk = RawFile::open(&img.0, false, false).unwrap();
        disk.resize(16384).unwrap();
        assert_eq!(disk.size(), 16384);
        assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 16384);
        // The old bytes stay, the new ones read as zeros, and the new tail is writable.
        let mut back = [0u8; 1024];
        disk.read_at(8192 - 512, &mut back).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0x11));
        assert!(back[512..].iter().all(|&b| b == 0));
        disk.write_at(16384 - 512, &[0x22; 512]).unwrap();
        // Shrinking (as Cloud Hypervisor allows) drops the tail and the range follows.
        disk.resize(4096).unwrap();
        assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 4096);
        assert!(matches!(
            disk.read_at(4096, &mut [0; 512]),
            Err(BlockError::OutOfRange { size: 4096, .. })
        ));
        assert!(matches!(
            disk.resize(4096 + 100),
            Err(BlockError::UnalignedResize { align: 512, .. })
        ));
        assert_eq!(disk.size(), 4096, "a refused resize changes nothing");
    }

    #[test]
    fn resize_refuses_read_only_images() {
        let img = TempImage::new("resize-ro", &vec![0u8; 4096]);
        let disk = RawFile::open(&img.0, true, false).unwrap();
        assert!(matches!(
            disk.resize(8192),
            Err(BlockError::ReadOnly { .. })
        ));
        assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 4096);
    }

    #[test]
    fn direct_resize_keeps_the_direct_alignment() {
        let img = TempImage::new("resize-direct", &vec![0u8; 8192]);
        let disk = match RawFile::open(&img.0, false, true) {
            Ok(d) => d,
            // tmpfs and some file systems refuse O_DIRECT.
            Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let align = disk.direct_alignment().max(512);
        if align > 512 {
            assert!(matches!(
                disk.resize(8192 + 512),
                Err(BlockError::UnalignedResize { .. })
            ));
        }
        disk.resize(8192 + align).unwrap();
        assert_eq!(disk.size(), 8192 + align);
    }
}
