//! Running a VMM under test: a hard timeout, its own process group, output collected while it
//! runs ([`run_vm`], [`spawn_vm`], [`RunningVm`], [`VmRun`]).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::GuestReport;

/// The outcome of one VMM run.
#[derive(Debug)]
pub struct VmRun {
    /// Exit status; `None` only if the process could not be waited for.
    pub status: Option<ExitStatus>,
    /// Everything written to stdout (the guest's serial port), lossily UTF-8.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// The timeout expired and the process was killed.
    pub timed_out: bool,
    /// Wall time from spawn to exit (or kill).
    pub elapsed: Duration,
}

impl VmRun {
    /// Whether the VMM exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Parses stdout as guest output.
    pub fn report(&self) -> GuestReport {
        GuestReport::parse(&self.stdout)
    }

    /// Exit status, timing, stderr and stdout, for failure messages.
    pub fn describe(&self) -> String {
        let status = match (&self.status, self.timed_out) {
            (_, true) => format!("killed after timeout ({:.1?})", self.elapsed),
            (Some(s), false) => format!("{s} after {:.1?}", self.elapsed),
            (None, false) => "exit status unknown".to_string(),
        };
        format!(
            "VMM {status}\n----- stderr -----\n{}\n----- stdout (guest serial) -----\n{}\n------------------",
            self.stderr.trim_end(),
            self.stdout.trim_end()
        )
    }

    /// Panics with [`VmRun::describe`] unless the VMM exited 0 in time.
    pub fn assert_success(&self) {
        assert!(
            self.success(),
            "VMM did not exit cleanly with status 0\n{}",
            self.describe()
        );
    }
}

/// Serialises VMs started by [`run_vm`] within one test process: the test
/// machines have few cores, and guest timing checks are steadier alone.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// How long output collection may go on after the VMM has exited (a leftover
/// process could keep the pipes open).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) for at most
/// `timeout`; on expiry the process is killed and `timed_out` set. Never
/// hangs: the VMM runs in its own process group, which is killed with
/// SIGKILL on timeout and cleaned up after exit; the VMM also gets SIGKILL if
/// the test process dies. VMs run one at a time per process (the wait for
/// the previous one does not count against the timeout).
///
/// # Panics
/// If the process cannot be started.
pub fn run_vm(cmd: Command, timeout: Duration) -> VmRun {
    spawn_vm(cmd).finish(timeout)
}

/// Starts `cmd` like [`run_vm`] (stdin from /dev/null, stdout and stderr
/// captured, own process group, SIGKILL if the test process dies, one VM
/// at a time per process) but returns at once, so that a test can watch the
/// guest's serial output while it runs ([`RunningVm::wait_for_line`]) and
/// act on it. [`RunningVm::finish`] waits for the exit; dropping a
/// `RunningVm` (also during a panic) kills the VMM's process group.
///
/// While a `RunningVm` exists, [`run_vm`] and `spawn_vm` in other threads of
/// the same process wait for it.
///
/// # Panics
/// If the process cannot be started.
pub fn spawn_vm(cmd: Command) -> RunningVm {
    let serial = VM_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    spawn_holding(cmd, serial)
}

/// Starts `cmd` as a VM (own process group, killed with the test process, output collected),
/// holding `guard` (a run slot) for as long as the VM runs.
pub(crate) fn spawn_holding(
    mut cmd: Command,
    guard: std::sync::MutexGuard<'static, ()>,
) -> RunningVm {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes the prctl system call, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => panic!("cannot start {:?}: {e}", cmd.get_program()),
    };
    let stdout = Collector::start(child.stdout.take());
    let stderr = Collector::start(child.stderr.take());
    RunningVm {
        child: Some(child),
        stdout,
        stderr,
        start,
        _serial: guard,
    }
}

