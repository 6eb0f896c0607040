//! vhost-user replies from a hostile backend to Nimbus's frontends
//! (`virtio_devices::vhost_user`): the handshake (`SET_OWNER`, `GET_FEATURES`,
//! `GET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM`), the configuration space (`GET_CONFIG`), and, once
//! a driver starts the device, the session (`SET_MEM_TABLE` with the guest's memfd,
//! `GET_INFLIGHT_FD` and the area it hands over, rings, `REPLY_ACK` verdicts), the relay
//! thread, and the rings stopped at reset (`GET_VRING_BASE`); for virtio-blk and virtio-net
//! frontends.
//!
//! Input: byte 0: bit 0 net (else blk), bit 1 start the device; byte 1: queues (pairs for net);
//! then records `[fds: u8][len: u16][len bytes]`: the byte stream the backend answers with,
//! `fds % 4` descriptors attached to a record (a memfd first unless bit 2 is set, then
//! eventfds). The backend then hangs up.
//!
//! Checks: nothing panics or hangs; a device only comes up offering VERSION_1 and at most the
//! queues asked for; no descriptor stays open once the device is gone.
#![no_main]

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::{
    open_fds, send_records, shared_memory, socket_path, Attachments, Interrupts, Reader, RingLayout,
};
use virtio_devices::vhost_user::{blk, net, Endpoint};
use virtio_devices::{
    Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice, VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let queues = u16::from(r.u8() % 4);
    let replies = r.rest();
    let before = open_fds();
    {
        let attach = Attachments::new();
        let path = socket_path("frontend");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let backend = UnixStream::connect(&path).expect("connect");
        send_records(&backend, replies, &attach, false);
        let endpoint = Endpoint::Listen { path, listener };
        let is_net = flags & 1 != 0;
        let device = if is_net {
            net::connect(endpoint, queues, 256, "_net0".into())
        } else {
            blk::connect(endpoint, queues, 128, "_disk0".into())
        };
        let Ok(mut device) = device else {
            drop(backend);
            return;
        };
        assert_ne!(
            device.features() & VIRTIO_F_VERSION_1,
            0,
            "device without VERSION_1"
        );
        let max = device.queue_max_sizes();
        let asked = if is_net {
            2 * usize::from(queues.max(1)) + 1
        } else {
            usize::from(queues.max(1))
        };
        assert!(
            !max.is_empty() && max.len() <= asked,
            "{} queues for {asked} asked",
            max.len()
        );
        if flags & 2 != 0 {
            let mem = shared_memory();
            let mut active = Vec::new();
            for (i, &max_size) in max.iter().enumerate().take(3) {
                let size = max_size.min(16);
                let base = 0x1000 * (i as u64 + 1);
                let l = RingLayout::new(size);
                let mut q = Queue::new(max_size).expect("queue");
                q.set_size(size);
                q.set_desc_table_address(Some((base + l.desc) as u32), Some(0));
                q.set_avail_ring_address(Some((base + l.avail) as u32), Some(0));
                q.set_used_ring_address(Some((base + l.used) as u32), Some(0));
                q.set_ready(true);
                active.push(ActiveQueue {
                    index: i as u16,
                    queue: q,
                    kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                });
            }
            let activation = Activation {
                mem: GuestMemoryAtomic::new(mem),
                features: device.features() & !(1 << 30),
                interrupt: Arc::new(Interrupts::default()),
                queues: active,
            };
            if device.activate(activation).is_ok() {
                device.reset();
            }
        }
        drop(device);
        drop(backend);
    }
    assert_eq!(open_fds(), before, "descriptors left open");
});
