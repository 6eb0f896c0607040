//! The data path over guest memory: a test driver builds chains, a fake TAP plays the network.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use net_util::testing::{Buf, TestDriver};
use net_util::{
    features, process_ctrl, ChainError, CtrlCommand, FakeTap, FakeTapPeer, NetRx, NetTx,
    QueueError, RxStop, CTRL_ACK_ERR, CTRL_ACK_OK, MAX_PACKET_LEN, VNET_HDR_LEN,
};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 16;

struct Setup {
    mem: GuestMemoryMmap,
    drv: TestDriver,
    queue: Queue,
    tap: FakeTap,
    peer: FakeTapPeer,
}

fn setup(event_idx: bool) -> Setup {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let drv = TestDriver::new(&mem, QSIZE, 0x1000, MEM_SIZE - 0x1000);
    let queue = drv.queue(event_idx);
    let (tap, peer) = FakeTap::new("fake0").unwrap();
    Setup {
        mem,
        drv,
        queue,
        tap,
        peer,
    }
}

/// A virtio-net header with `flags` and `num_buffers` 0, then an Ethernet frame of `len`
/// bytes whose content depends on `seed`.
fn packet(len: usize, seed: u8, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p[0] = flags;
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    p
}

fn num_buffers(hdr: &[u8]) -> u16 {
    u16::from_le_bytes([hdr[10], hdr[11]])
}

#[test]
fn tx_chain_reaches_the_tap() {
    let mut s = setup(false);
    let p = packet(100, 1, 0);
    // Header split over two descriptors, the frame over two more.
    let a = s.drv.alloc_data(&p[..5]);
    let b = s.drv.alloc_data(&p[5..40]);
    let c = s.drv.alloc_data(&p[40..]);
    let head = s
        .drv
        .add_chain(&[Buf::r(a, 5), Buf::r(b, 35), Buf::r(0, 0), Buf::r(c, 72)]);
    let mut tx = NetTx::new();
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.completed, out.frames, out.bytes), (1, 1, 100));
    assert_eq!(out.malformed, 0);
    assert!(out.needs_notification);
    assert!(!out.more_pending);
    assert_eq!(s.drv.take_used(), vec![(u32::from(head), 0)]);
    assert_eq!(s.peer.try_recv().unwrap().unwrap(), p);
    assert_eq!(s.peer.try_recv().unwrap(), None);

    // An indirect chain.
    let p2 = packet(60, 9, 1);
    let d = s.drv.alloc_data(&p2);
    let head = s
        .drv
        .add_indirect_chain(&[Buf::r(d, 20), Buf::r(d + 20, 52)]);
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(out.frames, 1);
    assert_eq!(s.drv.take_used(), vec![(u32::from(head), 0)]);
    assert_eq!(s.peer.try_recv().unwrap().unwrap(), p2);
}

#[test]
fn malformed_tx_chains_are_dropped_and_the_queue_goes_on() {
    let mut s = setup(false);
    let good = packet(64, 3, 0);
    let g = s.drv.alloc_data(&good);
    let big = s.drv.alloc(MAX_PACKET_LEN + 1, 0);
    let w = s.drv.alloc(100, 0);
    let heads = [
        // Device-writable buffer in a transmit chain.
        s.drv.add_chain(&[Buf::r(g, 76), Buf::w(w, 10)]),
        // Shorter than header + Ethernet header.
        s.drv.add_chain(&[Buf::r(g, 25)]),
        // One byte over the largest packet.
        s.drv.add_chain(&[Buf::r(big, (MAX_PACKET_LEN + 1) as u32)]),
        // Outside guest memory, and a huge length at a valid address.
        s.drv.add_chain(&[Buf::r(MEM_SIZE + 0x1000, 76)]),
        s.drv.add_chain(&[Buf::r(g, u32::MAX)]),
    ];
    // A valid one at the end.
    let last = s.drv.add_chain(&[Buf::r(g, 76)]);
    let mut tx = NetTx::new();
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(out.completed, 6);
    assert_eq!(out.malformed, 5);
    assert_eq!(out.frames, 1);
    let first = out.first_malformed.unwrap();
    assert_eq!(first.head, heads[0]);
    assert_eq!(first.error, ChainError::WrongDirection("device-writable"));
    let used = s.drv.take_used();
    assert_eq!(used.len(), 6);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(used[5].0, u32::from(last));
    assert_eq!(s.peer.try_recv().unwrap().unwrap(), good);
    assert_eq!(s.peer.try_recv().unwrap(), None);
}

