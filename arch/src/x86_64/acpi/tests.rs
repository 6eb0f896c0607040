use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

fn config(boot_cpus: u8, max_cpus: u8) -> AcpiConfig {
    AcpiConfig {
        boot_cpus,
        max_cpus,
        topology: None,
        pci_segments: layout::pci_segments(1 << 30, &[(1, 1)]).expect("one segment"),
        memory_hotplug_slots: 0,
    }
}

/// `config(1, 1)` with segment 0's windows replaced.
fn windows(mmio32: (u64, u64), mmio64: (u64, u64)) -> AcpiConfig {
    let mut cfg = config(1, 1);
    cfg.pci_segments[0].mmio32 = mmio32;
    cfg.pci_segments[0].mmio64 = mmio64;
    cfg
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().expect("2 bytes"))
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

fn table<'a>(tables: &'a [AcpiTable], signature: &[u8; 4]) -> &'a AcpiTable {
    tables
        .iter()
        .find(|t| &t.signature == signature)
        .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
}

fn table_at(tables: &[AcpiTable], addr: u64) -> &AcpiTable {
    tables
        .iter()
        .find(|t| t.addr.0 == addr)
        .unwrap_or_else(|| panic!("no table at {addr:#x}"))
}

/// MADT interrupt controller structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut offset = 44;
    while offset < madt.len() {
        let len = usize::from(madt[offset + 1]);
        assert!(len >= 2, "MADT entry at {offset} has length {len}");
        entries.push((madt[offset], &madt[offset..offset + len]));
        offset += len;
    }
    assert_eq!(offset, madt.len(), "MADT entries overrun the table");
    entries
}

#[test]
fn every_checksum_is_zero() {
    for (boot, max) in [(1, 1), (2, 8), (255, 255)] {
        let tables = build_tables(&config(boot, max)).expect("tables");
        for t in &tables {
            if &t.signature == b"RSDP" {
                assert_eq!(t.bytes.len(), 36);
                assert_eq!(sum(&t.bytes[..20]), 0, "RSDP v1 checksum");
            } else {
                assert_eq!(&t.bytes[..4], &t.signature);
                assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "length field");
                assert_eq!(&t.bytes[10..16], b"NIMBUS");
                assert_eq!(&t.bytes[16..24], b"NIMBUSVM");
            }
            assert_eq!(
                sum(&t.bytes),
                0,
                "{} checksum",
                String::from_utf8_lossy(&t.signature)
            );
        }
    }
}

#[test]
fn rsdp_leads_to_every_table() {
    let tables = build_tables(&config(2, 4)).expect("tables");
    let rsdp = &tables[0];
    assert_eq!(&rsdp.signature, b"RSDP");
    assert_eq!(rsdp.addr, GuestAddress(layout::ACPI_START));
    assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
    assert_eq!(rsdp.bytes[15], 2, "RSDP revision");
    assert_eq!(&rsdp.bytes[9..15], b"NIMBUS");

    let xsdt = table_at(&tables, u64_at(&rsdp.bytes, 24));
    assert_eq!(&xsdt.signature, b"XSDT");
    let listed: Vec<[u8; 4]> = xsdt.bytes[36..]
        .chunks(8)
        .map(|entry| table_at(&tables, u64_at(entry, 0)).signature)
        .collect();
    assert_eq!(listed, [*b"FACP", *b"APIC", *b"MCFG"]);

    let fadt = table(&tables, b"FACP");
    assert_eq!(u32_at(&fadt.bytes, 40), 0, "32-bit DSDT pointer unused");
    let dsdt = table_at(&tables, u64_at(&fadt.bytes, 140));
    assert_eq!(&dsdt.signature, b"DSDT");
}

