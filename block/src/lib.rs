//! Disk images and virtio-blk request handling, shared by the in-process device and the vhost-user daemon.
//!
//! The crate knows nothing about PCI, threads, eventfds or interrupts. It provides:
//!
//! - [`DiskBackend`], the narrow trait every disk image implements, with [`RawFile`] (a raw
//!   image or block device, optionally `O_DIRECT`, protected by an OFD lock) and, for tests,
//!   `FakeDisk` (feature `test-utils`);
//! - the virtio-blk definitions both device front ends share: [`features`],
//!   [`VirtioBlkConfig`];
//! - request processing over guest memory: [`Request::parse`] turns a
//!   [`virtio_queue::DescriptorChain`] into a [`Request`], [`Request::execute`] runs it against
//!   a disk and writes the status byte, and [`process_queue`] drains a whole
//!   [`virtio_queue::Queue`] (pop, execute, add to the used ring, `EVENT_IDX`-aware
//!   notification decision).
//!
//! Everything coming from the guest is treated as hostile: a bad request gets a virtio status
//! (`IOERR`/`UNSUPP`), a malformed descriptor chain gets a [`RequestError`], and nothing panics,
//! loops forever or touches memory outside the request.
//!
//! # Example
//!
//! ```
//! use block::{features, BlockConfig, FakeDisk, VirtioBlkConfig};
//!
//! let disk = FakeDisk::new(1 << 20);
//! let config = VirtioBlkConfig::for_disk(&disk, 1, 256);
//! assert_eq!(config.capacity.get(), 2048);
//! let offered = features(false, 1);
//! assert_ne!(offered, 0);
//! let _request_config = BlockConfig::new(false, "nimbus-disk0");
//! ```
#![deny(missing_docs)]

mod aligned;
mod disk;
#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod format;
mod queue;
mod raw;
mod request;
mod vectored;
mod virtio;

pub use disk::{BlockError, DiskBackend};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeDisk, FakeOp};
pub use format::{detect_format, ImageFormat};
pub use queue::{process_queue, process_queue_bounded, IoCounts, MalformedChain, QueueOutcome};
pub use raw::RawFile;
pub use request::{process_chain, BlockConfig, Completion, Request, RequestError};
pub use virtio::{
    features, BlkStatus, RequestType, VirtioBlkConfig, VirtioBlkGeometry, VirtioBlkTopology,
    DISCARD_SEGMENT_SIZE, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEGMENTS, REQUEST_HEADER_SIZE, SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES,
};
pub use virtio_chain::{ChainError, QueueError};
