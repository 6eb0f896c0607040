//! `smp`: start every enabled AP from the MADT with INIT-SIPI-SIPI through
//! the xAPIC ICR (MMIO at CPL3), the way firmware does on real hardware.
//!
//! Each AP runs the real-mode trampoline from `boot.s` (copied to a free page
//! below 1 MiB), switches to long mode, loads its own TSS and drops to CPL3
//! in `rust_ap_main`, which records its APIC ID and parks the CPU in a CPL0
//! `cli; hlt` loop.
//!
//! APIC IDs come from the local APIC ID register, not CPUID: on PVM hosts
//! CPUID at CPL3 may run natively and report the host core's APIC ID.

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::acpi::Madt;
use crate::arch::{self, MAX_CPUS};
use crate::expect::Expectations;
use crate::regions::Regions;
use crate::report::{check, StrBuf};
use crate::startinfo::{StartInfo, E820_RAM};
use crate::time::{self, Deadline};
use crate::{phys, println};

const PAGE: u64 = 4096;
/// Trampoline pages are searched in [LOW, HIGH): above the real-mode IVT and
/// BIOS data, below the usual EBDA position.
const TRAMPOLINE_LOW: u64 = 0x1000;
const TRAMPOLINE_HIGH: u64 = 0x9f000;
const TRAMPOLINE_PREFERRED: u64 = 0x8000;

const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;

/// Number of APs that have reported in.
static AP_COUNT: AtomicU32 = AtomicU32::new(0);
/// Per CPU index: bit 63 set once reported, low bits the APIC ID.
static AP_IDS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
const REPORTED: u64 = 1 << 63;
/// Local APIC MMIO base, published for the APs before they are started.
static LAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
/// The last AP to report: [`REPORTED`] | its APIC ID (CPU hotplug waits for it).
static LAST_AP: AtomicU64 = AtomicU64::new(0);

/// APIC ID of the calling CPU from its local APIC ID register (xAPIC).
fn lapic_id() -> u32 {
    phys::mmio_read32(LAPIC_BASE.load(Ordering::SeqCst) + LAPIC_ID) >> 24
}

/// CPL3 entry point of every AP (called from `user_start_ap` in boot.s with
/// the CPU index the AP drew).
#[no_mangle]
pub extern "C" fn rust_ap_main(index: u64) -> ! {
    let id = lapic_id();
    if let Some(slot) = usize::try_from(index).ok().and_then(|i| AP_IDS.get(i)) {
        slot.store(REPORTED | u64::from(id), Ordering::SeqCst);
    }
    LAST_AP.store(REPORTED | u64::from(id), Ordering::SeqCst);
    AP_COUNT.fetch_add(1, Ordering::SeqCst);
    arch::park()
}

/// APs that have reported in so far (each start of an AP counts).
pub fn reported() -> u32 {
    AP_COUNT.load(Ordering::SeqCst)
}

/// The APIC ID of the last AP to report, if one has.
pub fn last_reported() -> Option<u32> {
    let v = LAST_AP.load(Ordering::SeqCst);
    (v & REPORTED != 0).then_some((v & 0xffff_ffff) as u32)
}

/// Copies the AP trampoline to a free RAM page below 1 MiB (outside `avoid`), publishes the
/// local APIC base `lapic` for the APs and software-enables the BSP's local APIC. Returns the
/// page and the SIPI vector that starts an AP there.
pub fn prepare_trampoline(si: &StartInfo, avoid: &Regions, lapic: u64) -> Option<(u64, u32)> {
    LAPIC_BASE.store(lapic, Ordering::SeqCst);
    let page = pick_trampoline_page(si, avoid)?;
    let (t_start, t_end) = arch::trampoline_range();
    let len = t_end - t_start;
    // SAFETY: `page` is RAM below 1 MiB outside every boot structure and the
    // image (checked by pick_trampoline_page); the trampoline is < 1 page.
    unsafe { core::ptr::copy_nonoverlapping(t_start as *const u8, page as *mut u8, len as usize) };
    // Software-enable the local APIC (firmware-less VMMs leave it disabled).
    let svr = phys::mmio_read32(lapic + LAPIC_SVR);
    phys::mmio_write32(lapic + LAPIC_SVR, svr | 0x1ff);
    Some((page, u32::try_from(page >> 12).unwrap_or(0)))
}

/// Starts the APs `ids` with INIT, 10 ms, then two STARTUP IPIs to the trampoline at `vector`
/// (see [`prepare_trampoline`]). Whether the ICR took every IPI.
pub fn start_aps(base: u64, ids: impl Iterator<Item = u32> + Clone, vector: u32) -> bool {
    let mut ipi_ok = true;
    for id in ids.clone() {
        ipi_ok &= send_ipi(base, id, ICR_INIT_ASSERT);
    }
    time::delay_us(10_000);
    for _ in 0..2 {
        for id in ids.clone() {
            ipi_ok &= send_ipi(base, id, ICR_STARTUP | vector);
        }
        time::delay_us(200);
    }
    ipi_ok
}

/// Sends INIT to the AP `apic_id`: it stops whatever it ran and waits for a STARTUP IPI.
/// Whether the ICR took it.
pub fn init_ap(base: u64, apic_id: u32) -> bool {
    send_ipi(base, apic_id, ICR_INIT_ASSERT)
}

