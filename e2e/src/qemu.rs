//! QEMU, the reference VMM: finding it and its command lines for the test guest (q35, PVH) and
//! for the vhost-user devices the daemons serve.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds `qemu-system-x86_64` in `PATH`.
///
/// # Panics
/// If it is not installed (CI installs it with `scripts/install-deps`).
pub fn qemu_binary() -> PathBuf {
    const NAME: &str = "qemu-system-x86_64";
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(NAME))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => path,
        None => panic!("{NAME} not installed: run scripts/install-deps"),
    }
}

/// A QEMU q35 command line booting `elf` through PVH with the guest's serial
/// port on stdout, no display, no monitor, and exit on guest reset.
///
/// `-cpu host` is used without `arch-capabilities`: on PVM hosts KVM refuses
/// that MSR and QEMU aborts at start-up.
pub fn qemu_q35_command(elf: &Path, cpus: u32, mem_mib: u64, cmdline: &str) -> Command {
    let mut cmd = Command::new(qemu_binary());
    cmd.args([
        "-accel",
        "kvm",
        "-M",
        "q35",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", &mem_mib.to_string(), "-smp", &cpus.to_string()])
    .args([
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(elf)
    .args(["-append", cmdline]);
    cmd
}

/// QEMU arguments for a `vhost-user-blk-pci` device on `socket` with `num_queues` queues,
/// plus the shareable guest RAM vhost-user needs (a memfd backend of `mem_mib` MiB, which
/// must equal `-m`).
pub fn qemu_vhost_user_blk_args(socket: &Path, num_queues: u16, mem_mib: u64) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-machine".into(),
        "memory-backend=mem".into(),
        "-chardev".into(),
        format!("socket,id=vub,path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=vub,num-queues={num_queues},disable-legacy=on"),
    ]
}

/// QEMU arguments for a `vhost-user-fs-pci` device with `tag` on `socket`, plus the
/// shareable guest RAM vhost-user needs (a memfd backend of `mem_mib` MiB, which must
/// equal `-m`). QEMU defaults: one request queue, queue size 128.
pub fn qemu_vhost_user_fs_args(socket: &Path, tag: &str, mem_mib: u64) -> Vec<String> {
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem_mib}M,share=on"),
        "-machine".into(),
        "memory-backend=mem".into(),
        "-chardev".into(),
        format!("socket,id=fs0,path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-fs-pci,chardev=fs0,tag={tag}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_args() {
        let a = qemu_vhost_user_blk_args(Path::new("/s.sock"), 2, 256);
        assert!(a.contains(&"memory-backend-memfd,id=mem,size=256M,share=on".to_string()));
        assert!(a.contains(&"socket,id=vub,path=/s.sock".to_string()));
        assert!(a.contains(&"vhost-user-blk-pci,chardev=vub,num-queues=2,disable-legacy=on".into()));
    }

    #[test]
    fn qemu_fs_args() {
        let a = qemu_vhost_user_fs_args(Path::new("/f.sock"), "myfs", 128);
        assert!(a.contains(&"memory-backend-memfd,id=mem,size=128M,share=on".to_string()));
        assert!(a.contains(&"socket,id=fs0,path=/f.sock".to_string()));
        assert!(a.contains(&"vhost-user-fs-pci,chardev=fs0,tag=myfs".to_string()));
    }
}
