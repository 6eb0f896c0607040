//! Consoles on a pseudo-terminal and on a Unix socket, and the debug console, with the test
//! guest: the serial port on a PTY whose path the test reads from `vm.info` over the API (as
//! libvirt does), the virtio console on a socket a client attaches to late, detaches from and
//! re-attaches to, and the debug console (port 0xe9) in a file. The guest resets once first
//! (the consoles stay, their input goes to the new machine), then reads a line on each console
//! (docs/test-guest.md, `serial.input` and `console.input`) and checks it.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{
    guest_elf, require_kvm, spawn_vm, stage1_cmdline, virtio_checks, GuestReport, ScratchDir,
    Stage2Keys, STAGE1_CHECKS, VIRTIO_CONSOLE_CHECKS,
};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(60);

/// What a reader thread has read from a terminal or socket so far.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u8>>>);

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Reads `from` into this buffer until it ends or fails, in a thread.
    fn collect(&self, mut from: impl Read + Send + 'static) {
        let seen = self.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
    }

    fn wait_for(&self, text: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{what}: no '{text}' within {WAIT:?}; so far:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Seen {
    /// Waits for the whole final line, `TESTS DONE pass=N fail=M`.
    fn wait_for_done(&self) {
        self.wait_for("TESTS DONE", "serial PTY");
        let deadline = Instant::now() + WAIT;
        while !self
            .text()
            .split("TESTS DONE")
            .nth(1)
            .is_some_and(|rest| rest.contains('\n'))
        {
            assert!(Instant::now() < deadline, "{}", self.text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits for the guest's last line and the VMM's clean exit; the serial output.
fn finish(vm: e2e::RunningVm, serial: &Seen) -> String {
    serial.wait_for_done();
    let run = vm.finish(WAIT);
    let output = serial.text();
    assert!(
        run.success(),
        "{}\n----- PTY -----\n{output}",
        run.describe()
    );
    output
}

/// The stage-1 checks, the virtio console's (its input too) and `more`.
fn console_checks(more: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = STAGE1_CHECKS.iter().map(|s| s.to_string()).collect();
    names.extend(virtio_checks("console", 0, VIRTIO_CONSOLE_CHECKS));
    names.extend(virtio_checks("console", 0, &["input"]));
    names.extend(more.iter().map(|s| s.to_string()));
    names
}

/// `vm.info` as libvirt asks for it, once the API answers.
fn vm_info(api: &Path) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if e2e::api::connect(api, Duration::from_millis(200)).is_ok() {
            let answer = e2e::api::call(api, "GET", "vm.info", None);
            if answer.status == 200 {
                return answer.json();
            }
        }
        assert!(Instant::now() < deadline, "vm.info never answered 200");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    stream
}

/// Reads `stream` until `text` arrived.
fn read_until(stream: &mut UnixStream, text: &str) -> String {
    let mut got = Vec::new();
    if let Err(e) = e2e::read_until(stream, &mut got, text, WAIT) {
        panic!("console socket: {e}");
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn pty_serial_socket_console_and_debug_console_carry_output_and_input() {
    if !require_kvm("pty_serial_socket_console_and_debug_console_carry_output_and_input") {
        return;
    }
    let dir = ScratchDir::new("consoles");
    let api = dir.file("api.sock");
    let console_sock = dir.file("console.sock");
    let debug_file = dir.file("debug.txt");
    let keys = Stage2Keys {
        virtio: Some(vec![("rng", 1), ("console", 1)]),
        console_message: Some("early-console-output".into()),
        ..Default::default()
    };
    let cmdline = format!(
        "{} {} serial.input=typed-on-the-pty console.input=typed-on-the-socket \
         debugcon=to-port-0xe9 reboot.count=1",
        stage1_cmdline(1, 128 << 20),
        keys.to_cmdline()
    );
    let mut cmd = Command::new(NIMBUS);
    cmd.arg("--kernel")
        .arg(guest_elf())
        .args(["--memory", "size=128M", "--cmdline", &cmdline])
        .args(["--serial", "pty"])
        .arg("--console")
        .arg(format!("socket={}", console_sock.display()))
        .arg("--debug-console")
        .arg(format!("file={}", debug_file.display()))
        .arg("--api-socket")
        .arg(&api)
        .arg("-v");
    let vm = spawn_vm(cmd);

    // libvirt's way to the serial port: config.serial.file in vm.info.
    let info = vm_info(&api);
    let config = &info["config"];
    assert_eq!(config["serial"]["mode"], "Pty", "{info}");
    let pty = PathBuf::from(config["serial"]["file"].as_str().unwrap_or_else(|| {
        panic!("vm.info has no config.serial.file: {info}");
    }));
    assert!(pty.starts_with("/dev/pts/"), "{}", pty.display());
    assert_eq!(config["console"]["mode"], "Socket", "{info}");
    assert_eq!(
        config["console"]["socket"].as_str(),
        console_sock.to_str(),
        "{info}"
    );
    let (mut terminal, serial) = open_pty(&pty);
    // The guest resets once first: the PTY stays, and its input reaches the new machine.
    serial.wait_for("INFO boot.count=1", "serial PTY");
    serial.wait_for("INFO serial.input.ready", "serial PTY");
    assert_eq!(
        vm_info(&api)["config"]["serial"]["file"].as_str(),
        pty.to_str(),
        "the PTY outlives the guest's reset"
    );
    terminal.write_all(b"typed-on-the-pty\r").expect("type");
    serial.wait_for("TEST serial.input", "serial PTY");

    // The console's client attaches after the guest wrote to it: the output was kept.
    serial.wait_for("TEST virtio.console0.write", "serial PTY");
    let mut first = connect(&console_sock);
    read_until(&mut first, "early-console-output\n");
    drop(first);
    // Detached; a new client attaches and types.
    serial.wait_for("INFO virtio.console0.input.ready", "serial PTY");
    let mut second = connect(&console_sock);
    second.write_all(b"typed-on-the-socket\n").expect("type");
    let output = finish(vm, &serial);
    // The report of the boot after the reset.
    let last_boot = output
        .rfind("NIMBUS-TEST-GUEST")
        .map_or(output.as_str(), |at| &output[at..]);
    assert!(output.contains("INFO boot.count=0"), "{output}");
    let report = GuestReport::parse(last_boot);
    let names = console_checks(&["serial.input", "debugcon.write"]);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    assert!(
        output.contains("INFO serial.echo \"typed-on-the-pty\""),
        "{output}"
    );
    let debug = std::fs::read_to_string(&debug_file).expect("debug console file");
    assert_eq!(debug, "to-port-0xe9\n");
    assert!(
        !console_sock.exists(),
        "the console socket is removed at exit"
    );
}

/// Opens a PTY as libvirt does (read and write, not as a controlling terminal) and collects
/// what arrives on it.
fn open_pty(path: &Path) -> (std::fs::File, Seen) {
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let seen = Seen::default();
    seen.collect(terminal.try_clone().expect("dup"));
    (terminal, seen)
}

/// libvirt's sequence: `vm.create` with the serial port and the console on PTYs, `vm.boot`,
/// `vm.info` for both paths; the guest's report comes on the serial PTY, its console message
/// on the console PTY, and what is typed there reaches the guest.
#[test]
fn pty_serial_and_console_through_the_api_as_libvirt_drives_them() {
    if !require_kvm("pty_serial_and_console_through_the_api_as_libvirt_drives_them") {
        return;
    }
    let vmm = e2e::api::ApiVmm::new("consoles-api");
    let vm = spawn_vm(vmm.command(NIMBUS, &["-v"]));
    vmm.wait_ready();
    let keys = Stage2Keys {
        virtio: Some(vec![("rng", 1), ("console", 1)]),
        console_message: Some("on-the-console-pty".into()),
        ..Default::default()
    };
    let cmdline = format!(
        "{} {} console.input=typed-on-the-console",
        stage1_cmdline(1, 128 << 20),
        keys.to_cmdline()
    );
    let body = e2e::api::guest_vm_body(
        1,
        128,
        &cmdline,
        r#""serial": {"mode": "Pty"}, "console": {"mode": "Pty"}"#,
    );
    let created = e2e::api::call(&vmm.socket, "PUT", "vm.create", Some(&body));
    assert_eq!(created.status, 204, "{}", created.text());
    let booted = e2e::api::call(&vmm.socket, "PUT", "vm.boot", None);
    assert_eq!(booted.status, 204, "{}", booted.text());
    let info = vm_info(&vmm.socket);
    let path = |which: &str| {
        let file = info["config"][which]["file"].as_str();
        let file = file.unwrap_or_else(|| panic!("no config.{which}.file in {info}"));
        assert!(file.starts_with("/dev/pts/"), "{which}: {file}");
        PathBuf::from(file)
    };
    let (serial_pty, console_pty) = (path("serial"), path("console"));
    assert_ne!(serial_pty, console_pty);
    let (_serial_terminal, serial) = open_pty(&serial_pty);
    let (mut console_terminal, console) = open_pty(&console_pty);
    console.wait_for("on-the-console-pty\n", "console PTY");
    serial.wait_for("INFO virtio.console0.input.ready", "serial PTY");
    console_terminal
        .write_all(b"typed-on-the-console\r")
        .expect("type");
    let output = finish(vm, &serial);
    let names = console_checks(&[]);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    GuestReport::parse(&output).assert_passed(&names);
}
