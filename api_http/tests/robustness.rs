//! The server against hostile or broken clients: every error is a 4xx/5xx with a JSON array
//! body, the connection is closed, and the server keeps serving others.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api_http::socket::send_with_fds;
use api_http::Limits;
use common::*;

/// Sends `input`, expects an error answer with `status`, then the connection closed.
fn expect_error(server: &TestServer, input: &[u8], status: u16) -> RawResponse {
    let mut stream = server.connect();
    stream.write_all(input).unwrap();
    let response = read_only_response(&mut stream);
    response.assert_json_error(status);
    assert!(
        is_closed(&mut stream),
        "connection left open after {status}"
    );
    response
}

/// Checks the server still answers a new connection.
fn still_serving(server: &TestServer) {
    let mut stream = server.connect();
    assert_eq!(get(&mut stream, "/alive").status, 200);
}

#[test]
fn malformed_requests_get_400_and_the_server_goes_on() {
    let server = TestServer::start(Limits::default());
    let cases: [(&[u8], &str); 9] = [
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", "malformed"),
        (b"GET / HTTP/2.0\r\n\r\n", "version"),
        (b"GET\r\n\r\n", "malformed"),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
            "Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "Content-Length",
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding",
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "Transfer-Encoding",
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnope\r\n",
            "chunk",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "malformed",
        ),
    ];
    for (input, what) in cases {
        let response = expect_error(&server, input, 400);
        assert!(
            response.text().contains(what),
            "{input:?}: {}",
            response.text()
        );
    }
    still_serving(&server);
    assert!(server.paths().iter().all(|p| p == "/alive"));
}

#[test]
fn an_error_after_good_requests_on_the_same_connection() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    assert_eq!(get(&mut stream, "/ok").status, 200);
    stream.write_all(b"BAD REQUEST LINE\r\n\r\n").unwrap();
    read_only_response(&mut stream).assert_json_error(400);
    assert!(is_closed(&mut stream));
}

#[test]
fn long_lines_are_refused() {
    let server = TestServer::start(Limits::default());
    let mut request = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    request.extend_from_slice(&[b'a'; 8192]);
    request.extend_from_slice(b"\r\n\r\n");
    let response = expect_error(&server, &request, 400);
    assert!(response.text().contains("header line longer than 1024"));

    let mut request = b"GET /".to_vec();
    request.extend_from_slice(&[b'a'; 2000]);
    let response = expect_error(&server, &request, 400);
    assert!(response.text().contains("request line longer than 1024"));
    still_serving(&server);
}

#[test]
fn too_many_headers() {
    let server = TestServer::start(Limits::default());
    let mut request = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..65 {
        request.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    expect_error(&server, &request, 400);
    still_serving(&server);
}

#[test]
fn oversized_bodies_get_413() {
    let server = TestServer::start(Limits::default());
    let body = vec![b'x'; 5 << 20];
    // Announced too large: refused from the head, while the client is still writing.
    let mut stream = server.connect();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            let head = format!(
                "PUT /big HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        })
    };
    read_only_response(&mut stream).assert_json_error(413);
    writer.join().unwrap();

    // Chunked: refused once the chunks add up to too much.
    let mut stream = server.connect();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = stream.write_all(b"PUT /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
            for piece in body.chunks(1 << 20) {
                let _ = stream.write_all(format!("{:x}\r\n", piece.len()).as_bytes());
                let _ = stream.write_all(piece);
                let _ = stream.write_all(b"\r\n");
            }
        })
    };
    read_only_response(&mut stream).assert_json_error(413);
    writer.join().unwrap();
    still_serving(&server);
    assert!(server.paths().iter().all(|p| p == "/alive"));
}

#[test]
fn a_body_of_exactly_the_limit_is_accepted() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let body = vec![b'x'; 4 << 20];
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let head = format!(
                "PUT /max HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(&body).unwrap();
        })
    };
    let response = read_only_response(&mut stream);
    assert!(response.text().contains("\"body_len\":4194304"));
    writer.join().unwrap();
}

#[test]
fn random_junk() {
    let server = TestServer::start(quick_limits());
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..20 {
        let mut junk = Vec::new();
        for _ in 0..(64 + round * 97) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            junk.push((state >> 24) as u8);
        }
        junk.extend_from_slice(b"\r\n\r\n");
        let mut stream = server.connect();
        stream.write_all(&junk).unwrap();
        let response = read_only_response(&mut stream);
        assert!(
            response.status == 400 || response.status == 408,
            "{response:?}"
        );
        response.assert_json_error(response.status);
        assert!(is_closed(&mut stream));
    }
    still_serving(&server);
}

