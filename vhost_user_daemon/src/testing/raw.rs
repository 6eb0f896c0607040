//! A scripted vhost-user frontend that writes the wire format itself ([`RawFrontend`]): a
//! header of three little-endian `u32` (request, flags, size), the payload, and descriptors as
//! `SCM_RIGHTS`. The `vhost` crate's `Frontend` refuses to send what a hostile frontend sends
//! (wrong sizes, unknown codes, missing descriptors), so the hostile tests speak through this.

// Test code: a panic is how a helper reports failure.
#![allow(clippy::unwrap_used)]

use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Request codes (frontend to backend) of the vhost-user protocol.
pub mod req {
    #![allow(missing_docs)]
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const ADD_MEM_REG: u32 = 37;
}

/// Header flags: protocol version 1.
pub const VERSION_1: u32 = 0x1;
/// Header flags: the message is a reply.
pub const REPLY: u32 = 0x4;
/// Header flags: the sender wants a reply (`REPLY_ACK`).
pub const NEED_REPLY: u32 = 0x8;
/// The largest message the protocol allows (header excluded).
pub const MAX_MSG_SIZE: u32 = 0x1000;
/// Bit 8 of a `SET_VRING_KICK`/`CALL`/`ERR` payload: no descriptor attached.
pub const VRING_NOFD: u64 = 0x100;
/// The vhost-user protocol features the hostile tests negotiate: MQ, CONFIG, REPLY_ACK.
pub const PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 3) | (1 << 9);
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags (version, reply, need-reply).
    pub flags: u32,
    /// Payload size.
    pub size: u32,
}

impl Header {
    /// The 12 bytes on the wire.
    pub fn bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

/// A message the backend sent.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// The payload as one `u64` (the body of acks, features, queue counts).
    pub fn u64(&self) -> Option<u64> {
        (self.payload.len() == 8).then(|| u64::from_le_bytes(self.payload[..8].try_into().unwrap()))
    }
}

/// What the backend did after a message.
#[derive(Debug)]
pub enum Answer {
    /// It sent a message.
    Message(Message),
    /// It closed the connection (or reset it) without one.
    Closed,
    /// Nothing within the wait.
    Silent,
}

impl Answer {
    /// The `u64` status of a `REPLY_ACK` answer: `Some(0)` success, `Some(n)` failure; `None`
    /// for any other answer.
    pub fn ack(&self) -> Option<u64> {
        match self {
            Answer::Message(m) if m.header.flags & REPLY != 0 => m.u64(),
            _ => None,
        }
    }
}

/// A frontend connection that sends whatever the test scripts.
#[derive(Debug)]
pub struct RawFrontend {
    stream: UnixStream,
}

impl RawFrontend {
    /// Connects to the backend listening on `socket`.
    ///
    /// # Panics
    ///
    /// If it cannot.
    pub fn connect(socket: &Path) -> Self {
        Self::from_stream(UnixStream::connect(socket).unwrap())
    }

    /// A frontend on `stream`.
    pub fn from_stream(stream: UnixStream) -> Self {
        RawFrontend { stream }
    }

    /// The connection.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Writes `bytes` as they are, with `fds` attached.
    ///
    /// # Errors
    ///
    /// The socket's (the backend closed the connection).
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let sent = self
            .stream
            .send_with_fds(&[bytes], fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if sent != bytes.len() {
            // The rest, without the descriptors (they went with the first part).
            (&self.stream).write_all(&bytes[sent..])?;
        }
        Ok(())
    }

    /// Sends `request` with `flags` and `payload`, the header's size being the payload's.
    ///
    /// # Errors
    ///
    /// As [`send_bytes`](Self::send_bytes).
    pub fn send(&self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        self.send_sized(request, flags, payload.len() as u32, payload, fds)
    }

    /// Sends a header claiming `size` bytes of payload, then `payload` (which may be shorter or
    /// longer).
    ///
    /// # Errors
    ///
    /// As [`send_bytes`](Self::send_bytes).
    pub fn send_sized(
        &self,
        request: u32,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut bytes = Header {
            request,
            flags,
            size,
        }
        .bytes()
        .to_vec();
        bytes.extend_from_slice(payload);
        self.send_bytes(&bytes, fds)
    }

