//! TSC-based delays. The TSC rate comes from CPUID when the hypervisor or CPU
//! reports it, else from the ACPI PM timer, else a conservative guess (so
//! waits err on the long side). The block benchmark measures it against the
//! CMOS clock instead ([`calibrate_rtc`]): exact enough for rates and the
//! same method under every VMM.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::Fadt;
use crate::arch::{cpuid, inl, pause, rdtsc};
use crate::println;

/// Guess used until (or unless) calibration succeeds: high, so that delays
/// last at least as long as asked on any CPU up to this rate.
const DEFAULT_TSC_KHZ: u64 = 4_000_000;
const PM_TIMER_HZ: u64 = 3_579_545;

static TSC_KHZ: AtomicU64 = AtomicU64::new(DEFAULT_TSC_KHZ);

/// TSC ticks per millisecond currently assumed.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

fn from_cpuid() -> Option<(u64, &'static str)> {
    let hv = cpuid(0x4000_0000);
    if cpuid(1)[2] & (1 << 31) != 0 && hv[0] >= 0x4000_0010 {
        let khz = u64::from(cpuid(0x4000_0010)[0]);
        if khz != 0 {
            return Some((khz, "cpuid-0x40000010"));
        }
    }
    let max = cpuid(0)[0];
    if max >= 0x15 {
        let [den, num, crystal, _] = cpuid(0x15);
        if den != 0 && num != 0 && crystal != 0 {
            return Some((
                u64::from(crystal) * u64::from(num) / u64::from(den) / 1000,
                "cpuid-0x15",
            ));
        }
    }
    None
}

fn from_pm_timer(fadt: &Fadt) -> Option<u64> {
    if fadt.pm_tmr == 0 {
        return None;
    }
    let mask: u32 = if fadt.pm_tmr_32 {
        u32::MAX
    } else {
        0x00ff_ffff
    };
    let read = || inl(fadt.pm_tmr) & mask;
    let target = PM_TIMER_HZ / 50; // 20 ms
    let p0 = read();
    let t0 = rdtsc();
    let mut spins: u64 = 0;
    loop {
        let elapsed = u64::from(read().wrapping_sub(p0) & mask);
        if elapsed >= target {
            let dt = rdtsc().wrapping_sub(t0);
            return Some(dt * PM_TIMER_HZ / elapsed / 1000);
        }
        spins += 1;
        if spins > 10_000_000 {
            return None; // the timer does not tick
        }
    }
}

/// Determines the TSC rate and prints `INFO tsc ...`.
pub fn calibrate(fadt: Option<&Fadt>) {
    let found = from_cpuid().or_else(|| {
        fadt.and_then(from_pm_timer)
            .map(|khz| (khz, "acpi-pm-timer"))
    });
    let (khz, source) = match found {
        Some((khz, src)) if khz >= 100_000 => (khz, src),
        _ => (DEFAULT_TSC_KHZ, "guess"),
    };
    if source == "guess" && cpuid(0)[0] >= 0x16 && cpuid(0x16)[0] != 0 {
        println!("INFO tsc cpuid-0x16 base_mhz={}", cpuid(0x16)[0]);
    }
    TSC_KHZ.store(khz, Ordering::Relaxed);
    println!("INFO tsc khz={khz} source={source}");
}

/// Measures the TSC rate over one second of the CMOS clock: from one change of the seconds
/// register to the next (each edge seen within one register read, two port exits). Takes
/// 1-2 s. Stores the rate for delays and returns it in kHz; `None` if the clock does not
/// tick (within ~3 s by the previous rate).
pub fn calibrate_rtc() -> Option<u64> {
    let d = Deadline::after_us(3_000_000);
    let next_edge = || -> Option<u64> {
        let s = crate::rtc::cmos(0);
        while crate::rtc::cmos(0) == s {
            if d.passed() {
                return None;
            }
        }
        Some(rdtsc())
    };
    let t1 = next_edge()?;
    let t2 = next_edge()?;
    let khz = t2.wrapping_sub(t1) / 1000;
    if khz < 100_000 {
        return None;
    }
    TSC_KHZ.store(khz, Ordering::Relaxed);
    Some(khz)
}

/// A point in the future, in TSC ticks.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Deadline(rdtsc().saturating_add(us.saturating_mul(tsc_khz()) / 1000))
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        rdtsc() >= self.0
    }
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let d = Deadline::after_us(us);
    while !d.passed() {
        pause();
    }
}

/// Microseconds elapsed since TSC value `t0`.
pub fn us_since(t0: u64) -> u64 {
    rdtsc().wrapping_sub(t0).saturating_mul(1000) / tsc_khz().max(1)
}
