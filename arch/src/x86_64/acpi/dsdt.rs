//! DSDT: the AML namespace of the machine.
//!
//! ```text
//! \_S5_                 soft-off package { ACPI_S5_SLP_TYP, 0, 0, 0 }
//! \_SB_.COM1            16550 UART (PNP0501)
//! \_SB_.RTC_            CMOS RTC (PNP0B00)
//! \_SB_.MBRD            motherboard resources (PNP0C02): reserves every segment's ECAM area
//! \_SB_.PHPR            PCI hotplug controller (PNP0A06), owns the ports at PCI_HOTPLUG_PORT
//! \_SB_.PHPR.BLCK         mutex serializing every access to the registers below
//! \_SB_.PHPR.PCIU         slots added to the selected segment (read clears)
//! \_SB_.PHPR.PCID         slots of the selected segment to eject (read clears)
//! \_SB_.PHPR.B0EJ         write: slots of the selected segment the guest ejected
//! \_SB_.PHPR.PSEG         the selected segment
//! \_SB_.PHPR.PCEJ(s, n)   ejects slot s of segment n (called by the slots' _EJ0)
//! \_SB_.PHPR.PSCN()       runs every PCIn.PCNT (called by the GED on a hotplug event)
//! \_SB_.CPHP            CPU hotplug controller (PNP0A06), owns the ports at CPU_HOTPLUG_PORT
//! \_SB_.CPHP.CLCK         mutex serializing every access to the registers below
//! \_SB_.CPHP.CSEL         the selected CPU
//! \_SB_.CPHP.CPEN         the selected CPU is enabled
//! \_SB_.CPHP.CINS         an insert event is pending (write 1 to acknowledge)
//! \_SB_.CPHP.CRMV         a remove event is pending (write 1 to acknowledge)
//! \_SB_.CPHP.CEJ0         write 1: eject the selected CPU
//! \_SB_.CPHP.CSTA(c)      _STA of CPU c: 0xF if enabled, else 0
//! \_SB_.CPHP.CEJT(c)      ejects CPU c (called by the processors' _EJ0)
//! \_SB_.CPHP.CTFY(c, v)   notifies v to processor c
//! \_SB_.CPHP.CSCN()       notifies inserted (1) and to-be-removed (3) CPUs, acknowledging
//!                         each event (called by the GED on a CPU hotplug event)
//! \_SB_.PCI0            PCIe host bridge (PNP0A08) of segment 0, ECAM described by the MCFG
//! \_SB_.PCIn            the host bridge of segment n (1..=F), when there are more segments
//! \_SB_.PCIn.Sss          hotplug slot ss (01..=1F) of bus 0: _ADR, _SUN, _EJ0
//! \_SB_.PCIn.DVNT(b, v)   notifies v to every slot whose bit is set in b
//! \_SB_.PCIn.PCNT()       selects segment n, notifies added (1) then removed (3) slots
//! \_SB_.MHPC, \_SB_.Mnnn memory hotplug controller and memory devices (PNP0C80), with
//!                       memory hotplug (see `memory_hotplug`)
//! \_SB_.PWRB            power button (PNP0C0C)
//! \_SB_.GED_            Generic Event Device (ACPI0013), notifies PWRB, calls PHPR.PSCN and
//!                       CPHP.CSCN (and MHPC.MSCN with memory hotplug)
//! \_SB_.CPxx            processors (ACPI0007), _UID = vCPU index = MADT processor UID;
//!                       _STA and _MAT from CPHP (the MADT entry, enabled while the CPU is),
//!                       _EJ0 calls CPHP.CEJT
//! ```

