//! Driving a VMM through Cloud Hypervisor's REST API, the way its clients do: whole requests
//! written at once or in pieces, descriptors passed with `SCM_RIGHTS`, answers read back as
//! bytes so tests can check them byte for byte.

use std::io::{Read, Write};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// An HTTP answer as bytes and in parts.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Everything read, status line to the end of the body.
    pub raw: Vec<u8>,
    /// The status code.
    pub status: u16,
    /// The status line without its line end, e.g. `HTTP/1.1 204 `.
    pub status_line: String,
    /// Header lines as sent (name and value).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of header `name` (exact spelling).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error messages of a failed request (its JSON array body).
    pub fn messages(&self) -> Vec<String> {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// Reads one HTTP response from `stream` (blocking, with the stream's read timeout): the head,
/// then `Content-Length` bytes of body (none without the header, as Cloud Hypervisor's
/// clients read it).
///
/// # Errors
/// A read error, an early end of stream or a malformed head, with what was read.
pub fn read_answer(stream: &mut UnixStream) -> Result<Answer, String> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("connection closed after {:?}", lossy(&raw))),
            Ok(_) => raw.push(byte[0]),
            Err(e) => return Err(format!("read failed after {:?}: {e}", lossy(&raw))),
        }
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_string();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "Content-Length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("body of {length} bytes after {head:?}: {e}"))?;
    raw.extend_from_slice(&body);
    Ok(Answer {
        raw,
        status,
        status_line,
        headers,
        body,
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes `bytes` with `fds` attached, in one `sendmsg`.
///
/// # Errors
/// The send failed or was short.
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<(), String> {
    let sent = api_http::socket::send_with_fds(stream.as_fd(), bytes, fds)
        .map_err(|e| format!("sendmsg: {e}"))?;
    if sent != bytes.len() {
        return Err(format!("short sendmsg: {sent} of {} bytes", bytes.len()));
    }
    Ok(())
}

/// A request as Cloud Hypervisor's clients write it: request line, `Host`, `Accept`, then
/// `Content-Type`/`Content-Length` and the body when there is one.
pub fn request_bytes(method: &str, route: &str, body: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "{method} /api/v1/{route} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
    );
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

/// Connects to the API socket, retrying for a while (the VMM may still be starting).
///
/// # Errors
/// No connection within `timeout`.
pub fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                return Ok(s);
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!("cannot connect to {}: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One request on a new connection (the ch-remote and curl way).
///
/// # Panics
/// If the exchange fails at the socket level.
pub fn call(socket: &Path, method: &str, route: &str, body: Option<&str>) -> Answer {
    call_with_fds(socket, method, route, body, &[])
}

/// [`call`] with descriptors attached to the request.
///
/// # Panics
/// If the exchange fails at the socket level.
pub fn call_with_fds(
    socket: &Path,
    method: &str,
    route: &str,
    body: Option<&str>,
    fds: &[RawFd],
) -> Answer {
    let mut stream = connect(socket, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    send_with_fds(&stream, &request_bytes(method, route, body), fds)
        .unwrap_or_else(|e| panic!("{route}: {e}"));
    read_answer(&mut stream).unwrap_or_else(|e| panic!("{route}: {e}"))
}

/// Writes `bytes` on `stream` (several calls make separate writes).
///
/// # Panics
/// If the write fails.
pub fn write_part(stream: &mut UnixStream, bytes: &[u8]) {
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("write: {e}"));
}

/// The VMM's API socket path and the scratch directory it lives in, plus the command that
/// starts the VMM with `--api-socket` (tests add the rest).
#[derive(Debug)]
pub struct ApiVmm {
    /// The scratch directory (removed on drop).
    pub dir: crate::ScratchDir,
    /// The API socket.
    pub socket: PathBuf,
}

impl ApiVmm {
    /// A scratch directory tagged `tag` and a socket path in it.
    pub fn new(tag: &str) -> Self {
        let dir = crate::ScratchDir::new(tag);
        let socket = dir.file("api.sock");
        Self { dir, socket }
    }

    /// `nimbus --api-socket <socket>` plus `args`.
    pub fn command(&self, nimbus: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(nimbus);
        cmd.arg("--api-socket").arg(&self.socket).args(args);
        cmd
    }

    /// Waits until the VMM answers `vmm.ping`.
    ///
    /// # Panics
    /// If it does not within 10 s.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = connect(&self.socket, Duration::from_millis(100)) {
                if send_with_fds(&s, &request_bytes("GET", "vmm.ping", None), &[]).is_ok()
                    && read_answer(&mut s).is_ok_and(|a| a.status == 200)
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the VMM's API never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A `vm.create` body for the test guest: `vcpus` vCPUs, `mem_mib` MiB, the guest's command
/// line, the serial port on the VMM's stdout, no virtio console, and `extra` fields merged in
/// (e.g. `"disks": [...]`).
pub fn guest_vm_body(vcpus: u32, mem_mib: u64, cmdline: &str, extra: &str) -> String {
    let elf = crate::guest_elf();
    let mut body = serde_json::json!({
        "cpus": {"boot_vcpus": vcpus, "max_vcpus": vcpus},
        "memory": {"size": mem_mib << 20},
        "payload": {"kernel": elf, "cmdline": cmdline},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    if !extra.is_empty() {
        let more: serde_json::Value =
            serde_json::from_str(&format!("{{{extra}}}")).unwrap_or_else(|e| panic!("{e}"));
        if let (Some(b), Some(m)) = (body.as_object_mut(), more.as_object()) {
            for (k, v) in m {
                b.insert(k.clone(), v.clone());
            }
        }
    }
    body.to_string()
}