#[test]
fn tables_are_aligned_disjoint_and_inside_the_area() {
    let tables = build_tables(&config(255, 255)).expect("tables");
    let mut previous_end = layout::ACPI_START;
    for t in &tables {
        assert_eq!(t.addr.0 % 16, 0);
        assert!(t.addr.0 >= previous_end, "tables overlap");
        previous_end = t.addr.0 + t.bytes.len() as u64;
    }
    assert!(previous_end <= layout::ACPI_END);
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let tables = build_tables(&config(1, 1)).expect("tables");
    let fadt = &table(&tables, b"FACP").bytes;
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "major version");
    assert_eq!(fadt[131], 5, "minor version");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let boot_arch = u16_at(fadt, 109);
    assert_eq!(boot_arch & (1 << 5), 0, "CMOS RTC must be present");
    assert_eq!(boot_arch & (1 << 3), 0, "MSI must be supported");
    assert_ne!(boot_arch & (1 << 2), 0, "no VGA");
    assert_eq!(u16_at(fadt, 46), u16::from(GED_ISA_IRQ), "SCI_INT");

    let io_byte = |offset: usize, port: u16| {
        assert_eq!(fadt[offset], 1, "system I/O");
        assert_eq!(fadt[offset + 1], 8, "8 bits wide");
        assert_eq!(fadt[offset + 3], 1, "byte access");
        assert_eq!(u64_at(fadt, offset + 4), u64::from(port));
    };
    io_byte(116, layout::ACPI_RESET_PORT);
    assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
    io_byte(244, layout::ACPI_SLEEP_CONTROL_PORT);
    io_byte(256, layout::ACPI_SLEEP_STATUS_PORT);
    assert_eq!(&fadt[268..276], b"NIMBUS\0\0");
}

#[test]
fn madt_enables_boot_cpus_and_lists_the_rest_online_capable() {
    for (boot, max) in [(1, 1), (2, 2), (2, 8), (255, 255)] {
        let tables = build_tables(&config(boot, max)).expect("tables");
        let madt = &table(&tables, b"APIC").bytes;
        assert_eq!(madt[8], 5, "MADT revision");
        assert_eq!(u32_at(madt, 36) as u64, layout::LAPIC_START);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");

        let entries = madt_entries(madt);
        let lapics: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 0).map(|e| e.1).collect();
        assert_eq!(lapics.len(), usize::from(max));
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!(usize::from(lapic[2]), i, "processor UID");
            assert_eq!(usize::from(lapic[3]), i, "APIC ID");
            let expected = if i < usize::from(boot) { 1 } else { 2 };
            assert_eq!(u32_at(lapic, 4), expected, "flags of CPU {i}");
        }

        let ioapics: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], max, "IOAPIC ID follows the APIC IDs");
        assert_eq!(u32_at(ioapics[0], 4) as u64, layout::IOAPIC_START);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

        let overrides: Vec<(u8, u8, u32, u16)> = entries
            .iter()
            .filter(|e| e.0 == 2)
            .map(|e| (e.1[2], e.1[3], u32_at(e.1, 4), u16_at(e.1, 8)))
            .collect();
        assert_eq!(
            overrides,
            [(0, 0, 2, 0), (0, GED_ISA_IRQ, layout::ACPI_GED_GSI, 0x000d)]
        );

        let nmis: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 4).map(|e| e.1).collect();
        assert_eq!(nmis, [&[4, 6, 0xff, 0, 0, 1][..]]);
    }
}

#[test]
fn madt_apic_ids_follow_the_topology() {
    // 1 thread, 3 cores (2 bits), 1 die, 2 packages: APIC IDs 0, 1, 2, 4, 5, 6.
    let topology = crate::x86_64::topology::Topology {
        threads_per_core: 1,
        cores_per_die: 3,
        dies_per_package: 1,
        packages: 2,
    };
    let cfg = AcpiConfig {
        topology: Some(topology),
        ..config(4, 6)
    };
    let tables = build_tables(&cfg).expect("tables");
    let entries = madt_entries(&table(&tables, b"APIC").bytes);
    let lapics: Vec<(u8, u8, u32)> = entries
        .iter()
        .filter(|e| e.0 == 0)
        .map(|e| (e.1[2], e.1[3], u32_at(e.1, 4)))
        .collect();
    assert_eq!(
        lapics,
        [
            (0, 0, 1),
            (1, 1, 1),
            (2, 2, 1),
            (3, 4, 1),
            (4, 5, 2),
            (5, 6, 2)
        ]
    );
    let ioapic = entries.iter().find(|e| e.0 == 1).map(|e| e.1[2]);
    assert_eq!(ioapic, Some(7), "IOAPIC ID after the highest APIC ID");
    // A topology that does not hold max_cpus, or needs APIC IDs above 254, is refused.
    for (cpus, t) in [(6u8, (2u16, 2u16, 1u16, 1u16)), (195, (1, 65, 1, 3))] {
        let cfg = AcpiConfig {
            topology: Some(crate::x86_64::topology::Topology {
                threads_per_core: t.0,
                cores_per_die: t.1,
                dies_per_package: t.2,
                packages: t.3,
            }),
            ..config(1, cpus)
        };
        let e = build_tables(&cfg).expect_err("bad topology");
        assert!(matches!(e, AcpiError::Topology { .. }), "{e}");
    }
}