use acpi_tables::aml::{
    Acquire, Add, AddressSpace, AddressSpaceCacheable, And, Arg, BufferData, CreateDWordField,
    Device, EISAName, Else, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, LessThan, Local, Memory32Fixed, Method, MethodCall, Mutex,
    Name, NotEqual, Notify, OpRegion, OpRegionSpace, Or, Package, Path, Release, ResourceTemplate,
    Return, Scope, ShiftLeft, Store, Uuid, While, IO, ONE, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::{
    layout, madt, memory_hotplug, AcpiConfig, AcpiError, GED_EVENT_CPU_HOTPLUG,
    GED_EVENT_MEMORY_HOTPLUG, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, OEM_ID, OEM_REVISION,
    OEM_TABLE_ID,
};
use layout::PciSegmentLayout;

/// DSDT revision 2 and up evaluates integers as 64 bits (the 64-bit MMIO window needs them).
const DSDT_REVISION: u8 = 2;

/// Number of COM1 I/O ports.
const COM1_PORT_COUNT: u8 = 8;
/// Number of CMOS RTC I/O ports (index, data).
const CMOS_PORT_COUNT: u8 = 2;
/// PCI configuration mechanism #1 ports (`CONFIG_ADDRESS` at 0xcf8, `CONFIG_DATA` at 0xcfc).
const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Number of PCI configuration mechanism #1 ports.
const PCI_CONFIG_PORT_COUNT: u8 = 8;
/// First I/O port after the PCI configuration ports.
const PCI_CONFIG_PORT_END: u16 = PCI_CONFIG_PORT + PCI_CONFIG_PORT_COUNT as u16;
/// Size in bytes of the GED event register.
const GED_REGISTER_LEN: u8 = 4;

/// `_STA`: present, enabled, shown in UI, functioning.
const STA_PRESENT: u8 = 0x0f;
/// `_STA`: not present.
const STA_ABSENT: u8 = 0x00;
/// `Notify` value that reports a power button press to the PNP0C0C driver.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// `Notify` value "device check": rescan below this object (a slot gained a device).
const NOTIFY_DEVICE_CHECK: u8 = 0x01;
/// `Notify` value "eject request": the slot's device is to be removed.
const NOTIFY_EJECT_REQUEST: u8 = 0x03;
/// Hotplug slots of a root bus: devices 1..32 (device 0 is the host bridge itself).
const HOTPLUG_SLOTS: std::ops::Range<u8> = 1..32;
/// `Acquire` timeout that waits forever.
const ACQUIRE_FOREVER: u16 = 0xffff;
/// The PCI hotplug register block is 16 bytes (four 32-bit registers).
const PCI_HOTPLUG_REGION_LEN: u8 = {
    assert!(layout::PCI_HOTPLUG_PORT_LEN == 16);
    layout::PCI_HOTPLUG_PORT_LEN as u8
};

/// The CPU hotplug register block is 16 bytes (four 32-bit registers).
const CPU_HOTPLUG_REGION_LEN: u8 = {
    assert!(layout::CPU_HOTPLUG_PORT_LEN == 16);
    layout::CPU_HOTPLUG_PORT_LEN as u8
};

/// `_OSC` UUID of PCI / PCIe host bridges (PCI Firmware Specification 3.3, 4.5.1).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33db4d5b-1ff7-401c-9657-7441c03dd766";
/// `_OSC` status bit: unrecognized UUID.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
/// `_OSC` status bit: unrecognized revision.
const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;

const _: () = assert!(
    layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE <= 1 << 32
        && layout::PCI_ECAM_EXTRA_START
            + layout::PCI_ECAM_BUS_SIZE * (layout::MAX_PCI_SEGMENTS as u64 - 1)
            <= layout::IOAPIC_START,
    "every ECAM area must lie below 4 GiB"
);

/// Already-serialized AML spliced into a builder object.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
}

/// Builds the DSDT. `cfg` must be validated.
pub(super) fn build(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut sb = Vec::new();
    com1(&mut sb);
    rtc(&mut sb);
    motherboard_resources(cfg, &mut sb);
    pci_hotplug_controller(cfg, &mut sb);
    cpu_hotplug_controller(cfg, &mut sb);
    for segment in &cfg.pci_segments {
        let mut slots = Vec::new();
        hotplug_slots(segment.segment, &mut slots);
        host_bridge(segment, &[&RawAml(&slots)], &mut sb)?;
    }
    memory_hotplug::build(cfg.memory_hotplug_slots, &mut sb);
    power_button(&mut sb);
    ged(&mut sb, cfg.memory_hotplug_slots > 0);
    cpus(cfg, &mut sb);

    let mut aml = Vec::new();
    s5(&mut aml);
    Scope::new("\\_SB_".into(), vec![&RawAml(&sb)]).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    Ok(dsdt.as_slice().to_vec())
}

