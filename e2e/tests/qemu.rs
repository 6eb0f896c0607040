//! The test guest under QEMU q35 (KVM): the reference the guest's checks are
//! validated against. QEMU implements PVH, ACPI and the platform devices
//! independently of Nimbus, so a check that fails here points at the guest.
//!
//! Needs /dev/kvm (skipped loudly without it) and qemu-system-x86_64 (a
//! failure without it: run scripts/install-deps).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{
    format_mac, guest_elf, qemu_binary, qemu_q35_command, require_kvm, run_vm, stage1_cmdline,
    verify_disk_pattern, virtio_checks, write_disk_pattern, GuestReport, Nic, ScratchDir,
    Stage2Keys, VmRun, STAGE1_CHECKS, STAGE2_PCI_CHECKS, VIRTIO_BLK_CHECKS, VIRTIO_CONSOLE_CHECKS,
    VIRTIO_RNG_CHECKS,
};

/// SeaBIOS alone takes ~3 s on PVM hosts (its CPL0 code is emulated).
const TIMEOUT: Duration = Duration::from_secs(60);

/// Boots the guest with `cpus` vCPUs and `mem_mib` MiB and checks that QEMU
/// exits 0 after a clean stage-1 report with the command line echoed exactly.
fn boot_stage1(test: &str, cpus: u32, mem_mib: u64) -> GuestReport {
    qemu_binary(); // fail early and clearly if QEMU is missing
    let cmdline = stage1_cmdline(cpus, mem_mib << 20);
    let elf = guest_elf();
    let run = run_vm(qemu_q35_command(&elf, cpus, mem_mib, &cmdline), TIMEOUT);
    eprintln!("{test}: QEMU finished in {:.1?}", run.elapsed);
    run.assert_success();
    let report = run.report();
    report.assert_passed(STAGE1_CHECKS);
    // Stage 2 runs too: q35's own PCI devices (no virtio) must pass.
    report.assert_passed(STAGE2_PCI_CHECKS);
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "the guest must echo the command line exactly\n{}",
        run.describe()
    );
    assert_eq!(
        report.banner.as_deref(),
        Some("NIMBUS-TEST-GUEST stage1"),
        "{}",
        run.describe()
    );
    report
}

#[test]
fn qemu_q35_1cpu_128m() {
    if !require_kvm("qemu_q35_1cpu_128m") {
        return;
    }
    let report = boot_stage1("qemu_q35_1cpu_128m", 1, 128);
    assert!(
        report.detail("smp").is_some_and(|d| d.contains("aps=0")),
        "{}",
        report.raw
    );
}

#[test]
fn qemu_q35_2cpu_3584m() {
    if !require_kvm("qemu_q35_2cpu_3584m") {
        return;
    }
    let report = boot_stage1("qemu_q35_2cpu_3584m", 2, 3584);
    // 3.5 GiB on q35 puts 1.5 GiB above 4 GiB: memtouch must have reached it.
    let memtouch = report.detail("memtouch").unwrap_or_default();
    assert!(
        memtouch.contains("0x100000000"),
        "memtouch did not test RAM above 4 GiB: {memtouch}"
    );
    let smp = report.detail("smp").unwrap_or_default();
    assert!(
        smp.contains("reported=1") && smp.contains("apic_ids=0,1"),
        "AP did not report: {smp}"
    );
}

/// A fault in the guest must be reported (vector, RIP, CR2), counted as a
/// failure, and still end the run through ACPI power-off.
#[test]
fn qemu_q35_guest_fault_is_reported() {
    if !require_kvm("qemu_q35_guest_fault_is_reported") {
        return;
    }
    qemu_binary();
    let elf = guest_elf();
    let run = run_vm(
        qemu_q35_command(&elf, 1, 128, "expect.cpus=1 debug.fault=pf"),
        TIMEOUT,
    );
    run.assert_success();
    let report = run.report();
    assert_eq!(report.faults.len(), 1, "{}", run.describe());
    assert!(
        report.faults[0].starts_with("vector=0xe ")
            && report.faults[0].contains("cr2=0x7fff00001000"),
        "unexpected fault line {:?}\n{}",
        report.faults[0],
        run.describe()
    );
    assert!(
        report.done.is_some_and(|(_, fail)| fail >= 1),
        "{}",
        run.describe()
    );
}

/// Size of the stage-2 test disk image.
const DISK_SIZE: u64 = 8 << 20;
/// Where the guest writes its pattern (4 KiB from here), well inside the disk.
const PATTERN_SECTOR: u64 = 2048;
const DISK_SERIAL: &str = "nimbus-qemu-disk0";
const CONSOLE_MESSAGE: &str = "nimbus-virtio-console-ok";

