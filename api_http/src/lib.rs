//! HTTP/1.1 on Unix stream sockets with file-descriptor passing, for the VMM's REST API.
//!
//! The [`Server`] speaks the dialect Cloud Hypervisor's clients depend on (ch-remote, Kata
//! Containers' Go and Rust runtimes, libvirt): a status line without reason phrase, keep-alive
//! connections, file descriptors (`SCM_RIGHTS`) attached to whichever request their bytes belong
//! to, and every error answered with a JSON array of messages. It runs on one thread with epoll,
//! never blocks on a client, and lets the [`Handler`] answer later from another thread.
//! [`client`] is the other side, for the command-line client and tests.
//!
//! ```
//! use std::os::unix::net::UnixListener;
//! use api_http::{client, Limits, Request, Responder, Response, Server};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/api_http_doc")?;
//! let path = dir.as_path().join("api.sock");
//! let mut server = Server::new(UnixListener::bind(&path)?, Limits::default())?;
//! let stop = EventFd::new(libc::EFD_NONBLOCK)?;
//! let stop_writer = stop.try_clone()?;
//!
//! let thread = std::thread::spawn(move || {
//!     let ping = |request: Request, reply: Responder| {
//!         if request.path == "/api/v1/vmm.ping" {
//!             reply.send(Response::json(200, br#"{"version":"1"}"#.to_vec()));
//!         } else {
//!             reply.send(Response::error(404, &[format!("no route {}", request.path)]));
//!         }
//!     };
//!     server.run(&ping, &stop)
//! });
//!
//! let response = client::request(&path, "GET", "/api/v1/vmm.ping", None, &[])?;
//! assert_eq!(response.status, 200);
//! assert_eq!(response.body, br#"{"version":"1"}"#);
//!
//! stop_writer.write(1)?;
//! thread.join().expect("server thread panicked")?;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod chunked;
pub mod client;
mod connection;
pub mod fuzzing;
mod request;
mod response;
mod server;
pub mod socket;

use std::time::Duration;

pub use request::Request;
pub use response::{Response, SERVER_NAME};
pub use server::{Handler, Responder, Server, ServerError};

/// Limits that protect the server from clients; the defaults are Cloud Hypervisor's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Longest request line or header line, in bytes (without the line end).
    pub max_line: usize,
    /// Most header fields in one request (and trailer lines in a chunked body).
    pub max_headers: usize,
    /// Largest request body, in bytes (413 above).
    pub max_body: usize,
    /// Most file descriptors with one request (400 above).
    pub max_fds_per_request: usize,
    /// A request must be complete this long after its first byte arrived, or, when it was
    /// queued behind another request on the connection, after the server turned to it (408
    /// otherwise). An idle connection between requests never times out.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10,
            max_line: 1024,
            max_headers: 64,
            max_body: 4 << 20,
            max_fds_per_request: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}