/// A VMM started by [`spawn_vm`]. Dropping it kills the VMM's process group.
#[derive(Debug)]
pub struct RunningVm {
    /// `None` once waited for.
    child: Option<Child>,
    pub(crate) stdout: Collector,
    pub(crate) stderr: Collector,
    pub(crate) start: Instant,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl RunningVm {
    /// The VMM's process id (`None` once waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits at most `timeout` for a complete stdout line (the guest's
    /// serial port) containing `pattern` and returns it (without the line
    /// end). Looks at everything printed since the start, so a line that
    /// came before the call is found at once.
    ///
    /// # Errors
    /// If no such line appears in time or stdout ends (the VMM exited)
    /// before one does; the message carries the output so far.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for(&self.stdout, pattern, timeout)
    }

    /// Waits at most `timeout` until the guest has printed `n` (from 1) complete lines
    /// containing `pattern`, and returns the `n`th: for a line a guest prints once per cycle.
    ///
    /// # Panics
    /// If it does not come in time, with the output so far.
    pub fn nth_line(&self, pattern: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout_so_far();
            let complete = out.rfind('\n').map_or("", |end| &out[..end]);
            if let Some(l) = complete.lines().filter(|l| l.contains(pattern)).nth(n - 1) {
                return l.trim_end_matches('\r').to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no line #{n} with {pattern:?}\n{}",
                self.describe_so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// As [`RunningVm::wait_for_line`], on the VMM's stderr (its log).
    ///
    /// # Errors
    /// As [`RunningVm::wait_for_line`].
    pub fn wait_for_log_line(&self, pattern: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for(&self.stderr, pattern, timeout)
    }

    fn wait_for(
        &self,
        stream: &Collector,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let found = stream.wait_until(deadline, |bytes, eof| {
            let text = String::from_utf8_lossy(bytes);
            // Only complete lines, unless the stream has ended.
            let complete = if eof {
                &text[..]
            } else {
                text.rfind('\n').map_or("", |end| &text[..end])
            };
            if let Some(line) = complete.lines().find(|l| l.contains(pattern)) {
                return Some(Ok(line.trim_end_matches('\r').to_string()));
            }
            eof.then(|| Err("the VMM closed its output (exited)".to_string()))
        });
        let why = match found {
            Some(Ok(line)) => return Ok(line),
            Some(Err(why)) => why,
            None => format!("not within {timeout:.1?}"),
        };
        Err(format!(
            "no line containing {pattern:?} from the VMM: {why}\n{}",
            self.describe_so_far()
        ))
    }

    /// The VMM's stdout (the guest's serial port) so far, lossily UTF-8.
    pub fn stdout_so_far(&self) -> String {
        self.stdout.snapshot()
    }

    /// Timing, stderr and stdout so far, for failure messages.
    pub fn describe_so_far(&self) -> String {
        format!(
            "VMM running for {:.1?}\n----- stderr so far -----\n{}\n----- stdout (guest serial) so far -----\n{}\n------------------",
            self.start.elapsed(),
            self.stderr.snapshot().trim_end(),
            self.stdout.snapshot().trim_end()
        )
    }

    /// Waits at most `timeout` (from now) for the VMM to exit, killing its
    /// process group on expiry (`timed_out` is then set), and collects the
    /// output.
    pub fn finish(mut self, timeout: Duration) -> VmRun {
        let (status, timed_out) = match self.child.as_mut() {
            Some(child) => wait_with_timeout(child, timeout),
            None => (None, false),
        };
        self.child = None;
        let elapsed = self.start.elapsed();
        let drain_deadline = Instant::now() + DRAIN_GRACE;
        VmRun {
            status,
            stdout: self.stdout.finish(drain_deadline),
            stderr: self.stderr.finish(drain_deadline),
            timed_out,
            elapsed,
        }
    }

    /// Kills the VMM's process group now and collects the output
    /// (`timed_out` is set: the run did not end by itself).
    pub fn kill(mut self) -> VmRun {
        // Killed means it was still running when we killed it; the signal's delivery races
        // with `finish`, so decide here rather than from the wait.
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if let Some(child) = &self.child {
            kill_group(child);
        }
        let mut run = self.finish(Duration::from_secs(5));
        run.timed_out |= running;
        run
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_group(child);
            let _ = child.wait();
        }
    }
}

/// Sends SIGKILL to the process group led by `child` (see `run_vm`).
fn kill_group(child: &Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // SAFETY: plain system call; the group id is our own child's pid,
        // which stays reserved until the child is reaped.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

pub(crate) fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child);
                return (child.wait().ok(), true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(_) => {
                kill_group(child);
                return (child.wait().ok(), false);
            }
        }
    }
}