#[test]
fn mcfg_covers_the_ecam_window() {
    let tables = build_tables(&config(1, 1)).expect("tables");
    let mcfg = &table(&tables, b"MCFG").bytes;
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), layout::PCI_ECAM_START);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!(mcfg[54], 0, "first bus");
    assert_eq!(mcfg[55], 255, "last bus");
    assert_eq!(u64::from(mcfg[55]) + 1, layout::PCI_ECAM_SIZE >> 20);
}

#[test]
fn dsdt_is_revision_2_and_names_the_devices() {
    let tables = build_tables(&config(2, 3)).expect("tables");
    let dsdt = &table(&tables, b"DSDT").bytes;
    assert_eq!(dsdt[8], 2, "64-bit integers");
    let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    for name in [
        &b"_S5_"[..],
        b"COM1",
        b"RTC_",
        b"MBRD",
        b"PCI0",
        b"PWRB",
        b"GED_",
        b"_EVT",
        b"_OSC",
        b"ACPI0013",
        b"ACPI0007",
        b"CP00",
        b"CP01",
        b"CP02",
    ] {
        assert!(
            contains(name),
            "DSDT lacks {}",
            String::from_utf8_lossy(name)
        );
    }
    assert!(!contains(b"CP03"));
}

#[test]
fn empty_pci_windows_are_left_out() {
    // Descriptor tag and length of DWordMemory / QWordMemory, then resource type 0 (memory).
    const DWORD_MEMORY: &[u8] = &[0x87, 0x17, 0x00, 0x00];
    const QWORD_MEMORY: &[u8] = &[0x8a, 0x2b, 0x00, 0x00];
    let has = |cfg: &AcpiConfig, descriptor: &[u8]| {
        let tables = build_tables(cfg).expect("tables");
        let dsdt = &table(&tables, b"DSDT").bytes;
        dsdt.windows(descriptor.len()).any(|w| w == descriptor)
    };
    let both = config(1, 1);
    assert!(has(&both, DWORD_MEMORY) && has(&both, QWORD_MEMORY));
    let no_64 = windows(both.pci_segments[0].mmio32, (0, 0));
    assert!(has(&no_64, DWORD_MEMORY) && !has(&no_64, QWORD_MEMORY));
    let no_32 = windows((0, 0), both.pci_segments[0].mmio64);
    assert!(!has(&no_32, DWORD_MEMORY) && has(&no_32, QWORD_MEMORY));
}

#[test]
fn bad_configs_are_errors() {
    assert!(matches!(
        build_tables(&config(0, 0)),
        Err(AcpiError::NoBootCpus)
    ));
    assert!(matches!(
        build_tables(&config(0, 4)),
        Err(AcpiError::NoBootCpus)
    ));
    assert!(matches!(
        build_tables(&config(3, 2)),
        Err(AcpiError::BootCpusAboveMax { boot: 3, max: 2 })
    ));
    let above_4g = windows((0xf000_0000, 0x2000_0000), (0, 0));
    assert!(matches!(
        build_tables(&above_4g),
        Err(AcpiError::InvalidPciWindow {
            window: "32-bit",
            ..
        })
    ));
    let wrapping = windows((0, 0), (u64::MAX - 0xfff, 0x2000));
    assert!(matches!(
        build_tables(&wrapping),
        Err(AcpiError::InvalidPciWindow {
            window: "64-bit",
            ..
        })
    ));
}

