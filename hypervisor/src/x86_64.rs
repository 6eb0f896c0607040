//! Vendor-neutral x86_64 vCPU state.

/// General purpose registers, instruction pointer and flags.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Descriptor type: code/data (true) or system (false).
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// GDTR or IDTR.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// x87 and SSE control state (register contents start zeroed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FpuState {
    /// x87 control word.
    pub fcw: u16,
    /// SSE control/status register.
    pub mxcsr: u32,
}

/// One CPUID leaf/subleaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuIdEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Subleaf (ECX input), meaningful when `flags` has [`CpuIdEntry::FLAG_INDEXED`].
    pub index: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

impl CpuIdEntry {
    /// The leaf's output depends on the subleaf in ECX.
    pub const FLAG_INDEXED: u32 = 1;
}

/// One model specific register value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// The local APIC's 1 KiB register page, as the hypervisor exposes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapicState {
    /// Register bytes; register at offset `o` lives at `regs[o..o + 4]`.
    pub regs: [u8; 1024],
}

impl LapicState {
    /// Reads the 32-bit register at `offset`; out-of-page offsets read as 0.
    pub fn read(&self, offset: usize) -> u32 {
        self.regs
            .get(offset..offset + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    /// Writes the 32-bit register at `offset`; out-of-page offsets are ignored.
    pub fn write(&mut self, offset: usize, value: u32) {
        if let Some(b) = self.regs.get_mut(offset..offset + 4) {
            b.copy_from_slice(&value.to_le_bytes());
        }
    }
}

impl Default for LapicState {
    fn default() -> Self {
        Self { regs: [0; 1024] }
    }
}
