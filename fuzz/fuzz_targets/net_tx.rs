//! virtio-net transmit queue: descriptor chains turned into packets for the TAP by
//! `net_util::NetTx` (the in-process device's and `vhost_user_net`'s transmit path).
//!
//! Input: a [`QueueInput`] (budget: chains per call; byte 3: calls).
//!
//! Checks: every chain is returned with length 0; every packet the TAP got has a virtio-net
//! header and an Ethernet header and is at most `MAX_PACKET_LEN`; unless the queue broke (the
//! device then needs a reset), the frame and byte counts reported are what the TAP got,
//! headers excluded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_util::{NetTx, ETH_HLEN, MAX_PACKET_LEN, VNET_HDR_LEN};
use nimbus_fuzz::{MemTap, QueueInput};

fuzz_target!(|data: &[u8]| {
    let input = QueueInput::new(data);
    let mut queue = input.queue();
    let tap = MemTap::new(Vec::new());
    let mut tx = NetTx::new();
    let mut frames = 0;
    let mut bytes = 0;
    let mut broken = false;
    for _ in 0..=(input.extra % 4) {
        let Ok(out) = tx.process(&mut queue, &input.mem, &tap, usize::from(input.budget)) else {
            // A broken queue: what the call sent before it broke is not reported, and the
            // device needs a reset.
            broken = true;
            break;
        };
        assert!(out.frames + out.malformed + out.tap_errors <= out.completed);
        frames += out.frames;
        bytes += out.bytes;
    }
    let sent = tap.tx.lock().expect("tap").clone();
    if !broken {
        assert_eq!(sent.len(), frames, "frames reported vs. written");
    }
    let mut total = 0u64;
    for p in &sent {
        assert!(
            p.len() >= VNET_HDR_LEN + ETH_HLEN && p.len() <= MAX_PACKET_LEN,
            "{}-byte packet",
            p.len()
        );
        total += (p.len() - VNET_HDR_LEN) as u64;
    }
    if !broken {
        assert_eq!(total, bytes, "bytes reported vs. written");
    }
    for (_, len) in input.used() {
        assert_eq!(len, 0, "transmit chains are used with length 0");
    }
});
