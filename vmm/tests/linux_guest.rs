//! A real Linux guest under Nimbus: the tailored test kernel and initramfs built by
//! `scripts/build-linux-guest` (see docs/linux-guest.md) boot through PVH, and the tests assert on
//! the kernel's own log (`console=ttyS0`, Nimbus `--serial tty`) and on what the test init
//! (`linux/init/nimbus-init.c`) reports: ACPI tables and S5 power-off, an ACPI reboot, PCI
//! enumeration with BARs inside Nimbus's windows and MSI-X, virtio-blk (capacity, a host marker
//! read, a guest marker written, a read-only disk refusing writes), virtio-net (kernel IP
//! autoconfiguration, a UDP round trip through the host's stack, frames captured on the TAP), and
//! the same kernel under QEMU as a reference, with boot-to-milestone times.
//!
//! Boots are shared: one "devices" boot serves the ACPI power-off, PCI, blk and net tests; the
//! reboot and QEMU tests have their own. Each boot is a single vCPU spending most of its time in
//! emulated kernel mode (PVM hosts), so at most two run at once ([`e2e::spawn_vm_parallel`]).
//! Every wait fails fast on a kernel panic, an oops, an init error line or a Nimbus `ERROR`.
//!
//! Needs /dev/kvm (else each test prints a loud SKIPPED line), root (network namespace, TAP),
//! and the kernel: the build script runs once per test process (cached; a cold build takes a few
//! minutes). A failed build fails the tests with its output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use e2e::{
    format_mac, qemu_q35_command, repo_root, require_kvm, spawn_vm_parallel, workspace_binary,
    NetNs, PacketSocket, RunningVm, ScratchDir, VhostUserBlockDaemon, VmRun,
};

/// Kernel command line of every boot: the kernel log on the serial port (`earlyprintk`: from the
/// first line, so that an early panic shows and "Linux version" is timed when it happens), and
/// what the PVM hosts need (`noxsave`: no XSAVE/XRSTOR; `clearcpuid=`: no CMPXCHG16B, SMAP
/// (`clac`), POPCNT); `rodata=off` saves ~1.7 s.
const BASE_CMDLINE: &str =
    "console=ttyS0 earlyprintk=ttyS0 noxsave clearcpuid=141,308,151 rodata=off";
/// Guest RAM.
const MEMORY_MIB: u64 = 128;
/// Bound on each awaited line: a boot takes 15-30 s on the PVM hosts under Nimbus, up to ~50 s
/// under QEMU with two boots at once; a dead kernel is caught by the fatal lines or the VMM's
/// exit long before this.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the VMM's exit after the guest's last line.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines that end a boot at once: the kernel died or the init failed.
const FATAL_STDOUT: &[&str] = &[
    "Kernel panic",
    "Oops",
    "BUG: ",
    "kernel BUG",
    "general protection fault",
    "NIMBUS-LINUX error",
];
/// Nimbus log lines that end a boot at once (warnings are its default level).
const FATAL_STDERR: &[&str] = &["ERROR"];

/// The disks of the devices boot: vda (writable, an odd size) and vdb (read-only).
const VDA_SECTORS: u64 = 40_963;
const VDB_SECTORS: u64 = 8_197;
/// Where the host's marker is (both disks) and where the guest writes (vda) or tries to (vdb).
const HOST_SECTOR: u64 = 2048;
const GUEST_SECTOR: u64 = 4096;
const VDA_HOST_MARKER: &str = "NIMBUS-HOST-MARKER-VDA";
const VDB_HOST_MARKER: &str = "NIMBUS-HOST-MARKER-VDB";
const GUEST_MARKER: &str = "NIMBUS-GUEST-MARKER";

/// The devices boot's virtio-net: TAP (inside a fresh network namespace), host and guest.
const TAP: &str = "nimbus-lg0";
const HOST_IP: [u8; 4] = [192, 168, 249, 1];
const GUEST_IP: [u8; 4] = [192, 168, 249, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x4c, 0x47, 0x01];
/// The UDP datagram the init sends to the host's discard port (nothing listens there, so the
/// host answers ICMP port unreachable and the init's recv fails with ECONNREFUSED).
const UDP_PORT: u16 = 9;
const UDP_TEXT: &str = "NIMBUS-LINUX-UDP";

/// vsock of the devices boot: the guest's CID, the port its init listens on (Kata's agent
/// port), the host port it connects to, and what each side sends.
const VSOCK_CID: u32 = 3;
const AGENT_PORT: u32 = 1024;
const HOST_VSOCK_PORT: u32 = 1025;
const KATA_TEXT: &str = "NIMBUS-KATA-PING";
const GUEST_VSOCK_TEXT: &str = "NIMBUS-LINUX-VSOCK";
const HOST_VSOCK_REPLY: &str = "NIMBUS-HOST-PONG";

/// Nimbus's PCI MMIO windows (arch layout): 32-bit below the MCFG area, 64-bit from 4 GiB.
const MMIO32: (u64, u64) = (0xc000_0000, 0xdfff_ffff);
const MMIO64_START: u64 = 0x1_0000_0000;

/// `IORESOURCE_*` flags in /sys/bus/pci/devices/*/resource.
const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;

fn ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

// ---------------------------------------------------------------------------------------------
// The kernel and initramfs
// ---------------------------------------------------------------------------------------------

struct LinuxGuest {
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

/// Runs `scripts/build-linux-guest` once per process (it is cached across runs).
///
/// # Panics
/// If the build fails, with its output.
fn linux_guest() -> &'static LinuxGuest {
    static GUEST: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
    match GUEST.get_or_init(build_linux_guest) {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    }
}

fn build_linux_guest() -> Result<LinuxGuest, String> {
    let script = repo_root().join("scripts").join("build-linux-guest");
    let t0 = Instant::now();
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = |why: &str| {
        format!(
            "{} failed: {why}\n----- stdout -----\n{stdout}\n----- stderr -----\n{stderr}",
            script.display()
        )
    };
    if !out.status.success() {
        return Err(failed(&out.status.to_string()));
    }
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    let (Some(vmlinux), Some(initramfs)) = (value("vmlinux="), value("initramfs=")) else {
        return Err(failed(
            "no existing vmlinux=/initramfs= paths in its output",
        ));
    };
    eprintln!(
        "linux guest: {} and {} ({:.1?})",
        vmlinux.display(),
        initramfs.display(),
        t0.elapsed()
    );
    Ok(LinuxGuest { vmlinux, initramfs })
}

// ---------------------------------------------------------------------------------------------
// Following a boot
// ---------------------------------------------------------------------------------------------

/// One VMM run: the output, the time each milestone line was seen (from the VMM's start), and
/// why it was cut short, if it was.
struct Boot {
    name: &'static str,
    run: VmRun,
    milestones: Vec<(String, Duration)>,
    failure: Option<String>,
}

impl Boot {
    /// Waits for each of `milestones` in turn (each after the previous one), then for the
    /// VMM's exit; kills it at the first failure.
    fn follow(name: &'static str, vm: RunningVm, milestones: &[&str]) -> Boot {
        Self::follow_with(name, vm, milestones, FATAL_STDERR)
    }

