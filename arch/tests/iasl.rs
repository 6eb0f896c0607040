//! Checks the ACPI tables with ACPICA's `iasl`: every table must disassemble, and the disassembly
//! must compile back, with no errors and no warnings.
//!
//! `iasl` comes from the `acpica-tools` package (`scripts/install-deps`). Without it this test
//! fails rather than passing silently.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use arch::x86_64::acpi::{build_tables, AcpiConfig, AcpiTable};
use arch::x86_64::layout;

/// A fresh directory under the system temp dir, removed on success and kept on failure.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("nimbus-{name}-{}", std::process::id()));
        // A leftover from an earlier run with the same pid; a missing dir is fine.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        ScratchDir(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("iasl files kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `iasl args` in `dir` and returns its stdout and stderr, asserting it succeeded with no
/// errors or warnings.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let output = match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("iasl not installed: run scripts/install-deps")
        }
        Err(e) => panic!("cannot run iasl: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = summary(&text);
    eprintln!(
        "iasl {}: {}",
        args.join(" "),
        summary.as_deref().unwrap_or("no summary")
    );
    assert!(
        output.status.success(),
        "iasl {args:?} failed ({}):\n{text}",
        output.status
    );
    // Count lines (e.g. "0 Errors, 0 Warnings") are checked by value; any other mention of an
    // error or warning is a diagnostic.
    for line in text.lines() {
        let lower = line.to_lowercase();
        if lower.contains("errors,") || lower.contains("warnings,") {
            continue;
        }
        assert!(
            !lower.contains("error") && !lower.contains("warning"),
            "iasl {args:?} reported a problem:\n{text}"
        );
    }
    if let Some(summary) = summary {
        assert!(
            summary.contains(" 0 Errors") && summary.contains(" 0 Warnings"),
            "iasl {args:?}: {summary}\n{text}"
        );
    }
    text
}

/// The compiler's "N Errors, N Warnings, N Remarks" line, if it printed one.
fn summary(text: &str) -> Option<String> {
    text.lines()
        .find(|line| line.contains("Errors,") && line.contains("Warnings,"))
        .map(|line| line.trim().to_owned())
}

fn file_stem(table: &AcpiTable) -> String {
    String::from_utf8_lossy(&table.signature).to_lowercase()
}

