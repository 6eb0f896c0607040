//! Host-side socket calls the standard library does not offer: a non-blocking connect to a
//! path (a listener with a full backlog must not block the device thread) and a peek.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a non-blocking stream socket to the Unix socket at `path`; a listener that does
/// not accept at once (full backlog) is `WouldBlock`, none is `ConnectionRefused`/`NotFound`.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long for sockaddr_un",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` is within it.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Copies up to `buf.len()` bytes waiting on `stream` into `buf` without consuming them.
pub fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes for the duration of the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn connects_without_blocking_and_peeks_without_consuming() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/nimbus-vsock-host")
            .expect("tempdir");
        let path = dir.as_path().join("s_5");
        assert_eq!(
            connect_nonblocking(&path)
                .expect_err("nobody listens")
                .kind(),
            io::ErrorKind::NotFound
        );
        let listener = UnixListener::bind(&path).expect("bind");
        let mut client = connect_nonblocking(&path).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"abc").expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(peek(&server, &mut buf).expect("peek"), 3);
        assert_eq!(&buf[..3], b"abc");
        let mut all = [0u8; 3];
        server.read_exact(&mut all).expect("read");
        assert_eq!(&all, b"abc");
    }
}
