//! The test guest's virtio-fs checks against an independent device: QEMU's `vhost-user-fs-pci`
//! (QEMU runs the vhost-user protocol) with virtiofsd serving a directory the test fills. The
//! guest does FUSE_INIT, then looks up, opens, reads and releases the file and compares what
//! it read with `fs.content`.
//!
//! Needs /dev/kvm (skipped loudly without it), qemu-system-x86_64 and virtiofsd (their absence
//! is a failure: `scripts/install-deps`, `scripts/install-virtiofsd`).

use std::process::Command;
use std::time::Duration;

use e2e::{
    guest_elf, qemu_binary, qemu_q35_command, qemu_vhost_user_fs_args, require_kvm, run_vm,
    stage1_cmdline, virtio_checks, virtiofs_keys, virtiofsd_binary, GuestReport, ScratchDir,
    Stage2Keys, Virtiofsd, VirtiofsdRun, VmRun, STAGE2_PCI_CHECKS, VIRTIO_FS_CHECKS,
};

/// SeaBIOS alone takes ~3 s on PVM hosts.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long virtiofsd may take to exit once QEMU is gone.
const DAEMON_EXIT: Duration = Duration::from_secs(10);
const MEM_MIB: u64 = 256;
const TAG: &str = "nimbus-fs0";
const FILE: &str = "greeting.txt";
const CONTENT: &str = "hello-from-the-host:virtio-fs";

/// Writes `FILE` into a fresh shared directory, starts virtiofsd on it, boots QEMU with a
/// `vhost-user-fs-pci` tagged `TAG` and the guest keys (`guest_tag` as `fs.tag`), and returns
/// both runs. QEMU must exit 0 and virtiofsd must follow it.
fn boot(test: &str, guest_tag: &str) -> (VmRun, GuestReport, VirtiofsdRun) {
    qemu_binary();
    if let Err(e) = virtiofsd_binary() {
        panic!("{e}");
    }
    let dir = ScratchDir::new(test);
    let shared = dir.file("shared");
    std::fs::create_dir(&shared).expect("create the shared directory");
    std::fs::write(shared.join(FILE), CONTENT).expect("write the shared file");
    let socket = dir.file("virtiofsd.sock");
    let daemon = Virtiofsd::start(&shared, &socket, &dir.file("virtiofsd.log"), &[]);
    let keys = Stage2Keys {
        virtio: Some(vec![("fs", 1)]),
        ..Stage2Keys::default()
    };
    let cmdline = format!(
        "{} {} {}",
        stage1_cmdline(1, MEM_MIB << 20),
        keys.to_cmdline(),
        virtiofs_keys(guest_tag, FILE, CONTENT)
    );
    let elf = guest_elf();
    let mut cmd: Command = qemu_q35_command(&elf, 1, MEM_MIB, &cmdline);
    cmd.args(qemu_vhost_user_fs_args(&socket, TAG, MEM_MIB));
    let run = run_vm(cmd, TIMEOUT);
    eprintln!("{test}: QEMU finished in {:.1?}", run.elapsed);
    let daemon = daemon.finish(DAEMON_EXIT);
    assert!(
        run.success(),
        "QEMU did not exit cleanly with status 0\n{}\n{}",
        run.describe(),
        daemon.describe()
    );
    let report = run.report();
    (run, report, daemon)
}

/// FUSE_INIT, FUSE_LOOKUP, FUSE_OPEN, FUSE_READ and FUSE_RELEASE of a host file through
/// virtiofsd: the guest reads exactly what the host wrote.
#[test]
fn qemu_virtiofs_read() {
    if !require_kvm("qemu_virtiofs_read") {
        return;
    }
    let (run, report, daemon) = boot("qemu_virtiofs_read", TAG);
    let describe = || format!("{}\n{}", run.describe(), daemon.describe());
    let mut names: Vec<String> = STAGE2_PCI_CHECKS.iter().map(|s| s.to_string()).collect();
    names.extend(virtio_checks("fs", 0, VIRTIO_FS_CHECKS));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    assert!(
        run.stdout.contains(&format!(
            "INFO virtio.fs0 tag=\"{TAG}\" num_request_queues=1"
        )),
        "{}",
        describe()
    );
    assert!(
        report
            .detail("virtio.fs0.init")
            .is_some_and(|d| d.contains("1af4:105a") && d.contains("num_queues=2")),
        "{}",
        describe()
    );
    assert!(
        report
            .detail("virtio.fs0.lookup")
            .is_some_and(|d| d.contains(&format!("size={} ", CONTENT.len()))),
        "{}",
        describe()
    );
    assert!(
        report
            .detail("virtio.fs0.read")
            .is_some_and(|d| d.contains(&format!(
                "{} bytes at offset 0: \"{CONTENT}\"",
                CONTENT.len()
            ))),
        "{}",
        describe()
    );
    daemon.assert_clean_exit();
    assert!(daemon.log.contains("Client connected"), "{}", describe());
}

/// The guest compares the device's tag with `fs.tag`: a different one fails `init` (and the
/// FUSE checks are reported failed, not skipped).
#[test]
fn qemu_virtiofs_wrong_tag() {
    if !require_kvm("qemu_virtiofs_wrong_tag") {
        return;
    }
    let (run, report, daemon) = boot("qemu_virtiofs_wrong_tag", "some-other-tag");
    let describe = || format!("{}\n{}", run.describe(), daemon.describe());
    assert!(
        matches!(
            report.test("virtio.fs0.init"),
            Some((false, d)) if d.contains(&format!("tag \"{TAG}\", expected \"some-other-tag\""))
        ),
        "{}",
        describe()
    );
    for check in ["fuse_init", "lookup", "read", "msix"] {
        assert!(
            matches!(
                report.test(&format!("virtio.fs0.{check}")),
                Some((false, _))
            ),
            "virtio.fs0.{check} should fail\n{}",
            describe()
        );
    }
    assert!(
        report.done.is_some_and(|(_, fail)| fail == 5),
        "{}",
        describe()
    );
}
