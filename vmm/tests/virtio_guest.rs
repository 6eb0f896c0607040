//! The test guest's stage-2 checks under Nimbus: PCI through ECAM and 0xcf8, modern virtio-pci
//! with MSI-X, virtio-blk, virtio-rng and virtio-console, asserted on both sides: the guest's checks pass and the
//! backing image holds exactly what the guest wrote (or is unchanged when read-only).
//!
//! Needs /dev/kvm; without it each test prints a loud SKIPPED line.

use std::process::Command;
use std::time::Duration;

use e2e::{
    guest_elf, require_kvm, run_vm, stage1_cmdline, verify_disk_pattern, virtio_checks,
    write_disk_pattern, ScratchDir, Stage2Keys, VmRun, STAGE1_CHECKS, STAGE2_PCI_CHECKS,
    VIRTIO_BLK_CHECKS, VIRTIO_CONSOLE_CHECKS, VIRTIO_RNG_CHECKS,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 8 << 20;
const GUEST_SECTOR: u64 = 2048;

/// Boots with `disks` and no virtio console (so device counts are exact).
fn boot(disks: &[String], keys: &Stage2Keys) -> VmRun {
    boot_with_console(disks, keys, "off")
}

fn boot_with_console(disks: &[String], keys: &Stage2Keys, console: &str) -> VmRun {
    boot_with(disks, keys, console, &[])
}

fn boot_with(disks: &[String], keys: &Stage2Keys, console: &str, extra: &[&str]) -> VmRun {
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        console,
        "--cmdline",
        &cmdline,
    ]);
    if !disks.is_empty() {
        cmd.arg("--disk").args(disks);
    }
    cmd.args(extra);
    run_vm(cmd, TIMEOUT)
}

fn names(kind: &str, n: usize, checks: &[&str]) -> Vec<String> {
    virtio_checks(kind, n, checks)
}

fn assert_checks(run: &VmRun, checks: &[String]) {
    let refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
}

#[test]
fn disk_rng_and_console_through_pci_and_msix() {
    if !require_kvm("disk_rng_and_console_through_pci_and_msix") {
        return;
    }
    let dir = ScratchDir::new("virtio-disk");
    let image = dir.file("disk.img");
    let console = dir.file("console.txt");
    write_disk_pattern(&image, DISK_SIZE).expect("image");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1), ("console", 1)]),
        blk_pattern_sector: Some(GUEST_SECTOR),
        blk_serial: Some("nimbus-disk-0".into()),
        console_message: Some("hello-from-the-virtio-console".into()),
        ..Default::default()
    };
    let run = boot_with_console(
        &[format!("path={},serial=nimbus-disk-0", image.display())],
        &keys,
        &format!("file={}", console.display()),
    );
    run.assert_success();
    let report = run.report();
    report.assert_passed(STAGE1_CHECKS);
    report.assert_passed(STAGE2_PCI_CHECKS);
    assert_checks(&run, &names("blk", 0, VIRTIO_BLK_CHECKS));
    assert_checks(&run, &names("rng", 0, VIRTIO_RNG_CHECKS));
    assert_checks(&run, &names("console", 0, VIRTIO_CONSOLE_CHECKS));
    // Host side: the console text reached the file, the guest's 4 KiB landed at sector 2048 and
    // nothing else in the image changed.
    let text = std::fs::read_to_string(&console).expect("console file");
    assert_eq!(
        text,
        "hello-from-the-virtio-console\n",
        "{}",
        run.describe()
    );
    verify_disk_pattern(&image, DISK_SIZE, Some(GUEST_SECTOR))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
}

#[test]
fn readonly_disk_refuses_writes_and_stays_unchanged() {
    if !require_kvm("readonly_disk_refuses_writes_and_stays_unchanged") {
        return;
    }
    let dir = ScratchDir::new("virtio-ro");
    let image = dir.file("ro.img");
    write_disk_pattern(&image, DISK_SIZE).expect("image");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1)]),
        blk_pattern_sector: Some(GUEST_SECTOR),
        blk_readonly: true,
        ..Default::default()
    };
    let run = boot(&[format!("path={},readonly=on", image.display())], &keys);
    run.assert_success();
    let mut checks: Vec<&str> = VIRTIO_BLK_CHECKS
        .iter()
        .copied()
        .filter(|c| *c != "write")
        .collect();
    checks.push("readonly");
    assert_checks(&run, &names("blk", 0, &checks));
    verify_disk_pattern(&image, DISK_SIZE, None)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
}

