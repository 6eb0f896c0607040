//! ACPI memory hotplug under the test guest, driven through the API as Kata drives it: a VM
//! booted with `size=128M,shared=on,hotplug_method=acpi,hotplug_size=512M` and a vhost-user
//! disk (the project's `vhost_user_block` daemon, over shared guest RAM) that the lifecycle
//! mode's block stream keeps writing. Sizes that are not a 128 MiB step, beyond
//! `size + hotplug_size` or below the current size are refused with Cloud Hypervisor's status
//! (500) and a message naming why; `vm.resize desired_ram=256M` then adds a memory device the
//! guest finds through the VMM's registers (`guest/src/memhp.rs`) and writes and reads back,
//! `vm.info` shows the new size, and the daemon keeps serving the stream (it got the new
//! memory table). A second step fills the hotplug space; pause and resume go on; after
//! `vm.reboot` the guest boots with all of it as boot RAM.
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::time::{Duration, Instant};

use e2e::api::{self, ApiVmm};
use e2e::{require_kvm, spawn_vm, RunningVm};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// The `blk_done=` of the guest's last complete `TICK` line (of the current boot).
fn blk_done(vm: &RunningVm) -> u64 {
    let out = vm.stdout_so_far();
    let complete = out.rfind('\n').map_or("", |end| &out[..end]);
    let boot = complete.rfind("INFO lifecycle start").unwrap_or(0);
    complete[boot..]
        .lines()
        .rev()
        .find(|l| l.starts_with("TICK "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("blk_done="))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits until the block stream has completed `more` writes beyond `from`.
fn stream_moves(vm: &RunningVm, from: u64, more: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = blk_done(vm);
        if now >= from + more {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the block stream is stuck at {now} (from {from})\n{}",
            vm.describe_so_far()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ram_hot_added_through_acpi_is_usable_and_vhost_user_keeps_serving() {
    if !require_kvm("ram_hot_added_through_acpi_is_usable_and_vhost_user_keeps_serving") {
        return;
    }
    let v = ApiVmm::new("memhp");
    let image = v.dir.file("vub.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let socket = v.dir.file("vub.sock");
    let daemon = e2e::VhostUserBlockDaemon::start(
        &format!("path={},socket={}", image.display(), socket.display()),
        &socket,
        &v.dir.file("vub.log"),
    );
    let mut cmd = e2e::nimbus_test_guest(
        NIMBUS,
        "size=128M,shared=on,hotplug_method=acpi,hotplug_size=512M",
        "lifecycle=1 lifecycle.blk.mib=1 lifecycle.blk.iops=200 expect.cpus=1 expect.mem=128M",
    );
    cmd.args(["-v", "--cpus", "boot=1", "--disk"])
        .arg(format!("vhost_user=on,socket={}", socket.display()))
        .arg("--api-socket")
        .arg(&v.socket);
    let vm = spawn_vm(cmd);
    v.wait_ready();
    let start = vm
        .wait_for_line("INFO lifecycle start", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(start.contains("ram_top=0x8000000"), "{start}");
    let before = stream_moves(&vm, 0, 20);
    let resize = |bytes: u64| {
        api::call(
            &v.socket,
            "PUT",
            "vm.resize",
            Some(&format!(r#"{{"desired_ram":{bytes}}}"#)),
        )
    };

    // Refused: not a 128 MiB step, beyond size + hotplug_size, a shrink.
    for (bytes, why) in [
        (192 * MIB, "multiples of 128 MiB"),
        (768 * MIB, "hotplug_size"),
        (64 * MIB, "cannot shrink"),
    ] {
        let r = resize(bytes);
        assert_eq!(r.status, 500, "{bytes}: {}", r.text());
        assert!(r.text().contains(why), "{bytes}: {}", r.text());
    }
    // The current size changes nothing.
    assert_eq!(resize(128 * MIB).status, 204);

    let t0 = Instant::now();
    let r = resize(256 * MIB);
    assert_eq!(r.status, 204, "{}", r.text());
    let answered = t0.elapsed();
    let added = vm.nth_line("INFO memhp.added", 1, WAIT);
    assert!(
        added.contains("slot=0 base=0x8000000 size=0x8000000"),
        "{added}"
    );
    let usable = vm.nth_line("INFO memhp.usable", 1, WAIT);
    assert!(usable.contains("slot=0 checked=8"), "{usable}");
    let seen = t0.elapsed();
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["memory"]["size"], 256 * MIB, "{info}");
    assert_eq!(info["memory_actual_size"], 256 * MIB, "{info}");
    // The daemon got the new memory table and keeps serving the stream.
    let table = vm
        .wait_for_log_line("the vhost-user backend has the new memory table", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(table.contains("(2 regions)"), "{table}");
    let after = stream_moves(&vm, blk_done(&vm), 20);

    // The rest of the hotplug space in one step (three blocks), after a pause and resume.
    assert_eq!(api::call(&v.socket, "PUT", "vm.pause", None).status, 204);
    let r = resize(640 * MIB);
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(api::call(&v.socket, "PUT", "vm.resume", None).status, 204);
    let added = vm.nth_line("INFO memhp.added", 2, WAIT);
    assert!(
        added.contains("slot=1 base=0x10000000 size=0x18000000"),
        "{added}"
    );
    let usable = vm.nth_line("INFO memhp.usable", 2, WAIT);
    assert!(usable.contains("slot=1 checked=8"), "{usable}");
    stream_moves(&vm, blk_done(&vm), 20);
    let r = resize(768 * MIB);
    assert_eq!(r.status, 500, "{}", r.text());

    // A reboot starts with the grown RAM as boot RAM (Cloud Hypervisor's behaviour).
    assert_eq!(api::call(&v.socket, "PUT", "vm.reboot", None).status, 204);
    let restart = vm.nth_line("INFO lifecycle start", 2, WAIT);
    assert!(restart.contains("ram_top=0x28000000"), "{restart}");
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["memory"]["size"], 640 * MIB, "{info}");
    stream_moves(&vm, 0, 20);
    // Every check passes, but the second boot's memory map check, which expects 128 MiB and
    // finds the grown RAM (640 MiB less the legacy hole).
    let out = vm.stdout_so_far();
    let second = out.rfind("NIMBUS-TEST-GUEST stage1").expect("second boot");
    assert!(
        !out[..second].contains(" FAIL "),
        "{}",
        vm.describe_so_far()
    );
    let fails: Vec<&str> = out[second..]
        .lines()
        .filter(|l| l.contains(" FAIL "))
        .collect();
    assert!(
        fails.len() == 1
            && fails[0].starts_with("TEST memmap FAIL")
            && fails[0].contains("(639 MiB)"),
        "{fails:?}\n{}",
        vm.describe_so_far()
    );
    let log = daemon.log_so_far();
    assert!(!log.contains("ERROR"), "{log}");
    let vmm_log = vm.describe_so_far();
    assert!(
        !vmm_log.contains("did not take the new memory table"),
        "{vmm_log}"
    );
    eprintln!(
        "memory hotplug: vm.resize answered in {answered:?}; the guest had checked the new \
         RAM {seen:?} after the request; block stream {before} -> {after} writes across it"
    );
    assert_eq!(
        api::call(&v.socket, "PUT", "vmm.shutdown", None).status,
        200
    );
    drop(vm);
    // The VMM closed the connection: the single-frontend daemon exits cleanly.
    daemon.finish(WAIT).assert_clean_exit();
}

/// A VM started without `hotplug_size` has no memory hotplug: `desired_ram` on it is refused
/// (500) with a message saying how to start one that has it, and the DSDT has no memory
/// devices (the guest sees no memory hotplug event).
#[test]
fn ram_cannot_grow_without_hotplug_size() {
    if !require_kvm("ram_cannot_grow_without_hotplug_size") {
        return;
    }
    let v = ApiVmm::new("memhp-off");
    let mut cmd = e2e::nimbus_test_guest(
        NIMBUS,
        "size=128M",
        "lifecycle=1 lifecycle.blk.count=0 expect.cpus=1 expect.mem=128M",
    );
    cmd.args(["--cpus", "boot=1", "--api-socket"])
        .arg(&v.socket);
    let vm = spawn_vm(cmd);
    v.wait_ready();
    vm.wait_for_line("INFO lifecycle start", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let r = api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(&format!(r#"{{"desired_ram":{}}}"#, 256 * MIB)),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("hotplug_size"), "{}", r.text());
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["memory"]["size"], 128 * MIB, "{info}");
    assert!(!vm.stdout_so_far().contains("memhp."));
    drop(vm);
}
