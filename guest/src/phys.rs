//! Access to guest-physical memory through the identity map (CPL3 may touch
//! all of it: every page-table entry has U/S=1).
//!
//! Everything read here was written by the VMM or firmware, so it is treated
//! as untrusted: callers check ranges with [`readable`] first, and multi-byte
//! values are assembled from single bytes (no alignment assumptions).

use crate::arch;

/// Whether `[addr, addr + len)` is non-null, does not wrap and lies inside
/// the identity-mapped range.
pub fn readable(addr: u64, len: u64) -> bool {
    match addr.checked_add(len) {
        Some(end) => addr != 0 && end <= arch::mapped_limit_bytes(),
        None => false,
    }
}

/// Reads one byte of physical memory. Callers must have checked the address
/// with [`readable`]; an unchecked address yields 0 instead of a fault.
pub fn read_u8(addr: u64) -> u8 {
    if !readable(addr, 1) {
        return 0;
    }
    // SAFETY: the address is mapped (checked above) and a volatile byte read
    // of guest RAM or MMIO has no effect on the Rust program's own objects.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Reads a little-endian u16.
pub fn read_u16(addr: u64) -> u16 {
    u16::from(read_u8(addr)) | (u16::from(read_u8(addr.wrapping_add(1))) << 8)
}

/// Reads a little-endian u32.
pub fn read_u32(addr: u64) -> u32 {
    u32::from(read_u16(addr)) | (u32::from(read_u16(addr.wrapping_add(2))) << 16)
}

/// Reads a little-endian u64.
pub fn read_u64(addr: u64) -> u64 {
    u64::from(read_u32(addr)) | (u64::from(read_u32(addr.wrapping_add(4))) << 32)
}

/// Copies `out.len()` bytes starting at `addr`.
pub fn read_bytes(addr: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = read_u8(addr.wrapping_add(i as u64));
    }
}

/// Sum of `len` bytes at `addr`, modulo 256 (ACPI checksums).
pub fn checksum(addr: u64, len: u64) -> u8 {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(read_u8(addr.wrapping_add(i)));
    }
    sum
}

/// 32-bit MMIO read (naturally aligned, single access).
pub fn mmio_read32(addr: u64) -> u32 {
    if !readable(addr, 4) || !addr.is_multiple_of(4) {
        return 0xffff_ffff;
    }
    // SAFETY: mapped, aligned device register outside the Rust program's memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// 32-bit MMIO write (naturally aligned, single access).
pub fn mmio_write32(addr: u64, value: u32) {
    if !readable(addr, 4) || !addr.is_multiple_of(4) {
        return;
    }
    // SAFETY: callers pass device registers (LAPIC), never the guest image.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// 8-bit MMIO write.
pub fn mmio_write8(addr: u64, value: u8) {
    if !readable(addr, 1) {
        return;
    }
    // SAFETY: callers pass device registers (ACPI sleep control), never the
    // guest image.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// 8-bit MMIO read (single access); 0xff if the address is not mapped.
pub fn mmio_read8(addr: u64) -> u8 {
    if !readable(addr, 1) {
        return 0xff;
    }
    // SAFETY: mapped device register outside the Rust program's memory.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// 16-bit MMIO read (naturally aligned, single access).
pub fn mmio_read16(addr: u64) -> u16 {
    if !readable(addr, 2) || !addr.is_multiple_of(2) {
        return 0xffff;
    }
    // SAFETY: mapped, aligned device register outside the Rust program's memory.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// 16-bit MMIO write (naturally aligned, single access).
pub fn mmio_write16(addr: u64, value: u16) {
    if !readable(addr, 2) || !addr.is_multiple_of(2) {
        return;
    }
    // SAFETY: callers pass device registers (PCI configuration space, BARs),
    // never the guest image.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// One MMIO read of `width` bytes (1, 2, 4 or 8) at any alignment, as a single instruction:
/// for the hostile checks, which make accesses a well-behaved driver never makes. All ones if
/// the address is not mapped or the width is not one of those.
pub fn mmio_read_any(addr: u64, width: u8) -> u64 {
    if !readable(addr, u64::from(width)) {
        return u64::MAX;
    }
    let p = addr as *const u8;
    // SAFETY: mapped (checked above); callers pass device registers (BARs, ECAM), never the
    // guest's own memory, so the read has no effect on Rust objects. A plain `mov` has no
    // alignment requirement on x86.
    unsafe {
        match width {
            1 => {
                let v: u8;
                core::arch::asm!("mov {v}, byte ptr [{p}]", p = in(reg) p, v = out(reg_byte) v, options(nostack, preserves_flags));
                u64::from(v)
            }
            2 => {
                let v: u16;
                core::arch::asm!("mov {v:x}, word ptr [{p}]", p = in(reg) p, v = out(reg) v, options(nostack, preserves_flags));
                u64::from(v)
            }
            4 => {
                let v: u32;
                core::arch::asm!("mov {v:e}, dword ptr [{p}]", p = in(reg) p, v = out(reg) v, options(nostack, preserves_flags));
                u64::from(v)
            }
            8 => {
                let v: u64;
                core::arch::asm!("mov {v}, qword ptr [{p}]", p = in(reg) p, v = out(reg) v, options(nostack, preserves_flags));
                v
            }
            _ => u64::MAX,
        }
    }
}

/// One MMIO write of the low `width` bytes (1, 2, 4 or 8) of `value` at any alignment, as a
/// single instruction (see [`mmio_read_any`]). Nothing happens for an unmapped address or
/// another width.
pub fn mmio_write_any(addr: u64, width: u8, value: u64) {
    if !readable(addr, u64::from(width)) {
        return;
    }
    let p = addr as *mut u8;
    // SAFETY: as for `mmio_read_any`: callers pass device registers, never the guest image.
    unsafe {
        match width {
            1 => {
                core::arch::asm!("mov byte ptr [{p}], {v}", p = in(reg) p, v = in(reg_byte) value as u8, options(nostack, preserves_flags))
            }
            2 => {
                core::arch::asm!("mov word ptr [{p}], {v:x}", p = in(reg) p, v = in(reg) value as u16, options(nostack, preserves_flags))
            }
            4 => {
                core::arch::asm!("mov dword ptr [{p}], {v:e}", p = in(reg) p, v = in(reg) value as u32, options(nostack, preserves_flags))
            }
            8 => {
                core::arch::asm!("mov qword ptr [{p}], {v}", p = in(reg) p, v = in(reg) value, options(nostack, preserves_flags))
            }
            _ => {}
        }
    }
}
