//! The client side: requests over a Unix socket, with file descriptors attached to the first
//! bytes sent. Used by the command-line client and by tests.

use std::io::{self, Read};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::chunked::{ChunkedDecoder, ChunkedError};
use crate::request::find_header;
use crate::socket::send_with_fds;

/// Header fields as received.
type Headers = Vec<(String, String)>;

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response.
const MAX_HEADERS: usize = 64;
/// Largest response body accepted.
pub const MAX_RESPONSE_BODY: usize = 64 << 20;
/// Size of one read.
const READ_CHUNK: usize = 16 * 1024;

/// A response as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    /// The status code.
    pub status: u16,
    /// The header fields in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (decoded if it was chunked); empty when there was none.
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The value of the first header named `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// Why a request failed. Every variant names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The read timeout could not be set.
    #[error("cannot set the read timeout on {}", path.display())]
    SetTimeout {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The method or path cannot be put in a request line.
    #[error("invalid request to {}: {reason}", path.display())]
    InvalidRequest {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the request failed.
    #[error("cannot send the request to {}", path.display())]
    Send {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the response failed.
    #[error("cannot read the response from {}", path.display())]
    Receive {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No response within the read timeout.
    #[error("no response from {} within the timeout", path.display())]
    TimedOut {
        /// The socket.
        path: PathBuf,
    },
    /// The server closed the connection before a whole response arrived (or before this
    /// request, on a connection it had closed).
    #[error("{} closed the connection before a whole response arrived", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The response is not valid HTTP.
    #[error("malformed response from {}: {reason}", path.display())]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The response is larger than this client accepts.
    #[error("response from {} larger than {limit} bytes", path.display())]
    TooLarge {
        /// The socket.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
}

/// Sends one request on a new connection and returns the response.
///
/// `body` is sent as JSON; `fds` travel with the first bytes of the request.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    fds: &[RawFd],
) -> Result<ClientResponse, ClientError> {
    request_with_timeout(socket, method, path, body, fds, None)
}

/// [`request`] that gives up when no response byte arrives for `timeout` (`None`: waits
/// forever).
pub fn request_with_timeout(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    fds: &[RawFd],
    timeout: Option<Duration>,
) -> Result<ClientResponse, ClientError> {
    let mut connection = Connection::connect(socket)?;
    connection.set_read_timeout(timeout)?;
    connection.send(method, path, body, fds)
}

/// A persistent connection for several requests one after another.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes received and not used yet.
    buffer: Vec<u8>,
    /// False once the connection cannot carry another request.
    open: bool,
}

impl Connection {
    /// Connects to the server's socket.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Connection {
            stream,
            path: path.to_path_buf(),
            buffer: Vec::new(),
            open: true,
        })
    }

    /// Sets how long a read may wait for the server (`None`, the default: forever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|source| ClientError::SetTimeout {
                path: self.path.clone(),
                source,
            })
    }

    /// Whether the connection can carry another request (the server did not close it).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Sends a request and waits for its response.
    ///
    /// Sends `Host`, `Accept: application/json`, and with a body `Content-Type:
    /// application/json` and its `Content-Length` (`Content-Length: 0` on a PUT without one).
    /// `fds` go with the first `sendmsg`.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        fds: &[RawFd],
    ) -> Result<ClientResponse, ClientError> {
        if !self.open {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        let bytes = self.encode(method, path, body)?;
        if let Err(source) = self.write(&bytes, fds) {
            self.open = false;
            // The server may have answered before closing (an early error such as 503).
            if matches!(
                source.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                if let Ok(response) = self.read_response() {
                    return Ok(response);
                }
            }
            return Err(ClientError::Send {
                path: self.path.clone(),
                source,
            });
        }
        let response = self.read_response();
        if response.is_err() {
            self.open = false;
        }
        response
    }

    /// The request's bytes.
    fn encode(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidRequest {
            path: self.path.clone(),
            reason: reason.to_string(),
        };
        if method.is_empty()
            || !method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(invalid("the method must be a non-empty token"));
        }
        if path.is_empty() || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "the path must be non-empty printable ASCII without spaces",
            ));
        }
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        match body {
            Some(body) => head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )),
            None if method.eq_ignore_ascii_case("PUT") => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        Ok(bytes)
    }

    /// Writes all of `bytes`, the descriptors with the first part.
    fn write(&mut self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut written = 0;
        let mut fds = fds;
        while written < bytes.len() {
            match send_with_fds(self.stream.as_fd(), &bytes[written..], fds) {
                Ok(n) => {
                    written += n;
                    fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one final response (skipping interim 1xx ones).
    fn read_response(&mut self) -> Result<ClientResponse, ClientError> {
        loop {
            let (head_len, status, headers) = self.read_head()?;
            self.buffer.drain(..head_len);
            if (100..200).contains(&status) {
                continue;
            }
            let body = if status == 204 || status == 304 {
                Vec::new()
            } else if find_header(&headers, "transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
            {
                self.read_chunked()?
            } else if let Some(length) = find_header(&headers, "content-length") {
                let length = length
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| self.malformed(format!("invalid Content-Length: {length}")))?;
                self.read_exactly(length)?
            } else {
                self.open = false;
                self.read_to_end()?
            };
            if find_header(&headers, "connection")
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
            {
                self.open = false;
            }
            return Ok(ClientResponse {
                status,
                headers,
                body,
            });
        }
    }

    /// Reads until a whole response head is buffered: its length, status and headers.
    fn read_head(&mut self) -> Result<(usize, u16, Headers), ClientError> {
        loop {
            if !self.buffer.is_empty() {
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut response = httparse::Response::new(&mut slots);
                match response.parse(&self.buffer) {
                    Ok(httparse::Status::Complete(len)) => {
                        let status = response.code.unwrap_or_default();
                        let headers = crate::request::owned_headers(response.headers);
                        return Ok((len, status, headers));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(self.malformed(e.to_string())),
                }
            }
            if self.buffer.len() > MAX_HEAD {
                return Err(self.too_large(MAX_HEAD));
            }
            if self.fill()? == 0 {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                });
            }
        }
    }

    fn read_exactly(&mut self, length: usize) -> Result<Vec<u8>, ClientError> {
        if length > MAX_RESPONSE_BODY {
            return Err(self.too_large(MAX_RESPONSE_BODY));
        }
        while self.buffer.len() < length {
            if self.fill()? == 0 {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                });
            }
        }
        Ok(self.buffer.drain(..length).collect())
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut decoder = ChunkedDecoder::new(MAX_HEAD, MAX_HEADERS, MAX_RESPONSE_BODY);
        let mut body = Vec::new();
        loop {
            match decoder.decode(&self.buffer, &mut body) {
                Ok(used) => {
                    self.buffer.drain(..used);
                }
                Err(ChunkedError::TooLarge) => return Err(self.too_large(MAX_RESPONSE_BODY)),
                Err(ChunkedError::Malformed(what)) => return Err(self.malformed(what.into())),
            }
            if decoder.is_done() {
                return Ok(body);
            }
            if self.fill()? == 0 {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                });
            }
        }
    }

    fn read_to_end(&mut self) -> Result<Vec<u8>, ClientError> {
        while self.fill()? > 0 {
            if self.buffer.len() > MAX_RESPONSE_BODY {
                return Err(self.too_large(MAX_RESPONSE_BODY));
            }
        }
        Ok(std::mem::take(&mut self.buffer))
    }

    /// Reads once more into the buffer; 0 at end-of-file.
    fn fill(&mut self) -> Result<usize, ClientError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buffer.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::TimedOut {
                        path: self.path.clone(),
                    })
                }
                Err(source) => {
                    return Err(ClientError::Receive {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }

    fn malformed(&self, reason: String) -> ClientError {
        ClientError::Malformed {
            path: self.path.clone(),
            reason,
        }
    }

    fn too_large(&self, limit: usize) -> ClientError {
        ClientError::TooLarge {
            path: self.path.clone(),
            limit,
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
