//! ACPI power-off (S5), using the method chosen from the FADT by
//! `acpi::plan_shutdown`.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::{arch, phys, println, time};

/// How to enter S5.
#[derive(Clone, Copy, Debug)]
pub enum Plan {
    /// Hardware-reduced ACPI: SLEEP_CONTROL_REG in I/O space at this port.
    SleepControlIo(u64),
    /// Hardware-reduced ACPI: SLEEP_CONTROL_REG in memory space.
    SleepControlMmio(u64),
    /// Fixed hardware: PM1a (and PM1b if nonzero) control block ports.
    Pm1 {
        /// PM1a_CNT port.
        a: u64,
        /// PM1b_CNT port (0: none).
        b: u64,
    },
}

impl Plan {
    /// Short description for the log.
    pub fn name(&self) -> &'static str {
        match self {
            Plan::SleepControlIo(_) => "sleep-control-io",
            Plan::SleepControlMmio(_) => "sleep-control-mmio",
            Plan::Pm1 { .. } => "pm1-control",
        }
    }
}

// The plan, kept in atomics (set once by the BSP, read by whoever finishes).
static KIND: AtomicU8 = AtomicU8::new(0); // 0 none, 1 io, 2 mmio, 3 pm1
static ADDR_A: AtomicU64 = AtomicU64::new(0);
static ADDR_B: AtomicU64 = AtomicU64::new(0);
static SLP_TYP: AtomicU8 = AtomicU8::new(0);

/// Records how to power off and the `\_S5` SLP_TYP value.
pub fn set_plan(plan: Plan, slp_typ: u8) {
    let (kind, a, b) = match plan {
        Plan::SleepControlIo(p) => (1, p, 0),
        Plan::SleepControlMmio(p) => (2, p, 0),
        Plan::Pm1 { a, b } => (3, a, b),
    };
    ADDR_A.store(a, Ordering::SeqCst);
    ADDR_B.store(b, Ordering::SeqCst);
    SLP_TYP.store(slp_typ & 7, Ordering::SeqCst);
    KIND.store(kind, Ordering::SeqCst);
}

/// Enters S5. If the VMM ignores it, reports `FAULT shutdown-ignored` after
/// about a second and halts this CPU.
pub fn power_off() -> ! {
    if KIND.load(Ordering::SeqCst) == 0 {
        crate::acpi::plan_shutdown_quietly(arch::start_info_addr());
    }
    let typ = SLP_TYP.load(Ordering::SeqCst);
    let a = ADDR_A.load(Ordering::SeqCst);
    let b = ADDR_B.load(Ordering::SeqCst);
    match KIND.load(Ordering::SeqCst) {
        1 => match u16::try_from(a) {
            Ok(port) => arch::outb(port, (typ << 2) | (1 << 5)),
            Err(_) => println!("FAULT shutdown-bad-port {a:#x}"),
        },
        2 => phys::mmio_write8(a, (typ << 2) | (1 << 5)),
        3 => {
            let value = (u16::from(typ) << 10) | (1 << 13);
            for port in [a, b] {
                if port != 0 {
                    match u16::try_from(port) {
                        Ok(port) => arch::outw(port, value),
                        Err(_) => println!("FAULT shutdown-bad-port {port:#x}"),
                    }
                }
            }
        }
        _ => {
            println!("FAULT no-acpi-shutdown (no usable FADT/\\_S5)");
            arch::park();
        }
    }
    time::delay_us(1_000_000);
    println!("FAULT shutdown-ignored");
    arch::park()
}