/// What a [`Collector`] thread has read: the bytes and whether the pipe
/// has ended.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    eof: bool,
}

/// Reads a pipe on a thread into a shared buffer; waiters are woken on
/// every chunk.
#[derive(Debug)]
pub(crate) struct Collector {
    shared: Arc<(Mutex<Captured>, Condvar)>,
}

impl Collector {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Self {
        let shared = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        match pipe {
            None => Self::lock(&shared).eof = true,
            Some(mut p) => {
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    let mut chunk = [0u8; 4096];
                    // EOF or a read error ends the capture; what was read is kept.
                    while let Ok(n @ 1..) = p.read(&mut chunk) {
                        Self::lock(&shared).bytes.extend_from_slice(&chunk[..n]);
                        shared.1.notify_all();
                    }
                    Self::lock(&shared).eof = true;
                    shared.1.notify_all();
                });
            }
        }
        Collector { shared }
    }

    fn lock(shared: &(Mutex<Captured>, Condvar)) -> std::sync::MutexGuard<'_, Captured> {
        shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f(bytes so far, eof)` now and after every new chunk until it
    /// returns `Some` or `deadline` passes (`None`).
    pub(crate) fn wait_until<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&[u8], bool) -> Option<T>,
    ) -> Option<T> {
        let mut c = Self::lock(&self.shared);
        loop {
            if let Some(v) = f(&c.bytes, c.eof) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || c.eof {
                return None;
            }
            c = self
                .shared
                .1
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// What was read so far, lossily UTF-8.
    pub(crate) fn snapshot(&self) -> String {
        String::from_utf8_lossy(&Self::lock(&self.shared).bytes).into_owned()
    }

    /// Waits for EOF until `deadline`, then returns what was read.
    fn finish(&self, deadline: Instant) -> String {
        self.wait_until(deadline, |_, eof| eof.then_some(()));
        self.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_vm_times_out_and_kills() {
        let mut cmd = Command::new("sh");
        // The grandchild (sleep) holds the pipes too: it must die with sh.
        cmd.args(["-c", "echo started; sleep 30; echo never"]);
        let t0 = Instant::now();
        let run = run_vm(cmd, Duration::from_millis(300));
        assert!(run.timed_out);
        assert!(!run.success());
        assert_eq!(run.stdout.trim(), "started");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn run_vm_collects_status_and_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let run = run_vm(cmd, Duration::from_secs(10));
        assert!(!run.timed_out);
        assert_eq!(run.status.and_then(|s| s.code()), Some(3));
        assert_eq!(run.stdout, "out\n");
        assert_eq!(run.stderr, "err\n");
    }

    #[test]
    fn spawn_vm_streams_lines_and_kills_on_drop() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; sleep 0.2; echo 'INFO ready x'; sleep 30"]);
        let t0 = Instant::now();
        let vm = spawn_vm(cmd);
        assert_eq!(
            vm.wait_for_line("ready", Duration::from_secs(10)),
            Ok("INFO ready x".to_string())
        );
        let e = vm
            .wait_for_line("never", Duration::from_millis(200))
            .expect_err("no such line");
        assert!(e.contains("INFO ready x"), "{e}");
        let run = vm.kill();
        assert!(run.timed_out && !run.success());
        assert_eq!(run.stdout, "one\nINFO ready x\n");
        // Dropping a running VM kills it too.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30"]);
        drop(spawn_vm(cmd));
        assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
        // A VMM that exits ends the wait early.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bye"]);
        let vm = spawn_vm(cmd);
        let e = vm
            .wait_for_line("ready", Duration::from_secs(20))
            .expect_err("exited");
        assert!(e.contains("exited"), "{e}");
        assert!(vm.finish(Duration::from_secs(10)).success());
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    }
}
