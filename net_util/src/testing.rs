//! [`TestDriver`]: the driver side of a split virtqueue in guest memory, for tests.
//!
//! The descriptor table, available ring and used ring are laid out one after the other (no
//! overlap, whatever the queue size) at the start of an area the test gives; buffers are
//! allocated after them in the same area.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One buffer of a chain the test adds.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            write: true,
        }
    }
}

const fn align(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// A virtio driver for one split queue.
#[derive(Debug)]
pub struct TestDriver {
    mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
    end: u64,
}

impl TestDriver {
    /// A driver for a queue of `size` entries whose rings and buffers live in
    /// `area..area + area_len` of `mem` (a clone of the memory the device uses).
    pub fn new(mem: &GuestMemoryMmap, size: u16, area: u64, area_len: u64) -> Self {
        assert!(size.is_power_of_two());
        let desc = align(area, 16);
        let avail = desc + 16 * u64::from(size);
        let used = align(avail + 6 + 2 * u64::from(size), 4);
        let next_buf = align(used + 6 + 8 * u64::from(size), 16);
        let end = area + area_len;
        assert!(next_buf < end, "area too small for the rings");
        mem.write_slice(&vec![0u8; (next_buf - desc) as usize], GuestAddress(desc))
            .unwrap();
        TestDriver {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf,
            end,
        }
    }

    /// The queue as a transport would configure it after the driver enabled it.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size.max(256)).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Reserves `len` bytes for buffers, filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let addr = self.next_buf;
        self.next_buf = align(addr + len as u64, 16);
        assert!(self.next_buf <= self.end, "test buffers exhausted");
        self.mem
            .write_slice(&vec![fill; len], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// Reserves a buffer holding `data`.
    pub fn alloc_data(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len(), 0);
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        addr
    }

    /// Writes descriptor `index` of the table.
    pub fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc + 16 * u64::from(index % self.size);
        self.mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn push_avail(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_slice(&head.to_le_bytes(), GuestAddress(slot))
            .unwrap();
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// Sets the available index (also to fake a broken driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .store(idx.to_le(), GuestAddress(self.avail + 2), Ordering::Release)
            .unwrap();
    }

    /// Writes `bufs` as a chain of consecutive descriptors and makes it available.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store_desc(index, b.addr, b.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_avail(head);
        head
    }

    /// Writes `bufs` as an indirect table and makes a one-descriptor chain pointing at it
    /// available.
    pub fn add_indirect_chain(&mut self, bufs: &[Buf]) -> u16 {
        let table = self.alloc(bufs.len() * 16, 0);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc;
        self.store_desc(
            head,
            table,
            (bufs.len() * 16) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.next_desc = (head + 1) % self.size;
        self.push_avail(head);
        head
    }

    /// Used ring entries added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx: u16 = u16::from_le(
            self.mem
                .load(GuestAddress(self.used + 2), Ordering::Acquire)
                .unwrap(),
        );
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let mut e = [0u8; 8];
            self.mem.read_slice(&mut e, GuestAddress(at)).unwrap();
            out.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Sets `used_event` (after the available ring), for `EVENT_IDX`.
    pub fn set_used_event(&self, value: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem
            .write_slice(&value.to_le_bytes(), GuestAddress(at))
            .unwrap();
    }

    /// Reads `avail_event` (after the used ring), for `EVENT_IDX`.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        let mut v = [0u8; 2];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        u16::from_le_bytes(v)
    }

    /// Reads the used ring's `flags` (`VRING_USED_F_NO_NOTIFY` is bit 0).
    pub fn used_flags(&self) -> u16 {
        let mut v = [0u8; 2];
        self.mem
            .read_slice(&mut v, GuestAddress(self.used))
            .unwrap();
        u16::from_le_bytes(v)
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// Why TAP tests cannot run here (not root, or no `/dev/net/tun`), if they cannot.
pub fn tap_tests_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    None
}

/// Runs `f` on a new thread inside a fresh network namespace, so TAP interfaces it creates
/// never touch the host's, and vanish with the namespace when the thread ends (also if `f`
/// panics: the panic is passed on). Returns `None`, after printing a loud `SKIPPED` line,
/// when TAP tests cannot run (see [`tap_tests_unavailable`]) or the namespace cannot be
/// created (root without `CAP_SYS_ADMIN`, as in some containers).
pub fn in_new_netns<R, F>(test: &str, f: F) -> Option<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if let Some(why) = tap_tests_unavailable() {
        eprintln!("SKIPPED ({why}): {test} needs root and /dev/net/tun");
        return None;
    }
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    match handle.join() {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            eprintln!("SKIPPED (cannot create a network namespace: {e}): {test}");
            None
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// An `AF_PACKET` socket bound to one interface: sees every frame the interface sends or
/// receives, and sends raw Ethernet frames out of it.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: libc::c_int,
}

impl PacketSocket {
    /// Opens a socket bound to interface `if_name` (in the calling thread's namespace).
    pub fn bind(if_name: &str) -> Self {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(if_name).unwrap();
        // SAFETY: `name` is NUL-terminated.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {if_name}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation, checked below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::c_int::from(proto),
            )
        };
        assert!(
            raw >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: all zeroes is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as libc::c_int;
        // SAFETY: the pointer and length describe `sll`.
        let ret = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket {
            fd,
            ifindex: ifindex as libc::c_int,
        }
    }

    /// Sends `frame` (a whole Ethernet frame) out of the interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: all zeroes is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the pointers and lengths describe `frame` and `sll`.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The first frame with EtherType `ethertype` seen within `timeout` (other traffic, such
    /// as IPv6 router solicitations, is skipped).
    pub fn recv_ethertype(&self, ethertype: u16, timeout: std::time::Duration) -> Option<Vec<u8>> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.fd);
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        loop {
            // SAFETY: the pointer and length describe `buf`.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ethertype.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
            if n < 0 {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return None;
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            }
        }
    }
}
