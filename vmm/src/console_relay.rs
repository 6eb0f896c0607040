//! Consoles on a pseudo-terminal (`pty`) or a Unix socket (`socket=PATH`): the serial port, the
//! virtio console and the debug console.
//!
//! The guest's output goes into a bounded buffer ([`OUTPUT_BUFFER`] bytes; the oldest bytes
//! give way) that one thread per console, of class `console relay`, writes to the PTY or the
//! socket's client without ever blocking; what the PTY's user or the client types goes to the
//! device of the VM instance currently running (the UART's receive FIFO or the virtio console's
//! input), waiting while the guest's side is full.
//!
//! A PTY is allocated when the VM boots; its path (`/dev/pts/N`) is what `vm.info` shows in
//! `file`, as libvirt reads it. Nimbus keeps the terminal's other end open itself, so output
//! written before anyone opens it waits in the terminal, and a reader may come and go.
//!
//! A socket is created (a stale socket file is replaced) and listens for one client at a time:
//! a new client replaces the one attached (as Cloud Hypervisor does). Output written while no
//! client is attached is kept in the buffer and written to the next client when it attaches.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::serial_input::InputTarget;

/// Most output bytes kept for a PTY nobody reads or a socket with no client (or a slow one).
pub const OUTPUT_BUFFER: usize = 64 << 10;

/// How long the relay waits before offering input again to a guest whose side was full.
const INPUT_RETRY_MS: i32 = 2;

/// Errors setting up a PTY or socket console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleRelayError {
    /// The pseudo-terminal could not be allocated.
    #[error("{what}: cannot allocate a pseudo-terminal ({step})")]
    Pty {
        /// `serial`, `console` or `debug-console`.
        what: &'static str,
        /// The step that failed.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be created.
    #[error("{what}: cannot listen on {path}")]
    Socket {
        /// `serial`, `console` or `debug-console`.
        what: &'static str,
        /// The socket's path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The relay's eventfd or thread could not be created.
    #[error("{what}: cannot start the console relay")]
    Thread {
        /// `serial`, `console` or `debug-console`.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Creates a Unix socket at `path` and listens on it, replacing a stale socket file; any other
/// file in the way is an `AlreadyExists` error.
pub fn bind_replacing_stale(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A stale socket from an earlier run.
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ))
        }
        Err(_) => {}
    }
    UnixListener::bind(path)
}

/// The guest's output waiting for the PTY or the client.
#[derive(Debug, Default)]
struct Output {
    bytes: VecDeque<u8>,
    /// Bytes dropped because the buffer was full (oldest first).
    dropped: u64,
}

/// What the writers and the relay thread share.
#[derive(Debug)]
struct Shared {
    output: Mutex<Output>,
    /// Written when output arrives in an empty buffer, and to stop the thread.
    wake: EventFd,
    stop: AtomicBool,
}

