//! Building the test guest and starting it under Nimbus, and the environment policy of the
//! tests that need KVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Environment variables that would change how the guest is compiled (they
/// override `guest/.cargo/config.toml`), removed before building it.
const GUEST_BUILD_ENV_REMOVE: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
];

/// Root of the Nimbus repository (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// A command that runs the VMM binary at `vmm` (Nimbus's command-line syntax) on the test guest
/// with `--memory memory`, the guest command line `cmdline`, the serial port on stdout and no
/// virtio console (so the guest's device counts are the test's devices); tests add their
/// devices and flags.
pub fn nimbus_test_guest(vmm: &str, memory: &str, cmdline: &str) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--memory",
        memory,
        "--serial",
        "tty",
        "--console",
        "off",
        "--cmdline",
        cmdline,
    ]);
    cmd
}

/// Builds the test guest (release profile, target dir `<repo>/target/guest`)
/// the first time it is called in this process and returns the absolute path
/// of the ELF. Concurrent callers wait for the one build.
///
/// # Panics
/// If the build fails; the message carries cargo's output.
pub fn guest_elf() -> PathBuf {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match GUEST.get_or_init(build_guest) {
        Ok(path) => path.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn build_guest() -> Result<PathBuf, String> {
    let root = repo_root();
    let guest_dir = root.join("guest");
    let target_dir = root.join("target").join("guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // Run from guest/ so that guest/.cargo/config.toml applies.
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .stdin(Stdio::null());
    for var in GUEST_BUILD_ENV_REMOVE {
        cmd.env_remove(var);
    }
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot run {} to build the test guest: {e}",
            Path::new(&cargo).display()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "building the test guest failed ({}) in {}:\n{}{}",
            out.status,
            guest_dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let elf = target_dir.join("release").join("guest");
    if !elf.is_file() {
        return Err(format!(
            "the guest build succeeded but {} does not exist",
            elf.display()
        ));
    }
    Ok(elf)
}

/// Whether `/dev/kvm` exists on this machine.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// The policy for tests that need KVM: returns `true` if `/dev/kvm` exists
/// (the test must then run, and fail if anything is wrong). Otherwise prints
/// a loud `SKIPPED (no /dev/kvm)` line naming the test to stderr and returns
/// `false`; the test should return at once.
pub fn require_kvm(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    eprintln!("\n*** SKIPPED (no /dev/kvm): {test} ***\n");
    false
}