    fn follow_with(
        name: &'static str,
        vm: RunningVm,
        milestones: &[&str],
        fatal_stderr: &[&str],
    ) -> Boot {
        let mut times = Vec::new();
        let mut failure = None;
        let mut from = 0;
        for m in milestones {
            match vm.wait_for_line_after(from, m, FATAL_STDOUT, fatal_stderr, STEP_TIMEOUT) {
                Ok(found) => {
                    from = found.end;
                    times.push(((*m).to_string(), found.at));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let run = if failure.is_some() {
            vm.kill()
        } else {
            vm.finish(EXIT_TIMEOUT)
        };
        if failure.is_none() {
            times.push(("VMM exit".to_string(), run.elapsed));
        }
        let boot = Boot {
            name,
            run,
            milestones: times,
            failure,
        };
        eprintln!("{}", boot.timeline());
        boot
    }

    /// `<name>: <milestone> <t> | ...` for the test output and docs.
    fn timeline(&self) -> String {
        let mut s = format!("linux guest {} boot-to-milestone:", self.name);
        for (m, t) in &self.milestones {
            let _ = write!(s, " | {m:?} {:.1} s", t.as_secs_f64());
        }
        s
    }

    /// The whole story, for failure messages.
    fn describe(&self) -> String {
        format!(
            "{}\n{}{}",
            self.timeline(),
            self.failure
                .as_deref()
                .map_or(String::new(), |f| format!("boot cut short: {f}\n")),
            self.run.describe()
        )
    }

    /// Panics unless the boot reached every milestone and the VMM exited 0.
    fn assert_clean(&self) {
        assert!(
            self.failure.is_none() && self.run.success(),
            "{} boot did not complete cleanly\n{}",
            self.name,
            self.describe()
        );
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.run.stdout.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// The kernel log / init lines containing `pattern`.
    fn grep(&self, pattern: &str) -> Vec<&str> {
        self.lines().filter(|l| l.contains(pattern)).collect()
    }

    /// Asserts some line contains `pattern`; returns the first.
    fn expect_line(&self, pattern: &str) -> &str {
        match self.lines().find(|l| l.contains(pattern)) {
            Some(l) => l,
            None => panic!(
                "no line containing {pattern:?} in the {} boot\n{}",
                self.name,
                self.describe()
            ),
        }
    }

    /// The init's `NIMBUS-LINUX <kind> ...` lines, without the prefix and kind.
    fn init_lines(&self, kind: &str) -> Vec<&str> {
        let prefix = format!("NIMBUS-LINUX {kind} ");
        self.lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }
}

/// `key=value` of a whitespace-separated line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// A raw image of `sectors` zero sectors with `text` at the start of each (sector, text).
fn make_image(path: &Path, sectors: u64, markers: &[(u64, &str)]) -> Vec<u8> {
    let data = image_bytes(sectors, markers);
    if let Err(e) = std::fs::write(path, &data) {
        panic!("cannot write {}: {e}", path.display());
    }
    data
}

fn image_bytes(sectors: u64, markers: &[(u64, &str)]) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(sectors * 512).expect("image size")];
    for (sector, text) in markers {
        let at = usize::try_from(sector * 512).expect("sector");
        data[at..at + text.len()].copy_from_slice(text.as_bytes());
    }
    data
}

/// Compares an image with what it should hold; names the differing sectors.
fn check_image(path: &Path, want: &[u8]) -> Result<(), String> {
    let got = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if got.len() != want.len() {
        return Err(format!(
            "{} is {} bytes, expected {}",
            path.display(),
            got.len(),
            want.len()
        ));
    }
    let bad: Vec<usize> = got
        .chunks(512)
        .zip(want.chunks(512))
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(i, _)| i)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let first = bad[0] * 512;
    let text = String::from_utf8_lossy(&got[first..first + 32]).into_owned();
    Err(format!(
        "{}: {} sector(s) differ from the expected content: {:?}{}; sector {} starts with {text:?}",
        path.display(),
        bad.len(),
        &bad[..bad.len().min(8)],
        if bad.len() > 8 { " ..." } else { "" },
        bad[0]
    ))
}

fn nimbus(guest: &LinuxGuest, cmdline: &str) -> Command {
    nimbus_with_memory(guest, cmdline, &format!("size={MEMORY_MIB}M"))
}

fn nimbus_with_memory(guest: &LinuxGuest, cmdline: &str, memory: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
    cmd.arg("--kernel")
        .arg(&guest.vmlinux)
        .arg("--initramfs")
        .arg(&guest.initramfs)
        .args(["--cmdline", &format!("{BASE_CMDLINE} {cmdline}")])
        .args(["--memory", memory])
        .args(["--serial", "tty", "--console", "off"]);
    cmd
}

// ---------------------------------------------------------------------------------------------
// The devices boot: two disks (one read-only), a NIC, the default rng
// ---------------------------------------------------------------------------------------------

struct DevicesBoot {
    boot: Boot,
    /// vda and vdb compared with their expected content after the run.
    vda_check: Result<(), String>,
    vdb_check: Result<(), String>,
    /// Frames the guest sent, captured on the TAP (all ethertypes), or why not.
    frames: Result<Vec<Vec<u8>>, String>,
    /// The Kata-style client's exchange with the init's agent port: the `OK` line and the
    /// answer, or why not.
    kata: Result<(String, String), String>,
    /// The line the guest's own vsock connection brought to the host listener, or why not.
    guest_vsock: Result<String, String>,
}

/// Kata's agent client: connects to the hybrid socket, writes `CONNECT <port>\n` and accepts
/// any line containing `OK`, retrying while the agent is not listening yet (the VMM closes the
/// connection without a line); then sends one line and reads the answer.
fn kata_agent_client(
    socket: &Path,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(String, String), String> {
    use std::io::Write;
    let mut last = String::from("never tried");
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        match e2e::vsock_connect(socket, "CONNECT", AGENT_PORT, Duration::from_secs(10)) {
            Ok((mut s, ok)) if ok.contains("OK") => {
                s.write_all(format!("{KATA_TEXT}\n").as_bytes())
                    .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(60)))
                    .map_err(|e| e.to_string())?;
                let answer = e2e::read_line(&mut s).map_err(|e| format!("answer: {e}"))?;
                return Ok((ok, answer.trim_end().to_string()));
            }
            Ok((_, line)) => last = format!("answer {line:?}"),
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "no agent connection before the deadline; last: {last}"
    ))
}

/// The host listener at `<socket>_<port>`: one connection, one line, one answer.
fn host_vsock_listener(listener: std::os::unix::net::UnixListener) -> Result<String, String> {
    use std::io::Write;
    let mut s = e2e::accept_n(&listener, 1, STEP_TIMEOUT)?.remove(0);
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let line = e2e::read_line(&mut s).map_err(|e| format!("line: {e}"))?;
    s.write_all(format!("{HOST_VSOCK_REPLY}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(line.trim_end().to_string())
}

fn devices_boot() -> &'static DevicesBoot {
    static BOOT: OnceLock<DevicesBoot> = OnceLock::new();
    BOOT.get_or_init(run_devices_boot)
}

fn run_devices_boot() -> DevicesBoot {
    let guest = linux_guest();
    let dir = ScratchDir::new("linux-devices");
    let (vda, vdb) = (dir.file("vda.img"), dir.file("vdb.img"));
    make_image(&vda, VDA_SECTORS, &[(HOST_SECTOR, VDA_HOST_MARKER)]);
    let vdb_want = make_image(&vdb, VDB_SECTORS, &[(HOST_SECTOR, VDB_HOST_MARKER)]);
    let words = format!(
        "ip={}::{}:255.255.255.0::eth0:off \
         nimbus.disk=read:{HOST_SECTOR} nimbus.disk=write:{GUEST_SECTOR}:{GUEST_MARKER} \
         nimbus.disk=vdb:read:{HOST_SECTOR} nimbus.disk=vdb:rowrite:{GUEST_SECTOR} \
         nimbus.net=udp:{}:{UDP_PORT}:{UDP_TEXT} \
         nimbus.vsock=listen:{AGENT_PORT} nimbus.vsock=connect:{HOST_VSOCK_PORT}:{GUEST_VSOCK_TEXT}",
        ip(GUEST_IP),
        ip(HOST_IP),
        ip(HOST_IP)
    );
    let socket = dir.file("vsock.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(dir.file(&format!("vsock.sock_{HOST_VSOCK_PORT}")))
            .expect("bind the host vsock listener");
    let mut cmd = nimbus(guest, &words);
    cmd.arg("--vsock")
        .arg(format!("cid={VSOCK_CID},socket={}", socket.display()));
    cmd.arg("--disk")
        .arg(format!("path={}", vda.display()))
        .arg(format!("path={},readonly=on,pci_segment=1", vdb.display()))
        .args(["--platform", "num_pci_segments=2"])
        .arg("--net")
        .arg(format!(
            "tap={TAP},ip={},mask=255.255.255.0,mac={}",
            ip(HOST_IP),
            format_mac(GUEST_MAC)
        ));
    let ns = NetNs::new("linux");
    let vm = spawn_vm_parallel(ns.wrap(cmd));
    let deadline = Instant::now() + 3 * STEP_TIMEOUT;
    let stop = Arc::new(AtomicBool::new(false));
    let kata = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || kata_agent_client(&socket, deadline, &stop))
    };
    let host = thread::spawn(move || host_vsock_listener(listener));
    // Nimbus creates the TAP at start-up.
    let (boot, frames) = follow_capturing("devices", vm, &ns, TAP);
    stop.store(true, Ordering::SeqCst);
    let kata = kata
        .join()
        .unwrap_or_else(|_| Err("the Kata client panicked".into()));
    let guest_vsock = host
        .join()
        .unwrap_or_else(|_| Err("the host listener panicked".into()));
    let vda_want = image_bytes(
        VDA_SECTORS,
        &[(HOST_SECTOR, VDA_HOST_MARKER), (GUEST_SECTOR, GUEST_MARKER)],
    );
    DevicesBoot {
        vda_check: check_image(&vda, &vda_want),
        vdb_check: check_image(&vdb, &vdb_want),
        boot,
        frames,
        kata,
        guest_vsock,
    }
}

