//! `vhost_user_block` against an independent frontend: QEMU's `vhost-user-blk-pci` (QEMU runs
//! the vhost-user protocol, the daemon serves the requests) with the test guest's virtio-blk
//! checks. Afterwards the image must hold exactly what the guest wrote, and the daemon must
//! have exited 0 on QEMU's disconnection and removed its socket.
//!
//! Needs /dev/kvm (skipped loudly without it) and qemu-system-x86_64. The daemon binary comes
//! from [`e2e::vhost_user_block_binary`] (built with cargo on first use).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{
    guest_elf, qemu_binary, qemu_q35_command, qemu_vhost_user_blk_args, require_kvm, run_vm,
    stage1_cmdline, verify_disk_pattern, virtio_checks, write_disk_pattern, GuestReport,
    ScratchDir, Stage2Keys, VhostUserBlockDaemon, VhostUserBlockRun, VmRun, STAGE1_CHECKS,
    STAGE2_PCI_CHECKS, VIRTIO_BLK_CHECKS,
};

/// SeaBIOS alone takes ~3 s on PVM hosts.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon may take to exit once QEMU is gone.
const DAEMON_EXIT: Duration = Duration::from_secs(10);
const MEM_MIB: u64 = 256;
const DISK_SIZE: u64 = 8 << 20;
const PATTERN_SECTOR: u64 = 2048;
const DISK_SERIAL: &str = "nimbus-vub-disk0";

/// Starts the daemon on `image`, boots QEMU with a `vhost-user-blk-pci` of `num_queues` queues
/// on its socket and the stage-2 `keys`, and returns both runs. QEMU must exit 0.
fn boot(
    test: &str,
    dir: &ScratchDir,
    image: &Path,
    options: &str,
    num_queues: u16,
    keys: &Stage2Keys,
) -> (VmRun, GuestReport, VhostUserBlockRun) {
    qemu_binary();
    let socket = dir.file("vub.sock");
    let backend = format!(
        "path={},socket={},num_queues={num_queues}{options}",
        image.display(),
        socket.display()
    );
    let daemon = VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon.log"));
    let cmdline = format!("{} {}", stage1_cmdline(1, MEM_MIB << 20), keys.to_cmdline());
    let elf = guest_elf();
    let mut cmd: Command = qemu_q35_command(&elf, 1, MEM_MIB, &cmdline);
    cmd.args(qemu_vhost_user_blk_args(&socket, num_queues, MEM_MIB));
    let run = run_vm(cmd, TIMEOUT);
    eprintln!("{test}: QEMU finished in {:.1?}", run.elapsed);
    // QEMU closed the connection when it exited: the daemon follows.
    let daemon = daemon.finish(DAEMON_EXIT);
    assert!(
        run.success(),
        "QEMU did not exit cleanly with status 0\n{}\n{}",
        run.describe(),
        daemon.describe()
    );
    let report = run.report();
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "{}",
        run.describe()
    );
    (run, report, daemon)
}

/// Two request queues, a serial, the host pattern read back, the guest's pattern written,
/// flushed and read back, an out-of-range read failing with IOERR.
#[test]
fn qemu_vhost_user_blk() {
    if !require_kvm("qemu_vhost_user_blk") {
        return;
    }
    let dir = ScratchDir::new("vub-qemu");
    let image = dir.file("disk.img");
    write_disk_pattern(&image, DISK_SIZE).expect("write the disk image");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1)]),
        blk_pattern_sector: Some(PATTERN_SECTOR),
        blk_serial: Some(DISK_SERIAL.to_string()),
        ..Stage2Keys::default()
    };
    let (run, report, daemon) = boot(
        "qemu_vhost_user_blk",
        &dir,
        &image,
        &format!(",serial={DISK_SERIAL}"),
        2,
        &keys,
    );
    let mut names: Vec<String> = STAGE1_CHECKS
        .iter()
        .chain(STAGE2_PCI_CHECKS)
        .map(|s| s.to_string())
        .collect();
    names.extend(virtio_checks("blk", 0, VIRTIO_BLK_CHECKS));
    names.extend(virtio_checks("blk", 0, &["mq"]));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    let describe = || format!("{}\n{}", run.describe(), daemon.describe());
    assert!(
        report
            .detail("virtio.blk0.get_id")
            .is_some_and(|d| d.contains(&format!("id=\"{DISK_SERIAL}\""))),
        "{}",
        describe()
    );
    assert!(
        report
            .detail("virtio.blk0.capacity")
            .is_some_and(|d| d.contains(&format!("sectors={} ", DISK_SIZE / 512))),
        "{}",
        describe()
    );
    daemon.assert_clean_exit();
    assert!(
        daemon.log.contains("frontend disconnected"),
        "{}",
        describe()
    );
    if let Err(e) = verify_disk_pattern(&image, DISK_SIZE, Some(PATTERN_SECTOR)) {
        panic!("disk image after the run: {e}\n{}", describe());
    }
}

/// `readonly=true`: the device offers VIRTIO_BLK_F_RO, a write fails with IOERR, and the image
/// is unchanged.
#[test]
fn qemu_vhost_user_blk_readonly() {
    if !require_kvm("qemu_vhost_user_blk_readonly") {
        return;
    }
    let dir = ScratchDir::new("vub-qemu-ro");
    let image = dir.file("disk.img");
    write_disk_pattern(&image, DISK_SIZE).expect("write the disk image");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1)]),
        blk_pattern_sector: Some(PATTERN_SECTOR),
        blk_readonly: true,
        ..Stage2Keys::default()
    };
    let (run, report, daemon) = boot(
        "qemu_vhost_user_blk_readonly",
        &dir,
        &image,
        ",readonly=true",
        1,
        &keys,
    );
    let checks: Vec<&str> = VIRTIO_BLK_CHECKS
        .iter()
        .copied()
        .filter(|&c| c != "write")
        .chain(["readonly"])
        .collect();
    let mut names: Vec<String> = STAGE2_PCI_CHECKS.iter().map(|s| s.to_string()).collect();
    names.extend(virtio_checks("blk", 0, &checks));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    let describe = || format!("{}\n{}", run.describe(), daemon.describe());
    assert!(
        report.test("virtio.blk0.write").is_none(),
        "no write check on a read-only disk\n{}",
        describe()
    );
    daemon.assert_clean_exit();
    if let Err(e) = verify_disk_pattern(&image, DISK_SIZE, None) {
        panic!("read-only disk image changed: {e}\n{}", describe());
    }
}
