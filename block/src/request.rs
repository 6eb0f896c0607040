//! Parsing virtio-blk requests out of descriptor chains and executing them on a disk.

use std::ops::Deref;

use log::{debug, warn};
use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_chain::{ChainError, SgError, SgList, Split};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, BitmapSlice, BS};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice,
};

use crate::disk::DiskBackend;
use crate::virtio::{
    BlkStatus, RequestType, DISCARD_SEGMENT_SIZE, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS, REQUEST_HEADER_SIZE, SECTOR_SHIFT,
    SECTOR_SIZE, VIRTIO_BLK_ID_BYTES,
};

/// Per-device settings request execution needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Refuse writes, discards and write-zeroes with `VIRTIO_BLK_S_IOERR` (also done when the
    /// disk itself is read-only).
    pub read_only: bool,
    /// The `GET_ID` answer: the serial, NUL-padded to 20 bytes.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
}

impl BlockConfig {
    /// Settings for a device; `serial` is cut to its first 20 bytes.
    pub fn new(read_only: bool, serial: &str) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        BlockConfig {
            read_only,
            serial: id,
        }
    }
}

/// Why a descriptor chain is not a usable virtio-blk request.
///
/// The chain should be returned to the used ring with length 0; the device may also set
/// `DEVICE_NEEDS_RESET`, since only a broken or hostile driver builds such chains.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The descriptor chain is malformed: empty, cut short, a device-readable descriptor after
    /// a device-writable one, or a buffer outside guest memory.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The chain has no device-writable byte to hold the status.
    #[error("descriptor chain has no device-writable byte for the status")]
    NoStatus,
    /// The device-readable part is shorter than the 16-byte request header.
    #[error("request header is {len} bytes, shorter than 16")]
    HeaderTooShort {
        /// Device-readable bytes in the chain.
        len: u64,
    },
    /// Guest memory refused the header read.
    #[error("cannot read the request header")]
    HeaderRead(#[source] GuestMemoryError),
    /// Guest memory refused the status write.
    #[error("cannot write the status byte at {addr:#x}")]
    StatusWrite {
        /// Guest address of the status byte.
        addr: u64,
        /// Cause.
        #[source]
        source: GuestMemoryError,
    },
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The status byte written to the guest.
    pub status: BlkStatus,
    /// Bytes written into guest memory, status byte included: the used ring `len`.
    pub used_len: u32,
}

/// A virtio-blk request parsed from a descriptor chain.
///
/// The chain is taken as two byte streams, whatever its descriptor boundaries (virtio 1.x has
/// no layout requirement): the device-readable part starts with the 16-byte header followed by
/// `OUT` data or discard/write-zeroes segments; the device-writable part holds `IN`/`GET_ID`
/// data and ends with the status byte. Zero-length descriptors add no byte to either part.
#[derive(Clone, Debug)]
pub struct Request {
    request_type: RequestType,
    sector: u64,
    /// Device-readable bytes, header included.
    readable: SgList,
    /// Device-writable bytes, status byte excluded.
    writable: SgList,
    status: GuestAddress,
}