/// Follows a boot to power-off ([`Boot::follow`]) while capturing every frame (ETH_P_ALL) the
/// guest sends on `tap` in `ns`; the frames, or why there are none.
fn follow_capturing(
    name: &'static str,
    vm: RunningVm,
    ns: &NetNs,
    tap: &str,
) -> (Boot, Result<Vec<Vec<u8>>, String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let capture = PacketSocket::open(ns, tap, 0x0003, Duration::from_secs(20)).map(|sock| {
        let stop = Arc::clone(&stop);
        thread::spawn(move || capture_guest_frames(&sock, &stop))
    });
    let boot = Boot::follow(
        name,
        vm,
        &[
            "Linux version",
            "Run /init",
            "NIMBUS-LINUX-INIT",
            "NIMBUS-LINUX power-off",
            "reboot: Power down",
        ],
    );
    stop.store(true, Ordering::SeqCst);
    let frames = capture.and_then(|t| {
        t.join()
            .map_err(|_| "the capture thread panicked".to_string())
    });
    (boot, frames)
}

/// Collects what the guest sends on the TAP until `stop`, keeping at most 256 frames.
fn capture_guest_frames(sock: &PacketSocket, stop: &AtomicBool) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if let Some(f) = sock.recv(Duration::from_millis(200)) {
            if frames.len() < 256 && f.get(6..12) == Some(&GUEST_MAC[..]) {
                frames.push(f);
            }
        }
    }
    frames
}

/// An ARP request from the guest (sender GUEST_MAC/GUEST_IP) for `target`.
fn is_guest_arp_request(f: &[u8], target: [u8; 4]) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x06]
        && f[14..22] == [0, 1, 0x08, 0x00, 6, 4, 0, 1]
        && f[22..28] == GUEST_MAC
        && f[28..32] == GUEST_IP
        && f[38..42] == target
}

