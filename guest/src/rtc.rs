//! `rtc`: read the CMOS clock (ports 0x70/0x71) and compare with the host
//! time passed as `expect.now`.

use core::fmt::Write;

use crate::arch::{inb, outb};
use crate::expect::Expectations;
use crate::report::{check, StrBuf};
use crate::time::Deadline;

const REG_A_UIP: u8 = 0x80;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;

pub fn cmos(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Raw {
    sec: u8,
    min: u8,
    hour: u8,
    day: u8,
    mon: u8,
    year: u8,
    century: u8,
}

fn read_raw() -> Raw {
    Raw {
        sec: cmos(0),
        min: cmos(2),
        hour: cmos(4),
        day: cmos(7),
        mon: cmos(8),
        year: cmos(9),
        century: cmos(0x32),
    }
}

fn bcd(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0xf);
    (hi < 10 && lo < 10).then_some(hi * 10 + lo)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Decoded time: (year, month, day, hour, minute, second).
fn decode(raw: Raw, reg_b: u8) -> Option<(i64, u8, u8, u8, u8, u8)> {
    let conv = |v: u8| {
        if reg_b & REG_B_BINARY != 0 {
            Some(v)
        } else {
            bcd(v)
        }
    };
    let pm = reg_b & REG_B_24H == 0 && raw.hour & 0x80 != 0;
    let mut hour = conv(raw.hour & 0x7f)?;
    if reg_b & REG_B_24H == 0 {
        if !(1..=12).contains(&hour) {
            return None;
        }
        hour = (hour % 12) + if pm { 12 } else { 0 };
    }
    let (sec, min, day, mon, year) = (
        conv(raw.sec)?,
        conv(raw.min)?,
        conv(raw.day)?,
        conv(raw.mon)?,
        conv(raw.year)?,
    );
    let century = conv(raw.century)
        .filter(|c| (19..=21).contains(c))
        .unwrap_or(20);
    let valid = sec < 60
        && min < 60
        && hour < 24
        && (1..=31).contains(&day)
        && (1..=12).contains(&mon)
        && year < 100;
    valid.then_some((
        i64::from(century) * 100 + i64::from(year),
        mon,
        day,
        hour,
        min,
        sec,
    ))
}

/// The `rtc` check.
pub fn check_rtc(expect: &Expectations) {
    // Wait for no update in progress, then read until two reads agree.
    let d = Deadline::after_us(1_500_000);
    while cmos(0x0a) & REG_A_UIP != 0 {
        if d.passed() {
            check(
                "rtc",
                false,
                format_args!("update-in-progress never cleared"),
            );
            return;
        }
    }
    let mut raw = read_raw();
    let mut stable = false;
    for _ in 0..10 {
        while cmos(0x0a) & REG_A_UIP != 0 && !d.passed() {}
        let again = read_raw();
        if again == raw {
            stable = true;
            break;
        }
        raw = again;
    }
    let reg_b = cmos(0x0b);
    if !stable {
        check("rtc", false, format_args!("clock readings never agreed"));
        return;
    }
    let Some((y, mo, da, h, mi, s)) = decode(raw, reg_b) else {
        check(
            "rtc",
            false,
            format_args!("invalid clock registers {raw:?} status_b={reg_b:#x}"),
        );
        return;
    };
    let unix = days_from_civil(y, i64::from(mo), i64::from(da)) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(s);
    let mut detail: StrBuf<200> = StrBuf::new();
    let _ = write!(
        detail,
        "rtc={unix} ({y:04}-{mo:02}-{da:02} {h:02}:{mi:02}:{s:02}) status_b={reg_b:#x}"
    );
    let ok = match expect.now.get() {
        Ok(now) => {
            let now = i64::try_from(now).unwrap_or(i64::MAX);
            let _ = write!(detail, " expect.now={now} delta={}", unix - now);
            unix >= now - 5 && unix <= now.saturating_add(120)
        }
        Err(why) => {
            let _ = write!(detail, " {why}");
            false
        }
    };
    check("rtc", ok, format_args!("{detail}"));
}
