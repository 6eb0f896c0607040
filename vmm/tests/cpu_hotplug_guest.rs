//! vCPU hotplug under the test guest, driven through `vm.resize`: the guest's lifecycle mode
//! handles the GED's CPU hotplug event as an OS without an AML interpreter would (it reads the
//! VMM's CPU hotplug registers, starts an inserted CPU with INIT-SIPI-SIPI and reports it once
//! it runs guest code, stops a CPU to remove with INIT and ejects it; `guest/src/cpuhp.rs`).
//!
//! With `--cpus boot=1,max=3`: growing to 2 brings vCPU 1 online (one more VMM thread, named
//! `vcpu1`; `vm.info` says `boot_vcpus` 2); shrinking to 1 (while paused, so the guest cannot
//! eject yet) leaves the removal pending and any further resize answers 429; once resumed the
//! guest ejects it and its thread ends; 0 and more than `max_vcpus` are refused (500); growing
//! to 3 right after brings up two vCPUs at once, vCPU 1 on its parked vCPU. Before boot,
//! `vm.resize` sets `boot_vcpus`, which the boot then starts.
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::time::{Duration, Instant};

use e2e::api::{self, ApiVmm};
use e2e::{require_kvm, spawn_vm, RunningVm};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(60);

/// The names of process `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

