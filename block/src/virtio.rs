//! virtio-blk definitions shared by the in-process device and the vhost-user daemon: feature
//! bits, configuration space layout, request types and status codes (virtio 1.2, 5.2).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::disk::DiskBackend;

/// virtio-blk sectors are always 512 bytes, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the request header (`type: le32, reserved: le32, sector: le64`).
pub const REQUEST_HEADER_SIZE: u64 = 16;
/// Length of a `GET_ID` answer: the serial, NUL-padded, not necessarily NUL-terminated.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Length of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_SIZE: u64 = 16;

/// Largest `num_sectors` of one discard segment we accept (and advertise): 2 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one discard request (Linux uses up to 256; fewer keeps requests short).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest `num_sectors` of one write-zeroes segment: 2 GiB.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// Most segments in one write-zeroes request.
pub const MAX_WRITE_ZEROES_SEGMENTS: u32 = 32;

/// Device features offered by a Nimbus virtio-blk device.
///
/// `VERSION_1`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`, `SEG_MAX`, `BLK_SIZE`, `FLUSH`;
/// `DISCARD` and `WRITE_ZEROES` unless `readonly`; `RO` if `readonly`; `MQ` if `num_queues > 1`.
///
/// The device must honour what the driver acknowledges: in particular call
/// `Queue::set_event_idx(true)` only when `VIRTIO_RING_F_EVENT_IDX` was negotiated.
pub fn features(readonly: bool, num_queues: u16) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
    ]
    .iter()
    .fold(0u64, |acc, &bit| acc | (1u64 << bit));
    if readonly {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    if num_queues > 1 {
        bits |= 1 << VIRTIO_BLK_F_MQ;
    }
    bits
}

