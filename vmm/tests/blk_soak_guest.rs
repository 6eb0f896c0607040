//! The test guest's block soak mode (`soak=blk`, see docs/test-guest.md "Block soak"): the
//! guest writes a region of its disk sequentially with its pattern (64 KiB requests, 16 in
//! flight), FLUSHes, reads it all back and compares. Under Nimbus through the project's
//! vhost-user block daemon, and under QEMU q35 on a plain file (the reference that proves the
//! guest itself right). Asserted: `soak.blk` passes, the VMM exits 0, the progress lines come,
//! and the image holds the guest pattern in the region and is untouched behind it.
//!
//! Needs /dev/kvm (loud SKIPPED without it); the QEMU test needs qemu-system-x86_64.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{
    compare_image, disk_pattern_byte, guest_elf, nimbus_test_guest, qemu_binary, qemu_q35_command,
    require_kvm, soak_blk_keys, soak_blk_written_line, spawn_vm, stage1_cmdline,
    verify_guest_pattern, GuestReport, ScratchDir, VhostUserBlockDaemon, VmRun,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// A sparse image of `size` bytes holding the host pattern in `[at, at + 1 MiB)` for each
/// `at` of `filled` (the rest reads as zeros): the guest must overwrite holes and data alike.
fn sparse_image(path: &Path, size: u64, filled: &[u64]) {
    let mut f = File::create(path).expect("create the image");
    f.set_len(size).expect("size the image");
    for &at in filled {
        let data: Vec<u8> = (at..at + MIB).map(disk_pattern_byte).collect();
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(&data).expect("fill the image");
    }
    f.sync_all().expect("sync the image");
}

/// Nimbus (`-v`) booting the test guest with `cmdline` and one disk served by the vhost-user
/// backend at `socket`.
fn nimbus_on_vhost_user_blk(socket: &Path, cmdline: &str) -> Command {
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), "size=256M,shared=on", cmdline);
    cmd.args([
        "-v",
        "--disk",
        &format!("vhost_user=on,socket={}", socket.display()),
    ]);
    cmd
}

/// Checks that `[from, to)` of the image still holds the host pattern where `filled` put it
/// and zeros elsewhere: the guest wrote nothing behind its region.
fn verify_untouched(path: &Path, from: u64, to: u64, filled: &[u64]) {
    let result = compare_image(path, from..to, |o| {
        if filled.iter().any(|&at| (at..at + MIB).contains(&o)) {
            (disk_pattern_byte(o), "host pattern behind the soak region")
        } else {
            (0, "zero behind the soak region")
        }
    });
    if let Err(e) = result {
        panic!("the guest changed the image behind its soak region: {e}");
    }
}

/// Runs `cmd` (a VMM booting the soak guest of `mib` MiB), waits for the first progress
/// line on the way, and returns the run and its report after checking that the VMM exited
/// 0 and `soak.blk` passed (and nothing else failed).
fn run_soak(test: &str, cmd: Command, mib: u64) -> (VmRun, GuestReport) {
    let start = Instant::now();
    let vm = spawn_vm(cmd);
    let first = soak_blk_written_line(8.min(mib));
    if let Err(e) = vm.wait_for_line(&first, TIMEOUT) {
        panic!("{test}: {e}");
    }
    let progress = start.elapsed();
    let run = vm.finish(TIMEOUT);
    eprintln!(
        "{test}: first progress line after {progress:.1?}, VMM finished in {:.1?}",
        run.elapsed
    );
    run.assert_success();
    let report = run.report();
    report.assert_passed(&["soak.blk"]);
    let detail = report.detail("soak.blk").unwrap_or_default();
    eprintln!("{test}: soak.blk {detail}");
    assert!(
        detail.contains(&format!("wrote {mib} MiB in {} requests", mib * 16))
            && detail.contains("read back identical"),
        "{}",
        run.describe()
    );
    let lines = report
        .infos
        .iter()
        .filter(|l| l.starts_with("soak blk written="))
        .count() as u64;
    assert_eq!(lines, mib.div_ceil(8), "progress lines\n{}", run.describe());
    (run, report)
}