impl Request {
    /// Parses the chain: walks every descriptor (consuming the chain's iterator), checks each
    /// buffer lies in guest memory with the right access, and reads the header.
    ///
    /// # Errors
    ///
    /// A [`RequestError`] for a malformed chain. Requests that are well-formed chains but bad
    /// requests (unknown type, out of range, ...) parse fine and fail in
    /// [`execute`](Self::execute) with a status instead.
    pub fn parse<T>(chain: &mut DescriptorChain<T>) -> Result<Self, RequestError>
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let Split {
            readable,
            mut writable,
            ..
        } = virtio_chain::split(chain)?;
        let status = writable.pop_last_byte().ok_or(RequestError::NoStatus)?;
        if readable.len() < REQUEST_HEADER_SIZE {
            return Err(RequestError::HeaderTooShort {
                len: readable.len(),
            });
        }
        let mut header = [0u8; REQUEST_HEADER_SIZE as usize];
        readable
            .cursor()
            .read(chain.memory(), &mut header)
            .map_err(|e| match e {
                SgError::Memory { source, .. } => RequestError::HeaderRead(source),
                SgError::PastEnd { .. } => RequestError::HeaderTooShort {
                    len: readable.len(),
                },
            })?;
        let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = header;
        Ok(Request {
            request_type: RequestType::from(u32::from_le_bytes([t0, t1, t2, t3])),
            sector: u64::from_le_bytes(sector),
            readable,
            writable,
            status,
        })
    }

    /// The request type from the header.
    pub fn request_type(&self) -> RequestType {
        self.request_type
    }

    /// The start sector (512 bytes) from the header.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Guest address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// Length of the request's payload: device-writable bytes (status excluded) for `IN` and
    /// `GET_ID`, device-readable bytes after the header for `OUT`, `DISCARD` and
    /// `WRITE_ZEROES`, 0 otherwise.
    pub fn data_len(&self) -> u64 {
        match self.request_type {
            RequestType::In | RequestType::GetId => self.writable.len(),
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                self.payload_len()
            }
            RequestType::Flush | RequestType::Unsupported(_) => 0,
        }
    }

    fn payload_len(&self) -> u64 {
        self.readable.len() - REQUEST_HEADER_SIZE
    }

    /// Runs the request on `disk` and writes the status byte into guest memory.
    ///
    /// `mem` must be the memory the chain was parsed from. Bad requests get
    /// `VIRTIO_BLK_S_IOERR` (out of range, data length not a multiple of 512, write to a
    /// read-only disk, bad discard/write-zeroes segments, disk errors) or `VIRTIO_BLK_S_UNSUPP`
    /// (unknown type or flags).
    ///
    /// # Errors
    ///
    /// [`RequestError::StatusWrite`] if the status byte cannot be written.
    pub fn execute<M>(
        &self,
        mem: &M,
        disk: &dyn DiskBackend,
        cfg: &BlockConfig,
    ) -> Result<Completion, RequestError>
    where
        M: GuestMemory + ?Sized,
    {
        let read_only = cfg.read_only || disk.read_only();
        let (status, written) = match self.request_type {
            RequestType::In => self.read(mem, disk),
            RequestType::Out if read_only => (BlkStatus::IoErr, 0),
            RequestType::Out => (self.write(mem, disk), 0),
            RequestType::Flush => match disk.flush() {
                Ok(()) => (BlkStatus::Ok, 0),
                Err(e) => {
                    warn!("virtio-blk flush failed: {e}");
                    (BlkStatus::IoErr, 0)
                }
            },
            RequestType::GetId => self.get_id(mem, cfg),
            RequestType::Discard | RequestType::WriteZeroes if read_only => (BlkStatus::IoErr, 0),
            RequestType::Discard | RequestType::WriteZeroes => (self.discard(mem, disk), 0),
            RequestType::Unsupported(t) => {
                debug!("virtio-blk request type {t} unsupported");
                (BlkStatus::Unsupp, 0)
            }
        };
        mem.write_obj(status as u8, self.status)
            .map_err(|source| RequestError::StatusWrite {
                addr: self.status.0,
                source,
            })?;
        Ok(Completion {
            status,
            used_len: u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX),
        })
    }

    /// Byte offset of `len` bytes at the request's sector, if they lie inside the disk.
    fn disk_offset(&self, disk: &dyn DiskBackend, len: u64) -> Option<u64> {
        disk_range(disk, self.sector, len)
    }

    /// `IN`: disk to device-writable buffers. Returns the status and the bytes written.
    fn read<M: GuestMemory + ?Sized>(&self, mem: &M, disk: &dyn DiskBackend) -> (BlkStatus, u64) {
        let len = self.writable.len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            debug!("virtio-blk read of {len} bytes: not whole sectors");
            return (BlkStatus::IoErr, 0);
        }
        let Some(offset) = self.disk_offset(disk, len) else {
            debug!(
                "virtio-blk read of {len} bytes at sector {} out of range",
                self.sector
            );
            return (BlkStatus::IoErr, 0);
        };
        let slices = match guest_slices(mem, &self.writable, 0, Permissions::Write) {
            Ok(s) => s,
            Err(e) => {
                debug!("virtio-blk read: guest buffers: {e}");
                return (BlkStatus::IoErr, 0);
            }
        };
        let result = disk.read_vectored_at(offset, &plain_slices(&slices));
        // Whatever the outcome, the disk may have written into every buffer.
        for slice in &slices {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        match result {
            Ok(()) => (BlkStatus::Ok, len),
            Err(e) => {
                warn!("virtio-blk read failed: {e}");
                (BlkStatus::IoErr, 0)
            }
        }
    }

    /// `OUT`: device-readable buffers to disk.
    fn write<M: GuestMemory + ?Sized>(&self, mem: &M, disk: &dyn DiskBackend) -> BlkStatus {
        let len = self.payload_len();
        if !len.is_multiple_of(SECTOR_SIZE) {
            debug!("virtio-blk write of {len} bytes: not whole sectors");
            return BlkStatus::IoErr;
        }
        let Some(offset) = self.disk_offset(disk, len) else {
            debug!(
                "virtio-blk write of {len} bytes at sector {} out of range",
                self.sector
            );
            return BlkStatus::IoErr;
        };
        let slices = match guest_slices(mem, &self.readable, REQUEST_HEADER_SIZE, Permissions::Read)
        {
            Ok(s) => s,
            Err(e) => {
                debug!("virtio-blk write: guest buffers: {e}");
                return BlkStatus::IoErr;
            }
        };
        match disk.write_vectored_at(offset, &plain_slices(&slices)) {
            Ok(()) => BlkStatus::Ok,
            Err(e) => {
                warn!("virtio-blk write failed: {e}");
                BlkStatus::IoErr
            }
        }
    }

    /// `GET_ID`: the serial, as much of it as fits.
    fn get_id<M: GuestMemory + ?Sized>(&self, mem: &M, cfg: &BlockConfig) -> (BlkStatus, u64) {
        let n = self.writable.len().min(VIRTIO_BLK_ID_BYTES as u64) as usize;
        match self.writable.cursor().write(mem, &cfg.serial[..n]) {
            Ok(()) => (BlkStatus::Ok, n as u64),
            Err(e) => {
                debug!("virtio-blk get-id: cannot fill guest buffer: {e}");
                (BlkStatus::IoErr, 0)
            }
        }
    }

    /// `DISCARD` and `WRITE_ZEROES`: validates every segment, then applies them in order.
    fn discard<M: GuestMemory + ?Sized>(&self, mem: &M, disk: &dyn DiskBackend) -> BlkStatus {
        let zeroes = self.request_type == RequestType::WriteZeroes;
        let (max_segments, max_sectors, allowed_flags) = if zeroes {
            (
                MAX_WRITE_ZEROES_SEGMENTS,
                MAX_WRITE_ZEROES_SECTORS,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            )
        } else {
            (MAX_DISCARD_SEGMENTS, MAX_DISCARD_SECTORS, 0)
        };
        let len = self.payload_len();
        let count = len / DISCARD_SEGMENT_SIZE;
        if len == 0 || !len.is_multiple_of(DISCARD_SEGMENT_SIZE) || count > u64::from(max_segments)
        {
            debug!("virtio-blk discard/write-zeroes with {len} bytes of segments");
            return BlkStatus::IoErr;
        }
        let mut raw = vec![0u8; len as usize];
        let mut cursor = self.readable.cursor();
        if let Err(e) = cursor
            .skip(REQUEST_HEADER_SIZE as usize)
            .and_then(|()| cursor.read(mem, &mut raw))
        {
            debug!("virtio-blk discard/write-zeroes: cannot read segments: {e}");
            return BlkStatus::IoErr;
        }

        let mut ranges = Vec::with_capacity(count as usize);
        for segment in raw.chunks_exact(DISCARD_SEGMENT_SIZE as usize) {
            let Ok([s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3]) =
                <[u8; 16]>::try_from(segment)
            else {
                return BlkStatus::IoErr;
            };
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            if flags & !allowed_flags != 0 {
                debug!("virtio-blk discard/write-zeroes flags {flags:#x} unsupported");
                return BlkStatus::Unsupp;
            }
            if num_sectors > max_sectors {
                debug!("virtio-blk discard/write-zeroes of {num_sectors} sectors: too many");
                return BlkStatus::IoErr;
            }
            let bytes = u64::from(num_sectors) << SECTOR_SHIFT;
            let Some(offset) = disk_range(disk, sector, bytes) else {
                debug!("virtio-blk discard/write-zeroes at sector {sector} out of range");
                return BlkStatus::IoErr;
            };
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            ranges.push((offset, bytes, unmap));
        }

        for (offset, bytes, unmap) in ranges {
            let result = if zeroes {
                disk.write_zeroes(offset, bytes, unmap)
            } else {
                disk.discard(offset, bytes)
            };
            if let Err(e) = result {
                warn!("virtio-blk discard/write-zeroes failed: {e}");
                return BlkStatus::IoErr;
            }
        }
        BlkStatus::Ok
    }
}

