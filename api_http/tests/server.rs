//! Server behaviour over real Unix sockets: response bytes, connections, framing, descriptors,
//! deferred replies and stopping.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use api_http::socket::send_with_fds;
use api_http::{client, Limits};
use common::*;

#[test]
fn response_bytes_are_exact_and_arrive_in_one_read() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    stream
        .write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let body = r#"{"method":"GET","path":"/api/v1/vm.info","body_len":0,"fds":0}"#;
    let expected = format!(
        "HTTP/1.1 200 \r\nServer: Nimbus API\r\nConnection: keep-alive\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // libvirt reads fd-carrying replies with a single recv: the whole reply must be there.
    let mut buf = [0u8; 1023];
    let n = stream.read(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
}

#[test]
fn no_content_and_empty_json_bodies() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let response = get(&mut stream, "/empty");
    assert_eq!(
        response.head,
        "HTTP/1.1 204 \r\nServer: Nimbus API\r\nConnection: keep-alive\r\n\r\n"
    );
    let response = get(&mut stream, "/zero");
    assert_eq!(
        response.head,
        "HTTP/1.1 200 \r\nServer: Nimbus API\r\nConnection: keep-alive\r\n\
         Content-Type: application/json\r\nContent-Length: 0\r\n\r\n"
    );
    get(&mut stream, "/missing").assert_json_error(404);
}

#[test]
fn keep_alive_serves_requests_in_order() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    for i in 0..5 {
        let response = get(&mut stream, &format!("/r{i}"));
        assert_eq!(response.status, 200);
        assert!(response.text().contains(&format!("\"/r{i}\"")));
    }
    assert_eq!(server.paths(), ["/r0", "/r1", "/r2", "/r3", "/r4"]);
    assert!(stays_open(&stream, Duration::from_millis(50)));
}

#[test]
fn connection_close_closes_after_the_response() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    stream
        .write_all(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_only_response(&mut stream).status, 200);
    assert!(is_closed(&mut stream));
}

#[test]
fn http_1_0_without_keep_alive_is_closed() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    stream.write_all(b"GET /a HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_only_response(&mut stream).status, 200);
    assert!(is_closed(&mut stream));
}

#[test]
fn one_shot_clients_and_half_close() {
    let server = TestServer::start(Limits::default());
    for _ in 0..3 {
        let mut stream = server.connect();
        get(&mut stream, "/once");
        drop(stream);
    }
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /half HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let response = read_only_response(&mut stream);
    assert!(response.text().contains("\"body_len\":2"));
    assert!(is_closed(&mut stream));
    assert_eq!(server.paths(), ["/once", "/once", "/once", "/half"]);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    // The first reply comes late from another thread; the second must still come after it.
    stream
        .write_all(
            b"GET /slow/200 HTTP/1.1\r\n\r\nPUT /second HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
        )
        .unwrap();
    let mut pending = Vec::new();
    let first = read_response(&mut stream, &mut pending);
    let second = read_response(&mut stream, &mut pending);
    assert!(first.text().contains("/slow/200"), "{first:?}");
    assert!(second.text().contains("/second"), "{second:?}");
    assert_eq!(server.paths(), ["/slow/200", "/second"]);
}

#[test]
fn ch_remote_framing_with_fds() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let (first, first_inode) = marker_file();
    let (second, second_inode) = marker_file();
    let head = b"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n";
    let fds = [first.as_raw_fd(), second.as_raw_fd()];
    assert_eq!(
        send_with_fds(stream.as_fd(), head, &fds).unwrap(),
        head.len()
    );
    let body = br#"{"id":"net0","num_queues":2}"#;
    stream
        .write_all(format!("Content-Length: {}\r\n", body.len()).as_bytes())
        .unwrap();
    stream.write_all(b"\r\n").unwrap();
    stream.write_all(body).unwrap();
    let response = read_only_response(&mut stream);
    assert!(response.text().contains("\"fds\":2"), "{response:?}");
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen[0].body, body);
    let inodes: Vec<u64> = seen[0]
        .fds
        .iter()
        .map(|fd| inode_of(fd.as_raw_fd()))
        .collect();
    assert_eq!(inodes, [first_inode, second_inode]);
}

