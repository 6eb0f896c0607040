//! virtio-pmem under the test guest: the host file's marker read through the guest's memory, a
//! guest write that lands in the file with `discard_writes=off` and not with `on`, and a FLUSH
//! request answered. Asserted on both sides (the guest's checks and the files' bytes).
//!
//! Needs /dev/kvm; without it each test prints a loud SKIPPED line.

use std::process::Command;
use std::time::Duration;

use e2e::{guest_elf, require_kvm, run_vm, stage1_cmdline, ScratchDir, Stage2Keys};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Where the guest writes (guest/src/pmem.rs `WRITE_OFFSET`).
const WRITE_OFFSET: usize = 4096;

fn pmem_file(path: &std::path::Path, marker: &str, size: usize) {
    let mut bytes = vec![0u8; size];
    bytes[..marker.len()].copy_from_slice(marker.as_bytes());
    std::fs::write(path, bytes).expect("pmem file");
}

#[test]
fn pmem_marker_write_and_flush() {
    if !require_kvm("pmem_marker_write_and_flush") {
        return;
    }
    let dir = ScratchDir::new("pmem");
    let kept = dir.file("kept.img");
    let discarded = dir.file("discarded.img");
    pmem_file(&kept, "nimbus-pmem-kept", 2 << 20);
    pmem_file(&discarded, "nimbus-pmem-discarded", 4 << 20);
    let keys = Stage2Keys {
        virtio: Some(vec![("rng", 1), ("pmem", 2)]),
        ..Default::default()
    };
    let cmdline = format!(
        "{} {} pmem0.marker=nimbus-pmem-kept pmem0.size=2M pmem0.write=written-by-the-guest-0 \
         pmem1.marker=nimbus-pmem-discarded pmem1.size=4M pmem1.write=written-by-the-guest-1",
        stage1_cmdline(1, 256 << 20),
        keys.to_cmdline()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        "off",
        "--cmdline",
        &cmdline,
        "--pmem",
        &format!("file={}", kept.display()),
        // The second on PCI segment 1: its region comes from that segment's 64-bit share (most
        // of the window, so that its BAR lies in the 8 GiB the guest maps for BARs).
        &format!(
            "file={},discard_writes=on,pci_segment=1",
            discarded.display()
        ),
        "--platform",
        "num_pci_segments=2",
        "--pci-segment",
        "pci_segment=1,mmio64_aperture_weight=31",
    ]);
    let run = run_vm(cmd, TIMEOUT);
    run.assert_success();
    let mut checks = vec!["virtio.count".to_string()];
    for n in 0..2 {
        for c in ["init", "region", "marker", "write", "flush", "msix"] {
            checks.push(format!("virtio.pmem{n}.{c}"));
        }
    }
    let refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
    let at = |path: &std::path::Path, len: usize| {
        let bytes = std::fs::read(path).expect("read back");
        bytes[WRITE_OFFSET..WRITE_OFFSET + len].to_vec()
    };
    let want = b"written-by-the-guest-0";
    assert_eq!(at(&kept, want.len()), want, "{}", run.describe());
    assert_eq!(
        at(&discarded, want.len()),
        vec![0u8; want.len()],
        "discard_writes=on wrote to the file\n{}",
        run.describe()
    );
    assert_eq!(
        std::fs::metadata(&discarded).expect("meta").len(),
        4 << 20,
        "file size"
    );
}

