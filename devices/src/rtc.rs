//! MC146818-compatible CMOS real-time clock at ports 0x70 (index) and 0x71 (data).
//!
//! Time registers read the host's UTC clock plus an offset that guest writes adjust, so a guest
//! that sets the clock keeps its setting while the host clock runs on. Status B starts as
//! BCD, 24-hour (what PC firmware leaves behind); a guest may switch to binary or 12-hour.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const STATUS_B_24H: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
/// Status A: 32.768 kHz time base, 1024 Hz periodic rate; UIP never set (reads are atomic).
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status D: valid RAM and time (battery good).
const STATUS_D_VRT: u8 = 0x80;

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: i64,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl DateTime {
    /// Breaks down seconds since the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let rem = secs.rem_euclid(86_400) as u32;
        Self {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
        }
    }

    /// Seconds since the Unix epoch.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
    }

    /// Day of the week, 1 = Sunday (CMOS convention).
    fn weekday(&self) -> u32 {
        // 1970-01-01 was a Thursday (5 in this numbering).
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u32 + 1
    }
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The CMOS RTC and its NVRAM.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    nvram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: fn() -> i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Rtc {
    /// An RTC reading time from `clock` (seconds since the epoch); tests pass a fixed clock.
    pub fn with_clock(clock: fn() -> i64) -> Self {
        let mut nvram = [0u8; 128];
        nvram[usize::from(REG_STATUS_A)] = STATUS_A_DEFAULT;
        nvram[usize::from(REG_STATUS_B)] = STATUS_B_24H;
        nvram[usize::from(REG_STATUS_D)] = STATUS_D_VRT;
        Self {
            index: 0,
            nvram,
            offset: 0,
            clock,
        }
    }

    fn status_b(&self) -> u8 {
        self.nvram[usize::from(REG_STATUS_B)]
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.status_b() & STATUS_B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.status_b() & STATUS_B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn now(&self) -> DateTime {
        DateTime::from_unix((self.clock)().saturating_add(self.offset))
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.status_b() & STATUS_B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.status_b() & STATUS_B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let t = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday()),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year.rem_euclid(100)) as u32),
            REG_CENTURY => self.encode((t.year.div_euclid(100)) as u32),
            REG_STATUS_C => std::mem::take(&mut self.nvram[usize::from(REG_STATUS_C)]),
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }

    fn write_register(&mut self, reg: u8, v: u8) {
        let mut t = self.now();
        let field = match reg {
            REG_SECONDS => &mut t.second,
            REG_MINUTES => &mut t.minute,
            REG_HOURS => &mut t.hour,
            REG_DAY => &mut t.day,
            REG_MONTH => &mut t.month,
            REG_YEAR | REG_CENTURY => {
                let value = i64::from(self.decode(v));
                t.year = if reg == REG_YEAR {
                    t.year.div_euclid(100) * 100 + value
                } else {
                    value * 100 + t.year.rem_euclid(100)
                };
                return self.set_time(t);
            }
            REG_STATUS_C | REG_STATUS_D => return, // read-only
            REG_STATUS_B => {
                // SET freezes updates in hardware; reads here are computed, so only keep the bit.
                self.nvram[usize::from(REG_STATUS_B)] = v;
                return;
            }
            REG_WEEKDAY => return, // derived from the date
            r => {
                self.nvram[usize::from(r & 0x7f)] = v;
                return;
            }
        };
        *field = if reg == REG_HOURS {
            self.decode_hour(v)
        } else {
            self.decode(v)
        };
        self.set_time(t);
    }

    fn set_time(&mut self, t: DateTime) {
        let valid = (1..=12).contains(&t.month)
            && (1..=31).contains(&t.day)
            && t.hour < 24
            && t.minute < 60
            && t.second < 60;
        if valid {
            self.offset = t.to_unix() - (self.clock)();
        } else {
            log::debug!("rtc: ignoring invalid time {t:?}");
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            1 => {
                let reg = self.index;
                self.read_register(reg)
            }
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = v & 0x7f,
            1 => {
                let reg = self.index;
                self.write_register(reg, v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-21 07:42:32 UTC, a Saturday.
    const T: i64 = 1_795_246_952;

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]);
        let mut b = [0];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_conversions_round_trip() {
        let t = DateTime::from_unix(T);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2026, 11, 21, 7, 42, 32)
        );
        assert_eq!(t.to_unix(), T);
        assert_eq!(t.weekday(), 7);
        for s in [0, 951_782_400 /* 2000-02-29 */, 4_107_542_400, -86_400] {
            assert_eq!(DateTime::from_unix(s).to_unix(), s);
        }
        assert_eq!(DateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn reads_bcd_time_by_default() {
        let mut rtc = Rtc::with_clock(|| T);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x32);
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x42);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x07);
        assert_eq!(read(&mut rtc, REG_DAY), 0x21);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x11);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x26);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(read(&mut rtc, REG_WEEKDAY), 0x07);
        assert_eq!(read(&mut rtc, REG_STATUS_A) & 0x80, 0, "UIP never set");
        assert_eq!(read(&mut rtc, REG_STATUS_D), STATUS_D_VRT);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::with_clock(|| T + 12 * 3600); // 19:42:32
        rtc.write(0, &[REG_STATUS_B]);
        rtc.write(1, &[STATUS_B_BINARY]);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x80 | 7);
        assert_eq!(read(&mut rtc, REG_MINUTES), 42);
    }

    #[test]
    fn guest_writes_move_the_clock() {
        let mut rtc = Rtc::with_clock(|| T);
        rtc.write(0, &[REG_YEAR]);
        rtc.write(1, &[0x30]);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x30);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        // Garbage (month 0x13) is ignored rather than wrapping the clock.
        rtc.write(0, &[REG_MONTH]);
        rtc.write(1, &[0x13]);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x11);
        // NVRAM bytes are plain storage.
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
    }
}
