//! HTTP/1.1 framing of the API (`api_http`): the server's incremental request parser (request
//! line and headers through `httparse` with our line and header limits, `Content-Length` and
//! chunked bodies, keep-alive, `Expect: 100-continue`, pipelining), and the client's response
//! parser (`api_http::client`, used by `nimbus-remote`) reading from a socket.
//!
//! Input: byte 0 picks the side (bit 0 clear: server, set: client); for the server, then
//! `[split: u16]` and the byte stream a client sends; for the client, the bytes a server
//! answers with.
//!
//! Checks (server): the stream parsed at once and in two pieces split at `split` gives the same
//! requests and the same refusal; every request parsed (whose header values are UTF-8)
//! re-encodes (with `Content-Length` for a body) into bytes that parse back into the same method, target,
//! headers and body; refusals are 400 or 413. (Client): a response is never an interim 1xx one, and a `Content-Length` body has that
//! length.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::OnceLock;

use api_http::fuzzing::{Parsed, RequestStream};
use api_http::{Limits, Request};
use libfuzzer_sys::fuzz_target;
use nimbus_fuzz::Reader;

fn limits() -> Limits {
    Limits {
        max_line: 256,
        max_headers: 16,
        max_body: 4096,
        ..Limits::default()
    }
}

type Outcome = (
    Vec<(String, String, Vec<(String, String)>, Vec<u8>, bool)>,
    Option<(u16, String)>,
);

fn summary(
    r: &Request,
    keep_alive: bool,
) -> (String, String, Vec<(String, String)>, Vec<u8>, bool) {
    (
        r.method.clone(),
        r.path.clone(),
        r.headers.clone(),
        r.body.clone(),
        keep_alive,
    )
}

/// Feeds `pieces` as a connection would: each time more bytes arrive, the parser gets all
/// that is pending.
fn feed(pieces: &[&[u8]]) -> Outcome {
    let mut s = RequestStream::new(&limits());
    let mut pending: Vec<u8> = Vec::new();
    let mut done = Vec::new();
    for piece in pieces {
        pending.extend_from_slice(piece);
        loop {
            match s.advance(&pending) {
                Err(e) => {
                    assert!(e.0 == 400 || e.0 == 413, "refused with {}", e.0);
                    return (done, Some(e));
                }
                Ok((used, parsed)) => {
                    assert!(used <= pending.len());
                    pending.drain(..used);
                    match parsed {
                        Parsed::Request(r, keep_alive) => done.push(summary(&r, keep_alive)),
                        Parsed::NeedMore { .. } => break,
                    }
                }
            }
        }
    }
    (done, None)
}

fn is_framing(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

fn server(data: &[u8]) {
    let mut r = Reader::new(data);
    let split = usize::from(r.u16());
    let stream = r.rest();
    let whole = feed(&[stream]);
    let split = split.min(stream.len());
    let pieces = feed(&[&stream[..split], &stream[split..]]);
    assert_eq!(whole, pieces, "parsed at once vs. in two pieces at {split}");
    for (method, path, headers, body, _) in &whole.0 {
        // Values that were not UTF-8 come out lossily converted (longer): not comparable.
        if headers.iter().any(|(_, v)| v.contains('\u{fffd}')) {
            continue;
        }
        let mut bytes = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
        for (n, v) in headers.iter().filter(|(n, _)| !is_framing(n)) {
            bytes.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        // No more header fields than the original had (the limit counts them).
        if !body.is_empty() {
            bytes.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(body);
        let (again, refused) = feed(&[&bytes]);
        assert_eq!(
            refused,
            None,
            "re-encoded request refused: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(again.len(), 1);
        let (m, p, h, b, _) = &again[0];
        assert_eq!((m, p, b), (method, path, body), "round trip");
        let plain = |h: &[(String, String)]| -> Vec<(String, String)> {
            h.iter().filter(|(n, _)| !is_framing(n)).cloned().collect()
        };
        assert_eq!(plain(h), plain(headers), "headers after a round trip");
    }
}

static SERVER: OnceLock<(UnixListener, std::path::PathBuf)> = OnceLock::new();

fn client(answer: &[u8]) {
    let (listener, path) = SERVER.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("nimbus-fuzz-api-http-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        (UnixListener::bind(&path).expect("bind"), path)
    });
    let mut conn = api_http::client::Connection::connect(path).expect("connect");
    let (mut server_side, _) = listener.accept().expect("accept");
    server_side.write_all(answer).expect("answer");
    server_side
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    if let Ok(response) = conn.send("GET", "/api/v1/vmm.ping", None, &[]) {
        assert!(
            !(100..200).contains(&response.status),
            "interim response {}",
            response.status
        );
        if let Some(len) = response
            .header("content-length")
            .and_then(|l| l.trim().parse::<usize>().ok())
        {
            if response.header("transfer-encoding").is_none()
                && response.status != 204
                && response.status != 304
            {
                assert_eq!(response.body.len(), len, "body vs. Content-Length");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&side, rest)) = data.split_first() else {
        return;
    };
    if side & 1 == 0 {
        server(rest);
    } else {
        client(rest);
    }
});
