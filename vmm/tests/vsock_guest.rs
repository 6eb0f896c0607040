//! virtio-vsock with the hybrid Unix-socket backend, driven at CPL3 by the test guest: host
//! clients connect to a guest port with `CONNECT` (as Kata's runtimes do), the guest connects
//! to a host listener at `<socket>_<port>`, several streams at once move a megabyte each way
//! compared byte for byte, one host reader stalls and resumes, a port nobody listens on is
//! refused, and a guest reboot with streams open closes them; the second boot does it all
//! again and shuts its streams down cleanly.
//!
//! Needs /dev/kvm; without it the test prints a loud SKIPPED line.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use e2e::{
    accept_n, expect_closed, nimbus_test_guest, require_kvm, spawn_vm, stage1_cmdline,
    virtio_checks, vsock_connect, vsock_exchange, GuestReport, RunningVm, ScratchDir,
    STAGE1_CHECKS,
};

const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 1234;
const STREAMS: usize = 3;
const BYTES: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

/// One boot's streams: returns them open, after their data.
fn round(
    vm: &RunningVm,
    socket: &Path,
    listener: &UnixListener,
    boot: u32,
) -> Vec<std::os::unix::net::UnixStream> {
    vm.wait_for_line(&format!("INFO virtio.vsock0.ready boot={boot}"), WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Kata Go's spelling, then Kata Rust's.
    let mut host_initiated = Vec::new();
    for i in 0..STREAMS {
        let keyword = if i == 0 { "CONNECT" } else { "connect" };
        let (s, line) = vsock_connect(socket, keyword, GUEST_PORT, WAIT)
            .unwrap_or_else(|e| panic!("{keyword} {GUEST_PORT}: {e}\n{}", vm.describe_so_far()));
        let port: u32 = line
            .strip_prefix("OK ")
            .and_then(|p| p.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("answer {line:?}"));
        assert!(port >= 1 << 30, "host port {port} below 2^30");
        host_initiated.push(s);
    }
    // A port nobody listens on: closed without an answer.
    if boot == 0 {
        let refused = vsock_connect(socket, "CONNECT", 7, WAIT);
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("closed")),
            "port 7: {:?}",
            refused.map(|(_, l)| l)
        );
    }
    let guest_initiated = accept_n(listener, STREAMS, WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.describe_so_far()));
    let threads: Vec<_> = guest_initiated
        .into_iter()
        .chain(host_initiated)
        .enumerate()
        .map(|(i, s)| {
            // The first stream's reader stalls: the guest must wait for credit, and lose nothing.
            let stall = Duration::from_millis(if i == 0 { 1500 } else { 0 });
            std::thread::spawn(move || vsock_exchange(s, BYTES, stall))
        })
        .collect();
    threads
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.join()
                .expect("exchange thread")
                .unwrap_or_else(|e| panic!("stream {i}: {e}\n{}", vm.describe_so_far()))
        })
        .collect()
}

#[test]
fn vsock_streams_both_ways_with_flow_control_refusal_and_reboot() {
    if !require_kvm("vsock_streams_both_ways_with_flow_control_refusal_and_reboot") {
        return;
    }
    let dir = ScratchDir::new("vsock");
    let socket = dir.file("v.sock");
    let listener = UnixListener::bind(dir.file(&format!("v.sock_{HOST_PORT}"))).expect("bind");
    let cmdline = format!(
        "{} expect.virtio=rng:1,vsock:1 vsock.cid=3 vsock.listen={GUEST_PORT} vsock.accept={STREAMS} \
         vsock.connect={HOST_PORT} vsock.connections={STREAMS} vsock.bytes={BYTES} vsock.reboot=1",
        stage1_cmdline(1, 256 << 20)
    );
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), "size=256M", &cmdline);
    cmd.args([
        "--vsock",
        &format!("cid=3,socket={}", socket.display()),
        "--seccomp",
        "false",
    ]);
    let vm = spawn_vm(cmd);

    // First boot: the streams stay open, the guest resets the machine; the reset closes them.
    let mut open = round(&vm, &socket, &listener, 0);
    for (i, s) in open.iter_mut().enumerate() {
        expect_closed(s, WAIT).unwrap_or_else(|e| panic!("stream {i} after the reboot: {e}"));
    }
    // Second boot: the same socket serves the new instance; streams end with a clean shutdown.
    let mut open = round(&vm, &socket, &listener, 1);
    for (i, s) in open.iter_mut().enumerate() {
        expect_closed(s, WAIT).unwrap_or_else(|e| panic!("stream {i} after the shutdown: {e}"));
    }
    let run = vm.finish(WAIT);
    run.assert_success();
    assert!(!socket.exists(), "the vsock socket is left behind");

    // Each boot reports on its own (the first has no TESTS DONE: it reset).
    let output = run.report().raw;
    let second = output
        .rfind("NIMBUS-TEST-GUEST")
        .expect("a second boot banner");
    let first = GuestReport::parse(&output[..second]);
    let vsock = virtio_checks("vsock", 0, &["init", "cid", "connect", "accept", "data"]);
    for name in &vsock {
        assert!(
            matches!(first.test(name), Some((true, _))),
            "first boot: {name}: {:?}\n{output}",
            first.test(name)
        );
    }
    assert!(first.tests.iter().all(|t| t.1), "first boot: {output}");
    let report = GuestReport::parse(&output[second..]);
    let mut names: Vec<&str> = STAGE1_CHECKS.to_vec();
    names.extend(vsock.iter().map(String::as_str));
    names.push("virtio.vsock0.close");
    report.assert_passed(&names);
    // The stalled reader made the guest wait for credit, in both boots.
    for r in [&first, &report] {
        let data = r.detail("virtio.vsock0.data").unwrap_or_default();
        let stalls: u32 = data
            .split(" credit stall")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(stalls > 0, "no credit stall with a stalled reader: {data}");
    }
    assert!(
        first
            .detail("virtio.vsock0.accept")
            .is_some_and(|d| d.contains("1 request(s) refused")),
        "{output}"
    );
}