/// The payload of a UDP/IPv4 frame from GUEST_IP to `dst`:`port`, if `f` is one.
fn guest_udp_payload(f: &[u8], dst: [u8; 4], port: u16) -> Option<&[u8]> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 || f[23] != 17 {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    if f[26..30] != GUEST_IP || f[30..34] != dst {
        return None;
    }
    let udp = f.get(14 + ihl..)?;
    if udp.len() < 8 || udp[2..4] != port.to_be_bytes() {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    udp.get(8..len)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// ACPI: the tables are found and parsed without an error or warning, the AML interpreter runs,
/// MCFG is used for ECAM, S5 is supported, and the init's power-off goes through ACPI S5 and
/// ends the VM with Nimbus exiting 0.
#[test]
fn acpi_power_off_exits_0() {
    if !require_kvm("acpi_power_off_exits_0") {
        return;
    }
    let d = devices_boot();
    let b = &d.boot;
    b.assert_clean();
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        b.expect_line(&format!("ACPI: {table} 0x"));
    }
    b.expect_line("ACPI: Using ACPI (MADT) for SMP configuration information");
    b.expect_line("IOAPIC[0]: apic_id");
    b.expect_line("PCI: MMCONFIG for domain 0000 [bus 00-ff] at [mem 0xe0000000-0xefffffff]");
    b.expect_line("PCI: MMCONFIG for domain 0001 [bus 00-00] at [mem 0xf0000000-0xf00fffff]");
    b.expect_line("ACPI: 1 ACPI AML tables successfully acquired and loaded");
    b.expect_line("ACPI: Interpreter enabled");
    let states = b.expect_line("ACPI: PM: (supports");
    assert!(states.contains("S5"), "no S5 in {states:?}");
    b.expect_line("ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])");
    b.expect_line("ACPI: PCI Root Bridge [PCI1] (domain 0001 [bus 00])");
    let bad: Vec<&str> = b
        .lines()
        .filter(|l| {
            [
                "ACPI Error",
                "ACPI BIOS Error",
                "ACPI Exception",
                "ACPI Warning",
                "ACPI BIOS Warning",
            ]
            .iter()
            .any(|p| l.contains(p))
                || (l.contains("MMCONFIG")
                    && ["not reserved", "not using", "no "]
                        .iter()
                        .any(|p| l.contains(p)))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "ACPI problems:\n{}\n{}",
        bad.join("\n"),
        b.describe()
    );
    // The CPU Nimbus describes is coherent: a model name, and an invariant TSC that the
    // firmware-side MSR agrees with (HWCR.TscFreqSel on AMD).
    // Without a brand string Linux prints "<vendor> <family>/<model>" (e.g. "AMD 1a/02").
    let cpu = b.expect_line("CPU: ");
    let model = cpu
        .split("CPU: ")
        .nth(1)
        .and_then(|m| m.split(" (family").next())
        .unwrap_or_default();
    assert!(
        !model.is_empty() && !model.contains('/'),
        "no model name: {cpu}"
    );
    let firmware: Vec<&str> = b.lines().filter(|l| l.contains("[Firmware Bug]")).collect();
    assert!(
        firmware.is_empty(),
        "firmware complaints:\n{}\n{}",
        firmware.join("\n"),
        b.describe()
    );
    // The init asked for the power-off; the kernel used ACPI S5; Nimbus exited 0 (assert_clean).
    let tail: Vec<&str> = b
        .lines()
        .skip_while(|l| !l.contains("NIMBUS-LINUX power-off"))
        .collect();
    assert!(
        tail.iter()
            .any(|l| l.contains("ACPI: PM: Preparing to enter system sleep state S5"))
            && tail
                .last()
                .is_some_and(|l| l.contains("reboot: Power down")),
        "power-off did not go through ACPI S5 as the last thing:\n{}",
        b.describe()
    );
}

/// PCI: the two host bridges (segments 0 and 1) and every configured device (two virtio-blk,
/// vdb on segment 1 as `0001:00:01.0`, one virtio-net, the default virtio-rng) are enumerated
/// with the expected IDs and nothing else; every BAR is assigned, naturally aligned and inside
/// its segment's 32-bit or (64-bit BARs) 64-bit window, which the kernel took from ACPI; every virtio device is bound and uses MSI-X (not MSI, not INTx),
/// and its interrupts arrive.
#[test]
fn pci_devices_bars_and_msix() {
    if !require_kvm("pci_devices_bars_and_msix") {
        return;
    }
    let b = &devices_boot().boot;
    b.assert_clean();
    // Two segments (the devices boot has vdb on segment 1): each root bus has its own share of
    // the 32-bit and 64-bit windows, from ACPI (`_CRS` of PCI0 and PCI1).
    let segments =
        arch::x86_64::layout::pci_segments(MEMORY_MIB << 20, &[(1, 1), (1, 1)]).expect("segments");
    let mut windows = Vec::new();
    for s in &segments {
        let bus = format!("{:04x}:00", s.segment);
        b.expect_line(&format!("PCI host bridge to bus {bus}"));
        for (start, size) in [s.mmio32, s.mmio64] {
            let end = start + size - 1;
            b.expect_line(&format!(
                "pci_bus {bus}: root bus resource [mem {start:#x}-{end:#x} window]"
            ));
            windows.push((s.segment, start, end));
        }
    }
    assert_eq!(
        (
            segments[0].mmio32.0,
            segments[1].mmio32.0 + segments[1].mmio32.1 - 1
        ),
        MMIO32
    );
    assert_eq!(segments[0].mmio64.0, MMIO64_START);
    let failures: Vec<&str> = b
        .lines()
        .filter(|l| {
            l.starts_with('[')
                && (l.contains("pci") || l.contains("PCI"))
                && ["can't", "failed", "no space", "not assigned", "conflict"]
                    .iter()
                    .any(|p| l.contains(p))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "PCI problems:\n{}\n{}",
        failures.join("\n"),
        b.describe()
    );

    let devices = b.init_lines("pci");
    let mut ids: Vec<String> = devices
        .iter()
        .map(|l| {
            format!(
                "{}:{}",
                field(l, "vendor").unwrap_or("?"),
                field(l, "device").unwrap_or("?")
            )
        })
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "1af4:1041",
            "1af4:1042",
            "1af4:1042",
            "1af4:1044",
            "1af4:1053",
            "8086:0d57",
            "8086:0d57"
        ],
        "PCI devices seen by Linux:\n{}\n{}",
        devices.join("\n"),
        b.describe()
    );
    // vdb on segment 1, at the address Nimbus gave it (`SSSS:00:DD.0` in /sys/bus/pci/devices).
    let seg1: Vec<&&str> = devices.iter().filter(|l| l.starts_with("0001:")).collect();
    assert!(
        seg1.len() == 2
            && seg1
                .iter()
                .any(|l| l.starts_with("0001:00:00.0 vendor=8086 device=0d57"))
            && seg1
                .iter()
                .any(|l| l.starts_with("0001:00:01.0 vendor=1af4 device=1042")),
        "segment 1 should hold its host bridge and vdb:\n{}\n{}",
        devices.join("\n"),
        b.describe()
    );
    let bars = b.init_lines("bar");
    let mut msix_total = 0;
    for dev in &devices {
        let bdf = dev.split_whitespace().next().unwrap_or_default();
        let class = field(dev, "class").unwrap_or_default();
        if class == "0x060000" {
            assert!(
                !bars.iter().any(|l| l.starts_with(bdf)),
                "the host bridge has BARs: {bars:?}"
            );
            continue;
        }
        assert_eq!(field(dev, "driver"), Some("virtio-pci"), "{dev}");
        let msix: u32 = field(dev, "msix").and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(
            msix >= 2 && field(dev, "msi") == Some("0"),
            "{bdf}: expected MSI-X vectors (config + queues) and no MSI: {dev}\n{}",
            b.describe()
        );
        msix_total += msix;
        let mine: Vec<&&str> = bars.iter().filter(|l| l.starts_with(bdf)).collect();
        assert!(!mine.is_empty(), "{bdf} has no assigned BAR: {dev}");
        for bar in mine {
            let (start, end, flags) = (
                field(bar, "start").and_then(hex).unwrap_or(0),
                field(bar, "end").and_then(hex).unwrap_or(0),
                field(bar, "flags").and_then(hex).unwrap_or(0),
            );
            let size = end.wrapping_sub(start).wrapping_add(1);
            assert!(
                flags & IORESOURCE_MEM != 0 && flags & IORESOURCE_IO == 0,
                "not a memory BAR: {bar}"
            );
            assert!(
                size.is_power_of_two() && start % size == 0,
                "BAR not naturally aligned: {bar}"
            );
            // Inside its own segment's windows (32-bit BARs in the 32-bit one).
            let segment = u16::from_str_radix(&bdf[..4], 16).unwrap_or(u16::MAX);
            let inside = windows.iter().any(|&(seg, lo, hi)| {
                seg == segment
                    && start >= lo
                    && end <= hi
                    && (flags & IORESOURCE_MEM_64 != 0 || hi <= MMIO32.1)
            });
            assert!(
                inside,
                "BAR outside segment {segment}'s windows {windows:x?}: {bar}"
            );
        }
    }
    // /proc/interrupts: one PCI-MSI line per MSI-X vector; the disks' and the NIC's queue
    // interrupts arrived (the guest did I/O and received the ARP reply and the ICMP error).
    let irqs = b.init_lines("irq");
    let msi_lines: Vec<&&str> = irqs.iter().filter(|l| l.contains("PCI-MSI")).collect();
    assert_eq!(
        msi_lines.len(),
        msix_total as usize,
        "MSI-X vectors in sysfs vs /proc/interrupts:\n{}",
        irqs.join("\n")
    );
    for queue in ["-req.0", "-input.0"] {
        let line = msi_lines
            .iter()
            .find(|l| l.contains(queue))
            .unwrap_or_else(|| panic!("no {queue} interrupt:\n{}", irqs.join("\n")));
        let count: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(count > 0, "no interrupt delivered on {line:?}");
    }
}

/// virtio-vsock with the hybrid backend (`--vsock cid=3,socket=...`): the init listens on vsock
/// port 1024 as Kata's agent does, and a host client speaking exactly as Kata's runtimes do
/// (`CONNECT 1024\n`, any line containing `OK`, retried until the agent listens) exchanges a
/// line with it; the init's own connection to host port 1025 reaches the listener at
/// `<socket>_1025` and gets its answer.
#[test]
fn vsock_kata_agent_port_and_guest_connection() {
    if !require_kvm("vsock_kata_agent_port_and_guest_connection") {
        return;
    }
    let d = devices_boot();
    let b = &d.boot;
    b.assert_clean();
    b.expect_line(&format!(
        "NIMBUS-LINUX vsock-listening port={AGENT_PORT} listen=0"
    ));
    let (ok, answer) = d
        .kata
        .as_ref()
        .unwrap_or_else(|e| panic!("Kata client: {e}\n{}", b.describe()));
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    assert_eq!(answer, &format!("NIMBUS-ECHO {KATA_TEXT}"));
    let accept = b.expect_line("NIMBUS-LINUX vsock-accept ");
    assert_eq!(field(accept, "text"), Some(KATA_TEXT), "{accept}");
    assert!(
        field(accept, "accept").is_some_and(|fd| !fd.starts_with('-')),
        "{accept}"
    );
    let got = d
        .guest_vsock
        .as_ref()
        .unwrap_or_else(|e| panic!("host listener: {e}\n{}", b.describe()));
    assert_eq!(got, GUEST_VSOCK_TEXT);
    let connect = b.expect_line("NIMBUS-LINUX vsock-connect ");
    assert_eq!(field(connect, "connect"), Some("0"), "{connect}");
    assert_eq!(field(connect, "text"), Some(HOST_VSOCK_REPLY), "{connect}");
    // The device took the driver's packets, which it drops unless they come from the
    // configured CID; the vsock function is bound to virtio-pci.
    assert!(
        b.grep("NIMBUS-LINUX pci ")
            .iter()
            .any(|l| l.contains("device=1053") && l.contains("driver=virtio-pci")),
        "{}",
        b.describe()
    );
}

/// virtio-blk: vda and vdb with the images' exact capacities; the guest reads the host's marker
/// from both and writes its own to vda, which the host finds in the file afterwards, with
/// nothing else changed.
#[test]
fn blk_reads_host_marker_and_writes_one_back() {
    if !require_kvm("blk_reads_host_marker_and_writes_one_back") {
        return;
    }
    let d = devices_boot();
    let b = &d.boot;
    b.assert_clean();
    for (disk, sectors) in [("vda", VDA_SECTORS), ("vdb", VDB_SECTORS)] {
        let line = b.expect_line(&format!("[{disk}] "));
        assert!(
            line.contains("virtio_blk virtio")
                && line.contains(&format!("[{disk}] {sectors} 512-byte logical blocks")),
            "{disk}: expected {sectors} sectors: {line:?}"
        );
        assert!(
            b.init_lines("block")
                .iter()
                .any(|l| l.starts_with(&format!("{disk} sectors={sectors} "))),
            "init's view of {disk}: {:?}",
            b.init_lines("block")
        );
    }
    let reads = b.init_lines("disk-read");
    for want in [
        format!("dev=vda sector={HOST_SECTOR} text={VDA_HOST_MARKER}"),
        format!("dev=vdb sector={HOST_SECTOR} text={VDB_HOST_MARKER}"),
    ] {
        assert!(
            reads.contains(&want.as_str()),
            "want {want:?}, got {reads:?}"
        );
    }
    assert_eq!(
        b.init_lines("disk-write"),
        [format!("dev=vda sector={GUEST_SECTOR} write=512 fsync=0")],
        "{}",
        b.describe()
    );
    if let Err(e) = &d.vda_check {
        panic!("vda after the run: {e}\n{}", b.describe());
    }
}

/// A read-only disk (`--disk ...,readonly=on`): the guest sees it read-only, its write fails
/// with an error, and the image is unchanged.
#[test]
fn blk_readonly_disk_refuses_guest_writes() {
    if !require_kvm("blk_readonly_disk_refuses_guest_writes") {
        return;
    }
    let d = devices_boot();
    let b = &d.boot;
    b.assert_clean();
    assert!(
        b.init_lines("block")
            .iter()
            .any(|l| l.starts_with("vdb ") && l.ends_with(" ro=1")),
        "vdb not read-only in the guest: {:?}",
        b.init_lines("block")
    );
    let rowrite = b.init_lines("disk-rowrite");
    let [line] = rowrite[..] else {
        panic!(
            "expected one disk-rowrite line: {rowrite:?}\n{}",
            b.describe()
        );
    };
    let failed = |k: &str| field(line, k).is_some_and(|v| v.starts_with('-'));
    assert!(
        line.starts_with("dev=vdb ") && (failed("open") || failed("write") || failed("fsync")),
        "the write to the read-only disk did not fail: {line:?}"
    );
    if let Err(e) = &d.vdb_check {
        panic!("read-only vdb changed: {e}\n{}", b.describe());
    }
}

/// virtio-net: kernel IP autoconfiguration brings eth0 up with the MAC from `--net mac=`; the
/// init's UDP datagram to the host makes the guest ARP for the host (captured on the TAP), the
/// host answers, the datagram follows (captured, payload intact) and the host's ICMP port
/// unreachable comes back to the guest's socket (ECONNREFUSED): both directions work.
#[test]
fn net_autoconfig_and_udp_round_trip() {
    if !require_kvm("net_autoconfig_and_udp_round_trip") {
        return;
    }
    let d = devices_boot();
    let b = &d.boot;
    b.assert_clean();
    b.expect_line("IP-Config: Complete:");
    b.expect_line(&format!(
        "device=eth0, hwaddr={}, ipaddr={}, mask=255.255.255.0, gw={}",
        format_mac(GUEST_MAC),
        ip(GUEST_IP),
        ip(HOST_IP)
    ));
    assert!(
        b.init_lines("net").contains(
            &format!(
                "eth0 mac={} operstate=up rx_queues=1 tx_queues=1",
                format_mac(GUEST_MAC)
            )
            .as_str()
        ),
        "eth0 in the guest: {:?}",
        b.init_lines("net")
    );
    assert_eq!(
        b.init_lines("net-udp"),
        [format!("send={} recv=-111", UDP_TEXT.len())],
        "the UDP round trip (expected ECONNREFUSED from the host's ICMP error)\n{}",
        b.describe()
    );
    let frames = d
        .frames
        .as_ref()
        .unwrap_or_else(|e| panic!("capture on {TAP}: {e}"));
    let summary = || {
        frames
            .iter()
            .map(|f| {
                let n = f.len().min(42);
                format!("{} bytes: {:02x?}", f.len(), &f[..n])
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        frames.iter().any(|f| is_guest_arp_request(f, HOST_IP)),
        "no ARP request for {} from the guest among {} frames:\n{}",
        ip(HOST_IP),
        frames.len(),
        summary()
    );
    assert!(
        frames
            .iter()
            .any(|f| guest_udp_payload(f, HOST_IP, UDP_PORT) == Some(UDP_TEXT.as_bytes())),
        "no UDP datagram {UDP_TEXT:?} to port {UDP_PORT} from the guest among {} frames:\n{}",
        frames.len(),
        summary()
    );
}

/// Linux with its disk and its NIC in the project's daemons, as Kata runs it: `vhost_user_block`
/// serves the disk and `vhost_user_net` (TAP inside a fresh namespace, two queue pairs) the NIC,
/// Nimbus only the device models, guest RAM shared. The kernel is uniprocessor, so its
/// virtio_net driver starts on one pair; the init asks for two (`ethtool -L eth0 combined 2`,
/// which the driver sends as VQ_PAIRS_SET(2) on the control queue Nimbus serves) before the UDP
/// round trip. The host's marker is read and the guest's lands in the image through the daemon,
/// eth0 offers two channels and runs two receive and two transmit queues after the change, with
/// no queue-pair failure in the kernel log, the UDP round trip crosses the daemon's TAP, and both
/// daemons exit 0 when Nimbus disconnects.
#[test]
fn split_process_disk_and_two_pair_nic() {
    if !require_kvm("split_process_disk_and_two_pair_nic") {
        return;
    }
    let guest = linux_guest();
    let dir = ScratchDir::new("linux-split");
    let vda = dir.file("vda.img");
    make_image(&vda, VDA_SECTORS, &[(HOST_SECTOR, VDA_HOST_MARKER)]);
    let (blk_sock, net_sock) = (dir.file("blk.sock"), dir.file("net.sock"));
    let blk = VhostUserBlockDaemon::start(
        &format!("path={},socket={}", vda.display(), blk_sock.display()),
        &blk_sock,
        &dir.file("blk.log"),
    );
    let tap = "nimbus-ls0";
    let ns = NetNs::new("linuxsplit");
    let mut net_cmd = Command::new(workspace_binary("vhost_user_net", "NIMBUS_VHOST_USER_NET"));
    net_cmd.args([
        "-v",
        "--net-backend",
        &format!(
            "ip={},mask=255.255.255.0,mac={},socket={},tap={tap},num_queues=4",
            ip(HOST_IP),
            format_mac(GUEST_MAC),
            net_sock.display()
        ),
    ]);
    let net_log = dir.file("net.log");
    let mut net = ns
        .wrap(net_cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&net_log).expect("net log"))
        .spawn()
        .expect("start vhost_user_net");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !net_sock.exists() {
        assert!(
            Instant::now() < deadline,
            "vhost_user_net created no socket"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let words = format!(
        "ip={}::{}:255.255.255.0::eth0:off \
         nimbus.disk=read:{HOST_SECTOR} nimbus.disk=write:{GUEST_SECTOR}:{GUEST_MARKER} \
         nimbus.net=channels:eth0:2 nimbus.net=udp:{}:{UDP_PORT}:{UDP_TEXT}",
        ip(GUEST_IP),
        ip(HOST_IP),
        ip(HOST_IP)
    );
    let mut cmd = nimbus_with_memory(guest, &words, &format!("size={MEMORY_MIB}M,shared=on"));
    cmd.arg("--disk")
        .arg(format!("vhost_user=on,socket={}", blk_sock.display()))
        .arg("--net")
        .arg(format!(
            "vhost_user=on,socket={},num_queues=4",
            net_sock.display()
        ));
    let vm = spawn_vm_parallel(cmd);
    let (b, frames) = follow_capturing("split-process", vm, &ns, tap);
    let blk_run = blk.finish(Duration::from_secs(10));
    let net_status = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match net.try_wait() {
                Ok(Some(s)) => break s.code(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = net.kill();
                    let _ = net.wait();
                    break None;
                }
            }
        }
    };
    let net_log = std::fs::read_to_string(&net_log).unwrap_or_default();
    b.assert_clean();
    assert!(
        b.init_lines("disk-read")
            .contains(&format!("dev=vda sector={HOST_SECTOR} text={VDA_HOST_MARKER}").as_str()),
        "the host's marker through vhost_user_block\n{}",
        b.describe()
    );
    let vda_want = image_bytes(
        VDA_SECTORS,
        &[(HOST_SECTOR, VDA_HOST_MARKER), (GUEST_SECTOR, GUEST_MARKER)],
    );
    if let Err(e) = check_image(&vda, &vda_want) {
        panic!("vda after the run: {e}\n{}", b.describe());
    }
    let eth0 = format!(
        "eth0 mac={} operstate=up rx_queues=1 tx_queues=1",
        format_mac(GUEST_MAC)
    );
    assert!(
        b.init_lines("net").contains(&eth0.as_str()),
        "eth0 before the change: want {eth0:?}, got {:?}\n{}",
        b.init_lines("net"),
        b.describe()
    );
    assert_eq!(
        b.init_lines("net-channels"),
        ["eth0 set=0 combined=2 max=2 rx_queues=2 tx_queues=2"],
        "two channels through Nimbus's control queue\n{}",
        b.describe()
    );
    assert!(
        b.grep("Fail to set num of queue pairs").is_empty(),
        "{}",
        b.describe()
    );
    assert_eq!(
        b.init_lines("net-udp"),
        [format!("send={} recv=-111", UDP_TEXT.len())],
        "the UDP round trip through vhost_user_net\n{}\ndaemon log:\n{net_log}",
        b.describe()
    );
    let frames = frames.unwrap_or_else(|e| panic!("capture on {tap}: {e}"));
    assert!(
        frames
            .iter()
            .any(|f| guest_udp_payload(f, HOST_IP, UDP_PORT) == Some(UDP_TEXT.as_bytes())),
        "no UDP datagram from the guest among {} frames on {tap}",
        frames.len()
    );
    blk_run.assert_clean_exit();
    assert_eq!(
        net_status,
        Some(0),
        "vhost_user_net's exit after Nimbus disconnected; log:\n{net_log}"
    );
}

/// Reboot through ACPI: the init marks its disk and reboots; Nimbus resets the VM in place, the
/// kernel boots a second time, the init sees the mark and powers off; Nimbus exits 0.
#[test]
fn acpi_reboot_restarts_once() {
    if !require_kvm("acpi_reboot_restarts_once") {
        return;
    }
    let guest = linux_guest();
    let dir = ScratchDir::new("linux-reboot");
    let img = dir.file("vda.img");
    make_image(&img, 2 * GUEST_SECTOR, &[]);
    let mut cmd = nimbus(
        guest,
        &format!("nimbus.reboot={GUEST_SECTOR} nimbus.dump=0"),
    );
    cmd.arg("--disk").arg(format!("path={}", img.display()));
    let b = Boot::follow(
        "reboot",
        spawn_vm_parallel(cmd),
        &[
            "Linux version",
            "NIMBUS-LINUX-INIT",
            "NIMBUS-LINUX reboot restarting",
            "reboot: Restarting system",
            "Linux version",
            "NIMBUS-LINUX-INIT",
            "NIMBUS-LINUX reboot second-boot",
            "reboot: Power down",
        ],
    );
    b.assert_clean();
    assert_eq!(b.grep("Linux version").len(), 2, "{}", b.describe());
    assert_eq!(b.grep("NIMBUS-LINUX-INIT").len(), 2, "{}", b.describe());
    let want = image_bytes(2 * GUEST_SECTOR, &[(GUEST_SECTOR, "NIMBUS-REBOOTED")]);
    if let Err(e) = check_image(&img, &want) {
        panic!("the reboot mark: {e}\n{}", b.describe());
    }
}

/// virtio-pmem and virtio-balloon in one boot, driven through the API: `/dev/pmem0` holds the
/// host file's marker, the guest's write (fsync: the device's FLUSH) lands in the file; the init
/// touches and frees memory, `vm.resize desired_balloon` raises the balloon, the driver takes the
/// pages (MemTotal falls) and the VMM's RSS falls with it; the driver's statistics reach
/// `vm.counters`.
#[test]
fn pmem_and_balloon() {
    if !require_kvm("pmem_and_balloon") {
        return;
    }
    const PMEM_HOST_MARKER: &str = "NIMBUS-HOST-MARKER-PMEM";
    const PMEM_GUEST_MARKER: &str = "NIMBUS-GUEST-PMEM";
    const TOUCH_MIB: u64 = 24;
    const BALLOON_MIB: u64 = 32;
    let guest = linux_guest();
    let api = e2e::api::ApiVmm::new("linux-memory");
    let pmem = api.dir.file("pmem.img");
    // 2 MiB: 4096 sectors; the host's marker at sector 0, the guest writes at sector 8.
    make_image(&pmem, 4096, &[(0, PMEM_HOST_MARKER)]);
    let mut cmd = nimbus(
        guest,
        &format!(
            "nimbus.dump=0 nimbus.disk=pmem0:read:0 nimbus.disk=pmem0:write:8:{PMEM_GUEST_MARKER} \
             nimbus.balloon={TOUCH_MIB}:{BALLOON_MIB}"
        ),
    );
    cmd.arg("--pmem")
        .arg(format!("file={}", pmem.display()))
        .args(["--balloon", "size=0", "--api-socket"])
        .arg(&api.socket);
    let vm = spawn_vm_parallel(cmd);
    let pid = vm.pid().expect("pid");
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let touched = vm.wait_for_line("NIMBUS-LINUX balloon-touched", STEP_TIMEOUT);
    let before = rss();
    let raised_at = Instant::now();
    let resize = e2e::api::call(
        &api.socket,
        "PUT",
        "vm.resize",
        Some(&format!(r#"{{"desired_balloon":{}}}"#, BALLOON_MIB << 20)),
    );
    let inflated = vm.wait_for_line("NIMBUS-LINUX balloon-inflated", STEP_TIMEOUT);
    let after = rss();
    let inflate_time = raised_at.elapsed();
    let counters = e2e::api::call(&api.socket, "GET", "vm.counters", None).json();
    let b = Boot::follow(
        "memory",
        vm,
        &["Linux version", "NIMBUS-LINUX-INIT", "reboot: Power down"],
    );
    b.assert_clean();
    touched.unwrap_or_else(|e| panic!("{e}\n{}", b.describe()));
    inflated.unwrap_or_else(|e| panic!("{e}\n{}", b.describe()));
    assert_eq!(resize.status, 204, "{}", resize.text());

    // pmem: the marker read through the guest's block device, the write in the file.
    assert!(
        b.init_lines("disk-read")
            .contains(&format!("dev=pmem0 sector=0 text={PMEM_HOST_MARKER}").as_str()),
        "{}",
        b.describe()
    );
    assert_eq!(
        b.init_lines("disk-write"),
        ["dev=pmem0 sector=8 write=512 fsync=0"],
        "{}",
        b.describe()
    );
    let want = image_bytes(4096, &[(0, PMEM_HOST_MARKER), (8, PMEM_GUEST_MARKER)]);
    if let Err(e) = check_image(&pmem, &want) {
        panic!("pmem file after the run: {e}\n{}", b.describe());
    }

    // balloon: the driver took the pages and the host dropped them.
    let inflated_pages = counters["__balloon"]["inflated_pages"]
        .as_u64()
        .unwrap_or(0);
    let fell = before.saturating_sub(after);
    eprintln!(
        "linux balloon: VmRSS {} -> {} MiB (fell {} MiB) after touching {TOUCH_MIB} MiB and \
         inflating {BALLOON_MIB} MiB in {:.1} s; {inflated_pages} pages inflated",
        before >> 20,
        after >> 20,
        fell >> 20,
        inflate_time.as_secs_f64()
    );
    assert_eq!(inflated_pages, BALLOON_MIB << 8, "{counters}");
    // The driver's statistics (its first buffer, sent at probe): MemTotal in bytes.
    let total = counters["__balloon"]["stat_total_memory"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        total > (MEMORY_MIB << 20) / 2 && total <= MEMORY_MIB << 20,
        "stat_total_memory {total}: {counters}"
    );
    assert!(
        fell >= (TOUCH_MIB << 20) / 3,
        "RSS fell by {fell} bytes only ({before} -> {after})\n{}",
        b.describe()
    );
}

/// Waits until `vm`'s guest has printed at least `n` lines containing `pattern`; returns the
/// `n`th.
fn wait_for_nth_line(
    vm: &RunningVm,
    pattern: &str,
    n: usize,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = vm.stdout_so_far();
        let complete = out.rfind('\n').map_or("", |end| &out[..end]);
        if let Some(line) = complete.lines().filter(|l| l.contains(pattern)).nth(n - 1) {
            return Ok(line.trim_end_matches('\r').to_string());
        }
        if let Some(fatal) = complete
            .lines()
            .find(|l| FATAL_STDOUT.iter().any(|f| l.contains(f)))
        {
            return Err(format!("{fatal}\n{}", vm.describe_so_far()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no line #{n} containing {pattern:?}\n{}",
                vm.describe_so_far()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the VMM of `pid` has released device `id` after the guest's ejection: gone
/// from `vm.info`'s device tree and configuration, and the process back to `before`'s
/// descriptors and threads.
fn wait_released(socket: &Path, pid: u32, id: &str, before: (usize, usize)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = e2e::api::call(socket, "GET", "vm.info", None).json();
        let in_config = ["disks", "net"].iter().any(|list| {
            info["config"][list]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["id"] == id))
        });
        if info["device_tree"].get(id).is_none() && !in_config && e2e::process_holds(pid) == before
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: the VMM still holds the device: {before:?} -> {:?}, {info}",
            e2e::process_holds(pid)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The hotplug boot's NIC: a TAP Nimbus creates in the test's namespace when the NIC is added.
const HOT_TAP: &str = "nimbus-hp0";
const HOT_HOST_IP: [u8; 4] = [192, 168, 248, 1];
const HOT_GUEST_IP: [u8; 4] = [192, 168, 248, 2];
const HOT_UDP_TEXT: &str = "NIMBUS-HOTPLUG-UDP";

/// ACPI PCI hotplug seen by Linux's own driver (acpiphp): a disk added through `vm.add-disk`
/// while the guest runs appears as a block device whose host marker the guest reads and to
/// which it writes; `vm.remove-device` makes the guest eject it, after which the VMM holds no
/// more descriptors or threads than before the add and the image is unlocked; the same id is
/// added again, in the same slot, and works. Then a NIC added with `vm.add-net` comes up in the
/// guest and carries a UDP round trip through the host's stack; removed, it goes from the
/// guest and its TAP from the host.
#[test]
fn pci_hotplug_disk_and_nic() {
    if !require_kvm("pci_hotplug_disk_and_nic") {
        return;
    }
    const CYCLES: usize = 2;
    const MARKER: &str = "NIMBUS-HOTPLUG-HOST-MARKER";
    let guest = linux_guest();
    let api = e2e::api::ApiVmm::new("linux-hotplug");
    let image = api.dir.file("hot.img");
    make_image(&image, 2048, &[(0, MARKER)]);
    let mut cmd = nimbus(
        guest,
        &format!(
            "nimbus.dump=0 nimbus.hotplug=vda:{CYCLES} nimbus.ifup=eth0:{} \
             nimbus.net=udp:{}:{UDP_PORT}:{HOT_UDP_TEXT} nimbus.ifgone=eth0 nimbus.sleep=10",
            ip(HOT_GUEST_IP),
            ip(HOT_HOST_IP)
        ),
    );
    cmd.arg("--api-socket").arg(&api.socket);
    let ns = NetNs::new("hotplug");
    let vm = spawn_vm_parallel(ns.wrap(cmd));
    let pid = vm.pid().expect("pid");
    let mut bdfs = Vec::new();
    let mut timings = Vec::new();
    let mut failure = None;
    let add_body = format!(r#"{{"path":"{}","id":"hotdisk"}}"#, image.display());
    let add_disk = || e2e::api::call(&api.socket, "PUT", "vm.add-disk", Some(&add_body));
    for cycle in 1..=CYCLES {
        let step = |what: &str| wait_for_nth_line(&vm, what, cycle, STEP_TIMEOUT);
        if let Err(e) = step("NIMBUS-LINUX hotplug-waiting") {
            failure = Some(e);
            break;
        }
        let before = e2e::process_holds(pid);
        let added_at = Instant::now();
        let add = add_disk();
        assert_eq!(add.status, 200, "vm.add-disk: {}", add.text());
        let info = add.json();
        assert_eq!(info["id"], "hotdisk", "{info}");
        let bdf = info["bdf"].as_str().unwrap_or_default().to_string();
        assert!(
            bdf.starts_with("0000:00:") && bdf.ends_with(".0"),
            "a segment 0, bus 0, function 0 address as Kata expects: {bdf}"
        );
        bdfs.push(bdf);
        if let Err(e) = step("NIMBUS-LINUX disk-write") {
            failure = Some(e);
            break;
        }
        let usable = added_at.elapsed();
        assert!(
            e2e::is_ofd_locked(&image),
            "the VMM locks the image it serves"
        );
        let dup = add_disk();
        assert_eq!(dup.status, 409, "a duplicate id: {}", dup.text());
        let removed_at = Instant::now();
        let remove = e2e::api::call(
            &api.socket,
            "PUT",
            "vm.remove-device",
            Some(r#"{"id":"hotdisk"}"#),
        );
        assert_eq!(remove.status, 204, "vm.remove-device: {}", remove.text());
        if let Err(e) = step("NIMBUS-LINUX hotplug-removed") {
            failure = Some(e);
            break;
        }
        let gone = removed_at.elapsed();
        wait_released(&api.socket, pid, "hotdisk", before);
        timings.push((usable, gone, removed_at.elapsed()));
        assert!(
            !e2e::is_ofd_locked(&image),
            "cycle {cycle}: the image is still locked"
        );
        let unknown = e2e::api::call(
            &api.socket,
            "PUT",
            "vm.remove-device",
            Some(r#"{"id":"hotdisk"}"#),
        );
        assert_eq!(unknown.status, 404, "{}", unknown.text());
        let written = std::fs::read(&image).expect("image");
        let text = format!("NIMBUS-HOTPLUG-{}", cycle - 1);
        assert_eq!(
            &written[512..512 + text.len()],
            text.as_bytes(),
            "cycle {cycle}: the guest's write is in the image"
        );
    }
    if failure.is_none() {
        let before = e2e::process_holds(pid);
        let add = e2e::api::call(
            &api.socket,
            "PUT",
            "vm.add-net",
            Some(&format!(
                r#"{{"id":"hotnet","tap":"{HOT_TAP}","ip":"{}","mask":"255.255.255.0"}}"#,
                ip(HOT_HOST_IP)
            )),
        );
        assert_eq!(add.status, 200, "vm.add-net: {}", add.text());
        failure = wait_for_nth_line(&vm, "NIMBUS-LINUX net-udp", 1, STEP_TIMEOUT).err();
        if failure.is_none() {
            assert!(
                ns.ip(&["link", "show", HOT_TAP]).is_ok(),
                "the TAP is there"
            );
            let remove = e2e::api::call(
                &api.socket,
                "PUT",
                "vm.remove-device",
                Some(r#"{"id":"hotnet"}"#),
            );
            assert_eq!(remove.status, 204, "{}", remove.text());
            failure = wait_for_nth_line(&vm, "NIMBUS-LINUX ifgone", 1, STEP_TIMEOUT).err();
        }
        if failure.is_none() {
            wait_released(&api.socket, pid, "hotnet", before);
            assert!(
                ns.ip(&["link", "show", HOT_TAP]).is_err(),
                "the TAP is closed once the NIC is released"
            );
        }
    }
    let b = Boot::follow("hotplug", vm, &["Linux version", "NIMBUS-LINUX-INIT"]);
    if let Some(e) = failure {
        panic!("{e}\n{}", b.describe());
    }
    b.assert_clean();
    let reads = b.init_lines("disk-read");
    assert_eq!(
        reads,
        vec![format!("dev=vda sector=0 text={MARKER}"); CYCLES],
        "{}",
        b.describe()
    );
    assert!(
        b.init_lines("hotplug-timeout").is_empty(),
        "{}",
        b.describe()
    );
    assert_eq!(bdfs[0], bdfs[1], "the slot is reused");
    assert_eq!(
        b.init_lines("ifup"),
        ["eth0 wait=0 addr=0 mask=0 up=0"],
        "{}",
        b.describe()
    );
    assert_eq!(
        b.init_lines("net-udp"),
        [format!("send={} recv=-111", HOT_UDP_TEXT.len())],
        "the UDP round trip through the hot-added NIC\n{}",
        b.describe()
    );
    assert_eq!(b.init_lines("ifgone"), ["eth0 gone=1"], "{}", b.describe());
    for (i, (usable, gone, released)) in timings.iter().enumerate() {
        eprintln!(
            "linux hotplug cycle {i}: vm.add-disk -> guest wrote to it {:.2} s; \
             vm.remove-device -> guest saw it go {:.2} s, VMM released it {:.2} s",
            usable.as_secs_f64(),
            gone.as_secs_f64(),
            released.as_secs_f64()
        );
    }
}

/// The same kernel and initramfs under QEMU (q35, PVH `-kernel`, virtio-blk-pci) as a
/// reference: it boots, reads the host's marker, powers off; the boot-to-milestone times are
/// printed next to Nimbus's.
#[test]
fn qemu_reference_boot() {
    if !require_kvm("qemu_reference_boot") {
        return;
    }
    let guest = linux_guest();
    let dir = ScratchDir::new("linux-qemu");
    let img = dir.file("vda.img");
    make_image(&img, VDA_SECTORS, &[(HOST_SECTOR, VDA_HOST_MARKER)]);
    let cmdline = format!("{BASE_CMDLINE} nimbus.disk=read:{HOST_SECTOR}");
    let mut cmd = qemu_q35_command(&guest.vmlinux, 1, MEMORY_MIB, &cmdline);
    cmd.arg("-nodefaults")
        .arg("-initrd")
        .arg(&guest.initramfs)
        .arg("-drive")
        .arg(format!("file={},if=none,id=vda,format=raw", img.display()))
        .args(["-device", "virtio-blk-pci,drive=vda,disable-legacy=on"]);
    let b = Boot::follow_with(
        "qemu",
        spawn_vm_parallel(cmd),
        &[
            "Linux version",
            "Run /init",
            "NIMBUS-LINUX-INIT",
            "NIMBUS-LINUX power-off",
            "reboot: Power down",
        ],
        &[],
    );
    b.assert_clean();
    b.expect_line(&format!("[vda] {VDA_SECTORS} 512-byte logical blocks"));
    assert_eq!(
        b.init_lines("disk-read"),
        [format!(
            "dev=vda sector={HOST_SECTOR} text={VDA_HOST_MARKER}"
        )],
        "{}",
        b.describe()
    );
    assert!(
        b.init_lines("pci")
            .iter()
            .any(|l| l.contains("vendor=1af4 device=1042") && !l.contains("msix=0")),
        "{:?}",
        b.init_lines("pci")
    );
}

/// The hotplug reference: the same kernel, init and disk cycles under QEMU's ACPI PCI hotplug
/// (its `pc` machine, whose root bus has it; q35's root complex has not), driven through QMP
/// (`blockdev-add` + `device_add`, `device_del`): Linux's acpiphp finds the disk, the guest reads
/// the host's marker and writes its own, and ejects it; the times from the add to the guest's
/// write and from the removal request to the guest's `hotplug-removed` are printed beside
/// Nimbus's (`pci_hotplug_disk_and_nic`).
#[test]
fn qemu_reference_pci_hotplug_disk() {
    if !require_kvm("qemu_reference_pci_hotplug_disk") {
        return;
    }
    const CYCLES: usize = 2;
    const MARKER: &str = "NIMBUS-HOTPLUG-QEMU-MARKER";
    let guest = linux_guest();
    let dir = ScratchDir::new("linux-qemu-hotplug");
    let image = dir.file("hot.img");
    make_image(&image, 2048, &[(0, MARKER)]);
    let qmp_path = dir.file("qmp.sock");
    let mut cmd = Command::new(e2e::qemu_binary());
    cmd.args([
        "-accel",
        "kvm",
        "-M",
        "pc",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", &MEMORY_MIB.to_string(), "-smp", "1", "-nodefaults"])
    .args([
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(&guest.vmlinux)
    .arg("-initrd")
    .arg(&guest.initramfs)
    .args([
        "-append",
        // The sleep keeps QEMU up for the last blockdev-del after the guest's last removal.
        &format!("{BASE_CMDLINE} nimbus.dump=0 nimbus.hotplug=vda:{CYCLES} nimbus.sleep=10"),
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let vm = spawn_vm_parallel(cmd);
    let mut qmp = e2e::Qmp::connect(&qmp_path, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    let mut timings = Vec::new();
    let mut failure = None;
    for cycle in 1..=CYCLES {
        let step = |what: &str| wait_for_nth_line(&vm, what, cycle, 2 * STEP_TIMEOUT);
        if let Err(e) = step("NIMBUS-LINUX hotplug-waiting") {
            failure = Some(e);
            break;
        }
        let node = format!("hot{cycle}");
        let added_at = Instant::now();
        qmp.execute(
            "blockdev-add",
            serde_json::json!({"driver": "raw", "node-name": node,
                "file": {"driver": "file", "filename": image}}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        qmp.execute(
            "device_add",
            serde_json::json!({"driver": "virtio-blk-pci", "drive": node, "id": "hotdisk"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = step("NIMBUS-LINUX disk-write") {
            failure = Some(e);
            break;
        }
        let usable = added_at.elapsed();
        let removed_at = Instant::now();
        qmp.execute("device_del", serde_json::json!({"id": "hotdisk"}))
            .unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = step("NIMBUS-LINUX hotplug-removed") {
            failure = Some(e);
            break;
        }
        let removed = removed_at.elapsed();
        // The node goes once QEMU has finalized the device (after the guest's ejection).
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = qmp.execute("blockdev-del", serde_json::json!({"node-name": node})) {
            assert!(Instant::now() < deadline, "{e}");
            thread::sleep(Duration::from_millis(50));
        }
        timings.push((usable, removed));
    }
    drop(qmp);
    let b = Boot::follow("qemu-hotplug", vm, &["Linux version", "NIMBUS-LINUX-INIT"]);
    if let Some(e) = failure {
        panic!("{e}\n{}", b.describe());
    }
    b.assert_clean();
    assert_eq!(
        b.init_lines("disk-read"),
        vec![format!("dev=vda sector=0 text={MARKER}"); CYCLES],
        "{}",
        b.describe()
    );
    for (i, (usable, removed)) in timings.iter().enumerate() {
        eprintln!(
            "qemu hotplug cycle {i}: device_add -> guest wrote to it {:.2} s; \
             device_del -> guest saw it go {:.2} s",
            usable.as_secs_f64(),
            removed.as_secs_f64()
        );
    }
}

/// ACPI memory hotplug seen by Linux's own driver (acpi_memhotplug, memory onlined as it comes):
/// the VM boots with 64 MiB and `hotplug_method=acpi`; `vm.resize desired_ram` adds 128 MiB;
/// MemTotal grows by it and MemFree by most of it (the pages reached the page allocator), the
/// init then writes every page of 16 MiB of fresh memory (user page faults are slow on PVM
/// hosts: ~1 s per MiB), and powers off.
#[test]
fn acpi_memory_hotplug() {
    if !require_kvm("acpi_memory_hotplug") {
        return;
    }
    const BOOT_MIB: u64 = 64;
    const ADD_MIB: u64 = 128;
    const TOUCH_MIB: u64 = 16;
    let guest = linux_guest();
    let api = e2e::api::ApiVmm::new("linux-memhp");
    let mut cmd = nimbus_with_memory(
        guest,
        &format!("nimbus.dump=0 nimbus.memhp={ADD_MIB}:{TOUCH_MIB}"),
        &format!("size={BOOT_MIB}M,hotplug_method=acpi,hotplug_size={ADD_MIB}M"),
    );
    cmd.arg("--api-socket").arg(&api.socket);
    let vm = spawn_vm_parallel(cmd);
    let waiting = vm.wait_for_line("NIMBUS-LINUX memhp-waiting", STEP_TIMEOUT);
    let resized_at = Instant::now();
    let resize = e2e::api::call(
        &api.socket,
        "PUT",
        "vm.resize",
        Some(&format!(
            r#"{{"desired_ram":{}}}"#,
            (BOOT_MIB + ADD_MIB) << 20
        )),
    );
    let added = vm.wait_for_line("NIMBUS-LINUX memhp-added", STEP_TIMEOUT);
    let usable = resized_at.elapsed();
    let info = e2e::api::call(&api.socket, "GET", "vm.info", None).json();
    let b = Boot::follow(
        "memory-hotplug",
        vm,
        &["Linux version", "NIMBUS-LINUX-INIT", "reboot: Power down"],
    );
    waiting.unwrap_or_else(|e| panic!("{e}\n{}", b.describe()));
    assert_eq!(resize.status, 204, "vm.resize: {}", resize.text());
    let added = added.unwrap_or_else(|e| panic!("{e}\n{}", b.describe()));
    b.assert_clean();
    let grew: u64 = field(&added, "grew_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        grew >= ADD_MIB << 10,
        "MemTotal grew by {grew} kB\n{}",
        b.describe()
    );
    let free_grew: u64 = field(&added, "free_grew_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        free_grew >= (ADD_MIB << 10) * 3 / 4,
        "MemFree grew by {free_grew} kB only\n{}",
        b.describe()
    );
    assert_eq!(
        b.init_lines("memhp-touched"),
        [format!("mib={TOUCH_MIB}")],
        "{}",
        b.describe()
    );
    eprintln!(
        "linux memory hotplug: vm.resize +{ADD_MIB} MiB -> MemTotal grew {grew} kB (MemFree \
         {free_grew} kB) in {:.2} s; vm.info memory: {}",
        usable.as_secs_f64(),
        info["config"]["memory"]
    );
}