/// 64 MiB at full speed through Nimbus's vhost-user-blk frontend and the `vhost_user_block`
/// daemon, on a sparse image partly holding other data.
#[test]
fn soak_blk_vhost_user_block_daemon() {
    if !require_kvm("soak_blk_vhost_user_block_daemon") {
        return;
    }
    const SOAK_MIB: u64 = 64;
    const SIZE: u64 = 80 * MIB;
    let filled = [0, 32 * MIB, 70 * MIB];
    let dir = ScratchDir::new("blk-soak-vub");
    let image = dir.file("disk.img");
    sparse_image(&image, SIZE, &filled);
    let socket = dir.file("vub.sock");
    let backend = format!("path={},socket={}", image.display(), socket.display());
    let daemon = VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon.log"));
    let cmdline = format!(
        "{} {}",
        stage1_cmdline(1, 256 * MIB),
        soak_blk_keys(SOAK_MIB, 0, None)
    );
    let cmd = nimbus_on_vhost_user_blk(&socket, &cmdline);
    let (run, _) = run_soak("soak_blk_vhost_user_block_daemon", cmd, SOAK_MIB);
    let daemon_run = daemon.finish(Duration::from_secs(10));
    daemon_run.assert_clean_exit();
    verify_guest_pattern(&image, 0..SOAK_MIB * MIB)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
    verify_untouched(&image, SOAK_MIB * MIB, SIZE, &filled);
}

