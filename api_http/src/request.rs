//! Requests and the incremental request parser.
//!
//! The parser is fed whatever bytes have arrived and says how many it used: the head is parsed
//! with `httparse` once the blank line is in (line lengths are checked before, so an endless line
//! is refused early), then the body is taken as it comes (`Content-Length`, chunked, or none).

use std::os::fd::OwnedFd;

use crate::chunked::{ChunkedDecoder, ChunkedError};
use crate::Limits;

/// A request as the [`Handler`](crate::Handler) gets it.
#[derive(Debug)]
pub struct Request {
    /// The method, e.g. `PUT`.
    pub method: String,
    /// The request target exactly as sent, e.g. `/api/v1/vm.info`.
    pub path: String,
    /// The header fields in the order sent (names as spelled by the client).
    pub headers: Vec<(String, String)>,
    /// The body, decoded when it was chunked; empty when there was none.
    pub body: Vec<u8>,
    /// File descriptors that arrived with the request's bytes (`SCM_RIGHTS`), in order.
    pub fds: Vec<OwnedFd>,
}

impl Request {
    /// The value of the first header named `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// The value of the first header named `name`, case-insensitively.
pub(crate) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A request the parser refused, and the status to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    /// 400 or 413.
    pub(crate) status: u16,
    /// What is wrong, for the JSON error body.
    pub(crate) message: String,
}

impl ParseError {
    fn bad(message: impl Into<String>) -> Self {
        ParseError {
            status: 400,
            message: message.into(),
        }
    }

    fn too_large(max_body: usize) -> Self {
        ParseError {
            status: 413,
            message: format!("request body larger than {max_body} bytes"),
        }
    }
}

/// What the parser has after using some input.
#[derive(Debug)]
pub(crate) enum Progress {
    /// More bytes are needed. `continue_wanted`: the head is in, asked for `100-continue`, and
    /// the body is still to come.
    NeedMore {
        /// Whether an interim `100 Continue` is due.
        continue_wanted: bool,
    },
    /// A whole request (without descriptors; the connection attaches those).
    Done(Box<Request>, bool),
}

/// A parsed head, waiting for its body.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
    expect_continue: bool,
}

/// How the body is delimited.
#[derive(Debug)]
enum Framing {
    Length(usize),
    Chunked(ChunkedDecoder),
}

/// The parser's position within the current request.
#[derive(Debug)]
enum State {
    Head,
    Body {
        head: Head,
        framing: Framing,
        body: Vec<u8>,
    },
}

/// Parses one request after another from a byte stream.
#[derive(Debug)]
pub(crate) struct RequestParser {
    max_line: usize,
    max_headers: usize,
    max_body: usize,
    /// Bytes of empty lines skipped before the current request.
    skipped: usize,
    state: State,
}

impl RequestParser {
    /// A parser enforcing the line, header and body limits of `limits`.
    pub(crate) fn new(limits: &Limits) -> Self {
        RequestParser {
            max_line: limits.max_line,
            max_headers: limits.max_headers,
            max_body: limits.max_body,
            skipped: 0,
            state: State::Head,
        }
    }

    /// Whether part of a request (a head at least) has been parsed and the rest is awaited.
    pub(crate) fn in_progress(&self) -> bool {
        matches!(self.state, State::Body { .. })
    }

    /// Forgets any partly parsed request.
    pub(crate) fn reset(&mut self) {
        self.state = State::Head;
        self.skipped = 0;
    }

    /// Uses bytes from `input` towards the current request and returns how many it used and
    /// what it has. Stops after one complete request. Empty lines before a request are skipped.
    pub(crate) fn advance(&mut self, input: &[u8]) -> Result<(usize, Progress), ParseError> {
        let mut used = 0;
        if let State::Head = self.state {
            used = skip_empty_lines(input);
            self.skipped += used;
            if self.skipped > self.max_line {
                return Err(ParseError::bad(format!(
                    "more than {} bytes of empty lines before a request",
                    self.max_line
                )));
            }
            let Some((head_len, head, framing)) = self.parse_head(&input[used..])? else {
                return Ok((
                    used,
                    Progress::NeedMore {
                        continue_wanted: false,
                    },
                ));
            };
            used += head_len;
            self.state = State::Body {
                head,
                framing,
                body: Vec::new(),
            };
        }
        let State::Body {
            head,
            framing,
            body,
        } = &mut self.state
        else {
            return Ok((
                used,
                Progress::NeedMore {
                    continue_wanted: false,
                },
            ));
        };
        let rest = &input[used..];
        let complete = match framing {
            Framing::Length(left) => {
                let take = (*left).min(rest.len());
                if body.capacity() == 0 {
                    body.reserve_exact(*left);
                }
                body.extend_from_slice(&rest[..take]);
                used += take;
                *left -= take;
                *left == 0
            }
            Framing::Chunked(decoder) => {
                used += decoder.decode(rest, body).map_err(|e| match e {
                    ChunkedError::TooLarge => ParseError::too_large(self.max_body),
                    ChunkedError::Malformed(what) => ParseError::bad(what),
                })?;
                decoder.is_done()
            }
        };
        if !complete {
            let continue_wanted = head.expect_continue;
            return Ok((used, Progress::NeedMore { continue_wanted }));
        }
        self.skipped = 0;
        let State::Body { head, body, .. } = std::mem::replace(&mut self.state, State::Head) else {
            return Ok((
                used,
                Progress::NeedMore {
                    continue_wanted: false,
                },
            ));
        };
        let request = Request {
            method: head.method,
            path: head.path,
            headers: head.headers,
            body,
            fds: Vec::new(),
        };
        Ok((used, Progress::Done(Box::new(request), head.keep_alive)))
    }

