//! Running the `vhost_user_block` daemon (docs/vhost-user.md) next to a VMM, and finding or
//! building the workspace's binaries for the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::daemon::{is_socket, DaemonProcess};
use crate::repo_root;

/// Environment variable naming a prebuilt `vhost_user_block` to use instead of building
/// one.
pub const VHOST_USER_BLOCK_ENV: &str = "NIMBUS_VHOST_USER_BLOCK";

/// The `vhost_user_block` binary: `$NIMBUS_VHOST_USER_BLOCK` if set, else built once per
/// test process with `cargo build -p vhost_user_block` from the repository root. That
/// inner build inherits the environment (`CARGO_TARGET_DIR`, flags) of the `cargo test`
/// that runs the test, so it shares its target directory and finds the binary up to date
/// when the workspace was built (`cargo test --workspace` builds it); its path comes from
/// cargo's JSON messages.
///
/// # Panics
/// If the build fails (the message carries cargo's output) or the variable names no file.
pub fn vhost_user_block_binary() -> PathBuf {
    workspace_binary("vhost_user_block", VHOST_USER_BLOCK_ENV)
}

/// The binary of workspace package `package` (binary of the same name): `$env` if set,
/// else built once per test process with `cargo build -p <package>` (see
/// [`vhost_user_block_binary`] for why that is cheap).
///
/// # Panics
/// If the build fails (the message carries cargo's output) or the variable names no file.
pub fn workspace_binary(package: &'static str, env: &str) -> PathBuf {
    workspace_bin(package, package, env)
}

/// As [`workspace_binary`], for binary `bin` of `package`.
///
/// # Panics
/// As [`workspace_binary`].
pub fn workspace_bin(package: &'static str, bin: &'static str, env: &str) -> PathBuf {
    static BINS: Mutex<Vec<(&'static str, Result<PathBuf, String>)>> = Mutex::new(Vec::new());
    let mut bins = BINS.lock().unwrap_or_else(|p| p.into_inner());
    let found = match bins.iter().find(|(b, _)| *b == bin) {
        Some((_, r)) => r.clone(),
        None => {
            let r = find_or_build(package, bin, env);
            bins.push((bin, r.clone()));
            r
        }
    };
    match found {
        Ok(path) => path,
        Err(msg) => panic!("{msg}"),
    }
}

fn find_or_build(package: &str, bin: &str, env: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{env}={} is not a file", path.display()))
        };
    }
    let root = repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "-p", package, "--bin", bin])
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(root.join("Cargo.toml"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} to build {package}: {e}",
                Path::new(&cargo).display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "building {package} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let quoted = format!("\"{bin}\"");
    stdout
        .lines()
        .filter(|l| l.contains("\"compiler-artifact\"") && l.contains(&quoted))
        .find_map(json_executable)
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("cargo built {package} but named no executable {bin}:\n{stdout}"))
}

/// The `"executable"` string of one cargo JSON message (paths need no unescaping beyond
/// `\\` and `\"`).
fn json_executable(line: &str) -> Option<PathBuf> {
    let rest = &line[line.find("\"executable\":\"")? + "\"executable\":\"".len()..];
    let mut path = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(PathBuf::from(path)),
            '\\' => path.push(chars.next()?),
            c => path.push(c),
        }
    }
    None
}

/// A `vhost_user_block` daemon started by a test. Dropping it kills the daemon.
#[derive(Debug)]
pub struct VhostUserBlockDaemon {
    process: DaemonProcess,
}

/// How a daemon ended.
#[derive(Debug)]
pub struct VhostUserBlockRun {
    /// Exit status; `None` if it could not be waited for.
    pub status: Option<ExitStatus>,
    /// It was still running at the deadline and was killed.
    pub timed_out: bool,
    /// Its stderr (the log, `-v`).
    pub log: String,
    /// Whether its socket still existed after the exit.
    pub socket_left: bool,
}

impl VhostUserBlockRun {
    /// Exit status and log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "vhost_user_block {}{}\n----- daemon stderr -----\n{}\n-------------------------",
            match (self.status, self.timed_out) {
                (_, true) => "killed after timeout".to_string(),
                (Some(s), false) => s.to_string(),
                (None, false) => "exit status unknown".to_string(),
            },
            if self.socket_left {
                ", socket left behind"
            } else {
                ""
            },
            self.log.trim_end()
        )
    }

    /// Panics unless the daemon exited 0 by itself and removed its socket.
    pub fn assert_clean_exit(&self) {
        assert!(
            !self.timed_out && self.status.is_some_and(|s| s.success()) && !self.socket_left,
            "the daemon did not exit cleanly\n{}",
            self.describe()
        );
    }
}

impl VhostUserBlockDaemon {
    /// Starts `vhost_user_block -v --block-backend <backend>` (whose `socket=` must be
    /// `socket`) with its stderr in `log`, and waits until the socket exists.
    ///
    /// # Panics
    /// If the daemon cannot be started, exits, or creates no socket within 10 s.
    pub fn start(backend: &str, socket: &Path, log: &Path) -> Self {
        let mut cmd = Command::new(vhost_user_block_binary());
        cmd.args(["-v", "--block-backend", backend]);
        VhostUserBlockDaemon {
            process: DaemonProcess::start("vhost_user_block", cmd, socket, log, false),
        }
    }

    /// Its stderr so far.
    pub fn log_so_far(&self) -> String {
        self.process.log_so_far()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        self.process.signal(signal);
    }

    /// Waits at most `timeout` for the daemon to exit (killing it on expiry).
    pub fn finish(mut self, timeout: Duration) -> VhostUserBlockRun {
        let (status, timed_out, log) = self.process.finish(timeout);
        VhostUserBlockRun {
            status,
            timed_out,
            log,
            socket_left: is_socket(self.process.socket()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_from_cargo_json() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"vhost_user_block"},"executable":"/t/debug/vhost_user_block","fresh":true}"#;
        assert_eq!(
            json_executable(line),
            Some(PathBuf::from("/t/debug/vhost_user_block"))
        );
        assert_eq!(
            json_executable(r#"{"executable":"/a\\b\"c"}"#),
            Some(PathBuf::from("/a\\b\"c"))
        );
        assert_eq!(json_executable(r#"{"executable":null}"#), None);
        assert_eq!(json_executable(r#"{"executable":"/unterminated"#), None);
    }
}