/// Byte offset of `len` bytes at `sector`, if `sector * 512 + len` neither overflows nor
/// passes the disk's last whole sector.
fn disk_range(disk: &dyn DiskBackend, sector: u64, len: u64) -> Option<u64> {
    let capacity = disk.size() >> SECTOR_SHIFT << SECTOR_SHIFT;
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= capacity).then_some(offset)
}

/// The guest memory behind `list`, from its byte `skip` on, as host memory slices.
fn guest_slices<'m, M: GuestMemory + ?Sized>(
    mem: &'m M,
    list: &SgList,
    skip: u64,
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>, GuestMemoryError> {
    let mut slices = Vec::with_capacity(list.segments().len());
    let mut skip = skip;
    for &(addr, len) in list.segments() {
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = addr
            .checked_add(skip)
            .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
        for slice in mem.get_slices(start, (len - skip) as usize, access)? {
            slices.push(slice?);
        }
        skip = 0;
    }
    Ok(slices)
}

/// `slices` without their dirty bitmap, the form [`DiskBackend`] takes (the caller marks what
/// the disk wrote).
fn plain_slices<'m, B: BitmapSlice>(slices: &[VolatileSlice<'m, B>]) -> Vec<VolatileSlice<'m>> {
    slices
        .iter()
        .map(|s| {
            // SAFETY: `s` guarantees `s.len()` bytes of mapped memory at its address for 'm,
            // accessed by everyone else through volatile accesses (or by the guest); the new
            // slice covers the same bytes for the same lifetime. The guard is trivial (no Xen
            // mapping), so the address stays valid after it is dropped.
            unsafe { VolatileSlice::new(s.ptr_guard_mut().as_ptr(), s.len()) }
        })
        .collect()
}

