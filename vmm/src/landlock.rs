//! `--landlock`: the paths a VM configuration names, and the restriction to them, applied when
//! the VM is created (as Cloud Hypervisor does; docs/security.md).
//!
//! Everything opened before (the KVM device, the API socket, the event monitor, the log file)
//! stays usable. Landlock cannot be widened afterwards, so paths a VM needs later (a disk added
//! through the API) must be named in `landlock_rules` (`--landlock-rules`).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nimbus_landlock::{Access, PathRule};
use vm_config::{ConsoleOutputMode, VhostMode, VmConfig};

/// Where a file Nimbus creates (or replaces) goes: the file's directory, with write access
/// (creating and removing entries there).
fn created_in(path: &Path) -> PathRule {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    PathRule::new(dir, Access::Write)
}

/// A console's output file (truncated or created at boot), socket or pseudo-terminal.
fn console_rules(
    mode: ConsoleOutputMode,
    file: &Option<PathBuf>,
    socket: &Option<PathBuf>,
    rules: &mut Vec<PathRule>,
) {
    match mode {
        ConsoleOutputMode::Pty => {
            // Allocating one opens /dev/ptmx, then the new /dev/pts/N.
            rules.push(PathRule::new("/dev/ptmx", Access::ReadWrite));
            rules.push(PathRule::new("/dev/pts", Access::ReadWrite));
        }
        ConsoleOutputMode::File => {
            if let Some(file) = file {
                if file.exists() {
                    rules.push(PathRule::new(file, Access::Write));
                } else {
                    rules.push(created_in(file));
                }
            }
        }
        ConsoleOutputMode::Socket => {
            if let Some(socket) = socket {
                rules.push(created_in(socket));
            }
        }
        _ => {}
    }
}

/// The paths `config` names, with the access the VM needs to them, and its `landlock_rules`.
pub fn rules(config: &VmConfig) -> Vec<PathRule> {
    let mut rules = Vec::new();
    if let Some(p) = &config.payload {
        for path in [&p.kernel, &p.initramfs, &p.firmware].into_iter().flatten() {
            rules.push(PathRule::new(path, Access::Read));
        }
    }
    for disk in config.disks.iter().flatten() {
        if let Some(path) = disk.path.as_ref().filter(|_| !disk.vhost_user) {
            let access = if disk.readonly {
                Access::Read
            } else {
                Access::ReadWrite
            };
            rules.push(PathRule::new(path, access));
        }
    }
    for pmem in config.pmem.iter().flatten() {
        // discard_writes opens the file read-only (guest writes stay in a private mapping).
        let access = if pmem.discard_writes {
            Access::Read
        } else {
            Access::ReadWrite
        };
        rules.push(PathRule::new(&pmem.file, access));
    }
    let mut tun = false;
    for net in config.net.iter().flatten() {
        if net.vhost_user {
            // A client connects (Landlock does not govern connect); a server binds its socket.
            if let (VhostMode::Server, Some(socket)) = (net.vhost_mode, &net.vhost_socket) {
                rules.push(created_in(Path::new(socket)));
            }
        } else if net.fds.is_none() {
            tun = true;
        }
    }
    if tun {
        let tun = std::ffi::OsStr::from_bytes(net_util::TUN_DEVICE.to_bytes());
        rules.push(PathRule::new(tun, Access::ReadWrite));
    }
    rules.push(PathRule::new(&config.rng.src, Access::Read));
    if let Some(vsock) = &config.vsock {
        // The listening socket is bound (and removed at exit) there; connecting to
        // `<socket>_<port>` is not governed by Landlock.
        rules.push(created_in(&vsock.socket));
    }
    for c in [&config.serial, &config.console] {
        console_rules(c.mode, &c.file, &c.socket, &mut rules);
    }
    let debug = &config.debug_console;
    console_rules(debug.mode, &debug.file, &debug.socket, &mut rules);
    for extra in config.landlock_rules.iter().flatten() {
        // validate() checked the access.
        if let Ok(access) = Access::parse(&extra.access) {
            rules.push(PathRule::new(&extra.path, access));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_config::{ConsoleConfig, DebugConsoleConfig, DiskConfig, LandlockConfig, PayloadConfig};

    #[test]
    fn the_configuration_names_its_paths() {
        let mut config = VmConfig {
            payload: Some(PayloadConfig {
                kernel: Some("/k/vmlinux".into()),
                initramfs: Some("/k/initrd".into()),
                cmdline: None,
                firmware: None,
            }),
            ..VmConfig::default()
        };
        let disk = |path: &str, readonly: bool| {
            let mut d: DiskConfig =
                vm_config::parse_option("disk", &format!("path={path}")).expect("disk");
            d.readonly = readonly;
            d
        };
        config.disks = Some(vec![disk("/d/rw.img", false), disk("/d/ro.img", true)]);
        config.pmem = Some(vec![
            vm_config::parse_option("pmem", "file=/p/rw").expect("pmem"),
            vm_config::parse_option("pmem", "file=/p/ro,discard_writes=on").expect("pmem"),
        ]);
        config.serial =
            ConsoleConfig::parse("serial", "file=/nonexistent-dir/serial.log").expect("serial");
        config.console = ConsoleConfig::parse("console", "pty").expect("console");
        config.debug_console =
            DebugConsoleConfig::parse("socket=/sockets/debug.sock").expect("debug console");
        config.landlock_rules = Some(vec![LandlockConfig {
            path: "/hotplug".into(),
            access: "rw".into(),
        }]);
        let rules = rules(&config);
        let has = |path: &str, access: Access| {
            rules
                .iter()
                .any(|r| r.path == Path::new(path) && r.access == access)
        };
        assert!(has("/k/vmlinux", Access::Read), "{rules:?}");
        assert!(has("/k/initrd", Access::Read), "{rules:?}");
        assert!(has("/d/rw.img", Access::ReadWrite), "{rules:?}");
        assert!(has("/d/ro.img", Access::Read), "{rules:?}");
        assert!(has("/p/rw", Access::ReadWrite), "{rules:?}");
        assert!(has("/p/ro", Access::Read), "{rules:?}");
        assert!(has("/dev/urandom", Access::Read), "{rules:?}");
        assert!(has("/nonexistent-dir", Access::Write), "{rules:?}");
        assert!(has("/hotplug", Access::ReadWrite), "{rules:?}");
        assert!(has("/dev/ptmx", Access::ReadWrite), "{rules:?}");
        assert!(has("/dev/pts", Access::ReadWrite), "{rules:?}");
        assert!(has("/sockets", Access::Write), "{rules:?}");
        assert!(!rules.iter().any(|r| r.path == Path::new("/dev/net/tun")));
    }
}
