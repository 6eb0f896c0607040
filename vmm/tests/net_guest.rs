//! virtio-net under Nimbus, end to end: Nimbus creates the TAP (inside a private network
//! namespace), the guest's frames are captured on the TAP byte for byte, and frames injected
//! into the TAP reach the guest intact; the guest's MAC comes from `--net mac=`.
//!
//! Needs /dev/kvm and root (network namespaces, TAP creation); without /dev/kvm each test prints
//! a loud SKIPPED line.

use std::process::Command;
use std::time::Duration;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use e2e::{
    boot_net, check_net_mq_report, exchange_test_frames, format_mac, nimbus_test_guest,
    require_kvm, spawn_vm, stage1_cmdline, virtio_checks, NetExchange, NetNs, Nic,
    VIRTIO_NET_CHECKS,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Nimbus's default device besides the NICs (`--console off`).
const RNG: &[(&str, u32)] = &[("rng", 1)];

fn nimbus_with(nics: &[Nic], ips: &[&str], cmdline: &str) -> Command {
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), "size=256M", cmdline);
    cmd.arg("--net");
    for (nic, ip) in nics.iter().zip(ips) {
        cmd.arg(format!(
            "tap={},mac={},ip={ip},mask=255.255.255.0",
            nic.tap,
            format_mac(nic.mac)
        ));
    }
    cmd
}

#[test]
fn frames_cross_the_tap_both_ways() {
    if !require_kvm("frames_cross_the_tap_both_ways") {
        return;
    }
    let nics = [Nic {
        tap: "nimbus-nt0",
        mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01],
        rx_count: 4,
        tx_count: 8,
    }];
    let (run, report) = boot_net(
        "frames_cross_the_tap_both_ways",
        &nics,
        RNG,
        "",
        TIMEOUT,
        |cmdline| nimbus_with(&nics, &["192.168.249.1"], cmdline),
    );
    assert!(
        report
            .detail("virtio.net0.rx")
            .is_some_and(|d| d.contains("mrg_rxbuf=yes")),
        "{}",
        run.describe()
    );
}

#[test]
fn two_nics_with_and_without_mergeable_buffers() {
    if !require_kvm("two_nics_with_and_without_mergeable_buffers") {
        return;
    }
    let nics = [
        Nic {
            tap: "nimbus-nt0",
            mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x10],
            rx_count: 12,
            tx_count: 20,
        },
        Nic {
            tap: "nimbus-nt1",
            mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x11],
            rx_count: 8,
            tx_count: 3,
        },
    ];
    // net0: 128-byte receive buffers, so frames span several buffers (num_buffers > 1);
    // net1: no MRG_RXBUF, whole-frame buffers.
    let words = "net0.rx.bufsize=128 net1.mrg_rxbuf=0";
    let (run, report) = boot_net(
        "two_nics_with_and_without_mergeable_buffers",
        &nics,
        RNG,
        words,
        TIMEOUT,
        |cmdline| nimbus_with(&nics, &["192.168.249.1", "192.168.250.1"], cmdline),
    );
    let rx0 = report.detail("virtio.net0.rx").unwrap_or_default();
    assert!(
        !rx0.contains("multi_buffer=0 "),
        "net0 frames must span buffers: {rx0}\n{}",
        run.describe()
    );
    let rx1 = report.detail("virtio.net1.rx").unwrap_or_default();
    assert!(rx1.contains("mrg_rxbuf=no"), "{rx1}\n{}", run.describe());
}

/// Opens TAP `name` (one queue) inside the namespace at `ns_path`, as a manager such as Kata or
/// libvirt does before handing the fd to the VMM; returns an inheritable duplicate of the fd.
fn open_tap_in_namespace(ns_path: std::path::PathBuf, name: &'static str) -> OwnedFd {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&ns_path).expect("netns file");
        // SAFETY: setns on a valid namespace fd only changes this short-lived thread's namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let taps = net_util::Tap::open_named(name, 1).expect("tap in namespace");
        let tap = taps.first().expect("one queue");
        // SAFETY: dup of a valid descriptor; the copy has no CLOEXEC, so the VMM inherits it,
        // and it keeps the interface alive after `taps` closes its own fd.
        let raw = unsafe { libc::dup(tap.as_raw_fd()) };
        assert!(raw >= 0, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    })
    .join()
    .expect("tap thread")
}