#[test]
fn truncated_requests_then_close() {
    let server = TestServer::start(Limits::default());
    let inputs: [&[u8]; 5] = [
        b"GET /api/v1/vm.in",
        b"PUT /a HTTP/1.1\r\nContent-Length: 10\r\n",
        b"PUT /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\"",
        b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"G",
    ];
    for input in inputs {
        let stream = server.connect();
        (&stream).write_all(input).unwrap();
        drop(stream);
    }
    // Half-closed in the middle of a request: 400, not a hang.
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nab")
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    read_only_response(&mut stream).assert_json_error(400);
    still_serving(&server);
    assert_eq!(server.paths(), ["/alive"]);
}

#[test]
fn slow_requests_time_out_with_408() {
    let server = TestServer::start(quick_limits());
    let mut stream = server.connect();
    let start = Instant::now();
    stream
        .write_all(b"PUT /slow HTTP/1.1\r\nContent-Len")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stream.write_all(b"gth: 5\r\n\r\nab").unwrap();
    let response = read_only_response(&mut stream);
    response.assert_json_error(408);
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
    assert!(is_closed(&mut stream));
    still_serving(&server);
}

#[test]
fn a_slow_client_does_not_delay_another() {
    let server = TestServer::start(Limits::default());
    let slow = server.connect();
    (&slow)
        .write_all(b"PUT /slow HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let start = Instant::now();
    let mut fast = server.connect();
    assert_eq!(get(&mut fast, "/fast").status, 200);
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(stays_open(&slow, Duration::from_millis(50)));
}

#[test]
fn the_eleventh_connection_gets_503() {
    let server = TestServer::start(Limits::default());
    let mut open: Vec<UnixStream> = (0..10).map(|_| server.connect()).collect();
    // Make sure the ten are accepted before the eleventh arrives.
    for stream in &mut open {
        assert_eq!(get(stream, "/hello").status, 200);
    }
    let mut eleventh = server.connect();
    let response = read_only_response(&mut eleventh);
    response.assert_json_error(503);
    assert!(response.text().contains("too many connections"));
    assert!(is_closed(&mut eleventh));
    for stream in &mut open {
        assert_eq!(get(stream, "/still").status, 200);
    }
    // Closing one makes room again.
    drop(open.pop());
    std::thread::sleep(Duration::from_millis(50));
    let mut again = server.connect();
    assert_eq!(get(&mut again, "/room").status, 200);
}

#[test]
fn too_many_fds_for_one_request() {
    let limits = Limits {
        max_fds_per_request: 2,
        ..Limits::default()
    };
    let server = TestServer::start(limits);
    let (file, _) = marker_file();
    let fd = file.as_raw_fd();
    let mut stream = server.connect();
    send_with_fds(
        stream.as_fd(),
        b"PUT /fds HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        &[fd; 3],
    )
    .unwrap();
    read_only_response(&mut stream).assert_json_error(400);
    // Two are fine.
    let mut stream = server.connect();
    send_with_fds(
        stream.as_fd(),
        b"PUT /fds HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        &[fd; 2],
    )
    .unwrap();
    assert!(read_only_response(&mut stream).text().contains("\"fds\":2"));
}

#[test]
fn fds_of_refused_requests_are_closed() {
    let server = TestServer::start(Limits::default());
    let mut pipe = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array we pass.
    let ret = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0);
    // SAFETY: pipe2 just returned these two descriptors to us alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let mut stream = server.connect();
    send_with_fds(
        stream.as_fd(),
        b"NOT HTTP AT ALL\r\n\r\n",
        &[write_end.as_raw_fd()],
    )
    .unwrap();
    drop(write_end);
    read_only_response(&mut stream).assert_json_error(400);
    // Once the server closed its copy, the read end sees end-of-file.
    let mut poll = libc::pollfd {
        fd: read_end.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, 2000) };
    assert_eq!(ready, 1);
    assert_ne!(
        poll.revents & libc::POLLHUP,
        0,
        "the server kept the descriptor"
    );
}

#[test]
fn a_flooding_client_does_not_starve_others() {
    let server = TestServer::start(Limits::default());
    let flood = server.connect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut flood = flood.try_clone().unwrap();
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            // Refused at once (line too long); the server then discards what keeps coming.
            let junk = vec![b'a'; 64 * 1024];
            let _ = flood.write_all(b"GET /");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if flood.write_all(&junk).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut other = server.connect();
    for _ in 0..5 {
        let start = Instant::now();
        assert_eq!(get(&mut other, "/other").status, 200);
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
}
