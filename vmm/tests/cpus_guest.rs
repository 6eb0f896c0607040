//! `--cpus topology=,affinity=` with the test guest: the topology is what the guest reads in
//! CPUID (leaves 1, 4, 0xB, 0x1F, at CPL0 where the VMM's table answers) and in the MADT's APIC
//! IDs (`cpu.topology`, docs/test-guest.md), its APs start (`smp`), and each pinned `vcpuN`
//! thread's `Cpus_allowed_list` is its host CPUs. The serial port is a socket this test
//! attaches to: the guest waits there for a line (`serial.input`) while the test reads the
//! threads' affinity in /proc.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{
    guest_elf, require_kvm, spawn_vm, stage1_cmdline, GuestReport, ScratchDir, STAGE1_CHECKS,
};

const NIMBUS: &str = env!("CARGO_BIN_EXE_nimbus");
const WAIT: Duration = Duration::from_secs(60);

/// The host CPUs this process may use, as /proc writes them, and the first and last of them.
fn host_cpus() -> (String, usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let list = allowed_list(&status);
    let numbers: Vec<usize> = list
        .split(',')
        .flat_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
            a..=b
        })
        .collect();
    let first = numbers.first().copied().unwrap_or(0);
    let last = numbers.last().copied().unwrap_or(0);
    (list, first, last)
}

fn allowed_list(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// `Cpus_allowed_list` of each thread of `pid` called `vcpuN`, by N.
fn vcpu_affinities(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(n) = comm
            .trim()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        out.push((n, allowed_list(&status)));
    }
    out.sort();
    out
}

fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "{}: {e}", socket.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn read_until(stream: &mut UnixStream, got: &mut Vec<u8>, text: &str) {
    if let Err(e) = e2e::read_until(stream, got, text, WAIT) {
        panic!("serial socket: {e}");
    }
}

#[test]
fn topology_reaches_cpuid_and_the_madt_and_vcpu_threads_are_pinned() {
    if !require_kvm("topology_reaches_cpuid_and_the_madt_and_vcpu_threads_are_pinned") {
        return;
    }
    let (all, first, last) = host_cpus();
    let dir = ScratchDir::new("cpus");
    let serial = dir.file("serial.sock");
    // 1 thread, 3 cores (two APIC ID bits), 1 die, 2 packages: APIC IDs 0, 1, 2, 4, 5, 6.
    let cpus =
        format!("boot=6,topology=1:3:1:2,affinity=[0@[{last}],1@[{first}],2@[{first}-{last}]]");
    let cmdline = format!(
        "{} expect.topology=1:3:1:2 serial.input=go",
        stage1_cmdline(6, 128 << 20)
    );
    let mut cmd = Command::new(NIMBUS);
    cmd.arg("--kernel")
        .arg(guest_elf())
        .args([
            "--memory",
            "size=128M",
            "--cpus",
            &cpus,
            "--cmdline",
            &cmdline,
        ])
        .arg("--serial")
        .arg(format!("socket={}", serial.display()))
        .args(["--console", "off", "-v"]);
    let vm = spawn_vm(cmd);
    let mut stream = connect(&serial);
    let mut got = Vec::new();
    read_until(&mut stream, &mut got, "INFO serial.input.ready");

    let pid = vm.pid().expect("pid");
    let affinities = vcpu_affinities(pid);
    let expected: Vec<(u32, String)> = (0..6)
        .map(|n| {
            let list = match n {
                0 => last.to_string(),
                1 => first.to_string(),
                2 if first == last => first.to_string(),
                2 => format!("{first}-{last}"),
                _ => all.clone(),
            };
            (n, list)
        })
        .collect();
    assert_eq!(affinities, expected, "vcpuN threads' Cpus_allowed_list");

    stream.write_all(b"go\r").expect("serial input");
    read_until(&mut stream, &mut got, "TESTS DONE");
    let run = vm.finish(WAIT);
    // The rest of the output, up to the socket's end when the VMM exited.
    let mut rest = Vec::new();
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = stream.read_to_end(&mut rest);
    got.extend_from_slice(&rest);
    let output = String::from_utf8_lossy(&got).into_owned();
    assert!(
        run.success(),
        "{}\n----- serial -----\n{output}",
        run.describe()
    );
    let report = GuestReport::parse(&output);
    let mut names: Vec<&str> = STAGE1_CHECKS.to_vec();
    names.extend(["cpu.topology", "serial.input"]);
    report.assert_passed(&names);
    assert!(
        output.contains("apic_id=4 ") && output.contains("apic_id=6 "),
        "the MADT lists the topology's APIC IDs:\n{output}"
    );
}
