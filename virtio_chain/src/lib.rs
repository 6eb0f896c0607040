//! Virtio descriptor chains taken apart: what every device does before it looks at a request.
//!
//! - [`split`] walks a [`virtio_queue::DescriptorChain`] and splits it into its device-readable
//!   and device-writable parts, each an [`SgList`], checking every buffer against guest memory
//!   and the readable-then-writable order; a chain that is not usable is a [`ChainError`].
//! - [`SgList`] sees the ranges of one part as a single byte stream, read and written through
//!   an [`SgCursor`] (or all at once with [`SgList::read_into`] and [`SgList::write_from`]).
//! - [`MalformedChain`] is how a device reports a chain it returned with used length 0.
//! - [`queue::drain`] is the loop that serves a queue's available chains within a budget, with
//!   driver notifications suppressed meanwhile; a queue that is broken is a [`QueueError`].
//! - [`read_config`] reads a device's configuration space (zeros past its end).
//! - `testing::TestDriver` (feature `test-utils`) is the driver side of a split virtqueue in
//!   guest memory, for device tests.
//!
//! Everything coming from the guest is treated as hostile: the walk is bounded (by the queue
//! size, the indirect table size and 4 GiB, as `virtio_queue` enforces), nothing panics, and
//! every access goes through the checked [`vm_memory::Bytes`] API.
//!
//! # Example
//!
//! ```
//! use virtio_chain::testing::{Buf, TestDriver};
//! use virtio_queue::QueueOwnedT;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let mut driver = TestDriver::new(&mem, 16, 0, 0x10000);
//! let request = driver.alloc_data(b"hello");
//! let reply = driver.alloc(8, 0);
//! driver.add_chain(&[Buf::r(request, 5), Buf::w(reply, 8)]);
//!
//! let mut queue = driver.queue(false);
//! let mut chain = queue.iter(&mem).unwrap().next().unwrap();
//! let parts = virtio_chain::split(&mut chain).unwrap();
//! assert_eq!((parts.readable.len(), parts.writable.len(), parts.descriptors), (5, 8, 2));
//!
//! let mut hello = [0u8; 5];
//! parts.readable.read_into(&mem, &mut hello).unwrap();
//! assert_eq!(&hello, b"hello");
//! assert_eq!(parts.writable.write_from(&mem, b"hi there, too long"), 8);
//! assert_eq!(driver.read(reply, 8), b"hi there");
//! ```
#![deny(missing_docs)]

mod config;
mod sg;
mod split;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub mod notify;
pub mod poll;
pub mod queue;

pub use config::read_config;
pub use notify::needs_notification;
pub use queue::QueueError;
pub use sg::{SgCursor, SgError, SgList};
pub use split::{split, ChainError, MalformedChain, Split};
