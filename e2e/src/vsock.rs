//! The host side of vsock through the hybrid Unix-socket backend: connecting to a guest port
//! as Kata's agent client does, and the streams of the test guest's vsock checks (the guest
//! pattern one way, the host pattern the other, compared byte for byte).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Byte `i` of a stream the test guest sends (`seed` [`GUEST_SEED`]) or expects from the host
/// ([`HOST_SEED`]); the same function as `guest/src/vsock.rs`.
pub fn vsock_pattern(seed: u8, i: u64) -> u8 {
    ((i % 251) as u8) ^ ((i / 251) as u8).wrapping_mul(7) ^ seed
}

/// Seed of the guest's streams.
pub const GUEST_SEED: u8 = 0x5a;
/// Seed of the host's streams.
pub const HOST_SEED: u8 = 0xa5;

/// Connects to guest port `port` through the device's socket: writes `CONNECT <port>\n` (as
/// `keyword` spells it) and reads the answer line byte by byte, as Kata's runtimes do.
/// Returns the stream and the line; a stream closed without a line is an error (the guest
/// refused).
///
/// # Errors
/// When the socket cannot be reached, or it closes before a line.
pub fn vsock_connect(
    socket: &Path,
    keyword: &str,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, String), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{keyword} {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let line = read_line(&mut s).map_err(|e| format!("no answer line: {e}"))?;
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((s, line))
}

/// Reads one line, newline included, a byte at a time (nothing past it is consumed).
///
/// # Errors
/// When the stream ends (`closed after ...`) or fails before the newline.
pub fn read_line(s: &mut UnixStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("closed after {line:?}")),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("{e} after {line:?}")),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Accepts `n` connections on `listener` within `timeout`.
///
/// # Errors
/// When fewer arrive in time.
pub fn accept_n(
    listener: &UnixListener,
    n: usize,
    timeout: Duration,
) -> Result<Vec<UnixStream>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                out.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!("{} of {n} connections accepted", out.len()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(out)
}

/// One stream of the guest's checks: writes `bytes` of the host pattern (from a thread) while
/// reading `bytes` of the guest pattern, after waiting `stall` first (a reader that stalls);
/// returns the stream.
///
/// # Errors
/// When a byte differs, the stream ends early or an I/O call fails.
pub fn vsock_exchange(
    stream: UnixStream,
    bytes: u64,
    stall: Duration,
) -> Result<UnixStream, String> {
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = vsock_pattern(HOST_SEED, off + i as u64);
            }
            writer
                .write_all(&buf[..n])
                .map_err(|e| format!("write at {off}: {e}"))?;
            off += n as u64;
        }
        Ok(())
    });
    std::thread::sleep(stall);
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < bytes {
        let want = (bytes - got).min(buf.len() as u64) as usize;
        let n = reader
            .read(&mut buf[..want])
            .map_err(|e| format!("read at {got}: {e}"))?;
        if n == 0 {
            return Err(format!("stream ended after {got} of {bytes} bytes"));
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != vsock_pattern(GUEST_SEED, got + i as u64)) {
            return Err(format!(
                "byte {} differs from the guest pattern",
                got + i as u64
            ));
        }
        got += n as u64;
    }
    sender.join().map_err(|_| "writer panicked".to_string())??;
    Ok(reader)
}

/// Waits (at most `timeout`) for `stream` to end: end of file or a reset, with no more data.
///
/// # Errors
/// When data arrives or nothing happens in time.
pub fn expect_closed(stream: &mut UnixStream, timeout: Duration) -> Result<(), String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 64];
    match stream.read(&mut b) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Ok(n) => Err(format!("{n} unexpected bytes")),
        Err(e) => Err(format!("not closed: {e}")),
    }
}
