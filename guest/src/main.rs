//! Nimbus test guest: stage 1 (boot, memory, ACPI, SMP, RTC) then stage 2
//! (PCI, virtio-pci).
//!
//! A freestanding PVH guest: `boot.s` does the CPL0 minimum (long mode,
//! GDT/IDT/TSS, identity map) and drops to CPL3, where everything in this
//! crate runs natively even on PVM hosts (which emulate CPL0). Results go to
//! COM1 as `TEST <name> PASS|FAIL <detail>` lines followed by
//! `TESTS DONE pass=N fail=M`; then the guest powers off through ACPI.
//! See docs/test-guest.md in the repository.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Errors are fixed-capacity strings (`virtio::Why`): there is no heap to box them into.
#![allow(clippy::result_large_err)]

mod acpi;
mod arch;
mod balloon;
mod bench;
mod blk;
mod console_io;
mod cpuhp;
mod expect;
mod fs;
mod hotplug;
mod memhp;
mod hostile;
mod kvmclock;
mod lifecycle;
mod mem;
mod memtest;
mod net;
mod net_mq;
mod netbench;
mod pci;
mod phys;
mod pmem;
mod regions;
mod report;
mod rtc;
mod serial;
mod shutdown;
mod smp;
mod soak;
mod stage2;
mod startinfo;
mod time;
mod topology;
mod virtio;
mod vsock;

use core::sync::atomic::{AtomicBool, Ordering};

use expect::Expectations;
use regions::Regions;
use report::{check, Ascii};
use startinfo::{CString, StartInfo};

/// Set once the final report has started, so a fault or panic during it does
/// not start another.
static FINISHING: AtomicBool = AtomicBool::new(false);

/// CPL3 entry point of the BSP (called from `user_start_bsp` in boot.s).
#[no_mangle]
pub extern "C" fn rust_main(start_info_addr: u64) -> ! {
    lifecycle::post(lifecycle::POST_ENTERED);
    serial::init();
    println!("NIMBUS-TEST-GUEST stage1");
    if boot_only(start_info_addr) {
        // Boot benchmark (`mode=boot`): one line, then straight to power-off.
        lifecycle::post(lifecycle::POST_DONE);
        shutdown::power_off();
    }
    let (img_start, img_end) = arch::image_range();
    println!(
        "INFO boot start_info={:#x} image={:#x}-{:#x} mapped={} GiB",
        start_info_addr,
        img_start,
        img_end,
        arch::mapped_limit_bytes() >> 30
    );

    let Some(si) = StartInfo::read(start_info_addr) else {
        check(
            "pvh.magic",
            false,
            format_args!("start info address {start_info_addr:#x} not readable"),
        );
        finish();
    };
    let magic_ok = si.magic == startinfo::MAGIC;
    // Later versions only append fields; version 0 lacks the memory map
    // (the memmap check reports that).
    check(
        "pvh.magic",
        magic_ok,
        format_args!("magic={:#x} version={}", si.magic, si.version),
    );
    if !magic_ok {
        finish();
    }
    println!(
        "INFO start_info flags={:#x} nr_modules={} modlist={:#x} cmdline={:#x} rsdp={:#x} memmap={:#x} memmap_entries={}",
        si.flags, si.nr_modules, si.modlist_paddr, si.cmdline_paddr, si.rsdp_paddr, si.memmap_paddr, si.memmap_entries
    );

    // Command line and expectations.
    let cmdline = if si.cmdline_paddr != 0 {
        Some(CString::read(si.cmdline_paddr))
    } else {
        None
    };
    let text = match &cmdline {
        None => {
            check(
                "cmdline",
                false,
                format_args!("no command line (cmdline_paddr=0)"),
            );
            ""
        }
        Some(c) => match core::str::from_utf8(c.bytes()) {
            Ok(s) if !c.too_long => {
                check("cmdline", true, format_args!("\"{}\"", Ascii(c.bytes())));
                s
            }
            _ => {
                check(
                    "cmdline",
                    false,
                    format_args!("\"{}\" (invalid UTF-8 or unterminated)", Ascii(c.bytes())),
                );
                ""
            }
        },
    };
    lifecycle::maybe_reboot(text);
    let expect = Expectations::parse(text);
    if let Some(kind) = expect::value(text, "debug.fault") {
        deliberate_fault(kind);
    }

    memtest::check_memmap(&si, &expect);
    let acpi = acpi::run(&si, &expect);
    time::calibrate(acpi.fadt.as_ref());

    let mut avoid = Regions::boot_structures(&si, cmdline.as_ref().map_or(0, CString::len));
    for (s, e) in acpi.ranges() {
        avoid.add(s, e);
    }
    console_io::run(text);
    if let Some(kind) = expect::value(text, "bench") {
        // Benchmark mode: no memory/SMP/RTC checks, see bench.rs.
        bench::run(kind, &si, &acpi, &avoid, text);
        finish();
    }
    if let Some(kind) = expect::value(text, "soak") {
        // Soak mode: likewise, see soak.rs.
        soak::run(kind, &si, &acpi, &avoid, text);
        finish();
    }
    if expect::value(text, "lifecycle") == Some("1") {
        // Lifecycle mode for the VMM's control-plane tests, see lifecycle.rs.
        if lifecycle::run(&si, &acpi, &avoid, text) {
            // `lifecycle.hold=1`: the report, then stay up instead of powering off.
            FINISHING.store(true, Ordering::SeqCst);
            report::print_done();
            lifecycle::hold();
        }
        finish();
    }
    memtest::check_memtouch(&si, &avoid);
    smp::check_smp(&si, acpi.madt.as_ref(), &expect, &avoid);
    topology::check_topology(text, acpi.madt.as_ref());
    rtc::check_rtc(&expect);
    stage2::run(&acpi, text);
    finish()
}

