//! The API thread: serves `--api-socket` with [`api_http::Server`], parses each request and
//! forwards it to the command loop, whose answer goes back through the request's responder.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use api_http::{Limits, Request, Responder, Server};
use nimbus_thread::ThreadClass;
use vmm_sys_util::eventfd::EventFd;

use crate::controller::Command;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The option did not parse.
    #[error("--api-socket: '{0}' is not path=PATH, fd=N or a path")]
    Syntax(String),
    /// A file that is not a socket is in the way.
    #[error("--api-socket: {0} exists and is not a socket")]
    NotASocket(String),
    /// The socket could not be created.
    #[error("cannot listen on the API socket {path}")]
    Bind {
        /// Its path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The passed descriptor is not a listening Unix socket.
    #[error("--api-socket fd={0} is not a listening Unix socket")]
    BadFd(RawFd),
    /// The server could not be set up.
    #[error("API server")]
    Server(#[from] api_http::ServerError),
    /// The thread or its stop eventfd could not be created.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// The running API thread.
#[derive(Debug)]
pub struct ApiServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// The socket file Nimbus created, removed at stop.
    path: Option<PathBuf>,
}

/// Forwards parsed requests to the command loop.
struct Forward(Sender<Command>);

impl api_http::Handler for Forward {
    fn handle(&self, request: Request, reply: Responder) {
        let Request {
            method,
            path,
            body,
            fds,
            ..
        } = request;
        match super::parse(&method, &path, &body, fds) {
            Ok(req) => {
                if let Err(e) = self.0.send(Command::Api(req, reply)) {
                    // The command loop is gone (the VMM is exiting): the responder, dropped
                    // with the command, answers 500.
                    log::debug!("API request after the command loop ended: {e}");
                }
            }
            Err(e) => reply.send(super::response(Err(e))),
        }
    }
}

fn is_listening_unix_socket(fd: RawFd) -> bool {
    let get = |option| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    get(libc::SO_DOMAIN) == Some(libc::AF_UNIX) && get(libc::SO_ACCEPTCONN) == Some(1)
}

/// Starts serving the API on `option` (`path=PATH`, `fd=N` or a path), forwarding requests to
/// `commands`.
pub fn serve(option: &str, commands: Sender<Command>) -> Result<ApiServer, ApiServerError> {
    let (listener, path) = match option.split_once('=') {
        Some(("fd", n)) => {
            let fd: RawFd = n
                .parse()
                .map_err(|_| ApiServerError::Syntax(option.into()))?;
            if fd < 3 || !is_listening_unix_socket(fd) {
                return Err(ApiServerError::BadFd(fd));
            }
            // SAFETY: the descriptor is an open listening socket handed to this process.
            (unsafe { UnixListener::from_raw_fd(fd) }, None)
        }
        Some(("path", p)) => (bind(p)?, Some(PathBuf::from(p))),
        Some(_) => return Err(ApiServerError::Syntax(option.into())),
        None if !option.is_empty() => (bind(option)?, Some(PathBuf::from(option))),
        None => return Err(ApiServerError::Syntax(option.into())),
    };
    // Not inherited by anything the VMM runs.
    // SAFETY: FD_CLOEXEC on the listener this function owns.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut server = Server::new(listener, Limits::default())?;
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiServerError::Thread)?;
    let stop_thread = stop.try_clone().map_err(ApiServerError::Thread)?;
    let thread = nimbus_thread::spawn(ThreadClass::Api, "http-server", move || {
        if let Err(e) = server.run(&Forward(commands), &stop_thread) {
            log::error!("the API server stopped: {}", nimbus_log::error_chain(&e));
        }
    })
    .map_err(ApiServerError::Thread)?;
    Ok(ApiServer {
        stop,
        thread: Some(thread),
        path,
    })
}

fn bind(path: &str) -> Result<UnixListener, ApiServerError> {
    crate::console_relay::bind_replacing_stale(std::path::Path::new(path)).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            ApiServerError::NotASocket(path.into())
        } else {
            ApiServerError::Bind {
                path: path.into(),
                source,
            }
        }
    })
}

impl ApiServer {
    /// Stops serving (answers already queued are written first) and removes the socket file
    /// Nimbus created.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the API thread panicked");
            }
        }
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
