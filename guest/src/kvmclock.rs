//! kvmclock, KVM's paravirtual clock, for the lifecycle mode: registered for the BSP through
//! MSR_KVM_SYSTEM_TIME_NEW and read at CPL3 with the pvclock algorithm.
//!
//! Why: on PVM hosts `rdtsc` returns the host's TSC and no VMM can hide a pause from it, but
//! a VMM can hold kvmclock across a pause (KVM_GET_CLOCK at pause, KVM_SET_CLOCK at resume),
//! and kvmclock is what Linux guests keep time with.
//!
//! The time-info area (`struct pvclock_vcpu_time_info`, 32 bytes, little-endian):
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | u32 `version`: odd while the hypervisor updates the area |
//! | 4 | u32 pad |
//! | 8 | u64 `tsc_timestamp`: the TSC when `system_time` was taken |
//! | 16 | u64 `system_time`: nanoseconds |
//! | 24 | u32 `tsc_to_system_mul`: 32.32 fixed-point multiplier |
//! | 28 | i8 `tsc_shift`: applied to the TSC delta before the multiplication |
//! | 29 | u8 `flags`: bit 0 TSC stable, bit 1 guest stopped |
//!
//! time = `system_time` + (((TSC − `tsc_timestamp`) shifted left by `tsc_shift`, or right by
//! −`tsc_shift` when negative) × `tsc_to_system_mul`) >> 32, from a copy of the fields taken
//! while `version` was even and the same before and after.

use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::arch;
use crate::time::Deadline;

/// The KVM paravirtual MSR that registers a vCPU's time-info area (bit 0 = enable).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// CPUID 0x4000_0001 EAX bit: MSR_KVM_SYSTEM_TIME_NEW is available.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// pvclock flag: the clock is stable (monotonic, the same TSC base on every vCPU).
pub const PVCLOCK_TSC_STABLE: u8 = 1 << 0;

/// The BSP's time-info area. In the image's `.bss`, which the identity map makes a
/// guest-physical address of memory the guest owns; 64-byte aligned, so it never crosses a
/// page (KVM requires that).
#[repr(C, align(64))]
struct Area([u32; 8]);

static mut AREA: Area = Area([0; 8]);

/// Why kvmclock is not used.
pub enum Absent {
    /// CPUID (at CPL0: the VMM's table) has no KVM signature at 0x4000_0000.
    NoKvm,
    /// KVM without KVM_FEATURE_CLOCKSOURCE2 (the features word is given).
    NoClocksource2(u32),
    /// Registered, but the hypervisor never wrote the area (its address is given).
    NotUpdated(u64),
}

/// A copy of the time-info area taken consistently.
#[derive(Clone, Copy)]
struct Snapshot {
    tsc_timestamp: u64,
    system_time: u64,
    mul: u32,
    shift: i8,
    flags: u8,
}

/// The registered clock.
pub struct KvmClock {
    addr: u64,
}

impl KvmClock {
    /// Looks for kvmclock in the VMM's CPUID leaves and, if it is offered, registers the
    /// area with MSR_KVM_SYSTEM_TIME_NEW and waits (at most 100 ms) for the hypervisor's
    /// first write.
    pub fn register() -> Result<KvmClock, Absent> {
        let sig = arch::cpuid_cpl0(0x4000_0000);
        let kvm = sig[0] >= 0x4000_0001
            && sig[1] == u32::from_le_bytes(*b"KVMK")
            && sig[2] == u32::from_le_bytes(*b"VMKV")
            && sig[3] == u32::from_le_bytes(*b"M\0\0\0");
        if !kvm {
            return Err(Absent::NoKvm);
        }
        let features = arch::cpuid_cpl0(0x4000_0001)[0];
        if features & KVM_FEATURE_CLOCKSOURCE2 == 0 {
            return Err(Absent::NoClocksource2(features));
        }
        let addr = (&raw const AREA) as u64;
        // The image is identity-mapped: the virtual address is the guest-physical one.
        arch::wrmsr_cpl0(MSR_KVM_SYSTEM_TIME_NEW, addr | 1);
        let clock = KvmClock { addr };
        let d = Deadline::after_us(100_000);
        while clock.version() == 0 {
            if d.passed() {
                return Err(Absent::NotUpdated(addr));
            }
            arch::pause();
        }
        Ok(clock)
    }

    /// Guest-physical address of the area.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The pvclock flags (bit 0: TSC stable, bit 1: guest stopped).
    pub fn flags(&self) -> u8 {
        self.snapshot().0.flags
    }

    fn version(&self) -> u32 {
        // SAFETY: AREA is a static of the image; the hypervisor writes it behind the
        // compiler's back, hence the volatile read of an aligned u32.
        unsafe { read_volatile(addr_of!(AREA.0[0])) }
    }

    /// A consistent copy of the area and a TSC reading taken inside the same version window.
    fn snapshot(&self) -> (Snapshot, u64) {
        loop {
            let v1 = self.version();
            compiler_fence(Ordering::SeqCst);
            // SAFETY: aligned volatile reads of the static area (see `version`); x86 keeps
            // loads in order, the fences keep the compiler from moving them.
            let s = unsafe {
                let w = addr_of!(AREA.0);
                Snapshot {
                    tsc_timestamp: read_volatile(w.cast::<u64>().add(1)),
                    system_time: read_volatile(w.cast::<u64>().add(2)),
                    mul: read_volatile(w.cast::<u32>().add(6)),
                    shift: read_volatile(w.cast::<i8>().add(28)),
                    flags: read_volatile(w.cast::<u8>().add(29)),
                }
            };
            let tsc = arch::rdtsc_ordered();
            compiler_fence(Ordering::SeqCst);
            let v2 = self.version();
            if v1 & 1 == 0 && v1 == v2 {
                return (s, tsc);
            }
            arch::pause();
        }
    }

    /// kvmclock now, in nanoseconds, and the area's flags at that moment.
    pub fn now_ns(&self) -> (u64, u8) {
        let (s, tsc) = self.snapshot();
        // The delta is taken as signed: a TSC a little behind `tsc_timestamp` gives a time a
        // little before `system_time`, not one centuries later.
        let delta = tsc.wrapping_sub(s.tsc_timestamp) as i64;
        let scaled = scale(delta.unsigned_abs(), s.mul, s.shift);
        let ns = if delta >= 0 {
            s.system_time.wrapping_add(scaled)
        } else {
            s.system_time.wrapping_sub(scaled)
        };
        (ns, s.flags)
    }
}

/// `(delta << shift or >> -shift) * mul >> 32`, the pvclock scaling.
fn scale(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift < 0 {
        delta >> shift.unsigned_abs().min(63)
    } else {
        delta << shift.unsigned_abs().min(63)
    };
    ((u128::from(d) * u128::from(mul)) >> 32) as u64
}
