//! `vm.resize-disk` under the test guest, driven through the API: the guest reads its disk's
//! capacity and waits (`blk.resize=1`); the host grows the image through the API, the image
//! file takes the new size, and the guest sees the new capacity after a configuration change
//! interrupt and reads the new last sector (zeros), also after a reboot (a new instance's
//! device on the same image). The errors: before boot 500, an unknown
//! id or a device that is not a disk 404, a size that is not a multiple of 512 500; a disk
//! served by a vhost-user backend 500 naming why; on a paused VM the resize is done and the
//! guest sees it once resumed.
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::path::Path;
use std::time::Duration;

use e2e::api::{self, ApiVmm};
use e2e::{require_kvm, spawn_vm, stage1_cmdline, write_disk_pattern, RunningVm};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

fn resize(socket: &Path, id: &str, size: u64) -> api::Answer {
    api::call(
        socket,
        "PUT",
        "vm.resize-disk",
        Some(&format!(r#"{{"id":"{id}","desired_size":{size}}}"#)),
    )
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("image").len()
}

/// The `config_irqs=` of the guest's `resized` line for device `n`, after checking its
/// capacity.
fn resized_line(vm: &RunningVm, n: usize, sectors: u64) -> u64 {
    let line = vm
        .wait_for_line(&format!("INFO virtio.blk{n}.resized"), WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    eprintln!("guest: {line}");
    assert!(
        line.contains(&format!("capacity={sectors} ")),
        "{line} (want {sectors} sectors)"
    );
    line.rsplit("config_irqs=")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no config_irqs in {line}"))
}

/// Waits until the guest has printed `n` lines containing `pattern`.
fn wait_nth_line(vm: &RunningVm, pattern: &str, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while vm.stdout_so_far().matches(pattern).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no line #{n} with {pattern:?}\n{}",
            vm.describe_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn resize_disk_grows_the_image_and_the_guest_sees_the_capacity() {
    if !require_kvm("resize_disk_grows_the_image_and_the_guest_sees_the_capacity") {
        return;
    }
    let v = ApiVmm::new("resize-disk");
    let image = v.dir.file("disk.img");
    write_disk_pattern(&image, MIB).expect("image");
    let vm = spawn_vm(v.command(NIMBUS, &[]));
    v.wait_ready();
    let cmdline = format!(
        "{} expect.virtio=blk:1,rng:1 blk.pattern.sector=16 blk.resize=1",
        stage1_cmdline(1, 256 * MIB)
    );
    let disks = format!(
        r#""disks": [{{"path": "{}", "id": "disk0"}}]"#,
        image.display()
    );
    let create = api::call(
        &v.socket,
        "PUT",
        "vm.create",
        Some(&api::guest_vm_body(1, 256, &cmdline, &disks)),
    );
    assert_eq!(create.status, 204, "{}", create.text());

    // Before boot no image is open: 500, as Cloud Hypervisor answers.
    let early = resize(&v.socket, "disk0", 2 * MIB);
    assert_eq!(early.status, 500, "{}", early.text());
    assert!(early.text().contains("not running"), "{}", early.text());
    assert_eq!(file_len(&image), MIB);

    let boot = api::call(&v.socket, "PUT", "vm.boot", None);
    assert_eq!(boot.status, 204, "{}", boot.text());
    vm.wait_for_line("INFO virtio.blk0.waiting capacity=2048", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));

    let unknown = resize(&v.socket, "nope", 2 * MIB);
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(
        unknown.text().contains("no disk with id nope"),
        "{}",
        unknown.text()
    );
    let not_a_disk = resize(&v.socket, "__rng", 2 * MIB);
    assert_eq!(not_a_disk.status, 404, "{}", not_a_disk.text());
    let unaligned = resize(&v.socket, "disk0", 2 * MIB + 100);
    assert_eq!(unaligned.status, 500, "{}", unaligned.text());
    assert!(
        unaligned.text().contains("not a multiple of 512"),
        "{}",
        unaligned.text()
    );
    assert_eq!(file_len(&image), MIB, "refused resizes change nothing");
    let info_before = api::call(&v.socket, "GET", "vm.info", None).json();

    // After a reboot the disk is a new instance's device on the same image: the resize must
    // reach the new driver (the first instance's device let go of its own).
    let reboot = api::call(&v.socket, "PUT", "vm.reboot", None);
    assert_eq!(reboot.status, 204, "{}", reboot.text());
    wait_nth_line(&vm, "INFO virtio.blk0.waiting capacity=2048", 2);

    let grow = resize(&v.socket, "disk0", 4 * MIB);
    assert_eq!(grow.status, 204, "{}", grow.text());
    assert_eq!(file_len(&image), 4 * MIB);
    let irqs = resized_line(&vm, 0, 4 * MIB / 512);
    assert!(irqs >= 1, "no configuration change interrupt");

    // The configuration holds no size: vm.info is unchanged.
    let info = api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["disks"], info_before["config"]["disks"]);
    assert_eq!(info["state"], "Running");

    let run = vm.finish(WAIT);
    run.assert_success();
    // The second boot's report (the first one stopped at the reboot).
    let second = run
        .stdout
        .rfind("NIMBUS-TEST-GUEST stage1")
        .map_or("", |at| &run.stdout[at..]);
    e2e::GuestReport::parse(second).assert_passed(&[
        "virtio.count",
        "virtio.blk0.init",
        "virtio.blk0.capacity",
        "virtio.blk0.read",
        "virtio.blk0.write",
        "virtio.blk0.resize",
    ]);
    // What the guest wrote before the resize is still there, and the file kept its size.
    assert_eq!(file_len(&image), 4 * MIB);
    e2e::verify_guest_pattern(&image, 16 * 512..24 * 512).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn resize_disk_on_a_paused_vm_and_a_vhost_user_disk_refused() {
    if !require_kvm("resize_disk_on_a_paused_vm_and_a_vhost_user_disk_refused") {
        return;
    }
    let v = ApiVmm::new("resize-disk-vu");
    let image = v.dir.file("disk.img");
    write_disk_pattern(&image, MIB).expect("image");
    let vu_image = v.dir.file("vu.img");
    write_disk_pattern(&vu_image, MIB).expect("image");
    let vu_socket = v.dir.file("vub.sock");
    let backend = format!(
        "path={},socket={},num_queues=1",
        vu_image.display(),
        vu_socket.display()
    );
    let daemon = e2e::VhostUserBlockDaemon::start(&backend, &vu_socket, &v.dir.file("daemon.log"));
    let vm = spawn_vm(v.command(NIMBUS, &[]));
    v.wait_ready();
    let cmdline = format!(
        "{} expect.virtio=blk:2,rng:1 blk0.resize=1",
        stage1_cmdline(1, 256 * MIB)
    );
    let extra = format!(
        r#""memory": {{"size": {}, "shared": true}},
           "disks": [{{"path": "{}", "id": "disk0"}},
                     {{"vhost_user": true, "vhost_socket": "{}", "id": "vu0"}}]"#,
        256 * MIB,
        image.display(),
        vu_socket.display()
    );
    let create = api::call(
        &v.socket,
        "PUT",
        "vm.create",
        Some(&api::guest_vm_body(1, 256, &cmdline, &extra)),
    );
    assert_eq!(create.status, 204, "{}", create.text());
    let boot = api::call(&v.socket, "PUT", "vm.boot", None);
    assert_eq!(boot.status, 204, "{}", boot.text());
    vm.wait_for_line("INFO virtio.blk0.waiting capacity=2048", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));

    let vu = resize(&v.socket, "vu0", 2 * MIB);
    assert_eq!(vu.status, 500, "{}", vu.text());
    assert!(vu.text().contains("vhost-user backend"), "{}", vu.text());
    assert_eq!(file_len(&vu_image), MIB);

    // Paused: the image grows at once; the guest sees it once it runs again.
    let pause = api::call(&v.socket, "PUT", "vm.pause", None);
    assert_eq!(pause.status, 204, "{}", pause.text());
    let grow = resize(&v.socket, "disk0", 3 * MIB);
    assert_eq!(grow.status, 204, "{}", grow.text());
    assert_eq!(file_len(&image), 3 * MIB);
    let resume = api::call(&v.socket, "PUT", "vm.resume", None);
    assert_eq!(resume.status, 204, "{}", resume.text());
    let irqs = resized_line(&vm, 0, 3 * MIB / 512);
    assert!(irqs >= 1, "no configuration change interrupt");

    let run = vm.finish(WAIT);
    run.assert_success();
    run.report()
        .assert_passed(&["virtio.blk0.resize", "virtio.blk1.capacity"]);
    daemon.finish(Duration::from_secs(10)).assert_clean_exit();
}
