//! ACPI CPU hotplug as an OS without an AML interpreter does it, from the lifecycle mode's GED
//! interrupt (event bit 2): for every CPU, select it (CSEL) and read its status (CSTA); an
//! inserted CPU is acknowledged and started with INIT-SIPI-SIPI (the trampoline of `smp`), and
//! reported once it runs guest code; a CPU the host wants removed is acknowledged, stopped with
//! an INIT (it then waits for a STARTUP IPI and runs nothing) and ejected by writing EJECT, as
//! the DSDT's `_EJ0` does. Lines: `INFO cpuhp.online cpu=<i> apic_id=<a>`,
//! `INFO cpuhp.ejected cpu=<i>`; a CPU that does not come up or cannot be stopped is a failed
//! `cpuhp` check.

use crate::acpi::Madt;
use crate::arch::{self, inl, outl, MAX_CPUS};
use crate::regions::Regions;
use crate::report::check;
use crate::startinfo::StartInfo;
use crate::time::Deadline;
use crate::{println, smp};

/// The register block (the DSDT's `\_SB_.CPHP` region): CSEL, CSTA, CCNT.
const PORT: u16 = 0x620;
const CSEL: u16 = PORT;
const CSTA: u16 = PORT + 4;
const CCNT: u16 = PORT + 8;
/// CSTA bits (devices::cpu_hotplug).
const INSERTING: u32 = 1 << 1;
const REMOVING: u32 = 1 << 2;
const EJECT: u32 = 1 << 3;
/// How long an inserted CPU has to report.
const ONLINE_US: u64 = 5_000_000;

/// What starting a hot-added CPU needs: the local APIC, the trampoline, the APIC IDs.
pub struct Cpus {
    lapic: u64,
    vector: u32,
    apic_by_uid: [u32; MAX_CPUS],
}

impl Cpus {
    /// Copies the AP trampoline below 1 MiB (see [`smp::prepare_trampoline`]); `None` (with a
    /// failed `cpuhp` check) without a MADT or a free page.
    pub fn prepare(si: &StartInfo, avoid: &Regions, madt: Option<&Madt>) -> Option<Cpus> {
        let Some(madt) = madt else {
            check("cpuhp", false, format_args!("no MADT"));
            return None;
        };
        let Some((page, vector)) = smp::prepare_trampoline(si, avoid, madt.lapic_base) else {
            check(
                "cpuhp",
                false,
                format_args!("no free RAM page below 1 MiB for the AP trampoline"),
            );
            return None;
        };
        println!("INFO cpuhp trampoline page={page:#x} vector={vector:#x}");
        Some(Cpus {
            lapic: madt.lapic_base,
            vector,
            apic_by_uid: madt.apic_by_uid,
        })
    }

    /// The APIC ID of CPU `cpu` (its processor UID in the MADT).
    fn apic_id(&self, cpu: u32) -> Option<u32> {
        let id = *self.apic_by_uid.get(usize::try_from(cpu).ok()?)?;
        (id != u32::MAX).then_some(id)
    }

    /// Handles the CPU hotplug events.
    pub fn scan(&self) {
        let count = inl(CCNT).min(MAX_CPUS as u32);
        for cpu in 0..count {
            outl(CSEL, cpu);
            let status = inl(CSTA);
            if status & INSERTING != 0 {
                outl(CSTA, INSERTING);
                self.online(cpu);
            }
            if status & REMOVING != 0 {
                outl(CSTA, REMOVING);
                self.eject(cpu);
            }
        }
    }

    /// Starts CPU `cpu` and waits until it runs guest code.
    fn online(&self, cpu: u32) {
        let Some(apic_id) = self.apic_id(cpu) else {
            check("cpuhp", false, format_args!("cpu={cpu}: not in the MADT"));
            return;
        };
        let before = smp::reported();
        let ipi_ok = smp::start_aps(self.lapic, core::iter::once(apic_id), self.vector);
        let d = Deadline::after_us(ONLINE_US);
        while smp::reported() == before && !d.passed() {
            arch::pause();
        }
        match smp::last_reported() {
            Some(id) if smp::reported() != before && id == apic_id => {
                println!("INFO cpuhp.online cpu={cpu} apic_id={apic_id}");
            }
            last => check(
                "cpuhp",
                false,
                format_args!(
                    "cpu={cpu} apic_id={apic_id}: did not come up within {} s (ipi_ok={ipi_ok}, last AP {last:?})",
                    ONLINE_US / 1_000_000
                ),
            ),
        }
    }

    /// Stops CPU `cpu` (an INIT: it waits for a STARTUP IPI) and ejects it.
    fn eject(&self, cpu: u32) {
        let stopped = self
            .apic_id(cpu)
            .is_some_and(|apic_id| smp::init_ap(self.lapic, apic_id));
        if !stopped {
            check("cpuhp", false, format_args!("cpu={cpu}: cannot send it INIT"));
        }
        outl(CSEL, cpu);
        outl(CSTA, EJECT);
        println!("INFO cpuhp.ejected cpu={cpu}");
    }
}
