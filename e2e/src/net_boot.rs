//! Whole virtio-net runs: a VMM booted with one or more NICs inside a fresh network namespace,
//! the host side of every device's checks played, and the guest's report checked
//! ([`boot_net`], [`boot_net_mq`]).

use std::process::Command;
use std::time::Duration;

use crate::{
    exchange_test_frames, format_mac, net_test_frame_index, spawn_vm, stage1_cmdline,
    verify_net_tx_frames, virtio_checks, GuestReport, NetDir, NetExchange, NetNs, VmRun,
    STAGE2_PCI_CHECKS, VIRTIO_NET_CHECKS, VIRTIO_NET_MQ_CHECKS,
};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{net_test_frame, BROADCAST_MAC};

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
}
