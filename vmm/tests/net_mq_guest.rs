//! virtio-net with several queue pairs, end to end: the guest runs with `net0.pairs=N`
//! (docs/test-guest.md, "virtio-net with several queue pairs"), negotiates CTRL_VQ and MQ,
//! sends VQ_PAIRS_SET on the control queue (0 and max + 1 first, which must be refused, then
//! N), posts receive buffers on every receive queue in use and transmits frame `i` on pair
//! `i % N`. The host captures every frame on the TAP byte for byte and sends frames the guest
//! must receive on one of its queues. Under Nimbus's in-process device (a multi-queue TAP) and
//! under QEMU q35 with a multi-queue TAP, the reference.
//!
//! Needs /dev/kvm and root (network namespaces, TAP creation); without /dev/kvm each test prints
//! a loud SKIPPED line.

use std::process::Command;
use std::time::Duration;

use e2e::{
    boot_net_mq, format_mac, guest_elf, nimbus_test_guest, qemu_binary, qemu_q35_command,
    require_kvm, run_vm, stage1_cmdline, NetNs, Nic,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Nimbus's default device besides the NIC (`--console off`).
const RNG: &[(&str, u32)] = &[("rng", 1)];

/// Nimbus with one in-process virtio-net device on TAP `nic.tap` with `queue_pairs` pairs.
fn nimbus_mq(nic: &Nic, queue_pairs: u32, cmdline: &str) -> Command {
    let mut cmd = nimbus_test_guest(env!("CARGO_BIN_EXE_nimbus"), "size=256M", cmdline);
    cmd.args([
        "--net",
        &format!(
            "tap={},mac={},ip=192.168.251.1,mask=255.255.255.0,num_queues={}",
            nic.tap,
            format_mac(nic.mac),
            2 * queue_pairs
        ),
    ]);
    cmd
}

/// Two pairs of two: both transmit queues carry their share of the frames, the host's frames
/// arrive on whichever receive queue the TAP steers them to, VQ_PAIRS_SET(0) and (3) are
/// refused.
#[test]
fn nimbus_two_queue_pairs() {
    if !require_kvm("nimbus_two_queue_pairs") {
        return;
    }
    let nic = Nic {
        tap: "nimbus-mq0",
        mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x40],
        rx_count: 8,
        tx_count: 16,
    };
    boot_net_mq(
        "nimbus_two_queue_pairs",
        &nic,
        2,
        2,
        RNG,
        "",
        TIMEOUT,
        |cmdline| nimbus_mq(&nic, 2, cmdline),
    );
}

/// Two pairs of a three-pair device: the third pair's queues stay disabled (and its TAP queue
/// detached) without harm; VQ_PAIRS_SET(4) is refused. 128-byte receive buffers make frames
/// span several buffers on every receive queue.
#[test]
fn nimbus_two_of_three_queue_pairs() {
    if !require_kvm("nimbus_two_of_three_queue_pairs") {
        return;
    }
    let nic = Nic {
        tap: "nimbus-mq1",
        mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x41],
        rx_count: 6,
        tx_count: 21,
    };
    let (_, report) = boot_net_mq(
        "nimbus_two_of_three_queue_pairs",
        &nic,
        2,
        3,
        RNG,
        "net0.rx.bufsize=128",
        TIMEOUT,
        |cmdline| nimbus_mq(&nic, 3, cmdline),
    );
    let mq = report.detail("virtio.net0.mq").unwrap_or_default();
    assert!(mq.contains("queues 4..6 unused"), "{mq}");
}

/// A device with one queue pair offers neither CTRL_VQ nor MQ: the guest asked for two pairs
/// says so in a failed `init` and leaves the device alone (no other net check), and the run
/// still ends cleanly.
#[test]
fn nimbus_single_pair_device_refuses_pairs_key() {
    if !require_kvm("nimbus_single_pair_device_refuses_pairs_key") {
        return;
    }
    let nic = Nic {
        tap: "nimbus-mq2",
        mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x42],
        rx_count: 0,
        tx_count: 0,
    };
    let cmdline = format!(
        "{} expect.virtio=net:1,rng:1 net0.pairs=2",
        stage1_cmdline(1, 256 << 20)
    );
    let ns = NetNs::new("netmq1");
    let run = run_vm(ns.wrap(nimbus_mq(&nic, 1, &cmdline)), TIMEOUT);
    assert!(run.success(), "{}", run.describe());
    let report = run.report();
    let init = report.test("virtio.net0.init");
    assert!(
        matches!(init, Some((false, d)) if d.contains("CTRL_VQ MQ not offered")),
        "init {init:?}\n{}",
        run.describe()
    );
    for check in ["mac", "ctrl", "rx", "tx", "mq", "msix"] {
        let name = format!("virtio.net0.{check}");
        assert!(
            report.test(&name).is_none(),
            "{name} reported\n{}",
            run.describe()
        );
    }
    assert_eq!(report.done.map(|d| d.1), Some(1), "{}", run.describe());
}

/// The reference: the same guest under QEMU q35, `-netdev tap,queues=2,vhost=off` and
/// `virtio-net-pci,mq=on,vectors=6` (configuration, four queues, control queue).
#[test]
fn qemu_two_queue_pairs() {
    if !require_kvm("qemu_two_queue_pairs") {
        return;
    }
    qemu_binary();
    let nic = Nic {
        tap: "nimbus-mq3",
        mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0x43],
        rx_count: 8,
        tx_count: 16,
    };
    let pairs = 2;
    boot_net_mq(
        "qemu_two_queue_pairs",
        &nic,
        pairs,
        pairs,
        &[],
        "",
        TIMEOUT,
        |cmdline| {
            let mut cmd = qemu_q35_command(&guest_elf(), 1, 256, cmdline);
            // romfile= : no iPXE option ROM for SeaBIOS to run (~0.4 s on PVM).
            cmd.args([
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,queues={pairs},vhost=off",
                    nic.tap
                ),
                "-device",
                &format!(
                    "virtio-net-pci,netdev=n0,mac={},disable-legacy=on,romfile=,mq=on,vectors={}",
                    format_mac(nic.mac),
                    2 * pairs + 2
                ),
            ]);
            cmd
        },
    );
}
