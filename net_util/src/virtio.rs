//! virtio-net definitions shared by the in-process device and the vhost-user daemon: feature
//! bits, configuration space layout, the per-packet header and the control queue numbers
//! (virtio 1.2, 5.1), and the mapping from negotiated features to TAP offloads.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::mac::MacAddr;

/// Length of `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): the header in front of every packet once `VERSION_1` is
/// negotiated, and the TAP's vnet header size (`TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
pub const VNET_HDR_NUM_BUFFERS_OFFSET: usize = 10;
/// Largest Ethernet frame, without the virtio-net header, the device moves in either
/// direction: a 64 KiB GSO packet with its Ethernet and VLAN headers fits. Bigger transmit
/// chains are dropped.
pub const MAX_FRAME_LEN: usize = 65562;
/// Largest packet, header included, that crosses the TAP.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Length of an Ethernet header; a shorter frame is malformed.
pub const ETH_HLEN: usize = 14;
/// Smallest MTU a virtio-net device may report (virtio 1.2, 5.1.4.1).
pub const MIN_MTU: u16 = 68;
/// Most queue pairs `max_virtqueue_pairs` may announce (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX`).
pub const MAX_QUEUE_PAIRS: usize = 0x8000;

/// `VIRTIO_NET_OK`: the control command succeeded.
pub const CTRL_ACK_OK: u8 = 0;
/// `VIRTIO_NET_ERR`: the control command failed or is not supported.
pub const CTRL_ACK_ERR: u8 = 1;
/// `VIRTIO_NET_CTRL_MQ`: the multiqueue command class.
pub const CTRL_CLASS_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: how many queue pairs the driver uses (le16 argument).
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Device features offered by a Nimbus virtio-net device with `num_queue_pairs` queue pairs.
///
/// Always: `VERSION_1`, `RING_EVENT_IDX`, `RING_INDIRECT_DESC`, `MAC`, `STATUS`, `MRG_RXBUF`,
/// checksum offload both ways (`CSUM`, `GUEST_CSUM`) and segmentation offload both ways
/// (`HOST_TSO4/6`, `HOST_ECN`, `HOST_UFO`, `GUEST_TSO4/6`, `GUEST_ECN`, `GUEST_UFO`); `MTU`
/// when `mtu` is given; `CTRL_VQ` and `MQ` when there is more than one pair (the control
/// queue only implements `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`, which Linux needs to use more
/// than one pair).
///
/// The device must honour what the driver acknowledges: `Queue::set_event_idx(true)` only with
/// `RING_EVENT_IDX`, the TAP offloads from [`tap_offload_flags`], mergeable receive buffers
/// only with `MRG_RXBUF`.
pub fn features(num_queue_pairs: usize, mtu: Option<u16>) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
    ]
    .iter()
    .fold(0u64, |acc, &b| acc | bit(b));
    if mtu.is_some() {
        bits |= bit(VIRTIO_NET_F_MTU);
    }
    if num_queue_pairs > 1 {
        bits |= bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
    }
    bits
}

/// Which offloads a device offers: Cloud Hypervisor's `offload_csum`, `offload_tso` and
/// `offload_ufo` options. All on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    /// Checksum offload both ways (`CSUM`, `GUEST_CSUM`); segmentation offloads need it.
    pub csum: bool,
    /// TCP segmentation offload both ways (`HOST_TSO4/6`, `HOST_ECN`, `GUEST_TSO4/6`,
    /// `GUEST_ECN`).
    pub tso: bool,
    /// UDP fragmentation offload both ways (`HOST_UFO`, `GUEST_UFO`).
    pub ufo: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads {
            csum: true,
            tso: true,
            ufo: true,
        }
    }
}

impl Offloads {
    /// The feature bits these settings withdraw from the offer.
    pub fn withdrawn(&self) -> u64 {
        let tso = [
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | bit(b));
        let ufo = bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
        let csum = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
        let mut bits = 0;
        if !self.csum {
            // Segmentation offloads require checksum offload (virtio 1.2, 5.1.3.1).
            bits |= csum | tso | ufo;
        }
        if !self.tso {
            bits |= tso;
        }
        if !self.ufo {
            bits |= ufo;
        }
        bits
    }
}

/// [`features`] with only the offloads `offloads` allows.
pub fn features_with_offloads(num_queue_pairs: usize, mtu: Option<u16>, offloads: Offloads) -> u64 {
    features(num_queue_pairs, mtu) & !offloads.withdrawn()
}

