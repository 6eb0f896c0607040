//! Reading a console's socket (or any stream with a read timeout) until some text arrives.

use std::io::Read;
use std::time::{Duration, Instant};

/// Reads `stream` into `got` until `got` contains `text`, for at most `timeout`. The stream
/// should have a short read timeout of its own (its expiry, `WouldBlock` or `TimedOut`, is
/// waited through). Errs with what arrived when the time is up, the stream ends or fails.
pub fn read_until(
    stream: &mut impl Read,
    got: &mut Vec<u8>,
    text: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(got).contains(text) {
        let so_far = || String::from_utf8_lossy(got).into_owned();
        if Instant::now() >= deadline {
            return Err(format!(
                "no '{text}' within {timeout:?}; got:\n{}",
                so_far()
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(format!(
                    "the stream ended before '{text}'; got:\n{}",
                    so_far()
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("reading before '{text}': {e}; got:\n{}", so_far())),
        }
    }
    Ok(())
}