impl Shared {
    fn output(&self) -> std::sync::MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the guest's output goes: the buffer of a relay.
#[derive(Debug)]
struct RelayWriter(Arc<Shared>);

impl Write for RelayWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let was_empty = {
            let mut out = self.0.output();
            let was_empty = out.bytes.is_empty();
            out.bytes.extend(buf);
            let excess = out.bytes.len().saturating_sub(OUTPUT_BUFFER);
            if excess > 0 {
                out.bytes.drain(..excess);
                out.dropped += excess as u64;
            }
            was_empty
        };
        if was_empty {
            self.0.wake.write(1)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The host end of a console.
#[derive(Debug)]
enum Peer {
    /// A pseudo-terminal: its master, and its slave kept open by Nimbus.
    Pty { master: File, _slave: File },
    /// A listening socket and the attached client, if any.
    Socket {
        listener: UnixListener,
        client: Option<UnixStream>,
    },
}

impl Peer {
    /// The descriptor carrying data, if any.
    fn data_fd(&self) -> Option<RawFd> {
        match self {
            Self::Pty { master, .. } => Some(master.as_raw_fd()),
            Self::Socket { client, .. } => client.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Pty { master, .. } => master.read(buf),
            Self::Socket { client, .. } => client.as_mut().map_or(Ok(0), |c| c.read(buf)),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Pty { master, .. } => master.write(buf),
            Self::Socket { client, .. } => client.as_mut().map_or(Ok(0), |c| c.write(buf)),
        }
    }

    /// The client went away (a PTY never does: Nimbus holds its other end).
    fn detach(&mut self, name: &str) {
        if let Self::Socket { client, .. } = self {
            if client.take().is_some() {
                log::info!("{name}: client detached");
            }
        }
    }
}

/// A console on a PTY or a socket, with its relay thread.
#[derive(Debug)]
pub struct ConsoleRelay {
    shared: Arc<Shared>,
    input: InputTarget,
    pty: Option<PathBuf>,
    socket: Option<PathBuf>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleRelay {
    /// A console on a new pseudo-terminal; `what` names it (`serial`, `console`,
    /// `debug-console`).
    pub fn pty(what: &'static str) -> Result<Self, ConsoleRelayError> {
        let (master, slave, path) =
            open_pty().map_err(|(step, source)| ConsoleRelayError::Pty { what, step, source })?;
        log::info!("{what}: on the pseudo-terminal {}", path.display());
        let peer = Peer::Pty {
            master,
            _slave: slave,
        };
        Self::start(what, peer, Some(path), None)
    }

    /// A console on a Unix socket created at `path`.
    pub fn socket(what: &'static str, path: &Path) -> Result<Self, ConsoleRelayError> {
        let err = |source| ConsoleRelayError::Socket {
            what,
            path: path.to_path_buf(),
            source,
        };
        let listener = bind_replacing_stale(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        log::info!("{what}: on the socket {}", path.display());
        let peer = Peer::Socket {
            listener,
            client: None,
        };
        Self::start(what, peer, None, Some(path.to_path_buf()))
    }

    fn start(
        what: &'static str,
        peer: Peer,
        pty: Option<PathBuf>,
        socket: Option<PathBuf>,
    ) -> Result<Self, ConsoleRelayError> {
        let thread_err = |source| ConsoleRelayError::Thread { what, source };
        let shared = Arc::new(Shared {
            output: Mutex::default(),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(thread_err)?,
            stop: AtomicBool::new(false),
        });
        let input = InputTarget::default();
        let thread = {
            let (shared, input) = (shared.clone(), input.clone());
            let name = format!("{}_relay", what.split('-').next().unwrap_or(what));
            nimbus_thread::spawn(nimbus_thread::ThreadClass::ConsoleRelay, name, move || {
                relay(what, peer, &shared, &input)
            })
            .map_err(thread_err)?
        };
        Ok(Self {
            shared,
            input,
            pty,
            socket,
            thread: Some(thread),
        })
    }

    /// A writer for a device's output.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(RelayWriter(self.shared.clone()))
    }

    /// Where the PTY's or client's input goes (set to each VM instance's device).
    pub fn input(&self) -> &InputTarget {
        &self.input
    }

    /// The PTY's path (`/dev/pts/N`), for a PTY console.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty.as_deref()
    }
}

impl Drop for ConsoleRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a console relay thread panicked");
            }
        }
        if let Some(path) = self.socket.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `posix_openpt`, `grantpt`, `unlockpt`, `ptsname_r`, then the slave opened and put in raw
