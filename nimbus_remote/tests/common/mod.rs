//! A fake VMM API (api_http's server on a socket in a temporary directory) that records every
//! request, and helpers to run the real `nimbus-remote` binary against it.

#![allow(clippy::unwrap_used, dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use api_http::{Limits, Request, Responder, Response, Server};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_nimbus-remote");

/// A request as the fake VMM received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// (st_dev, st_ino) of each descriptor received, in order.
    pub fds: Vec<(u64, u64)>,
}

/// The fake VMM: answers GETs 200 with a small JSON body, PUTs 204, unless a reply is set.
pub struct FakeVmm {
    _dir: TempDir,
    pub socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// The body the fake VMM answers every GET with.
pub const GET_BODY: &str = r#"{"config":{"cpus":{"boot_vcpus":1}},"state":"Running"}"#;

/// Identity of an open descriptor: (st_dev, st_ino).
pub fn identity(fd: &OwnedFd) -> (u64, u64) {
    let file = File::from(fd.try_clone().unwrap());
    let meta = file.metadata().unwrap();
    (meta.dev(), meta.ino())
}

fn record(seen: &Mutex<Vec<Seen>>, request: Request) -> Seen {
    let entry = Seen {
        method: request.method.clone(),
        path: request.path.clone(),
        headers: request.headers.clone(),
        body: String::from_utf8(request.body.clone()).unwrap(),
        fds: request.fds.iter().map(identity).collect(),
    };
    seen.lock().unwrap().push(entry.clone());
    entry
}

impl FakeVmm {
    /// Starts a fake VMM with the default replies.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a fake VMM that answers every request with `reply`.
    pub fn replying(reply: Response) -> Self {
        Self::start_with(Some(reply))
    }

    fn start_with(reply: Option<Response>) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/nimbus_remote_test").unwrap();
        let socket = dir.as_path().join("api.sock");
        let mut server =
            Server::new(UnixListener::bind(&socket).unwrap(), Limits::default()).unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let stop_for_thread = stop.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_handler = Arc::clone(&seen);
        let thread = std::thread::spawn(move || {
            let handler = move |request: Request, responder: Responder| {
                let seen = record(&seen_by_handler, request);
                let response = match (&reply, seen.method.as_str()) {
                    (Some(reply), _) => reply.clone(),
                    (None, "GET") => Response::json(200, GET_BODY.as_bytes().to_vec()),
                    (None, _) => Response::empty(204),
                };
                responder.send(response);
            };
            server.run(&handler, &stop_for_thread).unwrap();
        });
        FakeVmm {
            _dir: dir,
            socket,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Runs `nimbus-remote --api-socket <socket> <args>`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None, &[])
    }

    /// Runs the binary with `stdin` as standard input and `fds` left open in it.
    pub fn run_with(&self, args: &[&str], stdin: Option<&[u8]>, fds: &[RawFd]) -> Output {
        let mut command = Command::new(BINARY);
        command.arg("--api-socket").arg(&self.socket).args(args);
        run(command, stdin, fds)
    }

    /// The requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The one request received.
    pub fn only_request(&self) -> Seen {
        let requests = self.requests();
        assert_eq!(requests.len(), 1, "{requests:#?}");
        requests.into_iter().next().unwrap()
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `command` with `stdin` (or nothing) as standard input and `fds` inherited.
pub fn run(mut command: Command, stdin: Option<&[u8]>, fds: &[RawFd]) -> Output {
    let inherited = fds.to_vec();
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            for fd in &inherited {
                if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(data).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// A pipe (read end, write end), both close-on-exec.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two descriptors, as pipe2 requires.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both are new descriptors owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Standard output as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Standard error as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Asserts a successful run and returns its standard output.
pub fn success(output: &Output) -> String {
    assert!(
        output.status.success(),
        "status {:?}, stderr: {}",
        output.status,
        stderr(output)
    );
    stdout(output)
}

/// The raw number of a descriptor.
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}
