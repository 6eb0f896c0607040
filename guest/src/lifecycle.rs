//! Machine lifecycle features the host-side tests drive through the command line:
//! boot-progress (POST) codes on port 0x80, reboots counted in CMOS NVRAM, and `mode=boot`.

use crate::arch::outb;
use crate::expect;
use crate::println;
use crate::rtc::cmos;

/// Boot-progress port; the VMM logs writes with a timestamp.
const POST_PORT: u16 = 0x80;
/// POST code written on entry to the CPL3 Rust code.
pub const POST_ENTERED: u8 = 0x01;
/// POST code written when the checks are done, just before power-off.
pub const POST_DONE: u8 = 0xfe;

/// CMOS NVRAM byte holding how many times this machine has rebooted. CMOS is battery-backed:
/// it survives a reset but not a power cycle.
const CMOS_BOOT_COUNT: u8 = 0x7c;

/// Writes a POST code.
pub fn post(code: u8) {
    outb(POST_PORT, code);
}

fn cmos_write(reg: u8, value: u8) {
    outb(0x70, reg);
    outb(0x71, value);
}

/// `reboot.count=N [reboot.method=cf9|kbd]`: reset the machine N times before running the
/// checks, counting boots in CMOS NVRAM. Prints `INFO boot.count=K` on every boot.
pub fn maybe_reboot(cmdline: &str) {
    let Some(wanted) = expect::value(cmdline, "reboot.count").and_then(expect::parse_u64) else {
        return;
    };
    let count = cmos(CMOS_BOOT_COUNT);
    println!("INFO boot.count={count}");
    if u64::from(count) >= wanted {
        return;
    }
    cmos_write(CMOS_BOOT_COUNT, count.wrapping_add(1));
    let method = expect::value(cmdline, "reboot.method").unwrap_or("cf9");
    println!("INFO rebooting via {method}");
    match method {
        // i8042 command 0xfe pulses the CPU reset line.
        "kbd" => outb(0x64, 0xfe),
        // Reset control register: RST_CPU | SYS_RST.
        _ => outb(0xcf9, 0x06),
    }
    crate::time::delay_us(1_000_000);
    println!("FAULT reset-ignored method={method}");
}