/// The management-stack path: the TAP is opened by someone else (in its network namespace) and
/// passed to Nimbus as an inherited fd (`--net fd=N`); Nimbus leaves the interface alone.
#[test]
fn passed_tap_fd_carries_frames() {
    if !require_kvm("passed_tap_fd_carries_frames") {
        return;
    }
    let ns = NetNs::new("tapfd");
    let tap = open_tap_in_namespace(ns.path(), "nimbus-fd0");
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x20];
    let cmdline = format!(
        "{} expect.virtio=net:1,rng:1 net0.mac={} net0.rx.count=2 net0.tx.count=4",
        stage1_cmdline(1, 256 << 20),
        format_mac(mac)
    );
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), "size=256M", &cmdline);
    cmd.args([
        "--net",
        &format!("fd={},mac={}", tap.as_raw_fd(), format_mac(mac)),
    ]);
    let vm = spawn_vm(cmd);
    drop(tap); // the VMM has its own copy now
    let x = NetExchange {
        tap: "nimbus-fd0".into(),
        guest_mac: mac,
        rx_count: 2,
        tx_count: 4,
        device: 0,
        timeout: TIMEOUT,
    };
    if let Err(e) = exchange_test_frames(&vm, &ns, &x) {
        panic!("frame exchange over the passed fd: {e}");
    }
    let run = vm.finish(TIMEOUT);
    run.assert_success();
    let names = virtio_checks("net", 0, VIRTIO_NET_CHECKS);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    run.report().assert_passed(&refs);
}

/// Split-process networking: the project's `vhost_user_net` daemon owns the TAP (in a private
/// namespace) and moves the packets; Nimbus only runs the device model. The guest's frames are
/// captured on the daemon's TAP and frames injected there reach the guest; the daemon exits 0
/// when Nimbus disconnects.
#[test]
fn vhost_user_net_daemon_carries_frames() {
    if !require_kvm("vhost_user_net_daemon_carries_frames") {
        return;
    }
    vhost_user_net_exchange("vun", false, false, Pairs::ONE);
}

/// The same with the socket the other way round (`--net vhost_mode=server`, daemon
/// `client=on`), the mode Kata uses: Nimbus creates the socket and waits for the daemon.
#[test]
fn vhost_user_net_daemon_connects_to_nimbus() {
    if !require_kvm("vhost_user_net_daemon_connects_to_nimbus") {
        return;
    }
    vhost_user_net_exchange("vus", true, false, Pairs::ONE);
}

/// The daemon is killed after the guest posted its receive buffers and started again (it
/// connects to Nimbus's socket anew and creates a new TAP): Nimbus reconnects, the new daemon
/// fills the buffers the guest posted before, and the guest's frames leave through it.
#[test]
fn vhost_user_net_daemon_restart_keeps_the_guest_connected() {
    if !require_kvm("vhost_user_net_daemon_restart_keeps_the_guest_connected") {
        return;
    }
    vhost_user_net_exchange("vur", true, true, Pairs::ONE);
}

/// Multi-queue through the daemon: a three-pair `vhost_user_net` (a three-queue TAP), Nimbus
/// asked for three pairs, the guest uses two (`net0.pairs=2`, docs/test-guest.md). Nimbus
/// serves the control queue: VQ_PAIRS_SET(0) and (4) are refused, (2) starts the second pair's
/// rings in the daemon; both transmit queues' frames cross the TAP and the host's frames reach
/// the guest on a receive queue in use.
#[test]
fn vhost_user_net_daemon_serves_two_of_three_queue_pairs() {
    if !require_kvm("vhost_user_net_daemon_serves_two_of_three_queue_pairs") {
        return;
    }
    vhost_user_net_exchange("vum", false, false, Pairs { used: 2, device: 3 });
}

/// One pair of a two-pair interface in use: `vhost_user_net` keeps the second TAP queue
/// detached, so every host frame lands in the pair the guest reads (the TAP's flow hash sends
/// these frames to its second queue on this kernel, where they would be lost).
#[test]
fn vhost_user_net_daemon_steers_every_frame_to_the_pair_in_use() {
    if !require_kvm("vhost_user_net_daemon_steers_every_frame_to_the_pair_in_use") {
        return;
    }
    vhost_user_net_exchange("vum1", false, false, Pairs { used: 1, device: 2 });
}

/// The daemon of a two-pair interface is killed after the guest set both pairs up and posted
/// its receive buffers, and started again: the new daemon gets both pairs' rings running (the
/// count of running rings is part of the session), and frames cross both ways on both pairs.
#[test]
fn vhost_user_net_daemon_restart_keeps_both_queue_pairs() {
    if !require_kvm("vhost_user_net_daemon_restart_keeps_both_queue_pairs") {
        return;
    }
    vhost_user_net_exchange("vumr", true, true, Pairs { used: 2, device: 2 });
}

/// Queue pairs of a vhost-user interface: those of the device, those the guest uses.
#[derive(Clone, Copy)]
struct Pairs {
    used: u32,
    device: u32,
}

impl Pairs {
    const ONE: Pairs = Pairs { used: 1, device: 1 };
}