fn read(dir: &Path, file: &str) -> String {
    let path = dir.join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes each table to `<signature>.dat` in a fresh directory, disassembles it and compiles the
/// disassembly back. Returns the directory, which holds the `.dsl` files.
fn round_trip(cfg: &AcpiConfig, name: &str) -> ScratchDir {
    let tables = build_tables(cfg).expect("ACPI tables");
    let dir = ScratchDir::new(name);
    // iasl (20200925 at least) does not load a bare RSDP ("does not contain a valid ACPI table");
    // the unit tests check it.
    for table in tables.iter().filter(|t| &t.signature != b"RSDP") {
        let stem = file_stem(table);
        let dat = format!("{stem}.dat");
        fs::write(dir.0.join(&dat), &table.bytes).expect("write table");
        // -d: disassemble to <stem>.dsl. The DSDT references nothing outside itself, so no
        // external tables (-e) are needed.
        iasl(&dir.0, &["-d", &dat]);
        // Compile the disassembly back (AML for the DSDT, a data table for the others).
        iasl(
            &dir.0,
            &["-p", &format!("{stem}-again"), &format!("{stem}.dsl")],
        );
    }
    dir
}

#[test]
fn iasl_accepts_every_table() {
    let cfg = AcpiConfig {
        boot_cpus: 2,
        max_cpus: 4,
        topology: None,
        pci_segments: layout::pci_segments(8 << 30, &[(1, 1), (1, 1)]).expect("segments"),
        memory_hotplug_slots: 0,
    };
    let dir = round_trip(&cfg, "acpi-iasl");

    let dsdt = read(&dir.0, "dsdt.dsl");
    for expected in [
        "_S5_",
        "PNP0501",
        "PNP0B00",
        "PNP0C02",
        "PNP0A08",
        "PNP0A03",
        "ACPI0013",
        "PNP0C0C",
        "ACPI0007",
        "_OSC",
        "_EVT",
        "Notify (\\_SB.PWRB, 0x80",
        "SystemIO, 0x0608",
        "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )",
        // PCI hotplug.
        "PNP0A06",
        "SystemIO, 0x0610, 0x10",
        "Mutex (BLCK, 0x00)",
        "Method (PCEJ, 2",
        "B0EJ = (One << Arg0)",
        "\\_SB.PCI0.PCNT ()",
        "\\_SB.PCI1.PCNT ()",
        "\\_SB.PHPR.PSCN ()",
        "Method (DVNT, 2",
        "Notify (S1F, Arg1)",
        "Method (PCNT, 0",
        "\\_SB.PHPR.PSEG = One",
        "\\_SB.PHPR.PCEJ (0x1F, One)",
        // CPU hotplug.
        "SystemIO, 0x0620, 0x10",
        "Mutex (CLCK, 0x00)",
        "Method (CSTA, 1",
        "Method (CEJT, 1",
        "Method (CTFY, 2",
        "Notify (\\_SB.CP03, Arg1)",
        "Method (CSCN, 0",
        "\\_SB.CPHP.CSCN ()",
        "Return (\\_SB.CPHP.CSTA (0x03))",
        "Method (_MAT, 0",
        "\\_SB.CPHP.CEJT (0x02)",
    ] {
        assert!(
            dsdt.contains(expected),
            "DSDT disassembly lacks {expected:?}:\n{dsdt}"
        );
    }

    let fadt = squeeze(&read(&dir.0, "facp.dsl"));
    for expected in [
        "Hardware Reduced (V5) : 1",
        "CMOS RTC Not Present (V5) : 0",
        "Reset Register Supported (V2) : 1",
        "Address : 0000000000000600",
        "Address : 0000000000000601",
        "Address : 0000000000000CF9",
        "Value to cause reset : 06",
    ] {
        assert!(
            fadt.contains(expected),
            "FADT disassembly lacks {expected:?}:\n{fadt}"
        );
    }

    let madt = squeeze(&read(&dir.0, "apic.dsl"));
    assert_eq!(madt.matches("Processor Enabled : 1").count(), 2, "{madt}");
    assert_eq!(
        madt.matches("Runtime Online Capable : 1").count(),
        2,
        "{madt}"
    );
    let mcfg = squeeze(&read(&dir.0, "mcfg.dsl"));
    assert!(mcfg.contains("End Bus Number : FF"), "{mcfg}");
    assert!(mcfg.contains("Segment Group Number : 0001"), "{mcfg}");
    assert!(dsdt.contains("Device (PCI1)"), "{dsdt}");
}

#[test]
fn iasl_accepts_the_largest_machine() {
    let cfg = AcpiConfig {
        boot_cpus: 255,
        max_cpus: 255,
        topology: None,
        pci_segments: {
            let mut one = layout::pci_segments(0, &[(1, 1)]).expect("segment");
            one[0].mmio64 = (0, 0);
            one
        },
        memory_hotplug_slots: 0,
    };
    let dir = round_trip(&cfg, "acpi-iasl-255");
    let dsdt = read(&dir.0, "dsdt.dsl");
    assert!(dsdt.contains("Device (CPFE)"), "last CPU device missing");
    assert!(
        !dsdt.contains("QWordMemory"),
        "empty 64-bit window must be left out"
    );
}

#[test]
fn iasl_accepts_every_pci_segment_with_hotplug_slots() {
    let cfg = AcpiConfig {
        boot_cpus: 1,
        max_cpus: 1,
        topology: None,
        pci_segments: layout::pci_segments(1 << 30, &[(1, 1); 16]).expect("segments"),
        memory_hotplug_slots: 0,
    };
    let dir = round_trip(&cfg, "acpi-iasl-16-segments");
    let dsdt = read(&dir.0, "dsdt.dsl");
    // 31 slots in each of the 16 host bridges, none for the host bridge's own device 0.
    assert_eq!(dsdt.matches("Device (S").count(), 16 * 31, "{dsdt}");
    // And the one processor's.
    assert_eq!(dsdt.matches("Method (_EJ0, 1").count(), 16 * 31 + 1);
    assert!(!dsdt.contains("Device (S00)"), "{dsdt}");
    for segment in 0..16 {
        let call = format!("\\_SB.PCI{segment:X}.PCNT ()");
        assert!(dsdt.contains(&call), "PSCN lacks {call}");
    }
    assert!(dsdt.contains("\\_SB.PHPR.PCEJ (0x1F, 0x0F)"), "{dsdt}");
    assert!(dsdt.contains("\\_SB.PHPR.PSEG = 0x0F"), "{dsdt}");
}

/// Collapses runs of spaces so field labels can be matched regardless of column alignment.
fn squeeze(text: &str) -> String {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn iasl_accepts_memory_hotplug() {
    let cfg = AcpiConfig {
        boot_cpus: 1,
        max_cpus: 2,
        topology: None,
        pci_segments: layout::pci_segments(640 << 20, &[(1, 1)]).expect("segments"),
        memory_hotplug_slots: layout::MEMORY_HOTPLUG_SLOTS,
    };
    let dir = round_trip(&cfg, "acpi-iasl-memory-hotplug");
    let dsdt = read(&dir.0, "dsdt.dsl");
    for expected in [
        "Device (MHPC)",
        "SystemIO, 0x0640, 0x18",
        "Mutex (MLCK, 0x00)",
        "Method (MSTA, 1",
        "Method (MCRS, 1, Serialized",
        "QWordMemory",
        "CreateQWordField (MR64, \\_SB.MHPC.MCRS._Y00._MIN, MINL)",
        "CreateQWordField (MR64, \\_SB.MHPC.MCRS._Y00._MAX, MAXL)",
        "CreateQWordField (MR64, \\_SB.MHPC.MCRS._Y00._LEN, LENL)",
        "If ((Local0 & 0x08))",
        "Method (MSCN, 0",
        "Notify (\\_SB.M000, One)",
        "Notify (\\_SB.M007, One)",
        "\\_SB.MHPC.MSCN ()",
        "Return (\\_SB.MHPC.MCRS (0x07))",
    ] {
        assert!(
            dsdt.contains(expected),
            "DSDT disassembly lacks {expected:?}:\n{dsdt}"
        );
    }
    assert_eq!(dsdt.matches("EisaId (\"PNP0C80\")").count(), 8, "{dsdt}");
    assert!(!dsdt.contains("Device (M008)"), "{dsdt}");
}