/// Boots q35 with the stage-2 command line plus `devices` (QEMU arguments)
/// and returns the run after checking that QEMU exited 0.
fn boot_stage2(test: &str, keys: &Stage2Keys, devices: &[&str]) -> (VmRun, GuestReport) {
    qemu_binary();
    let cmdline = format!("{} {}", stage1_cmdline(1, 256 << 20), keys.to_cmdline());
    let elf = guest_elf();
    let mut cmd: Command = qemu_q35_command(&elf, 1, 256, &cmdline);
    cmd.args(devices);
    let run = run_vm(cmd, TIMEOUT);
    eprintln!("{test}: QEMU finished in {:.1?}", run.elapsed);
    run.assert_success();
    let report = run.report();
    assert_eq!(
        report.detail("cmdline"),
        Some(format!("\"{cmdline}\"").as_str()),
        "{}",
        run.describe()
    );
    (run, report)
}

fn drive_arg(image: &Path, readonly: bool) -> String {
    format!(
        "if=none,id=d0,format=raw,file={}{}",
        image.display(),
        if readonly { ",readonly=on" } else { "" }
    )
}

/// Stage 2 against QEMU's modern-only virtio-pci devices: a virtio-blk disk
/// with two request queues and a serial number, virtio-rng, and a
/// virtio-serial device with a console on port 0. Afterwards the disk image
/// must hold the guest's pattern exactly in the sectors it wrote and the host
/// pattern everywhere else, and the console file the guest's message.
#[test]
fn qemu_q35_stage2_virtio() {
    if !require_kvm("qemu_q35_stage2_virtio") {
        return;
    }
    let dir = ScratchDir::new("qemu-stage2");
    let image = dir.file("disk.img");
    let console = dir.file("console.txt");
    write_disk_pattern(&image, DISK_SIZE).expect("write the disk image");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1), ("rng", 1), ("console", 1)]),
        blk_pattern_sector: Some(PATTERN_SECTOR),
        blk_serial: Some(DISK_SERIAL.to_string()),
        console_message: Some(CONSOLE_MESSAGE.to_string()),
        ..Stage2Keys::default()
    };
    let blk =
        format!("virtio-blk-pci,drive=d0,disable-legacy=on,serial={DISK_SERIAL},num-queues=2");
    let drive = drive_arg(&image, false);
    let chardev = format!("file,id=c0,path={}", console.display());
    let (run, report) = boot_stage2(
        "qemu_q35_stage2_virtio",
        &keys,
        &[
            "-device",
            &blk,
            "-drive",
            &drive,
            "-device",
            "virtio-rng-pci,disable-legacy=on",
            "-device",
            "virtio-serial-pci,disable-legacy=on",
            "-chardev",
            &chardev,
            "-device",
            "virtconsole,chardev=c0",
        ],
    );
    let mut names: Vec<String> = STAGE1_CHECKS
        .iter()
        .chain(STAGE2_PCI_CHECKS)
        .map(|s| s.to_string())
        .collect();
    names.extend(virtio_checks("blk", 0, VIRTIO_BLK_CHECKS));
    names.extend(virtio_checks("blk", 0, &["mq"]));
    names.extend(virtio_checks("rng", 0, VIRTIO_RNG_CHECKS));
    names.extend(virtio_checks("console", 0, VIRTIO_CONSOLE_CHECKS));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    assert!(
        report
            .detail("virtio.blk0.get_id")
            .is_some_and(|d| d.contains(&format!("id=\"{DISK_SERIAL}\""))),
        "{}",
        run.describe()
    );
    assert!(
        report
            .detail("virtio.blk0.capacity")
            .is_some_and(|d| d.contains(&format!("sectors={} ", DISK_SIZE / 512))),
        "{}",
        run.describe()
    );
    if let Err(e) = verify_disk_pattern(&image, DISK_SIZE, Some(PATTERN_SECTOR)) {
        panic!("disk image after the run: {e}\n{}", run.describe());
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        text.contains(&format!("{CONSOLE_MESSAGE}\n")),
        "virtio console output {text:?} lacks {CONSOLE_MESSAGE:?}\n{}",
        run.describe()
    );
}