    /// Waits at most `wait` for the backend's next message, or for the connection to close.
    pub fn receive(&self, wait: Duration) -> Answer {
        let mut header = [0u8; 12];
        let mut fds = Vec::new();
        match self.read_with_fds(&mut header, &mut fds, wait) {
            ReadEnd::Full => {}
            ReadEnd::Closed => return Answer::Closed,
            ReadEnd::TimedOut(0) => return Answer::Silent,
            ReadEnd::TimedOut(n) => panic!("only {n} bytes of a reply header"),
        }
        let header = Header {
            request: u32::from_le_bytes(header[0..4].try_into().unwrap()),
            flags: u32::from_le_bytes(header[4..8].try_into().unwrap()),
            size: u32::from_le_bytes(header[8..12].try_into().unwrap()),
        };
        assert!(
            header.size <= MAX_MSG_SIZE,
            "reply of {} bytes: {header:?}",
            header.size
        );
        let mut payload = vec![0u8; header.size as usize];
        match self.read_with_fds(&mut payload, &mut fds, wait) {
            ReadEnd::Full => {}
            end => panic!("reply {header:?} cut short: {end:?}"),
        }
        Answer::Message(Message {
            header,
            payload,
            fds,
        })
    }

    /// Sends `request` with `NEED_REPLY` and returns the answer (waiting at most
    /// [`TIMEOUT`](super::TIMEOUT)).
    ///
    /// # Panics
    ///
    /// If sending fails other than because the backend closed the connection.
    pub fn call(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> Answer {
        match self.send(request, VERSION_1 | NEED_REPLY, payload, fds) {
            Ok(()) => self.receive(super::TIMEOUT),
            Err(e) if is_closed_error(&e) => Answer::Closed,
            Err(e) => panic!("sending request {request}: {e}"),
        }
    }

    /// As [`call`](Self::call), asserting the backend acked with success.
    ///
    /// # Panics
    ///
    /// On any other answer.
    pub fn ok(&self, request: u32, payload: &[u8], fds: &[RawFd]) {
        let answer = self.call(request, payload, fds);
        assert_eq!(answer.ack(), Some(0), "request {request}: {answer:?}");
    }

    /// As [`call`](Self::call) for a request that is answered with a `u64`.
    ///
    /// # Panics
    ///
    /// On any other answer.
    pub fn get_u64(&self, request: u32) -> u64 {
        match self.call(request, &[], &[]) {
            Answer::Message(m) if m.header.request == request => m.u64().unwrap(),
            other => panic!("request {request}: {other:?}"),
        }
    }

    /// Waits at most `wait` for the backend to close the connection, discarding what it sends
    /// meanwhile; whether it did.
    pub fn closed_within(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.receive(left) {
                Answer::Closed => return true,
                Answer::Silent => return false,
                Answer::Message(_) => {}
            }
        }
    }

    /// Reads exactly `buf.len()` bytes, collecting descriptors, within `wait`.
    fn read_with_fds(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>, wait: Duration) -> ReadEnd {
        let deadline = Instant::now() + wait;
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return ReadEnd::TimedOut(got);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut raw = [-1 as RawFd; 32];
            let mut iov = [libc::iovec {
                iov_base: buf[got..].as_mut_ptr().cast(),
                iov_len: buf.len() - got,
            }];
            // SAFETY: the iovec points into `buf`, which any bytes may be written to; `raw`
            // takes the descriptors.
            let r = unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) };
            match r {
                Ok((0, _)) => return ReadEnd::Closed,
                Ok((n, nfds)) => {
                    got += n;
                    // SAFETY: the kernel installed these descriptors for us; nobody else owns
                    // them.
                    fds.extend(
                        raw[..nfds]
                            .iter()
                            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
                Err(e) => {
                    let e = io::Error::from_raw_os_error(e.errno());
                    match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {}
                        io::ErrorKind::Interrupted => {}
                        _ if is_closed_error(&e) => return ReadEnd::Closed,
                        _ => panic!("reading from the backend: {e}"),
                    }
                }
            }
        }
        ReadEnd::Full
    }
}

/// How a read ended.
#[derive(Debug)]
enum ReadEnd {
    Full,
    Closed,
    TimedOut(usize),
}

/// Whether `e` means the peer closed or reset the connection.
pub fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// The payload of a message carrying one `u64`.
pub fn u64_payload(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// The payload of `SET_VRING_NUM`, `SET_VRING_BASE`, `GET_VRING_BASE`, `SET_VRING_ENABLE`.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    p
}

/// The payload of `SET_VRING_ADDR` (host addresses of the frontend, no log).
pub fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&flags.to_le_bytes());
    for a in [desc, used, avail, 0] {
        p.extend_from_slice(&a.to_le_bytes());
    }
    p
}

/// One region of a `SET_MEM_TABLE` payload.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The frontend's virtual address of it.
    pub user_addr: u64,
    /// Offset in its file.
    pub mmap_offset: u64,
}

/// The payload of `SET_MEM_TABLE` with `num_regions` (which may differ from `regions.len()`).
pub fn mem_table(num_regions: u32, regions: &[Region]) -> Vec<u8> {
    let mut p = num_regions.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        for v in [r.guest_addr, r.size, r.user_addr, r.mmap_offset] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// The payload of `GET_CONFIG`/`SET_CONFIG`: offset, size, flags, then `size` bytes.
pub fn config(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_le_bytes().to_vec();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(data);
    p
}
