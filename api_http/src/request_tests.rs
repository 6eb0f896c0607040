#![allow(clippy::unwrap_used)]

use super::*;

fn limits() -> Limits {
    Limits {
        max_line: 64,
        max_headers: 8,
        max_body: 100,
        ..Limits::default()
    }
}

/// Feeds `pieces` one after another, as a connection would, and collects the results.
fn feed(parser: &mut RequestParser, pieces: &[&[u8]]) -> (Vec<(Request, bool)>, Vec<u8>, bool) {
    let mut pending = Vec::new();
    let mut done = Vec::new();
    let mut continue_wanted = false;
    for piece in pieces {
        pending.extend_from_slice(piece);
        loop {
            let (used, progress) = parser.advance(&pending).unwrap();
            pending.drain(..used);
            match progress {
                Progress::Done(request, keep_alive) => done.push((*request, keep_alive)),
                Progress::NeedMore { continue_wanted: c } => {
                    continue_wanted = c;
                    break;
                }
            }
        }
    }
    (done, pending, continue_wanted)
}

fn parse_one(input: &[u8]) -> (Request, bool) {
    let mut parser = RequestParser::new(&limits());
    let (mut done, rest, _) = feed(&mut parser, &[input]);
    assert_eq!(done.len(), 1, "requests parsed from {input:?}");
    assert!(rest.is_empty());
    done.remove(0)
}

fn error_of(input: &[u8]) -> ParseError {
    let mut parser = RequestParser::new(&limits());
    let mut pending = input;
    loop {
        match parser.advance(pending) {
            Err(e) => return e,
            Ok((used, Progress::Done(..))) => pending = &pending[used..],
            Ok((_, Progress::NeedMore { .. })) => panic!("{input:?} was not refused"),
        }
    }
}

