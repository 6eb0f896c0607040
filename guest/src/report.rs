//! The output protocol: `TEST <name> PASS|FAIL <detail>`, `INFO ...` lines,
//! `FAULT ...` lines and the final `TESTS DONE pass=N fail=M`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::println;

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

/// Records and prints the outcome of one check.
pub fn check(name: &str, ok: bool, detail: fmt::Arguments<'_>) {
    if ok {
        PASSED.fetch_add(1, Ordering::SeqCst);
    } else {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    println!(
        "TEST {} {} {}",
        name,
        if ok { "PASS" } else { "FAIL" },
        detail
    );
}

/// Counts a failure that has no check line of its own (faults, panics).
pub fn count_failure() {
    FAILED.fetch_add(1, Ordering::SeqCst);
}

/// Prints `TESTS DONE pass=N fail=M`.
pub fn print_done() {
    println!(
        "TESTS DONE pass={} fail={}",
        PASSED.load(Ordering::SeqCst),
        FAILED.load(Ordering::SeqCst)
    );
}

/// A fixed-capacity string for building details; text beyond the capacity
/// is dropped and `...` marks the truncation.
pub struct StrBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> StrBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            truncated: false,
        }
    }

    /// The text so far (only whole UTF-8 characters are ever stored).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf-8>")
    }

    /// Whether anything has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> Write for StrBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let enc = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + enc.len() > N.saturating_sub(3) {
                if !self.truncated {
                    self.truncated = true;
                    for &b in b"..." {
                        if self.len < N {
                            self.buf[self.len] = b;
                            self.len += 1;
                        }
                    }
                }
                return Ok(());
            }
            self.buf[self.len..self.len + enc.len()].copy_from_slice(enc);
            self.len += enc.len();
        }
        Ok(())
    }
}

impl<const N: usize> fmt::Display for StrBuf<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Displays bytes as ASCII, escaping anything unprintable as `\xNN`.
pub struct Ascii<'a>(pub &'a [u8]);

impl fmt::Display for Ascii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) && b != b'\\' && b != b'"' {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}