/// Boots the guest with a vhost-user-net interface served by `vhost_user_net` in namespace
/// `tag`, with Nimbus as the socket's server when `nimbus_listens`, and checks frames both ways;
/// with `restart`, the daemon is killed and started again before the frames are exchanged.
/// With a multi-queue device the guest runs its multi-queue checks.
fn vhost_user_net_exchange(tag: &str, nimbus_listens: bool, restart: bool, pairs: Pairs) {
    let ns = NetNs::new(tag);
    let dir = e2e::ScratchDir::new(&format!("vhost-user-net-{tag}"));
    let socket = dir.file("net.sock");
    let tap = format!("nimbus-{tag}0");
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x30];
    let wait_for_socket = |who: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{who} created no socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let start_daemon = |log: &str| {
        let mut daemon = Command::new(e2e::workspace_binary(
            "vhost_user_net",
            "NIMBUS_VHOST_USER_NET",
        ));
        daemon.args([
            "--net-backend",
            &format!(
                "ip=192.168.249.1,mask=255.255.255.0,mac={},socket={},tap={tap},client={},\
                 num_queues={}",
                format_mac(mac),
                socket.display(),
                if nimbus_listens { "on" } else { "off" },
                2 * pairs.device
            ),
        ]);
        ns.wrap(daemon)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.file(log)).expect("log"))
            .spawn()
            .expect("start vhost_user_net")
    };
    let mut daemon = if nimbus_listens {
        None
    } else {
        let d = start_daemon("daemon.log");
        wait_for_socket("vhost_user_net");
        Some(d)
    };
    let mq = pairs.device > 1;
    let (rx_count, tx_count) = if mq { (6, 12) } else { (2, 4) };
    let mut cmdline = format!(
        "{} expect.virtio=net:1,rng:1 net0.mac={} net0.rx.count={rx_count} \
         net0.tx.count={tx_count} net0.rx.wait=30",
        stage1_cmdline(1, 256 << 20),
        format_mac(mac)
    );
    if mq {
        cmdline += &format!(" net0.pairs={}", pairs.used);
    }
    let mode = if nimbus_listens { "server" } else { "client" };
    let mut cmd = nimbus_test_guest(
        env!("CARGO_BIN_EXE_nimbus"),
        "size=256M,shared=on",
        &cmdline,
    );
    cmd.args([
        "-v",
        "--net",
        &format!(
            "vhost_user=on,socket={},vhost_mode={mode},num_queues={}",
            socket.display(),
            2 * pairs.device
        ),
    ]);
    let vm = spawn_vm(cmd);
    if nimbus_listens {
        wait_for_socket("Nimbus (vhost_mode=server)");
        daemon = Some(start_daemon("daemon.log"));
    }
    let mut daemon = daemon.expect("daemon started");
    if restart {
        let fail = |what: &str, e: String| -> ! { panic!("{what}: {e}") };
        vm.wait_for_line("INFO virtio.net0.rx.ready", TIMEOUT)
            .unwrap_or_else(|e| fail("guest not ready", e));
        let _ = daemon.kill();
        let _ = daemon.wait();
        vm.wait_for_log_line("went away", TIMEOUT)
            .unwrap_or_else(|e| fail("Nimbus did not notice the daemon's death", e));
        if !nimbus_listens {
            // The killed daemon's socket is left behind; the new one replaces it.
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon = start_daemon("daemon2.log");
        if let Err(e) = vm.wait_for_log_line("reconnected", TIMEOUT) {
            let log = std::fs::read_to_string(dir.file("daemon2.log")).unwrap_or_default();
            let log1 = std::fs::read_to_string(dir.file("daemon.log")).unwrap_or_default();
            panic!("no reconnection: {e}\nkilled daemon's log:\n{log1}\nrestarted daemon's log:\n{log}");
        }
    }
    let x = NetExchange {
        tap: tap.clone(),
        guest_mac: mac,
        rx_count,
        tx_count,
        device: 0,
        timeout: TIMEOUT,
    };
    let exchanged = exchange_test_frames(&vm, &ns, &x);
    let run = vm.finish(TIMEOUT);
    let status = wait_child(&mut daemon, Duration::from_secs(10));
    let log_name = if restart { "daemon2.log" } else { "daemon.log" };
    let log = std::fs::read_to_string(dir.file(log_name)).unwrap_or_default();
    let frames = match exchanged {
        Ok(frames) => frames,
        Err(e) => panic!("frame exchange through vhost_user_net: {e}\ndaemon log:\n{log}"),
    };
    run.assert_success();
    if mq {
        let nic = Nic {
            tap: "",
            mac,
            rx_count,
            tx_count,
        };
        if let Err(e) =
            check_net_mq_report(&run.report(), 0, &nic, pairs.used, pairs.device, &frames)
        {
            panic!("{e}\n{}\ndaemon log:\n{log}", run.describe());
        }
    } else {
        let names = virtio_checks("net", 0, VIRTIO_NET_CHECKS);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        run.report().assert_passed(&refs);
    }
    assert_eq!(
        status,
        Some(0),
        "daemon exit after Nimbus disconnected; log:\n{log}"
    );
    assert!(
        !socket.exists(),
        "the socket's creator ({}) must remove it",
        if nimbus_listens {
            "Nimbus"
        } else {
            "the daemon"
        }
    );
}

/// Waits at most `timeout` for `child`, killing it after; its exit code.
fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.code(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}