/// Request status written in the last byte of a request (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlkStatus {
    /// `VIRTIO_BLK_S_OK`.
    Ok = VIRTIO_BLK_S_OK as u8,
    /// `VIRTIO_BLK_S_IOERR`: a bad request or a failed I/O.
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    /// `VIRTIO_BLK_S_UNSUPP`: an unknown request type or flag.
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// The request types Nimbus implements; any other value is [`RequestType::Unsupported`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN` (0): read sectors into device-writable buffers.
    In,
    /// `VIRTIO_BLK_T_OUT` (1): write sectors from device-readable buffers.
    Out,
    /// `VIRTIO_BLK_T_FLUSH` (4).
    Flush,
    /// `VIRTIO_BLK_T_GET_ID` (8): the 20-byte serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD` (11).
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES` (13).
    WriteZeroes,
    /// Anything else, answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// `struct virtio_blk_geometry`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C, packed)]
pub struct VirtioBlkGeometry {
    /// Cylinders.
    pub cylinders: U16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// `struct virtio_blk_topology`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C, packed)]
pub struct VirtioBlkTopology {
    /// Logical blocks per physical block, as a power of two.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in blocks.
    pub min_io_size: U16,
    /// Optimal (suggested maximum) I/O size, in blocks.
    pub opt_io_size: U32,
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (virtio 1.2, 5.2.4), little
/// endian, 60 bytes.
///
/// Fields whose feature is not offered by [`features`] (size_max, geometry, topology,
/// writeback) stay zero. The configuration space is read-only for the driver: Nimbus offers no
/// `CONFIG_WCE`, so writes to it are ignored.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C, packed)]
pub struct VirtioBlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: U64,
    /// Largest segment size (`VIRTIO_BLK_F_SIZE_MAX`; not offered).
    pub size_max: U32,
    /// Most data segments in one request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: U32,
    /// Legacy geometry (`VIRTIO_BLK_F_GEOMETRY`; not offered).
    pub geometry: VirtioBlkGeometry,
    /// Logical block size (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: U32,
    /// Topology (`VIRTIO_BLK_F_TOPOLOGY`; not offered).
    pub topology: VirtioBlkTopology,
    /// Cache mode (`VIRTIO_BLK_F_CONFIG_WCE`; not offered).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: U16,
    /// Largest discard segment, in sectors.
    pub max_discard_sectors: U32,
    /// Most segments in a discard request.
    pub max_discard_seg: U32,
    /// Discard alignment hint, in sectors.
    pub discard_sector_alignment: U32,
    /// Largest write-zeroes segment, in sectors.
    pub max_write_zeroes_sectors: U32,
    /// Most segments in a write-zeroes request.
    pub max_write_zeroes_seg: U32,
    /// 1 if a write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

const _: () = assert!(std::mem::size_of::<VirtioBlkConfig>() == 60);

impl VirtioBlkConfig {
    /// The configuration for a disk of `disk_size` bytes served by `num_queues` queues of
    /// `queue_size` entries, with a 512-byte logical block size.
    ///
    /// `capacity` is `disk_size / 512` (a partial last sector is not exposed); `seg_max` is
    /// `queue_size - 2` (room for the header and status descriptors), at least 1.
    pub fn new(disk_size: u64, num_queues: u16, queue_size: u16) -> Self {
        VirtioBlkConfig {
            capacity: U64::new(disk_size >> SECTOR_SHIFT),
            seg_max: U32::new(u32::from(queue_size.saturating_sub(2).max(1))),
            num_queues: U16::new(num_queues.max(1)),
            max_discard_sectors: U32::new(MAX_DISCARD_SECTORS),
            max_discard_seg: U32::new(MAX_DISCARD_SEGMENTS),
            max_write_zeroes_sectors: U32::new(MAX_WRITE_ZEROES_SECTORS),
            max_write_zeroes_seg: U32::new(MAX_WRITE_ZEROES_SEGMENTS),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
        .with_block_size(512)
    }

    /// The same configuration for a disk now `disk_size` bytes long (`capacity` only: a disk
    /// that was resized).
    pub fn with_disk_size(mut self, disk_size: u64) -> Self {
        self.capacity = U64::new(disk_size >> SECTOR_SHIFT);
        self
    }

    /// The configuration for `disk` (its size and logical block size).
    pub fn for_disk(disk: &dyn DiskBackend, num_queues: u16, queue_size: u16) -> Self {
        Self::new(disk.size(), num_queues, queue_size).with_block_size(disk.logical_block_size())
    }

    /// Sets `blk_size` and the matching discard alignment (`block_size / 512` sectors).
    /// Values that are not a power of two of at least 512 are replaced by 512.
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        let block_size = if block_size.is_power_of_two() && block_size >= 512 {
            block_size
        } else {
            512
        };
        self.blk_size = U32::new(block_size);
        self.discard_sector_alignment = U32::new(block_size >> SECTOR_SHIFT);
        self
    }

    /// The configuration space bytes, as the driver reads them (little endian, 60 bytes).
    pub fn as_bytes(&self) -> &[u8] {
        IntoBytes::as_bytes(self)
    }

    /// Copies the bytes at `offset..offset + data.len()` of this configuration into `data`,
    /// zero-filling whatever lies outside it (see [`virtio_chain::read_config`]).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        virtio_chain::read_config(self.as_bytes(), offset, data);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn config_layout_matches_spec() {
        assert_eq!(offset_of!(VirtioBlkConfig, capacity), 0);
        assert_eq!(offset_of!(VirtioBlkConfig, size_max), 8);
        assert_eq!(offset_of!(VirtioBlkConfig, seg_max), 12);
        assert_eq!(offset_of!(VirtioBlkConfig, geometry), 16);
        assert_eq!(offset_of!(VirtioBlkConfig, blk_size), 20);
        assert_eq!(offset_of!(VirtioBlkConfig, topology), 24);
        assert_eq!(offset_of!(VirtioBlkConfig, writeback), 32);
        assert_eq!(offset_of!(VirtioBlkConfig, num_queues), 34);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_sectors), 36);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_seg), 40);
        assert_eq!(offset_of!(VirtioBlkConfig, discard_sector_alignment), 44);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn config_values() {
        let c = VirtioBlkConfig::new(10 * 512 + 100, 4, 256);
        assert_eq!(c.capacity.get(), 10);
        assert_eq!(c.seg_max.get(), 254);
        assert_eq!(c.num_queues.get(), 4);
        assert_eq!(c.blk_size.get(), 512);
        assert_eq!(c.discard_sector_alignment.get(), 1);
        let bytes = c.as_bytes();
        assert_eq!(&bytes[0..8], &10u64.to_le_bytes());
        assert_eq!(&bytes[34..36], &4u16.to_le_bytes());
        assert_eq!(bytes[56], 1);

        let c = c.with_block_size(4096);
        assert_eq!(c.blk_size.get(), 4096);
        assert_eq!(c.discard_sector_alignment.get(), 8);
        assert_eq!(c.with_block_size(1000).blk_size.get(), 512);
        assert_eq!(VirtioBlkConfig::new(0, 0, 1).seg_max.get(), 1);
    }

    #[test]
    fn read_config_bounds() {
        let c = VirtioBlkConfig::new(0x1122_3344_5566_7788 << 9, 1, 128);
        let mut d = [0xffu8; 4];
        c.read(0, &mut d);
        assert_eq!(d, [0x88, 0x77, 0x66, 0x55]);
        let mut d = [0xffu8; 8];
        c.read(58, &mut d);
        assert_eq!(d, [0, 0, 0, 0, 0, 0, 0, 0]);
        let mut d = [0xffu8; 4];
        c.read(56, &mut d);
        assert_eq!(d, [1, 0, 0, 0]);
        let mut d = [0xffu8; 4];
        c.read(60, &mut d);
        assert_eq!(d, [0; 4]);
        c.read(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn feature_bits() {
        let rw = features(false, 1);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(rw & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(rw & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_MQ), 0);
        let ro = features(true, 4);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(ro & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn request_types() {
        assert_eq!(RequestType::from(0), RequestType::In);
        assert_eq!(RequestType::from(1), RequestType::Out);
        assert_eq!(RequestType::from(4), RequestType::Flush);
        assert_eq!(RequestType::from(8), RequestType::GetId);
        assert_eq!(RequestType::from(11), RequestType::Discard);
        assert_eq!(RequestType::from(13), RequestType::WriteZeroes);
        assert_eq!(RequestType::from(2), RequestType::Unsupported(2));
        assert_eq!(BlkStatus::Unsupp as u8, 2);
    }
}