#[test]
fn looping_and_dangling_chains_end() {
    let mut s = setup(false);
    let g = s.drv.alloc_data(&packet(64, 3, 0));
    // Descriptor 0 points at itself.
    s.drv.store_desc(0, g, 76, VRING_DESC_F_NEXT as u16, 0);
    s.drv.push_avail(0);
    // Descriptor 1 points past the table.
    s.drv.store_desc(1, g, 76, VRING_DESC_F_NEXT as u16, 200);
    s.drv.push_avail(1);
    let mut tx = NetTx::new();
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(out.malformed, 2);
    assert!(matches!(
        out.first_malformed.unwrap().error,
        ChainError::Truncated { .. }
    ));
    assert_eq!(s.drv.take_used(), vec![(0, 0), (1, 0)]);
    assert_eq!(s.peer.try_recv().unwrap(), None);
}

#[test]
fn broken_rings_are_errors_not_panics() {
    let mut s = setup(false);
    // A head index beyond the queue cannot be returned.
    s.drv.push_avail(200);
    let mut tx = NetTx::new();
    assert!(matches!(
        tx.process(&mut s.queue, &s.mem, &s.tap, 64),
        Err(QueueError::AddUsed { head: 200, .. })
    ));
    // An available index far ahead of the device's.
    let mut s = setup(false);
    s.drv.set_avail_idx(1000);
    assert!(matches!(
        tx.process(&mut s.queue, &s.mem, &s.tap, 64),
        Err(QueueError::AvailRing(_))
    ));
    let mut rx = NetRx::new(0);
    s.peer.send(&packet(64, 0, 0)).unwrap();
    assert!(rx.process(&mut s.queue, &s.mem, &s.tap, 64).is_err());
}

#[test]
fn tx_budget_leaves_work_pending() {
    let mut s = setup(false);
    let g = s.drv.alloc_data(&packet(64, 3, 0));
    for _ in 0..5 {
        s.drv.add_chain(&[Buf::r(g, 76)]);
    }
    let mut tx = NetTx::new();
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 2).unwrap();
    assert_eq!(out.completed, 2);
    assert!(out.more_pending);
    // Notifications stay off while work is pending.
    assert_eq!(s.drv.used_flags() & 1, 1);
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(out.completed, 3);
    assert!(!out.more_pending);
    assert_eq!(s.drv.used_flags() & 1, 0);
}

#[test]
fn tx_tap_errors_are_counted() {
    let mut s = setup(false);
    let g = s.drv.alloc_data(&packet(64, 3, 0));
    s.drv.add_chain(&[Buf::r(g, 76)]);
    drop(s.peer);
    let mut tx = NetTx::new();
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.completed, out.frames, out.tap_errors), (1, 0, 1));
    assert!(out.first_tap_error.is_some());
    assert_eq!(s.drv.take_used(), vec![(0, 0)]);
}

#[test]
fn tx_event_idx_suppresses_interrupts() {
    let mut s = setup(true);
    let g = s.drv.alloc_data(&packet(64, 3, 0));
    // The driver wants an interrupt only after the second used entry.
    s.drv.set_used_event(1);
    s.drv.add_chain(&[Buf::r(g, 76)]);
    let mut tx = NetTx::new();
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert!(!out.needs_notification);
    // The device asks to be notified about the next chain.
    assert_eq!(s.drv.avail_event(), 1);
    s.drv.add_chain(&[Buf::r(g, 76)]);
    let out = tx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert!(out.needs_notification);
}