/// `\_S5_`: the SLP_TYP a guest writes to the sleep control register to power off.
fn s5(sink: &mut dyn AmlSink) {
    let slp_typ = layout::ACPI_S5_SLP_TYP;
    let package = Package::new(vec![&slp_typ, &ZERO, &ZERO, &ZERO]);
    Name::new("\\_S5_".into(), &package).to_aml_bytes(sink);
}

fn com1(sink: &mut dyn AmlSink) {
    let ports = IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, COM1_PORT_COUNT);
    let irq = Interrupt::new(true, true, false, false, layout::COM1_GSI);
    let crs = ResourceTemplate::new(vec![&ports, &irq]);
    Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// The CMOS RTC. No IRQ: the RTC raises no interrupts, and rtc-cmos works without one.
fn rtc(sink: &mut dyn AmlSink) {
    let ports = IO::new(layout::CMOS_PORT, layout::CMOS_PORT, 1, CMOS_PORT_COUNT);
    let crs = ResourceTemplate::new(vec![&ports]);
    Device::new(
        "RTC_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0B00")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// Motherboard resources: Linux only trusts an MCFG entry's ECAM area if it is reserved, either
/// in the E820 map or by a PNP0C02 device like this one. `cfg` must be validated.
fn motherboard_resources(cfg: &AcpiConfig, sink: &mut dyn AmlSink) {
    // Every ECAM area is below 4 GiB (asserted above), so the casts cannot truncate.
    let areas: Vec<Memory32Fixed> = cfg
        .pci_segments
        .iter()
        .map(|s| Memory32Fixed::new(true, s.ecam.0 as u32, s.ecam.1 as u32))
        .collect();
    let crs = ResourceTemplate::new(areas.iter().map(|a| a as &dyn Aml).collect());
    Device::new(
        "MBRD".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.PHPR`: the PCI hotplug controller, the AML side of the register block at
/// [`layout::PCI_HOTPLUG_PORT`]. Every access to the registers holds `BLCK`, as `PSEG` selects
/// what the others address.
fn pci_hotplug_controller(cfg: &AcpiConfig, sink: &mut dyn AmlSink) {
    let port = layout::PCI_HOTPLUG_PORT;
    let ports = IO::new(port, port, 1, PCI_HOTPLUG_REGION_LEN);
    let crs = ResourceTemplate::new(vec![&ports]);
    let region = OpRegion::new(
        "PCST".into(),
        OpRegionSpace::SystemIO,
        &port,
        &PCI_HOTPLUG_REGION_LEN,
    );
    let field = Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    let lock = Mutex::new("BLCK".into(), 0);

    // PCEJ (slot, segment): B0EJ = 1 << slot in that segment.
    let acquire = Acquire::new("BLCK".into(), ACQUIRE_FOREVER);
    let (pseg, b0ej) = (Path::new("PSEG"), Path::new("B0EJ"));
    let select = Store::new(&pseg, &Arg(1));
    let eject = ShiftLeft::new(&b0ej, &ONE, &Arg(0));
    let release = Release::new("BLCK".into());
    let pcej = Method::new(
        "PCEJ".into(),
        2,
        false,
        vec![&acquire, &select, &eject, &release],
    );

    // PSCN (): every host bridge checks its slots.
    let calls: Vec<MethodCall> = cfg
        .pci_segments
        .iter()
        .map(|s| {
            MethodCall::new(
                format!("\\_SB_.PCI{:X}.PCNT", s.segment).as_str().into(),
                vec![],
            )
        })
        .collect();
    let pscn = Method::new(
        "PSCN".into(),
        0,
        false,
        calls.iter().map(|c| c as &dyn Aml).collect(),
    );

    Device::new(
        "PHPR".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A06")),
            &Name::new("_UID".into(), &"PCI hotplug"),
            &Name::new("_CRS".into(), &crs),
            &lock,
            &region,
            &field,
            &pcej,
            &pscn,
        ],
    )
    .to_aml_bytes(sink);
}

/// The hotplug objects inside `\_SB_.PCIn` for segment `n`: the slot devices `S01`..`S1F`,
/// `DVNT` and `PCNT`.
fn hotplug_slots(n: u16, sink: &mut dyn AmlSink) {
    let names: Vec<String> = HOTPLUG_SLOTS.map(|slot| format!("S{slot:02X}_")).collect();
    for (slot, name) in HOTPLUG_SLOTS.zip(&names) {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let pcej = MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&slot, &n]);
        Device::new(
            name.as_str().into(),
            vec![
                &Name::new("_ADR".into(), &adr),
                &Name::new("_SUN".into(), &sun),
                &Method::new("_EJ0".into(), 1, false, vec![&pcej]),
            ],
        )
        .to_aml_bytes(sink);
    }

    // DVNT (bitmap, value): Notify (Sss, value) for every slot ss whose bit is set.
    let masks: Vec<u32> = HOTPLUG_SLOTS.map(|slot| 1u32 << slot).collect();
    let paths: Vec<Path> = names.iter().map(|name| Path::new(name)).collect();
    let tests: Vec<And> = masks
        .iter()
        .map(|mask| And::new(&ZERO, &Arg(0), mask))
        .collect();
    let notifies: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &Arg(1))).collect();
    let ifs: Vec<If> = tests
        .iter()
        .zip(&notifies)
        .map(|(test, notify)| If::new(test, vec![notify]))
        .collect();
    Method::new(
        "DVNT".into(),
        2,
        false,
        ifs.iter().map(|i| i as &dyn Aml).collect(),
    )
    .to_aml_bytes(sink);

    // PCNT (): with the controller locked, select segment n and notify its added, then its
    // removed slots (each register read once: reading clears it).
    let acquire = Acquire::new("\\_SB_.PHPR.BLCK".into(), ACQUIRE_FOREVER);
    let pseg = Path::new("\\_SB_.PHPR.PSEG");
    let pciu = Path::new("\\_SB_.PHPR.PCIU");
    let pcid = Path::new("\\_SB_.PHPR.PCID");
    let select = Store::new(&pseg, &n);
    let added = Local(0);
    let removed = Local(1);
    let read_added = Store::new(&added, &pciu);
    let read_removed = Store::new(&removed, &pcid);
    let check = MethodCall::new("DVNT".into(), vec![&added, &NOTIFY_DEVICE_CHECK]);
    let eject = MethodCall::new("DVNT".into(), vec![&removed, &NOTIFY_EJECT_REQUEST]);
    let release = Release::new("\\_SB_.PHPR.BLCK".into());
    Method::new(
        "PCNT".into(),
        0,
        false,
        vec![
            &acquire,
            &select,
            &read_added,
            &read_removed,
            &check,
            &eject,
            &release,
        ],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.PCIn`, the PCIe host bridge of segment `n` (`_SEG`), buses `0..=last_bus` (`_BBN`
/// 0), with the segment's own 32-bit and 64-bit windows; segment 0 also has the configuration
/// ports 0xcf8 and the I/O space.
///
/// `children` are emitted inside the device, after its own objects: this is where PCI devices
/// (`Device` objects with `_ADR`) and an interrupt routing table (`_PRT`) go.
fn host_bridge(
    segment: &PciSegmentLayout,
    children: &[&dyn Aml],
    sink: &mut dyn AmlSink,
) -> Result<(), AcpiError> {
    let buses = AddressSpace::<u16>::new_bus_number(0, segment.last_bus.into());
    let config_ports = IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_COUNT);
    let io_below = AddressSpace::<u16>::new_io(0, PCI_CONFIG_PORT - 1, None);
    let io_above = AddressSpace::<u16>::new_io(PCI_CONFIG_PORT_END, u16::MAX, None);
    let mut resources: Vec<&dyn Aml> = vec![&buses];
    if segment.segment == 0 {
        resources.extend([&config_ports as &dyn Aml, &io_below, &io_above]);
    }

    let mmio32 = mmio32_window(segment.mmio32)?;
    if let Some(window) = &mmio32 {
        resources.push(window);
    }
    let mmio64 = mmio64_window(segment.mmio64)?;
    if let Some(window) = &mmio64 {
        resources.push(window);
    }
    let crs = ResourceTemplate::new(resources);

    let mut osc = Vec::new();
    host_bridge_osc(&mut osc);
    let osc = RawAml(&osc);

    let mut objects: Vec<&dyn Aml> = Vec::new();
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let number = segment.segment;
    let uid = Name::new("_UID".into(), &number);
    let seg = Name::new("_SEG".into(), &number);
    let bbn = Name::new("_BBN".into(), &ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    objects.extend([&hid as &dyn Aml, &cid, &uid, &seg, &bbn, &crs, &osc]);
    objects.extend_from_slice(children);
    let name = format!("PCI{number:X}");
    Device::new(name.as_str().into(), objects).to_aml_bytes(sink);
    Ok(())
}

fn mmio32_window((start, size): (u64, u64)) -> Result<Option<AddressSpace<u32>>, AcpiError> {
    if size == 0 {
        return Ok(None);
    }
    let invalid = || AcpiError::InvalidPciWindow {
        window: "32-bit",
        start,
        size,
    };
    let first = u32::try_from(start).map_err(|_| invalid())?;
    let last = super::window_last(start, size)
        .and_then(|last| u32::try_from(last).ok())
        .ok_or_else(invalid)?;
    Ok(Some(AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        first,
        last,
        None,
    )))
}

fn mmio64_window((start, size): (u64, u64)) -> Result<Option<AddressSpace<u64>>, AcpiError> {
    if size == 0 {
        return Ok(None);
    }
    let last = super::window_last(start, size).ok_or(AcpiError::InvalidPciWindow {
        window: "64-bit",
        start,
        size,
    })?;
    // Not prefetchable, so that non-prefetchable 64-bit BARs may be placed here too.
    Ok(Some(AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        start,
        last,
        None,
    )))
}

/// `PCIn._OSC`: grants the OS every control it asks for (there is no firmware to keep any),
/// by returning the capabilities buffer unchanged. Unknown UUIDs and revisions are flagged.
fn host_bridge_osc(sink: &mut dyn AmlSink) {
    let cdw1 = Path::new("CDW1");
    let capabilities = Arg(3);
    let create_cdw1 = CreateDWordField::new(&cdw1, &capabilities, &ZERO);

    let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let unknown_uuid = NotEqual::new(&Arg(0), &uuid);
    let flag_uuid = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let unknown_revision = NotEqual::new(&Arg(1), &ONE);
    let flag_revision = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let check_revision = If::new(&unknown_revision, vec![&flag_revision]);

    Method::new(
        "_OSC".into(),
        4,
        false,
        vec![
            &create_cdw1,
            &If::new(&unknown_uuid, vec![&flag_uuid]),
            &Else::new(vec![&check_revision]),
            &Return::new(&capabilities),
        ],
    )
    .to_aml_bytes(sink);
}

fn power_button(sink: &mut dyn AmlSink) {
    Device::new(
        "PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &ZERO),
        ],
    )
    .to_aml_bytes(sink);
}

/// The Generic Event Device: on its interrupt the OS runs `_EVT`, which reads the event register
/// once, notifies the power button if [`GED_EVENT_POWER_BUTTON`] is set and rescans the PCI
/// hotplug slots (`\_SB_.PHPR.PSCN`) if [`GED_EVENT_PCI_HOTPLUG`] is set, looks at the CPUs
/// (`\_SB_.CPHP.CSCN`) if [`GED_EVENT_CPU_HOTPLUG`] is set and, with `memory_hotplug`, scans
/// the memory devices (`\_SB_.MHPC.MSCN`) if [`GED_EVENT_MEMORY_HOTPLUG`] is set.
fn ged(sink: &mut dyn AmlSink, memory_hotplug: bool) {
    // Level, active high, exclusive: matches the MADT override of the GED's IRQ.
    let irq = Interrupt::new(true, false, false, false, layout::ACPI_GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);

    let port = layout::ACPI_GED_PORT;
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemIO,
        &port,
        &GED_REGISTER_LEN,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );

    let events = Local(0);
    let register = Path::new("GDAT");
    let read = Store::new(&events, &register);
    let pressed = And::new(&ZERO, &events, &GED_EVENT_POWER_BUTTON);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &NOTIFY_BUTTON_PRESSED);
    let on_press = If::new(&pressed, vec![&notify]);
    let hotplug = And::new(&ZERO, &events, &GED_EVENT_PCI_HOTPLUG);
    let rescan = MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    let on_hotplug = If::new(&hotplug, vec![&rescan]);
    let cpu_hotplug = And::new(&ZERO, &events, &GED_EVENT_CPU_HOTPLUG);
    let cpu_scan = MethodCall::new("\\_SB_.CPHP.CSCN".into(), vec![]);
    let on_cpu_hotplug = If::new(&cpu_hotplug, vec![&cpu_scan]);
    let memory = And::new(&ZERO, &events, &GED_EVENT_MEMORY_HOTPLUG);
    let scan_memory = MethodCall::new("\\_SB_.MHPC.MSCN".into(), vec![]);
    let on_memory = If::new(&memory, vec![&scan_memory]);
    let mut body: Vec<&dyn Aml> = vec![&read, &on_press, &on_hotplug, &on_cpu_hotplug];
    if memory_hotplug {
        body.push(&on_memory);
    }
    let evt = Method::new("_EVT".into(), 1, true, body);

    Device::new(
        "GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &ZERO),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(sink);
}

