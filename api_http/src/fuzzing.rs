//! Entry points for the fuzz targets in `fuzz/`: the server's incremental request parser,
//! driven with bytes directly instead of through a connection. Not for other uses: the
//! [`Server`](crate::Server) is the API.

use crate::request::{Progress, RequestParser};
use crate::{Limits, Request};

/// The request parser of one connection: bytes in, requests out, as the server feeds it.
#[derive(Debug)]
pub struct RequestStream {
    parser: RequestParser,
}

/// What [`RequestStream::advance`] has after using some input.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed; `continue_wanted`: an interim `100 Continue` is due.
    NeedMore {
        /// Whether the head asked for `100-continue` and the body is still to come.
        continue_wanted: bool,
    },
    /// A whole request, and whether the connection stays open after it.
    Request(Box<Request>, bool),
}

impl RequestStream {
    /// A parser enforcing `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            parser: RequestParser::new(limits),
        }
    }

    /// Uses bytes of `input` towards the current request: how many, and what it has.
    ///
    /// # Errors
    ///
    /// The status (400 or 413) and message the server answers a refused request with.
    pub fn advance(&mut self, input: &[u8]) -> Result<(usize, Parsed), (u16, String)> {
        match self.parser.advance(input) {
            Ok((used, Progress::NeedMore { continue_wanted })) => {
                Ok((used, Parsed::NeedMore { continue_wanted }))
            }
            Ok((used, Progress::Done(request, keep_alive))) => {
                Ok((used, Parsed::Request(request, keep_alive)))
            }
            Err(e) => Err((e.status, e.message)),
        }
    }

    /// Whether part of a request has been parsed and the rest is awaited.
    pub fn in_progress(&self) -> bool {
        self.parser.in_progress()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_request_in_two_pieces() {
        let mut s = RequestStream::new(&Limits::default());
        let input = b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let (used, parsed) = s.advance(&input[..10]).unwrap();
        assert!(matches!(parsed, Parsed::NeedMore { .. }));
        assert_eq!(used, 0);
        let (used, parsed) = s.advance(input).unwrap();
        assert_eq!(used, input.len());
        let Parsed::Request(request, keep_alive) = parsed else {
            panic!("no request");
        };
        assert!(keep_alive);
        assert_eq!(request.body, b"{}");
        assert!(!s.in_progress());
    }
}
