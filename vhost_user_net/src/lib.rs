//! `vhost_user_net`: a vhost-user-net backend daemon forwarding a virtio-net device to a TAP
//! interface, for a vhost-user frontend — Nimbus, QEMU's `vhost-user` netdev, Cloud
//! Hypervisor's `--net vhost_user=true`.
//!
//! The vhost-user protocol is the `vhost-user-backend` crate's; what is virtio-net comes from
//! `net_util`, exactly as Nimbus's in-process device uses it: the feature bits
//! ([`net_util::features`]), the configuration space ([`net_util::VirtioNetConfig`]), the TAP
//! ([`net_util::Tap`]) and the data path ([`net_util::NetTx`], [`net_util::NetRx`]). There is
//! no second copy of any of them.
//!
//! - [`config`]: the `--net-backend` option (Cloud Hypervisor's syntax) as one typed struct;
//! - [`cli`]: the command line;
//! - [`backend`]: [`NetBackend`], the `VhostUserBackend` (one worker thread per queue pair);
//! - [`daemon`]: the TAP and the socket opened at start ([`daemon::start`]), then connections
//!   and termination ([`NetDaemon`]);
//! - [`seccomp`]: what the daemon's threads may call beyond every daemon's rules.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use vhost_user_backend::VhostUserBackend;
//! use vhost_user_net::NetBackend;
//! use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
//!
//! # let (tap0, _peer0) = net_util::FakeTap::new("t0").unwrap();
//! # let (tap1, _peer1) = net_util::FakeTap::new("t0").unwrap();
//! let taps: Vec<Arc<dyn net_util::TapQueue>> = vec![Arc::new(tap0), Arc::new(tap1)];
//! let mac = "52:54:00:12:34:56".parse().unwrap();
//! let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
//! let backend = NetBackend::new(taps, mac, None, 256, mem).unwrap();
//! assert_eq!(backend.num_queues(), 4);
//! assert_eq!(backend.queues_per_thread(), vec![0b0011, 0b1100]);
//! assert_eq!(backend.get_config(0, 6), mac.bytes());
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod seccomp;

pub use backend::{BackendError, NetBackend};
pub use config::{BackendConfig, ConfigError};
pub use daemon::{start, DaemonError, NetDaemon, Terminator};
