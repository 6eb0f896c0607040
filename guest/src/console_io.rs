//! Console input and the debug console.
//!
//! `debugcon=TEXT` writes `TEXT\n` to the debug console's port (`debugcon.port=0xN`, default
//! 0xe9) from CPL3 (the TSS's I/O bitmap allows every port); the host checks where it landed.
//!
//! `serial.input=WORD` prints `INFO serial.input.ready`, then reads COM1's receive buffer
//! (polled, LSR bit 0) until a carriage return or newline or `serial.input.wait` seconds
//! (default 30) and checks that the line is WORD; the line read is printed back as
//! `INFO serial.echo "..."`.

use crate::arch::{inb, outb, pause};
use crate::expect;
use crate::println;
use crate::report::{check, Ascii};
use crate::stage2::check_named;
use crate::time::Deadline;

const COM1: u16 = 0x3f8;
const LSR_DR: u8 = 0x01;
/// Longest input line kept.
pub const MAX_LINE: usize = 128;

/// Seconds to wait for input: `<key>.wait`, else 30.
pub fn wait_secs(text: &str, key: &str) -> u64 {
    let mut buf = [0u8; 48];
    let wait_key = join(&mut buf, key, ".wait");
    expect::value(text, wait_key)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| (1..=600).contains(s))
        .unwrap_or(30)
}

fn join<'a>(buf: &'a mut [u8; 48], a: &str, b: &str) -> &'a str {
    let n = (a.len() + b.len()).min(buf.len());
    let (left, right) = buf.split_at_mut(a.len().min(n));
    left.copy_from_slice(&a.as_bytes()[..left.len()]);
    let rest = n - left.len();
    right[..rest].copy_from_slice(&b.as_bytes()[..rest]);
    core::str::from_utf8(&buf[..n]).unwrap_or("")
}

/// A line of input collected byte by byte.
pub struct Line {
    bytes: [u8; MAX_LINE],
    len: usize,
    /// A terminator (CR or LF) was seen.
    pub done: bool,
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            bytes: [0; MAX_LINE],
            len: 0,
            done: false,
        }
    }

    /// Takes one byte; returns true once the line is complete.
    pub fn push(&mut self, b: u8) -> bool {
        if self.done {
            return true;
        }
        if b == b'\r' || b == b'\n' {
            // A terminator before any text (the CR of a CR LF pair sent earlier) is skipped.
            self.done = self.len > 0;
        } else if self.len < MAX_LINE {
            self.bytes[self.len] = b;
            self.len += 1;
        }
        self.done
    }

    /// The text so far.
    pub fn text(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Prints the outcome: `TEST <name>.input PASS|FAIL got "..." (expected "...")`.
    pub fn report(&self, name: &str, expected: &str, secs: u64) {
        let ok = self.done && self.text() == expected.as_bytes();
        check_named(
            name,
            "input",
            ok,
            format_args!(
                "got \"{}\"{} (expected \"{}\")",
                Ascii(self.text()),
                if self.done { "" } else { " and no end of line" },
                Ascii(expected.as_bytes())
            ),
        );
        if !self.done {
            println!("INFO {name}.input: gave up after {secs} s");
        }
    }
}

/// The debug console and serial input checks the command line asks for.
pub fn run(text: &str) {
    if let Some(message) = expect::value(text, "debugcon") {
        let port = expect::value(text, "debugcon.port")
            .and_then(|p| p.strip_prefix("0x"))
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0xe9);
        for b in message.bytes().chain(core::iter::once(b'\n')) {
            outb(port, b);
        }
        check(
            "debugcon.write",
            true,
            format_args!(
                "\"{}\\n\" written to port {port:#x}",
                Ascii(message.as_bytes())
            ),
        );
    }
    if let Some(expected) = expect::value(text, "serial.input") {
        let secs = wait_secs(text, "serial.input");
        // Whatever arrived before the guest was ready is not the answer.
        while inb(COM1 + 5) & LSR_DR != 0 {
            inb(COM1);
        }
        println!("INFO serial.input.ready");
        let deadline = Deadline::after_us(secs * 1_000_000);
        let mut line = Line::new();
        while !line.done && !deadline.passed() {
            if inb(COM1 + 5) & LSR_DR != 0 {
                line.push(inb(COM1));
            } else {
                pause();
            }
        }
        println!("INFO serial.echo \"{}\"", Ascii(line.text()));
        line.report("serial", expected, secs);
    }
}
