//! `vhost_user_daemon`: what the vhost-user backend daemons (`vhost_user_block`,
//! `vhost_user_net`) share, so that each keeps only its backend and its option's keys.
//!
//! - [`socket`]: the listening socket ([`SocketFile`]), termination ([`Terminator`]) and the
//!   common errors ([`DaemonError`]);
//! - [`serve`](mod@serve): the connection loop, generic over the daemon's [`Device`];
//! - [`exit`]: the worker threads' exit events ([`ExitEvents`]);
//! - [`memory`]: guest memory and rings as the backends see them ([`MemorySlot`]);
//! - [`vring`](mod@vring): the rings, whose notification descriptors from the frontend are
//!   checked ([`Vring`]);
//! - [`fault`]: guest memory that the frontend shrinks under the daemon (`SIGBUS`);
//! - [`cli`]: the command line, generic over the daemon's [`cli::BackendOption`];
//! - [`program`]: the binaries' `main` (logger, signals, system call filters, exit status);
//! - [`seccomp`]: what each class of a daemon's threads may call, and [`Filtered`], through
//!   which the backend crate's threads apply their filters;
//! - `testing` (feature `test-utils`): the daemons' integration-test harness.
#![deny(missing_docs)]

pub mod cli;
pub mod config_space;
pub mod exit;
pub mod fault;
pub mod memory;
pub mod options;
pub mod program;
pub mod seccomp;
pub mod serve;
pub mod socket;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod vring;

pub use exit::ExitEvents;
pub use memory::{GuestMemory, MemorySlot, Vring};
pub use seccomp::{DeviceRules, Filtered};
pub use serve::{drop_connection, serve, serve_client, ConnectionFault, Device};
pub use socket::{DaemonError, SocketFile, Terminator};