/// Two disks, the second (with 64-entry queues) on PCI segment 1: the guest finds segment 1's
/// ECAM area in the MCFG, enumerates its bus 0 there (host bridge and the disk), and drives the
/// disk through a BAR in segment 1's 64-bit window with MSI-X.
#[test]
fn multiqueue_and_a_second_disk_on_pci_segment_1() {
    if !require_kvm("multiqueue_and_a_second_disk_on_pci_segment_1") {
        return;
    }
    let dir = ScratchDir::new("virtio-mq");
    let a = dir.file("a.img");
    let b = dir.file("b.img");
    write_disk_pattern(&a, DISK_SIZE).expect("image a");
    write_disk_pattern(&b, DISK_SIZE).expect("image b");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 2), ("rng", 1)]),
        blk_pattern_sector: Some(GUEST_SECTOR),
        // Segment 0: host bridge, disk a, rng; segment 1: host bridge, disk b.
        segments: Some(vec![(0, 3), (1, 2)]),
        ..Default::default()
    };
    let run = boot_with(
        &[
            format!("path={},num_queues=2", a.display()),
            format!("path={},queue_size=64,pci_segment=1", b.display()),
        ],
        &keys,
        "off",
        &[
            "--platform",
            "num_pci_segments=2",
            // Segment 1 gets 31/32 of the 64-bit window from 6 GiB: inside the 8 GiB the test
            // guest maps when the CPU has no 1 GiB pages (with equal weights it would start at
            // 36 GiB).
            "--pci-segment",
            "pci_segment=1,mmio64_aperture_weight=31",
            "--pci-segment",
            "pci_segment=0,mmio32_aperture_weight=3",
            "-v",
        ],
    );
    run.assert_success();
    run.report().assert_passed(STAGE2_PCI_CHECKS);
    let mut disk0: Vec<&str> = VIRTIO_BLK_CHECKS.to_vec();
    disk0.push("mq");
    assert_checks(&run, &names("blk", 0, &disk0));
    assert_checks(&run, &names("blk", 1, VIRTIO_BLK_CHECKS));
    for image in [&a, &b] {
        verify_disk_pattern(image, DISK_SIZE, Some(GUEST_SECTOR))
            .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
    }
    // Where things are: the MCFG entries, the disk's address, and its BAR inside segment 1's
    // share of the 64-bit window (31/32 of it, from 6 GiB).
    let segments =
        arch::x86_64::layout::pci_segments(256 << 20, &[(3, 1), (1, 31)]).expect("segments");
    let (start, size) = segments[1].mmio64;
    let infos: Vec<&str> = run.stdout.lines().collect();
    let has = |want: &str| infos.iter().any(|l| l.trim_end().starts_with(want));
    assert!(
        has("INFO mcfg base=0xe0000000 segment=0 bus=0-255")
            && has("INFO mcfg base=0xf0000000 segment=1 bus=0-0")
            && has("INFO pci 0001:00:00.0 ")
            && has("INFO pci 0001:00:01.0 1af4:1042"),
        "{}",
        run.describe()
    );
    let bar = infos
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("INFO pci.bar 0001:00:01.0 bar0 mem64 addr=")
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no BAR line for 0001:00:01.0\n{}", run.describe()));
    assert!(
        bar >= start && bar < start + size && start == segments[0].mmio64.0 + (2 << 30),
        "BAR {bar:#x} outside segment 1's window {start:#x}+{size:#x}"
    );
    assert!(
        run.stderr.contains("_disk1: virtio-Disk at 0001:00:01.0")
            && run.stderr.contains("_disk0: virtio-Disk at 0000:00:01.0"),
        "{}",
        run.describe()
    );
}

#[test]
fn an_image_in_use_is_refused() {
    if !require_kvm("an_image_in_use_is_refused") {
        return;
    }
    let dir = ScratchDir::new("virtio-lock");
    let image = dir.file("locked.img");
    write_disk_pattern(&image, DISK_SIZE).expect("image");
    // Another holder of a write lock on the image (as a second Nimbus would be).
    let _holder = block::RawFile::open(&image, false, false).expect("first open");
    let run = boot(
        &[format!("path={}", image.display())],
        &Stage2Keys::default(),
    );
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        run.describe()
    );
    let err = run.stderr.lines().last().unwrap_or_default();
    assert!(err.contains("locked"), "{}", run.describe());
    verify_disk_pattern(&image, DISK_SIZE, None).unwrap_or_else(|e| panic!("{e}"));
}
