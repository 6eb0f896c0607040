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

/// A QMP (QEMU Machine Protocol) client on QEMU's `-qmp unix:<path>,server=on,wait=off`
/// socket: one command at a time, events skipped.
#[derive(Debug)]
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connects (retrying for at most `timeout` while QEMU starts) and leaves the
    /// capabilities negotiation mode.
    ///
    /// # Errors
    /// If QEMU does not answer in time or refuses.
    pub fn connect(path: &Path, timeout: std::time::Duration) -> Result<Self, String> {
        let deadline = std::time::Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            reader: std::io::BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("QMP answer {line:?}: {e}"))
    }

    /// Runs `command` with `arguments`; its `return` value.
    ///
    /// # Errors
    /// QEMU's `error`, or the socket's.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use std::io::Write;
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let answer = self.line()?;
            if let Some(r) = answer.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = answer.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
            // An event: not ours.
        }
    }
}
