//! TAP devices and virtio-net, shared by the in-process device and the vhost-user-net daemon.
//!
//! The crate knows nothing about PCI, threads, eventfds or interrupts. It provides:
//!
//! - [`Tap`]: a queue of a Linux TAP interface (`/dev/net/tun` with a virtio-net header),
//!   opened by name ([`Tap::open_named`], one descriptor per queue pair) or adopted from a
//!   descriptor a manager passed ([`Tap::from_fd`]), plus host-side interface configuration
//!   (address, MAC, MTU, up) through ioctls; [`TapQueue`] is the narrow interface the data path
//!   uses, with `FakeTap` (feature `test-utils`) standing in for it;
//! - [`MacAddr`];
//! - the virtio-net definitions both front ends share: [`features`], [`VirtioNetConfig`],
//!   [`tap_offload_flags`], queue numbering ([`num_queues`], [`ctrl_queue_index`]);
//! - the data path over guest memory: [`NetTx`] (transmit queue → TAP), [`NetRx`] (TAP →
//!   receive queue, with or without mergeable buffers) and [`process_ctrl`] (control queue).
//!
//! Everything coming from the guest is treated as hostile: a malformed chain is returned with
//! length 0 and counted, an oversized packet is dropped, nothing panics, loops forever or
//! touches memory outside a descriptor. A broken queue (unreadable rings, head index out of
//! range) is a [`QueueError`], after which the device needs a reset.
//!
//! # Example
//!
//! ```
//! use net_util::{features, num_queues, tap_offload_flags, MacAddr, VirtioNetConfig};
//!
//! let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
//! let config = VirtioNetConfig::new(mac, 2, Some(1500));
//! assert_eq!(config.max_virtqueue_pairs.get(), 2);
//! let offered = features(2, Some(1500));
//! assert_eq!(num_queues(2), 5);
//! // A driver accepting everything lets the TAP hand over partial checksums and GSO packets.
//! assert_ne!(tap_offload_flags(offered), 0);
//! ```
#![deny(missing_docs)]

mod ctrl;
#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod mac;
mod rx;
mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod tx;
mod virtio;

pub use ctrl::{process_ctrl, CtrlCommand, CtrlOutcome};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeTap, FakeTapPeer};
pub use mac::{MacAddr, ParseMacError, MAC_ADDR_LEN};
pub use rx::{NetRx, RxOutcome, RxStop};
pub use tap::{NetError, Tap, TapQueue, MAX_TAP_QUEUES, TUN_DEVICE};
pub use tx::{NetTx, TxOutcome};
pub use virtio::{
    ctrl_queue_index, features, features_with_offloads, has_feature, num_queues, tap_offload_flags,
    Offloads, VirtioNetConfig, CTRL_ACK_ERR, CTRL_ACK_OK, CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET,
    ETH_HLEN, MAX_FRAME_LEN, MAX_PACKET_LEN, MAX_QUEUE_PAIRS, MIN_MTU, VNET_HDR_LEN,
    VNET_HDR_NUM_BUFFERS_OFFSET,
};
pub use virtio_chain::{ChainError, MalformedChain, QueueError};