/// `\_SB_.CPHP`: the CPU hotplug controller, the AML side of the register block at
/// [`layout::CPU_HOTPLUG_PORT`]. Every access to the registers holds `CLCK`, as `CSEL` selects
/// what the others address.
fn cpu_hotplug_controller(cfg: &AcpiConfig, sink: &mut dyn AmlSink) {
    let port = layout::CPU_HOTPLUG_PORT;
    let ports = IO::new(port, port, 1, CPU_HOTPLUG_REGION_LEN);
    let crs = ResourceTemplate::new(vec![&ports]);
    let region = OpRegion::new(
        "CPST".into(),
        OpRegionSpace::SystemIO,
        &port,
        &CPU_HOTPLUG_REGION_LEN,
    );
    // CSTA's bits (devices::cpu_hotplug): 0 enabled, 1 inserting, 2 removing, 3 eject.
    let field = Field::new(
        "CPST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"CSEL", 32),
            FieldEntry::Named(*b"CPEN", 1),
            FieldEntry::Named(*b"CINS", 1),
            FieldEntry::Named(*b"CRMV", 1),
            FieldEntry::Named(*b"CEJ0", 1),
            FieldEntry::Reserved(28),
            FieldEntry::Named(*b"CCNT", 32),
        ],
    );
    let lock = Mutex::new("CLCK".into(), 0);
    let acquire = Acquire::new("CLCK".into(), ACQUIRE_FOREVER);
    let release = Release::new("CLCK".into());
    let (csel, cpen, cins, crmv, cej0) = (
        Path::new("CSEL"),
        Path::new("CPEN"),
        Path::new("CINS"),
        Path::new("CRMV"),
        Path::new("CEJ0"),
    );
    let select = Store::new(&csel, &Arg(0));

    // CSTA (cpu): 0xF if the CPU is enabled, else 0.
    let status = Local(0);
    let absent = Store::new(&status, &STA_ABSENT);
    let present = Store::new(&status, &STA_PRESENT);
    let enabled = Equal::new(&cpen, &ONE);
    let if_enabled = If::new(&enabled, vec![&present]);
    let ret = Return::new(&status);
    let csta = Method::new(
        "CSTA".into(),
        1,
        false,
        vec![&acquire, &select, &absent, &if_enabled, &release, &ret],
    );

    // CEJT (cpu): eject it.
    let eject = Store::new(&cej0, &ONE);
    let cejt = Method::new(
        "CEJT".into(),
        1,
        false,
        vec![&acquire, &select, &eject, &release],
    );

    // CTFY (cpu, value): Notify (CPxx, value) for that CPU.
    let paths: Vec<Path> = (0..cfg.max_cpus)
        .map(|cpu| Path::new(&format!("\\_SB_.{}", cpu_name(cpu))))
        .collect();
    let numbers: Vec<u8> = (0..cfg.max_cpus).collect();
    let tests: Vec<Equal> = numbers.iter().map(|n| Equal::new(&Arg(0), n)).collect();
    let notifies: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &Arg(1))).collect();
    let ifs: Vec<If> = tests
        .iter()
        .zip(&notifies)
        .map(|(test, notify)| If::new(test, vec![notify]))
        .collect();
    let ctfy = Method::new(
        "CTFY".into(),
        2,
        false,
        ifs.iter().map(|i| i as &dyn Aml).collect(),
    );

    // CSCN (): for every CPU, notify an insertion (device check) or a removal request (eject
    // request), then acknowledge it.
    let cpu = Local(0);
    let first = Store::new(&cpu, &ZERO);
    let max_cpus = cfg.max_cpus;
    let more = LessThan::new(&cpu, &max_cpus);
    let select_cpu = Store::new(&csel, &cpu);
    let inserting = Equal::new(&cins, &ONE);
    let check = MethodCall::new("CTFY".into(), vec![&cpu, &NOTIFY_DEVICE_CHECK]);
    let ack_insert = Store::new(&cins, &ONE);
    let on_insert = If::new(&inserting, vec![&check, &ack_insert]);
    let removing = Equal::new(&crmv, &ONE);
    let eject_request = MethodCall::new("CTFY".into(), vec![&cpu, &NOTIFY_EJECT_REQUEST]);
    let ack_remove = Store::new(&crmv, &ONE);
    let on_remove = If::new(&removing, vec![&eject_request, &ack_remove]);
    let next = Add::new(&cpu, &cpu, &ONE);
    let each = While::new(&more, vec![&select_cpu, &on_insert, &on_remove, &next]);
    let cscn = Method::new(
        "CSCN".into(),
        0,
        false,
        vec![&acquire, &first, &each, &release],
    );

    Device::new(
        "CPHP".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A06")),
            &Name::new("_UID".into(), &"CPU hotplug"),
            &Name::new("_CRS".into(), &crs),
            &lock,
            &region,
            &field,
            &csta,
            &cejt,
            &ctfy,
            &cscn,
        ],
    )
    .to_aml_bytes(sink);
}

