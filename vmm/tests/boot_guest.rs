//! The test guest booted by Nimbus: the guest-visible contract end to end (PVH start info, memory
//! map, ACPI tables, SMP bring-up through INIT/SIPI, CMOS RTC, ACPI power-off, reset, the debug
//! port), asserted on both sides: the guest's own checks and what the VMM process did.
//!
//! Needs /dev/kvm; without it each test prints a loud SKIPPED line.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::{guest_elf, require_kvm, run_vm, stage1_cmdline, GuestReport, VmRun, STAGE1_CHECKS};

const TIMEOUT: Duration = Duration::from_secs(60);

/// RAM the memory map reports: everything but the EBDA and legacy hole (0x9fc00..0x100000).
const LEGACY_HOLE: u64 = 0x10_0000 - 0x9_fc00;

fn nimbus(cpus: &str, mem: &str, cmdline: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
    let kernel = guest_elf();
    cmd.arg("--kernel")
        .arg(kernel)
        .args(["--cpus", cpus, "--memory", mem, "--cmdline", cmdline])
        .args(extra);
    if !extra.contains(&"--serial") {
        cmd.args(["--serial", "tty"]);
    }
    cmd
}

/// Boots with `boot` vCPUs (of `max`) and `mem_mib` MiB; asserts exit 0 and every stage-1 check.
fn boot_stage1(boot: u32, max: u32, mem_mib: u64, extra: &[&str]) -> (VmRun, GuestReport) {
    let cmdline = stage1_cmdline(boot, mem_mib << 20);
    let run = run_vm(
        nimbus(
            &format!("boot={boot},max={max}"),
            &format!("size={mem_mib}M"),
            &cmdline,
            extra,
        ),
        TIMEOUT,
    );
    run.assert_success();
    let report = run.report();
    report.assert_passed(STAGE1_CHECKS);
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "{}",
        run.describe()
    );
    // Nimbus-specific facts, exact: ACPI 2.0+ with an XSDT and our OEM ID, hardware-reduced
    // power-off through the sleep control register, RAM minus exactly the legacy hole.
    report.assert_passed(&["acpi.XSDT"]);
    let rsdp = report.detail("acpi.rsdp").unwrap_or_default();
    assert!(
        rsdp.contains("rev=2") && rsdp.contains("oem=\"NIMBUS\""),
        "{rsdp}"
    );
    let s5 = report.detail("acpi.s5").unwrap_or_default();
    assert!(
        s5.contains("slp_typ=5") && s5.contains("sleep-control-io"),
        "{s5}"
    );
    let ram = (mem_mib << 20) - LEGACY_HOLE;
    let memmap = report.detail("memmap").unwrap_or_default();
    assert!(
        memmap.contains(&format!("ram={ram} ")),
        "memmap RAM should be exactly {ram}: {memmap}"
    );
    let madt = report.detail("acpi.madt").unwrap_or_default();
    assert!(madt.contains(&format!("enabled_cpus={boot} ")), "{madt}");
    (run, report)
}

#[test]
fn one_cpu_128m() {
    if !require_kvm("one_cpu_128m") {
        return;
    }
    let (_, report) = boot_stage1(1, 1, 128, &[]);
    let smp = report.detail("smp").unwrap_or_default();
    assert!(smp.contains("aps=0"), "{smp}");
}

#[test]
fn two_cpus_3584m_with_ram_above_4g() {
    if !require_kvm("two_cpus_3584m_with_ram_above_4g") {
        return;
    }
    let (_, report) = boot_stage1(2, 2, 3584, &[]);
    let memtouch = report.detail("memtouch").unwrap_or_default();
    assert!(
        memtouch.contains("0x100000000") && memtouch.contains("0x11ffff000"),
        "{memtouch}"
    );
    let smp = report.detail("smp").unwrap_or_default();
    assert!(
        smp.contains("reported=1") && smp.contains("apic_ids=0,1"),
        "{smp}"
    );
}