#[test]
fn pci_segments_must_be_numbered_from_0() {
    let mut none = config(1, 1);
    none.pci_segments.clear();
    assert!(matches!(build_tables(&none), Err(AcpiError::PciSegments)));
    let mut gap = config(1, 1);
    gap.pci_segments = layout::pci_segments(1 << 30, &[(1, 1); 3]).expect("segments");
    gap.pci_segments.remove(1);
    assert!(matches!(build_tables(&gap), Err(AcpiError::PciSegments)));
}

/// Whether `name` at `at` is the name of a `Device`: DeviceOp (0x5b 0x82), then a PkgLength
/// whose lead byte gives its own size (1 to 4 bytes), then the name.
fn is_device_name(dsdt: &[u8], at: usize) -> bool {
    (1..=4).any(|len: usize| {
        at.checked_sub(len + 2).is_some_and(|op| {
            dsdt[op..op + 2] == [0x5b, 0x82] && usize::from(dsdt[op + 2] >> 6) + 1 == len
        })
    })
}

/// The DSDT's `Device (name)` body, up to the next device (nested or not) after it.
fn device_body<'a>(dsdt: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
    let at = dsdt
        .windows(4)
        .enumerate()
        .position(|(at, w)| w == name && is_device_name(dsdt, at))
        .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(name)));
    let rest = &dsdt[at..];
    let end = rest[4..]
        .windows(2)
        .position(|w| w == [0x5b, 0x82])
        .map_or(rest.len(), |p| p + 4);
    &rest[..end]
}

#[test]
fn every_segment_has_an_mcfg_entry_and_a_host_bridge() {
    let mut cfg = config(1, 1);
    cfg.pci_segments = layout::pci_segments(1 << 30, &[(1, 1), (1, 3), (2, 1)]).expect("3");
    let tables = build_tables(&cfg).expect("tables");
    let mcfg = &table(&tables, b"MCFG").bytes;
    // Header (36) + reserved (8), then 16-byte entries: base, segment, start bus, end bus.
    assert_eq!(mcfg.len(), 44 + 3 * 16);
    let entries: Vec<(u64, u16, u8, u8)> = (0..3)
        .map(|i| {
            let e = 44 + 16 * i;
            (
                u64_at(mcfg, e),
                u16_at(mcfg, e + 8),
                mcfg[e + 10],
                mcfg[e + 11],
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (0xe000_0000, 0, 0, 0xff),
            (0xf000_0000, 1, 0, 0),
            (0xf010_0000, 2, 0, 0)
        ]
    );

    let dsdt = &table(&tables, b"DSDT").bytes;
    // MBRD reserves each ECAM area: Memory32Fixed (0x86, length 9, writable) base, size.
    let mbrd = device_body(dsdt, b"MBRD");
    for s in &cfg.pci_segments {
        let mut fixed = vec![0x86, 0x09, 0x00, 0x01];
        fixed.extend_from_slice(&(s.ecam.0 as u32).to_le_bytes());
        fixed.extend_from_slice(&(s.ecam.1 as u32).to_le_bytes());
        assert!(
            mbrd.windows(fixed.len()).any(|w| w == fixed),
            "segment {}",
            s.segment
        );
    }
    for s in &cfg.pci_segments {
        let name = format!("PCI{:X}", s.segment);
        let body = device_body(dsdt, name.as_bytes().try_into().expect("4 bytes"));
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        // Name (_SEG, n) and Name (_UID, n): NameOp, the name, then the integer (0 and 1
        // are ZeroOp and OneOp, larger ones a BytePrefix).
        let int = |n: u16| match n {
            0 => vec![0x00],
            1 => vec![0x01],
            n => vec![0x0a, n as u8],
        };
        for object in [b"_SEG", b"_UID"] {
            let mut named = vec![0x08];
            named.extend_from_slice(object);
            named.extend(int(s.segment));
            assert!(has(&named), "{name} {}", String::from_utf8_lossy(object));
        }
        assert!(has(&[0x08, b'_', b'B', b'B', b'N', 0x00]), "{name} _BBN 0");
        // DWordMemory: min at +10, max at +14; QWordMemory: min at +14, max at +22.
        let dword = body
            .windows(4)
            .position(|w| w == [0x87, 0x17, 0x00, 0x00])
            .expect("32-bit window");
        assert_eq!(u64::from(u32_at(body, dword + 10)), s.mmio32.0, "{name}");
        assert_eq!(
            u64::from(u32_at(body, dword + 14)),
            s.mmio32.0 + s.mmio32.1 - 1
        );
        let qword = body
            .windows(4)
            .position(|w| w == [0x8a, 0x2b, 0x00, 0x00])
            .expect("64-bit window");
        assert_eq!(u64_at(body, qword + 14), s.mmio64.0, "{name}");
        assert_eq!(u64_at(body, qword + 22), s.mmio64.0 + s.mmio64.1 - 1);
        // Only segment 0 claims the configuration ports (IO descriptor 0x47 at 0xcf8).
        assert_eq!(has(&[0x47, 0x01, 0xf8, 0x0c]), s.segment == 0, "{name}");
    }
    assert!(!dsdt.windows(4).any(|w| w == b"PCI3"));
}

#[test]
fn placer_refuses_tables_past_the_area() {
    let mut placer = Placer::new();
    let len = usize::try_from(layout::ACPI_END - layout::ACPI_START).expect("fits");
    assert_eq!(
        placer.place(b"AAAA", len).expect("fits exactly"),
        layout::ACPI_START
    );
    let err = placer.place(b"BBBB", 1).expect_err("area is full");
    assert!(matches!(err, AcpiError::TableTooLarge { ref signature, .. } if signature == "BBBB"));
    assert!(err.to_string().contains("BBBB"), "{err}");
}

#[test]
fn create_writes_the_tables_to_guest_memory() {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let cfg = config(2, 8);
    let rsdp = create_acpi_tables(&mem, &cfg).expect("tables written");
    assert_eq!(rsdp, GuestAddress(layout::ACPI_START));
    for t in build_tables(&cfg).expect("tables") {
        let mut read = vec![0; t.bytes.len()];
        mem.read_slice(&mut read, t.addr).expect("read back");
        assert_eq!(read, t.bytes);
    }
}

#[test]
fn create_reports_the_failing_address() {
    // Memory ends inside the ACPI area: the RSDP fits, later tables do not.
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::ACPI_START as usize + 0x40)])
            .expect("guest memory");
    match create_acpi_tables(&mem, &config(1, 1)) {
        Err(AcpiError::GuestMemoryWrite { addr, .. }) => assert!(addr > layout::ACPI_START),
        other => panic!("expected a guest memory error, got {other:?}"),
    }
}

