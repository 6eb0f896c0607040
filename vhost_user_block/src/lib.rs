//! `vhost_user_block`: a vhost-user-blk backend daemon serving one raw disk image (or block
//! device) to a vhost-user frontend — Nimbus, QEMU's `vhost-user-blk-pci`, Cloud Hypervisor.
//!
//! The vhost-user protocol is the `vhost-user-backend` crate's; what is virtio-blk comes from
//! the `block` crate, exactly as Nimbus's in-process device uses it: the feature bits
//! ([`block::features`]), the configuration space ([`block::VirtioBlkConfig`]), and request
//! parsing and execution ([`block::process_queue_bounded`]: `process_queue` with a budget per
//! call). There is no second copy of any of them.
//!
//! - [`config`]: the `--block-backend` option (Cloud Hypervisor's syntax) as one typed struct;
//! - [`cli`]: the command line;
//! - [`backend`]: [`BlockBackend`], the `VhostUserBackend` (one worker thread per queue);
//! - [`daemon`]: the disk and the socket opened at start ([`daemon::start`]), then
//!   connections and termination ([`BlockDaemon`]);
//! - [`seccomp`]: what the daemon's threads may call beyond every daemon's rules.
//!
//! # Example
//!
//! A backend for a disk, as the daemon builds one per frontend connection:
//!
//! ```
//! use std::sync::Arc;
//! use vhost_user_backend::VhostUserBackend;
//! use vhost_user_block::{BackendConfig, BlockBackend};
//! use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
//!
//! let disk = Arc::new(block::FakeDisk::new(1 << 20));
//! let config = BackendConfig::parse("path=/unused,socket=/unused,num_queues=2").unwrap();
//! let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
//! let backend = BlockBackend::new(disk, &config, mem).unwrap();
//! assert_eq!(backend.num_queues(), 2);
//! assert_eq!(backend.queues_per_thread(), vec![0b01, 0b10]);
//! // Capacity in sectors, the first field of the configuration space.
//! assert_eq!(backend.get_config(0, 8), 2048u64.to_le_bytes());
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod seccomp;

pub use backend::{BackendError, BlockBackend};
pub use config::{BackendConfig, ConfigError};
pub use daemon::{start, BlockDaemon, DaemonError, Terminator};
