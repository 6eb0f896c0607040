//! Test helpers: TAP tests in a private network namespace ([`in_new_netns`], [`PacketSocket`]),
//! and [`TestDriver`] and [`Buf`], the split-virtqueue driver of `virtio_chain::testing`,
//! re-exported for the tests that use them from here.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

pub use virtio_chain::testing::{Buf, TestDriver};

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