/// An AML integer as the `acpi_tables` crate emits it: `Zero`, `One`, or the smallest prefix.
fn aml_int(n: u32) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => [&[0x0b][..], &(n as u16).to_le_bytes()].concat(),
        _ => [&[0x0c][..], &n.to_le_bytes()].concat(),
    }
}

/// An absolute AML name path `\A.B.C...` (root prefix, then a multi-name prefix for three or more
/// segments).
fn aml_path(parts: &[&[u8; 4]]) -> Vec<u8> {
    let mut path = vec![b'\\'];
    match parts.len() {
        1 => {}
        2 => path.push(0x2e),
        n => path.extend([0x2f, n as u8]),
    }
    for part in parts {
        path.extend_from_slice(&part[..]);
    }
    path
}

#[test]
fn dsdt_has_the_pci_hotplug_controller_slots_and_event() {
    let mut cfg = config(1, 1);
    cfg.pci_segments = layout::pci_segments(1 << 30, &[(1, 1); 3]).expect("3");
    let tables = build_tables(&cfg).expect("tables");
    let dsdt = &table(&tables, b"DSDT").bytes;
    let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
    let has = |needle: &[u8]| count(needle) > 0;

    // PHPR claims its ports (IO descriptor: decode16, min, max, alignment 1, length 16) and
    // maps them as a SystemIO region of 16 bytes.
    let port = layout::PCI_HOTPLUG_PORT.to_le_bytes();
    assert!(has(b"PHPR"));
    assert!(has(&[
        0x47, 0x01, port[0], port[1], port[0], port[1], 0x01, 0x10
    ]));
    let mut region = vec![0x5b, 0x80];
    region.extend_from_slice(b"PCST");
    region.push(0x01); // SystemIO
    region.extend(aml_int(layout::PCI_HOTPLUG_PORT.into()));
    region.extend(aml_int(16));
    assert!(has(&region), "OperationRegion (PCST, SystemIO, 0x610, 16)");
    for name in [
        b"BLCK", b"PCIU", b"PCID", b"B0EJ", b"PSEG", b"PCEJ", b"PSCN",
    ] {
        assert!(has(name), "{}", String::from_utf8_lossy(name));
    }

    // Slots 1..=31 of every segment: the device and its Notify in DVNT; never slot 0.
    assert!(!has(b"S00_"));
    for slot in 1u8..32 {
        let name = format!("S{slot:02X}_");
        assert_eq!(count(name.as_bytes()), 2 * 3, "{name}");
        let mut adr = vec![0x08];
        adr.extend_from_slice(b"_ADR");
        adr.extend(aml_int(u32::from(slot) << 16));
        assert_eq!(count(&adr), 3, "{name} _ADR");
        let mut sun = vec![0x08];
        sun.extend_from_slice(b"_SUN");
        sun.extend(aml_int(slot.into()));
        assert_eq!(count(&sun), 3, "{name} _SUN");
    }
    // Every _EJ0 calls PCEJ (slot, segment).
    let pcej = aml_path(&[b"_SB_", b"PHPR", b"PCEJ"]);
    // (And the one processor's _EJ0.)
    assert_eq!(count(b"_EJ0"), 3 * 31 + 1);
    for segment in 0u32..3 {
        for slot in [1u32, 31] {
            let call = [pcej.clone(), aml_int(slot), aml_int(segment)].concat();
            assert!(has(&call), "PCEJ ({slot}, {segment})");
        }
        // PCNT selects its segment: Store (n, \_SB_.PHPR.PSEG); PSCN calls it.
        let pseg = aml_path(&[b"_SB_", b"PHPR", b"PSEG"]);
        assert!(has(&[vec![0x70], aml_int(segment), pseg].concat()));
        let host = format!("PCI{segment:X}");
        let host: &[u8; 4] = host.as_bytes().try_into().expect("4 bytes");
        assert!(has(&aml_path(&[b"_SB_", host, b"PCNT"])), "PSCN calls PCNT");
    }
    assert_eq!(
        count(b"DVNT"),
        3 * 3,
        "one DVNT and two calls per host bridge"
    );
    assert_eq!(
        count(b"PCNT"),
        3 * 2,
        "one PCNT and one call per host bridge"
    );

    // _EVT: If (And (Local0, GED_EVENT_PCI_HOTPLUG)) { \_SB_.PHPR.PSCN () }.
    let test = [vec![0x7b, 0x60], aml_int(GED_EVENT_PCI_HOTPLUG), vec![0x00]].concat();
    let evt = dsdt.windows(4).position(|w| w == b"_EVT").expect("_EVT");
    let evt = &dsdt[evt..];
    let at = evt
        .windows(test.len())
        .position(|w| w == test)
        .expect("hotplug bit test");
    let pscn = aml_path(&[b"_SB_", b"PHPR", b"PSCN"]);
    assert_eq!(
        &evt[at + test.len()..at + test.len() + pscn.len()],
        &pscn[..]
    );
    assert_eq!(GED_EVENT_PCI_HOTPLUG, 1 << 1);
}