fn pick_trampoline_page(si: &StartInfo, avoid: &Regions) -> Option<u64> {
    let usable = |p: u64| {
        si.memmap()
            .any(|e| e.kind == E820_RAM && e.addr <= p && p + PAGE <= e.end())
            && avoid.overlapping(p, p + PAGE).is_none()
    };
    let mut p = TRAMPOLINE_PREFERRED;
    while p < TRAMPOLINE_HIGH {
        if usable(p) {
            return Some(p);
        }
        p += PAGE;
    }
    p = TRAMPOLINE_LOW;
    while p < TRAMPOLINE_PREFERRED {
        if usable(p) {
            return Some(p);
        }
        p += PAGE;
    }
    None
}

fn wait_icr_idle(base: u64) -> bool {
    let d = Deadline::after_us(100_000);
    while phys::mmio_read32(base + LAPIC_ICR_LO) & ICR_PENDING != 0 {
        if d.passed() {
            return false;
        }
        arch::pause();
    }
    true
}

fn send_ipi(base: u64, apic_id: u32, icr_lo: u32) -> bool {
    if !wait_icr_idle(base) {
        return false;
    }
    phys::mmio_write32(base + LAPIC_ICR_HI, apic_id << 24);
    phys::mmio_write32(base + LAPIC_ICR_LO, icr_lo);
    wait_icr_idle(base)
}

/// The `smp` check.
pub fn check_smp(si: &StartInfo, madt: Option<&Madt>, expect: &Expectations, avoid: &Regions) {
    let Some(madt) = madt else {
        check("smp", false, format_args!("no MADT"));
        return;
    };
    let bsp = phys::mmio_read32(madt.lapic_base + LAPIC_ID) >> 24;
    println!(
        "INFO smp bsp lapic_id={bsp} cpuid_initial_apic_id={} (CPUID may be the host's)",
        arch::cpuid_apic_id()
    );
    let aps = madt.cpus[..madt.ncpus]
        .iter()
        .copied()
        .filter(|&id| id != bsp);
    let n_aps = aps.clone().count();
    let mut detail: StrBuf<400> = StrBuf::new();
    let mut ok = true;
    let _ = write!(
        detail,
        "madt_cpus={} bsp_apic_id={bsp}",
        madt.ncpus + madt.extra_cpus
    );
    match expect.cpus.get() {
        Ok(n) => {
            let _ = write!(detail, " expect.cpus={n}");
            ok &= usize::try_from(n).is_ok_and(|n| n == madt.ncpus + madt.extra_cpus);
        }
        Err(why) => {
            ok = false;
            let _ = write!(detail, " {why}");
        }
    }
    if madt.extra_cpus > 0 {
        ok = false;
        let _ = write!(detail, " more than {MAX_CPUS} CPUs");
    }
    if !madt.cpus[..madt.ncpus].contains(&bsp) {
        ok = false;
        let _ = write!(detail, " BSP not in MADT");
    }
    if n_aps == 0 {
        check("smp", ok, format_args!("{detail} aps=0"));
        return;
    }
    if let Some(big) = aps.clone().find(|&id| id > 0xfe) {
        check(
            "smp",
            false,
            format_args!("{detail} APIC ID {big} not reachable through the xAPIC"),
        );
        return;
    }
    let base = madt.lapic_base;
    let Some((page, vector)) = prepare_trampoline(si, avoid, base) else {
        check(
            "smp",
            false,
            format_args!("{detail} no free RAM page below 1 MiB for the AP trampoline"),
        );
        return;
    };
    let (t_start, t_end) = arch::trampoline_range();
    let len = t_end - t_start;
    println!("INFO smp trampoline page={page:#x} len={len} vector={vector:#x} lapic={base:#x}");

    let t0 = arch::rdtsc();
    let ipi_ok = start_aps(base, aps.clone(), vector);
    let target = u32::try_from(n_aps).unwrap_or(u32::MAX);
    let d = Deadline::after_us(5_000_000);
    while AP_COUNT.load(Ordering::SeqCst) < target && !d.passed() {
        arch::pause();
    }
    let waited_ms = time::us_since(t0) / 1000;
    let count = AP_COUNT.load(Ordering::SeqCst);

    // APIC IDs reported, in CPU-index order.
    let mut ids: StrBuf<200> = StrBuf::new();
    let _ = write!(ids, "{bsp}");
    let mut reported = [0u32; MAX_CPUS];
    let mut nrep = 0;
    for slot in AP_IDS.iter().skip(1) {
        let v = slot.load(Ordering::SeqCst);
        if v & REPORTED != 0 && nrep < MAX_CPUS {
            let id = (v & 0xffff_ffff) as u32;
            reported[nrep] = id;
            nrep += 1;
            let _ = write!(ids, ",{id}");
        }
    }
    let _ = write!(
        detail,
        " aps={n_aps} reported={count} apic_ids={ids} time={waited_ms}ms"
    );
    if !ipi_ok {
        ok = false;
        let _ = write!(detail, " ICR stuck pending");
    }
    if count != target {
        ok = false;
        let _ = write!(detail, " missing APs");
    }
    for id in aps {
        if !reported[..nrep].contains(&id) {
            ok = false;
            let _ = write!(detail, " no report from APIC ID {id}");
        }
    }
    check("smp", ok, format_args!("{detail}"));
}
