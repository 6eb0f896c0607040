//! Linux TAP devices (`/dev/net/tun`, see the kernel's `Documentation/networking/tuntap.rst`)
//! and [`TapQueue`], the narrow interface the virtio-net data path needs from one TAP queue.

use std::ffi::CStr;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::mac::MacAddr;

/// Path of the TUN/TAP clone device.
pub const TUN_DEVICE: &CStr = c"/dev/net/tun";
/// Most queues one TAP device can have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: usize = 256;

/// Errors creating, adopting or configuring a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interface name cannot be used.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The name asked for.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The number of queue pairs is 0 or more than [`MAX_TAP_QUEUES`].
    #[error("cannot open {0} TAP queues (1 to 256)")]
    InvalidQueueCount(usize),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` refused to create or attach to the interface.
    #[error("cannot create or attach to TAP {name:?} (queue {queue})")]
    CreateTap {
        /// The interface name asked for.
        name: String,
        /// Which queue was being opened.
        queue: usize,
        /// Cause (e.g. `EPERM` without `CAP_NET_ADMIN`, `EINVAL` for an existing interface of
        /// another kind or with another multiqueue setting, `EBUSY` when it is in use).
        #[source]
        source: io::Error,
    },
    /// A file descriptor handed over is not a usable TAP queue.
    #[error("file descriptor {fd} is not a usable TAP: {reason}")]
    NotTap {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        reason: String,
    },
    /// An ioctl on the TAP or on its interface failed.
    #[error("{request} on {if_name} failed")]
    Ioctl {
        /// The interface.
        if_name: String,
        /// The request (`TUNSETOFFLOAD`, `SIOCSIFADDR`, ...).
        request: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The `AF_INET` socket used to configure interfaces could not be created.
    #[error("cannot create a socket to configure {if_name}")]
    Socket {
        /// The interface.
        if_name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// One queue of a TAP device, as the virtio-net data path uses it.
///
/// [`Tap`] is the real thing; `FakeTap` (feature `test-utils`) is a socket pair standing in for
/// it in tests. Reads and writes are non-blocking, one packet each: the virtio-net header
/// (12 bytes, [`crate::VNET_HDR_LEN`]) followed by an Ethernet frame.
pub trait TapQueue: AsRawFd + Send + Sync + fmt::Debug {
    /// The interface name, for messages.
    fn if_name(&self) -> &str;
    /// Reads one packet into `bufs`; `WouldBlock` when none is waiting.
    fn read_packet(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    /// Writes one packet gathered from `bufs`.
    fn write_packet(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Sets the length of the virtio-net header in front of every packet (`TUNSETVNETHDRSZ`).
    fn set_vnet_hdr_size(&self, size: usize) -> Result<(), NetError>;
    /// Sets the offloads the TAP may use for packets it hands over (`TUNSETOFFLOAD`).
    fn set_offload(&self, flags: u32) -> Result<(), NetError>;
    /// Attaches (`true`) or detaches this queue of a multiqueue TAP (`TUNSETQUEUE`); the
    /// kernel only steers received traffic to attached queues. Idempotent.
    fn set_queue_enabled(&self, enabled: bool) -> Result<(), NetError>;
}

/// One queue (file descriptor) of a TAP interface, opened non-blocking with a virtio-net
/// header (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus `IFF_MULTI_QUEUE` for several queues).
///
/// Interface configuration ([`set_ip_addr`](Self::set_ip_addr), [`set_mac`](Self::set_mac),
/// [`set_up`](Self::set_up), ...) goes through socket ioctls on the interface *name*, in the
/// network namespace of the calling thread.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    multi_queue: bool,
    attached: AtomicBool,
}

/// An `ifreq` for interface `name` (already checked to fit), everything else zero.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain data (a name array and a union of plain data); all zeroes is a
    // valid value of every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Checks `name` can be an interface name: at most 15 bytes, no NUL, `/`, `:` or whitespace.
/// An empty name lets the kernel pick one (`tap0`, `tap1`, ...).
fn check_name(name: &str) -> Result<(), NetError> {
    let error = |reason| {
        Err(NetError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.len() >= libc::IFNAMSIZ {
        return error("longer than 15 bytes");
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return error("contains NUL, '/', ':' or whitespace");
    }
    if name == "." || name == ".." {
        return error("reserved");
    }
    Ok(())
}

/// `ioctl(fd, request, arg)` for requests taking a pointer; `-1` turned into the OS error.
///
/// # Safety
///
/// `arg` must point to a live object of the type `request` expects, which the kernel may read
/// and write during the call.
unsafe fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: forwarded from the caller.
    let ret = unsafe { libc::ioctl(fd, request as _, arg.cast::<libc::c_void>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, request, value)` for requests taking an integer by value.