/// Parses and executes one chain: the per-chain step of [`process_queue`](crate::process_queue),
/// for devices that manage their queue themselves.
///
/// On `Ok`, put the chain's head in the used ring with [`Completion::used_len`]; on `Err`, put
/// it there with length 0.
pub fn process_chain<T>(
    mut chain: DescriptorChain<T>,
    disk: &dyn DiskBackend,
    cfg: &BlockConfig,
) -> Result<Completion, RequestError>
where
    T: Deref,
    T::Target: GuestMemory,
{
    let request = Request::parse(&mut chain)?;
    request.execute(chain.memory(), disk, cfg)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fake::FakeDisk;

    #[test]
    fn block_config_serial() {
        let c = BlockConfig::new(false, "abc");
        assert_eq!(&c.serial[..4], b"abc\0");
        let long = BlockConfig::new(true, "0123456789abcdefghijKLMN");
        assert_eq!(&long.serial, b"0123456789abcdefghij");
        assert!(long.read_only);
    }

    #[test]
    fn disk_range_checks() {
        let disk = FakeDisk::new(4096 + 100);
        assert_eq!(disk_range(&disk, 0, 4096), Some(0));
        assert_eq!(disk_range(&disk, 7, 512), Some(3584));
        // The partial sector at the end is not part of the disk.
        assert_eq!(disk_range(&disk, 8, 1), None);
        assert_eq!(disk_range(&disk, 8, 0), Some(4096));
        assert_eq!(disk_range(&disk, 9, 0), None);
        assert_eq!(disk_range(&disk, u64::MAX, 0), None);
        assert_eq!(disk_range(&disk, u64::MAX >> 9, 512), None);
        assert_eq!(disk_range(&disk, 0, u64::MAX), None);
    }
}