#[test]
fn kata_style_requests_each_with_fds_in_one_sendmsg() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let files: Vec<_> = (0..3).map(|_| marker_file()).collect();
    let request = |id: &str| {
        let body = format!(r#"{{"id":"{id}"}}"#);
        format!(
            "PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    // One after the other, as Kata waits for each reply...
    send_with_fds(
        stream.as_fd(),
        request("a").as_bytes(),
        &[files[0].0.as_raw_fd()],
    )
    .unwrap();
    assert!(read_only_response(&mut stream).text().contains("\"fds\":1"));
    // ...and back to back before reading, which must not mix them up.
    let fds = [files[1].0.as_raw_fd(), files[2].0.as_raw_fd()];
    send_with_fds(stream.as_fd(), request("b").as_bytes(), &fds).unwrap();
    send_with_fds(
        stream.as_fd(),
        request("c").as_bytes(),
        &[files[0].0.as_raw_fd()],
    )
    .unwrap();
    let mut pending = Vec::new();
    assert!(read_response(&mut stream, &mut pending)
        .text()
        .contains("\"fds\":2"));
    assert!(read_response(&mut stream, &mut pending)
        .text()
        .contains("\"fds\":1"));

    let seen = server.seen.lock().unwrap();
    let inodes = |i: usize| -> Vec<u64> {
        seen[i]
            .fds
            .iter()
            .map(|fd| inode_of(fd.as_raw_fd()))
            .collect()
    };
    assert_eq!(inodes(0), [files[0].1]);
    assert_eq!(inodes(1), [files[1].1, files[2].1]);
    assert_eq!(inodes(2), [files[0].1]);
    assert_eq!(seen[2].body, br#"{"id":"c"}"#);
}

#[test]
fn expect_100_continue() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"{}").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    stream.write_all(b"{}").unwrap();
    let response = read_only_response(&mut stream);
    assert!(response.text().contains("\"body_len\":4"));
    // No interim reply when the body came with the head.
    stream
        .write_all(b"PUT /d HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    assert_eq!(read_only_response(&mut stream).status, 200);
}

#[test]
fn chunked_bodies_empty_and_split() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    assert!(read_only_response(&mut stream)
        .text()
        .contains("\"body_len\":0"));
    let pieces: [&[u8]; 5] = [
        b"PUT /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"7;ext=1\r\n{\"a\":",
        b"1}\r\n1",
        b"\r\n \r\n0\r\nX-Trailer: t\r\n",
        b"\r\n",
    ];
    for piece in pieces {
        stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(read_only_response(&mut stream)
        .text()
        .contains("\"body_len\":8"));
    assert_eq!(server.seen.lock().unwrap()[1].body, b"{\"a\":1} ");
}

#[test]
fn dropped_responder_answers_500() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let response = get(&mut stream, "/drop");
    response.assert_json_error(500);
    assert_eq!(response.text(), r#"["internal error: request dropped"]"#);
    assert_eq!(get(&mut stream, "/after").status, 200);
}

#[test]
fn deferred_reply_does_not_hold_up_other_connections() {
    let server = TestServer::start(Limits::default());
    let mut slow = server.connect();
    slow.write_all(b"GET /slow/500 HTTP/1.1\r\n\r\n").unwrap();
    let start = Instant::now();
    let mut fast = server.connect();
    assert_eq!(get(&mut fast, "/fast").status, 200);
    assert!(start.elapsed() < Duration::from_millis(400));
    assert!(read_only_response(&mut slow).text().contains("/slow/500"));
    assert!(start.elapsed() >= Duration::from_millis(500));
}

#[test]
fn reply_to_a_closed_connection_is_dropped() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    stream.write_all(b"GET /slow/100 HTTP/1.1\r\n\r\n").unwrap();
    drop(stream);
    std::thread::sleep(Duration::from_millis(200));
    let mut stream = server.connect();
    assert_eq!(get(&mut stream, "/next").status, 200);
}

#[test]
fn idle_keep_alive_connections_do_not_time_out() {
    let server = TestServer::start(quick_limits());
    let mut stream = server.connect();
    get(&mut stream, "/first");
    assert!(stays_open(&stream, Duration::from_millis(700)));
    assert_eq!(get(&mut stream, "/second").status, 200);
}

#[test]
fn stop_ends_run_promptly_and_closes_connections() {
    let server = TestServer::start(Limits::default());
    let mut idle = server.connect();
    get(&mut idle, "/a");
    let mut partial = server.connect();
    partial.write_all(b"PUT /b HTTP/1.1\r\nContent-Le").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    server.stop();
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(is_closed(&mut idle));
    assert!(is_closed(&mut partial));
}

#[test]
fn the_server_thread_does_not_spin() {
    let server = TestServer::start(quick_limits());
    // An idle keep-alive connection, a request whose reply is pending on a connection the
    // client half-closed, and one whose client went away entirely.
    let mut idle = server.connect();
    get(&mut idle, "/a");
    let half = server.connect();
    (&half)
        .write_all(b"GET /slow/800 HTTP/1.1\r\n\r\n")
        .unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    let gone = server.connect();
    (&gone)
        .write_all(b"GET /slow/800 HTTP/1.1\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(gone);
    std::thread::sleep(Duration::from_millis(1000));
    let mut half = half;
    assert_eq!(read_only_response(&mut half).status, 200);
    let cpu = server.stop();
    assert!(
        cpu < Duration::from_millis(150),
        "server thread used {cpu:?}"
    );
}

#[test]
fn client_module_against_the_server() {
    let server = TestServer::start(Limits::default());
    let (file, inode) = marker_file();
    let response = client::request(
        &server.path,
        "PUT",
        "/api/v1/vm.add-net",
        Some(br#"{"id":"x"}"#),
        &[file.as_raw_fd()],
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("server"), Some("Nimbus API"));
    assert!(String::from_utf8_lossy(&response.body).contains("\"fds\":1"));

    let mut connection = client::Connection::connect(&server.path).unwrap();
    for path in ["/empty", "/zero", "/missing", "/drop"] {
        let response = connection.send("PUT", path, None, &[]).unwrap();
        let expected = match path {
            "/empty" => 204,
            "/zero" => 200,
            "/missing" => 404,
            _ => 500,
        };
        assert_eq!(response.status, expected);
    }
    assert!(connection.is_open());

    let seen = server.seen.lock().unwrap();
    assert_eq!(inode_of(seen[0].fds[0].as_raw_fd()), inode);
    assert_eq!(seen[0].method, "PUT");
    assert!(seen[1]
        .headers
        .iter()
        .any(|(n, v)| n == "Content-Length" && v == "0"));
}

#[test]
fn fds_stay_with_their_request_when_pipelined_behind_a_slow_one() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let (first, first_inode) = marker_file();
    let (second, second_inode) = marker_file();
    stream.write_all(b"GET /slow/200 HTTP/1.1\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // While the first is with the handler nothing is read, so these queue up in the socket:
    // b without descriptors, c with one, d with one. One read may return b and c together.
    let put = |path: &str| format!("PUT {path} HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}");
    stream.write_all(put("/b").as_bytes()).unwrap();
    send_with_fds(stream.as_fd(), put("/c").as_bytes(), &[first.as_raw_fd()]).unwrap();
    send_with_fds(stream.as_fd(), put("/d").as_bytes(), &[second.as_raw_fd()]).unwrap();
    let mut pending = Vec::new();
    let fds: Vec<String> = (0..4)
        .map(|_| read_response(&mut stream, &mut pending).text())
        .collect();
    assert!(
        fds[1].contains("\"/b\"") && fds[1].contains("\"fds\":0"),
        "{fds:?}"
    );
    assert!(
        fds[2].contains("\"/c\"") && fds[2].contains("\"fds\":1"),
        "{fds:?}"
    );
    assert!(
        fds[3].contains("\"/d\"") && fds[3].contains("\"fds\":1"),
        "{fds:?}"
    );
    let seen = server.seen.lock().unwrap();
    assert_eq!(inode_of(seen[2].fds[0].as_raw_fd()), first_inode);
    assert_eq!(inode_of(seen[3].fds[0].as_raw_fd()), second_inode);
}

#[test]
fn public_types_can_cross_threads_and_huge_timeouts_are_fine() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<api_http::Responder>();
    send::<api_http::Server>();
    send::<api_http::Request>();
    sync::<api_http::Response>();
    let server = TestServer::start(Limits {
        request_timeout: Duration::MAX,
        ..Limits::default()
    });
    let mut stream = server.connect();
    stream.write_all(b"GET /a HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    stream.write_all(b"\r\n").unwrap();
    assert_eq!(read_only_response(&mut stream).status, 200);
}

#[test]
fn body_less_puts_in_every_form() {
    let server = TestServer::start(Limits::default());
    let mut stream = server.connect();
    let forms: [&[u8]; 3] = [
        b"PUT /none HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PUT /zero HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"PUT /chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for form in forms {
        stream.write_all(form).unwrap();
        assert_eq!(read_only_response(&mut stream).status, 200);
    }
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.body.is_empty() && s.method == "PUT"));
}
