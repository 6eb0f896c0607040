//! Helpers shared by the server tests: a server on a socket in a temporary directory, a
//! recording handler, and raw-socket response reading.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api_http::{Limits, Request, Responder, Response, Server};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// How long a test waits for any one read before failing.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A request as the handler saw it (descriptors kept open for inspection).
#[derive(Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A server running on its own thread.
pub struct TestServer {
    pub dir: TempDir,
    pub path: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: EventFd,
    thread: Option<JoinHandle<Duration>>,
}

impl TestServer {
    /// Starts a server with the routing handler below.
    pub fn start(limits: Limits) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/api_http_test").unwrap();
        let path = dir.as_path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut server = Server::new(listener, limits).unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let stop_for_thread = stop.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_for_handler = Arc::clone(&seen);
        let thread = std::thread::spawn(move || {
            let handler =
                move |request: Request, reply: Responder| route(&seen_for_handler, request, reply);
            server.run(&handler, &stop_for_thread).unwrap();
            thread_cpu_time()
        });
        TestServer {
            dir,
            path,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// A raw connection with read and write timeouts.
    pub fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        stream
    }

    /// The paths the handler has seen, in order.
    pub fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.path.clone())
            .collect()
    }

    /// Stops the server and returns the CPU time its thread used.
    pub fn stop(mut self) -> Duration {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Routes: `/slow/<ms>` replies from another thread after that long, `/drop` drops the
/// responder, `/empty` is 204, `/zero` is 200 with an empty body, `/missing` is 404; anything
/// else echoes a summary. Every request is recorded.
fn route(seen: &Mutex<Vec<Seen>>, request: Request, reply: Responder) {
    let summary = format!(
        r#"{{"method":"{}","path":"{}","body_len":{},"fds":{}}}"#,
        request.method,
        request.path,
        request.body.len(),
        request.fds.len()
    );
    let path = request.path.clone();
    seen.lock().unwrap().push(Seen {
        method: request.method,
        path: request.path,
        headers: request.headers,
        body: request.body,
        fds: request.fds,
    });
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            reply.send(Response::json(200, summary.into_bytes()));
        });
        return;
    }
    match path.as_str() {
        "/drop" => drop(reply),
        "/empty" => reply.send(Response::empty(204)),
        "/zero" => reply.send(Response::json(200, Vec::new())),
        "/missing" => reply.send(Response::error(404, &["no such thing".to_string()])),
        _ => reply.send(Response::json(200, summary.into_bytes())),
    }
}

/// A response read from a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The head, up to and including the blank line.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Checks that this is an error answer: 4xx/5xx with a JSON array of strings.
    pub fn assert_json_error(&self, status: u16) {
        assert_eq!(self.status, status, "{self:?}");
        let text = self.text();
        assert!(
            text.starts_with("[\"") && text.ends_with("\"]"),
            "not a JSON array of strings: {text}"
        );
        assert!(self.head.contains("Content-Type: application/json\r\n"));
    }
}

/// Reads one response from `stream`, keeping extra bytes in `pending`. Bodies are delimited
/// by Content-Length (none on 1xx and 204).
pub fn read_response(stream: &mut UnixStream, pending: &mut Vec<u8>) -> RawResponse {
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut buf = [0u8; 8192];
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed before a response; got {pending:?}"
        );
        pending.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(pending.drain(..head_end).collect()).unwrap();
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let status: u16 = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    while pending.len() < length {
        let mut buf = [0u8; 8192];
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed inside a body");
        pending.extend_from_slice(&buf[..n]);
    }
    let body = pending.drain(..length).collect();
    RawResponse { status, head, body }
}

/// Reads one response from a fresh buffer, checking nothing else came with it.
pub fn read_only_response(stream: &mut UnixStream) -> RawResponse {
    let mut pending = Vec::new();
    let response = read_response(stream, &mut pending);
    assert!(pending.is_empty(), "unexpected extra bytes {pending:?}");
    response
}

/// Whether the server closed the connection: reading gives end-of-file (or a reset) within
/// the read timeout, with no further bytes.
pub fn is_closed(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => panic!("unexpected bytes {:?}", &buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Whether the connection is still open: nothing to read for `wait`.
pub fn stays_open(stream: &UnixStream, wait: Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap();
    // SAFETY: poll on one valid pollfd.
    let ready = unsafe { libc::poll(&mut fds, 1, ms) };
    ready == 0
}

/// A file whose inode identifies it, for checking passed descriptors.
pub fn marker_file() -> (std::fs::File, u64) {
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    let inode = inode_of(file.as_raw_fd());
    (file, inode)
}

/// The inode behind a descriptor (fstat).
pub fn inode_of(fd: i32) -> u64 {
    // SAFETY: fstat writes into the zeroed stat buffer we pass; the result is checked.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ret = unsafe { libc::fstat(fd, &mut stat) };
    assert_eq!(ret, 0, "fstat({fd}) failed: the descriptor is not valid");
    stat.st_ino
}

/// A plain keep-alive GET and its response on an existing connection.
pub fn get(stream: &mut UnixStream, path: &str) -> RawResponse {
    use std::io::Write;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    read_only_response(stream)
}

/// Short limits for timeout tests.
pub fn quick_limits() -> Limits {
    Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}
