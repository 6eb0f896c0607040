//! What the daemon helpers ([`VhostUserBlockDaemon`](crate::VhostUserBlockDaemon),
//! [`Virtiofsd`](crate::Virtiofsd)) share: a process in its own process group, killed if the
//! test process dies, with its output in a log file and a socket to wait for; dropping it
//! kills it.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a daemon may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct DaemonProcess {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl DaemonProcess {
    /// Spawns `cmd` (program `what`) with stdin closed and stderr — and stdout with
    /// `stdout_too` — in `log`, and waits until `socket` exists.
    ///
    /// # Panics
    /// If it cannot be started, exits, or creates no socket within 10 s; the message
    /// carries its exit status and log.
    pub(crate) fn start(
        what: &str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
        stdout_too: bool,
    ) -> Self {
        let open = || match File::create(log) {
            Ok(f) => f,
            Err(e) => panic!("cannot create {}: {e}", log.display()),
        };
        let log_file = open();
        let stdout = if stdout_too {
            match log_file.try_clone() {
                Ok(f) => Stdio::from(f),
                Err(e) => panic!("cannot duplicate {}: {e}", log.display()),
            }
        } else {
            Stdio::null()
        };
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // prctl system call, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot start {what}: {e}"),
        };
        let mut daemon = DaemonProcess {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !is_socket(socket) {
            let exited = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let (status, _, log) = daemon.finish(Duration::ZERO);
                panic!(
                    "{what} created no socket at {} (exit status {status:?})\nlog:\n{}",
                    socket.display(),
                    log.trim_end()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        daemon
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn log_so_far(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub(crate) fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
            // SAFETY: plain system call on our own child, not yet reaped.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Waits at most `timeout` for the exit (killing it on expiry): exit status, whether
    /// it timed out, the log.
    pub(crate) fn finish(&mut self, timeout: Duration) -> (Option<ExitStatus>, bool, String) {
        let (status, timed_out) = match self.child.take() {
            Some(mut child) => crate::vm::wait_with_timeout(&mut child, timeout),
            None => (None, false),
        };
        (status, timed_out, self.log_so_far())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `path` is a Unix socket (not following a symbolic link).
pub(crate) fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
