//! The VM lifecycle as the guest sees it, driven through the API: the test guest's lifecycle
//! mode (docs/test-guest.md) keeps a counter, prints a `TICK` line every ~100 ms of its own
//! time and keeps block writes in flight on its disk. Pause must stop all of it with no time
//! lost to the guest's clock (kvmclock, which Nimbus holds across the pause; on PVM hosts the
//! guest reads the host's TSC directly, so no VMM can hide a pause from `rdtsc` there), resume
//! must go on from there with every block request completed exactly once, `vm.nmi` and
//! `vm.power-button` must reach the guest, `vm.reboot` must boot a fresh machine, and
//! `vm.counters` must match the guest's own I/O counts.

use std::time::{Duration, Instant};

use e2e::api::{self, Answer, ApiVmm};
use e2e::lifecycle::{field, ticks, wait_ticks, LIFECYCLE_CMDLINE};
use e2e::{require_kvm, spawn_vm, RunningVm};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(30);

fn ok(a: &Answer, what: &str) {
    assert!(
        a.status == 204 || a.status == 200,
        "{what}: {}",
        String::from_utf8_lossy(&a.raw)
    );
}

/// Nimbus with the lifecycle guest booted from the command line (guest command line
/// `cmdline`) and the API served.
fn start(v: &ApiVmm, cmdline: &str) -> RunningVm {
    let mut cmd = e2e::lifecycle::lifecycle_command(NIMBUS, &v.dir, cmdline);
    cmd.arg("--api-socket").arg(&v.socket).arg("-v");
    let vm = spawn_vm(cmd);
    v.wait_ready();
    // Everything the tests poke (NMI, GED, block stream) is armed before this line.
    vm.wait_for_line("INFO lifecycle start", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm
}

#[test]
fn pause_holds_the_guest_and_resume_continues_it() {
    if !require_kvm("pause_holds_the_guest_and_resume_continues_it") {
        return;
    }
    let v = ApiVmm::new("lifecycle-pause");
    // No rate limit: the guest keeps its 8 writes in flight all the time, across the pause.
    let vm = start(
        &v,
        "lifecycle=1 lifecycle.hold=1 expect.cpus=1 expect.mem=128M",
    );
    wait_ticks(&vm, 5, WAIT);
    ok(&api::call(&v.socket, "PUT", "vm.pause", None), "pause");
    let paused_at = Instant::now();
    let out_at_pause = vm.stdout_so_far();
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["state"], "Paused", "{info}");
    let c1 = api::call(&v.socket, "GET", "vm.counters", None).json();
    std::thread::sleep(Duration::from_secs(2));
    let c2 = api::call(&v.socket, "GET", "vm.counters", None).json();
    assert_eq!(c1, c2, "block I/O went on while paused");
    assert_eq!(
        vm.stdout_so_far(),
        out_at_pause,
        "the guest printed while paused"
    );
    let paused_ms = paused_at.elapsed().as_millis() as u64;
    ok(&api::call(&v.socket, "PUT", "vm.resume", None), "resume");
    let n_ticks = ticks(&vm).len();
    let after = wait_ticks(&vm, n_ticks + 2, WAIT);
    let last_before = after[n_ticks - 1].clone();
    let first_after = after[n_ticks].clone();
    // The counter goes on from where it was: it only grows, and by about one tick's worth.
    assert!(
        field::<u64>(&first_after, "n") > field::<u64>(&last_before, "n"),
        "{last_before} / {first_after}"
    );
    // The guest's clock (kvmclock) did not see the pause.
    let dt = field::<u64>(&first_after, "kc_ms") - field::<u64>(&last_before, "kc_ms");
    assert!(
        dt < paused_ms / 2,
        "guest time jumped {dt} ms across a {paused_ms} ms pause: {last_before} / {first_after}"
    );
    let gap = field::<f64>(&first_after, "kc_gap_ms");
    assert!(
        gap < paused_ms as f64 / 2.0,
        "a {gap} ms gap in the guest's loop across a {paused_ms} ms pause"
    );
    // Block writes were in flight around the pause: the guest keeps 8 outstanding, so the
    // ticks just before it show some (a tick can fall where all had just completed).
    assert!(
        after[..n_ticks]
            .iter()
            .rev()
            .take(3)
            .any(|t| field::<u64>(t, "blk_inflight") > 0),
        "{:?}",
        &after[..n_ticks]
    );
    // NMIs reach the guest.
    ok(&api::call(&v.socket, "PUT", "vm.nmi", None), "nmi");
    let deadline = Instant::now() + WAIT;
    while ticks(&vm)
        .last()
        .is_none_or(|t| field::<u64>(t, "nmi") == 0)
    {
        assert!(
            Instant::now() < deadline,
            "no NMI seen: {}",
            vm.describe_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The power button: the guest finishes its block stream, reports and (held) waits.
    ok(
        &api::call(&v.socket, "PUT", "vm.power-button", None),
        "power-button",
    );
    vm.wait_for_line("LIFECYCLE power-button", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for_line("TESTS DONE", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for_line("LIFECYCLE held", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let report = e2e::GuestReport::parse(&vm.stdout_so_far());
    report.assert_passed(&["lifecycle.blk", "lifecycle.counter"]);
    let blk = report
        .detail("lifecycle.blk")
        .unwrap_or_default()
        .to_string();
    let counters = api::call(&v.socket, "GET", "vm.counters", None).json();
    assert_eq!(
        counters["_disk0"]["write_ops"].as_u64(),
        Some(field::<u64>(&blk, "completed")),
        "vm.counters {counters} against the guest's {blk}"
    );
    assert_eq!(
        counters["_disk0"]["write_bytes"].as_u64(),
        Some(field::<u64>(&blk, "bytes")),
        "vm.counters {counters} against the guest's {blk}"
    );
    assert!(
        blk.contains("duplicates=0") && blk.contains("errors=0"),
        "{blk}"
    );
    ok(
        &api::call(&v.socket, "PUT", "vmm.shutdown", None),
        "vmm.shutdown",
    );
    vm.finish(Duration::from_secs(5)).assert_success();
}

#[test]
fn reboot_and_power_button() {
    if !require_kvm("reboot_and_power_button") {
        return;
    }
    let v = ApiVmm::new("lifecycle-reboot");
    let vm = start(&v, LIFECYCLE_CMDLINE);
    vm.wait_for_line("LIFECYCLE boot=0", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_ticks(&vm, 2, WAIT);
    ok(&api::call(&v.socket, "PUT", "vm.reboot", None), "reboot");
    // A fresh machine: the guest boots again; CMOS NVRAM survives a reset.
    vm.wait_for_line("LIFECYCLE boot=1", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["state"], "Running", "{info}");
    let n = ticks(&vm).len();
    wait_ticks(&vm, n + 2, WAIT);
    // The power button on the rebooted machine: the guest powers off, the VMM exits 0.
    ok(
        &api::call(&v.socket, "PUT", "vm.power-button", None),
        "power-button",
    );
    let run = vm.finish(WAIT);
    run.assert_success();
    let banner = "NIMBUS-TEST-GUEST stage1";
    let last_boot = format!(
        "{banner}{}",
        run.stdout.rsplit(banner).next().unwrap_or_default()
    );
    assert!(last_boot.contains("LIFECYCLE boot=1"), "{}", run.describe());
    assert!(
        last_boot.contains("LIFECYCLE power-button"),
        "{}",
        run.describe()
    );
    e2e::GuestReport::parse(&last_boot).assert_passed(&["lifecycle.blk", "lifecycle.counter"]);
    assert!(
        run.stderr.contains("guest powered off after 2 boot(s)"),
        "{}",
        run.stderr
    );
    assert!(!v.socket.exists(), "API socket left behind");
}

/// A termination signal stops the guest, removes the socket and exits 0.
#[test]
fn sigterm_stops_cleanly() {
    if !require_kvm("sigterm_stops_cleanly") {
        return;
    }
    let v = ApiVmm::new("lifecycle-sigterm");
    let vm = start(&v, LIFECYCLE_CMDLINE);
    wait_ticks(&vm, 2, WAIT);
    let pid = api::call(&v.socket, "GET", "vmm.ping", None).json()["pid"]
        .as_i64()
        .expect("pid");
    // SAFETY: kill(2) on the VMM's own pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let run = vm.finish(Duration::from_secs(5));
    run.assert_success();
    assert!(!v.socket.exists(), "API socket left behind");
    assert!(run.stderr.contains("signal 15"), "{}", run.stderr);
}
