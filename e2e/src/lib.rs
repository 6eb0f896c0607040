//! Shared helpers for Nimbus end-to-end tests.
//!
//! The end-to-end tests boot the freestanding test guest (`guest/`, see
//! `docs/test-guest.md`) under a VMM — Nimbus or, as a reference, QEMU — and
//! check what it reports on its serial port:
//!
//! * [`guest_elf`] builds the guest once per test process and returns its path;
//! * [`run_vm`] runs a VMM command with a hard timeout and collects its output;
//! * [`GuestReport`] parses the guest's output protocol and asserts on it;
//! * [`require_kvm`] and [`qemu_binary`] implement the environment policy:
//!   without `/dev/kvm` a test is skipped loudly, a missing QEMU is a failure;
//! * stage 2 (PCI, virtio-pci): [`Stage2Keys`] builds the command-line keys,
//!   [`write_disk_pattern`] / [`verify_disk_pattern`] prepare and check a disk
//!   image for the virtio-blk checks, [`virtio_checks`] names the checks a
//!   device reports, [`ScratchDir`] holds the files of one test;
//! * hostile mode: [`Stage2Keys::hostile`] turns it on, [`hostile_checks`]
//!   names its checks;
//! * [`spawn_vm`] starts a VMM and returns a [`RunningVm`] whose serial
//!   output can be watched while it runs ([`RunningVm::wait_for_line`]);
//! * virtio-net: [`NetNs`] is a network namespace for the VMM's TAP,
//!   [`PacketSocket`] sends and captures frames on that TAP,
//!   [`net_test_frame`] / [`verify_net_tx_frames`] define and check the test
//!   frames, and [`exchange_test_frames`] is the whole host side of the
//!   guest's `rx` and `tx` checks.
//!
//! This is test support code: its functions panic with a descriptive message
//! when the environment is broken (guest does not build, QEMU missing).

#![deny(missing_docs)]

pub mod api;
pub mod lifecycle;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The checks every stage-1 guest run must report as passed, whatever the VMM.
pub const STAGE1_CHECKS: &[&str] = &[
    "pvh.magic",
    "cmdline",
    "memmap",
    "memtouch",
    "acpi.rsdp",
    "acpi.FACP",
    "acpi.APIC",
    "acpi.MCFG",
    "acpi.DSDT",
    "acpi.required",
    "acpi.madt",
    "acpi.mcfg",
    "acpi.s5",
    "smp",
    "rtc",
];

/// The stage-2 PCI checks every guest run reports (with or without virtio
/// devices). Without `expect.virtio`, `virtio.count` only reports what it found.
pub const STAGE2_PCI_CHECKS: &[&str] = &[
    "pci.enum",
    "pci.hostbridge",
    "pci.bars",
    "pci.caps",
    "virtio.count",
    "virtio.modern",
];

/// Checks every modern virtio-blk device reports when the command line has
/// `blk.pattern.sector` (without `blk.readonly=1`). `mq` is reported only if
/// the device offers a second queue, `readonly` only with `blk.readonly=1`
/// (which replaces `write`).
pub const VIRTIO_BLK_CHECKS: &[&str] = &[
    "init",
    "pcicfg",
    "capacity",
    "read",
    "get_id",
    "flush",
    "write",
    "oob",
    "msix_mask",
    "msix",
];

/// Checks every modern virtio-rng device reports.
pub const VIRTIO_RNG_CHECKS: &[&str] = &["init", "pcicfg", "read", "msix"];

/// Checks every modern virtio-console device reports.
pub const VIRTIO_CONSOLE_CHECKS: &[&str] = &["init", "pcicfg", "write", "msix"];

/// Checks every modern virtio-net device reports when the host exchanges
/// the test frames ([`exchange_test_frames`]). With `net.rx.count=0` there
/// is no `rx`, with `net.tx.count=0` no `tx`, with both no `msix`.
pub const VIRTIO_NET_CHECKS: &[&str] = &["init", "pcicfg", "mac", "rx", "tx", "msix"];

/// Checks a virtio-net device driven with several queue pairs (`net<n>.pairs`, see
/// [`boot_net_mq`]) reports when the host exchanges the test frames.
pub const VIRTIO_NET_MQ_CHECKS: &[&str] =
    &["init", "pcicfg", "mac", "ctrl", "rx", "tx", "mq", "msix"];

/// The hostile mode's attacks (`hostile=1`, see docs/test-guest.md), in the order the guest
/// runs them; each is reported as `hostile.<attack>`. `survivors` (rng and blk still work)
/// comes last.
pub const HOSTILE_ATTACKS: &[&str] = &[
    "desc_oob",
    "desc_loop",
    "desc_zero_len",
    "desc_huge",
    "status_readonly",
    "bad_queue_size",
    "ring_oob",
    "avail_idx_jump",
    "config_oob",
    "pci_cfg_junk",
    "bar_move",
    "survivors",
];

/// Full check names of the hostile mode: `hostile.<attack>` for each of [`HOSTILE_ATTACKS`].
pub fn hostile_checks() -> Vec<String> {
    HOSTILE_ATTACKS
        .iter()
        .map(|a| format!("hostile.{a}"))
        .collect()
}

/// Full check names for device `n` of `kind` (`blk`, `rng`, `console`,
/// `net`): `virtio.<kind><n>.<check>` for each of `checks`.
pub fn virtio_checks(kind: &str, n: usize, checks: &[&str]) -> Vec<String> {
    checks
        .iter()
        .map(|c| format!("virtio.{kind}{n}.{c}"))
        .collect()
}

/// Sector size of the disk patterns.
pub const SECTOR_SIZE: u64 = 512;

/// Sectors the guest's `write` check writes, from `blk.pattern.sector`.
pub const GUEST_WRITE_SECTORS: u64 = 8;

/// The host pattern (`blk.pattern.sector`): the byte at absolute offset `o`
/// of the disk image.
pub fn disk_pattern_byte(o: u64) -> u8 {
    ((o >> 9) as u8) ^ ((o & 0x1ff) as u8) ^ 0xa5
}

/// The guest pattern: the byte the guest writes at absolute offset `o` of
/// sectors `S..S + 8` (`S` = `blk.pattern.sector`).
pub fn guest_pattern_byte(o: u64) -> u8 {
    ((o >> 9) as u8).wrapping_mul(7) ^ 0x3c ^ ((o & 0xff) as u8)
}

/// Creates (or truncates) `path` as a raw disk image of `size` bytes (a
/// multiple of 512) filled with the host pattern ([`disk_pattern_byte`]).
pub fn write_disk_pattern(path: &Path, size: u64) -> std::io::Result<()> {
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("disk size {size} is not a multiple of {SECTOR_SIZE}"),
        ));
    }
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut chunk = vec![0u8; 1 << 16];
    let mut o = 0u64;
    while o < size {
        let n = chunk
            .len()
            .min(usize::try_from(size - o).unwrap_or(usize::MAX));
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = disk_pattern_byte(o + i as u64);
        }
        w.write_all(&chunk[..n])?;
        o += n as u64;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Checks a disk image prepared by [`write_disk_pattern`]: exactly `size`
/// bytes, the host pattern everywhere except, if `guest_sector` is given,
/// sectors `guest_sector..guest_sector + GUEST_WRITE_SECTORS`, which must hold
/// the guest pattern ([`guest_pattern_byte`]). The error names the number of
/// wrong bytes and the first few.
pub fn verify_disk_pattern(
    path: &Path,
    size: u64,
    guest_sector: Option<u64>,
) -> Result<(), String> {
    let len = image_len(path)?;
    if len != size {
        return Err(format!(
            "{} is {len} bytes, expected {size}",
            path.display()
        ));
    }
    let guest = guest_sector.map(|s| s * SECTOR_SIZE..(s + GUEST_WRITE_SECTORS) * SECTOR_SIZE);
    compare_image(path, 0..size, |at| match &guest {
        Some(g) if g.contains(&at) => (guest_pattern_byte(at), "guest pattern"),
        _ => (disk_pattern_byte(at), "host pattern"),
    })
}

