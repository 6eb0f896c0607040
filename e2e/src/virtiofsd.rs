//! virtio-fs: running virtiofsd (the external vhost-user-fs backend, docs/test-guest.md) next
//! to a VMM, and asking the test guest for its virtio-fs checks.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::daemon::DaemonProcess;

/// Environment variable naming the virtiofsd binary to use instead of the one on `PATH`.
pub const VIRTIOFSD_ENV: &str = "NIMBUS_VIRTIOFSD";

/// Check names of one virtio-fs device (`virtio.fs<n>.<name>`, see
/// [`virtio_checks`](crate::virtio_checks)).
pub const VIRTIO_FS_CHECKS: &[&str] = &["init", "pcicfg", "fuse_init", "lookup", "read", "msix"];

/// The virtiofsd binary: `$NIMBUS_VIRTIOFSD`, else `virtiofsd` on `PATH`, else
/// `~/.cargo/bin/virtiofsd` (where `scripts/install-virtiofsd` puts it).
///
/// # Errors
/// `virtiofsd not installed: run scripts/install-virtiofsd` when there is none.
pub fn virtiofsd_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{VIRTIOFSD_ENV}={} is not a file", p.display()))
        };
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("virtiofsd"))
            .find(|p| p.is_file())
    });
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|c| c.join("bin/virtiofsd"))
                .filter(|p| p.is_file())
        })
        .ok_or_else(|| "virtiofsd not installed: run scripts/install-virtiofsd".to_string())
}

/// The test guest's virtio-fs keys: the device's `tag`, and a regular file `file` in the
/// shared directory's root holding exactly `content` (neither with spaces).
pub fn virtiofs_keys(tag: &str, file: &str, content: &str) -> String {
    format!("fs.tag={tag} fs.file={file} fs.content={content}")
}

/// A virtiofsd started by a test. Dropping it kills the daemon.
#[derive(Debug)]
pub struct Virtiofsd {
    process: DaemonProcess,
}

/// How a virtiofsd ended.
#[derive(Debug)]
pub struct VirtiofsdRun {
    /// Exit status; `None` if it could not be waited for.
    pub status: Option<ExitStatus>,
    /// It was still running at the deadline and was killed.
    pub timed_out: bool,
    /// Its stdout and stderr.
    pub log: String,
}

impl VirtiofsdRun {
    /// Exit status and log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "virtiofsd {}\n----- virtiofsd log -----\n{}\n-------------------------",
            match (self.status, self.timed_out) {
                (_, true) => "killed after timeout".to_string(),
                (Some(s), false) => s.to_string(),
                (None, false) => "exit status unknown".to_string(),
            },
            self.log.trim_end()
        )
    }

    /// Panics unless virtiofsd exited 0 by itself (it does when its frontend
    /// disconnects).
    pub fn assert_clean_exit(&self) {
        assert!(
            !self.timed_out && self.status.is_some_and(|s| s.success()),
            "virtiofsd did not exit cleanly\n{}",
            self.describe()
        );
    }
}

impl Virtiofsd {
    /// Starts `virtiofsd --socket-path=<socket> --shared-dir=<shared_dir> --cache=never
    /// --sandbox none <extra...>` with its output in `log`, and waits until the socket
    /// exists. `--sandbox none` keeps it one process (no namespace child that outlives a
    /// killed parent) and works without root; it serves one frontend connection and
    /// exits when that closes.
    ///
    /// # Panics
    /// If virtiofsd is not installed ("virtiofsd not installed: run
    /// scripts/install-virtiofsd"), cannot be started, exits, or creates no socket
    /// within 10 s.
    pub fn start(shared_dir: &Path, socket: &Path, log: &Path, extra: &[&str]) -> Self {
        let bin = match virtiofsd_binary() {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            .args(["--cache=never", "--sandbox", "none"])
            .args(extra);
        Virtiofsd {
            process: DaemonProcess::start("virtiofsd", cmd, socket, log, true),
        }
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        self.process.socket()
    }

    /// Its output so far.
    pub fn log_so_far(&self) -> String {
        self.process.log_so_far()
    }

    /// Waits at most `timeout` for virtiofsd to exit (killing it on expiry).
    pub fn finish(mut self, timeout: Duration) -> VirtiofsdRun {
        let (status, timed_out, log) = self.process.finish(timeout);
        VirtiofsdRun {
            status,
            timed_out,
            log,
        }
    }
}
