//! Responses and their exact bytes on the wire.
//!
//! Cloud Hypervisor's clients parse the status line strictly: `HTTP/1.1 <code> \r\n`, with no
//! reason phrase (ch-remote and Kata's Rust runtime read everything after the code as part of
//! it). Every reply says `Server:` and `Connection: keep-alive`; `Content-Type` and
//! `Content-Length` appear only with a body, and never on a 204.

use std::fmt::Write as _;

/// The value of the `Server` header on every reply.
pub const SERVER_NAME: &str = "Nimbus API";

/// The interim reply to `Expect: 100-continue`.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// An HTTP response from a [`Handler`](crate::Handler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, 100 to 999.
    pub status: u16,
    /// JSON body; `None` sends no body and no `Content-Length` (meant for 204: clients of other
    /// statuses would read until the connection closes, so use `json(status, vec![])` there).
    pub body: Option<Vec<u8>>,
}

impl Response {
    /// A response with a JSON body (`Content-Length` is sent even when the body is empty).
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            body: Some(body),
        }
    }

    /// A response without a body (no `Content-Type`, no `Content-Length`), normally 204.
    pub fn empty(status: u16) -> Self {
        Response { status, body: None }
    }

    /// An error response whose body is a JSON array of the messages, outermost first; every
    /// character outside printable ASCII is escaped, so the body is pure ASCII.
    pub fn error(status: u16, messages: &[String]) -> Self {
        Response::json(status, error_body(messages))
    }

    /// The bytes of the whole response (head and body), written to the socket in one go.
    ///
    /// A status outside 100..=999 is sent as 500; 1xx, 204 and 304 never carry a body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let status = if (100..=999).contains(&self.status) {
            self.status
        } else {
            log::warn!("invalid HTTP status {} replaced by 500", self.status);
            500
        };
        let body = self.body.as_deref().filter(|_| status_allows_body(status));
        let mut head = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {status} \r\nServer: {SERVER_NAME}\r\nConnection: keep-alive\r\n"
        );
        if let Some(body) = body {
            let _ = write!(
                head,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(body) = body {
            bytes.extend_from_slice(body);
        }
        bytes
    }
}

/// Whether a response with this status may carry a body.
pub(crate) fn status_allows_body(status: u16) -> bool {
    !((100..200).contains(&status) || status == 204 || status == 304)
}

/// A JSON array of strings, ASCII only.
pub(crate) fn error_body(messages: &[String]) -> Vec<u8> {
    let mut out = String::from("[");
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, message);
    }
    out.push(']');
    out.into_bytes()
}

/// Appends `text` as a JSON string literal, escaping quotes, backslashes, control characters
/// and everything outside ASCII (as UTF-16 `\uXXXX` units).
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(response: &Response) -> String {
        String::from_utf8_lossy(&response.to_bytes()).into_owned()
    }

    #[test]
    fn json_response_bytes() {
        assert_eq!(
            text(&Response::json(200, b"{\"a\":1}".to_vec())),
            "HTTP/1.1 200 \r\nServer: Nimbus API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn empty_json_body_has_zero_length() {
        assert_eq!(
            text(&Response::json(200, Vec::new())),
            "HTTP/1.1 200 \r\nServer: Nimbus API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn no_content_never_has_a_length_or_body() {
        let expected = "HTTP/1.1 204 \r\nServer: Nimbus API\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(text(&Response::empty(204)), expected);
        assert_eq!(text(&Response::json(204, b"{}".to_vec())), expected);
    }

    #[test]
    fn out_of_range_status_becomes_500() {
        assert!(text(&Response::empty(42)).starts_with("HTTP/1.1 500 \r\n"));
        assert!(text(&Response::empty(1000)).starts_with("HTTP/1.1 500 \r\n"));
    }

    #[test]
    fn error_body_is_an_ascii_json_array() {
        let response = Response::error(
            400,
            &[
                "outer \"quoted\" \\ path".to_string(),
                "tab\tnew\nline \u{1} é 😀".to_string(),
            ],
        );
        let body = response.body.clone().unwrap_or_default();
        assert!(body.is_ascii());
        assert_eq!(
            String::from_utf8_lossy(&body),
            r#"["outer \"quoted\" \\ path","tab\tnew\nline \u0001 \u00e9 \ud83d\ude00"]"#
        );
        assert_eq!(Response::error(500, &[]).body.as_deref(), Some(&b"[]"[..]));
    }
}