/// mode (no echo, no line editing, no newline translation).
fn open_pty() -> Result<(File, File, PathBuf), (&'static str, std::io::Error)> {
    let last = |step| (step, std::io::Error::last_os_error());
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last("posix_openpt"));
    }
    // SAFETY: `fd` was just returned by posix_openpt and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt and unlockpt act on the open master descriptor only.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 {
        return Err(last("grantpt"));
    }
    // SAFETY: as above.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(last("unlockpt"));
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is writable for its whole length, which is passed.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(("ptsname_r", std::io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    let path = PathBuf::from(std::ffi::OsStr::new(
        std::str::from_utf8(path.to_bytes()).unwrap_or_default(),
    ));
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| ("opening the slave", e))?;
    // SAFETY: a zeroed termios is a valid buffer for tcgetattr, which fills it; cfmakeraw and
    // tcsetattr take it by pointer; results are checked.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) != 0 {
            return Err(last("tcgetattr"));
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(last("tcsetattr"));
        }
    }
    let master = File::from(master);
    set_nonblocking(master.as_raw_fd()).map_err(|e| ("O_NONBLOCK", e))?;
    Ok((master, slave, path))
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one int through the pointer, which is valid.
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &on) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The relay thread: waits for output, a client, input or the stop request.
fn relay(what: &'static str, mut peer: Peer, shared: &Shared, input: &InputTarget) {
    // Input read from the peer that the guest's side has not taken yet.
    let mut pending: Vec<u8> = Vec::new();
    let mut reported_drops = 0u64;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let has_output = !shared.output().bytes.is_empty();
        let mut fds = vec![libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Peer::Socket { listener, .. } = &peer {
            fds.push(libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let data = peer.data_fd().map(|fd| {
            let mut events = 0;
            if pending.is_empty() {
                events |= libc::POLLIN;
            }
            if has_output {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            fds.len() - 1
        });
        let timeout = if pending.is_empty() {
            -1
        } else {
            INPUT_RETRY_MS
        };
        // SAFETY: `fds` is a valid array of pollfd of the length passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("{what}: the console relay stopped: poll: {e}");
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = shared.wake.read();
        }
        if let Peer::Socket { listener, client } = &mut peer {
            if fds[1].revents & libc::POLLIN != 0 {
                accept(what, listener, client);
            }
        }
        if let Some(i) = data {
            let revents = fds[i].revents;
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && pending.is_empty() {
                read_input(what, &mut peer, &mut pending);
            }
        }
        deliver_input(&mut pending, input);
        write_output(what, &mut peer, shared);
        let dropped = shared.output().dropped;
        if dropped != reported_drops {
            log::warn!(
                "{what}: {} bytes of output dropped (nobody reads; {OUTPUT_BUFFER} are kept)",
                dropped - reported_drops
            );
            reported_drops = dropped;
        }
    }
}

fn accept(what: &str, listener: &UnixListener, client: &mut Option<UnixStream>) {
    match listener.accept() {
        Ok((stream, _)) => {
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("{what}: client refused: {e}");
                return;
            }
            if let Some(old) = client.replace(stream) {
                let _ = old.shutdown(std::net::Shutdown::Both);
                log::info!("{what}: a new client replaces the attached one");
            } else {
                log::info!("{what}: client attached");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => log::warn!("{what}: accept failed: {e}"),
    }
}

fn read_input(what: &str, peer: &mut Peer, pending: &mut Vec<u8>) {
    let mut buf = [0u8; 256];
    match peer.read(&mut buf) {
        Ok(0) => peer.detach(what),
        Ok(n) => pending.extend_from_slice(&buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
        Err(e) => {
            log::debug!("{what}: read: {e}");
            peer.detach(what);
        }
    }
}

/// Offers `pending` to the running instance's device; what it takes is removed.
fn deliver_input(pending: &mut Vec<u8>, input: &InputTarget) {
    if pending.is_empty() {
        return;
    }
    let sink = input.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // No device (between two instances, or an output-only console): input waits or, without a
    // device that takes input at all, is dropped by the caller not setting one.
    let taken = sink.map_or(0, |s| s.push(pending));
    pending.drain(..taken);
}

/// Writes as much buffered output as the peer takes now.
fn write_output(what: &str, peer: &mut Peer, shared: &Shared) {
    if peer.data_fd().is_none() {
        return;
    }
    let mut out = shared.output();
    while !out.bytes.is_empty() {
        let (front, _) = out.bytes.as_slices();
        match peer.write(front) {
            Ok(0) => break,
            Ok(n) => {
                out.bytes.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("{what}: write: {e}");
                drop(out);
                peer.detach(what);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::serial_input::InputSink;

    /// An input sink taking at most `room` bytes at a time.
    #[derive(Debug, Default)]
    struct Collect {
        got: Mutex<Vec<u8>>,
    }

    impl InputSink for Collect {
        fn push(&self, bytes: &[u8]) -> usize {
            let n = bytes.len().min(3);
            self.got
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&bytes[..n]);
            n
        }
    }

    fn read_until(stream: &mut impl Read, want: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(want.len()).any(|w| w == want) {
            assert!(Instant::now() < deadline, "never got {want:?}; got {got:?}");
            match stream.read(&mut buf) {
                Ok(0) => panic!("closed; got {got:?}"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    }

    fn wait_for(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_late_client_gets_the_buffered_output_and_a_new_one_replaces_it() {
        let dir = std::env::temp_dir().join(format!("nimbus-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("console.sock");
        let relay = ConsoleRelay::socket("serial", &path).expect("socket");
        let sink = Arc::new(Collect::default());
        let target: Arc<dyn InputSink> = sink.clone();
        *relay.input().lock().expect("lock") = Some(target);
        let mut out = relay.writer();
        out.write_all(b"early line\n").expect("write");
        let mut first = UnixStream::connect(&path).expect("connect");
        read_until(&mut first, b"early line\n");
        first.write_all(b"typed").expect("input");
        wait_for(|| sink.got.lock().expect("lock").as_slice() == b"typed");
        drop(first);
        // Written while detached: kept for the next client.
        std::thread::sleep(Duration::from_millis(50));
        out.write_all(b"while away\n").expect("write");
        let mut second = UnixStream::connect(&path).expect("reconnect");
        read_until(&mut second, b"while away\n");
        let mut third = UnixStream::connect(&path).expect("third");
        std::thread::sleep(Duration::from_millis(50));
        out.write_all(b"to the third\n").expect("write");
        read_until(&mut third, b"to the third\n");
        let mut rest = Vec::new();
        second.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = second.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the replaced client got {rest:?}");
        drop(relay);
        assert!(!path.exists(), "the socket is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_never_reads_holds_up_nobody() {
        let dir = std::env::temp_dir().join(format!("nimbus-relay-slow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("console.sock");
        let relay = ConsoleRelay::socket("console", &path).expect("socket");
        let _silent = UnixStream::connect(&path).expect("connect");
        std::thread::sleep(Duration::from_millis(50));
        let mut out = relay.writer();
        let started = Instant::now();
        let chunk = [b'x'; 4096];
        // 16 MiB: far more than the socket and the buffer hold.
        for _ in 0..4096 {
            out.write_all(&chunk).expect("write");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the writer waited for the client: {:?}",
            started.elapsed()
        );
        wait_for(|| relay.shared.output().dropped > 0);
        assert!(relay.shared.output().bytes.len() <= OUTPUT_BUFFER);
        // A second client replaces the silent one and gets the newest output.
        let mut next = UnixStream::connect(&path).expect("reconnect");
        out.write_all(b"\nnewest\n").expect("write");
        read_until(&mut next, b"newest\n");
        drop(relay);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn output_beyond_the_buffer_drops_the_oldest_bytes() {
        let shared = Arc::new(Shared {
            output: Mutex::default(),
            wake: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            stop: AtomicBool::new(false),
        });
        let mut w = RelayWriter(shared.clone());
        let chunk = vec![b'a'; OUTPUT_BUFFER];
        w.write_all(&chunk).expect("write");
        w.write_all(b"tail").expect("write");
        let out = shared.output();
        assert_eq!(out.bytes.len(), OUTPUT_BUFFER);
        assert_eq!(out.dropped, 4);
        assert!(out.bytes.iter().rev().take(4).eq(b"liat".iter()));
    }

    #[test]
    fn a_pty_carries_output_and_input() {
        let relay = ConsoleRelay::pty("serial").expect("pty");
        let path = relay.pty_path().expect("path").to_path_buf();
        assert!(path.starts_with("/dev/pts"), "{}", path.display());
        let sink = Arc::new(Collect::default());
        let target: Arc<dyn InputSink> = sink.clone();
        *relay.input().lock().expect("lock") = Some(target);
        let mut out = relay.writer();
        out.write_all(b"before open\n").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        let mut term = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the pty");
        read_until(&mut term, b"before open\n");
        out.write_all(b"after\n").expect("write");
        read_until(&mut term, b"after\n");
        term.write_all(b"keys\r").expect("type");
        wait_for(|| sink.got.lock().expect("lock").as_slice() == b"keys\r");
    }
}