fn image_len(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))
}

/// Compares the bytes `range` of the image at `path` with `want(offset)` (the expected byte and
/// the name of what it belongs to). The error names the number of wrong bytes and the first few.
///
/// # Errors
/// If the image cannot be read or any byte differs.
pub fn compare_image(
    path: &Path,
    range: std::ops::Range<u64>,
    want: impl Fn(u64) -> (u8, &'static str),
) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(range.start))
        .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let (mut o, mut wrong, mut first) = (range.start, 0u64, String::new());
    while o < range.end {
        let n = chunk
            .len()
            .min(usize::try_from(range.end - o).unwrap_or(usize::MAX));
        r.read_exact(&mut chunk[..n])
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for (i, &got) in chunk[..n].iter().enumerate() {
            let at = o + i as u64;
            let (expected, which) = want(at);
            if got != expected {
                if wrong < 8 {
                    let _ = write!(
                        first,
                        "\n  offset {at:#x} (sector {}): {got:#04x}, expected {expected:#04x} ({which})",
                        at / SECTOR_SIZE
                    );
                }
                wrong += 1;
            }
        }
        o += n as u64;
    }
    if wrong == 0 {
        Ok(())
    } else {
        Err(format!(
            "{}: {wrong} byte(s) in {:#x}..{:#x} differ from what was expected:{first}",
            path.display(),
            range.start,
            range.end
        ))
    }
}

/// The stage-2 command-line keys (see docs/test-guest.md); all optional.
#[derive(Debug, Clone, Default)]
pub struct Stage2Keys {
    /// `expect.virtio=kind:count,...` (kinds `blk`, `net`, `rng`, `console`);
    /// `None` leaves the key out.
    pub virtio: Option<Vec<(&'static str, u32)>>,
    /// `blk.pattern.sector=S`: the disk holds the host pattern; the guest
    /// writes its own to sectors `S..S + 8`.
    pub blk_pattern_sector: Option<u64>,
    /// `blk.serial=...`: expected GET_ID string (no spaces).
    pub blk_serial: Option<String>,
    /// `blk.readonly=1`.
    pub blk_readonly: bool,
    /// `console.message=...`: what the guest writes on the virtio console
    /// (no spaces), followed by a newline.
    pub console_message: Option<String>,
    /// `net.mac=xx:xx:xx:xx:xx:xx`: the MAC address the virtio-net device
    /// must report.
    pub net_mac: Option<[u8; 6]>,
    /// `net.tx.count=N`: test frames the guest transmits (guest default 8).
    pub net_tx_count: Option<u32>,
    /// `net.rx.count=N`: test frames the guest waits for after printing
    /// `INFO virtio.net<n>.rx.ready` (guest default 4; 0: no rx check).
    pub net_rx_count: Option<u32>,
    /// `hostile=1`: after the stage-2 checks the guest attacks the VMM through the first
    /// virtio-blk device and reports `hostile.*` checks ([`hostile_checks`]).
    pub hostile: bool,
}

impl Stage2Keys {
    /// The keys as space-separated words (empty if none is set), to append
    /// to a stage-1 command line.
    pub fn to_cmdline(&self) -> String {
        let mut words = Vec::new();
        if let Some(v) = &self.virtio {
            let list: Vec<String> = v.iter().map(|(k, n)| format!("{k}:{n}")).collect();
            words.push(format!("expect.virtio={}", list.join(",")));
        }
        if let Some(s) = self.blk_pattern_sector {
            words.push(format!("blk.pattern.sector={s}"));
        }
        if let Some(s) = &self.blk_serial {
            words.push(format!("blk.serial={s}"));
        }
        if self.blk_readonly {
            words.push("blk.readonly=1".to_string());
        }
        if let Some(m) = &self.console_message {
            words.push(format!("console.message={m}"));
        }
        if let Some(m) = self.net_mac {
            words.push(format!("net.mac={}", format_mac(m)));
        }
        if let Some(n) = self.net_tx_count {
            words.push(format!("net.tx.count={n}"));
        }
        if let Some(n) = self.net_rx_count {
            words.push(format!("net.rx.count={n}"));
        }
        if self.hostile {
            words.push("hostile=1".to_string());
        }
        words.join(" ")
    }
}

/// A fresh directory under the system temporary directory, removed with
/// everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `<tmp>/nimbus-<tag>-<pid>-<n>`.
    ///
    /// # Panics
    /// If the directory cannot be created.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("nimbus-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("cannot create {}: {e}", path.display());
        }
        ScratchDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Environment variables that would change how the guest is compiled (they
/// override `guest/.cargo/config.toml`), removed before building it.
const GUEST_BUILD_ENV_REMOVE: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
];

/// Root of the Nimbus repository (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// A command that runs the VMM binary at `vmm` (Nimbus's command-line syntax) on the test guest
/// with `--memory memory`, the guest command line `cmdline`, the serial port on stdout and no
/// virtio console (so the guest's device counts are the test's devices); tests add their
/// devices and flags.
pub fn nimbus_test_guest(vmm: &str, memory: &str, cmdline: &str) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--memory",
        memory,
        "--serial",
        "tty",
        "--console",
        "off",
        "--cmdline",
        cmdline,
    ]);
    cmd
}

