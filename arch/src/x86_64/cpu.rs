//! vCPU boot state: registers for the PVH entry, the boot GDT, MSRs, FPU and LAPIC pins.

use hypervisor::{
    DescriptorTable, FpuState, LapicState, MsrEntry, Segment, SpecialRegisters, StandardRegisters,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{BOOT_GDT_START, PVH_INFO_START};

/// GDT index of the flat 32-bit code segment used for the PVH entry.
const GDT_CODE32: u16 = 1;
/// GDT index of the flat data segment.
const GDT_DATA: u16 = 2;
/// GDT index of the 32-bit TSS the PVH ABI asks for.
const GDT_TSS: u16 = 3;
/// GDT index of a flat 64-bit code segment (for the 64-bit Linux boot protocol).
const GDT_CODE64: u16 = 4;

/// The boot GDT: null, code32, data, TSS, code64.
const BOOT_GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff, // base 0, limit 4 GiB, 32-bit, execute/read, accessed
    0x00cf_9300_0000_ffff, // base 0, limit 4 GiB, read/write, accessed
    0x0000_8b00_0000_0067, // base 0, limit 0x67, 32-bit TSS (busy)
    0x00af_9b00_0000_ffff, // base 0, limit 4 GiB, 64-bit, execute/read, accessed
];

/// Errors setting up the boot CPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// The boot GDT could not be written into guest memory.
    #[error("cannot write the boot GDT at {addr:#x}")]
    WriteGdt {
        /// Guest address.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes the boot GDT into guest memory; the segment caches loaded by
/// [`pvh_boot_sregs`] and [`long_mode_sregs`] describe its entries.
pub fn write_boot_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<(), CpuSetupError> {
    for (i, desc) in (0u64..).zip(BOOT_GDT) {
        let addr = BOOT_GDT_START + i * 8;
        mem.write_obj(desc, GuestAddress(addr))
            .map_err(|source| CpuSetupError::WriteGdt { addr, source })?;
    }
    Ok(())
}

/// Decodes GDT entry `index` into a loaded segment register.
fn segment(index: u16) -> Segment {
    let d = BOOT_GDT[usize::from(index)];
    let limit_raw = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = (d >> 55) & 1 == 1;
    Segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if g {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: index * 8,
        type_: ((d >> 40) & 0xf) as u8,
        present: (d >> 47) & 1 == 1,
        dpl: ((d >> 45) & 3) as u8,
        db: (d >> 54) & 1 == 1,
        s: (d >> 44) & 1 == 1,
        l: (d >> 53) & 1 == 1,
        g,
        avl: (d >> 52) & 1 == 1,
        unusable: false,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn gdtr() -> DescriptorTable {
    DescriptorTable {
        base: BOOT_GDT_START,
        limit: (BOOT_GDT.len() * 8 - 1) as u16,
    }
}

/// Flat segments from the boot GDT with code segment `code`, plus the given control registers.
fn flat_sregs(
    current: &SpecialRegisters,
    code: u16,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
) -> SpecialRegisters {
    let data = segment(GDT_DATA);
    SpecialRegisters {
        cs: segment(code),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment(GDT_TSS),
        gdt: gdtr(),
        idt: DescriptorTable::default(),
        cr0,
        cr3,
        cr4,
        efer,
        ..*current
    }
}

/// Segment and control registers of the PVH entry state: 32-bit protected mode, paging off,
/// flat CS/DS/ES/SS, a 32-bit TSS, CR4 = 0.
pub fn pvh_boot_sregs(current: &SpecialRegisters) -> SpecialRegisters {
    flat_sregs(current, GDT_CODE32, CR0_PE | CR0_ET, 0, 0, 0)
}

/// General purpose registers of the PVH entry: EIP at the entry, EBX at the start info.
pub fn pvh_boot_regs(entry: u64) -> StandardRegisters {
    StandardRegisters {
        rip: entry,
        rbx: PVH_INFO_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Segment and control registers for 64-bit mode with paging rooted at `pml4`.
pub fn long_mode_sregs(current: &SpecialRegisters, pml4: u64) -> SpecialRegisters {
    flat_sregs(
        current,
        GDT_CODE64,
        CR0_PE | CR0_ET | CR0_PG,
        pml4,
        CR4_PAE,
        EFER_LME | EFER_LMA,
    )
}

/// The x87/SSE state at reset: default control word and MXCSR.
pub fn boot_fpu() -> FpuState {
    FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSR values every vCPU starts with: system-call MSRs cleared, fast strings on, and MTRRs
/// enabled with write-back as the default type (there is no firmware to program them).
pub fn boot_msrs() -> Vec<MsrEntry> {
    let zero = [
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_CSTAR,
        MSR_KERNEL_GS_BASE,
        MSR_SYSCALL_MASK,
        MSR_LSTAR,
        MSR_IA32_TSC,
    ];
    let mut msrs: Vec<MsrEntry> = zero
        .iter()
        .map(|&index| MsrEntry { index, data: 0 })
        .collect();
    msrs.push(MsrEntry {
        index: MSR_IA32_MISC_ENABLE,
        data: 1,
    });
    msrs.push(MsrEntry {
        index: MSR_MTRR_DEF_TYPE,
        data: (1 << 11) | 6,
    });
    msrs
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;
const APIC_MODE_EXTINT: u32 = 0x700;

/// Wires the local APIC pins as a PC does: LINT0 takes ExtINT (the 8259), LINT1 takes NMI.
pub fn set_lint_pins(lapic: &mut LapicState) {
    for (reg, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let v = lapic.read(reg);
        lapic.write(reg, (v & !APIC_DELIVERY_MODE_MASK & !(1 << 16)) | mode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_the_gdt() {
        let cs = segment(GDT_CODE32);
        assert_eq!(
            (cs.base, cs.limit, cs.selector, cs.type_),
            (0, 0xffff_ffff, 8, 0xb)
        );
        assert!(cs.present && cs.db && cs.s && cs.g && !cs.l);
        let cs64 = segment(GDT_CODE64);
        assert!(cs64.l && !cs64.db);
        let tr = segment(GDT_TSS);
        assert_eq!((tr.limit, tr.type_, tr.s), (0x67, 0xb, false));
    }

    #[test]
    fn pvh_state_matches_the_abi() {
        let s = pvh_boot_sregs(&SpecialRegisters::default());
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(s.cr4, 0);
        let r = pvh_boot_regs(0x10_0000);
        assert_eq!(
            (r.rip, r.rbx, r.rflags & (1 << 9)),
            (0x10_0000, PVH_INFO_START, 0)
        );
    }

    #[test]
    fn lint_pins() {
        let mut l = LapicState::default();
        l.write(APIC_LVT_LINT0, 1 << 16);
        set_lint_pins(&mut l);
        assert_eq!(l.read(APIC_LVT_LINT0), APIC_MODE_EXTINT);
        assert_eq!(l.read(APIC_LVT_LINT1), APIC_MODE_NMI);
    }
}
