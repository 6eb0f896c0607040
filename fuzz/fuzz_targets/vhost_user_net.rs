//! vhost-user messages from a hostile frontend to the `vhost_user_net` daemon: the connection
//! as `vhost_user_daemon::serve` runs it with `vhost_user_net::NetBackend` (two queue pairs on
//! in-memory TAP queues: features, MQ, configuration space, memory tables, rings, kick and call
//! eventfds, `SET_VRING_ENABLE`).
//!
//! Input: as `vhost_user_block`'s target: records `[fds: u8][len: u16][len bytes]` (messages,
//! guest memory content with bit 3 of `fds`, a wait for the device's call with bit 6).
//!
//! Checks: the connection ends (no hang), nothing panics, and no descriptor stays open after
//! it.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use net_util::TapQueue;
use nimbus_fuzz::MemTap;
use vhost_user_daemon::{DaemonError, Device, GuestMemory};
use vhost_user_net::NetBackend;

struct Net;

impl Device for Net {
    type Backend = NetBackend;
    type Error = DaemonError;
    const PROTOCOL_THREAD: &'static str = "vun-protocol";
    const CONNECT_STEP: &'static str = "accept the frontend";

    fn backend(&self, mem: GuestMemory) -> Result<Arc<NetBackend>, DaemonError> {
        let taps: Vec<Arc<dyn TapQueue>> = (0..2)
            .map(|_| Arc::new(MemTap::new(Vec::new())) as Arc<dyn TapQueue>)
            .collect();
        let mac = "52:54:00:12:34:56".parse().expect("mac");
        NetBackend::new(taps, mac, Some(1500), 256, mem)
            .map(Arc::new)
            .map_err(|e| DaemonError::Setup {
                step: "create the backend",
                message: e.to_string(),
            })
    }
}

fuzz_target!(|data: &[u8]| {
    nimbus_fuzz::serve_records(&Net, "vun", data);
});