#[test]
fn four_of_eight_cpus_start_through_init_sipi() {
    if !require_kvm("four_of_eight_cpus_start_through_init_sipi") {
        return;
    }
    let (_, report) = boot_stage1(4, 8, 256, &[]);
    let smp = report.detail("smp").unwrap_or_default();
    assert!(smp.contains("reported=3"), "{smp}");
    // APs report in arrival order.
    let mut ids: Vec<u32> = smp
        .split_whitespace()
        .find_map(|t| t.strip_prefix("apic_ids="))
        .unwrap_or_default()
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1, 2, 3], "{smp}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nimbus-boot-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

#[test]
fn serial_to_file_and_log_to_file() {
    if !require_kvm("serial_to_file_and_log_to_file") {
        return;
    }
    let serial = scratch("serial.log");
    let log = scratch("nimbus.log");
    let serial_arg = format!("file={}", serial.display());
    let log_arg = log.display().to_string();
    let cmdline = stage1_cmdline(1, 128 << 20);
    let run = run_vm(
        nimbus(
            "boot=1",
            "size=128M",
            &cmdline,
            &[
                "--serial",
                &serial_arg,
                "--console",
                "off",
                "--log-file",
                &log_arg,
                "-v",
            ],
        ),
        TIMEOUT,
    );
    run.assert_success();
    assert!(
        run.stdout.is_empty(),
        "guest output must go to the file, not stdout: {}",
        run.stdout
    );
    let text = std::fs::read_to_string(&serial).expect("serial file");
    GuestReport::parse(&text).assert_passed(STAGE1_CHECKS);
    let log_text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        log_text.contains("guest powered off after 1 boot(s)"),
        "{log_text}"
    );
    assert!(
        !run.stderr.contains("powered off"),
        "the log must go to the file: {}",
        run.stderr
    );
}

#[test]
fn serial_off_still_boots_and_powers_off() {
    if !require_kvm("serial_off_still_boots_and_powers_off") {
        return;
    }
    let run = run_vm(
        nimbus(
            "boot=1",
            "size=64M",
            "mode=boot",
            &["--serial", "off", "--console", "off", "-v"],
        ),
        TIMEOUT,
    );
    run.assert_success();
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    // The guest still ran: it wrote its POST codes and entered S5.
    assert!(run.stderr.contains("debug port: 0xfe"), "{}", run.stderr);
}

#[test]
fn debug_port_writes_are_logged_with_timestamps() {
    if !require_kvm("debug_port_writes_are_logged_with_timestamps") {
        return;
    }
    let run = run_vm(nimbus("boot=1", "size=64M", "mode=boot", &["-v"]), TIMEOUT);
    run.assert_success();
    let stamps: Vec<f64> = ["0x01", "0xfe"]
        .iter()
        .map(|code| {
            let line = run
                .stderr
                .lines()
                .find(|l| l.contains(&format!("debug port: {code} at ")))
                .unwrap_or_else(|| panic!("no debug port line for {code}: {}", run.stderr));
            let ms = line
                .rsplit(" at ")
                .next()
                .and_then(|t| t.trim_end_matches(" ms").parse().ok());
            ms.unwrap_or_else(|| panic!("no timestamp in {line}"))
        })
        .collect();
    assert!(stamps[0] > 0.0 && stamps[0] < stamps[1], "{stamps:?}");
}

