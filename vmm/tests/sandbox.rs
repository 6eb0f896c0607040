//! The sandbox (docs/security.md): system-call filters and Landlock.
//!
//! Every class of Nimbus thread is filtered, and a forbidden call ends the process with one line
//! naming the thread, its class and the call.
//!
//! The self-test hook (`NIMBUS_SECCOMP_SELF_TEST=<class>[,<class>...]`) makes each thread of the
//! named classes call acct(2), which no class allows, right after it applies its filter. One VM
//! starts every class: the test guest with the API socket, the serial port on the terminal
//! (console input), the debug console on a PTY (a console relay), the rng device (a device
//! worker), a disk served by `vhost_user_block` (the vhost-user relay and deadline threads) and
//! a vsock device (its thread). With the default filters each class's call ends
//! the process with status 159; with `--seccomp log` the calls of every class go through, the
//! guest passes its checks and the kernel logs them; with `--seccomp false` nothing happens.
//!
//! With `--landlock` (`landlock_enable`), a VM created through the API boots with its disks, one
//! of them in a directory named only by `landlock_rules` and added after the restriction, and
//! the guest's block checks pass; a disk outside both makes `vm.boot` fail with EACCES.
//!
//! Needs /dev/kvm (loud SKIPPED without it).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::api::{self, ApiVmm};
use e2e::{
    nimbus_test_guest, require_kvm, run_vm, stage1_cmdline, verify_disk_pattern, virtio_checks,
    write_disk_pattern, ScratchDir, Stage2Keys, VhostUserBlockDaemon, VIRTIO_BLK_CHECKS,
};
use nimbus_thread::seccomp::FORBIDDEN_EXIT_CODE;
use nimbus_thread::{ThreadClass, SELF_TEST_ENV};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const TIMEOUT: Duration = Duration::from_secs(60);
const ACCT: i64 = libc::SYS_acct;

/// The classes of the VMM's threads (those its rules cover).
fn vmm_classes() -> Vec<ThreadClass> {
    vmm::seccomp::rules().into_iter().map(|(c, _)| c).collect()
}

/// The VM that starts every class, with `vhost_user_block` serving its disk from `dir`; the
/// daemon is returned so that it lives as long as the run.
fn every_class_vm(dir: &ScratchDir, seccomp: &[&str]) -> (Command, VhostUserBlockDaemon) {
    let image = dir.file("disk.img");
    write_disk_pattern(&image, 8 << 20).expect("image");
    let socket = dir.file("vub.sock");
    let _ = std::fs::remove_file(&socket);
    let backend = format!("path={},socket={}", image.display(), socket.display());
    let daemon = VhostUserBlockDaemon::start(&backend, &socket, &dir.file("daemon.log"));
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1), ("vsock", 1)]),
        blk_pattern_sector: Some(2048),
        ..Default::default()
    };
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let mut cmd = nimbus_test_guest(NIMBUS, "size=256M,shared=on", &cmdline);
    cmd.arg("--disk")
        .arg(format!("vhost_user=on,socket={}", socket.display()))
        .arg("--api-socket")
        .arg(dir.file("api.sock"))
        // A console relay thread.
        .args(["--debug-console", "pty"])
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", dir.file("vsock.sock").display()))
        .args(seccomp);
    (cmd, daemon)
}

/// The line the SIGSYS handler writes for a thread of `class` calling acct(2).
fn forbidden_line(class: ThreadClass) -> String {
    format!(
        "({}) made a forbidden system call {ACCT} (acct); ending the process",
        class.as_str()
    )
}

#[test]
fn every_thread_class_is_filtered() {
    if !require_kvm("every_thread_class_is_filtered") {
        return;
    }
    for class in vmm_classes() {
        let dir = ScratchDir::new("seccomp-class");
        let (mut cmd, _daemon) = every_class_vm(&dir, &[]);
        cmd.env(SELF_TEST_ENV, class.as_str());
        let run = run_vm(cmd, TIMEOUT);
        let line = forbidden_line(class);
        assert_eq!(
            run.status.and_then(|s| s.code()),
            Some(FORBIDDEN_EXIT_CODE),
            "class {}: the forbidden call did not end the process with {FORBIDDEN_EXIT_CODE}\n{}",
            class.as_str(),
            run.describe()
        );
        let reported: Vec<&str> = run
            .stderr
            .lines()
            .filter(|l| l.starts_with("nimbus: seccomp: thread ") && l.ends_with(&line))
            .collect();
        assert!(
            !reported.is_empty(),
            "class {}: no line ending in '{line}'\n{}",
            class.as_str(),
            run.describe()
        );
    }
}

/// Kernel log lines (dmesg) of seccomp's audit records for process `pid` and call `nr`;
/// `None` when the kernel log cannot be read here.
fn audit_lines(pid: u32, nr: i64) -> Option<Vec<String>> {
    let out = Command::new("dmesg").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let pid = format!(" pid={pid} ");
    let call = format!(" syscall={nr} ");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("type=1326") && l.contains(&pid) && l.contains(&call))
            .map(str::to_string)
            .collect(),
    )
}