#[test]
fn rx_frame_lands_in_one_buffer_with_a_header() {
    let mut s = setup(false);
    // The TAP flags the checksum as valid: without GUEST_CSUM the device clears it.
    let p = packet(200, 5, 2);
    s.peer.send(&p).unwrap();
    let a = s.drv.alloc(5, 0xee);
    let b = s.drv.alloc(300, 0xee);
    let head = s.drv.add_chain(&[Buf::w(a, 5), Buf::w(b, 300)]);
    let mut rx = NetRx::new(0);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.frames, out.bytes, out.dropped), (1, 200, 0));
    assert!(matches!(out.stop, RxStop::TapEmpty));
    assert!(out.needs_notification);
    assert_eq!(s.drv.take_used(), vec![(u32::from(head), 212)]);
    let mut got = s.drv.read(a, 5);
    got.extend(s.drv.read(b, 207));
    assert_eq!(got[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
    // Nothing written past the packet.
    assert_eq!(s.drv.read(b + 207, 93), vec![0xee; 93]);

    // With GUEST_CSUM the TAP's flags go through.
    let mut rx = NetRx::new(1 << VIRTIO_NET_F_GUEST_CSUM);
    s.peer.send(&p).unwrap();
    let c = s.drv.alloc(1600, 0);
    s.drv.add_chain(&[Buf::w(c, 1600)]);
    rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(s.drv.read(c, 1)[0], 2);
}

#[test]
fn rx_waits_for_buffers_and_keeps_the_frame() {
    for event_idx in [false, true] {
        let mut s = setup(event_idx);
        let p = packet(100, 7, 0);
        s.peer.send(&p).unwrap();
        let mut rx = NetRx::new(0);
        let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
        assert!(matches!(out.stop, RxStop::NeedBuffers));
        assert!(rx.has_pending_packet());
        assert_eq!(out.used, 0);
        assert!(!out.needs_notification);
        // The device asked to be notified when buffers arrive.
        if event_idx {
            assert_eq!(s.drv.avail_event(), 0);
        } else {
            assert_eq!(s.drv.used_flags() & 1, 0);
        }
        let a = s.drv.alloc(1600, 0);
        s.drv.add_chain(&[Buf::w(a, 1600)]);
        let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
        assert_eq!(out.frames, 1);
        assert!(!rx.has_pending_packet());
        assert_eq!(s.drv.take_used(), vec![(0, 112)]);
        assert_eq!(&s.drv.read(a + 12, 100), &p[12..]);
    }
}

#[test]
fn rx_without_mergeable_buffers_drops_frames_that_do_not_fit() {
    let mut s = setup(false);
    let a = s.drv.alloc(100, 0);
    s.drv.add_chain(&[Buf::w(a, 100)]);
    // 12 + 200 bytes do not fit in 100: dropped, the chain is kept for the next frame.
    s.peer.send(&packet(200, 1, 0)).unwrap();
    let small = packet(50, 2, 0);
    s.peer.send(&small).unwrap();
    let mut rx = NetRx::new(0);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.frames, out.dropped), (1, 1));
    assert_eq!(s.drv.take_used(), vec![(0, 62)]);
    assert_eq!(&s.drv.read(a + 12, 50), &small[12..]);
}

#[test]
fn rx_mergeable_buffers_span_chains() {
    let mut s = setup(false);
    let p = packet(3000, 11, 0);
    let bufs: Vec<u64> = (0..4).map(|_| s.drv.alloc(1024, 0xee)).collect();
    // Only two buffers at first: not enough for 3012 bytes.
    let h0 = s.drv.add_chain(&[Buf::w(bufs[0], 1024)]);
    let h1 = s.drv.add_chain(&[Buf::w(bufs[1], 1024)]);
    s.peer.send(&p).unwrap();
    let mut rx = NetRx::new(1 << VIRTIO_NET_F_MRG_RXBUF);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert!(matches!(out.stop, RxStop::NeedBuffers));
    assert!(s.drv.take_used().is_empty());
    let h2 = s.drv.add_chain(&[Buf::w(bufs[2], 1024)]);
    let h3 = s.drv.add_chain(&[Buf::w(bufs[3], 1024)]);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(out.frames, 1);
    assert_eq!(
        s.drv.take_used(),
        vec![
            (u32::from(h0), 1024),
            (u32::from(h1), 1024),
            (u32::from(h2), 964)
        ]
    );
    let mut got = Vec::new();
    got.extend(s.drv.read(bufs[0], 1024));
    got.extend(s.drv.read(bufs[1], 1024));
    got.extend(s.drv.read(bufs[2], 964));
    assert_eq!(num_buffers(&got), 3);
    assert_eq!(&got[12..], &p[12..]);
    assert_eq!(s.drv.read(bufs[2] + 964, 60), vec![0xee; 60]);

    // The fourth buffer is still held and takes the next frame.
    let q = packet(100, 12, 0);
    s.peer.send(&q).unwrap();
    rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(s.drv.take_used(), vec![(u32::from(h3), 112)]);
    assert_eq!(num_buffers(&s.drv.read(bufs[3], 12)), 1);
}