#[test]
fn dsdt_has_the_cpu_hotplug_controller_processors_and_event() {
    let cfg = config(2, 5);
    let tables = build_tables(&cfg).expect("tables");
    let dsdt = &table(&tables, b"DSDT").bytes;
    let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
    let has = |needle: &[u8]| count(needle) > 0;

    // CPHP claims its ports and maps them as a SystemIO region of 16 bytes.
    let port = layout::CPU_HOTPLUG_PORT.to_le_bytes();
    assert!(has(b"CPHP"));
    assert!(has(&[
        0x47, 0x01, port[0], port[1], port[0], port[1], 0x01, 0x10
    ]));
    let mut region = vec![0x5b, 0x80];
    region.extend_from_slice(b"CPST");
    region.push(0x01); // SystemIO
    region.extend(aml_int(layout::CPU_HOTPLUG_PORT.into()));
    region.extend(aml_int(16));
    assert!(has(&region), "OperationRegion (CPST, SystemIO, 0x620, 16)");
    for name in [
        b"CLCK", b"CSEL", b"CPEN", b"CINS", b"CRMV", b"CEJ0", b"CCNT", b"CTFY", b"CSCN",
    ] {
        assert!(has(name), "{}", String::from_utf8_lossy(name));
    }

    // Every processor: _STA and _MAT call CSTA (cpu), _EJ0 calls CEJT (cpu); CTFY notifies it.
    let csta = aml_path(&[b"_SB_", b"CPHP", b"CSTA"]);
    let cejt = aml_path(&[b"_SB_", b"CPHP", b"CEJT"]);
    for cpu in 0u8..5 {
        let arg = aml_int(cpu.into());
        assert_eq!(
            count(&[csta.clone(), arg.clone()].concat()),
            2,
            "CP{cpu:02X}"
        );
        assert!(has(&[cejt.clone(), arg].concat()), "CP{cpu:02X} _EJ0");
        let name = format!("CP{cpu:02X}");
        let name: &[u8; 4] = name.as_bytes().try_into().expect("4 bytes");
        // Notify (\_SB_.CPxx, Arg1)
        assert!(has(
            &[vec![0x86], aml_path(&[b"_SB_", name]), vec![0x69]].concat()
        ));
        // _MAT's two answers: the MADT entry enabled and online-capable.
        for flags in [1u8, 2] {
            assert!(
                has(&[0x00, 0x08, cpu, cpu, flags, 0, 0, 0]),
                "{cpu} {flags}"
            );
        }
    }
    assert!(!has(b"CP05"));

    // _EVT: If (And (Local0, GED_EVENT_CPU_HOTPLUG)) { \_SB_.CPHP.CSCN () }.
    let test = [vec![0x7b, 0x60], aml_int(GED_EVENT_CPU_HOTPLUG), vec![0x00]].concat();
    let evt = dsdt.windows(4).position(|w| w == b"_EVT").expect("_EVT");
    let evt = &dsdt[evt..];
    let at = evt
        .windows(test.len())
        .position(|w| w == test)
        .expect("CPU hotplug bit test");
    let cscn = aml_path(&[b"_SB_", b"CPHP", b"CSCN"]);
    assert_eq!(
        &evt[at + test.len()..at + test.len() + cscn.len()],
        &cscn[..]
    );
    assert_eq!(GED_EVENT_CPU_HOTPLUG, 1 << 2);
}