#[test]
fn get_without_body() {
    let (request, keep_alive) =
        parse_one(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
    assert_eq!(request.method, "GET");
    assert_eq!(request.path, "/api/v1/vm.info");
    assert_eq!(request.header("HOST"), Some("localhost"));
    assert_eq!(request.header("missing"), None);
    assert!(request.body.is_empty());
    assert!(keep_alive);
}

#[test]
fn content_length_body_and_connection_close() {
    let (request, keep_alive) = parse_one(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{\"a\":1}",
    );
    assert_eq!(request.body, b"{\"a\":1}");
    assert!(!keep_alive);
}

#[test]
fn http_1_0_closes_unless_asked_to_keep_alive() {
    assert!(!parse_one(b"GET / HTTP/1.0\r\n\r\n").1);
    assert!(parse_one(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").1);
}

#[test]
fn put_without_length_has_an_empty_body() {
    let (request, _) = parse_one(b"PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n");
    assert!(request.body.is_empty());
}

#[test]
fn ch_remote_framing_byte_by_byte() {
    let input = b"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
                  Content-Length: 5\r\n\r\nhello";
    let mut parser = RequestParser::new(&limits());
    let pieces: Vec<&[u8]> = input.chunks(1).collect();
    let (done, rest, _) = feed(&mut parser, &pieces);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0.body, b"hello");
    assert!(rest.is_empty());
}

#[test]
fn pipelined_requests_one_at_a_time() {
    let mut parser = RequestParser::new(&limits());
    let input =
        b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /c HTTP/1.1\r\n";
    let (used, progress) = parser.advance(input).unwrap();
    let Progress::Done(first, _) = progress else {
        panic!("first request not complete")
    };
    assert_eq!(first.path, "/a");
    let (used2, progress) = parser.advance(&input[used..]).unwrap();
    let Progress::Done(second, _) = progress else {
        panic!("second request not complete")
    };
    assert_eq!((second.path.as_str(), &second.body[..]), ("/b", &b"hi"[..]));
    let (used3, progress) = parser.advance(&input[used + used2..]).unwrap();
    assert!(matches!(progress, Progress::NeedMore { .. }));
    assert_eq!(used3, 0);
}

#[test]
fn leading_empty_lines_are_skipped() {
    assert_eq!(parse_one(b"\r\n\r\n\nGET /x HTTP/1.1\r\n\r\n").0.path, "/x");
    // But not without end, even when they come a few at a time.
    let mut parser = RequestParser::new(&limits());
    for _ in 0..32 {
        assert!(parser.advance(b"\r\n").is_ok());
    }
    let err = parser.advance(b"\r\n").unwrap_err();
    assert!(err.message.contains("empty lines"), "{}", err.message);
}

#[test]
fn chunked_bodies() {
    let (request, _) = parse_one(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert!(request.body.is_empty());
    let mut parser = RequestParser::new(&limits());
    let (done, _, _) = feed(
        &mut parser,
        &[
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n4;ext=1\r\n{\"a\"",
            b"\r\n2\r\n:1\r\n1\r\n}\r\n0\r\nTrailer: x\r\n",
            b"\r\n",
        ],
    );
    assert_eq!(done[0].0.body, b"{\"a\":1}");
}

#[test]
fn expect_continue_is_reported_until_the_body_is_in() {
    let mut parser = RequestParser::new(&limits());
    let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
    let (done, _, continue_wanted) = feed(&mut parser, &[head]);
    assert!(done.is_empty() && continue_wanted);
    let (done, _, continue_wanted) = feed(&mut parser, &[b"{}"]);
    assert_eq!(done.len(), 1);
    assert!(!continue_wanted);
    // HTTP/1.0 clients are not sent 100 Continue.
    let mut parser = RequestParser::new(&limits());
    let (_, _, continue_wanted) = feed(
        &mut parser,
        &[b"PUT /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"],
    );
    assert!(!continue_wanted);
}

#[test]
fn long_lines_are_refused_before_they_end() {
    let mut parser = RequestParser::new(&limits());
    let long = vec![b'a'; 70];
    let mut input = b"GET /".to_vec();
    input.extend_from_slice(&long);
    let err = parser.advance(&input).unwrap_err();
    assert_eq!(err.status, 400);
    assert!(err.message.contains("request line"), "{}", err.message);

    let mut input = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    input.extend_from_slice(&long);
    let err = RequestParser::new(&limits()).advance(&input).unwrap_err();
    assert!(err.message.contains("header line"), "{}", err.message);
}

#[test]
fn a_line_of_exactly_max_line_is_accepted() {
    let mut input = b"GET /".to_vec();
    input.extend_from_slice(&vec![b'a'; 64 - "GET / HTTP/1.1".len()]);
    input.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    parse_one(&input);
}

#[test]
fn too_many_headers() {
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..9 {
        input.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    input.extend_from_slice(b"\r\n");
    assert!(error_of(&input).message.contains("header fields"));
    // Refused before the head ends, so endless header lines are not buffered.
    let mut parser = RequestParser::new(&limits());
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    for _ in 0..9 {
        input.extend_from_slice(b"X: v\r\n");
    }
    assert!(parser.advance(&input).is_err());
    // Exactly the limit is fine.
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..8 {
        input.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    input.extend_from_slice(b"\r\n");
    assert_eq!(parse_one(&input).0.headers.len(), 8);
}

#[test]
fn malformed_requests_are_400() {
    for input in [
        &b"\x00\x01\x02\xff\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let err = error_of(input);
        assert_eq!(err.status, 400, "{input:?}: {err:?}");
        assert!(!err.message.is_empty());
    }
    assert!(error_of(b"GET / HTTP/2.0\r\n\r\n")
        .message
        .contains("version"));
}

#[test]
fn same_content_length_twice_is_fine() {
    let (request, _) =
        parse_one(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab");
    assert_eq!(request.body, b"ab");
}

#[test]
fn bodies_over_the_limit_are_413() {
    assert_eq!(
        error_of(b"PUT / HTTP/1.1\r\nContent-Length: 101\r\n\r\n").status,
        413
    );
    assert_eq!(
        error_of(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n").status,
        413
    );
    let mut chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"28\r\n");
        chunked.extend_from_slice(&[b'x'; 40]);
        chunked.extend_from_slice(b"\r\n");
    }
    assert_eq!(error_of(&chunked).status, 413);
}

#[test]
fn random_junk_never_panics() {
    let mut state = 0x1234_5678_9abc_def0_u64;
    for _ in 0..2000 {
        let mut parser = RequestParser::new(&limits());
        let mut input = Vec::new();
        let len = (state % 200) as usize;
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Bias towards HTTP-looking bytes so the parser gets past the first line sometimes.
            let byte = match state % 8 {
                0 => b'\r',
                1 => b'\n',
                2 => b':',
                3 => b' ',
                _ => (state >> 8) as u8,
            };
            input.push(byte);
        }
        let mut pending = &input[..];
        while let Ok((used, progress)) = parser.advance(pending) {
            pending = &pending[used..];
            if matches!(progress, Progress::NeedMore { .. }) {
                break;
            }
        }
    }
}

#[test]
fn reset_forgets_a_partial_request() {
    let mut parser = RequestParser::new(&limits());
    let (_, progress) = parser
        .advance(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")
        .unwrap();
    assert!(matches!(progress, Progress::NeedMore { .. }));
    assert!(parser.in_progress());
    parser.reset();
    assert!(!parser.in_progress());
    assert_eq!(parse_one(b"GET / HTTP/1.1\r\n\r\n").0.method, "GET");
}
