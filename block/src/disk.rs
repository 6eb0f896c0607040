//! The disk backend seam: what a virtio-blk device needs from a disk image.

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;

use vm_memory::{VolatileMemoryError, VolatileSlice};

use crate::vectored::{self, Direction};

/// Errors from opening or accessing a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// Path of the image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another open file description (another Nimbus, or this one) holds a conflicting lock.
    #[error(
        "disk image {path} is locked: another process (or another disk in this VM) has it open \
         {}",
        if *.wanted_write { "for reading or writing" } else { "for writing" }
    )]
    Locked {
        /// Path of the image.
        path: PathBuf,
        /// Whether the refused open asked for write access (an exclusive lock).
        wanted_write: bool,
    },
    /// Taking the advisory lock failed for another reason than a conflict.
    #[error("cannot lock disk image {path}")]
    Lock {
        /// Path of the image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image's size or type could not be read.
    #[error("cannot read the size of disk image {path}")]
    Size {
        /// Path of the image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image has a format Nimbus does not serve (it would show its bytes as raw).
    #[error("disk image {path} is a {format} image; Nimbus serves raw images only")]
    NotRaw {
        /// Path of the image.
        path: PathBuf,
        /// What its header says.
        format: crate::ImageFormat,
    },
    /// The path is neither a regular file nor a block device.
    #[error("disk image {path} is neither a regular file nor a block device")]
    NotADisk {
        /// Path of the image.
        path: PathBuf,
    },
    /// With `O_DIRECT`, a regular file must be a whole number of direct-I/O blocks long.
    #[error("disk image {path} is {size} bytes, not a multiple of {align} as direct I/O needs")]
    UnalignedSize {
        /// Path of the image.
        path: PathBuf,
        /// Size of the image in bytes.
        size: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// A write, discard or write-zeroes on a disk opened read-only.
    #[error("disk image {path} is read-only")]
    ReadOnly {
        /// Path of the image.
        path: PathBuf,
    },
    /// An access past the end of the disk (or whose end overflows `u64`).
    #[error(
        "access of {len} bytes at offset {offset} is outside disk image {path} ({size} bytes)"
    )]
    OutOfRange {
        /// Path of the image.
        path: PathBuf,
        /// Start of the access in bytes.
        offset: u64,
        /// Length of the access in bytes.
        len: u64,
        /// Size of the disk in bytes.
        size: u64,
    },
    /// A buffer handed to a vectored access could not be read or written (a bug: callers hand
    /// over slices they checked).
    #[error("buffer access failed")]
    Buffer(#[source] VolatileMemoryError),
    /// A resize to a size that is not a whole number of `align`-byte blocks (512, the
    /// virtio-blk sector, or the direct-I/O alignment when larger).
    #[error("cannot resize disk image {path} to {size} bytes: not a multiple of {align} bytes")]
    UnalignedResize {
        /// Path of the image.
        path: PathBuf,
        /// The size asked for in bytes.
        size: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// A block device cannot be resized from here: it must be resized first by whoever
    /// provides it (LVM, losetup, ...), and then it already has the size asked for.
    #[error(
        "cannot resize disk image {path} to {wanted} bytes: it is a block device of {actual} \
         bytes; resize the device itself first"
    )]
    BlockDeviceSize {
        /// Path of the device.
        path: PathBuf,
        /// Its size in bytes.
        actual: u64,
        /// The size asked for in bytes.
        wanted: u64,
    },
    /// The backend has no way to change its size.
    #[error("this kind of disk backend cannot be resized")]
    ResizeUnsupported,
    /// An I/O system call failed.
    #[error("{op} of {len} bytes at offset {offset} on disk image {path} failed")]
    Io {
        /// Path of the image.
        path: PathBuf,
        /// The operation: "read", "write", "flush", "discard", "write-zeroes" or "resize".
        op: &'static str,
        /// Start of the access in bytes.
        offset: u64,
        /// Length of the access in bytes.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A disk image as seen by a virtio-blk device: byte-addressed reads and writes plus the few
/// management operations virtio-blk exposes.
///
/// Methods take `&self` so one backend can be shared (`Arc<dyn DiskBackend>`) by the threads
/// serving the queues of a multi-queue device; implementations synchronise internally.
///
/// Offsets and lengths are in bytes. Callers keep accesses inside `0..size()`; implementations
/// still check and return [`BlockError::OutOfRange`] rather than growing the image.
pub trait DiskBackend: Debug + Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// Whether the disk refuses writes.
    fn read_only(&self) -> bool;

    /// Logical block size in bytes, advertised to the guest as `blk_size`.
    ///
    /// The default is 512, the virtio-blk sector size.
    fn logical_block_size(&self) -> u32 {
        512
    }

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError>;

    /// Fills `bufs`, in order, with the bytes at `offset..offset + total length`.
    ///
    /// `bufs` are usually guest memory, so a virtio-blk read lands in the guest without an
    /// intermediate copy when the backend can do vectored I/O ([`RawFile`](crate::RawFile) uses
    /// `preadv`). The default reads through this thread's bounce buffer with
    /// [`read_at`](Self::read_at), at most 1 MiB at a time.
    fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        vectored::bounced(self, Direction::Read, offset, bufs)
    }

    /// Writes the bytes of `bufs`, in order, at `offset`; the counterpart of
    /// [`read_vectored_at`](Self::read_vectored_at) (default: bounce, then
    /// [`write_at`](Self::write_at)).
    fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        vectored::bounced(self, Direction::Write, offset, bufs)
    }

    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), BlockError>;

    /// Tells the backend the range is no longer needed; it may deallocate it.
    ///
    /// The content of the range afterwards is unspecified (zeros for [`RawFile`](crate::RawFile)).
    /// Backends that cannot deallocate succeed without doing anything.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Makes the range read back as zeros; with `may_unmap` the backend may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError>;

    /// Changes the size of the disk to `new_size` bytes, a multiple of 512 (bytes added read
    /// as zeros; a smaller size drops the tail). From then on [`size`](Self::size) is
    /// `new_size`, and accesses are checked against it.
    ///
    /// The default refuses with [`BlockError::ResizeUnsupported`].
    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        let _ = new_size;
        Err(BlockError::ResizeUnsupported)
    }
}

/// Checks that `offset..offset + len` lies inside a disk of `size` bytes.
pub(crate) fn check_range(
    path: &std::path::Path,
    size: u64,
    offset: u64,
    len: u64,
) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn check_range_limits() {
        let p = Path::new("x");
        assert!(check_range(p, 1024, 0, 1024).is_ok());
        assert!(check_range(p, 1024, 1024, 0).is_ok());
        assert!(check_range(p, 1024, 1, 1024).is_err());
        assert!(check_range(p, 1024, u64::MAX, 2).is_err());
        assert!(check_range(p, 1024, 2048, 0).is_err());
    }

    #[test]
    fn locked_message_names_path_and_holder() {
        let e = BlockError::Locked {
            path: PathBuf::from("/images/a.raw"),
            wanted_write: true,
        };
        let msg = e.to_string();
        assert!(msg.contains("/images/a.raw"), "{msg}");
        assert!(msg.contains("another process"), "{msg}");
    }
}
