//! COM1 (16550 at 0x3f8), polled, 115200 8N1, UART interrupts off.
//!
//! Lines are written whole under a spin lock so that output from different
//! CPUs does not interleave mid-line.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{inb, outb, pause};

const COM1: u16 = 0x3f8;
const LSR_THRE: u8 = 0x20;
/// Bound on THRE polling so a missing UART cannot hang the guest.
const THRE_SPINS: u32 = 1_000_000;
/// Bound on waiting for the line lock (e.g. a CPU faulted while holding it).
const LOCK_SPINS: u32 = 50_000_000;

static LINE_LOCK: AtomicBool = AtomicBool::new(false);

/// Programs the UART: divisor 1 (115200 baud), 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 0x01); // DLL
    outb(COM1 + 1, 0x00); // DLM
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 2, 0xc7); // FCR: enable and clear FIFOs
    outb(COM1 + 4, 0x03); // MCR: DTR | RTS (OUT2 off: no IRQ)
                          // Firmware may have left a partial line (SeaBIOS does): start afresh.
    put_byte(b'\n');
}

fn put_byte(b: u8) {
    let mut spins = 0;
    while inb(COM1 + 5) & LSR_THRE == 0 && spins < THRE_SPINS {
        pause();
        spins += 1;
    }
    outb(COM1, b);
}

/// Unlocked writer for COM1.
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            put_byte(b);
        }
        Ok(())
    }
}

/// Writes one line (the formatted text plus '\n') atomically with respect to
/// other CPUs' lines.
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut spins = 0;
    while LINE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins > LOCK_SPINS {
            break; // print anyway rather than lose the line
        }
        pause();
    }
    // Serial::write_str never fails.
    let _ = Serial.write_fmt(args);
    put_byte(b'\n');
    LINE_LOCK.store(false, Ordering::Release);
}

/// Prints one line to COM1, like `println!`.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}
