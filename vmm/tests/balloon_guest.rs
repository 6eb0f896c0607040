//! virtio-balloon under the test guest, driven through the API: the guest touches 64 MiB,
//! `vm.resize desired_balloon` raises the target (the guest sees the configuration change
//! interrupt), the guest inflates exactly those pages and the VMM's RSS (from
//! /proc/<pid>/status) falls by most of them; `vm.info` and `vm.counters` show the balloon;
//! lowering the target lets the guest find the pages zeroed and deflate them; page numbers
//! outside RAM are refused; a free range the guest reports (free page reporting) is dropped and
//! the RSS falls again.
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::time::Duration;

use e2e::api::{self, ApiVmm};
use e2e::{guest_elf, require_kvm, spawn_vm, stage1_cmdline};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
const BALLOON_MIB: u64 = 64;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

#[test]
fn balloon_inflates_through_vm_resize_and_the_rss_falls() {
    if !require_kvm("balloon_inflates_through_vm_resize_and_the_rss_falls") {
        return;
    }
    let v = ApiVmm::new("balloon");
    let cmdline = format!(
        "{} expect.virtio=rng:1,balloon:1 balloon.initial=0 balloon.mib={BALLOON_MIB} \
         balloon.hostile=1 balloon.report=1",
        stage1_cmdline(1, 256 * MIB)
    );
    let mut cmd = v.command(NIMBUS, &["--memory", "size=256M", "--serial", "tty"]);
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--console",
        "off",
        "--balloon",
        "size=0,free_page_reporting=on",
        "--cmdline",
        &cmdline,
    ]);
    let vm = spawn_vm(cmd);
    v.wait_ready();
    let pid = vm.pid().expect("pid");
    vm.wait_for_line("INFO virtio.balloon0.touched", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = rss_bytes(pid);

    // desired_ram on a VM without memory hotplug (no hotplug_size) is refused by name.
    let refused = api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(r#"{"desired_vcpus":null,"desired_ram":1073741824,"desired_balloon":null}"#),
    );
    assert_eq!(refused.status, 500, "{}", refused.text());
    assert!(refused.text().contains("desired_ram"), "{}", refused.text());
    assert!(
        refused.text().contains("hotplug_size"),
        "{}",
        refused.text()
    );
    let too_big = api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(&format!(r#"{{"desired_balloon":{}}}"#, 256 * MIB)),
    );
    assert_eq!(too_big.status, 500, "{}", too_big.text());

    let raise = api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(&format!(
            r#"{{"desired_vcpus":null,"desired_ram":null,"desired_balloon":{}}}"#,
            BALLOON_MIB * MIB
        )),
    );
    assert_eq!(raise.status, 204, "{}", raise.text());
    vm.wait_for_line("INFO virtio.balloon0.inflated", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    let after = rss_bytes(pid);
    let fell = before.saturating_sub(after);
    eprintln!(
        "VmRSS before inflating {} MiB, after {} MiB (fell by {} MiB of {BALLOON_MIB})",
        before / MIB,
        after / MIB,
        fell / MIB
    );
    assert!(
        fell >= BALLOON_MIB * MIB * 3 / 4,
        "RSS fell by {fell} bytes only (before {before}, after {after})"
    );
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(
        info["config"]["balloon"]["size"],
        BALLOON_MIB * MIB,
        "{info}"
    );
    assert_eq!(
        info["memory_actual_size"],
        (256 - BALLOON_MIB) * MIB,
        "{info}"
    );
    let counters = api::call(&v.socket, "GET", "vm.counters", None).json();
    assert_eq!(
        counters["__balloon"]["inflated_pages"],
        BALLOON_MIB * MIB / 4096,
        "{counters}"
    );
    assert_eq!(counters["__balloon"]["refused_pages"], 0, "{counters}");

    let lower = api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(r#"{"desired_balloon":0}"#),
    );
    assert_eq!(lower.status, 204, "{}", lower.text());
    // The guest then sends 2048 page numbers outside its RAM (the PCI hole, the top of the
    // 32-bit range): refused and counted, and the device goes on serving.
    vm.wait_for_line("virtio.balloon0.hostile", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let counters = api::call(&v.socket, "GET", "vm.counters", None).json();
    assert_eq!(counters["__balloon"]["refused_pages"], 2048, "{counters}");

    // Free page reporting: the guest touches the 64 MiB again, the host says go (a target of
    // one page), the guest reports the range free, and the RSS falls again.
    vm.wait_for_line("INFO virtio.balloon0.retouched", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    let retouched = rss_bytes(pid);
    let go = api::call(
        &v.socket,
        "PUT",
        "vm.resize",
        Some(r#"{"desired_balloon":4096}"#),
    );
    assert_eq!(go.status, 204, "{}", go.text());
    vm.wait_for_line("INFO virtio.balloon0.reported", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    let reported = rss_bytes(pid);
    let fell = retouched.saturating_sub(reported);
    eprintln!(
        "VmRSS before reporting {} MiB free, after {} MiB (fell by {} MiB)",
        retouched / MIB,
        reported / MIB,
        fell / MIB
    );
    assert!(
        fell >= BALLOON_MIB * MIB * 3 / 4,
        "RSS fell by {fell} bytes only after reporting (before {retouched}, after {reported})"
    );
    let counters = api::call(&v.socket, "GET", "vm.counters", None).json();
    assert_eq!(
        counters["__balloon"]["reported_bytes"],
        BALLOON_MIB * MIB,
        "{counters}"
    );
    let run = vm.finish(WAIT);
    run.assert_success();
    run.report().assert_passed(&[
        "virtio.count",
        "virtio.balloon0.init",
        "virtio.balloon0.initial",
        "virtio.balloon0.raise",
        "virtio.balloon0.inflate",
        "virtio.balloon0.lower",
        "virtio.balloon0.zeroed",
        "virtio.balloon0.deflate",
        "virtio.balloon0.hostile",
        "virtio.balloon0.report",
    ]);
}

/// `vm.resize` before boot: `desired_balloon` becomes the configuration's balloon size (what the
/// boot will ask of the guest); on a VM without a balloon it is refused with a message naming
/// why; `desired_ram` becomes the configured RAM size. (Nothing boots, but the VMM opens /dev/kvm at start.)
#[test]
fn resize_before_boot_changes_the_configured_balloon() {
    if !require_kvm("resize_before_boot_changes_the_configured_balloon") {
        return;
    }
    let v = ApiVmm::new("balloon-created");
    let vm = spawn_vm(v.command(NIMBUS, &[]));
    v.wait_ready();
    let put = |route: &str, body: &str| api::call(&v.socket, "PUT", route, Some(body));
    let plain = api::guest_vm_body(1, 256, "x", "");
    assert_eq!(put("vm.create", &plain).status, 204);
    let no_balloon = put("vm.resize", r#"{"desired_balloon":1048576}"#);
    assert_eq!(no_balloon.status, 500, "{}", no_balloon.text());
    assert!(
        no_balloon.text().contains("no balloon"),
        "{}",
        no_balloon.text()
    );
    assert_eq!(
        api::call(&v.socket, "PUT", "vm.delete", None).status,
        204,
        "delete"
    );
    let with = api::guest_vm_body(1, 256, "x", r#""balloon": {"size": 0}"#);
    assert_eq!(put("vm.create", &with).status, 204);
    let ok = put(
        "vm.resize",
        &format!(r#"{{"desired_balloon":{}}}"#, 64 * MIB),
    );
    assert_eq!(ok.status, 204, "{}", ok.text());
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["balloon"]["size"], 64 * MIB, "{info}");
    // desired_ram before boot is the configuration's RAM size (Cloud Hypervisor's rule).
    let ram = put("vm.resize", r#"{"desired_ram":1073741824}"#);
    assert_eq!(ram.status, 204, "{}", ram.text());
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["memory"]["size"], 1u64 << 30, "{info}");
    vm.kill();
}

/// The same exchange under QEMU 7.2's `virtio-balloon-pci` (the reference for the guest side),
/// the target set through its human monitor (`balloon <guest MiB>`): every balloon check passes
/// and QEMU's RSS falls too.
#[test]
fn qemu_reference_balloon() {
    if !require_kvm("qemu_reference_balloon") {
        return;
    }
    let dir = e2e::ScratchDir::new("balloon-qemu");
    let monitor = dir.file("monitor.sock");
    let cmdline = format!(
        "{} expect.virtio=balloon:1 balloon.initial=0 balloon.mib={BALLOON_MIB}",
        stage1_cmdline(1, 256 * MIB)
    );
    let mut cmd = e2e::qemu_q35_command(&guest_elf(), 1, 256, &cmdline);
    cmd.args([
        "-device",
        "virtio-balloon-pci,disable-legacy=on",
        "-monitor",
    ])
    .arg(format!("unix:{},server,nowait", monitor.display()));
    let vm = spawn_vm(cmd);
    let pid = vm.pid().expect("pid");
    let hmp = |command: &str| {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&monitor).expect("monitor");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut banner = [0u8; 4096];
        let _ = s.read(&mut banner);
        s.write_all(format!("{command}\n").as_bytes()).expect("hmp");
        // Closing at once can drop the command before QEMU reads it: wait for its echo.
        std::thread::sleep(Duration::from_millis(300));
        let _ = s.read(&mut banner);
    };
    vm.wait_for_line("INFO virtio.balloon0.touched", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let before = rss_bytes(pid);
    hmp(&format!("balloon {}", 256 - BALLOON_MIB));
    vm.wait_for_line("INFO virtio.balloon0.inflated", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    let after = rss_bytes(pid);
    hmp("balloon 256");
    let run = vm.finish(WAIT);
    run.report().assert_passed(&[
        "virtio.balloon0.init",
        "virtio.balloon0.initial",
        "virtio.balloon0.raise",
        "virtio.balloon0.inflate",
        "virtio.balloon0.lower",
        "virtio.balloon0.zeroed",
        "virtio.balloon0.deflate",
    ]);
    eprintln!(
        "QEMU VmRSS before inflating {} MiB, after {} MiB",
        before / MIB,
        after / MIB
    );
    assert!(
        before.saturating_sub(after) >= BALLOON_MIB * MIB * 3 / 4,
        "QEMU's RSS: {before} -> {after}"
    );
}