/// The name of processor device `cpu` in `\_SB_`.
fn cpu_name(cpu: u8) -> String {
    format!("CP{cpu:02X}")
}

/// One processor device per possible vCPU, its status read from the CPU hotplug controller:
/// `_STA`, `_MAT` (its MADT Local APIC entry, enabled while the CPU is) and `_EJ0`.
fn cpus(cfg: &AcpiConfig, sink: &mut dyn AmlSink) {
    for cpu in 0..cfg.max_cpus {
        let name = cpu_name(cpu);
        let status = MethodCall::new("\\_SB_.CPHP.CSTA".into(), vec![&cpu]);
        let sta = Return::new(&status);
        let enabled = BufferData::new(madt::local_apic(cfg, cpu, true));
        let disabled = BufferData::new(madt::local_apic(cfg, cpu, false));
        let is_enabled = Equal::new(&status, &STA_PRESENT);
        let ret_enabled = Return::new(&enabled);
        let ret_disabled = Return::new(&disabled);
        let if_enabled = If::new(&is_enabled, vec![&ret_enabled]);
        let mat: Vec<&dyn Aml> = vec![&if_enabled, &ret_disabled];
        let eject = MethodCall::new("\\_SB_.CPHP.CEJT".into(), vec![&cpu]);
        Device::new(
            name.as_str().into(),
            vec![
                &Name::new("_HID".into(), &"ACPI0007"),
                &Name::new("_UID".into(), &cpu),
                &Method::new("_STA".into(), 0, false, vec![&sta]),
                &Method::new("_MAT".into(), 0, false, mat),
                &Method::new("_EJ0".into(), 1, false, vec![&eject]),
            ],
        )
        .to_aml_bytes(sink);
    }
}
