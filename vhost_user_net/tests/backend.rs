//! [`NetBackend`] as the backend crate's worker threads drive it: rings set up through the
//! `VringT` calls the protocol handler makes, packets written by `net_util`'s `TestDriver`,
//! `handle_event` called as for a kick or a readable TAP, a `FakeTap` in place of the TAP.
//! Also the configuration space and the negotiation values.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use net_util::testing::Buf;
use net_util::{tap_offload_flags, FakeTap, FakeTapPeer, MacAddr, TapQueue};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use vhost_user_daemon::testing::DeviceRing;
use vhost_user_net::NetBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 16;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x01, 0x02, 0x03];
const HDR: usize = 12;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

struct Setup {
    mem: GuestMemoryMmap,
    atomic: Mem,
    backend: NetBackend,
    peers: Vec<FakeTapPeer>,
}

fn setup(pairs: usize, mtu: Option<u16>) -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let mut taps: Vec<Arc<dyn TapQueue>> = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..pairs {
        let (tap, peer) = FakeTap::new("fake0").unwrap();
        taps.push(Arc::new(tap));
        peers.push(peer);
    }
    let backend = NetBackend::new(taps, MacAddr::from(MAC), mtu, 256, atomic.clone()).unwrap();
    Setup {
        mem,
        atomic,
        backend,
        peers,
    }
}

type Ring = DeviceRing;

fn ring(s: &Setup, area: u64, event_idx: bool) -> Ring {
    DeviceRing::new(&s.mem, &s.atomic, QSIZE, 256, area, event_idx)
}

fn frame(tag: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((0..100u8).map(|i| i ^ tag));
    f
}

/// What worker `pair` does on event `event`.
fn event(s: &Setup, rx: &Ring, tx: &Ring, pair: usize, event: u16) {
    s.backend
        .handle_event(
            event,
            EventSet::IN,
            &[rx.vring.clone(), tx.vring.clone()],
            pair,
        )
        .unwrap();
}

#[test]
fn negotiation_values() {
    let s = setup(1, Some(1500));
    let f = s.backend.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MTU,
    ] {
        assert_ne!(f & (1 << bit), 0, "{bit}");
    }
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert_eq!(f & (1 << VIRTIO_NET_F_MQ), 0);
    assert_eq!(
        s.backend.protocol_features(),
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    );
    assert_eq!(s.backend.num_queues(), 2);
    assert_eq!(s.backend.max_queue_size(), 256);
    assert_eq!(s.backend.tap_event(), 3);
    let config = s.backend.get_config(0, 24);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(&config[6..8], &[1, 0], "LINK_UP");
    assert_eq!(&config[8..10], &[1, 0]);
    assert_eq!(&config[10..12], &1500u16.to_le_bytes());
    // Cloud Hypervisor's offset convention, and zero fill past the end.
    assert_eq!(s.backend.get_config(0x100, 24), config);
    assert_eq!(s.backend.get_config(8, 4), [1, 0, 0xdc, 0x05]);
    assert_eq!(s.backend.get_config(20, 8), [0; 8]);

    let s = setup(3, None);
    assert_eq!(s.backend.num_queues(), 6);
    assert_eq!(s.backend.queues_per_thread(), [0b11, 0b1100, 0b11_0000]);
    assert_eq!(s.backend.tap_event(), 7);
    let f = s.backend.features();
    assert_ne!(f & (1 << VIRTIO_NET_F_MQ), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(f & (1 << VIRTIO_NET_F_MTU), 0);
    assert_eq!(&s.backend.get_config(8, 2)[..], &[3, 0]);
}

#[test]
fn no_or_too_many_taps_are_refused() {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    assert!(NetBackend::new(Vec::new(), MacAddr::from(MAC), None, 256, mem.clone()).is_err());
    let taps: Vec<Arc<dyn TapQueue>> = (0..33)
        .map(|_| Arc::new(FakeTap::new("t").unwrap().0) as Arc<dyn TapQueue>)
        .collect();
    assert!(NetBackend::new(taps, MacAddr::from(MAC), None, 256, mem).is_err());
}

#[test]
fn acked_features_set_the_tap_offloads() {
    let s = setup(2, None);
    let all = s.backend.features();
    s.backend.acked_features(all);
    assert_eq!(s.backend.acked_features_value(), all);
    for p in &s.peers {
        assert_eq!(p.offload(), tap_offload_flags(all));
        assert_ne!(p.offload(), 0);
    }
    s.backend
        .acked_features(all & !(1 << VIRTIO_NET_F_GUEST_CSUM));
    for p in &s.peers {
        assert_eq!(p.offload(), 0);
    }
}

