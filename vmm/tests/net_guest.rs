//! virtio-net under Nimbus, end to end: Nimbus creates the TAP (inside a private network
//! namespace), the guest's frames are captured on the TAP byte for byte, and frames injected
//! into the TAP reach the guest intact; the guest's MAC comes from `--net mac=`.
//!
//! Needs /dev/kvm and root (network namespaces, TAP creation); without /dev/kvm each test prints
//! a loud SKIPPED line.

use std::process::Command;
use std::time::Duration;

use e2e::{boot_net, format_mac, guest_elf, require_kvm, Nic};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Nimbus's default device besides the NICs (`--console off`).
const RNG: &[(&str, u32)] = &[("rng", 1)];

fn nimbus_with(nics: &[Nic], ips: &[&str], cmdline: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus"));
    cmd.arg("--kernel").arg(guest_elf()).args([
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        "off",
        "--cmdline",
        cmdline,
    ]);
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
