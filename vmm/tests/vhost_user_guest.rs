//! Nimbus's vhost-user-blk frontend served by an independent backend, `qemu-storage-daemon`
//! (Debian's QEMU packages): the test guest's block checks pass through the split-process data
//! path, and the image holds exactly what the guest wrote.
//!
//! Needs /dev/kvm (loud SKIPPED without it) and qemu-storage-daemon (a failure without it: run
//! scripts/install-deps).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{
    nimbus_test_guest, require_kvm, run_vm, stage1_cmdline, verify_disk_pattern, virtio_checks,
    write_disk_pattern, ScratchDir, Stage2Keys, STAGE1_CHECKS, VIRTIO_BLK_CHECKS,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const DISK_SIZE: u64 = 8 << 20;
const GUEST_SECTOR: u64 = 2048;

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`; killed on drop.
struct StorageDaemon(Child);

impl StorageDaemon {
    fn start(image: &Path, socket: &Path, num_queues: u32) -> Self {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                socket.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon not installed: run scripts/install-deps");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nimbus(memory: &str, disk: &str, cmdline: &str) -> Command {
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), memory, cmdline);
    cmd.args(["--disk", disk]);
    cmd
}

fn scratch(dir: &ScratchDir) -> (PathBuf, PathBuf) {
    let image = dir.file("disk.img");
    write_disk_pattern(&image, DISK_SIZE).expect("image");
    (image, dir.file("vub.sock"))
}

#[test]
fn qemu_storage_daemon_serves_nimbus() {
    if !require_kvm("qemu_storage_daemon_serves_nimbus") {
        return;
    }
    let dir = ScratchDir::new("vhost-user-qsd");
    let (image, socket) = scratch(&dir);
    let daemon = StorageDaemon::start(&image, &socket, 2);
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1)]),
        blk_pattern_sector: Some(GUEST_SECTOR),
        ..Default::default()
    };
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let disk = format!("vhost_user=on,socket={},num_queues=2", socket.display());
    let run = run_vm(nimbus("size=256M,shared=on", &disk, &cmdline), TIMEOUT);
    drop(daemon);
    run.assert_success();
    let report = run.report();
    report.assert_passed(STAGE1_CHECKS);
    let mut checks: Vec<&str> = VIRTIO_BLK_CHECKS
        .iter()
        .copied()
        .filter(|c| *c != "get_id")
        .collect();
    checks.push("mq");
    let names = virtio_checks("blk", 0, &checks);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&refs);
    // The daemon, not Nimbus, wrote the guest's data into the image.
    verify_disk_pattern(&image, DISK_SIZE, Some(GUEST_SECTOR))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
}

#[test]
fn vhost_user_without_shared_memory_is_a_clear_error() {
    let run = run_vm(
        nimbus("size=256M", "vhost_user=on,socket=/nonexistent.sock", "x"),
        TIMEOUT,
    );
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        run.describe()
    );
    let err = run.stderr.lines().last().unwrap_or_default();
    assert!(err.contains("shared=on"), "{}", run.describe());
}

#[test]
fn unreachable_backend_is_a_clear_error() {
    if !require_kvm("unreachable_backend_is_a_clear_error") {
        return;
    }
    let run = run_vm(
        nimbus(
            "size=256M,shared=on",
            "vhost_user=on,socket=/nonexistent.sock",
            "x",
        ),
        TIMEOUT,
    );
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        run.describe()
    );
    let err = run.stderr.lines().last().unwrap_or_default();
    assert!(
        err.contains("cannot connect to vhost-user backend at /nonexistent.sock"),
        "{}",
        run.describe()
    );
}

/// The project's own daemon behind Nimbus's frontend: the split-process design end to end. The
/// daemon exits 0 when Nimbus disconnects, and removes its socket.
#[test]
fn vhost_user_block_daemon_serves_nimbus() {
    if !require_kvm("vhost_user_block_daemon_serves_nimbus") {
        return;
    }
    let dir = ScratchDir::new("vhost-user-ours");
    let (image, socket) = scratch(&dir);
    let backend = format!(
        "path={},socket={},num_queues=2,serial=nimbus-vub0",
        image.display(),
        socket.display()
    );
    let daemon = e2e::VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon.log"));
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1)]),
        blk_pattern_sector: Some(GUEST_SECTOR),
        blk_serial: Some("nimbus-vub0".into()),
        ..Default::default()
    };
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let disk = format!("vhost_user=on,socket={},num_queues=2", socket.display());
    let run = run_vm(nimbus("size=256M,shared=on", &disk, &cmdline), TIMEOUT);
    let daemon_run = daemon.finish(Duration::from_secs(10));
    run.assert_success();
    let mut checks: Vec<&str> = VIRTIO_BLK_CHECKS.to_vec();
    checks.push("mq");
    let names = virtio_checks("blk", 0, &checks);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
    daemon_run.assert_clean_exit();
    verify_disk_pattern(&image, DISK_SIZE, Some(GUEST_SECTOR))
        .unwrap_or_else(|e| panic!("{e}\n{}", run.describe()));
}
