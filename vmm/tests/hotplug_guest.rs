//! PCI hotplug under the test guest, driven through the API: the guest's lifecycle mode
//! handles the GED's PCI hotplug event as an OS without an AML interpreter would (it reads the
//! VMM's hotplug registers, reports the new slot's IDs, ejects the slot the host asked for;
//! `guest/src/hotplug.rs`). A disk is added and removed 20 times with the same id: each add
//! answers 200 with the same address, the guest sees a virtio-blk device in that slot, and
//! once the guest has ejected it the VMM holds no more descriptors or threads than before,
//! the image is unlocked, and the device's BAR and MSI GSIs are handed out again to the next
//! add (nothing leaks). A vhost-user disk (the project's daemon, guest RAM shared) is then
//! hot-added and removed: the guest sees it, and once it is ejected the VMM closes the
//! connection, so the single-frontend daemon exits 0. A pmem device is added and removed
//! twice (its memory slot deleted and file closed each time), and a disk on the second PCI
//! segment is added and ejected through that segment's bitmaps. A NIC on a TAP descriptor sent
//! with the request, a virtio-fs share and a vsock device are added and removed (the VMM's
//! copies of the descriptor are closed, virtiofsd exits, the vsock socket goes).
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::time::{Duration, Instant};

use e2e::api::{self, ApiVmm};
use e2e::{require_kvm, spawn_vm};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(30);
const CYCLES: usize = 20;

/// The device tree's resources of device `id`'s PCI node.
fn resources(info: &serde_json::Value, id: &str) -> serde_json::Value {
    info["device_tree"][format!("_virtio-pci-{id}")]["resources"].clone()
}

