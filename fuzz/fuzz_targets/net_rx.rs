//! virtio-net receive queue: packets from the TAP written into the driver's receive buffers by
//! `net_util::NetRx`, with and without mergeable buffers.
//!
//! Input: a [`QueueInput`] (flags bit 1: `MRG_RXBUF`, bit 2: `GUEST_CSUM`; budget: frames per
//! call; byte 3: calls), then packets as the TAP hands them over, each `[len: u16][bytes]`.
//!
//! Checks: delivered bytes never exceed what the TAP gave, frames and drops never exceed the
//! packets read, and a packet is only left pending when the queue ran out of buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_util::{NetRx, RxStop, VNET_HDR_LEN};
use nimbus_fuzz::{MemTap, QueueInput};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};

fuzz_target!(|data: &[u8]| {
    let mut input = QueueInput::new(data);
    let mut packets = Vec::new();
    while !input.rest.is_empty() && packets.len() < 64 {
        packets.push(input.rest.piece().to_vec());
    }
    let given: u64 = packets.iter().map(|p| p.len() as u64).sum();
    let count = packets.len();
    let mut negotiated = 0u64;
    if input.flags & 2 != 0 {
        negotiated |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    if input.flags & 4 != 0 {
        negotiated |= 1 << VIRTIO_NET_F_GUEST_CSUM;
    }
    let mut queue = input.queue();
    let tap = MemTap::new(packets);
    let mut rx = NetRx::new(negotiated);
    let (mut frames, mut dropped, mut bytes) = (0, 0, 0u64);
    let mut waiting_for_buffers = true;
    for _ in 0..=(input.extra % 4) {
        let Ok(out) = rx.process(&mut queue, &input.mem, &tap, usize::from(input.budget)) else {
            // A broken queue may leave the packet it was placing.
            waiting_for_buffers = true;
            break;
        };
        frames += out.frames;
        dropped += out.dropped;
        bytes += out.bytes;
        waiting_for_buffers = matches!(out.stop, RxStop::NeedBuffers);
    }
    if rx.has_pending_packet() {
        assert!(
            waiting_for_buffers,
            "a packet is pending but the queue has buffers"
        );
    }
    assert!(
        frames + dropped <= count,
        "{frames} frames + {dropped} drops from {count} packets"
    );
    assert!(
        bytes + (frames * VNET_HDR_LEN) as u64 <= given,
        "delivered more than the TAP gave"
    );
});