/// With `--seccomp log` or `false`, every class's acct call goes through: the guest runs to
/// the end and passes its virtio checks.
fn run_with_every_class_calling(mode: &str) -> Option<u32> {
    let dir = ScratchDir::new("seccomp-mode");
    let (mut cmd, daemon) = every_class_vm(&dir, &["--seccomp", mode]);
    let all: Vec<&str> = vmm_classes().iter().map(|c| c.as_str()).collect();
    cmd.env(SELF_TEST_ENV, all.join(","));
    let vm = e2e::spawn_vm(cmd);
    let pid = vm.pid();
    let run = vm.finish(TIMEOUT);
    let daemon_run = daemon.finish(Duration::from_secs(10));
    run.assert_success();
    assert!(
        !run.stderr.contains("made a forbidden system call"),
        "--seccomp {mode}: {}",
        run.describe()
    );
    let names = virtio_checks("blk", 0, VIRTIO_BLK_CHECKS);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
    daemon_run.assert_clean_exit();
    pid
}

#[test]
fn seccomp_log_lets_the_calls_through_and_logs_them() {
    if !require_kvm("seccomp_log_lets_the_calls_through_and_logs_them") {
        return;
    }
    let pid = run_with_every_class_calling("log").expect("pid");
    match audit_lines(pid, ACCT) {
        // The kernel rate-limits audit lines on its log, so not every class's line is there.
        Some(lines) => assert!(
            !lines.is_empty(),
            "no audit line for pid {pid} calling acct in the kernel log"
        ),
        None => eprintln!(
            "SKIPPED (partly): the kernel log (dmesg) cannot be read here, so only the calls \
             going through is checked, not the kernel's audit lines"
        ),
    }
}

#[test]
fn seccomp_false_installs_no_filters() {
    if !require_kvm("seccomp_false_installs_no_filters") {
        return;
    }
    run_with_every_class_calling("false");
}

#[test]
fn a_bad_seccomp_value_is_one_error_line() {
    let out = Command::new(NIMBUS)
        .args(["--seccomp", "maybe", "--kernel"])
        .arg(Path::new("/nonexistent"))
        .output()
        .expect("run nimbus");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--seccomp: 'maybe' is not true, false or log"),
        "{stderr}"
    );
}

/// The guest's block checks on both disks, the first one with the pattern at sector 2048.
const LANDLOCK_SECTOR: u64 = 2048;

#[test]
fn landlock_confines_the_vmm_to_the_configured_paths() {
    if !require_kvm("landlock_confines_the_vmm_to_the_configured_paths") {
        return;
    }
    let v = ApiVmm::new("landlock");
    let named = v.dir.file("named");
    let extra = v.dir.file("extra");
    let outside = v.dir.file("outside");
    for d in [&named, &extra, &outside] {
        std::fs::create_dir(d).expect("dir");
    }
    let disk0 = named.join("disk0.img");
    let disk1 = extra.join("disk1.img");
    let stray = outside.join("stray.img");
    for image in [&disk0, &disk1, &stray] {
        write_disk_pattern(image, 8 << 20).expect("image");
    }
    let vm = e2e::spawn_vm(v.command(NIMBUS, &["-v"]));
    v.wait_ready();
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 2), ("rng", 1)]),
        blk_pattern_sector: Some(LANDLOCK_SECTOR),
        ..Default::default()
    };
    let cmdline = format!("{} {}", stage1_cmdline(1, 128 << 20), keys.to_cmdline());
    let body = api::guest_vm_body(
        1,
        128,
        &cmdline,
        &format!(
            r#""disks": [{{"path": "{}"}}], "landlock_enable": true,
               "landlock_rules": [{{"path": "{}", "access": "rw"}}]"#,
            disk0.display(),
            extra.display()
        ),
    );
    let answer = api::call(&v.socket, "PUT", "vm.create", Some(&body));
    assert_eq!(
        answer.status,
        204,
        "vm.create: {}",
        String::from_utf8_lossy(&answer.raw)
    );
    let add = |path: &Path, id: &str| {
        let body = format!(r#"{{"path": "{}", "id": "{id}"}}"#, path.display());
        let a = api::call(&v.socket, "PUT", "vm.add-disk", Some(&body));
        assert!(
            a.status == 200 || a.status == 204,
            "vm.add-disk {id}: {}",
            String::from_utf8_lossy(&a.raw)
        );
    };
    // Outside the named paths and the rules: the VMM can no longer open it.
    add(&stray, "stray");
    let boot = api::call(&v.socket, "PUT", "vm.boot", None);
    let text = String::from_utf8_lossy(&boot.raw).into_owned();
    assert_eq!(
        boot.status, 500,
        "vm.boot with a disk outside the rules: {text}"
    );
    assert!(
        text.contains("stray.img") && text.contains("os error 13"),
        "the error names the file and EACCES: {text}"
    );
    let removed = api::call(
        &v.socket,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id": "stray"}"#),
    );
    assert_eq!(
        removed.status,
        204,
        "{}",
        String::from_utf8_lossy(&removed.raw)
    );
    // Under landlock_rules: added after the restriction, and it works.
    add(&disk1, "extra");
    let boot = api::call(&v.socket, "PUT", "vm.boot", None);
    assert_eq!(
        boot.status,
        204,
        "vm.boot: {}",
        String::from_utf8_lossy(&boot.raw)
    );
    // The guest powers off after its checks, and the VMM exits with it.
    let run = vm.finish(TIMEOUT);
    run.assert_success();
    let mut names = virtio_checks("blk", 0, VIRTIO_BLK_CHECKS);
    names.extend(virtio_checks("blk", 1, VIRTIO_BLK_CHECKS));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
    for image in [&disk0, &disk1] {
        verify_disk_pattern(image, 8 << 20, Some(LANDLOCK_SECTOR))
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", image.display(), run.describe()));
    }
    verify_disk_pattern(&stray, 8 << 20, None).expect("the stray disk is untouched");
}