#[test]
fn memory_hotplug_objects_come_with_their_slots() {
    let dsdt = |slots: u8| {
        let cfg = AcpiConfig {
            memory_hotplug_slots: slots,
            ..config(1, 1)
        };
        table(&build_tables(&cfg).expect("tables"), b"DSDT")
            .bytes
            .clone()
    };
    let has = |aml: &[u8], what: &[u8]| aml.windows(what.len()).any(|w| w == what);
    let off = dsdt(0);
    assert!(!has(&off, b"MHPC") && !has(&off, b"M000"));
    let on = dsdt(layout::MEMORY_HOTPLUG_SLOTS);
    assert!(has(&on, b"MHPC") && has(&on, b"MSCN") && has(&on, b"MCRS"));
    assert!(has(&on, b"M007") && !has(&on, b"M008"));
    // _EVT: If (And (Local0, GED_EVENT_MEMORY_HOTPLUG)) { \_SB_.MHPC.MSCN () }.
    let test = [
        vec![0x7b, 0x60],
        aml_int(GED_EVENT_MEMORY_HOTPLUG),
        vec![0x00],
    ]
    .concat();
    let evt = on.windows(4).position(|w| w == b"_EVT").expect("_EVT");
    let evt = &on[evt..];
    let at = evt
        .windows(test.len())
        .position(|w| w == test)
        .expect("memory hotplug bit test");
    let mscn = aml_path(&[b"_SB_", b"MHPC", b"MSCN"]);
    assert_eq!(
        &evt[at + test.len()..at + test.len() + mscn.len()],
        &mscn[..]
    );
    assert_eq!(GED_EVENT_MEMORY_HOTPLUG, 1 << 3);
}