/// Builds the test guest (release profile, target dir `<repo>/target/guest`)
/// the first time it is called in this process and returns the absolute path
/// of the ELF. Concurrent callers wait for the one build.
///
/// # Panics
/// If the build fails; the message carries cargo's output.
pub fn guest_elf() -> PathBuf {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match GUEST.get_or_init(build_guest) {
        Ok(path) => path.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn build_guest() -> Result<PathBuf, String> {
    let root = repo_root();
    let guest_dir = root.join("guest");
    let target_dir = root.join("target").join("guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // Run from guest/ so that guest/.cargo/config.toml applies.
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .stdin(Stdio::null());
    for var in GUEST_BUILD_ENV_REMOVE {
        cmd.env_remove(var);
    }
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot run {} to build the test guest: {e}",
            Path::new(&cargo).display()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "building the test guest failed ({}) in {}:\n{}{}",
            out.status,
            guest_dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let elf = target_dir.join("release").join("guest");
    if !elf.is_file() {
        return Err(format!(
            "the guest build succeeded but {} does not exist",
            elf.display()
        ));
    }
    Ok(elf)
}

/// Whether `/dev/kvm` exists on this machine.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// The policy for tests that need KVM: returns `true` if `/dev/kvm` exists
/// (the test must then run, and fail if anything is wrong). Otherwise prints
/// a loud `SKIPPED (no /dev/kvm)` line naming the test to stderr and returns
/// `false`; the test should return at once.
pub fn require_kvm(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    eprintln!("\n*** SKIPPED (no /dev/kvm): {test} ***\n");
    false
}

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

/// Current host time in Unix seconds (for `expect.now`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The standard stage-1 guest command line: `expect.cpus=N expect.mem=BYTES
/// expect.now=UNIX_SECONDS` (time taken now).
pub fn stage1_cmdline(cpus: u32, mem_bytes: u64) -> String {
    format!(
        "expect.cpus={cpus} expect.mem={mem_bytes} expect.now={}",
        unix_now()
    )
}

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
fn spawn_holding(mut cmd: Command, guard: std::sync::MutexGuard<'static, ()>) -> RunningVm {
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
    stdout: Collector,
    stderr: Collector,
    start: Instant,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl RunningVm {
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

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
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
struct Collector {
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
    fn wait_until<T>(
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
    fn snapshot(&self) -> String {
        String::from_utf8_lossy(&Self::lock(&self.shared).bytes).into_owned()
    }

    /// Waits for EOF until `deadline`, then returns what was read.
    fn finish(&self, deadline: Instant) -> String {
        self.wait_until(deadline, |_, eof| eof.then_some(()));
        self.snapshot()
    }
}

/// One `TEST` line: (name, passed, detail).
pub type TestLine = (String, bool, String);

/// The guest's output, parsed. Protocol (one item per line, see
/// docs/test-guest.md): `NIMBUS-TEST-GUEST <stage>` banner,
/// `TEST <name> PASS|FAIL <detail>`, `INFO <text>`, `BENCH <text>`,
/// `FAULT <text>`, and finally `TESTS DONE pass=N fail=M`. Anything else
/// (firmware output) is ignored.
#[derive(Debug, Clone, Default)]
pub struct GuestReport {
    /// The banner line, if seen (e.g. `NIMBUS-TEST-GUEST stage1`).
    pub banner: Option<String>,
    /// Every `TEST` line in order; malformed ones are recorded as failures.
    pub tests: Vec<TestLine>,
    /// `TESTS DONE` counts: (pass, fail).
    pub done: Option<(u32, u32)>,
    /// Text after `FAULT ` of every fault line.
    pub faults: Vec<String>,
    /// Text after `INFO ` of every info line.
    pub infos: Vec<String>,
    /// Text after `BENCH ` of every benchmark line.
    pub benches: Vec<String>,
    /// The complete output the report was parsed from.
    pub raw: String,
}

impl GuestReport {
    /// Parses guest serial output.
    pub fn parse(output: &str) -> Self {
        let mut r = GuestReport {
            raw: output.to_string(),
            ..Default::default()
        };
        for line in output.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(pos) = line.find("NIMBUS-TEST-GUEST") {
                r.banner
                    .get_or_insert_with(|| line[pos..].trim().to_string());
            } else if let Some(rest) = line.strip_prefix("TESTS DONE ") {
                r.done = parse_done(rest).or(Some((0, u32::MAX)));
            } else if let Some(rest) = line.strip_prefix("TEST ") {
                r.tests.push(parse_test(rest));
            } else if let Some(rest) = line.strip_prefix("FAULT") {
                r.faults.push(rest.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("INFO ") {
                r.infos.push(rest.to_string());
            } else if let Some(rest) = line.strip_prefix("BENCH ") {
                r.benches.push(rest.to_string());
            }
        }
        r
    }

    /// The first `TEST` line called `name`: (passed, detail).
    pub fn test(&self, name: &str) -> Option<(bool, &str)> {
        self.tests
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, pass, detail)| (*pass, detail.as_str()))
    }

    /// The detail of the first `TEST` line called `name`.
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.test(name).map(|(_, detail)| detail)
    }

    /// Problems that make the run unclean: failed `TEST` lines, faults, a
    /// missing `TESTS DONE` or one with fail != 0 or counts that do not match
    /// the `TEST` lines.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for (name, pass, detail) in &self.tests {
            if !pass {
                p.push(format!("check {name} FAILED: {detail}"));
            }
        }
        for f in &self.faults {
            p.push(format!("guest FAULT: {f}"));
        }
        match self.done {
            None => p.push("no `TESTS DONE` line (guest crashed, hung or was cut off)".to_string()),
            Some((pass, fail)) => {
                if fail != 0 {
                    p.push(format!("TESTS DONE reports fail={fail}"));
                }
                let passed = self.tests.iter().filter(|t| t.1).count();
                if usize::try_from(pass).ok() != Some(passed) {
                    p.push(format!(
                        "TESTS DONE reports pass={pass} but {passed} PASS lines were seen"
                    ));
                }
            }
        }
        p
    }

    /// Asserts that every check in `names` was reported and passed (all lines
    /// of that name, if it occurs more than once), and that the run is clean
    /// (see [`GuestReport::problems`]).
    ///
    /// # Panics
    /// With a list of the problems and the full guest output.
    pub fn assert_passed(&self, names: &[&str]) {
        let mut problems = Vec::new();
        for name in names {
            if !self.tests.iter().any(|(n, _, _)| n == name) {
                problems.push(format!("check {name} missing"));
            }
        }
        problems.extend(self.problems());
        if !problems.is_empty() {
            let mut msg = String::from("guest report not clean:\n");
            for pr in &problems {
                let _ = writeln!(msg, "  - {pr}");
            }
            let _ = write!(
                msg,
                "----- guest output -----\n{}\n------------------------",
                self.raw.trim_end()
            );
            panic!("{msg}");
        }
    }
}

fn parse_test(rest: &str) -> TestLine {
    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    let (verdict, detail) = tail.split_once(' ').unwrap_or((tail, ""));
    match verdict {
        "PASS" => (name.to_string(), true, detail.to_string()),
        "FAIL" => (name.to_string(), false, detail.to_string()),
        _ => (
            name.to_string(),
            false,
            format!("malformed TEST line: {rest:?}"),
        ),
    }
}

fn parse_done(rest: &str) -> Option<(u32, u32)> {
    let mut pass = None;
    let mut fail = None;
    for word in rest.split_whitespace() {
        match word.split_once('=') {
            Some(("pass", v)) => pass = v.parse().ok(),
            Some(("fail", v)) => fail = v.parse().ok(),
            _ => {}
        }
    }
    Some((pass?, fail?))
}

// ---------------------------------------------------------------------------
// virtio-net: test frames, network namespaces, packet sockets on the TAP.
// ---------------------------------------------------------------------------

/// Ethertype of the virtio-net test frames (IEEE 802 local experimental 1).
pub const NET_TEST_ETHERTYPE: u16 = 0x88b5;

/// Payload length of test frame `i` is `NET_PAYLOAD_SIZES[i % 8]` (the
/// guest's definition, docs/test-guest.md).
pub const NET_PAYLOAD_SIZES: [usize; 8] = [1500, 64, 1024, 333, 1499, 65, 800, 257];

/// The Ethernet broadcast address (destination of the guest's frames).
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Source address the host side uses for the frames it sends to the guest
/// (locally administered; the guest does not check it).
pub const HOST_TEST_MAC: [u8; 6] = [0x02, 0x4e, 0x49, 0x4d, 0x42, 0x01];

/// Which way a test frame travels: its marker word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetDir {
    /// Guest to host, payload `NIMBUS-NET-TX <i>`.
    Tx,
    /// Host to guest, payload `NIMBUS-NET-RX <i>`.
    Rx,
}

impl NetDir {
    fn prefix(self) -> &'static str {
        match self {
            NetDir::Tx => "NIMBUS-NET-TX ",
            NetDir::Rx => "NIMBUS-NET-RX ",
        }
    }
}

/// Payload of test frame `i`: the marker `NIMBUS-NET-TX <i>` (or `-RX`), a
/// NUL byte, then byte `((7 * o + 13 * i) mod 256) ^ 0x5a` at each payload
/// offset `o`, up to `NET_PAYLOAD_SIZES[i % 8]` bytes.
pub fn net_test_payload(dir: NetDir, i: u32) -> Vec<u8> {
    let len = NET_PAYLOAD_SIZES[i as usize % NET_PAYLOAD_SIZES.len()];
    let marker = format!("{}{i}", dir.prefix()).into_bytes();
    (0..len)
        .map(|o| match o.cmp(&marker.len()) {
            std::cmp::Ordering::Less => marker[o],
            std::cmp::Ordering::Equal => 0,
            std::cmp::Ordering::Greater => {
                ((o as u32).wrapping_mul(7).wrapping_add(i.wrapping_mul(13)) as u8) ^ 0x5a
            }
        })
        .collect()
}

/// Test frame `i`: `dst`, `src`, ethertype [`NET_TEST_ETHERTYPE`], then
/// [`net_test_payload`]. The guest transmits `net_test_frame(Tx, i,
/// BROADCAST_MAC, guest_mac)`; the host sends `net_test_frame(Rx, i,
/// guest_mac, any)`.
pub fn net_test_frame(dir: NetDir, i: u32, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&NET_TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&net_test_payload(dir, i));
    f
}

