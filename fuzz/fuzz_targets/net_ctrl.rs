//! virtio-net control queue: commands parsed and acknowledged by `net_util::process_ctrl`
//! (the in-process device's and the vhost-user-net frontend's control queue).
//!
//! Input: a [`QueueInput`] (budget: chains per call; byte 3 bit 0: the handler's answer).
//!
//! Checks: each well-formed command reaches the handler exactly once, malformed chains never.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net_util::{process_ctrl, CtrlCommand};
use nimbus_fuzz::QueueInput;

fuzz_target!(|data: &[u8]| {
    let input = QueueInput::new(data);
    let answer = input.extra & 1 != 0;
    let mut queue = input.queue();
    let mut commands = Vec::new();
    let mut handler = |c: CtrlCommand| {
        commands.push(c);
        answer
    };
    let Ok(out) = process_ctrl(
        &mut queue,
        &input.mem,
        usize::from(input.budget),
        &mut handler,
    ) else {
        return;
    };
    assert!(out.malformed <= out.completed);
    assert_eq!(
        commands.len(),
        out.completed - out.malformed,
        "one handler call per command"
    );
});