/// Waits until process `pid` has `threads` threads, returns its thread names.
fn wait_threads(vm: &RunningVm, pid: u32, threads: usize, why: &str) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, now) = e2e::process_holds(pid);
        if now == threads {
            return thread_names(pid);
        }
        assert!(
            Instant::now() < deadline,
            "{why}: {now} threads, not {threads}: {:?}\n{}",
            thread_names(pid),
            vm.describe_so_far()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn resize(v: &ApiVmm, vcpus: u32) -> api::Answer {
    api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(&format!(r#"{{"desired_vcpus":{vcpus}}}"#)),
    )
}

fn boot_vcpus(v: &ApiVmm) -> u64 {
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    info["config"]["cpus"]["boot_vcpus"].as_u64().unwrap_or(0)
}

#[test]
fn vcpus_are_added_ejected_and_added_again() {
    if !require_kvm("vcpus_are_added_ejected_and_added_again") {
        return;
    }
    let v = ApiVmm::new("cpuhp");
    let mut cmd = e2e::nimbus_test_guest(
        NIMBUS,
        "size=128M",
        "lifecycle=1 lifecycle.hold=1 lifecycle.blk.count=0 expect.cpus=1 expect.mem=128M",
    );
    let events = v.dir.file("events.json");
    cmd.args(["--cpus", "boot=1,max=3", "--api-socket"])
        .arg(&v.socket)
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()));
    let vm = spawn_vm(cmd);
    v.wait_ready();
    vm.wait_for_line("INFO lifecycle start", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for_line("INFO cpuhp trampoline", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = vm.pid().expect("pid");
    let (_, threads) = e2e::process_holds(pid);
    assert!(!thread_names(pid).iter().any(|n| n == "vcpu1"));

    // Grow: vCPU 1 comes online in the guest, on one more VMM thread.
    let grown = resize(&v, 2);
    assert_eq!(grown.status, 204, "{}", grown.text());
    assert_eq!(
        vm.nth_line("INFO cpuhp.online", 1, WAIT),
        "INFO cpuhp.online cpu=1 apic_id=1"
    );
    let names = wait_threads(&vm, pid, threads + 1, "after growing to 2");
    assert!(names.iter().any(|n| n == "vcpu1"), "{names:?}");
    assert_eq!(boot_vcpus(&v), 2);
    // The same count again changes nothing.
    assert_eq!(resize(&v, 2).status, 204);

    // Shrink, the VM paused so that the guest cannot eject yet: the removal stays pending,
    // and until the guest has ejected the vCPU any other resize is refused with Cloud
    // Hypervisor's 429.
    let paused = api::call(&v.socket, "PUT", "vm.pause", None);
    assert_eq!(paused.status, 204, "{}", paused.text());
    let shrunk = resize(&v, 1);
    assert_eq!(shrunk.status, 204, "{}", shrunk.text());
    assert_eq!(boot_vcpus(&v), 1, "vm.info follows the request at once");
    // (2 would be the vCPUs present, the one being removed included: a no-op, as in Cloud
    // Hypervisor.)
    for desired in [1, 3] {
        let again = resize(&v, desired);
        assert_eq!(
            again.status,
            429,
            "desired_vcpus {desired}: {}",
            again.text()
        );
        assert_eq!(again.text().trim(), r#"["Too Many Requests"]"#);
    }
    assert_eq!(boot_vcpus(&v), 1);
    let resumed = api::call(&v.socket, "PUT", "vm.resume", None);
    assert_eq!(resumed.status, 204, "{}", resumed.text());
    assert_eq!(
        vm.nth_line("INFO cpuhp.ejected", 1, WAIT),
        "INFO cpuhp.ejected cpu=1"
    );
    let names = wait_threads(&vm, pid, threads, "after the ejection");
    assert!(!names.iter().any(|n| n == "vcpu1"), "{names:?}");

    // Out of range.
    let zero = resize(&v, 0);
    assert_eq!(zero.status, 500, "{}", zero.text());
    assert!(
        zero.text().contains("Requested zero vCPUs"),
        "{}",
        zero.text()
    );
    let above = resize(&v, 4);
    assert_eq!(above.status, 500, "{}", above.text());
    assert!(
        above.text().contains("Requested vCPUs exceed maximum"),
        "{}",
        above.text()
    );
    assert_eq!(boot_vcpus(&v), 1, "refused resizes leave the count");

    // Grow again, to the maximum: vCPU 1 (its parked vCPU reused) and vCPU 2 (new).
    let onlined = vm.stdout_so_far().matches("INFO cpuhp.online").count();
    let grown = resize(&v, 3);
    assert_eq!(grown.status, 204, "{}", grown.text());
    let first = vm.nth_line("INFO cpuhp.online", onlined + 1, WAIT);
    let second = vm.nth_line("INFO cpuhp.online", onlined + 2, WAIT);
    assert_eq!(
        [first.as_str(), second.as_str()],
        [
            "INFO cpuhp.online cpu=1 apic_id=1",
            "INFO cpuhp.online cpu=2 apic_id=2"
        ]
    );
    let names = wait_threads(&vm, pid, threads + 2, "after growing to 3");
    assert!(
        names.iter().any(|n| n == "vcpu1") && names.iter().any(|n| n == "vcpu2"),
        "{names:?}"
    );
    assert_eq!(boot_vcpus(&v), 3);
    let out = vm.stdout_so_far();
    assert!(!out.contains("FAIL"), "{}", vm.describe_so_far());
    eprintln!(
        "VMM threads: {threads} with 1 vCPU, {} with 3; guest lines:\n{}",
        names.len(),
        out.lines()
            .filter(|l| l.contains("cpuhp"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Every resize of the running VM is announced; the four that worked are reported done.
    let events = std::fs::read_to_string(&events).expect("events");
    let count = |event: &str| events.matches(&format!(r#""event": "{event}""#)).count();
    assert_eq!((count("resizing"), count("resized")), (8, 4), "{events}");

    let down = api::call(&v.socket, "PUT", "vmm.shutdown", None);
    assert!(down.status < 300, "{}", down.text());
}

/// `vm.resize` before boot sets the configuration's `boot_vcpus` (400 when that makes it
/// invalid), and the boot starts that many vCPUs: the MADT enables them, each has its thread.
#[test]
fn resize_before_boot_sets_the_boot_vcpus() {
    if !require_kvm("resize_before_boot_sets_the_boot_vcpus") {
        return;
    }
    let v = ApiVmm::new("cpuhp-created");
    let vm = spawn_vm(v.command(NIMBUS, &[]));
    v.wait_ready();
    let body = api::guest_vm_body(
        1,
        128,
        "lifecycle=1 lifecycle.hold=1 lifecycle.blk.count=0",
        r#""cpus": {"boot_vcpus": 1, "max_vcpus": 4}"#,
    );
    let created = api::call(&v.socket, "PUT", "vm.create", Some(&body));
    assert_eq!(created.status, 204, "{}", created.text());
    let grown = resize(&v, 3);
    assert_eq!(grown.status, 204, "{}", grown.text());
    assert_eq!(boot_vcpus(&v), 3);
    for bad in [0, 5] {
        let refused = resize(&v, bad);
        assert_eq!(refused.status, 400, "{bad}: {}", refused.text());
    }
    assert_eq!(boot_vcpus(&v), 3, "refused resizes leave the count");

    let booted = api::call(&v.socket, "PUT", "vm.boot", None);
    assert_eq!(booted.status, 204, "{}", booted.text());
    vm.wait_for_line("INFO lifecycle start", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = vm.stdout_so_far();
    let lapics: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("INFO madt lapic uid="))
        .collect();
    let enabled = lapics.iter().filter(|l| l.ends_with("flags=0x1")).count();
    assert_eq!((lapics.len(), enabled), (4, 3), "{lapics:#?}");
    let names = thread_names(vm.pid().expect("pid"));
    for vcpu in ["vcpu0", "vcpu1", "vcpu2"] {
        assert!(names.iter().any(|n| n == vcpu), "{vcpu}: {names:?}");
    }
    assert!(!names.iter().any(|n| n == "vcpu3"), "{names:?}");
    vm.kill();
}
