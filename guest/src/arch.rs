//! CPU-level helpers used at CPL3: port I/O, CPUID, TSC, the service call
//! into CPL0, and the symbols exported by `boot.s`.
//!
//! Port I/O works at CPL3 because every TSS carries an I/O permission bitmap
//! that allows all ports (PVM forces IOPL=0 at CPL3, so the bitmap is what
//! counts).

use core::arch::asm;
use core::sync::atomic::{AtomicU8, Ordering};

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

/// Highest CPU index (BSP = 0) the boot code has stacks and TSSes for.
pub const MAX_CPUS: usize = 64;

extern "C" {
    static start_info_paddr: u64;
    static mapped_limit: u64;
    static fault_info: [u64; 8];
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static __image_start: u8;
    static __image_end: u8;
    static irq_counts: [u64; IRQ_VECTORS + 1];
    static mut lapic_eoi_addr: u64;
    static nmi_count: u64;
    fn svc_park_insn() -> !;
    fn svc_cpuid_insn();
    fn svc_wrmsr_insn();
}

/// First interrupt vector the CPL0 handler counts (MSI-X vectors of the
/// stage-2 virtio checks).
pub const IRQ_VECTOR_BASE: u8 = 0x40;
/// Number of counted vectors: `IRQ_VECTOR_BASE..IRQ_VECTOR_BASE + IRQ_VECTORS`.
pub const IRQ_VECTORS: usize = 64;

/// Next counted vector not handed out yet (see [`alloc_vectors`]).
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(IRQ_VECTOR_BASE);

