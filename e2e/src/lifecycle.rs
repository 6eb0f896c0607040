//! Reading the test guest's lifecycle mode (`lifecycle=1`, docs/test-guest.md): its `TICK`
//! lines and their `key=value` fields.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{RunningVm, ScratchDir};

/// The guest command line of the lifecycle mode as the API tests use it: ticks, a rate-limited
/// block stream on the first disk, and the memory-map checks' expectations for 1 vCPU and
/// 128 MiB.
pub const LIFECYCLE_CMDLINE: &str =
    "lifecycle=1 lifecycle.blk.iops=5000 expect.cpus=1 expect.mem=128M";

/// Nimbus (binary `nimbus`) on the lifecycle guest with guest command line `cmdline`: 1 vCPU,
/// 128 MiB, the serial port on stdout, no virtio console, and an 8 MiB scratch disk created in
/// `dir` for the block stream; tests add `--api-socket` and the like.
///
/// # Panics
/// If the disk cannot be created.
pub fn lifecycle_command(nimbus: &str, dir: &ScratchDir, cmdline: &str) -> Command {
    let disk = dir.file("lifecycle-disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap_or_else(|e| panic!("{}: {e}", disk.display()));
    let mut cmd = crate::nimbus_test_guest(nimbus, "size=128M", cmdline);
    cmd.args(["--cpus", "boot=1"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()));
    cmd
}

/// The complete `TICK` lines in `out` (the serial port writes a byte at a time: a last line
/// without its line end is left out).
pub fn tick_lines(out: &str) -> Vec<String> {
    let complete = out.rfind('\n').map_or("", |end| &out[..end]);
    complete
        .lines()
        .filter(|l| l.starts_with("TICK "))
        .map(str::to_string)
        .collect()
}

/// The complete `TICK` lines the guest of `vm` has printed so far.
pub fn ticks(vm: &RunningVm) -> Vec<String> {
    tick_lines(&vm.stdout_so_far())
}

/// Waits until the guest of `vm` has printed `count` ticks in all; returns them.
///
/// # Panics
/// If that takes longer than `timeout`.
pub fn wait_ticks(vm: &RunningVm, count: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let t = ticks(vm);
        if t.len() >= count {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no tick {count}:\n{}",
            vm.describe_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of `key=` in `line`, parsed as `T`.
///
/// # Panics
/// If there is none or it does not parse.
pub fn field<T: std::str::FromStr>(line: &str, key: &str) -> T {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_written_lines_and_prefixed_keys_are_not_read() {
        let out = "TICK n=1 gap_ms=1.5 kc_gap_ms=2.5\nINFO x\nTICK n=2 gap";
        let t = tick_lines(out);
        assert_eq!(t, ["TICK n=1 gap_ms=1.5 kc_gap_ms=2.5"]);
        assert_eq!(field::<u64>(&t[0], "n"), 1);
        assert_eq!(field::<f64>(&t[0], "gap_ms"), 1.5);
        assert_eq!(field::<f64>(&t[0], "kc_gap_ms"), 2.5);
    }
}
