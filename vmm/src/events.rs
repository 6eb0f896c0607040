//! The event monitor (`--event-monitor path=PATH|fd=N`): lifecycle events as Cloud Hypervisor
//! writes them, which libvirt parses. Each event is one pretty-printed JSON object
//! (`timestamp` since the VMM started, `source`, `event`, `properties`), followed by a blank
//! line, written with one `write`.
//!
//! A FIFO is opened blocking (so the reader is there) and then switched to non-blocking: an
//! event the reader has no room for is dropped with a warning rather than stalling the VMM.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

/// Errors opening the event monitor.
#[derive(Debug, thiserror::Error)]
pub enum EventMonitorError {
    /// The file or FIFO could not be opened.
    #[error("cannot open the event monitor {path}")]
    Open {
        /// Its path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor is not open.
    #[error("event monitor fd {0} is not open")]
    BadFd(i32),
    /// The option did not parse.
    #[error("--event-monitor: '{0}' is not path=PATH or fd=N")]
    Syntax(String),
}

#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Timestamp,
    source: &'a str,
    event: &'a str,
    properties: Option<std::collections::BTreeMap<&'a str, String>>,
}

/// libvirt finds the end of an event by counting braces, so none may appear inside a string.
fn no_braces(s: &str) -> String {
    s.replace('{', "(").replace('}', ")")
}

/// Where events go (nowhere when no monitor was asked for).
#[derive(Debug)]
pub struct EventMonitor {
    out: Option<File>,
    start: Instant,
}

impl EventMonitor {
    /// No monitor: events are only logged (at debug level).
    pub fn none(start: Instant) -> Self {
        Self { out: None, start }
    }

    /// Opens the monitor named by `--event-monitor`'s value: `path=PATH` (a file, created or
    /// truncated, or a FIFO), `fd=N`, or a bare path.
    pub fn open(option: &str, start: Instant) -> Result<Self, EventMonitorError> {
        let out = match option.split_once('=') {
            Some(("fd", n)) => {
                let fd: i32 = n
                    .parse()
                    .map_err(|_| EventMonitorError::Syntax(option.into()))?;
                // SAFETY: F_GETFD only inspects the descriptor table.
                if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(EventMonitorError::BadFd(fd));
                }
                // SAFETY: the descriptor is open and was handed to this process for the events.
                unsafe { File::from_raw_fd(fd) }
            }
            Some(("path", p)) => open_path(Path::new(p))?,
            Some(_) => return Err(EventMonitorError::Syntax(option.into())),
            None if !option.is_empty() => open_path(Path::new(option))?,
            None => return Err(EventMonitorError::Syntax(option.into())),
        };
        set_nonblocking(&out);
        Ok(Self {
            out: Some(out),
            start,
        })
    }

    /// Writes one event; `properties` may be empty (written as `null`).
    pub fn emit(&mut self, source: &str, event: &str, properties: &[(&str, &str)]) {
        log::debug!("event {source}/{event} {properties:?}");
        let Some(out) = &mut self.out else {
            return;
        };
        let elapsed = self.start.elapsed();
        let record = Event {
            timestamp: Timestamp {
                secs: elapsed.as_secs(),
                nanos: elapsed.subsec_nanos(),
            },
            source,
            event,
            properties: (!properties.is_empty())
                .then(|| properties.iter().map(|(k, v)| (*k, no_braces(v))).collect()),
        };
        let mut text = match serde_json::to_vec_pretty(&record) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("event {source}/{event} not written: {e}");
                return;
            }
        };
        text.extend_from_slice(b"\n\n");
        if let Err(e) = out.write_all(&text) {
            log::warn!("event {source}/{event} not written to the event monitor: {e}");
        }
    }
}

fn open_path(path: &Path) -> Result<File, EventMonitorError> {
    let is_fifo = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        .unwrap_or(false);
    let mut options = OpenOptions::new();
    options.write(true);
    if !is_fifo {
        options.create(true).truncate(true);
    }
    // A FIFO's open blocks until the reader (libvirt) has its end open.
    options
        .open(path)
        .map_err(|source| EventMonitorError::Open {
            path: path.display().to_string(),
            source,
        })
}

fn set_nonblocking(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor the file owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_pretty_json_objects_separated_by_a_blank_line() {
        let dir = std::env::temp_dir().join(format!("nimbus-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("events");
        let mut m =
            EventMonitor::open(&format!("path={}", path.display()), Instant::now()).expect("open");
        m.emit("vmm", "starting", &[]);
        m.emit(
            "vm",
            "device-removed",
            &[("id", "{d}"), ("bdf", "0000:00:02.0")],
        );
        let text = std::fs::read_to_string(&path).expect("read");
        let parts: Vec<&str> = text.split("\n\n").filter(|p| !p.is_empty()).collect();
        assert_eq!(parts.len(), 2, "{text}");
        let first: serde_json::Value = serde_json::from_str(parts[0]).expect("json");
        assert_eq!(first["source"], "vmm");
        assert_eq!(first["event"], "starting");
        assert!(first["properties"].is_null());
        assert!(first["timestamp"]["secs"].is_u64() && first["timestamp"]["nanos"].is_u64());
        assert!(parts[0].starts_with("{\n  \"timestamp\": {\n"), "{text}");
        let second: serde_json::Value = serde_json::from_str(parts[1]).expect("json");
        assert_eq!(second["properties"]["bdf"], "0000:00:02.0");
        assert_eq!(second["properties"]["id"], "(d)");
        assert!(parts.iter().all(|p| p.len() < 4096));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(matches!(
            EventMonitor::open("fd=x", Instant::now()),
            Err(EventMonitorError::Syntax(_))
        ));
        assert!(matches!(
            EventMonitor::open("fd=1", Instant::now()),
            Err(EventMonitorError::BadFd(1))
        ));
        assert!(matches!(
            EventMonitor::open("colour=red", Instant::now()),
            Err(EventMonitorError::Syntax(_))
        ));
    }
}