/// Reserves `n` consecutive counted vectors (MSI-X entries, the IOAPIC pin of the ACPI GED)
/// and returns the first, or `None` when the counted range is used up.
pub fn alloc_vectors(n: u8) -> Option<u8> {
    let limit = usize::from(IRQ_VECTOR_BASE) + IRQ_VECTORS;
    let base = NEXT_VECTOR.load(Ordering::SeqCst);
    if usize::from(base) + usize::from(n) > limit {
        return None;
    }
    NEXT_VECTOR.store(base + n, Ordering::SeqCst);
    Some(base)
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O does not touch memory the Rust program owns; the
    // stage-1 guest drives no DMA-capable devices.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 16-bit word from an I/O port.
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads the time-stamp counter (allowed at CPL3: CR4.TSD is clear).
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter into edx:eax.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes CPUID for `leaf` (sub-leaf 0); returns eax, ebx, ecx, edx.
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Initial APIC ID as CPUID leaf 1 reports it (EBX[31:24]).
///
/// Informational only: on PVM hosts without CPUID faulting (e.g. AMD), CPUID
/// at CPL3 executes natively and reports the *host* core the vCPU thread
/// happens to run on. Use the local APIC ID register for the real ID.
pub fn cpuid_apic_id() -> u32 {
    cpuid(1)[1] >> 24
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Asks CPL0 to halt this CPU forever with interrupts off. Used to park APs
/// and as the last resort when power-off fails: a halted vCPU costs the host
/// nothing, unlike a CPL3 spin loop.
///
/// The request is an #UD raised at the known address `svc_park_insn` (PVM
/// turns `int n` at CPL3 into #UD, so a software-interrupt gate cannot be
/// used); the CPL0 handler recognises the address and halts.
pub fn park() -> ! {
    // SAFETY: svc_park_insn is a `ud2` the CPL0 handler turns into a halt;
    // control never comes back.
    unsafe { svc_park_insn() }
}

/// CPUID `leaf` (sub-leaf 0) executed at CPL0 through a service call; returns eax, ebx,
/// ecx, edx. Use it for the hypervisor's leaves (0x4000_0000..): on a PVM host without
/// CPUID faulting (AMD), CPUID at CPL3 runs natively and reports the *host's* view (a host
/// that is itself a KVM guest says "KVMKVMKVM" whatever the VMM offers), while CPUID at CPL0
/// is emulated and answers from the VMM's CPUID table. A few emulated instructions.
pub fn cpuid_cpl0(leaf: u32) -> [u32; 4] {
    cpuid_count_cpl0(leaf, 0)
}

/// CPUID `leaf`, sub-leaf `sub`, at CPL0 (see [`cpuid_cpl0`]).
pub fn cpuid_count_cpl0(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u64, u32, u32);
    // SAFETY: svc_cpuid_insn is `ud2; ret`; the CPL0 handler recognises the #UD's address,
    // executes CPUID with our eax/ecx, and resumes at the `ret` with eax..edx replaced and
    // every other register kept. rbx (reserved by LLVM) is saved around the call in a
    // scratch register, which then carries CPUID's ebx out. `call` pushes to the stack
    // (no `nostack`).
    unsafe {
        asm!(
            "mov {b}, rbx",
            "call {svc}",
            "xchg {b}, rbx",
            svc = sym svc_cpuid_insn,
            b = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") sub => c,
            out("edx") d,
        );
    }
    [a, b as u32, c, d]
}

/// WRMSR executed at CPL0 through a service call (a few emulated instructions). An MSR the
/// hypervisor refuses raises #GP at CPL0, reported as a `FAULT` like any other fault: write
/// only MSRs whose presence CPUID announced.
pub fn wrmsr_cpl0(msr: u32, value: u64) {
    // SAFETY: svc_wrmsr_insn is `ud2; ret`; the CPL0 handler executes WRMSR with our ecx and
    // edx:eax and resumes at the `ret`, all registers kept. What the MSR does is the
    // caller's business (documented at each call).
    unsafe {
        asm!(
            "call {svc}",
            svc = sym svc_wrmsr_insn,
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
        );
    }
}

/// Reads the time-stamp counter after all earlier loads have completed (`lfence; rdtsc`),
/// as the pvclock algorithm needs.
pub fn rdtsc_ordered() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: lfence orders, rdtsc reads the counter into edx:eax; no memory is written.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Physical address of `hvm_start_info` as passed in %ebx at entry.
pub fn start_info_addr() -> u64 {
    // SAFETY: written once by the CPL0 entry code before CPL3 starts.
    unsafe { core::ptr::read_volatile(&raw const start_info_paddr) }
}

/// Number of bytes identity-mapped from physical address 0.
pub fn mapped_limit_bytes() -> u64 {
    // SAFETY: written at most once by the CPL0 entry code before CPL3 starts.
    unsafe { core::ptr::read_volatile(&raw const mapped_limit) }
}

/// What the CPL0 exception handler recorded: vector, error code, RIP, CS,
/// RFLAGS, RSP, CR2, CPU index.
pub fn fault_record() -> [u64; 8] {
    // SAFETY: written by the CPL0 handler before it enters `rust_fault`.
    unsafe { core::ptr::read_volatile(&raw const fault_info) }
}

/// The real-mode AP trampoline as a byte range `[start, end)` in the image.
pub fn trampoline_range() -> (u64, u64) {
    (
        (&raw const ap_trampoline_start) as u64,
        (&raw const ap_trampoline_end) as u64,
    )
}

/// The loaded guest image, `.bss` included, as `[start, end)`.
pub fn image_range() -> (u64, u64) {
    (
        (&raw const __image_start) as u64,
        (&raw const __image_end) as u64,
    )
}

/// How many interrupts the CPL0 handler has counted on `vector` (0 for a
/// vector outside the counted range).
pub fn irq_count(vector: u8) -> u64 {
    let Some(i) = usize::from(vector).checked_sub(usize::from(IRQ_VECTOR_BASE)) else {
        return 0;
    };
    if i >= IRQ_VECTORS {
        return 0;
    }
    // SAFETY: the counters are plain memory the CPL0 handler increments;
    // an aligned volatile read of one of them is always valid.
    unsafe { core::ptr::read_volatile((&raw const irq_counts).cast::<u64>().add(i)) }
}

/// Number of spurious-vector (0xff) interrupts the CPL0 handler has seen.
pub fn spurious_count() -> u64 {
    // SAFETY: as for `irq_count`; slot IRQ_VECTORS is the spurious counter.
    unsafe { core::ptr::read_volatile((&raw const irq_counts).cast::<u64>().add(IRQ_VECTORS)) }
}

/// Number of NMIs (vector 2) the CPL0 stub has counted since boot.
pub fn nmis() -> u64 {
    // SAFETY: plain memory the CPL0 NMI stub increments; an aligned volatile read is valid.
    unsafe { core::ptr::read_volatile(&raw const nmi_count) }
}

/// Sets the address of the local APIC EOI register the CPL0 interrupt
/// handler writes (LAPIC base + 0xb0).
pub fn set_lapic_eoi(addr: u64) {
    // SAFETY: a plain store the CPL0 handler reads; no interrupt is expected
    // before the stage-2 checks program a vector, which happens afterwards.
    unsafe { core::ptr::write_volatile(&raw mut lapic_eoi_addr, addr) }
}
