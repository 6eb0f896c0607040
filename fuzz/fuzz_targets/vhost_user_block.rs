//! vhost-user messages from a hostile frontend to the `vhost_user_block` daemon: the
//! connection as `vhost_user_daemon::serve` runs it (the `vhost-user-backend` crate's protocol
//! thread and workers) with `vhost_user_block::BlockBackend` (features, protocol features,
//! configuration space, memory tables mapping the memfd that comes with them, rings, kick and
//! call eventfds) on an in-memory disk.
//!
//! Input: records `[fds: u8][len: u16][len bytes]`, each sent with one `sendmsg`: the bytes
//! are raw vhost-user messages (header and payload, or any part of them); `fds % 4` descriptors
//! come with them (a memfd of guest memory first unless bit 2 is set, then eventfds, which come
//! signalled: a ring kicked through one is served as soon as it runs). A record with bit 3 set
//! is guest memory content instead, `[offset: u32][bytes]` (rings and requests); with bit 6,
//! the frontend waits up to 2 ms (once) for the device's call (on the second eventfd) before going
//! on. The frontend then hangs up.
//!
//! Checks: the connection ends (no hang), nothing panics, and no descriptor stays open after
//! it (a daemon serves one connection after another).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_user_block::{BackendConfig, BlockBackend};
use vhost_user_daemon::{DaemonError, Device, GuestMemory};

struct Disk {
    disk: Arc<block::FakeDisk>,
    config: BackendConfig,
}

impl Device for Disk {
    type Backend = BlockBackend;
    type Error = DaemonError;
    const PROTOCOL_THREAD: &'static str = "vub-protocol";
    const CONNECT_STEP: &'static str = "accept the frontend";

    fn backend(&self, mem: GuestMemory) -> Result<Arc<BlockBackend>, DaemonError> {
        BlockBackend::new(self.disk.clone(), &self.config, mem)
            .map(Arc::new)
            .map_err(|e| DaemonError::Setup {
                step: "create the backend",
                message: e.to_string(),
            })
    }
}

fuzz_target!(|data: &[u8]| {
    let config = BackendConfig::parse("path=/fuzz.img,socket=/fuzz.sock,num_queues=2,serial=fuzz")
        .expect("config");
    let disk = Disk {
        disk: Arc::new(block::FakeDisk::new(1 << 20)),
        config,
    };
    nimbus_fuzz::serve_records(&disk, "vub", data);
});
