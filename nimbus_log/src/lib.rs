//! The log format of every Nimbus process (the VMM and the vhost-user daemons): `[  12.345 ms LEVEL target] message` to stderr or a file, with the time
//! measured from process start.
#![deny(missing_docs)]

pub mod throttle;

// `warn_limited!` expands to `log::warn!` through this path, so its users need no `log`
// dependency of their own.
#[doc(hidden)]
pub use log as __log;

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

struct Logger {
    start: Instant,
    out: Mutex<Box<dyn Write + Send>>,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        // One `write` per line, so that a line written by a signal handler (the seccomp
        // SIGSYS line) never lands inside one.
        let line = format!(
            "[{ms:10.3} ms {:5} {name}] {}\n",
            record.level(),
            record.args()
        );
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// Installs the logger. `verbosity` 0 = warnings and errors, 1 = info, 2 = debug, 3+ = trace.
pub fn init(start: Instant, verbosity: u8, out: Box<dyn Write + Send>) {
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    if log::set_boxed_logger(Box::new(Logger {
        start,
        out: Mutex::new(out),
    }))
    .is_ok()
    {
        log::set_max_level(level);
    }
}

/// An error and its causes on one line, `outer: cause: root`, for logs and error messages.
/// Some library errors already print their cause; a cause whose text the line already
/// contains is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