/// Waits until process `pid` holds `before`'s descriptors and threads again (a removed
/// device released); `what` names it in the failure.
fn wait_until_holding(pid: u32, before: (usize, usize), what: &str) {
    let deadline = Instant::now() + WAIT;
    while e2e::process_holds(pid) != before {
        assert!(
            Instant::now() < deadline,
            "{what}: still held: {before:?} -> {:?}",
            e2e::process_holds(pid)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn disk_added_and_removed_twenty_times_leaks_nothing() {
    if !require_kvm("disk_added_and_removed_twenty_times_leaks_nothing") {
        return;
    }
    let v = ApiVmm::new("hotplug");
    let image = v.dir.file("hot.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let base = v.dir.file("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("image");
    // Shared RAM, for the vhost-user disk added last.
    let mut cmd = e2e::nimbus_test_guest(
        NIMBUS,
        "size=128M,shared=on",
        "lifecycle=1 lifecycle.hold=1 lifecycle.blk.count=0 expect.cpus=1 expect.mem=128M",
    );
    cmd.args([
        "--cpus",
        "boot=1",
        "--platform",
        "num_pci_segments=2",
        "--disk",
    ])
    .arg(format!("path={}", base.display()))
    .arg("--api-socket")
    .arg(&v.socket);
    let vm = spawn_vm(cmd);
    v.wait_ready();
    vm.wait_for_line("INFO lifecycle start", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = vm.pid().expect("pid");
    let add = format!(r#"{{"path":"{}","id":"hot"}}"#, image.display());
    let mut first: Option<(String, serde_json::Value)> = None;
    let before = e2e::process_holds(pid);
    let mut add_times = Vec::new();
    let mut release_times = Vec::new();
    for cycle in 1..=CYCLES {
        let t = Instant::now();
        let added = api::call(&v.socket, "PUT", "vm.add-disk", Some(&add));
        add_times.push(t.elapsed());
        assert_eq!(added.status, 200, "cycle {cycle}: {}", added.text());
        let bdf = added.json()["bdf"].as_str().unwrap_or_default().to_string();
        let slot = u8::from_str_radix(&bdf[8..10], 16).expect("slot");
        let seen = vm.nth_line("INFO hotplug.added", cycle, WAIT);
        assert_eq!(
            seen.trim_end(),
            format!("INFO hotplug.added seg=0 slot={slot} id=1af4:1042"),
            "cycle {cycle}: the guest sees a virtio-blk device in slot {slot}"
        );
        assert!(
            e2e::is_ofd_locked(&image),
            "cycle {cycle}: the image is served, so locked"
        );
        let info = api::call(&v.socket, "GET", "vm.info", None).json();
        let res = resources(&info, "hot");
        match &first {
            None => first = Some((bdf.clone(), res)),
            Some((b, r)) => {
                assert_eq!(&bdf, b, "cycle {cycle}: the same slot");
                assert_eq!(
                    &res, r,
                    "cycle {cycle}: the same BAR and GSIs, handed out again"
                );
            }
        }
        let removed = api::call(
            &v.socket,
            "PUT",
            "vm.remove-device",
            Some(r#"{"id":"hot"}"#),
        );
        assert_eq!(removed.status, 204, "cycle {cycle}: {}", removed.text());
        vm.nth_line("INFO hotplug.ejected", cycle, WAIT);
        let ejected_at = Instant::now();
        let deadline = Instant::now() + WAIT;
        loop {
            let info = api::call(&v.socket, "GET", "vm.info", None).json();
            if info["device_tree"].get("hot").is_none() && e2e::process_holds(pid) == before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: still held after the ejection: {before:?} -> {:?}\n{info}",
                e2e::process_holds(pid)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        release_times.push(ejected_at.elapsed());
        assert!(
            !e2e::is_ofd_locked(&image),
            "cycle {cycle}: the image is still locked"
        );
    }
    add_times.sort();
    release_times.sort();
    eprintln!(
        "hotplug: vm.add-disk answered in {:?} (median of {CYCLES}; max {:?}); the guest's \
         ejection line -> released {:?} (median, polled every 10 ms)",
        add_times[CYCLES / 2],
        add_times[CYCLES - 1],
        release_times[CYCLES / 2]
    );

    // A vhost-user disk: served by the daemon over guest RAM; removal closes the connection.
    let socket = v.dir.file("vub.sock");
    let daemon = e2e::VhostUserBlockDaemon::start(
        &format!("path={},socket={}", image.display(), socket.display()),
        &socket,
        &v.dir.file("vub.log"),
    );
    let added = api::call(
        &v.socket,
        "PUT",
        "vm.add-disk",
        Some(&format!(
            r#"{{"vhost_user":true,"vhost_socket":"{}","id":"vub"}}"#,
            socket.display()
        )),
    );
    assert_eq!(added.status, 200, "vhost-user disk: {}", added.text());
    let seen = vm.nth_line("INFO hotplug.added", CYCLES + 1, WAIT);
    assert!(seen.trim_end().ends_with("id=1af4:1042"), "{seen}");
    let removed = api::call(
        &v.socket,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id":"vub"}"#),
    );
    assert_eq!(removed.status, 204, "{}", removed.text());
    vm.nth_line("INFO hotplug.ejected", CYCLES + 1, WAIT);
    daemon.finish(WAIT).assert_clean_exit();

    // On the second PCI segment (Kata puts virtio-fs there): the segment's own slot bitmaps.
    let seg1 = v.dir.file("seg1.img");
    std::fs::write(&seg1, vec![0u8; 1 << 20]).expect("image");
    let added = api::call(
        &v.socket,
        "PUT",
        "vm.add-disk",
        Some(&format!(
            r#"{{"path":"{}","id":"s1","pci_segment":1}}"#,
            seg1.display()
        )),
    );
    assert_eq!(added.status, 200, "segment 1: {}", added.text());
    assert_eq!(added.json()["bdf"], "0001:00:01.0", "{}", added.text());
    let seen = vm.nth_line("INFO hotplug.added", CYCLES + 2, WAIT);
    assert!(seen.contains("seg=1 slot=1 "), "{seen}");
    let removed = api::call(&v.socket, "PUT", "vm.remove-device", Some(r#"{"id":"s1"}"#));
    assert_eq!(removed.status, 204, "{}", removed.text());
    let ejected = vm.nth_line("INFO hotplug.ejected", CYCLES + 2, WAIT);
    assert!(ejected.contains("seg=1 slot=1"), "{ejected}");
    // Released (what the pmem rounds below count from).
    let deadline = Instant::now() + WAIT;
    while e2e::is_ofd_locked(&seg1) {
        assert!(Instant::now() < deadline, "segment 1's disk still held");
        std::thread::sleep(Duration::from_millis(10));
    }

    // A pmem device: its file mapped as a memory slot; removal deletes the slot and closes it.
    let pmem = v.dir.file("pmem.img");
    std::fs::write(&pmem, vec![0u8; 2 << 20]).expect("pmem file");
    let before = e2e::process_holds(pid);
    for round in 1..=2 {
        let added = api::call(
            &v.socket,
            "PUT",
            "vm.add-pmem",
            Some(&format!(r#"{{"file":"{}","id":"pm"}}"#, pmem.display())),
        );
        assert_eq!(added.status, 200, "pmem: {}", added.text());
        let seen = vm.nth_line("INFO hotplug.added", CYCLES + 2 + round, WAIT);
        assert!(seen.trim_end().ends_with("id=1af4:105b"), "{seen}");
        let removed = api::call(&v.socket, "PUT", "vm.remove-device", Some(r#"{"id":"pm"}"#));
        assert_eq!(removed.status, 204, "{}", removed.text());
        vm.nth_line("INFO hotplug.ejected", CYCLES + 2 + round, WAIT);
        wait_until_holding(pid, before, &format!("pmem round {round}"));
    }

    // A NIC on a TAP descriptor handed over with the request, as Kata and libvirt add them:
    // removal closes the VMM's copies of the descriptor.
    let tap_name = format!("nhp{}", std::process::id() % 100_000);
    let tap = net_util::Tap::open_named(&tap_name, 1)
        .unwrap_or_else(|e| panic!("TAP {tap_name}: {e}"))
        .pop()
        .expect("one queue");
    let before = e2e::process_holds(pid);
    let added = api::call_with_fds(
        &v.socket,
        "PUT",
        "vm.add-net",
        Some(r#"{"id":"nic","mac":"52:54:00:12:34:56"}"#),
        &[std::os::fd::AsRawFd::as_raw_fd(&tap)],
    );
    assert_eq!(
        added.status,
        200,
        "vm.add-net with a TAP fd: {}",
        added.text()
    );
    let line = vm.nth_line("INFO hotplug.added", CYCLES + 5, WAIT);
    assert!(line.trim_end().ends_with("id=1af4:1041"), "{line}");
    let removed = api::call(
        &v.socket,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id":"nic"}"#),
    );
    assert_eq!(removed.status, 204, "{}", removed.text());
    vm.nth_line("INFO hotplug.ejected", CYCLES + 5, WAIT);
    wait_until_holding(pid, before, "the NIC");
    drop(tap);

    // A virtio-fs share (virtiofsd) and a vsock device: seen by the guest; removal closes the
    // share's connection (virtiofsd exits) and the vsock socket.
    let shared = v.dir.file("share");
    std::fs::create_dir_all(&shared).expect("share dir");
    let fs_socket = v.dir.file("fs.sock");
    let virtiofsd = e2e::Virtiofsd::start(&shared, &fs_socket, &v.dir.file("virtiofsd.log"), &[]);
    let vsock = v.dir.file("vsock.sock");
    let mut seen = CYCLES + 5;
    for (id, body, device) in [
        (
            "share",
            format!(
                r#"{{"tag":"t","socket":"{}","id":"share"}}"#,
                fs_socket.display()
            ),
            "105a",
        ),
        (
            "vs",
            format!(r#"{{"cid":3,"socket":"{}","id":"vs"}}"#, vsock.display()),
            "1053",
        ),
    ] {
        let route = if id == "vs" {
            "vm.add-vsock"
        } else {
            "vm.add-fs"
        };
        let added = api::call(&v.socket, "PUT", route, Some(&body));
        assert_eq!(added.status, 200, "{route}: {}", added.text());
        seen += 1;
        let line = vm.nth_line("INFO hotplug.added", seen, WAIT);
        assert!(
            line.trim_end().ends_with(&format!("id=1af4:{device}")),
            "{line}"
        );
        let removed = api::call(
            &v.socket,
            "PUT",
            "vm.remove-device",
            Some(&format!(r#"{{"id":"{id}"}}"#)),
        );
        assert_eq!(removed.status, 204, "{}", removed.text());
        vm.nth_line("INFO hotplug.ejected", seen, WAIT);
    }
    virtiofsd.finish(WAIT).assert_clean_exit();
    let deadline = Instant::now() + WAIT;
    while vsock.exists() {
        assert!(
            Instant::now() < deadline,
            "the vsock socket is left once the device is gone"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let shutdown = api::call(&v.socket, "PUT", "vmm.shutdown", None);
    assert_eq!(shutdown.status, 200, "{}", shutdown.text());
    let run = vm.finish(WAIT);
    run.assert_success();
    assert!(!run.stderr.contains("ERROR"), "{}", run.stderr);
}
