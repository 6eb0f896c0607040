//! virtio-vsock: the device's connection multiplexer (`virtio_devices::vsock::queue_handler`,
//! what its worker runs) between a hostile guest's packets and host Unix sockets, with host
//! clients that write hostile `CONNECT` lines and stream bytes.
//!
//! Input: a [`QueueInput`] for the transmit queue (queue 1, the guest's packets), then up to
//! three pieces (`[len: u16]` and bytes), each one a host client's writes to the device's
//! socket, then a second [`QueueInput`] image for the receive queue (queue 0). Byte 3 of the
//! transmit header: rounds of (host events, transmit queue, receive queue). The guest may
//! connect to host port 1234 (a listener exists at `<socket>_1234`) or anywhere else (nothing
//! listens).
//!
//! Checks: queue errors are the only failures; the device never holds more connections than
//! its limit; every packet it put in the receive queue has a header from the host's CID (2) to
//! the guest's, of the stream type, whose `len` is what follows it in the buffer (checked where
//! the header's descriptor is writable, clear of the rings, overlaps no other descriptor and is
//! in no other chain: a guest that shares buffers gets them overwritten); every descriptor
//! opened is closed once the device is dropped.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::QueueInput;
use virtio_devices::vsock::packet::{Header, HEADER_LEN, HOST_CID, TYPE_STREAM};
use virtio_devices::vsock::{queue_handler, Limits};
use virtio_devices::worker::QueueHandler;
use virtio_devices::{ActiveQueue, GuestMemoryAtomic};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const CID: u64 = 3;
const LIMITS: Limits = Limits {
    max_connections: 4,
    buf_alloc: 4096,
    connect_timeout: Duration::from_millis(1),
    max_stray_resets: 8,
};

struct Sockets {
    path: PathBuf,
    listener: UnixListener,
    /// The guest's connections to port 1234 arrive here.
    guest_target: UnixListener,
}

fn sockets() -> &'static Sockets {
    static S: OnceLock<Sockets> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nimbus-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let guest_target = UnixListener::bind(dir.join("v.sock_1234")).expect("bind");
        guest_target.set_nonblocking(true).expect("non-blocking");
        Sockets {
            path,
            listener,
            guest_target,
        }
    })
}

fn active(index: u16, input: &QueueInput) -> ActiveQueue {
    ActiveQueue {
        index,
        queue: input.queue(),
        kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The packets in the receive queue's used ring keep the invariants.
fn check_rx(input: &QueueInput) {
    let mem = &input.mem;
    let l = input.layout;
    let read = |addr: u64, n: usize| {
        let mut b = vec![0u8; n];
        mem.read_slice(&mut b, GuestAddress(addr)).ok().map(|()| b)
    };
    let Some(idx) = read(l.used + 2, 2).map(|b| u16::from_le_bytes([b[0], b[1]])) else {
        return;
    };
    let rings_end = l.used + 6 + 8 * u64::from(l.size);
    // (address, length, flags, next) of every descriptor.
    let descs: Vec<(u64, u64, u16, u16)> = (0..l.size)
        .map(|i| {
            read(l.desc + 16 * u64::from(i), 16).map_or((0, 0, 0, 0), |d| {
                (
                    u64::from_le_bytes(d[0..8].try_into().expect("8 bytes")),
                    u64::from(u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"))),
                    u16::from_le_bytes([d[12], d[13]]),
                    u16::from_le_bytes([d[14], d[15]]),
                )
            })
        })
        .collect();
    let alone = |id: usize| {
        let (addr, len, _, _) = descs[id];
        let end = addr.saturating_add(len);
        addr >= rings_end
            && descs.iter().enumerate().all(|(j, &(a, n, flags, next))| {
                j == id
                    || ((a.saturating_add(n) <= addr || a >= end)
                        && !(flags & 1 != 0 && usize::from(next) == id))
            })
    };
    for i in 0..idx.min(l.size) {
        let Some(e) = read(l.used + 4 + 8 * u64::from(i), 8) else {
            continue;
        };
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]) as usize;
        if len == 0 {
            continue;
        }
        assert!(len >= HEADER_LEN, "a packet of {len} bytes");
        let id = (id % u32::from(l.size)) as usize;
        let (addr, dlen, flags, _) = descs[id];
        // Only a header in one plain writable descriptor of its own is checked here.
        if flags & 4 != 0 || flags & 2 == 0 || dlen < HEADER_LEN as u64 || !alone(id) {
            continue;
        }
        let Some(raw) = read(addr, HEADER_LEN) else {
            continue;
        };
        let h = Header::from_bytes(raw.as_slice().try_into().expect("header"));
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (HOST_CID, CID, TYPE_STREAM),
            "{h:?}"
        );
        assert_eq!(h.len as usize, len - HEADER_LEN, "{h:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let s = sockets();
    let before = open_fds();
    {
        let mut tx_input = QueueInput::new(data);
        let writes: Vec<Vec<u8>> = (0..3).map(|_| tx_input.rest.piece().to_vec()).collect();
        let rx_input = QueueInput::new(tx_input.rest.rest());
        let listener = s.listener.try_clone().expect("dup");
        let mut muxer = queue_handler(CID, s.path.clone(), listener, LIMITS).expect("muxer");
        let clients: Vec<UnixStream> = writes
            .iter()
            .filter(|w| !w.is_empty())
            .filter_map(|w| {
                let mut c = UnixStream::connect(&s.path).ok()?;
                c.set_nonblocking(true).ok()?;
                let _ = c.write(w);
                Some(c)
            })
            .collect();
        let tx_mem = GuestMemoryAtomic::new(tx_input.mem.clone());
        let rx_mem = GuestMemoryAtomic::new(rx_input.mem.clone());
        let mut tx = active(1, &tx_input);
        let mut rx = active(0, &rx_input);
        for _ in 0..=(tx_input.extra % 4) {
            if muxer.host_events().is_err()
                || muxer.process(&mut tx, &tx_mem).is_err()
                || muxer.process(&mut rx, &rx_mem).is_err()
            {
                break;
            }
            assert!(muxer.connections() <= LIMITS.max_connections);
        }
        check_rx(&rx_input);
        drop(muxer);
        drop(clients);
        // The guest's connections to port 1234 that reached the listener.
        while s.guest_target.accept().is_ok() {}
        // Host clients the multiplexer never accepted are still in the backlog: take them.
        s.listener.set_nonblocking(true).expect("non-blocking");
        while s.listener.accept().is_ok() {}
    }
    assert_eq!(open_fds(), before, "descriptors leaked");
});
