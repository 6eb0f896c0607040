//! Client tests against a scripted fake server (raw socket), so every response shape can be
//! produced, including ones the real server never sends.

#![allow(clippy::unwrap_used)]

use super::*;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;

use crate::socket::recv_with_fds;
use vmm_sys_util::tempdir::TempDir;

/// What the fake server saw of one request: its bytes and the descriptors of each read.
struct Seen {
    bytes: Vec<u8>,
    fds_per_read: Vec<usize>,
}

/// A fake server that, for each reply in `replies`, reads one whole request (head plus
/// Content-Length body) and writes the reply bytes, then closes.
fn fake_server(replies: Vec<Vec<u8>>) -> (TempDir, PathBuf, JoinHandle<Vec<Seen>>) {
    let dir = TempDir::new_with_prefix("/tmp/api_http_client").unwrap();
    let path = dir.as_path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut seen = Vec::new();
        let mut pending = Vec::new();
        for reply in replies {
            let mut fds_per_read = Vec::new();
            let mut kept: Vec<OwnedFd> = Vec::new();
            let len = loop {
                if let Some(len) = request_len(&pending) {
                    break len;
                }
                let mut buf = [0u8; 4096];
                let got = recv_with_fds(stream.as_fd(), &mut buf).unwrap();
                if got.len == 0 {
                    return seen;
                }
                fds_per_read.push(got.fds.len());
                kept.extend(got.fds);
                pending.extend_from_slice(&buf[..got.len]);
            };
            let bytes: Vec<u8> = pending.drain(..len).collect();
            seen.push(Seen {
                bytes,
                fds_per_read,
            });
            stream.write_all(&reply).unwrap();
        }
        seen
    });
    (dir, path, handle)
}

/// Length of the first complete request in `buf` (head plus Content-Length body).
fn request_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    (buf.len() >= end + length).then_some(end + length)
}

const OK_HEAD: &str = "HTTP/1.1 200 \r\nServer: x\r\nConnection: keep-alive\r\n";

#[test]
fn request_bytes_and_fds_go_in_the_first_message() {
    let reply = format!("{OK_HEAD}Content-Length: 2\r\n\r\n{{}}");
    let (_dir, path, server) = fake_server(vec![reply.into_bytes()]);
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let fd = file.as_file().as_raw_fd();
    let response = request(
        &path,
        "PUT",
        "/api/v1/vm.add-net",
        Some(b"{\"a\":1}"),
        &[fd, fd],
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"{}");
    assert_eq!(response.header("SERVER"), Some("x"));
    let seen = server.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen[0].bytes),
        "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
    );
    assert_eq!(seen[0].fds_per_read.first(), Some(&2));
    assert_eq!(seen[0].fds_per_read.iter().sum::<usize>(), 2);
}

#[test]
fn put_without_body_sends_zero_length_and_get_sends_none() {
    let no_content = b"HTTP/1.1 204 \r\nServer: x\r\n\r\n".to_vec();
    let ok = format!("{OK_HEAD}Content-Length: 0\r\n\r\n").into_bytes();
    let (_dir, path, server) = fake_server(vec![no_content, ok]);
    let mut connection = Connection::connect(&path).unwrap();
    let response = connection
        .send("PUT", "/api/v1/vm.boot", None, &[])
        .unwrap();
    assert_eq!((response.status, response.body.len()), (204, 0));
    let response = connection
        .send("GET", "/api/v1/vm.info", None, &[])
        .unwrap();
    assert_eq!((response.status, response.body.len()), (200, 0));
    assert!(connection.is_open());
    let seen = server.join().unwrap();
    assert!(String::from_utf8_lossy(&seen[0].bytes).contains("Content-Length: 0\r\n"));
    assert!(!String::from_utf8_lossy(&seen[1].bytes).contains("Content-Length"));
}