/// The block daemon dies while the guest is writing, and comes back: Nimbus notices, keeps the
/// VM running, reconnects to the new daemon on the same socket and hands it the rings at their
/// used index, so the requests the dead daemon had taken are served again. Shown: the guest saw
/// every request complete with OK and read everything back, the image holds every byte the
/// guest wrote, and requests were in flight when the daemon died.
///
/// The daemon is stopped (SIGSTOP) before it is killed, so the guest has filled its queue
/// with requests the daemon took or will never see — the worst case, made deterministic.
#[test]
fn block_daemon_killed_while_guest_writes_is_reconnected() {
    if !require_kvm("block_daemon_killed_while_guest_writes_is_reconnected") {
        return;
    }
    const SOAK_MIB: u64 = 96;
    const SIZE: u64 = 112 * MIB;
    let filled = [0, 40 * MIB, 100 * MIB];
    let dir = ScratchDir::new("blk-soak-restart");
    let image = dir.file("disk.img");
    sparse_image(&image, SIZE, &filled);
    let socket = dir.file("vub.sock");
    let backend = format!("path={},socket={}", image.display(), socket.display());
    let first = VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon1.log"));
    // 32 MiB/s: about 3 s of writing, so the daemon dies well inside the write phase.
    let cmdline = format!(
        "{} {}",
        stage1_cmdline(1, 256 * MIB),
        soak_blk_keys(SOAK_MIB, 32, Some(20))
    );
    let cmd = nimbus_on_vhost_user_blk(&socket, &cmdline);
    let vm = spawn_vm(cmd);
    let fail = |what: &str, e: String| -> ! { panic!("{what}: {e}") };
    vm.wait_for_line(&soak_blk_written_line(16), TIMEOUT)
        .unwrap_or_else(|e| fail("first progress", e));
    first.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    first.signal(libc::SIGKILL);
    let killed = first.finish(Duration::from_secs(10));
    assert!(
        killed.status.is_some_and(|s| !s.success()),
        "the first daemon must have been killed\n{}",
        killed.describe()
    );
    vm.wait_for_log_line("went away", Duration::from_secs(10))
        .unwrap_or_else(|e| fail("Nimbus did not notice the daemon's death", e));
    let stalled_at = vm.stdout_so_far();
    assert!(
        !stalled_at.contains(&soak_blk_written_line(SOAK_MIB)),
        "the guest finished writing before the daemon died: make the soak longer\n{}",
        vm.describe_so_far()
    );
    // A while without a backend: the VM keeps running, the guest waits.
    std::thread::sleep(Duration::from_millis(700));
    let second = VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon2.log"));
    let line = vm
        .wait_for_log_line("reconnected", Duration::from_secs(10))
        .unwrap_or_else(|e| fail("no reconnection", e));
    let resubmitted: u32 = line
        .split(", ")
        .find_map(|part| part.strip_suffix(" request(s) in flight served again"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reconnection line: {line}"));
    assert!(
        resubmitted > 0,
        "the guest had requests in flight when the daemon died: {line}"
    );
    let run = vm.finish(TIMEOUT);
    run.assert_success();
    let report = run.report();
    report.assert_passed(&["soak.blk"]);
    let detail = report.detail("soak.blk").unwrap_or_default();
    assert!(
        detail.contains(&format!(
            "wrote {SOAK_MIB} MiB in {} requests",
            SOAK_MIB * 16
        )) && detail.contains("all OK")
            && detail.contains("read back identical"),
        "{}",
        run.describe()
    );
    eprintln!("restart: {line}; soak.blk {detail}");
    second.finish(Duration::from_secs(10)).assert_clean_exit();
    verify_guest_pattern(&image, 0..SOAK_MIB * MIB)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
    verify_untouched(&image, SOAK_MIB * MIB, SIZE, &filled);
}

/// A block daemon that freezes (SIGSTOP: alive, socket open, never answering) must not hang
/// Nimbus: the guest gives up on its requests and powers off, and Nimbus, whose device reset
/// then waits for the daemon's reply to GET_VRING_BASE, disconnects it after 5 s and exits.
#[test]
fn frozen_block_daemon_does_not_hang_nimbus() {
    if !require_kvm("frozen_block_daemon_does_not_hang_nimbus") {
        return;
    }
    let dir = ScratchDir::new("blk-soak-frozen");
    let image = dir.file("disk.img");
    sparse_image(&image, 64 * MIB, &[]);
    let socket = dir.file("vub.sock");
    let backend = format!("path={},socket={}", image.display(), socket.display());
    let daemon = VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon.log"));
    let cmdline = format!(
        "{} {}",
        stage1_cmdline(1, 256 * MIB),
        soak_blk_keys(48, 16, Some(2))
    );
    let cmd = nimbus_on_vhost_user_blk(&socket, &cmdline);
    let vm = spawn_vm(cmd);
    if let Err(e) = vm.wait_for_line(&soak_blk_written_line(8), TIMEOUT) {
        panic!("first progress: {e}");
    }
    daemon.signal(libc::SIGSTOP);
    let run = vm.finish(Duration::from_secs(30));
    daemon.signal(libc::SIGKILL);
    let _ = daemon.finish(Duration::from_secs(5));
    assert!(
        !run.timed_out,
        "Nimbus hung on the frozen daemon\n{}",
        run.describe()
    );
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(0),
        "the guest powered off\n{}",
        run.describe()
    );
    let detail = run
        .report()
        .detail("soak.blk")
        .unwrap_or_default()
        .to_string();
    assert!(
        detail.contains("no completion for 2 s"),
        "the guest saw its requests stall: {detail}\n{}",
        run.describe()
    );
    assert!(
        run.stderr.contains("did not answer within 5s"),
        "{}",
        run.describe()
    );
}

/// The reference: 16 MiB under QEMU q35 with virtio-blk-pci on a plain sparse file.
#[test]
fn soak_blk_qemu_q35() {
    if !require_kvm("soak_blk_qemu_q35") {
        return;
    }
    qemu_binary();
    const SOAK_MIB: u64 = 16;
    const SIZE: u64 = 24 * MIB;
    let filled = [MIB, 20 * MIB];
    let dir = ScratchDir::new("blk-soak-qemu");
    let image = dir.file("disk.img");
    sparse_image(&image, SIZE, &filled);
    let cmdline = format!(
        "{} {}",
        stage1_cmdline(1, 256 * MIB),
        soak_blk_keys(SOAK_MIB, 0, None)
    );
    let mut cmd = qemu_q35_command(&guest_elf(), 1, 256, &cmdline);
    cmd.args([
        "-device",
        "virtio-blk-pci,drive=d0,disable-legacy=on",
        "-drive",
        &format!("if=none,id=d0,format=raw,file={}", image.display()),
    ]);
    let (run, _) = run_soak("soak_blk_qemu_q35", cmd, SOAK_MIB);
    verify_guest_pattern(&image, 0..SOAK_MIB * MIB)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
    verify_untouched(&image, SOAK_MIB * MIB, SIZE, &filled);
}
