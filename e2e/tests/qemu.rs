//! The test guest under QEMU q35 (KVM): the reference the guest's checks are
//! validated against. QEMU implements PVH, ACPI and the platform devices
//! independently of Nimbus, so a check that fails here points at the guest.
//!
//! Needs /dev/kvm (skipped loudly without it) and qemu-system-x86_64 (a
//! failure without it: run scripts/install-deps).

use std::time::Duration;

use e2e::{
    guest_elf, qemu_binary, qemu_q35_command, require_kvm, run_vm, stage1_cmdline, GuestReport,
    STAGE1_CHECKS,
};

/// SeaBIOS alone takes ~3 s on PVM hosts (its CPL0 code is emulated).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Boots the guest with `cpus` vCPUs and `mem_mib` MiB and checks that QEMU
/// exits 0 after a clean stage-1 report with the command line echoed exactly.
fn boot_stage1(test: &str, cpus: u32, mem_mib: u64) -> GuestReport {
    qemu_binary(); // fail early and clearly if QEMU is missing
    let cmdline = stage1_cmdline(cpus, mem_mib << 20);
    let elf = guest_elf();
    let run = run_vm(qemu_q35_command(&elf, cpus, mem_mib, &cmdline), TIMEOUT);
    eprintln!("{test}: QEMU finished in {:.1?}", run.elapsed);
    run.assert_success();
    let report = run.report();
    report.assert_passed(STAGE1_CHECKS);
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "the guest must echo the command line exactly\n{}",
        run.describe()
    );
    assert_eq!(
        report.banner.as_deref(),
        Some("NIMBUS-TEST-GUEST stage1"),
        "{}",
        run.describe()
    );
    report
}

#[test]
fn qemu_q35_1cpu_128m() {
    if !require_kvm("qemu_q35_1cpu_128m") {
        return;
    }
    let report = boot_stage1("qemu_q35_1cpu_128m", 1, 128);
    assert!(
        report.detail("smp").is_some_and(|d| d.contains("aps=0")),
        "{}",
        report.raw
    );
}

#[test]
fn qemu_q35_2cpu_3584m() {
    if !require_kvm("qemu_q35_2cpu_3584m") {
        return;
    }
    let report = boot_stage1("qemu_q35_2cpu_3584m", 2, 3584);
    // 3.5 GiB on q35 puts 1.5 GiB above 4 GiB: memtouch must have reached it.
    let memtouch = report.detail("memtouch").unwrap_or_default();
    assert!(
        memtouch.contains("0x100000000"),
        "memtouch did not test RAM above 4 GiB: {memtouch}"
    );
    let smp = report.detail("smp").unwrap_or_default();
    assert!(
        smp.contains("reported=1") && smp.contains("apic_ids=0,1"),
        "AP did not report: {smp}"
    );
}

/// A fault in the guest must be reported (vector, RIP, CR2), counted as a
/// failure, and still end the run through ACPI power-off.
#[test]
fn qemu_q35_guest_fault_is_reported() {
    if !require_kvm("qemu_q35_guest_fault_is_reported") {
        return;
    }
    qemu_binary();
    let elf = guest_elf();
    let run = run_vm(
        qemu_q35_command(&elf, 1, 128, "expect.cpus=1 debug.fault=pf"),
        TIMEOUT,
    );
    run.assert_success();
    let report = run.report();
    assert_eq!(report.faults.len(), 1, "{}", run.describe());
    assert!(
        report.faults[0].starts_with("vector=0xe ")
            && report.faults[0].contains("cr2=0x7fff00001000"),
        "unexpected fault line {:?}\n{}",
        report.faults[0],
        run.describe()
    );
    assert!(
        report.done.is_some_and(|(_, fail)| fail >= 1),
        "{}",
        run.describe()
    );
}