    /// Parses the head at the start of `input` when it is complete: its length, the head and
    /// how its body is delimited.
    fn parse_head(&self, input: &[u8]) -> Result<Option<(usize, Head, Framing)>, ParseError> {
        if !self.head_is_complete(input)? {
            return Ok(None);
        }
        let mut slots = vec![httparse::EMPTY_HEADER; self.max_headers];
        let mut parsed = httparse::Request::new(&mut slots);
        let len = match parsed.parse(input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(self.too_many_headers()),
            Err(httparse::Error::Version) => {
                return Err(ParseError::bad(
                    "unsupported HTTP version (1.0 and 1.1 only)",
                ))
            }
            Err(e) => return Err(ParseError::bad(format!("malformed request: {e}"))),
        };
        let method = parsed.method.unwrap_or_default().to_string();
        let path = parsed.path.unwrap_or_default().to_string();
        let version = parsed.version.unwrap_or(1);
        let headers = owned_headers(parsed.headers);
        let framing = self.framing(&headers, version)?;
        let connection = header_tokens(&headers, "connection");
        let keep_alive = if version == 0 {
            connection.iter().any(|t| t == "keep-alive")
        } else {
            !connection.iter().any(|t| t == "close")
        };
        let expect_continue = version == 1
            && find_header(&headers, "expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        let head = Head {
            method,
            path,
            headers,
            keep_alive,
            expect_continue,
        };
        Ok(Some((len, head, framing)))
    }

    /// Checks every line of the head against `max_line` and says whether the blank line that
    /// ends the head has arrived.
    fn head_is_complete(&self, input: &[u8]) -> Result<bool, ParseError> {
        let mut start = 0;
        let mut first = true;
        let mut fields = 0;
        while let Some(offset) = input[start..].iter().position(|&b| b == b'\n') {
            let end = start + offset;
            let line = input[start..end]
                .strip_suffix(b"\r")
                .unwrap_or(&input[start..end]);
            if line.len() > self.max_line {
                return Err(self.line_too_long(first));
            }
            if line.is_empty() {
                return Ok(true);
            }
            if !first {
                // Refuse early rather than buffering header lines without end.
                fields += 1;
                if fields > self.max_headers {
                    return Err(self.too_many_headers());
                }
            }
            first = false;
            start = end + 1;
        }
        // The unfinished last line may still lose a trailing '\r'.
        if input.len() - start > self.max_line + 1 {
            return Err(self.line_too_long(first));
        }
        Ok(false)
    }

    fn too_many_headers(&self) -> ParseError {
        ParseError::bad(format!("more than {} header fields", self.max_headers))
    }

    fn line_too_long(&self, request_line: bool) -> ParseError {
        let what = if request_line {
            "request line"
        } else {
            "header line"
        };
        ParseError::bad(format!("{what} longer than {} bytes", self.max_line))
    }

    /// How the body after this head is delimited.
    fn framing(&self, headers: &[(String, String)], version: u8) -> Result<Framing, ParseError> {
        let encodings = header_tokens(headers, "transfer-encoding");
        let mut length: Option<u64> = None;
        for (_, value) in headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            for item in value.split(',') {
                let item = item.trim();
                // All digits but too big for u64 is still a length: one over the limit.
                let parsed = if !item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()) {
                    Some(item.parse::<u64>().unwrap_or(u64::MAX))
                } else {
                    None
                };
                let Some(parsed) = parsed else {
                    return Err(ParseError::bad(format!("invalid Content-Length: {value}")));
                };
                if length.is_some_and(|l| l != parsed) {
                    return Err(ParseError::bad("conflicting Content-Length values"));
                }
                length = Some(parsed);
            }
        }
        if !encodings.is_empty() {
            if length.is_some() {
                return Err(ParseError::bad(
                    "both Content-Length and Transfer-Encoding given",
                ));
            }
            if version == 0 || encodings != ["chunked"] {
                return Err(ParseError::bad(format!(
                    "unsupported Transfer-Encoding: {}",
                    encodings.join(", ")
                )));
            }
            return Ok(Framing::Chunked(ChunkedDecoder::new(
                self.max_line,
                self.max_headers,
                self.max_body,
            )));
        }
        let length = length.unwrap_or(0);
        match usize::try_from(length) {
            Ok(length) if length <= self.max_body => Ok(Framing::Length(length)),
            _ => Err(ParseError::too_large(self.max_body)),
        }
    }
}

/// The comma-separated tokens of every header named `name`, lower-cased.
fn header_tokens(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// How many bytes of empty lines (`\r\n` or `\n`) start `input`.
fn skip_empty_lines(input: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        match &input[pos..] {
            [b'\r', b'\n', ..] => pos += 2,
            [b'\n', ..] => pos += 1,
            _ => return pos,
        }
    }
}

/// Header fields as owned (name, trimmed value) pairs.
pub(crate) fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            (h.name.to_string(), value)
        })
        .collect()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
