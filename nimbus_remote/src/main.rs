//! `nimbus-remote`: drives a Nimbus VMM's REST API on its Unix socket with Cloud Hypervisor's
//! ch-remote subcommands and syntax, one request on a new connection per run.
//!
//! Like ch-remote it prints the response body (when the response has one) on standard output
//! as received, and exits 1 on any failure. Unlike ch-remote, a failure is one line on standard
//! error: `nimbus-remote: error: <what failed>: <cause>...`, for an error answer from the VMM
//! `nimbus-remote: error: <status>: <the VMM's messages>`.
#![deny(missing_docs)]

mod bodies;
mod call;
mod cli;

use std::error::Error;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::path::Path;
use std::process::ExitCode;

use api_http::client::{self, ClientError, ClientResponse};
use clap::Parser;

use crate::call::{ApiCall, CallError};
use crate::cli::Cli;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    /// `--api-socket` is missing.
    #[error("no API socket given: pass --api-socket <path>")]
    NoSocket,
    /// The arguments do not make a request.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A descriptor to pass is not open here.
    #[error("file descriptor {0} is not open in nimbus-remote (the caller must pass it)")]
    FdNotOpen(RawFd),
    /// The request could not be made (the error names the socket).
    #[error(transparent)]
    Http(#[from] ClientError),
    /// The VMM answered with an error status.
    #[error("{}", server_error(*status, body))]
    Server {
        /// The status code.
        status: u16,
        /// The body (CH's servers send a JSON array of messages).
        body: Vec<u8>,
    },
    /// The response could not be written out.
    #[error("cannot write the response to standard output")]
    Stdout(#[source] io::Error),
}

/// `<status>: <messages>`: the messages of CH's JSON array joined with `: `, outermost first;
/// any other body as text.
fn server_error(status: u16, body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Vec<String>>(body) {
        Ok(messages) => messages.join(": "),
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    };
    if text.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {text}")
    }
}

/// Fails unless `fd` is an open descriptor of this process (sending a closed one would fail
/// with a less helpful EBADF from sendmsg).
fn check_open(fd: RawFd) -> Result<(), RemoteError> {
    // SAFETY: F_GETFD only reads the descriptor's flags and touches no memory; a number that is
    // not an open descriptor makes it fail with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(RemoteError::FdNotOpen(fd));
    }
    Ok(())
}

/// Sends the request and returns the response of a successful status.
fn send(socket: &Path, call: &ApiCall) -> Result<ClientResponse, RemoteError> {
    for fd in &call.fds {
        check_open(*fd)?;
    }
    let response = client::request(
        socket,
        call.method,
        &call.path(),
        call.body.as_deref(),
        &call.fds,
    )?;
    if !(200..300).contains(&response.status) {
        return Err(RemoteError::Server {
            status: response.status,
            body: response.body,
        });
    }
    Ok(response)
}

/// Prints the body as ch-remote does: as received plus a newline, whenever the response has
/// one (a `Content-Length`, even 0); a 204 prints nothing.
fn print_body(response: &ClientResponse) -> Result<(), RemoteError> {
    if response.header("content-length").is_none() && response.body.is_empty() {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    out.write_all(&response.body)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(RemoteError::Stdout)
}

fn run(cli: &Cli) -> Result<(), RemoteError> {
    let socket = cli.api_socket.as_deref().ok_or(RemoteError::NoSocket)?;
    let call = call::build(&cli.command)?;
    let response = send(socket, &call)?;
    print_body(&response)
}

/// The error and its causes on one line.
fn chain(error: &dyn Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nimbus-remote: error: {}", chain(&error));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_cloud_hypervisors_message_array() {
        assert_eq!(
            server_error(500, br#"["Error from API","The VM could not be paused"]"#),
            "500: Error from API: The VM could not be paused"
        );
        assert_eq!(server_error(404, b""), "404");
        assert_eq!(server_error(400, b"bad\n"), "400: bad");
    }

    #[test]
    fn closed_descriptors_are_refused_before_sending() {
        let file = std::fs::File::open("/dev/null").expect("open /dev/null");
        assert!(check_open(std::os::fd::AsRawFd::as_raw_fd(&file)).is_ok());
        assert!(matches!(check_open(-1), Err(RemoteError::FdNotOpen(-1))));
        assert!(check_open(i32::MAX).is_err());
    }
}
