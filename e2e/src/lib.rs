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
//!   device reports, [`ScratchDir`] holds the files of one test.
//!
//! This is test support code: its functions panic with a descriptive message
//! when the environment is broken (guest does not build, QEMU missing).

#![deny(missing_docs)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write as _};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
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

/// Checks every modern virtio-net device reports (initialisation only).
pub const VIRTIO_NET_CHECKS: &[&str] = &["init", "pcicfg"];

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
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    if len != size {
        return Err(format!(
            "{} is {len} bytes, expected {size}",
            path.display()
        ));
    }
    let guest = guest_sector.map(|s| s * SECTOR_SIZE..(s + GUEST_WRITE_SECTORS) * SECTOR_SIZE);
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut chunk = vec![0u8; 1 << 16];
    let mut o = 0u64;
    let mut wrong = 0u64;
    let mut first = String::new();
    while o < size {
        let n = chunk
            .len()
            .min(usize::try_from(size - o).unwrap_or(usize::MAX));
        r.read_exact(&mut chunk[..n])
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for (i, &got) in chunk[..n].iter().enumerate() {
            let at = o + i as u64;
            let (want, which) = match &guest {
                Some(g) if g.contains(&at) => (guest_pattern_byte(at), "guest"),
                _ => (disk_pattern_byte(at), "host"),
            };
            if got != want {
                if wrong < 8 {
                    let _ = write!(
                        first,
                        "\n  offset {at:#x} (sector {}): {got:#04x}, expected {want:#04x} ({which} pattern)",
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
            "{}: {wrong} byte(s) differ from the expected patterns:{first}",
            path.display()
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
pub fn run_vm(mut cmd: Command, timeout: Duration) -> VmRun {
    let _serial = VM_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
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
    let (status, timed_out) = wait_with_timeout(&mut child, timeout);
    let elapsed = start.elapsed();
    let drain_deadline = Instant::now() + DRAIN_GRACE;
    VmRun {
        status,
        stdout: stdout.finish(drain_deadline),
        stderr: stderr.finish(drain_deadline),
        timed_out,
        elapsed,
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

/// Reads a pipe on a thread into a shared buffer.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Option<mpsc::Receiver<()>>,
}

impl Collector {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let done = pipe.map(|mut p| {
            let (tx, rx) = mpsc::channel();
            let shared = Arc::clone(&buf);
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                // EOF or a read error ends the capture; what was read is kept.
                while let Ok(n @ 1..) = p.read(&mut chunk) {
                    shared
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
                let _ = tx.send(());
            });
            rx
        });
        Collector { buf, done }
    }

    /// Waits for EOF until `deadline`, then returns what was read.
    fn finish(self, deadline: Instant) -> String {
        if let Some(rx) = &self.done {
            let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        let bytes = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
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
            err.contains("1 byte(s) differ") && err.contains("offset 0x64"),
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
        };
        assert_eq!(
            k.to_cmdline(),
            "expect.virtio=blk:1,rng:1 blk.pattern.sector=2048 blk.serial=abc blk.readonly=1 console.message=hi"
        );
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
}