#[test]
fn rx_mergeable_frame_bigger_than_the_whole_queue_is_dropped() {
    let mut s = setup(false);
    for _ in 0..QSIZE {
        let a = s.drv.alloc(64, 0);
        s.drv.add_chain(&[Buf::w(a, 64)]);
    }
    s.peer.send(&packet(2000, 1, 0)).unwrap();
    let mut rx = NetRx::new(1 << VIRTIO_NET_F_MRG_RXBUF);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.frames, out.dropped), (0, 1));
    assert!(matches!(out.stop, RxStop::TapEmpty));
    // The held chains serve the next frame.
    s.peer.send(&packet(100, 1, 0)).unwrap();
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!(out.frames, 1);
    assert_eq!(s.drv.take_used(), vec![(0, 64), (1, 48)]);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut s = setup(false);
    let a = s.drv.alloc(1600, 0);
    let r = s.drv.alloc(16, 0);
    let bad_read = s.drv.add_chain(&[Buf::r(r, 16), Buf::w(a, 1600)]);
    let bad_mem = s.drv.add_chain(&[Buf::w(MEM_SIZE - 8, 16)]);
    let bad_huge = s.drv.add_chain(&[Buf::w(a, u32::MAX)]);
    let too_short = s.drv.add_chain(&[Buf::w(a, 8)]);
    let good = s.drv.add_chain(&[Buf::w(a, 1600)]);
    let p = packet(100, 4, 0);
    s.peer.send(&p).unwrap();
    let mut rx = NetRx::new(1 << VIRTIO_NET_F_MRG_RXBUF);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.frames, out.malformed), (1, 4));
    assert_eq!(
        s.drv.take_used(),
        vec![
            (u32::from(bad_read), 0),
            (u32::from(bad_mem), 0),
            (u32::from(bad_huge), 0),
            (u32::from(too_short), 0),
            (u32::from(good), 112)
        ]
    );
    assert_eq!(&s.drv.read(a + 12, 100), &p[12..]);
}

#[test]
fn rx_budget_and_tap_failure() {
    let mut s = setup(false);
    for _ in 0..3 {
        let a = s.drv.alloc(1600, 0);
        s.drv.add_chain(&[Buf::w(a, 1600)]);
        s.peer.send(&packet(60, 1, 0)).unwrap();
    }
    // Runt packets from the TAP are dropped.
    s.peer.send(&[0u8; 20]).unwrap();
    let mut rx = NetRx::new(0);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 2).unwrap();
    assert_eq!(out.frames, 2);
    assert!(matches!(out.stop, RxStop::Budget));
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert_eq!((out.frames, out.dropped), (1, 1));
    drop(s.peer);
    let out = rx.process(&mut s.queue, &s.mem, &s.tap, 64).unwrap();
    assert!(matches!(out.stop, RxStop::TapFailed(_)));
}

#[test]
fn control_queue_commands() {
    let mut s = setup(false);
    let mq = s.drv.alloc_data(&[4, 0, 3, 0]);
    let ack1 = s.drv.alloc(1, 0xee);
    let h1 = s
        .drv
        .add_chain(&[Buf::r(mq, 2), Buf::r(mq + 2, 2), Buf::w(ack1, 1)]);
    let other = s.drv.alloc_data(&[0, 1, 1]);
    let ack2 = s.drv.alloc(1, 0xee);
    let h2 = s.drv.add_chain(&[Buf::r(other, 3), Buf::w(ack2, 1)]);
    // No room for the ack.
    let h3 = s.drv.add_chain(&[Buf::r(mq, 4)]);
    // MQ command without its argument.
    let ack4 = s.drv.alloc(1, 0xee);
    let h4 = s.drv.add_chain(&[Buf::r(mq, 2), Buf::w(ack4, 1)]);
    let mut seen = Vec::new();
    let out = process_ctrl(&mut s.queue, &s.mem, 64, &mut |c| {
        seen.push(c);
        matches!(c, CtrlCommand::MqVqPairsSet(3))
    })
    .unwrap();
    assert_eq!((out.completed, out.malformed), (4, 1));
    assert!(out.needs_notification);
    assert_eq!(
        seen,
        vec![
            CtrlCommand::MqVqPairsSet(3),
            CtrlCommand::Unsupported {
                class: 0,
                command: 1
            },
            CtrlCommand::Unsupported {
                class: 4,
                command: 0
            }
        ]
    );
    assert_eq!(
        s.drv.take_used(),
        vec![
            (u32::from(h1), 1),
            (u32::from(h2), 1),
            (u32::from(h3), 0),
            (u32::from(h4), 1)
        ]
    );
    assert_eq!(s.drv.read(ack1, 1)[0], CTRL_ACK_OK);
    assert_eq!(s.drv.read(ack2, 1)[0], CTRL_ACK_ERR);
    assert_eq!(s.drv.read(ack4, 1)[0], CTRL_ACK_ERR);
}

#[test]
fn fake_tap_records_settings() {
    use net_util::TapQueue;
    let (tap, peer) = FakeTap::new("fake1").unwrap();
    tap.set_vnet_hdr_size(12).unwrap();
    tap.set_offload(3).unwrap();
    tap.set_queue_enabled(false).unwrap();
    assert_eq!((peer.vnet_hdr_size(), peer.offload()), (12, 3));
    assert!(!peer.queue_enabled());
    assert_eq!(peer.recv_timeout(Duration::from_millis(10)).unwrap(), None);
    assert_eq!(tap.if_name(), "fake1");
    assert_ne!(features(1, None), 0);
}