#[test]
fn frames_both_ways() {
    let s = setup(1, None);
    s.backend.acked_features(s.backend.features());
    let mut rx = ring(&s, 0x1_0000, true);
    let mut tx = ring(&s, 0x4_0000, true);

    // Transmit: a kick on queue 1 (event 1 of the worker).
    let mut packet = vec![0u8; HDR];
    packet.extend_from_slice(&frame(1));
    let addr = tx.driver.alloc_data(&packet);
    tx.driver.add_chain(&[Buf::r(addr, packet.len() as u32)]);
    event(&s, &rx, &tx, 0, 1);
    assert_eq!(s.peers[0].try_recv().unwrap().unwrap(), packet);
    assert_eq!(tx.driver.take_used().len(), 1);
    assert!(tx.called());

    // Receive: a packet waits on the TAP while the ring has no buffers: nothing happens.
    let mut incoming = vec![0u8; HDR];
    incoming.extend_from_slice(&frame(2));
    s.peers[0].send(&incoming).unwrap();
    event(&s, &rx, &tx, 0, s.backend.tap_event() as u16);
    assert!(rx.driver.take_used().is_empty());
    // Buffers and the driver's kick: delivered, num_buffers = 1.
    let buf = rx.driver.alloc(2048, 0);
    rx.driver.add_chain(&[Buf::w(buf, 2048)]);
    event(&s, &rx, &tx, 0, 0);
    let used = rx.driver.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1 as usize, incoming.len());
    let got = rx.driver.read(buf, incoming.len());
    assert_eq!(&got[HDR..], &incoming[HDR..]);
    assert_eq!(&got[10..12], &[1, 0]);
    assert!(rx.called());
}

#[test]
fn disabled_rings_are_left_alone() {
    let s = setup(1, None);
    let rx = ring(&s, 0x1_0000, false);
    let mut tx = ring(&s, 0x4_0000, false);
    let mut packet = vec![0u8; HDR];
    packet.extend_from_slice(&frame(3));
    let addr = tx.driver.alloc_data(&packet);
    tx.driver.add_chain(&[Buf::r(addr, packet.len() as u32)]);
    tx.vring.set_enabled(false);
    event(&s, &rx, &tx, 0, 1);
    assert!(s.peers[0].try_recv().unwrap().is_none());
    tx.vring.set_enabled(true);
    event(&s, &rx, &tx, 0, 1);
    assert_eq!(s.peers[0].try_recv().unwrap().unwrap(), packet);
    assert_eq!(tx.driver.take_used().len(), 1);
}

#[test]
fn a_pair_keeps_its_tap_queue_only_while_its_receive_ring_runs() {
    let s = setup(2, None);
    // Until the driver asks for more pairs, only the first pair's TAP queue takes packets.
    assert!(s.peers[0].queue_enabled());
    assert!(!s.peers[1].queue_enabled());
    let rx = ring(&s, 0x1_0000, false);
    let tx = ring(&s, 0x4_0000, false);
    rx.vring.set_enabled(false);
    event(&s, &rx, &tx, 1, 2 * 2 + 1);
    assert!(!s.peers[1].queue_enabled());
    // SET_VRING_ENABLE(1) on the receive ring, then the frontend's kick.
    rx.vring.set_enabled(true);
    event(&s, &rx, &tx, 1, 0);
    assert!(s.peers[1].queue_enabled());
    // Stopped again (VQ_PAIRS_SET with fewer pairs): the next packet's wake-up detaches it.
    rx.vring.set_enabled(false);
    event(&s, &rx, &tx, 1, 2 * 2 + 1);
    assert!(!s.peers[1].queue_enabled());
    // The first pair's queue stays attached whatever its ring does.
    event(&s, &rx, &tx, 0, 2 * 2 + 1);
    assert!(s.peers[0].queue_enabled());
}

#[test]
fn stopping_the_receive_ring_drops_the_waiting_packet() {
    let s = setup(1, None);
    s.backend.acked_features(s.backend.features());
    let mut rx = ring(&s, 0x1_0000, false);
    let tx = ring(&s, 0x4_0000, false);
    let mut incoming = vec![0u8; HDR];
    incoming.extend_from_slice(&frame(4));
    s.peers[0].send(&incoming).unwrap();
    // Read from the TAP, held for lack of buffers.
    event(&s, &rx, &tx, 0, s.backend.tap_event() as u16);
    // GET_VRING_BASE on the receive ring.
    s.backend.stop_vring(0).unwrap();
    let buf = rx.driver.alloc(2048, 0);
    rx.driver.add_chain(&[Buf::w(buf, 2048)]);
    event(&s, &rx, &tx, 0, 0);
    assert!(rx.driver.take_used().is_empty(), "the old packet is gone");
    // The next one is delivered.
    s.peers[0].send(&incoming).unwrap();
    event(&s, &rx, &tx, 0, s.backend.tap_event() as u16);
    assert_eq!(rx.driver.take_used().len(), 1);
}

#[test]
fn a_worker_without_a_pair_is_an_error() {
    let s = setup(1, None);
    let rx = ring(&s, 0x1_0000, false);
    assert!(s
        .backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&rx.vring), 0)
        .is_err());
}