/// A read-only virtio-blk disk: the device offers VIRTIO_BLK_F_RO, a write
/// fails with IOERR, and the image file is unchanged.
#[test]
fn qemu_q35_stage2_readonly_disk() {
    if !require_kvm("qemu_q35_stage2_readonly_disk") {
        return;
    }
    let dir = ScratchDir::new("qemu-stage2-ro");
    let image = dir.file("disk.img");
    write_disk_pattern(&image, DISK_SIZE).expect("write the disk image");
    let keys = Stage2Keys {
        virtio: Some(vec![("blk", 1)]),
        blk_pattern_sector: Some(PATTERN_SECTOR),
        blk_readonly: true,
        ..Stage2Keys::default()
    };
    let drive = drive_arg(&image, true);
    let (run, report) = boot_stage2(
        "qemu_q35_stage2_readonly_disk",
        &keys,
        &[
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
            "-drive",
            &drive,
        ],
    );
    let checks: Vec<&str> = VIRTIO_BLK_CHECKS
        .iter()
        .copied()
        .filter(|&c| c != "write")
        .chain(["readonly"])
        .collect();
    let mut names: Vec<String> = STAGE2_PCI_CHECKS.iter().map(|s| s.to_string()).collect();
    names.extend(virtio_checks("blk", 0, &checks));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    report.assert_passed(&names);
    assert!(
        report.test("virtio.blk0.write").is_none(),
        "no write check on a read-only disk\n{}",
        run.describe()
    );
    if let Err(e) = verify_disk_pattern(&image, DISK_SIZE, None) {
        panic!("read-only disk image changed: {e}\n{}", run.describe());
    }
}

/// Boots q35 with one modern virtio-net device per `nics` entry (see
/// [`e2e::boot_net`]).
fn boot_net(test: &str, nics: &[Nic], words: &str) -> (VmRun, GuestReport) {
    qemu_binary();
    e2e::boot_net(test, nics, &[], words, TIMEOUT, |cmdline| {
        let elf = guest_elf();
        let mut cmd: Command = qemu_q35_command(&elf, 1, 256, cmdline);
        for (n, nic) in nics.iter().enumerate() {
            // romfile= : no iPXE option ROM for SeaBIOS to run (~0.4 s on PVM).
            cmd.args([
                "-netdev",
                &format!("tap,id=n{n},ifname={},script=no,downscript=no", nic.tap),
                "-device",
                &format!(
                    "virtio-net-pci,netdev=n{n},mac={},disable-legacy=on,romfile=",
                    format_mac(nic.mac)
                ),
            ]);
        }
        cmd
    })
}

/// virtio-net against QEMU's modern-only device on a TAP in a private
/// network namespace: the MAC from the device configuration, four frames
/// from the host received intact (MRG_RXBUF negotiated, 2 KiB buffers),
/// eight frames of 78..1514 bytes transmitted (chains of 1, 2 and 3
/// descriptors) and captured on the TAP byte for byte, MSI-X for both
/// queues.
#[test]
fn qemu_q35_stage2_virtio_net() {
    if !require_kvm("qemu_q35_stage2_virtio_net") {
        return;
    }
    let nic = Nic {
        tap: "nimbus-tap0",
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        rx_count: 4,
        tx_count: 8,
    };
    let (run, report) = boot_net("qemu_q35_stage2_virtio_net", &[nic], "");
    assert!(
        report
            .detail("virtio.net0.rx")
            .is_some_and(|d| d.contains("mrg_rxbuf=yes")),
        "{}",
        run.describe()
    );
}

/// Two virtio-net devices, each on its own TAP: net0 with MRG_RXBUF and
/// 128-byte receive buffers (frames span up to 12 buffers, num_buffers > 1),
/// net1 without MRG_RXBUF (whole-frame buffers); more frames than fit in
/// one transmit batch.
#[test]
fn qemu_q35_stage2_virtio_net_two_devices() {
    if !require_kvm("qemu_q35_stage2_virtio_net_two_devices") {
        return;
    }
    let nics = [
        Nic {
            tap: "nimbus-tap0",
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x60],
            rx_count: 12,
            tx_count: 20,
        },
        Nic {
            tap: "nimbus-tap1",
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x61],
            rx_count: 8,
            tx_count: 3,
        },
    ];
    let (run, report) = boot_net(
        "qemu_q35_stage2_virtio_net_two_devices",
        &nics,
        "net0.rx.bufsize=128 net1.mrg_rxbuf=0",
    );
    let rx0 = report.detail("virtio.net0.rx").unwrap_or_default();
    let rx1 = report.detail("virtio.net1.rx").unwrap_or_default();
    assert!(
        rx0.contains("bufsize=128 mrg_rxbuf=yes")
            && !rx0.contains("multi_buffer=0 ")
            && rx1.contains("mrg_rxbuf=no"),
        "net0.rx {rx0:?} net1.rx {rx1:?}\n{}",
        run.describe()
    );
    let tx0 = report.detail("virtio.net0.tx").unwrap_or_default();
    assert!(
        tx0.contains("in 3 batch(es)"),
        "{tx0:?}\n{}",
        run.describe()
    );
}
