//! [`FakeTap`]: a TAP queue made of a `SOCK_SEQPACKET` socket pair, for tests without
//! `/dev/net/tun` or privileges.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::tap::{NetError, TapQueue};
use crate::virtio::MAX_PACKET_LEN;

#[derive(Debug)]
struct FakeTapState {
    offload: AtomicU32,
    vnet_hdr_size: AtomicUsize,
    enabled: AtomicBool,
}

/// The device side of a fake TAP queue: packets written here come out of the
/// [`FakeTapPeer`] and the other way round, one packet per message. Offload, header size and
/// queue attachment are recorded for the test to check.
#[derive(Debug)]
pub struct FakeTap {
    sock: OwnedFd,
    name: String,
    state: Arc<FakeTapState>,
}

/// The network side of a [`FakeTap`].
#[derive(Debug)]
pub struct FakeTapPeer {
    sock: OwnedFd,
    state: Arc<FakeTapState>,
}

fn check(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

impl FakeTap {
    /// A fake TAP queue called `name` and its network side. Both ends are non-blocking.
    ///
    /// # Errors
    ///
    /// `socketpair` failures.
    pub fn new(name: &str) -> io::Result<(FakeTap, FakeTapPeer)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let state = Arc::new(FakeTapState {
            offload: AtomicU32::new(0),
            vnet_hdr_size: AtomicUsize::new(0),
            enabled: AtomicBool::new(true),
        });
        Ok((
            FakeTap {
                sock: a,
                name: name.to_string(),
                state: state.clone(),
            },
            FakeTapPeer { sock: b, state },
        ))
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl TapQueue for FakeTap {
    fn if_name(&self) -> &str {
        &self.name
    }

    fn read_packet(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec`; each is a live writable buffer.
        check(unsafe { libc::readv(self.sock.as_raw_fd(), bufs.as_ptr().cast(), count) })
    }

    fn write_packet(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; each is a live buffer.
        check(unsafe { libc::writev(self.sock.as_raw_fd(), bufs.as_ptr().cast(), count) })
    }

    fn set_vnet_hdr_size(&self, size: usize) -> Result<(), NetError> {
        self.state.vnet_hdr_size.store(size, Ordering::SeqCst);
        Ok(())
    }

    fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        self.state.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }

    fn set_queue_enabled(&self, enabled: bool) -> Result<(), NetError> {
        self.state.enabled.store(enabled, Ordering::SeqCst);
        Ok(())
    }
}

impl FakeTapPeer {
    /// Sends one packet (virtio-net header and frame) towards the device.
    ///
    /// # Errors
    ///
    /// `WouldBlock` when the device side has too much unread data, or the socket error.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `packet`.
        let n = check(unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                libc::MSG_NOSIGNAL,
            )
        })?;
        if n != packet.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
        Ok(())
    }

    /// The next packet the device wrote, if one is waiting.
    ///
    /// # Errors
    ///
    /// The socket error.
    pub fn try_recv(&self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
        // SAFETY: the pointer and length describe `buf`.
        match check(unsafe {
            libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        }) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The next packet the device writes, waiting up to `timeout`.
    ///
    /// # Errors
    ///
    /// The socket or `poll` error.
    pub fn recv_timeout(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.try_recv()? {
                return Ok(Some(p));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: one live `pollfd`.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// The last offload flags the device set.
    pub fn offload(&self) -> u32 {
        self.state.offload.load(Ordering::SeqCst)
    }

    /// The last virtio-net header size the device set (0 if never).
    pub fn vnet_hdr_size(&self) -> usize {
        self.state.vnet_hdr_size.load(Ordering::SeqCst)
    }

    /// Whether the device left this queue attached.
    pub fn queue_enabled(&self) -> bool {
        self.state.enabled.load(Ordering::SeqCst)
    }
}