#[test]
fn body_without_length_is_read_to_the_end() {
    let reply = format!("{OK_HEAD}\r\n[\"until close\"]");
    let (_dir, path, server) = fake_server(vec![reply.into_bytes()]);
    let mut connection = Connection::connect(&path).unwrap();
    let response = connection.send("GET", "/x", None, &[]).unwrap();
    assert_eq!(response.body, b"[\"until close\"]");
    assert!(!connection.is_open());
    assert!(matches!(
        connection.send("GET", "/x", None, &[]),
        Err(ClientError::Closed { .. })
    ));
    server.join().unwrap();
}

#[test]
fn interim_and_chunked_responses() {
    let reply = format!(
        "HTTP/1.1 100 Continue\r\n\r\n{OK_HEAD}Transfer-Encoding: chunked\r\n\r\n\
         3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n"
    );
    let (_dir, path, server) = fake_server(vec![reply.into_bytes()]);
    let response = request(&path, "PUT", "/x", Some(b"{}"), &[]).unwrap();
    assert_eq!((response.status, &response.body[..]), (200, &b"[1,2]"[..]));
    server.join().unwrap();
}

#[test]
fn connection_close_from_the_server_ends_the_connection() {
    let reply = b"HTTP/1.1 200 \r\nConnection: close\r\nContent-Length: 1\r\n\r\nx".to_vec();
    let (_dir, path, server) = fake_server(vec![reply]);
    let mut connection = Connection::connect(&path).unwrap();
    connection.send("GET", "/x", None, &[]).unwrap();
    assert!(!connection.is_open());
    server.join().unwrap();
}

#[test]
fn reason_phrases_are_accepted_too() {
    let reply = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n[]".to_vec();
    let (_dir, path, server) = fake_server(vec![reply]);
    assert_eq!(request(&path, "GET", "/x", None, &[]).unwrap().status, 404);
    server.join().unwrap();
}

#[test]
fn broken_responses_are_errors_naming_the_socket() {
    for (reply, check) in [
        (
            b"garbage\r\n\r\n".to_vec(),
            (|e: &ClientError| matches!(e, ClientError::Malformed { .. }))
                as fn(&ClientError) -> bool,
        ),
        (
            b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nshort".to_vec(),
            |e| matches!(e, ClientError::Closed { .. }),
        ),
        (
            b"HTTP/1.1 200 \r\nContent-Length: x\r\n\r\n".to_vec(),
            |e| matches!(e, ClientError::Malformed { .. }),
        ),
        (b"HTTP/1.1 2".to_vec(), |e| {
            matches!(e, ClientError::Closed { .. })
        }),
    ] {
        let (_dir, path, server) = fake_server(vec![reply]);
        let err = request(&path, "GET", "/x", None, &[]).unwrap_err();
        assert!(check(&err), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        server.join().unwrap();
    }
}

#[test]
fn read_timeout() {
    let dir = TempDir::new_with_prefix("/tmp/api_http_client").unwrap();
    let path = dir.as_path().join("silent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let err = request_with_timeout(
        &path,
        "GET",
        "/x",
        None,
        &[],
        Some(Duration::from_millis(50)),
    )
    .unwrap_err();
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err:?}");
}

#[test]
fn connect_and_request_line_errors() {
    let missing = Path::new("/nonexistent/api_http/none.sock");
    let err = request(missing, "GET", "/", None, &[]).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }));
    assert!(err.to_string().contains("/nonexistent/api_http/none.sock"));

    let reply = format!("{OK_HEAD}Content-Length: 0\r\n\r\n");
    let (_dir, path, server) = fake_server(vec![reply.into_bytes()]);
    let mut connection = Connection::connect(&path).unwrap();
    for (method, target) in [
        ("GE T", "/"),
        ("", "/"),
        ("GET", "/a b"),
        ("GET", "/\r\nX: y"),
    ] {
        let err = connection.send(method, target, None, &[]).unwrap_err();
        assert!(matches!(err, ClientError::InvalidRequest { .. }), "{err:?}");
    }
    assert_eq!(connection.send("GET", "/", None, &[]).unwrap().status, 200);
    server.join().unwrap();
}
