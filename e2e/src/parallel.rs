//! Long, CPU-bound guests (a real Linux kernel) side by side, and watching their output with
//! fail-fast patterns (vmm/tests/linux_guest.rs): [`spawn_vm_parallel`] and
//! [`RunningVm::wait_for_line_after`].

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::RunningVm;

/// How many VMs [`spawn_vm_parallel`] lets run at once in one test process.
pub const PARALLEL_VMS: usize = 2;

static SLOTS: [Mutex<()>; PARALLEL_VMS] = [const { Mutex::new(()) }; PARALLEL_VMS];

/// Starts `cmd` like [`spawn_vm`](crate::spawn_vm) (stdin from /dev/null, output captured, own
/// process group killed on drop, SIGKILL if the test process dies) but lets up to
/// [`PARALLEL_VMS`] such VMs run at once, for guests that take tens of seconds and one
/// core each (a Linux boot on a PVM host). It waits for a free slot; the wait does not
/// count against any timeout. It is not serialised with [`run_vm`](crate::run_vm) /
/// [`spawn_vm`](crate::spawn_vm): a test binary should use one or the other.
///
/// # Panics
/// If the process cannot be started.
pub fn spawn_vm_parallel(cmd: Command) -> RunningVm {
    crate::vm::spawn_holding(cmd, take_slot())
}

fn take_slot() -> MutexGuard<'static, ()> {
    loop {
        for slot in &SLOTS {
            match slot.try_lock() {
                Ok(guard) => return guard,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A line found by [`RunningVm::wait_for_line_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineMatch {
    /// The line, without its line end.
    pub line: String,
    /// Byte offset in stdout just past the line: where to continue for the next one.
    pub end: usize,
    /// Time from the VMM's start until the line was seen (its arrival, if the wait
    /// was already running then).
    pub at: Duration,
}

/// How often stderr is looked at while waiting for stdout.
const STDERR_POLL: Duration = Duration::from_millis(100);

impl RunningVm {
    /// Time since the VMM was started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits at most `timeout` for a complete stdout line containing `pattern` that
    /// starts at or after byte offset `from` (0, or the `end` of a previous match, to
    /// find the next occurrence), and returns it with where it ends and when it was
    /// seen. Fails fast: as soon as a complete stdout line from `from` on contains one
    /// of `fatal_stdout` (e.g. `Kernel panic`), stderr contains one of `fatal_stderr`
    /// (e.g. the VMM's `ERROR` log lines), or stdout ends (the VMM exited).
    ///
    /// # Errors
    /// Timeout, a fatal line, or the end of the output; the message names the cause and
    /// carries the output so far.
    pub fn wait_for_line_after(
        &self,
        from: usize,
        pattern: &str,
        fatal_stdout: &[&str],
        fatal_stderr: &[&str],
        timeout: Duration,
    ) -> Result<LineMatch, String> {
        let deadline = Instant::now() + timeout;
        let why = loop {
            let slice_end = deadline.min(Instant::now() + STDERR_POLL);
            let found = self.stdout.wait_until(slice_end, |bytes, eof| {
                scan_lines(bytes, eof, from, pattern, fatal_stdout)
            });
            match found {
                Some(Ok((line, end))) => {
                    return Ok(LineMatch {
                        line,
                        end,
                        at: self.start.elapsed(),
                    })
                }
                Some(Err(why)) => break why,
                None => {}
            }
            let stderr = self.stderr.snapshot();
            if let Some(l) = stderr
                .lines()
                .find(|l| fatal_stderr.iter().any(|f| l.contains(f)))
            {
                break format!("the VMM reported {l:?}");
            }
            if Instant::now() >= deadline {
                break format!("not within {timeout:.1?}");
            }
        };
        Err(format!(
            "no line containing {pattern:?} from the VMM: {why}\n{}",
            self.describe_so_far()
        ))
    }
}

/// The first complete line at or after `from` containing `pattern` (Ok) or one of
/// `fatal` (Err), or Err at the end of the stream; None to keep waiting.
fn scan_lines(
    bytes: &[u8],
    eof: bool,
    from: usize,
    pattern: &str,
    fatal: &[&str],
) -> Option<Result<(String, usize), String>> {
    let tail = bytes.get(from..).unwrap_or_default();
    let mut offset = from;
    let mut rest = tail;
    loop {
        let (raw, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], i + 1),
            None if eof && !rest.is_empty() => (rest, rest.len()),
            None => break,
        };
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches('\r');
        offset += next;
        if let Some(f) = fatal.iter().find(|f| line.contains(*f)) {
            return Some(Err(format!("fatal line ({f:?}): {line:?}")));
        }
        if line.contains(pattern) {
            return Some(Ok((line.to_string(), offset)));
        }
        rest = &rest[next..];
    }
    eof.then(|| Err("the VMM closed its output (exited)".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn_vm;

    #[test]
    fn scan_lines_finds_next_occurrence_and_fatal_lines() {
        let out = b"a boot\nx Run /init\nNIMBUS\nRun /init again\npartial Run";
        let first = scan_lines(out, false, 0, "Run /init", &[]);
        assert_eq!(first, Some(Ok(("x Run /init".to_string(), 19))));
        let second = scan_lines(out, false, 19, "Run /init", &[]);
        assert_eq!(second, Some(Ok(("Run /init again".to_string(), 42))));
        // The incomplete last line only counts once the stream has ended.
        assert_eq!(scan_lines(out, false, 42, "partial", &[]), None);
        assert_eq!(
            scan_lines(out, true, 42, "partial", &[]),
            Some(Ok(("partial Run".to_string(), out.len())))
        );
        let fatal = scan_lines(out, false, 0, "never", &["NIMBUS"]);
        assert!(matches!(fatal, Some(Err(e)) if e.contains("\"NIMBUS\"")));
        assert!(matches!(
            scan_lines(out, true, 0, "never", &[]),
            Some(Err(e)) if e.contains("exited")
        ));
    }

    #[test]
    fn parallel_vms_run_side_by_side_and_fail_fast() {
        let t0 = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 0.5; echo one; sleep 30"]);
        let a = spawn_vm_parallel(cmd);
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "sleep 0.5; echo two; echo 'Kernel panic - x'; sleep 30",
        ]);
        let b = spawn_vm_parallel(cmd);
        let m = a
            .wait_for_line_after(0, "one", &[], &[], Duration::from_secs(10))
            .expect("one");
        assert_eq!((m.line.as_str(), m.end), ("one", 4));
        let e = b
            .wait_for_line_after(0, "never", &["Kernel panic"], &[], Duration::from_secs(20))
            .expect_err("panic line");
        assert!(e.contains("Kernel panic - x"), "{e}");
        // Both ran at once: well under the two sleeps in a row.
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo '[ 1 ms ERROR vcpu0] bad' >&2; sleep 30"]);
        let c = spawn_vm_parallel({
            drop(a);
            cmd
        });
        let e = c
            .wait_for_line_after(0, "x", &[], &["ERROR"], Duration::from_secs(20))
            .expect_err("stderr error");
        assert!(e.contains("ERROR vcpu0"), "{e}");
        drop((b, c));
        // The serialised spawn_vm is independent of the parallel slots.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo fine"]);
        assert!(spawn_vm(cmd).finish(Duration::from_secs(10)).success());
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    }
}