/// True when the command line says `mode=boot`. Reads the start info directly, printing
/// nothing, so the boot benchmark's guest does the least work possible.
fn boot_only(start_info_addr: u64) -> bool {
    let Some(si) = StartInfo::read(start_info_addr) else {
        return false;
    };
    if si.magic != startinfo::MAGIC || si.cmdline_paddr == 0 {
        return false;
    }
    let c = CString::read(si.cmdline_paddr);
    core::str::from_utf8(c.bytes()).is_ok_and(|t| expect::value(t, "mode") == Some("boot"))
}

/// `debug.fault=pf|ud`: fault on purpose, to exercise the fault report.
fn deliberate_fault(kind: &str) {
    println!("INFO debug.fault={kind}: faulting on purpose");
    match kind {
        // PML4 slot 255 is not present: a user-mode read page fault.
        // SAFETY: the read faults before it can observe anything.
        "pf" => unsafe {
            core::ptr::read_volatile(0x7fff_0000_1000 as *const u8);
        },
        // SAFETY: ud2 only raises #UD (handled by the fault path).
        "ud" => unsafe { core::arch::asm!("ud2") },
        // Jump into unbacked MMIO (the 32-bit PCI window, mapped by the identity map): the
        // hypervisor cannot fetch instructions from it, so the VMM must report a vCPU failure.
        // SAFETY: control never comes back; the VM is expected to stop here.
        "exec-mmio" => unsafe {
            let target: extern "C" fn() = core::mem::transmute(0xd000_0000usize);
            target();
        },
        _ => println!("INFO unknown debug.fault kind ignored"),
    }
}

/// Prints the final line and powers off.
fn finish() -> ! {
    FINISHING.store(true, Ordering::SeqCst);
    report::print_done();
    lifecycle::post(lifecycle::POST_DONE);
    shutdown::power_off()
}

/// Counts the failure, prints `TESTS DONE` and powers off, unless a final
/// report is already under way (then just stop this CPU).
fn fail_and_finish() -> ! {
    report::count_failure();
    if FINISHING.swap(true, Ordering::SeqCst) {
        arch::park();
    }
    report::print_done();
    shutdown::power_off()
}

/// CPL3 continuation of the CPL0 exception handler (`user_start_fault`).
#[no_mangle]
pub extern "C" fn rust_fault() -> ! {
    let [vector, error, rip, cs, rflags, rsp, cr2, cpu] = arch::fault_record();
    println!(
        "FAULT vector={vector:#x} error={error:#x} rip={rip:#x} cr2={cr2:#x} cs={cs:#x} rflags={rflags:#x} rsp={rsp:#x} cpu={cpu}"
    );
    fail_and_finish()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("FAULT panic: {info}");
    fail_and_finish()
}
