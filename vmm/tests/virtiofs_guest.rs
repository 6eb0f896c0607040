//! virtio-fs under Nimbus, served by virtiofsd (crates.io; `scripts/install-virtiofsd`): the
//! guest mounts the share by tag and reads, through FUSE, a file the host wrote. virtiofsd exits
//! cleanly when Nimbus disconnects.
//!
//! Needs /dev/kvm (loud SKIPPED without it) and virtiofsd (a failure without it).

use std::time::Duration;

use e2e::{
    nimbus_test_guest, require_kvm, run_vm, stage1_cmdline, virtio_checks, virtiofs_keys,
    ScratchDir, Stage2Keys, Virtiofsd, VIRTIO_FS_CHECKS,
};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn guest_reads_a_host_file_through_virtiofsd() {
    if !require_kvm("guest_reads_a_host_file_through_virtiofsd") {
        return;
    }
    let dir = ScratchDir::new("virtiofs");
    let shared = dir.file("share");
    std::fs::create_dir_all(&shared).expect("share dir");
    std::fs::write(shared.join("greeting.txt"), "hello-from-the-host").expect("host file");
    let socket = dir.file("fs.sock");
    let daemon = Virtiofsd::start(&shared, &socket, &dir.file("virtiofsd.log"), &[]);
    let keys = Stage2Keys {
        virtio: Some(vec![("fs", 1), ("rng", 1)]),
        ..Default::default()
    };
    let cmdline = format!(
        "{} {} {}",
        stage1_cmdline(1, 256 << 20),
        keys.to_cmdline(),
        virtiofs_keys("nimbusfs", "greeting.txt", "hello-from-the-host")
    );
    let mut cmd = nimbus_test_guest(
        env!("CARGO_BIN_EXE_nimbus"),
        "size=256M,shared=on",
        &cmdline,
    );
    cmd.args([
        "--fs",
        &format!("tag=nimbusfs,socket={},queue_size=128", socket.display()),
    ]);
    let run = run_vm(cmd, TIMEOUT);
    let fsd = daemon.finish(Duration::from_secs(10));
    run.assert_success();
    let names = virtio_checks("fs", 0, VIRTIO_FS_CHECKS);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
    fsd.assert_clean_exit();
}