/// Number of virtqueues of a device with `num_queue_pairs` pairs: receive `2i`, transmit
/// `2i + 1`, and the control queue last when [`features`] offers `CTRL_VQ`.
pub fn num_queues(num_queue_pairs: usize) -> usize {
    2 * num_queue_pairs + usize::from(num_queue_pairs > 1)
}

/// Index of the control queue of a device with `num_queue_pairs` pairs once the driver
/// accepted `features`: none without `CTRL_VQ`; after the last pair with `MQ`, else 2 (virtio
/// 1.2, 5.1.2: without `MQ` the driver sees one pair, whatever the device has).
pub fn ctrl_queue_index(num_queue_pairs: usize, features: u64) -> Option<usize> {
    if !has_feature(features, VIRTIO_NET_F_CTRL_VQ) {
        return None;
    }
    Some(if has_feature(features, VIRTIO_NET_F_MQ) {
        2 * num_queue_pairs
    } else {
        2
    })
}

/// Whether feature bit `feature` (e.g. `VIRTIO_NET_F_MRG_RXBUF`) is set in `features`.
pub fn has_feature(features: u64, feature: u32) -> bool {
    feature < 64 && features & bit(feature) != 0
}

/// The TAP offloads (`TUNSETOFFLOAD` flags) matching the features the driver accepted.
///
/// These say what the TAP may hand to the device, so they follow the guest's receive
/// capabilities: `TUN_F_CSUM` with `GUEST_CSUM`, and only then `TUN_F_TSO4/6` with
/// `GUEST_TSO4/6`, `TUN_F_TSO_ECN` with `GUEST_ECN` (and a TSO bit), `TUN_F_UFO` with
/// `GUEST_UFO`. Packets the guest sends are accepted by the TAP whatever these flags are.
pub fn tap_offload_flags(negotiated: u64) -> u32 {
    if !has_feature(negotiated, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has_feature(negotiated, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has_feature(negotiated, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has_feature(negotiated, VIRTIO_NET_F_GUEST_ECN)
        && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0
    {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has_feature(negotiated, VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// `struct virtio_net_config` (virtio 1.2, 5.1.4), little endian, 24 bytes.
///
/// Fields whose feature is not offered by [`features`] (speed/duplex, RSS) stay zero; the
/// driver reads `max_virtqueue_pairs` only with `MQ` and `mtu` only with `MTU`. The space is
/// read-only for a `VERSION_1` driver.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C, packed)]
pub struct VirtioNetConfig {
    /// The guest's MAC address (`VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_LINK_UP` and friends (`VIRTIO_NET_F_STATUS`).
    pub status: U16,
    /// Queue pairs the device has (`VIRTIO_NET_F_MQ`).
    pub max_virtqueue_pairs: U16,
    /// Largest MTU the driver should use (`VIRTIO_NET_F_MTU`).
    pub mtu: U16,
    /// Link speed in Mbit/s (`VIRTIO_NET_F_SPEED_DUPLEX`; not offered).
    pub speed: U32,
    /// Duplex (`VIRTIO_NET_F_SPEED_DUPLEX`; not offered).
    pub duplex: u8,
    /// RSS key size (`VIRTIO_NET_F_RSS`; not offered).
    pub rss_max_key_size: u8,
    /// RSS indirection table length (not offered).
    pub rss_max_indirection_table_length: U16,
    /// Supported hash types (not offered).
    pub supported_hash_types: U32,
}

const _: () = assert!(std::mem::size_of::<VirtioNetConfig>() == 24);

impl VirtioNetConfig {
    /// The configuration of a device with guest address `mac`, `num_queue_pairs` pairs
    /// (clamped to 1..=0x8000) and, if given, `mtu`; the link is up.
    pub fn new(mac: MacAddr, num_queue_pairs: usize, mtu: Option<u16>) -> Self {
        let pairs = num_queue_pairs.clamp(1, MAX_QUEUE_PAIRS);
        VirtioNetConfig {
            mac: mac.bytes(),
            // VIRTIO_NET_S_LINK_UP is 1; the cast cannot truncate.
            status: U16::new(VIRTIO_NET_S_LINK_UP as u16),
            max_virtqueue_pairs: U16::new(u16::try_from(pairs).unwrap_or(u16::MAX)),
            mtu: U16::new(mtu.unwrap_or(0)),
            ..Default::default()
        }
    }

    /// The configuration space bytes, as the driver reads them.
    pub fn as_bytes(&self) -> &[u8] {
        IntoBytes::as_bytes(self)
    }

    /// Copies the bytes at `offset..offset + data.len()` into `data`, zero-filling whatever
    /// lies outside the configuration (see [`virtio_chain::read_config`]).
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
        assert_eq!(offset_of!(VirtioNetConfig, mac), 0);
        assert_eq!(offset_of!(VirtioNetConfig, status), 6);
        assert_eq!(offset_of!(VirtioNetConfig, max_virtqueue_pairs), 8);
        assert_eq!(offset_of!(VirtioNetConfig, mtu), 10);
        assert_eq!(offset_of!(VirtioNetConfig, speed), 12);
        assert_eq!(offset_of!(VirtioNetConfig, duplex), 16);
        assert_eq!(offset_of!(VirtioNetConfig, rss_max_key_size), 17);
        assert_eq!(
            offset_of!(VirtioNetConfig, rss_max_indirection_table_length),
            18
        );
        assert_eq!(offset_of!(VirtioNetConfig, supported_hash_types), 20);
    }

    #[test]
    fn config_values_and_reads() {
        let mac = MacAddr::from_bytes([0x52, 0x54, 0, 1, 2, 3]);
        let c = VirtioNetConfig::new(mac, 4, Some(9000));
        let b = c.as_bytes();
        assert_eq!(&b[0..6], &mac.bytes());
        assert_eq!(&b[6..8], &1u16.to_le_bytes());
        assert_eq!(&b[8..10], &4u16.to_le_bytes());
        assert_eq!(&b[10..12], &9000u16.to_le_bytes());
        assert_eq!(&b[12..], &[0; 12]);
        let mut d = [0xffu8; 4];
        c.read(22, &mut d);
        assert_eq!(d, [0; 4]);
        c.read(4, &mut d);
        assert_eq!(d, [2, 3, 1, 0]);
        c.read(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(
            VirtioNetConfig::new(mac, 0, None).max_virtqueue_pairs.get(),
            1
        );
        assert_eq!(
            VirtioNetConfig::new(mac, 1 << 20, None)
                .max_virtqueue_pairs
                .get(),
            0x8000
        );
    }

    #[test]
    fn feature_bits() {
        let one = features(1, None);
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
        ] {
            assert!(has_feature(one, b), "bit {b}");
        }
        for b in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MTU] {
            assert!(!has_feature(one, b), "bit {b}");
        }
        let multi = features(2, Some(1500));
        for b in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MTU] {
            assert!(has_feature(multi, b), "bit {b}");
        }
        assert!(!has_feature(u64::MAX, 64));
        assert_eq!(num_queues(1), 2);
        assert_eq!(num_queues(4), 9);
        let ctrl = bit(VIRTIO_NET_F_CTRL_VQ);
        let mq = bit(VIRTIO_NET_F_MQ);
        assert_eq!(ctrl_queue_index(4, features(4, None) & !ctrl), None);
        assert_eq!(ctrl_queue_index(4, ctrl | mq), Some(8));
        assert_eq!(ctrl_queue_index(4, ctrl), Some(2));
        assert_eq!(ctrl_queue_index(1, ctrl), Some(2));
    }

    #[test]
    fn offloads_can_be_withdrawn() {
        let all = features(1, None);
        assert_eq!(features_with_offloads(1, None, Offloads::default()), all);
        let no_csum = features_with_offloads(
            1,
            None,
            Offloads {
                csum: false,
                ..Default::default()
            },
        );
        assert_eq!(tap_offload_flags(no_csum), 0);
        assert!(!has_feature(no_csum, VIRTIO_NET_F_CSUM));
        assert!(!has_feature(no_csum, VIRTIO_NET_F_HOST_TSO4));
        assert!(has_feature(no_csum, VIRTIO_NET_F_MRG_RXBUF));
        let no_tso = features_with_offloads(
            1,
            None,
            Offloads {
                tso: false,
                ..Default::default()
            },
        );
        assert_eq!(
            tap_offload_flags(no_tso),
            libc::TUN_F_CSUM | libc::TUN_F_UFO
        );
        let no_ufo = features_with_offloads(
            1,
            None,
            Offloads {
                ufo: false,
                ..Default::default()
            },
        );
        assert!(!has_feature(no_ufo, VIRTIO_NET_F_HOST_UFO));
        assert!(has_feature(no_ufo, VIRTIO_NET_F_HOST_TSO6));
    }

    #[test]
    fn offloads_follow_guest_receive_features() {
        assert_eq!(tap_offload_flags(0), 0);
        // TSO without checksum offload is refused by the TAP: never ask for it.
        assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        // Host (transmit) offloads do not matter.
        assert_eq!(
            tap_offload_flags(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM)),
            0
        );
        assert_eq!(
            tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offload_flags(features(1, None)),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
    }
}