/// The index of a test frame travelling `dir` (ethertype and marker
/// checked, nothing else), if `frame` is one.
pub fn net_test_frame_index(frame: &[u8], dir: NetDir) -> Option<u32> {
    if frame.len() < 14 || frame[12..14] != NET_TEST_ETHERTYPE.to_be_bytes() {
        return None;
    }
    let rest = frame[14..].strip_prefix(dir.prefix().as_bytes())?;
    let end = rest.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Checks the guest's transmitted frames as captured on the TAP: frames
/// `0..count` each exactly once and byte for byte `net_test_frame(Tx, i,
/// BROADCAST_MAC, guest_mac)`; frames that are not TX test frames are
/// ignored.
///
/// # Errors
/// Names the missing, duplicated and wrong frames.
pub fn verify_net_tx_frames(
    frames: &[Vec<u8>],
    count: u32,
    guest_mac: [u8; 6],
) -> Result<(), String> {
    let mut seen = vec![0u32; count as usize];
    let mut problems = Vec::new();
    for f in frames {
        let Some(i) = net_test_frame_index(f, NetDir::Tx) else {
            continue;
        };
        let Some(n) = seen.get_mut(i as usize) else {
            problems.push(format!("frame NIMBUS-NET-TX {i}: index beyond {count}"));
            continue;
        };
        *n += 1;
        let want = net_test_frame(NetDir::Tx, i, BROADCAST_MAC, guest_mac);
        if *f != want {
            let at = f.iter().zip(&want).position(|(a, b)| a != b);
            problems.push(format!(
                "frame NIMBUS-NET-TX {i}: {} bytes (expected {}), first difference at {at:?}",
                f.len(),
                want.len()
            ));
        }
    }
    for (i, &n) in seen.iter().enumerate() {
        match n {
            1 => {}
            0 => problems.push(format!("frame NIMBUS-NET-TX {i} not captured")),
            n => problems.push(format!("frame NIMBUS-NET-TX {i} captured {n} times")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} frame(s) captured, problems:\n  {}",
            frames.len(),
            problems.join("\n  ")
        ))
    }
}

/// Formats a MAC address as `xx:xx:xx:xx:xx:xx` (the form of `net.mac`).
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `ip` with `args`; returns stdout.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace `nimbus-<tag>-<pid>-<n>` (`ip netns add`), deleted
/// when dropped, also when a test panics. Needs root (CAP_SYS_ADMIN and
/// CAP_NET_ADMIN) and iproute2.
///
/// A VMM runs inside it through [`NetNs::wrap`] (`ip netns exec`), so the
/// TAP it creates lives there, invisible to the host and to other tests;
/// [`PacketSocket::open`] then talks to that TAP from the test process.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace (only the loopback device, down).
    ///
    /// # Panics
    /// If `ip netns add` fails (not root, no iproute2).
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("nimbus-{tag}-{}-{n}", std::process::id());
        // A leftover of a killed run with a recycled pid.
        let _ = ip(&["netns", "del", &name]);
        if let Err(e) = ip(&["netns", "add", &name]) {
            panic!("cannot create network namespace {name} (needs root and iproute2): {e}");
        }
        NetNs { name }
    }

    /// The namespace's name (for `ip netns exec <name>` / `ip -n <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/var/run/netns/<name>` (for `setns`).
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `cmd` rewritten to run inside the namespace: `ip netns exec <name>
    /// <program> <args...>`, with the same environment changes and working
    /// directory (standard I/O settings are not carried over; [`run_vm`] and
    /// [`spawn_vm`] set them). `ip netns exec` execs the program, so the
    /// process started is the program itself.
    pub fn wrap(&self, cmd: Command) -> Command {
        let mut w = Command::new("ip");
        w.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            w.current_dir(dir);
        }
        w
    }

    /// Runs `ip -n <name> <args...>` and returns its stdout.
    ///
    /// # Errors
    /// If `ip` fails; the message has its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// `sll_pkttype` of frames the interface itself sent.
const PACKET_OUTGOING: u8 = 4;

/// An AF_PACKET socket bound to one interface inside a [`NetNs`], for one
/// ethertype: frames written with [`PacketSocket::send`] leave through the
/// interface (on a TAP: they reach the VMM, i.e. the guest's receive
/// queue); [`PacketSocket::recv`] returns the frames the interface receives
/// (on a TAP: what the guest transmitted), never the ones sent from the
/// host side.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
    ethertype: u16,
}

impl PacketSocket {
    /// Waits at most `timeout` for `ifname` to appear in `ns` (a VMM
    /// creates its TAP at start-up), sets it up (`ip -n <ns> link set <if>
    /// up`) and opens a socket bound to it for `ethertype`. The socket is
    /// created on a thread that has entered the namespace (`setns`), so it
    /// belongs there; the test's other threads stay in the host namespace.
    ///
    /// # Errors
    /// If the interface does not appear in time or a system call fails.
    pub fn open(
        ns: &NetNs,
        ifname: &str,
        ethertype: u16,
        timeout: Duration,
    ) -> Result<Self, String> {
        let path = ns.path();
        let ns_name = ns.name().to_string();
        let ifname = ifname.to_string();
        let deadline = Instant::now() + timeout;
        let worker = thread::spawn(move || -> Result<PacketSocket, String> {
            use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
            let nsf = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // SAFETY: plain system call on an fd we own; it changes the
            // network namespace of this (short-lived) thread only.
            if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns({}): {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            let cname = std::ffi::CString::new(ifname.as_str())
                .map_err(|_| format!("bad interface name {ifname:?}"))?;
            let ifindex = loop {
                // SAFETY: `cname` is a valid NUL-terminated string.
                let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
                if idx != 0 {
                    break i32::try_from(idx).map_err(|_| format!("ifindex {idx}"))?;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "interface {ifname} did not appear in namespace {ns_name} within {timeout:.1?}"
                    ));
                }
                thread::sleep(Duration::from_millis(10));
            };
            ip(&["-n", &ns_name, "link", "set", "dev", &ifname, "up"])?;
            let proto = i32::from(ethertype.to_be());
            // SAFETY: plain system call; the result is checked.
            let raw = unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto)
            };
            if raw < 0 {
                return Err(format!(
                    "socket(AF_PACKET): {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: `raw` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = ifindex;
            // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r != 0 {
                return Err(format!(
                    "bind(AF_PACKET, {ifname}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(PacketSocket {
                fd,
                ifindex,
                ethertype,
            })
        });
        worker
            .join()
            .unwrap_or_else(|_| Err("the namespace thread panicked".to_string()))
    }

    /// The interface index (inside the namespace).
    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// Sends one complete Ethernet frame (header included; at most 1514
    /// bytes for a standard MTU) out of the interface.
    ///
    /// # Errors
    /// If the kernel refuses it (e.g. the interface is down).
    pub fn send(&self, frame: &[u8]) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        // SAFETY: the buffer is valid for `frame.len()` bytes.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if usize::try_from(n).ok() == Some(frame.len()) {
            Ok(())
        } else {
            Err(format!(
                "send of a {}-byte frame (ethertype {:#06x}) returned {n}: {}",
                frame.len(),
                self.ethertype,
                std::io::Error::last_os_error()
            ))
        }
    }

    /// The next frame the interface receives, waiting at most `timeout`
    /// (`None` when none came). Frames sent from the host side are skipped.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if r <= 0 {
                return None;
            }
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                if Instant::now() >= deadline {
                    return None;
                }
                continue;
            };
            if from.sll_pkttype != PACKET_OUTGOING {
                return Some(buf[..n].to_vec());
            }
        }
    }

    /// Collects received frames for which `keep` is true until there are
    /// `count` of them or `timeout` passes; returns what was collected.
    pub fn capture(
        &self,
        count: usize,
        timeout: Duration,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while frames.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(f) if keep(&f) => frames.push(f),
                Some(_) => {}
                None => break,
            }
        }
        frames
    }
}

