//! Link settings for the freestanding guest ELF.
//!
//! The guest is built for the host target (x86_64-unknown-linux-gnu) but does
//! not use the C runtime: it is linked statically at 1 MiB with our own linker
//! script, without start files or a build-id note.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=src/boot.s");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
        "-Wl,--no-dynamic-linker",
        "-Wl,-z,norelro",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
