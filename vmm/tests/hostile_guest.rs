//! The test guest's hostile mode under Nimbus (`hostile=1`, see docs/test-guest.md): after
//! its stage-1 and stage-2 checks the guest attacks the VMM through the virtio-blk device —
//! descriptors outside RAM, descriptor loops, zero-length and 4 GiB descriptors, a read-only
//! status descriptor, bad queue sizes, rings outside RAM, a runaway available index, junk
//! accesses to the virtio and PCI configuration, a BAR move — and proves after each attack
//! that the device still works. Asserted on both sides: every guest check passes, Nimbus
//! took the documented way out of each attack (malformed chains returned with length 0; bad
//! queue setups and a broken available ring answered with DEVICE_NEEDS_RESET and a
//! configuration interrupt), Nimbus exited 0 without a panic, and the disk image holds only
//! what the normal checks wrote.
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::time::Duration;

use e2e::{
    hostile_checks, nimbus_test_guest, require_kvm, run_vm, stage1_cmdline, verify_disk_pattern,
    virtio_checks, write_disk_pattern, GuestReport, ScratchDir, Stage2Keys, VmRun, STAGE1_CHECKS,
    STAGE2_PCI_CHECKS, VIRTIO_BLK_CHECKS, VIRTIO_RNG_CHECKS,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 8 << 20;
const GUEST_SECTOR: u64 = 2048;

fn boot_hostile(image: &std::path::Path) -> VmRun {
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1)]),
        blk_pattern_sector: Some(GUEST_SECTOR),
        hostile: true,
        ..Default::default()
    };
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), "size=256M", &cmdline);
    cmd.args(["--disk", &format!("path={}", image.display())]);
    run_vm(cmd, TIMEOUT)
}

/// Asserts that the detail of check `name` contains every one of `parts`.
fn assert_detail(run: &VmRun, report: &GuestReport, name: &str, parts: &[&str]) {
    let detail = report.detail(name).unwrap_or_default();
    for part in parts {
        assert!(
            detail.contains(part),
            "{name}: expected {part:?} in the detail {detail:?}\n{}",
            run.describe()
        );
    }
}

#[test]
fn hostile_guest_attacks_are_survived() {
    if !require_kvm("hostile_guest_attacks_are_survived") {
        return;
    }
    let dir = ScratchDir::new("hostile");
    let image = dir.file("disk.img");
    write_disk_pattern(&image, DISK_SIZE).expect("image");
    let run = boot_hostile(&image);
    run.assert_success();
    assert!(
        !run.stderr.contains("panicked"),
        "Nimbus logged a panic\n{}",
        run.describe()
    );
    let report = run.report();
    report.assert_passed(STAGE1_CHECKS);
    report.assert_passed(STAGE2_PCI_CHECKS);
    for names in [
        virtio_checks("blk", 0, VIRTIO_BLK_CHECKS),
        virtio_checks("rng", 0, VIRTIO_RNG_CHECKS),
        hostile_checks(),
    ] {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        report.assert_passed(&refs);
    }

    // Nimbus's documented answers (docs/architecture.md, "PCI and virtio"; the block crate):
    // a malformed chain goes back to the used ring with length 0 and no status ...
    for attack in ["desc_oob", "desc_loop", "desc_huge", "status_readonly"] {
        assert_detail(
            &run,
            &report,
            &format!("hostile.{attack}"),
            &["outcome=returned used_len=0 status=unwritten"],
        );
    }
    // ... (a 0-byte data descriptor is skipped: a read of 0 bytes, status OK) ...
    assert_detail(
        &run,
        &report,
        "hostile.desc_zero_len",
        &["outcome=returned used_len=1 status=OK"],
    );
    // ... a bad queue setup at DRIVER_OK sets DEVICE_NEEDS_RESET and raises the
    // configuration interrupt (both sizes: 3 and twice the maximum) ...
    let bad_size = report.detail("hostile.bad_queue_size").unwrap_or_default();
    assert_eq!(
        bad_size
            .matches("outcome=needs_reset status=0x4f config_irq=true")
            .count(),
        2,
        "{bad_size}\n{}",
        run.describe()
    );
    assert_detail(
        &run,
        &report,
        "hostile.ring_oob",
        &["outcome=needs_reset status=0x4f config_irq=true"],
    );
    // ... and an available index more than a queue size ahead stops the queue.
    assert_detail(
        &run,
        &report,
        "hostile.avail_idx_jump",
        &["outcome=needs_reset used_entries=0"],
    );
    // The BAR moved inside the 64-bit window and the notification followed it.
    assert_detail(
        &run,
        &report,
        "hostile.bar_move",
        &["moved 0x", "ignored for 100 ms", "status=OK irq=true"],
    );

    // Host side: no attack wrote to the disk; only the normal write check's sectors changed.
    verify_disk_pattern(&image, DISK_SIZE, Some(GUEST_SECTOR))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
}
