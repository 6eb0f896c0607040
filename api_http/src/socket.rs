//! Unix stream socket I/O that carries file descriptors (`SCM_RIGHTS`).
//!
//! The kernel delivers the descriptors of one `sendmsg` together with the first bytes of that
//! message, so the receiver collects them from every `recvmsg` and decides which request they
//! belong to. Received descriptors are close-on-exec and owned ([`OwnedFd`]) from the moment they
//! arrive, so nothing leaks when they are not used.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

/// The most descriptors one message can carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Bytes of payload in one `SCM_RIGHTS` control message with [`MAX_FDS_PER_MESSAGE`] descriptors.
const MAX_RIGHTS_LEN: usize = MAX_FDS_PER_MESSAGE * mem::size_of::<RawFd>();

/// Bytes of control buffer needed for the largest `SCM_RIGHTS` message.
// SAFETY: CMSG_SPACE only does arithmetic on its argument; the value fits in a c_uint.
const CONTROL_LEN: usize = unsafe { libc::CMSG_SPACE(MAX_RIGHTS_LEN as libc::c_uint) } as usize;

/// Control buffer, 8-byte aligned as `cmsghdr` requires.
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_LEN]);

/// What one [`recv_with_fds`] call returned.
#[derive(Debug)]
pub struct Received {
    /// Bytes written to the start of the buffer; 0 means the peer closed its sending side.
    pub len: usize,
    /// Descriptors that arrived with these bytes, in the order they were sent.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors because the control buffer was too small (`MSG_CTRUNC`).
    /// The ones that did arrive are in `fds`.
    pub truncated: bool,
}

/// Receives bytes and any descriptors sent with them with one `recvmsg` (`MSG_CMSG_CLOEXEC`).
///
/// Blocks or not depending on the socket's mode; `EINTR` and `EAGAIN` come back as errors.
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = ControlBuffer([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data for which all zero bytes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;

    // SAFETY: msg points at one iovec describing `buf` (valid for writes of its length) and at
    // the control buffer of msg_controllen bytes; both outlive the call.
    let ret = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let len = usize::try_from(ret).map_err(|_| io::Error::last_os_error())?;

    let mut fds = Vec::new();
    // SAFETY: msg was filled by recvmsg: msg_control/msg_controllen describe the valid part of
    // our control buffer, which CMSG_FIRSTHDR only reads the bounds of.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside the control
        // buffer, which holds a whole header there; read_unaligned has no alignment need.
        let header = unsafe { ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only does arithmetic.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let payload = (header.cmsg_len as usize).saturating_sub(header_len);
            let count = payload / mem::size_of::<RawFd>();
            // SAFETY: cmsg is a valid header inside the buffer (see above).
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` descriptors after the header, inside the
                // control buffer (cmsg_len covers them); unaligned reads are allowed.
                let raw = unsafe { ptr::read_unaligned(data.add(i)) };
                // SAFETY: each descriptor in SCM_RIGHTS was just installed in our table for
                // us alone; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: msg and cmsg are as above; CMSG_NXTHDR checks the bounds of msg_controllen.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Sends bytes with one `sendmsg` (`MSG_NOSIGNAL`), attaching `fds` when there are any.
///
/// Returns how many bytes were sent; the descriptors go with the first of them, so the caller
/// sends any rest without them. At most [`MAX_FDS_PER_MESSAGE`] descriptors, and at least one
/// byte of data when there are descriptors (a stream socket drops descriptors sent alone).
pub fn send_with_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_MESSAGE} descriptors per message"),
        ));
    }
    if !fds.is_empty() && data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte of data",
        ));
    }
    let mut control = ControlBuffer([0; CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data for which all zero bytes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let rights_len = mem::size_of_val(fds);
        // The casts cannot truncate: rights_len <= MAX_RIGHTS_LEN, checked above.
        // SAFETY: CMSG_SPACE/CMSG_LEN only do arithmetic.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(rights_len as libc::c_uint) as usize,
                libc::CMSG_LEN(rights_len as libc::c_uint) as usize,
            )
        };
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at our zeroed buffer of at least `space` bytes, enough
        // for one header.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(io::Error::other("control buffer too small"));
        }
        // SAFETY: cmsg points at the start of the 8-byte aligned control buffer, which is
        // large enough for the header and `rights_len` bytes of payload (CMSG_SPACE above).
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len as _;
            let payload = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                ptr::write_unaligned(payload.add(i), *fd);
            }
        }
    }
    // SAFETY: msg points at one iovec describing `data` (only read) and, when there are fds, at
    // our initialised control buffer; both outlive the call.
    let ret = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Shuts down the sending side of a socket, so the peer reads end-of-file after what was sent.
pub fn shutdown_write(socket: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown only takes a descriptor, which the borrow keeps open.
    let ret = unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn temp_file(contents: &[u8]) -> File {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(contents).unwrap();
        file.rewind().unwrap();
        file
    }

    #[test]
    fn fds_arrive_with_the_bytes_and_are_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let first = temp_file(b"first");
        let second = temp_file(b"second");
        let sent = send_with_fds(
            a.as_fd(),
            b"hello",
            &[first.as_raw_fd(), second.as_raw_fd()],
        )
        .unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert!(!got.truncated);
        assert_eq!(got.fds.len(), 2);
        for (fd, want) in got.fds.into_iter().zip([&b"first"[..], b"second"]) {
            // SAFETY: fcntl(F_GETFD) on a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            let mut text = Vec::new();
            File::from(fd).read_to_end(&mut text).unwrap();
            assert_eq!(text, want);
        }
    }

    #[test]
    fn plain_bytes_and_eof() {
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"abc", &[]).unwrap(), 3);
        shutdown_write(a.as_fd()).unwrap();
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((got.len, got.fds.len()), (3, 0));
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().len, 0);
    }

    #[test]
    fn invalid_sends_are_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let file = temp_file(b"");
        let err = send_with_fds(a.as_fd(), b"", &[file.as_raw_fd()]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let many = vec![file.as_raw_fd(); MAX_FDS_PER_MESSAGE + 1];
        let err = send_with_fds(a.as_fd(), b"x", &many).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_largest_message_fits() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = temp_file(b"");
        let many = vec![file.as_raw_fd(); MAX_FDS_PER_MESSAGE];
        send_with_fds(a.as_fd(), b"x", &many).unwrap();
        let mut buf = [0u8; 8];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(got.fds.len(), MAX_FDS_PER_MESSAGE);
        assert!(!got.truncated);
    }
}
