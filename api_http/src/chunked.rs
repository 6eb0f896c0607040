//! Incremental decoder for `Transfer-Encoding: chunked` bodies, used by the server for requests
//! and by the client for responses.

/// Why a chunked body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChunkedError {
    /// The framing is broken; the text says how.
    Malformed(&'static str),
    /// The decoded body would exceed the size limit.
    TooLarge,
}

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for a `size[;ext]\r\n` line.
    Size,
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    /// Waiting for the `\r\n` after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    /// The whole body is in.
    Done,
}

/// Decodes a chunked body piece by piece.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedDecoder {
    stage: Stage,
    max_line: usize,
    max_trailers: usize,
    max_body: usize,
    trailers: usize,
}

impl ChunkedDecoder {
    /// A decoder refusing lines longer than `max_line`, more than `max_trailers` trailer lines
    /// and bodies longer than `max_body`.
    pub(crate) fn new(max_line: usize, max_trailers: usize, max_body: usize) -> Self {
        ChunkedDecoder {
            stage: Stage::Size,
            max_line,
            max_trailers,
            max_body,
            trailers: 0,
        }
    }

    /// Whether the terminating chunk and trailers have been read.
    pub(crate) fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Decodes as much of `input` as possible, appending data to `body`; returns how many bytes
    /// of `input` were used. Stops right after the end of the body.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
    ) -> Result<usize, ChunkedError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.stage {
                Stage::Done => return Ok(pos),
                Stage::Size => {
                    let Some(line_len) = self.line(rest, "chunk size line too long")? else {
                        return Ok(pos);
                    };
                    if !rest[0].is_ascii_hexdigit() {
                        return Err(ChunkedError::Malformed("invalid chunk size"));
                    }
                    let size = match httparse::parse_chunk_size(&rest[..line_len]) {
                        Ok(httparse::Status::Complete((used, size))) if used == line_len => size,
                        _ => return Err(ChunkedError::Malformed("invalid chunk size")),
                    };
                    let room = self.max_body.saturating_sub(body.len());
                    if usize::try_from(size).map_or(true, |size| size > room) {
                        return Err(ChunkedError::TooLarge);
                    }
                    pos += line_len;
                    self.stage = if size == 0 {
                        Stage::Trailers
                    } else {
                        Stage::Data(size)
                    };
                }
                Stage::Data(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let take = usize::try_from(left).map_or(rest.len(), |l| l.min(rest.len()));
                    body.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = left - take as u64;
                    self.stage = if left == 0 {
                        Stage::DataEnd
                    } else {
                        Stage::Data(left)
                    };
                }
                Stage::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(ChunkedError::Malformed("chunk data not followed by CRLF"));
                    }
                    pos += 2;
                    self.stage = Stage::Size;
                }
                Stage::Trailers => {
                    let Some(line_len) = self.line(rest, "trailer line too long")? else {
                        return Ok(pos);
                    };
                    pos += line_len;
                    if line_len == 2 {
                        self.stage = Stage::Done;
                        continue;
                    }
                    self.trailers += 1;
                    if self.trailers > self.max_trailers {
                        return Err(ChunkedError::Malformed("too many trailer lines"));
                    }
                    if !rest[..line_len].contains(&b':') {
                        return Err(ChunkedError::Malformed("invalid trailer line"));
                    }
                }
            }
        }
    }

    /// The length of the CRLF-terminated line at the start of `input`, CRLF included, or `None`
    /// when it is not complete yet.
    fn line(&self, input: &[u8], too_long: &'static str) -> Result<Option<usize>, ChunkedError> {
        let limit = self.max_line + 2;
        match input.iter().take(limit).position(|&b| b == b'\n') {
            Some(i) if i > 0 && input[i - 1] == b'\r' => Ok(Some(i + 1)),
            Some(_) => Err(ChunkedError::Malformed("chunk line not ended by CRLF")),
            None if input.len() >= limit => Err(ChunkedError::Malformed(too_long)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decode_all(pieces: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>), ChunkedError> {
        let mut decoder = ChunkedDecoder::new(64, 4, 1024);
        let mut pending = Vec::new();
        let mut body = Vec::new();
        for piece in pieces {
            pending.extend_from_slice(piece);
            let used = decoder.decode(&pending, &mut body)?;
            pending.drain(..used);
        }
        assert!(decoder.is_done(), "body not finished");
        Ok((body, pending))
    }

    #[test]
    fn empty_body() {
        assert_eq!(decode_all(&[b"0\r\n\r\n"]), Ok((vec![], vec![])));
    }

    #[test]
    fn chunks_extensions_trailers_and_leftover() {
        let (body, rest) = decode_all(&[
            b"5;name=\"x\"\r\nhello\r\n",
            b"9\r\n, world!!\r\n0\r\nX-Trailer: yes\r\n\r\nGET /next",
        ])
        .unwrap();
        assert_eq!(body, b"hello, world!!");
        assert_eq!(rest, b"GET /next");
    }

    #[test]
    fn byte_by_byte() {
        let input = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode_all(&pieces).unwrap().0, b"abcde");
    }

    #[test]
    fn malformed_framing() {
        for input in [
            &b"x\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"3\r\nabcX\r\n",
            b"3\nabc",
            b"0\r\nno colon\r\n\r\n",
            b"11111111111111111\r\n",
        ] {
            let mut decoder = ChunkedDecoder::new(64, 4, 1024);
            let result = decoder.decode(input, &mut Vec::new());
            assert!(
                matches!(
                    result,
                    Err(ChunkedError::Malformed(_) | ChunkedError::TooLarge)
                ),
                "{input:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn limits() {
        let mut decoder = ChunkedDecoder::new(64, 4, 10);
        assert_eq!(
            decoder.decode(b"b\r\n", &mut Vec::new()),
            Err(ChunkedError::TooLarge)
        );
        let mut decoder = ChunkedDecoder::new(8, 4, 10);
        assert!(decoder.decode(&[b'1'; 20], &mut Vec::new()).is_err());
        let mut decoder = ChunkedDecoder::new(64, 1, 10);
        assert!(decoder
            .decode(b"0\r\na: 1\r\nb: 2\r\n\r\n", &mut Vec::new())
            .is_err());
    }
}