/// Captures up to `count` frames of `ethertype` that `ifname` in `ns`
/// receives (what the guest sends, for a VMM's TAP), within `timeout`
/// (which also bounds the wait for the interface). The socket is opened
/// when this is called: frames sent earlier are not seen, so call it (on a
/// thread) before the guest transmits, or use [`PacketSocket`] directly.
///
/// # Errors
/// If the socket cannot be opened.
pub fn capture_frames(
    ns: &NetNs,
    ifname: &str,
    ethertype: u16,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, String> {
    let deadline = Instant::now() + timeout;
    let sock = PacketSocket::open(ns, ifname, ethertype, timeout)?;
    let left = deadline.saturating_duration_since(Instant::now());
    Ok(sock.capture(count, left, |_| true))
}

/// Sends `frames` (complete Ethernet frames, ethertype taken from the first
/// one) out of `ifname` in `ns`, i.e. to the guest behind a VMM's TAP.
/// Waits at most 10 s for the interface.
///
/// # Errors
/// If the socket cannot be opened or a send fails.
pub fn send_frames(ns: &NetNs, ifname: &str, frames: &[Vec<u8>]) -> Result<(), String> {
    let Some(first) = frames.first() else {
        return Ok(());
    };
    let ethertype = first
        .get(12..14)
        .map_or(NET_TEST_ETHERTYPE, |b| u16::from_be_bytes([b[0], b[1]]));
    let sock = PacketSocket::open(ns, ifname, ethertype, Duration::from_secs(10))?;
    frames.iter().try_for_each(|f| sock.send(f))
}

/// Parameters of [`exchange_test_frames`].
#[derive(Debug, Clone)]
pub struct NetExchange {
    /// The TAP the VMM creates inside the namespace.
    pub tap: String,
    /// The guest's MAC address (`net.mac`).
    pub guest_mac: [u8; 6],
    /// `net.rx.count`: frames the host sends after the guest's
    /// `INFO virtio.net<n>.rx.ready` line (0: none, no wait for that line).
    pub rx_count: u32,
    /// `net.tx.count`: frames expected from the guest.
    pub tx_count: u32,
    /// Device number `n` in the guest's check names (`virtio.net<n>.*`).
    pub device: usize,
    /// Bound on each step (TAP appearing, the ready line, the capture).
    pub timeout: Duration,
}

/// The host side of the guest's `virtio.net<n>.rx` and `tx` checks against
/// a running VMM whose TAP is `x.tap` inside `ns`: opens a [`PacketSocket`]
/// on the TAP (waiting for it and setting it up), waits for the guest's
/// `INFO virtio.net<n>.rx.ready` line, sends `net_test_frame(Rx, i,
/// guest_mac, HOST_TEST_MAC)` for `i < rx_count`, then captures the guest's
/// TX test frames and checks them with [`verify_net_tx_frames`]. Returns
/// the captured TX frames.
///
/// # Errors
/// Any step failing or timing out; the message includes the VMM's output.
pub fn exchange_test_frames(
    vm: &RunningVm,
    ns: &NetNs,
    x: &NetExchange,
) -> Result<Vec<Vec<u8>>, String> {
    let ctx = |e: String| format!("{e}\n{}", vm.describe_so_far());
    let sock = PacketSocket::open(ns, &x.tap, NET_TEST_ETHERTYPE, x.timeout).map_err(ctx)?;
    if x.rx_count > 0 {
        vm.wait_for_line(&format!("INFO virtio.net{}.rx.ready", x.device), x.timeout)?;
        for i in 0..x.rx_count {
            sock.send(&net_test_frame(NetDir::Rx, i, x.guest_mac, HOST_TEST_MAC))
                .map_err(ctx)?;
        }
    }
    let frames = sock.capture(x.tx_count as usize, x.timeout, |f| {
        net_test_frame_index(f, NetDir::Tx).is_some()
    });
    verify_net_tx_frames(&frames, x.tx_count, x.guest_mac).map_err(ctx)?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\x1b[2JSeaBIOS (version x)\r\nBooting from ROM..\n\
        NIMBUS-TEST-GUEST stage1\n\
        TEST pvh.magic PASS magic=0x336ec578 version=1\n\
        INFO memmap addr=0x0 size=0x9fc00\n\
        TEST cmdline PASS \"expect.cpus=1 x=y\"\r\n\
        TEST rtc FAIL no expect.now given\n\
        BENCH loop 12 ns\n\
        TESTS DONE pass=2 fail=1\n";

    #[test]
    fn parses_protocol_lines() {
        let r = GuestReport::parse(SAMPLE);
        assert_eq!(r.banner.as_deref(), Some("NIMBUS-TEST-GUEST stage1"));
        assert_eq!(r.tests.len(), 3);
        assert_eq!(
            r.test("pvh.magic"),
            Some((true, "magic=0x336ec578 version=1"))
        );
        assert_eq!(r.detail("cmdline"), Some("\"expect.cpus=1 x=y\""));
        assert_eq!(r.test("rtc"), Some((false, "no expect.now given")));
        assert_eq!(r.done, Some((2, 1)));
        assert_eq!(r.infos, vec!["memmap addr=0x0 size=0x9fc00".to_string()]);
        assert_eq!(r.benches, vec!["loop 12 ns".to_string()]);
        assert!(r.faults.is_empty());
    }

    #[test]
    fn problems_list_failures_and_counts() {
        let r = GuestReport::parse(SAMPLE);
        let p = r.problems();
        assert!(p.iter().any(|s| s.contains("rtc FAILED")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("fail=1")), "{p:?}");
        let clean = GuestReport::parse("TEST a PASS\nTESTS DONE pass=1 fail=0\n");
        assert!(clean.problems().is_empty());
        clean.assert_passed(&["a"]);
    }

    #[test]
    fn missing_done_and_faults_are_problems() {
        let r = GuestReport::parse("TEST a PASS x\nFAULT vector=0xe error=0x4 rip=0x1 cr2=0x2\n");
        let p = r.problems();
        assert!(p.iter().any(|s| s.contains("no `TESTS DONE`")), "{p:?}");
        assert_eq!(
            r.faults,
            vec!["vector=0xe error=0x4 rip=0x1 cr2=0x2".to_string()]
        );
    }

    #[test]
    #[should_panic(expected = "check b missing")]
    fn assert_passed_reports_missing_checks() {
        GuestReport::parse("TEST a PASS\nTESTS DONE pass=1 fail=0\n").assert_passed(&["a", "b"]);
    }

    #[test]
    fn malformed_lines_fail() {
        let r = GuestReport::parse("TEST weird MAYBE\nTESTS DONE pass=x\n");
        assert_eq!(r.test("weird").map(|t| t.0), Some(false));
        assert_eq!(r.done, Some((0, u32::MAX)));
    }

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
    fn disk_patterns_match_the_guest_definition() {
        // Spot values from the definitions in docs/test-guest.md.
        assert_eq!(disk_pattern_byte(0), 0xa5);
        assert_eq!(disk_pattern_byte(0x1ff), 0xff ^ 0xa5);
        assert_eq!(disk_pattern_byte(0x201), 0xa5); // sector 1 ^ byte 1
        assert_eq!(guest_pattern_byte(0), 0x3c);
        assert_eq!(guest_pattern_byte(0x203), 7 ^ 0x3c ^ 3);
        assert_eq!(guest_pattern_byte(0x2_0000), 0x3c); // sector 256 wraps to 0
    }

    #[test]
    fn disk_pattern_write_and_verify() {
        let dir = ScratchDir::new("e2e-unit-disk");
        let img = dir.file("disk.img");
        let size = 64 * SECTOR_SIZE;
        write_disk_pattern(&img, size).expect("write image");
        verify_disk_pattern(&img, size, None).expect("fresh image verifies");
        assert!(verify_disk_pattern(&img, size, Some(8)).is_err());
        // Write the guest pattern to sectors 8..16 like the guest does.
        let mut data = std::fs::read(&img).expect("read image");
        for o in 8 * SECTOR_SIZE..16 * SECTOR_SIZE {
            data[o as usize] = guest_pattern_byte(o);
        }
        data[100] ^= 1;
        std::fs::write(&img, &data).expect("write image");
        let err = verify_disk_pattern(&img, size, Some(8)).expect_err("one byte is wrong");
        assert!(
            err.contains("1 byte(s) in 0x0..0x8000 differ") && err.contains("offset 0x64"),
            "{err}"
        );
        data[100] ^= 1;
        std::fs::write(&img, &data).expect("write image");
        verify_disk_pattern(&img, size, Some(8)).expect("guest pattern verifies");
        assert!(verify_disk_pattern(&img, size + SECTOR_SIZE, Some(8)).is_err());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn stage2_keys_cmdline() {
        assert_eq!(Stage2Keys::default().to_cmdline(), "");
        let k = Stage2Keys {
            virtio: Some(vec![("blk", 1), ("rng", 1)]),
            blk_pattern_sector: Some(2048),
            blk_serial: Some("abc".into()),
            blk_readonly: true,
            console_message: Some("hi".into()),
            net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            net_tx_count: Some(3),
            net_rx_count: Some(0),
            hostile: true,
        };
        assert_eq!(
            k.to_cmdline(),
            "expect.virtio=blk:1,rng:1 blk.pattern.sector=2048 blk.serial=abc blk.readonly=1 console.message=hi net.mac=52:54:00:12:34:ab net.tx.count=3 net.rx.count=0 hostile=1"
        );
        assert_eq!(hostile_checks()[0], "hostile.desc_oob");
        assert_eq!(hostile_checks().len(), HOSTILE_ATTACKS.len());
        assert_eq!(
            virtio_checks("rng", 0, VIRTIO_RNG_CHECKS)[0],
            "virtio.rng0.init"
        );
    }

    #[test]
    fn stage1_cmdline_has_all_keys() {
        let c = stage1_cmdline(2, 3584 << 20);
        assert!(
            c.starts_with("expect.cpus=2 expect.mem=3758096384 expect.now="),
            "{c}"
        );
    }

    #[test]
    fn net_test_frames_match_the_guest_definition() {
        let f = net_test_frame(NetDir::Tx, 0, BROADCAST_MAC, [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.len(), 14 + 1500);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(&f[14..30], b"NIMBUS-NET-TX 0\0");
        // Payload offset 16, frame 0: (7 * 16) ^ 0x5a.
        assert_eq!(f[14 + 16], (7 * 16) ^ 0x5a);
        let p = net_test_payload(NetDir::Rx, 9);
        assert_eq!(p.len(), 64);
        assert_eq!(&p[..16], b"NIMBUS-NET-RX 9\0");
        assert_eq!(p[63], ((7 * 63 + 13 * 9) as u8) ^ 0x5a);
        assert_eq!(net_test_frame_index(&f, NetDir::Tx), Some(0));
        assert_eq!(net_test_frame_index(&f, NetDir::Rx), None);
        let g = net_test_frame(NetDir::Rx, 12, [1; 6], [2; 6]);
        assert_eq!(net_test_frame_index(&g, NetDir::Rx), Some(12));
        assert_eq!(g.len(), 14 + NET_PAYLOAD_SIZES[4]);
    }

    #[test]
    fn verify_net_tx_frames_finds_problems() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let good: Vec<Vec<u8>> = (0..3)
            .map(|i| net_test_frame(NetDir::Tx, i, BROADCAST_MAC, mac))
            .collect();
        verify_net_tx_frames(&good, 3, mac).expect("all three");
        let e = verify_net_tx_frames(&good[..2], 3, mac).expect_err("one missing");
        assert!(e.contains("NIMBUS-NET-TX 2 not captured"), "{e}");
        let mut bad = good.clone();
        bad[1][50] ^= 1;
        bad.push(good[0].clone());
        let e = verify_net_tx_frames(&bad, 3, mac).expect_err("corrupt and duplicate");
        assert!(
            e.contains("TX 1: 78 bytes") && e.contains("TX 0 captured 2 times"),
            "{e}"
        );
        assert_eq!(format_mac(mac), "52:54:00:12:34:56");
    }

    #[test]
    fn net_mq_helpers() {
        assert_eq!(net_tx_frames_of_pair(21, 2, 0), 11);
        assert_eq!(net_tx_frames_of_pair(21, 2, 1), 10);
        assert_eq!(net_tx_frames_of_pair(2, 3, 2), 0);
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let frames: Vec<Vec<u8>> = (0..5)
            .map(|i| net_test_frame(NetDir::Tx, i, BROADCAST_MAC, mac))
            .collect();
        assert_eq!(net_tx_frames_per_pair(&frames, 2), vec![3, 2]);
        let nic = Nic {
            tap: "t",
            mac,
            rx_count: 3,
            tx_count: 5,
        };
        let good = "TEST virtio.net0.init PASS x\n\
            TEST virtio.net0.pcicfg PASS x\n\
            TEST virtio.net0.mac PASS x\n\
            TEST virtio.net0.ctrl PASS controlq 4: VQ_PAIRS_SET(0)=ERR VQ_PAIRS_SET(3)=ERR VQ_PAIRS_SET(2)=OK\n\
            TEST virtio.net0.rx PASS 3/3 test frames intact in 0 ms (frames=3 ignored=0 multi_buffer=0 buffers=8 bufsize=2048 mrg_rxbuf=yes per_queue=q0:1,q2:2)\n\
            TEST virtio.net0.tx PASS 5/5 frames (...); per pair (returned/sent): p0=3/3 p1=2/2; 2 of 2 batch(es) signalled\n\
            TEST virtio.net0.mq PASS pairs=2; tx returned/sent per pair: p0=3/3 p1=2/2\n\
            TEST virtio.net0.msix PASS x\n\
            TESTS DONE pass=8 fail=0\n";
        let r = GuestReport::parse(good);
        check_net_mq_report(&r, 0, &nic, 2, 2, &frames).expect("clean report");
        let e = check_net_mq_report(&r, 0, &nic, 2, 2, &frames[..4]).expect_err("frame 4 lost");
        assert!(e.contains("pair 0: 2 of its 3 frames captured"), "{e}");
        let bad = good.replace("VQ_PAIRS_SET(0)=ERR", "VQ_PAIRS_SET(0)=OK");
        let e = check_net_mq_report(&GuestReport::parse(&bad), 0, &nic, 2, 2, &frames)
            .expect_err("pairs=0 accepted");
        assert!(e.contains("ctrl detail"), "{e}");
        let short = good.replace("q2:2", "q2:1");
        let e = check_net_mq_report(&GuestReport::parse(&short), 0, &nic, 2, 2, &frames)
            .expect_err("per-queue counts short");
        assert!(e.contains("add up to 2"), "{e}");
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
/// One virtio-net device of a VMM run: its TAP (created by the VMM inside the
/// test's network namespace), its MAC and the frame counts for its checks.
#[derive(Debug, Clone)]
pub struct Nic {
    /// TAP interface name.
    pub tap: &'static str,
    /// Guest MAC.
    pub mac: [u8; 6],
    /// Frames the host sends to the guest.
    pub rx_count: u32,
    /// Frames the guest sends.
    pub tx_count: u32,
}

/// The common part of [`boot_net`] and [`boot_net_mq`]: the guest command line (stage 1, the
/// device count, each NIC's MAC and frame counts, then `words`), the VMM started inside a
/// fresh network namespace, the host side of each device's `rx` and `tx` checks, and the run
/// to its end. Returns the run, the command line and the frames captured per device.
fn exchange_on_nics(
    test: &str,
    nics: &[Nic],
    other_devices: &[(&str, u32)],
    words: &str,
    timeout: Duration,
    vmm_command: impl FnOnce(&str) -> Command,
) -> (VmRun, String, Vec<Vec<Vec<u8>>>) {
    let others: String = other_devices
        .iter()
        .map(|(k, n)| format!(",{k}:{n}"))
        .collect();
    let mut cmdline = format!(
        "{} expect.virtio=net:{}{others}",
        stage1_cmdline(1, 256 << 20),
        nics.len()
    );
    for (n, nic) in nics.iter().enumerate() {
        cmdline += &format!(
            " net{n}.mac={} net{n}.rx.count={} net{n}.tx.count={}",
            format_mac(nic.mac),
            nic.rx_count,
            nic.tx_count
        );
    }
    if !words.is_empty() {
        cmdline += " ";
        cmdline += words;
    }
    let cmd = vmm_command(&cmdline);
    let ns = NetNs::new("net");
    let vm = spawn_vm(ns.wrap(cmd));
    let mut captured = Vec::with_capacity(nics.len());
    for (n, nic) in nics.iter().enumerate() {
        let x = NetExchange {
            tap: nic.tap.to_string(),
            guest_mac: nic.mac,
            rx_count: nic.rx_count,
            tx_count: nic.tx_count,
            device: n,
            timeout,
        };
        match exchange_test_frames(&vm, &ns, &x) {
            Ok(frames) => captured.push(frames),
            Err(e) => panic!("{test}: net{n} on {}: {e}", nic.tap),
        }
    }
    let run = vm.finish(timeout);
    eprintln!("{test}: VMM finished in {:.1?}", run.elapsed);
    for line in run.stdout.lines().filter(|l| l.contains("virtio.net")) {
        eprintln!("{test}: {line}");
    }
    (run, cmdline, captured)
}

/// Boots a VMM inside a fresh network namespace with one virtio-net device per
/// `nics` entry, each on its own TAP, plays the host side of each device's `rx`
/// and `tx` checks in turn (frames sent after the guest's `rx.ready` line, the
/// guest's frames captured and checked byte for byte), and checks that the VMM
/// exited 0 after a clean report with every net check passed. `words` are extra
/// guest command-line keys; `other_devices` are the VMM's other virtio devices
/// (`("rng", 1)`), so the guest's device count is exact; `vmm_command` builds the
/// VMM's command for a guest command line (it runs inside the namespace).
pub fn boot_net(
    test: &str,
    nics: &[Nic],
    other_devices: &[(&str, u32)],
    words: &str,
    timeout: Duration,
    vmm_command: impl FnOnce(&str) -> Command,
) -> (VmRun, GuestReport) {
    let (run, cmdline, _) =
        exchange_on_nics(test, nics, other_devices, words, timeout, vmm_command);
    run.assert_success();
    let report = run.report();
    let mut names: Vec<String> = STAGE2_PCI_CHECKS.iter().map(|s| s.to_string()).collect();
    for n in 0..nics.len() {
        names.extend(virtio_checks("net", n, VIRTIO_NET_CHECKS));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "{}",
        run.describe()
    );
    for (n, nic) in nics.iter().enumerate() {
        let rx = report
            .detail(&format!("virtio.net{n}.rx"))
            .unwrap_or_default();
        let tx = report
            .detail(&format!("virtio.net{n}.tx"))
            .unwrap_or_default();
        let mac = report
            .detail(&format!("virtio.net{n}.mac"))
            .unwrap_or_default();
        assert!(
            rx.starts_with(&format!("{0}/{0} test frames intact", nic.rx_count))
                && tx.starts_with(&format!("{0}/{0} frames", nic.tx_count))
                && mac.starts_with(&format!("mac={}", format_mac(nic.mac))),
            "net{n}: rx {rx:?} tx {tx:?} mac {mac:?}\n{}",
            run.describe()
        );
    }
    (run, report)
}

/// How many of the TX test frames `0..count` the guest puts on pair `pair` of `pairs` when it
/// runs with `net<n>.pairs`: frame `i` leaves on pair `i % pairs`.
pub fn net_tx_frames_of_pair(count: u32, pairs: u32, pair: u32) -> u32 {
    if pairs == 0 {
        return 0;
    }
    count / pairs + u32::from(pair < count % pairs)
}

/// The captured TX test frames per pair (frame `i` counted for pair `i % pairs`); frames that
/// are not TX test frames are not counted.
pub fn net_tx_frames_per_pair(frames: &[Vec<u8>], pairs: u32) -> Vec<u32> {
    let mut per = vec![0u32; pairs as usize];
    for f in frames {
        if let Some(i) = net_test_frame_index(f, NetDir::Tx) {
            if let Some(n) = per.get_mut((i % pairs.max(1)) as usize) {
                *n += 1;
            }
        }
    }
    per
}

/// Checks the guest's report of device `n` run with `net<n>.pairs=pairs` against a device with
/// `max_pairs` queue pairs, after the host exchanged `nic`'s frames and captured `captured`
/// (what [`exchange_test_frames`] returned): every check of [`VIRTIO_NET_MQ_CHECKS`] passed;
/// `ctrl` saw VQ_PAIRS_SET(0) and VQ_PAIRS_SET(max + 1) refused and VQ_PAIRS_SET(pairs)
/// acknowledged; every frame reached the guest (counted per receive queue) and every pair
/// returned its share of the TX frames ([`net_tx_frames_of_pair`]), which were all captured.
///
/// # Errors
/// What does not hold.
pub fn check_net_mq_report(
    report: &GuestReport,
    n: usize,
    nic: &Nic,
    pairs: u32,
    max_pairs: u32,
    captured: &[Vec<u8>],
) -> Result<(), String> {
    let mut problems = Vec::new();
    for name in virtio_checks("net", n, VIRTIO_NET_MQ_CHECKS) {
        match report.test(&name) {
            Some((true, _)) => {}
            Some((false, d)) => problems.push(format!("{name} FAILED: {d}")),
            None => problems.push(format!("{name} missing")),
        }
    }
    let detail = |c: &str| report.detail(&format!("virtio.net{n}.{c}")).unwrap_or("");
    let ctrl = detail("ctrl");
    let want_ctrl = format!(
        "VQ_PAIRS_SET(0)=ERR VQ_PAIRS_SET({})=ERR VQ_PAIRS_SET({pairs})=OK",
        max_pairs + 1
    );
    if !ctrl.contains(&want_ctrl) {
        problems.push(format!("ctrl detail {ctrl:?} lacks {want_ctrl:?}"));
    }
    let rx = detail("rx");
    if !rx.starts_with(&format!("{0}/{0} test frames intact", nic.rx_count)) {
        problems.push(format!("rx detail {rx:?}: not all {} frames", nic.rx_count));
    }
    let per_queue: u32 = rx
        .split_once("per_queue=")
        .map(|(_, r)| r.split([')', ' ']).next().unwrap_or(""))
        .unwrap_or("")
        .split(',')
        .filter_map(|q| q.split_once(':').and_then(|(_, c)| c.parse::<u32>().ok()))
        .sum();
    if per_queue != nic.rx_count {
        problems.push(format!(
            "rx detail {rx:?}: per-queue counts add up to {per_queue}, not {}",
            nic.rx_count
        ));
    }
    let tx = detail("tx");
    let mq = detail("mq");
    let captured_per_pair = net_tx_frames_per_pair(captured, pairs);
    for p in 0..pairs {
        let want = net_tx_frames_of_pair(nic.tx_count, pairs, p);
        let share = format!("p{p}={want}/{want}");
        if !tx.contains(&share) || !mq.contains(&share) {
            problems.push(format!(
                "pair {p}: tx/mq details lack {share}: {tx:?} {mq:?}"
            ));
        }
        if captured_per_pair[p as usize] != want {
            problems.push(format!(
                "pair {p}: {} of its {want} frames captured on the TAP",
                captured_per_pair[p as usize]
            ));
        }
    }
    if !tx.starts_with(&format!("{0}/{0} frames", nic.tx_count)) {
        problems.push(format!("tx detail {tx:?}: not all {} frames", nic.tx_count));
    }
    if let Err(e) = verify_net_tx_frames(captured, nic.tx_count, nic.mac) {
        problems.push(e);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Like [`boot_net`] for one device driven with `net0.pairs=pairs` against a device with
/// `max_pairs` queue pairs: boots the VMM inside a fresh network namespace, plays the host
/// side of `rx` and `tx` on `nic.tap` ([`exchange_test_frames`]) and asserts a clean run
/// with the stage-2 PCI checks passed and [`check_net_mq_report`].
#[allow(clippy::too_many_arguments)]
pub fn boot_net_mq(
    test: &str,
    nic: &Nic,
    pairs: u32,
    max_pairs: u32,
    other_devices: &[(&str, u32)],
    words: &str,
    timeout: Duration,
    vmm_command: impl FnOnce(&str) -> Command,
) -> (VmRun, GuestReport) {
    let words = format!("net0.pairs={pairs} {words}");
    let (run, cmdline, captured) = exchange_on_nics(
        test,
        std::slice::from_ref(nic),
        other_devices,
        words.trim_end(),
        timeout,
        vmm_command,
    );
    run.assert_success();
    let report = run.report();
    report.assert_passed(STAGE2_PCI_CHECKS);
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "{}",
        run.describe()
    );
    let captured = captured.first().map_or(&[][..], Vec::as_slice);
    if let Err(e) = check_net_mq_report(&report, 0, nic, pairs, max_pairs, captured) {
        panic!("{test}: {e}\n{}", run.describe());
    }
    (run, report)
}

// ---------------------------------------------------------------------------
// vhost-user-blk: the `vhost_user_block` daemon (see docs/vhost-user.md).
// ---------------------------------------------------------------------------

/// What the daemon helpers ([`VhostUserBlockDaemon`], [`Virtiofsd`]) share: a process in its
/// own process group, killed if the test process dies, with its output in a log file and a
/// socket to wait for; dropping it kills it.
mod daemon_process {
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
                Some(mut child) => super::wait_with_timeout(&mut child, timeout),
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
}

pub use vhost_user_block_daemon::{
    qemu_vhost_user_blk_args, vhost_user_block_binary, workspace_bin, workspace_binary,
    VhostUserBlockDaemon, VhostUserBlockRun, VHOST_USER_BLOCK_ENV,
};

/// Helpers to run the `vhost_user_block` daemon next to a VMM.
mod vhost_user_block_daemon {
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus, Stdio};
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::daemon_process::{is_socket, DaemonProcess};

    use super::repo_root;

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
            .ok_or_else(|| {
                format!("cargo built {package} but named no executable {bin}:\n{stdout}")
            })
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

        #[test]
        fn qemu_args() {
            let a = qemu_vhost_user_blk_args(Path::new("/s.sock"), 2, 256);
            assert!(a.contains(&"memory-backend-memfd,id=mem,size=256M,share=on".to_string()));
            assert!(a.contains(&"socket,id=vub,path=/s.sock".to_string()));
            assert!(
                a.contains(&"vhost-user-blk-pci,chardev=vub,num-queues=2,disable-legacy=on".into())
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Long, CPU-bound guests (a real Linux kernel) side by side, and watching their
// output with fail-fast patterns (vmm/tests/linux_guest.rs).
// ---------------------------------------------------------------------------

pub use parallel_vms::{spawn_vm_parallel, LineMatch, PARALLEL_VMS};

/// [`spawn_vm_parallel`] and [`RunningVm::wait_for_line_after`].
mod parallel_vms {
    use std::process::Command;
    use std::sync::{Mutex, MutexGuard};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::RunningVm;

    /// How many VMs [`spawn_vm_parallel`] lets run at once in one test process.
    pub const PARALLEL_VMS: usize = 2;

    static SLOTS: [Mutex<()>; PARALLEL_VMS] = [const { Mutex::new(()) }; PARALLEL_VMS];

    /// Starts `cmd` like [`super::spawn_vm`] (stdin from /dev/null, output captured, own
    /// process group killed on drop, SIGKILL if the test process dies) but lets up to
    /// [`PARALLEL_VMS`] such VMs run at once, for guests that take tens of seconds and one
    /// core each (a Linux boot on a PVM host). It waits for a free slot; the wait does not
    /// count against any timeout. It is not serialised with [`super::run_vm`] /
    /// [`super::spawn_vm`]: a test binary should use one or the other.
    ///
    /// # Panics
    /// If the process cannot be started.
    pub fn spawn_vm_parallel(cmd: Command) -> RunningVm {
        super::spawn_holding(cmd, take_slot())
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
        use super::super::spawn_vm;
        use super::*;

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
}

// ---------------------------------------------------------------------------
// virtio-fs: virtiofsd (the external vhost-user-fs backend, see docs/test-guest.md).
// ---------------------------------------------------------------------------

pub use virtiofsd_daemon::{
    qemu_vhost_user_fs_args, virtiofs_keys, virtiofsd_binary, Virtiofsd, VirtiofsdRun,
    VIRTIOFSD_ENV, VIRTIO_FS_CHECKS,
};

/// Helpers to run virtiofsd next to a VMM and to ask the test guest for its virtio-fs checks.
mod virtiofsd_daemon {
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitStatus};
    use std::time::Duration;

    use crate::daemon_process::DaemonProcess;

    /// Environment variable naming the virtiofsd binary to use instead of the one on `PATH`.
    pub const VIRTIOFSD_ENV: &str = "NIMBUS_VIRTIOFSD";

    /// Check names of one virtio-fs device (`virtio.fs<n>.<name>`, see [`super::virtio_checks`]).
    pub const VIRTIO_FS_CHECKS: &[&str] =
        &["init", "pcicfg", "fuse_init", "lookup", "read", "msix"];

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
}

// ---------------------------------------------------------------------------
// Block soak mode (`soak=blk`, docs/test-guest.md "Block soak"): command line, progress
// lines and the image check.
// ---------------------------------------------------------------------------

/// The guest's block soak keys: `soak=blk soak.mib=<mib> soak.mibps=<mibps>` (0: no rate
/// limit), plus `soak.stall=<secs>` if given (guest default 30).
pub fn soak_blk_keys(mib: u64, mibps: u64, stall_secs: Option<u64>) -> String {
    let mut keys = format!("soak=blk soak.mib={mib} soak.mibps={mibps}");
    if let Some(s) = stall_secs {
        keys.push_str(&format!(" soak.stall={s}"));
    }
    keys
}

/// The progress line the soak guest prints once `mib` MiB of writes have completed (`mib` a
/// multiple of 8, or the region size); for [`RunningVm::wait_for_line`].
pub fn soak_blk_written_line(mib: u64) -> String {
    format!("INFO soak blk written={mib} MiB")
}

/// Checks that the bytes `range` of the image at `path` hold the guest pattern
/// ([`guest_pattern_byte`], the data `soak=blk` writes). The error names the number of
/// wrong bytes and the first few.
pub fn verify_guest_pattern(path: &Path, range: std::ops::Range<u64>) -> Result<(), String> {
    let len = image_len(path)?;
    if len < range.end {
        return Err(format!(
            "{} is {len} bytes, shorter than {:#x}",
            path.display(),
            range.end
        ));
    }
    compare_image(path, range, |at| (guest_pattern_byte(at), "guest pattern"))
}
