//! Error paths of the `nimbus` binary: each bad input gets one clear error line on standard error
//! and a non-zero exit status, never a panic. The kernel-loading cases need `/dev/kvm` (the kernel
//! is loaded into a real VM's memory); they report SKIPPED loudly where it does not exist.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nimbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nimbus"))
        .args(args)
        .output()
        .expect("run nimbus")
}

/// Asserts a failed run with exactly one stderr line containing every fragment.
fn assert_one_error_line(out: &Output, fragments: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr: {stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {stderr}");
    assert!(lines[0].starts_with("nimbus: error: "), "{stderr}");
    for f in fragments {
        assert!(lines[0].contains(f), "missing '{f}' in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nimbus-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("SKIPPED {test}: /dev/kvm does not exist on this machine");
    false
}

/// A minimal, valid ELF64 executable loading one `hlt` at 1 MiB, with no PVH note.
fn elf_image_without_pvh_note() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    f.extend_from_slice(&64u64.to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for v in [1u32, 5] {
        f.extend_from_slice(&v.to_le_bytes()); // PT_LOAD, R+X
    }
    for v in [120u64, 0x10_0000, 0x10_0000, 1, 1, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.push(0xf4); // hlt
    f
}

#[test]
fn missing_kernel_option() {
    assert_one_error_line(&nimbus(&["--memory", "size=64M"]), &["no kernel given"]);
}

#[test]
fn zero_memory() {
    assert_one_error_line(
        &nimbus(&["--kernel", "/k", "--memory", "size=0"]),
        &["memory", "size 0"],
    );
}

#[test]
fn malformed_options() {
    assert_one_error_line(
        &nimbus(&["--kernel", "/k", "--cpus", "boot=two"]),
        &["--cpus", "'two'"],
    );
    assert_one_error_line(
        &nimbus(&["--kernel", "/k", "--cpus", "boot=4,max=2"]),
        &["below boot_vcpus"],
    );
    assert_one_error_line(
        &nimbus(&["--kernel", "/k", "--memory", "size=1G,colour=red"]),
        &["--memory", "colour"],
    );
    assert_one_error_line(
        &nimbus(&["--kernel", "/k", "--serial", "loud"]),
        &["serial", "loud"],
    );
    assert_one_error_line(
        &nimbus(&["--kernel", "/k", "--disk", "path=/img,poll_us=5000"]),
        &["poll_us 5000", "0..=1000"],
    );
    assert_one_error_line(&nimbus(&["--no-such-option"]), &["--no-such-option"]);
}

#[test]
fn bad_pci_segments() {
    for (args, fragments) in [
        (
            &["--platform", "num_pci_segments=17"][..],
            &["num_pci_segments 17", "1..=16"][..],
        ),
        (&["--platform", "num_pci_segments=x"], &["--platform"]),
        (&["--platform", "colour=red"], &["--platform", "colour"]),
        (
            &["--disk", "path=/img,pci_segment=1"],
            &["pci_segment 1 does not exist", "num_pci_segments 1"],
        ),
        (
            &[
                "--platform",
                "num_pci_segments=2",
                "--pci-segment",
                "pci_segment=2",
            ],
            &["segment 2 does not exist"],
        ),
        (
            &["--pci-segment", "pci_segment=0,mmio32_aperture_weight=0"],
            &["aperture weight of 0"],
        ),
        (
            &["--pci-segment", "mmio32_aperture_weight=2"],
            &["--pci-segment"],
        ),
    ] {
        let mut argv = vec!["--kernel", "/k"];
        argv.extend_from_slice(args);
        assert_one_error_line(&nimbus(&argv), fragments);
    }
}

#[test]
fn nonexistent_kernel() {
    if !kvm_or_skip("nonexistent_kernel") {
        return;
    }
    assert_one_error_line(
        &nimbus(&["--kernel", "/nonexistent/vmlinux", "--memory", "size=64M"]),
        &["cannot open kernel /nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn kernel_that_is_not_elf_or_bzimage() {
    if !kvm_or_skip("kernel_that_is_not_elf_or_bzimage") {
        return;
    }
    let path = scratch("not-a-kernel");
    std::fs::write(&path, b"#!/bin/sh\necho I am not a kernel\n").expect("write");
    let p = path.to_str().expect("utf-8 path");
    assert_one_error_line(
        &nimbus(&["--kernel", p, "--memory", "size=64M"]),
        &["neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn elf_without_pvh_note() {
    if !kvm_or_skip("elf_without_pvh_note") {
        return;
    }
    let path = scratch("no-pvh-note.elf");
    std::fs::write(&path, elf_image_without_pvh_note()).expect("write");
    let p = path.to_str().expect("utf-8 path");
    assert_one_error_line(
        &nimbus(&["--kernel", p, "--memory", "size=64M"]),
        &["no PVH entry note"],
    );
}

#[test]
fn no_access_to_dev_kvm() {
    if !kvm_or_skip("no_access_to_dev_kvm") {
        return;
    }
    // Run as an unprivileged user: /dev/kvm (mode 0600 or group kvm) is then out of reach.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let out = nimbus(&["--kernel", "/k"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("/dev/kvm") {
            eprintln!("SKIPPED no_access_to_dev_kvm: not root and this user can open /dev/kvm");
            return;
        }
        return assert_one_error_line(&out, &["cannot open /dev/kvm"]);
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_nimbus"),
            "--kernel",
            "/k",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_one_error_line(&out, &["cannot open /dev/kvm", "Permission denied"]);
}

#[test]
fn disk_images_that_are_not_raw_are_refused() {
    if !kvm_or_skip("disk_images_that_are_not_raw_are_refused") {
        return;
    }
    // Each format's header at the start of an otherwise raw-looking 1 MiB image (a VHD's
    // footer is its last sector).
    for (format, magic, at_end) in [
        ("qcow2", &b"QFI\xfb\x00\x00\x00\x03"[..], false),
        ("vhdx", &b"vhdxfile"[..], false),
        ("vmdk", &b"KDMV\x01\x00\x00\x00"[..], false),
        ("vhd", &b"conectix"[..], true),
    ] {
        let path = scratch(&format!("image.{format}"));
        let mut image = vec![0u8; 1 << 20];
        let offset = if at_end { image.len() - 512 } else { 0 };
        image[offset..offset + magic.len()].copy_from_slice(magic);
        std::fs::write(&path, &image).expect("write image");
        let p = path.to_str().expect("utf-8 path");
        let disk = format!("path={p}");
        let out = nimbus(&["--kernel", "/k", "--disk", &disk, "--console", "off"]);
        assert_one_error_line(
            &out,
            &[
                p,
                &format!("is a {format} image; Nimbus serves raw images only"),
            ],
        );
        // Only `image_type=raw` shows such a file to the guest as it is (then the kernel is
        // what fails here).
        let raw = format!("path={p},image_type=raw");
        let out = nimbus(&["--kernel", "/k", "--disk", &raw, "--console", "off"]);
        assert_one_error_line(&out, &["/k"]);
        let _ = std::fs::remove_file(&path);
    }
}