#[test]
fn unusable_pmem_files_are_refused_with_their_reason() {
    let dir = ScratchDir::new("pmem-bad");
    let small = dir.file("small.img");
    std::fs::write(&small, [0u8; 4096]).expect("file");
    for (arg, want) in [
        (format!("file={}", small.display()), "multiple of 2 MiB"),
        (
            format!("file={},size=2M,discard_writes=on", small.display()),
            "read-only",
        ),
        ("file=/dev/null,size=2M".to_string(), "not a regular file"),
        (
            format!("file={},size=3M", small.display()),
            "multiple of 2 MiB",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_nimbus"))
            .arg("--kernel")
            .arg(guest_elf())
            .args(["--console", "off", "--pmem", &arg])
            .output()
            .expect("nimbus");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{arg}: {stderr}");
        assert!(stderr.contains(want), "{arg}: {stderr}");
    }
}

/// The same guest checks under QEMU 7.2's `virtio-pmem-pci` (the reference for the guest side):
/// the marker, the write landing in the file, the FLUSH answered. QEMU's device has no MSI-X,
/// so `msix` is not asserted there.
#[test]
fn qemu_reference_pmem() {
    if !require_kvm("qemu_reference_pmem") {
        return;
    }
    let dir = ScratchDir::new("pmem-qemu");
    let file = dir.file("qemu.img");
    pmem_file(&file, "nimbus-pmem-qemu", 2 << 20);
    let cmdline = format!(
        "{} expect.virtio=pmem:1 pmem0.marker=nimbus-pmem-qemu pmem0.size=2M \
         pmem0.write=written-under-qemu",
        stage1_cmdline(1, 256 << 20)
    );
    let mut cmd = e2e::qemu_q35_command(&guest_elf(), 1, 256, &cmdline);
    cmd.args(["-m", "256M,maxmem=1G,slots=1", "-object"])
        .arg(format!(
            "memory-backend-file,id=pm0,share=on,mem-path={},size=2M",
            file.display()
        ))
        .args(["-device", "virtio-pmem-pci,memdev=pm0"]);
    let run = run_vm(cmd, TIMEOUT);
    let checks: Vec<String> = ["init", "region", "marker", "write", "flush"]
        .iter()
        .map(|c| format!("virtio.pmem0.{c}"))
        .chain(["virtio.count".to_string()])
        .collect();
    let refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    run.report().assert_passed_but(&refs, "virtio.pmem0.msix");
    let bytes = std::fs::read(&file).expect("read back");
    assert_eq!(
        &bytes[WRITE_OFFSET..WRITE_OFFSET + 18],
        b"written-under-qemu",
        "{}",
        run.describe()
    );
}

/// `vm.add-pmem` before boot (as ch-remote and Kata send it): 204 (409 for the same file
/// twice), the device in `vm.info`'s configuration with its generated id after the boot, the
/// guest reads the marker and its write lands in the file. (Refusing it while the VM runs is
/// `controller::legality`'s, unit-tested there.)
#[test]
fn add_pmem_through_the_api_before_boot() {
    if !require_kvm("add_pmem_through_the_api_before_boot") {
        return;
    }
    let v = e2e::api::ApiVmm::new("pmem-api");
    let file = v.dir.file("api.img");
    pmem_file(&file, "nimbus-pmem-api", 2 << 20);
    let vm = e2e::spawn_vm(v.command(env!("CARGO_BIN_EXE_nimbus"), &[]));
    v.wait_ready();
    let cmdline = format!(
        "{} expect.virtio=rng:1,pmem:1 pmem0.marker=nimbus-pmem-api pmem0.write=written-over-api",
        stage1_cmdline(1, 256 << 20)
    );
    let body = e2e::api::guest_vm_body(1, 256, &cmdline, "");
    let call = |route: &str, body: Option<&str>| e2e::api::call(&v.socket, "PUT", route, body);
    assert_eq!(call("vm.create", Some(&body)).status, 204);
    let pmem = format!(r#"{{"file":"{}","discard_writes":false}}"#, file.display());
    let added = call("vm.add-pmem", Some(&pmem));
    assert_eq!(added.status, 204, "{}", added.text());
    let again = call("vm.add-pmem", Some(&pmem));
    assert_eq!(again.status, 409, "same file twice: {}", again.text());
    let boot = call("vm.boot", None);
    assert_eq!(boot.status, 204, "{}", boot.text());
    let info = e2e::api::call(&v.socket, "GET", "vm.info", None).json();
    assert_eq!(info["config"]["pmem"][0]["id"], "_pmem0", "{info}");
    vm.wait_for_line("TESTS DONE", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let run = vm.finish(TIMEOUT);
    let refs = [
        "virtio.pmem0.init",
        "virtio.pmem0.region",
        "virtio.pmem0.marker",
        "virtio.pmem0.write",
        "virtio.pmem0.flush",
    ];
    run.report().assert_passed(&refs);
    let bytes = std::fs::read(&file).expect("read back");
    assert_eq!(
        &bytes[WRITE_OFFSET..WRITE_OFFSET + 16],
        b"written-over-api",
        "{}",
        run.describe()
    );
}