fn ioctl_val(fd: RawFd, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes a plain integer; no memory is passed to the kernel.
    let ret = unsafe { libc::ioctl(fd, request as _, value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `sockaddr` holding an IPv4 address (as `sockaddr_in` lays it out: port 0, then the address).
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: `sockaddr` is plain data; all zeroes is valid.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_INET as libc::sa_family_t;
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    sa
}

fn sockaddr_v4_addr(sa: &libc::sockaddr) -> Ipv4Addr {
    let b = &sa.sa_data;
    Ipv4Addr::new(b[2] as u8, b[3] as u8, b[4] as u8, b[5] as u8)
}

impl Tap {
    /// Opens `num_queue_pairs` queues of TAP interface `name`, creating it if missing (an
    /// empty name lets the kernel choose; see [`if_name`](Self::if_name)). More than one queue
    /// makes it a multiqueue TAP, so an existing interface must have been created multiqueue
    /// too (`ip tuntap add NAME mode tap multi_queue`).
    ///
    /// Each queue is non-blocking, close-on-exec, with the 12-byte virtio-net header
    /// (`TUNSETVNETHDRSZ`) and no offloads; the interface is not brought up.
    ///
    /// # Errors
    ///
    /// [`NetError::InvalidName`], [`NetError::InvalidQueueCount`], [`NetError::OpenTun`] (no
    /// `/dev/net/tun`), [`NetError::CreateTap`] (no `CAP_NET_ADMIN`, name taken by another kind
    /// of interface, multiqueue mismatch), [`NetError::Ioctl`].
    pub fn open_named(name: &str, num_queue_pairs: usize) -> Result<Vec<Tap>, NetError> {
        check_name(name)?;
        if num_queue_pairs == 0 || num_queue_pairs > MAX_TAP_QUEUES {
            return Err(NetError::InvalidQueueCount(num_queue_pairs));
        }
        let multi_queue = num_queue_pairs > 1;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut taps = Vec::with_capacity(num_queue_pairs);
        let mut if_name = name.to_string();
        for queue in 0..num_queue_pairs {
            // SAFETY: the path is NUL-terminated; the flags ask for a new descriptor.
            let raw = unsafe {
                libc::open(
                    TUN_DEVICE.as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(NetError::OpenTun(io::Error::last_os_error()));
            }
            // SAFETY: `raw` was just opened and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut req = ifreq(&if_name);
            // The flags fit in the 16-bit field (all defined bits are below 0x8000).
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the `ifreq`, which lives across the call.
            unsafe { ioctl_ptr(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) }.map_err(
                |source| NetError::CreateTap {
                    name: if_name.clone(),
                    queue,
                    source,
                },
            )?;
            // The kernel writes back the name it used (its choice for an empty name).
            if_name = ifreq_name(&req);
            let tap = Tap {
                fd,
                name: if_name.clone(),
                multi_queue,
                attached: AtomicBool::new(true),
            };
            tap.set_vnet_hdr_size(crate::VNET_HDR_LEN)?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Adopts a TAP queue opened by someone else (a management stack passing descriptors).
    ///
    /// The descriptor must be a TAP queue (`TUNGETIFF` works) created with `IFF_VNET_HDR` and
    /// `IFF_NO_PI`; it is made non-blocking and given the 12-byte virtio-net header. The
    /// descriptor is closed if it is refused. `IFF_NO_PI` cannot be checked (`TUNGETIFF`
    /// reports the same bit as `IFF_NOFILTER` whenever no socket filter is attached): a
    /// manager that forgets it gets packets with a 4-byte prefix the guest sees as garbage.
    ///
    /// # Errors
    ///
    /// [`NetError::NotTap`] naming the descriptor, or [`NetError::Ioctl`].
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, NetError> {
        let raw = fd.as_raw_fd();
        let not_tap = |reason: String| NetError::NotTap { fd: raw, reason };
        let mut req = ifreq("");
        // SAFETY: TUNGETIFF writes the `ifreq`, which lives across the call.
        unsafe { ioctl_ptr(raw, libc::TUNGETIFF as _, &mut req) }
            .map_err(|e| not_tap(format!("TUNGETIFF: {e}")))?;
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff;
        if flags & (libc::IFF_TUN | libc::IFF_TAP) != libc::IFF_TAP {
            return Err(not_tap("it is a TUN (layer 3) device, not a TAP".into()));
        }
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(not_tap("it was opened without IFF_VNET_HDR".into()));
        }
        // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: F_SETFL takes an int of flags.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(not_tap(format!(
                "cannot make it non-blocking: {}",
                io::Error::last_os_error()
            )));
        }
        let tap = Tap {
            fd,
            name: ifreq_name(&req),
            multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
            attached: AtomicBool::new(flags & libc::IFF_DETACH_QUEUE == 0),
        };
        tap.set_vnet_hdr_size(crate::VNET_HDR_LEN)?;
        Ok(tap)
    }

    /// [`from_fd`](Self::from_fd) for a raw descriptor number (e.g. from `--net fd=N`).
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that nothing else in the process owns or will close:
    /// the returned `Tap` (or the error path) closes it.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Tap, NetError> {
        // SAFETY: ownership is the caller's promise.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Another descriptor for the same TAP queue (`dup`), e.g. to give a rebuilt VM's device
    /// the queues the VMM keeps across guest reboots. The two share the queue; only one
    /// should be in use at a time, since each tracks the queue's attachment on its own.
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`] naming `F_DUPFD_CLOEXEC`.
    pub fn try_clone(&self) -> Result<Tap, NetError> {
        let fd = self
            .fd
            .try_clone()
            .map_err(self.ioctl_error("F_DUPFD_CLOEXEC"))?;
        Ok(Tap {
            fd,
            name: self.name.clone(),
            multi_queue: self.multi_queue,
            attached: AtomicBool::new(self.attached.load(Ordering::SeqCst)),
        })
    }

    /// The interface name.
    pub fn if_name(&self) -> &str {
        &self.name
    }

    /// Whether the interface is a multiqueue TAP.
    pub fn is_multi_queue(&self) -> bool {
        self.multi_queue
    }

    fn ioctl_error(&self, request: &'static str) -> impl FnOnce(io::Error) -> NetError + '_ {
        move |source| NetError::Ioctl {
            if_name: self.name.clone(),
            request,
            source,
        }
    }

    /// Sets the virtio-net header length the TAP puts in front of received packets and expects
    /// in front of sent ones (`TUNSETVNETHDRSZ`; 12 for `virtio_net_hdr_v1`).
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`] (the kernel accepts 10 or more).
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<(), NetError> {
        let size = libc::c_int::try_from(size).map_err(|_| NetError::Ioctl {
            if_name: self.name.clone(),
            request: "TUNSETVNETHDRSZ",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut size = size;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which lives across the call.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &mut size) }
            .map_err(self.ioctl_error("TUNSETVNETHDRSZ"))?;
        Ok(())
    }

    /// Sets the offloads (`TUN_F_*`, see [`crate::tap_offload_flags`]) the TAP may use for
    /// packets it hands over: partial checksums, TSO, UFO (`TUNSETOFFLOAD`).
    ///
    /// Kernels that refuse `TUN_F_UFO` get the same flags without it.
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`].
    pub fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        let set = |f: u32| {
            ioctl_val(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(f),
            )
        };
        match set(flags) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags & libc::TUN_F_UFO != 0 => {
                set(flags & !libc::TUN_F_UFO)
            }
            other => other,
        }
        .map_err(self.ioctl_error("TUNSETOFFLOAD"))?;
        Ok(())
    }

    /// Attaches or detaches this queue (`TUNSETQUEUE`); only multiqueue TAPs have queues to
    /// detach, so for the others this is a no-op. Idempotent.
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`].
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), NetError> {
        if !self.multi_queue || self.attached.load(Ordering::SeqCst) == enabled {
            return Ok(());
        }
        let mut req = ifreq("");
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the `ifreq`, which lives across the call.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), libc::TUNSETQUEUE as _, &mut req) }
            .map_err(self.ioctl_error("TUNSETQUEUE"))?;
        self.attached.store(enabled, Ordering::SeqCst);
        Ok(())
    }

    /// Reads one packet (virtio-net header and frame) into `bufs`; `WouldBlock` when none is
    /// waiting. A buffer too small for the packet gets its beginning.
    pub fn read_packet(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec`; each points to a live, writable
        // buffer of its length, and `count` does not exceed the slice.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), bufs.as_ptr().cast(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one packet (virtio-net header and frame) gathered from `bufs`.
    pub fn write_packet(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; each points to a live buffer of its
        // length, and `count` does not exceed the slice.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), bufs.as_ptr().cast(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Runs socket ioctl `request` on this interface with `req`.
    fn if_ioctl(
        &self,
        request: libc::c_ulong,
        name: &'static str,
        req: &mut libc::ifreq,
    ) -> Result<(), NetError> {
        // SAFETY: plain socket creation; the result is checked and owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(NetError::Socket {
                if_name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` was just created and is owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: every SIOC[GS]IF* request used here takes a pointer to an `ifreq`, which
        // lives across the call.
        unsafe { ioctl_ptr(sock.as_raw_fd(), request, req as *mut libc::ifreq) }
            .map_err(self.ioctl_error(name))?;
        Ok(())
    }

    /// Gives the host side of the interface IPv4 address `addr` with `netmask`
    /// (`SIOCSIFADDR`, `SIOCSIFNETMASK`).
    ///
    /// # Errors
    ///
    /// [`NetError::Socket`] or [`NetError::Ioctl`] (e.g. `EINVAL` for a non-contiguous mask).
    pub fn set_ip_addr(&self, addr: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), NetError> {
        let mut req = ifreq(&self.name);
        req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        self.if_ioctl(libc::SIOCSIFADDR, "SIOCSIFADDR", &mut req)?;
        let mut req = ifreq(&self.name);
        req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
        self.if_ioctl(libc::SIOCSIFNETMASK, "SIOCSIFNETMASK", &mut req)
    }

    /// The interface's IPv4 address and netmask (`SIOCGIFADDR`, `SIOCGIFNETMASK`).
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`] (`EADDRNOTAVAIL` when it has none).
    pub fn ip_addr(&self) -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
        let mut req = ifreq(&self.name);
        self.if_ioctl(libc::SIOCGIFADDR, "SIOCGIFADDR", &mut req)?;
        // SAFETY: SIOCGIFADDR filled in the address member.
        let addr = sockaddr_v4_addr(unsafe { &req.ifr_ifru.ifru_addr });
        let mut req = ifreq(&self.name);
        self.if_ioctl(libc::SIOCGIFNETMASK, "SIOCGIFNETMASK", &mut req)?;
        // SAFETY: SIOCGIFNETMASK filled in the netmask member.
        let mask = sockaddr_v4_addr(unsafe { &req.ifr_ifru.ifru_netmask });
        Ok((addr, mask))
    }

    /// Sets the host side's MAC address (`SIOCSIFHWADDR`); not the guest's, which is in the
    /// virtio-net configuration space.
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`] (e.g. `EADDRNOTAVAIL` for a multicast address).
    pub fn set_mac(&self, mac: MacAddr) -> Result<(), NetError> {
        let mut req = ifreq(&self.name);
        // SAFETY: `sockaddr` is plain data; all zeroes is valid.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in sa.sa_data.iter_mut().zip(mac.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = sa;
        self.if_ioctl(libc::SIOCSIFHWADDR, "SIOCSIFHWADDR", &mut req)
    }

    /// The host side's MAC address (`SIOCGIFHWADDR`).
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`].
    pub fn mac(&self) -> Result<MacAddr, NetError> {
        let mut req = ifreq(&self.name);
        self.if_ioctl(libc::SIOCGIFHWADDR, "SIOCGIFHWADDR", &mut req)?;
        // SAFETY: SIOCGIFHWADDR filled in the hardware address member.
        let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut bytes = [0u8; 6];
        for (dst, src) in bytes.iter_mut().zip(sa.sa_data) {
            *dst = src as u8;
        }
        Ok(MacAddr::from_bytes(bytes))
    }

    /// Sets the interface MTU (`SIOCSIFMTU`).
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`] (`EINVAL` out of the TAP's 68..=65535 range).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), NetError> {
        let mut req = ifreq(&self.name);
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.if_ioctl(libc::SIOCSIFMTU, "SIOCSIFMTU", &mut req)
    }

    fn flags(&self) -> Result<libc::c_short, NetError> {
        let mut req = ifreq(&self.name);
        self.if_ioctl(libc::SIOCGIFFLAGS, "SIOCGIFFLAGS", &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member.
        Ok(unsafe { req.ifr_ifru.ifru_flags })
    }

    /// Brings the interface up (`IFF_UP` through `SIOCGIFFLAGS`/`SIOCSIFFLAGS`).
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`].
    pub fn set_up(&self) -> Result<(), NetError> {
        let flags = self.flags()?;
        let mut req = ifreq(&self.name);
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.if_ioctl(libc::SIOCSIFFLAGS, "SIOCSIFFLAGS", &mut req)
    }

    /// Whether the interface is up.
    ///
    /// # Errors
    ///
    /// [`NetError::Ioctl`].
    pub fn is_up(&self) -> Result<bool, NetError> {
        Ok(self.flags()? & libc::IFF_UP as libc::c_short != 0)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl TapQueue for Tap {
    fn if_name(&self) -> &str {
        Tap::if_name(self)
    }
    fn read_packet(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        Tap::read_packet(self, bufs)
    }
    fn write_packet(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Tap::write_packet(self, bufs)
    }
    fn set_vnet_hdr_size(&self, size: usize) -> Result<(), NetError> {
        Tap::set_vnet_hdr_size(self, size)
    }
    fn set_offload(&self, flags: u32) -> Result<(), NetError> {
        Tap::set_offload(self, flags)
    }
    fn set_queue_enabled(&self, enabled: bool) -> Result<(), NetError> {
        Tap::set_queue_enabled(self, enabled)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("").is_ok());
        assert!(check_name("tap0").is_ok());
        assert!(check_name("nimbus-tap-1234").is_ok());
        for bad in ["nimbus-tap-12345", "a/b", "a b", "a:b", "a\0b", ".", ".."] {
            let e = check_name(bad).unwrap_err();
            assert!(e.to_string().contains("invalid interface name"), "{e}");
        }
        assert!(matches!(
            Tap::open_named("x", 0),
            Err(NetError::InvalidQueueCount(0))
        ));
        assert!(matches!(
            Tap::open_named("x", 257),
            Err(NetError::InvalidQueueCount(257))
        ));
    }

    #[test]
    fn ifreq_round_trips_names_and_addresses() {
        let req = ifreq("tap-x");
        assert_eq!(ifreq_name(&req), "tap-x");
        let sa = sockaddr_v4(Ipv4Addr::new(192, 168, 249, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(sockaddr_v4_addr(&sa), Ipv4Addr::new(192, 168, 249, 1));
    }

    #[test]
    fn a_non_tap_descriptor_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        let e = Tap::from_fd(OwnedFd::from(f)).unwrap_err();
        match e {
            NetError::NotTap { fd: got, reason } => {
                assert_eq!(got, fd);
                assert!(reason.contains("TUNGETIFF"), "{reason}");
            }
            other => panic!("unexpected {other}"),
        }
    }
}