fn reboot_twice(method: &str) {
    let cmdline = format!(
        "reboot.count=2 reboot.method={method} {}",
        stage1_cmdline(1, 128 << 20)
    );
    let run = run_vm(nimbus("boot=1", "size=128M", &cmdline, &["-v"]), TIMEOUT);
    run.assert_success();
    let banners = run.stdout.matches("NIMBUS-TEST-GUEST stage1").count();
    assert_eq!(
        banners,
        3,
        "two resets then a full run:\n{}",
        run.describe()
    );
    for k in 0..3 {
        assert!(
            run.stdout.contains(&format!("INFO boot.count={k}")),
            "{}",
            run.describe()
        );
    }
    assert_eq!(
        run.stderr.matches("guest reset; rebooting").count(),
        2,
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("guest powered off after 3 boot(s)"),
        "{}",
        run.stderr
    );
    // Only the last boot runs the checks; they must all pass on the rebuilt machine.
    let last = run
        .stdout
        .rsplit("NIMBUS-TEST-GUEST stage1")
        .next()
        .unwrap_or_default();
    GuestReport::parse(&format!("NIMBUS-TEST-GUEST stage1{last}")).assert_passed(STAGE1_CHECKS);
}

#[test]
fn reset_register_reboots_in_place() {
    if !require_kvm("reset_register_reboots_in_place") {
        return;
    }
    reboot_twice("cf9");
}

#[test]
fn i8042_reset_reboots_in_place() {
    if !require_kvm("i8042_reset_reboots_in_place") {
        return;
    }
    reboot_twice("kbd");
}

#[test]
fn guest_fault_is_reported_and_the_guest_still_powers_off() {
    if !require_kvm("guest_fault_is_reported_and_the_guest_still_powers_off") {
        return;
    }
    let run = run_vm(nimbus("boot=1", "size=64M", "debug.fault=pf", &[]), TIMEOUT);
    run.assert_success();
    let report = run.report();
    assert!(
        report.faults.iter().any(|f| f.contains("vector=0xe")),
        "{}",
        run.describe()
    );
    assert!(
        matches!(report.done, Some((_, fail)) if fail >= 1),
        "{}",
        run.describe()
    );
}

#[test]
fn vcpu_failure_exits_nonzero_with_the_reason() {
    if !require_kvm("vcpu_failure_exits_nonzero_with_the_reason") {
        return;
    }
    let run = run_vm(
        nimbus("boot=1", "size=64M", "debug.fault=exec-mmio", &[]),
        TIMEOUT,
    );
    assert!(!run.timed_out, "{}", run.describe());
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        run.describe()
    );
    let err = run.stderr.lines().last().unwrap_or_default();
    assert!(
        err.starts_with("nimbus: error: the VM failed: vcpu0: "),
        "{}",
        run.describe()
    );
    assert!(err.contains("rip=0xd0000000"), "{}", run.describe());
}

#[test]
fn shared_and_prefaulted_memory_boot() {
    if !require_kvm("shared_and_prefaulted_memory_boot") {
        return;
    }
    // shared=on backs RAM with a memfd (what vhost-user backends map); prefault=on populates it.
    for mem in [
        "size=128M,shared=on",
        "size=128M,prefault=on",
        "size=128M,shared=on,thp=off",
    ] {
        let cmdline = stage1_cmdline(1, 128 << 20);
        let run = run_vm(nimbus("boot=1", mem, &cmdline, &[]), TIMEOUT);
        run.assert_success();
        run.report().assert_passed(STAGE1_CHECKS);
    }
}

/// Free 2 MiB huge pages on this host, from /proc/meminfo.
fn free_huge_pages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn hugepages_boot_or_fail_clearly() {
    if !require_kvm("hugepages_boot_or_fail_clearly") {
        return;
    }
    let cmdline = stage1_cmdline(1, 64 << 20);
    let run = run_vm(
        nimbus("boot=1", "size=64M,hugepages=on", &cmdline, &[]),
        TIMEOUT,
    );
    if free_huge_pages() >= 32 {
        run.assert_success();
        run.report().assert_passed(STAGE1_CHECKS);
    } else {
        // No huge pages reserved on this host: a clear error, not SIGBUS at first touch.
        assert_eq!(
            run.status.and_then(|s| s.code()),
            Some(1),
            "{}",
            run.describe()
        );
        let err = run.stderr.lines().last().unwrap_or_default();
        assert!(
            err.contains("cannot map") && err.contains("HugePages_Free"),
            "{}",
            run.describe()
        );
    }
}
