//! The DSDT's memory hotplug objects, the AML side of the register block at
//! [`layout::MEMORY_HOTPLUG_PORT`] (`devices::memory_hotplug` in the VMM):
//!
//! ```text
//! \_SB_.MHPC            memory hotplug controller (PNP0A06), owns the ports
//! \_SB_.MHPC.MLCK         mutex serializing every access to the registers below
//! \_SB_.MHPC.MSEL         the selected slot
//! \_SB_.MHPC.MSTS         its status: bit 0 enabled, bit 1 insert pending (write 1: acknowledge)
//! \_SB_.MHPC.MBAS         its base (64-bit)
//! \_SB_.MHPC.MLEN         its length (64-bit)
//! \_SB_.MHPC.MSTA(n)      _STA of slot n: 0xF when enabled, else 0
//! \_SB_.MHPC.MCRS(n)      _CRS of slot n: one QWordMemory range filled from MBAS and MLEN
//! \_SB_.MHPC.MSCN()       notifies every slot with an insert pending (1, device check) and
//!                         acknowledges it (called by the GED on a memory hotplug event)
//! \_SB_.Mnnn            memory device n (PNP0C80, _UID n): _STA and _CRS call the above
//! ```

use acpi_tables::aml::{
    Acquire, Add, AddressSpace, AddressSpaceCacheable, And, Arg, CreateQWordField, Device,
    EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Local,
    Method, MethodCall, Mutex, Name, Notify, OpRegion, OpRegionSpace, Path, Release,
    ResourceTemplate, Return, Store, Subtract, IO, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::layout;

/// `Acquire` timeout that waits forever.
const ACQUIRE_FOREVER: u16 = 0xffff;
/// `_STA` of a slot holding RAM: present, enabled, shown in UI, functioning.
const STA_PRESENT: u8 = 0x0f;
/// `MSTS` bit: enabled (`devices::memory_hotplug::STATUS_ENABLED`).
const STATUS_ENABLED: u8 = 1 << 0;
/// `MSTS` bit: insert pending; writing it acknowledges (`devices::memory_hotplug::STATUS_INSERTING`).
const STATUS_INSERTING: u8 = 1 << 1;
/// `Notify` value "device check": the OS evaluates `_STA` and adds the memory.
const NOTIFY_DEVICE_CHECK: u8 = 0x01;
/// The register block's length (24 bytes).
const REGION_LEN: u8 = {
    assert!(layout::MEMORY_HOTPLUG_PORT_LEN == 0x18);
    layout::MEMORY_HOTPLUG_PORT_LEN as u8
};
/// Byte offsets in a QWord address space descriptor of its minimum, maximum and length.
const QWORD_MIN: u8 = 14;
const QWORD_MAX: u8 = 22;
const QWORD_LEN: u8 = 38;

/// The name of memory device `n`.
fn device_name(n: u8) -> String {
    format!("M{n:03X}")
}

/// Appends `\_SB_.MHPC` and the `slots` memory devices (nothing when `slots` is 0) to `sink`,
/// which is the body of `\_SB_`.
pub(super) fn build(slots: u8, sink: &mut dyn AmlSink) {
    if slots == 0 {
        return;
    }
    controller(slots, sink);
    for n in 0..slots {
        let name = device_name(n);
        let uid = u32::from(n);
        let sta = MethodCall::new("\\_SB_.MHPC.MSTA".into(), vec![&n]);
        let crs = MethodCall::new("\\_SB_.MHPC.MCRS".into(), vec![&n]);
        let return_sta = Return::new(&sta);
        let return_crs = Return::new(&crs);
        Device::new(
            name.as_str().into(),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0C80")),
                &Name::new("_UID".into(), &uid),
                &Method::new("_STA".into(), 0, false, vec![&return_sta]),
                &Method::new("_CRS".into(), 0, false, vec![&return_crs]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

fn controller(slots: u8, sink: &mut dyn AmlSink) {
    let port = layout::MEMORY_HOTPLUG_PORT;
    let ports = IO::new(port, port, 1, REGION_LEN);
    let crs = ResourceTemplate::new(vec![&ports]);
    let region = OpRegion::new("MHPR".into(), OpRegionSpace::SystemIO, &port, &REGION_LEN);
    let field = Field::new(
        "MHPR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"MSEL", 32),
            FieldEntry::Named(*b"MSTS", 32),
            FieldEntry::Named(*b"MBAS", 64),
            FieldEntry::Named(*b"MLEN", 64),
        ],
    );
    let lock = Mutex::new("MLCK".into(), 0);
    let acquire = Acquire::new("MLCK".into(), ACQUIRE_FOREVER);
    let release = Release::new("MLCK".into());
    let (msel, msts) = (Path::new("MSEL"), Path::new("MSTS"));
    let select_arg = Store::new(&msel, &Arg(0));

    // MSTA (n): Local0 = 0; if slot n is enabled, Local0 = 0xF.
    let sta = Local(0);
    let clear = Store::new(&sta, &ZERO);
    let enabled = And::new(&ZERO, &msts, &STATUS_ENABLED);
    let present = Store::new(&sta, &STA_PRESENT);
    let if_enabled = If::new(&enabled, vec![&present]);
    let return_sta = Return::new(&sta);
    let msta = Method::new(
        "MSTA".into(),
        1,
        false,
        vec![
            &acquire,
            &clear,
            &select_arg,
            &if_enabled,
            &release,
            &return_sta,
        ],
    );

    // MCRS (n), serialized: a QWordMemory template whose minimum, maximum and length are
    // filled from slot n's registers.
    let template =
        AddressSpace::<u64>::new_memory(AddressSpaceCacheable::Cacheable, true, 0, 0xfff, None);
    let template = ResourceTemplate::new(vec![&template]);
    let mr64 = Path::new("MR64");
    let name = Name::new("MR64".into(), &template);
    let (min, max, len) = (Path::new("MINL"), Path::new("MAXL"), Path::new("LENL"));
    let create_min = CreateQWordField::new(&min, &mr64, &QWORD_MIN);
    let create_max = CreateQWordField::new(&max, &mr64, &QWORD_MAX);
    let create_len = CreateQWordField::new(&len, &mr64, &QWORD_LEN);
    let (mbas, mlen) = (Path::new("MBAS"), Path::new("MLEN"));
    let read_min = Store::new(&min, &mbas);
    let read_len = Store::new(&len, &mlen);
    let end = Add::new(&max, &min, &len);
    let last = Subtract::new(&max, &max, &ONE);
    let return_mr64 = Return::new(&mr64);
    let mcrs = Method::new(
        "MCRS".into(),
        1,
        true,
        vec![
            &name,
            &create_min,
            &create_max,
            &create_len,
            &acquire,
            &select_arg,
            &read_min,
            &read_len,
            &release,
            &end,
            &last,
            &return_mr64,
        ],
    );

    // MSCN (): for each slot, if an insertion is pending, notify its device and acknowledge.
    let names: Vec<String> = (0..slots).map(device_name).collect();
    let paths: Vec<Path> = names
        .iter()
        .map(|n| Path::new(&format!("\\_SB_.{n}")))
        .collect();
    let numbers: Vec<u8> = (0..slots).collect();
    let selects: Vec<Store> = numbers.iter().map(|n| Store::new(&msel, n)).collect();
    let pending = And::new(&ZERO, &msts, &STATUS_INSERTING);
    let notifies: Vec<Notify> = paths
        .iter()
        .map(|p| Notify::new(p, &NOTIFY_DEVICE_CHECK))
        .collect();
    let acknowledge = Store::new(&msts, &STATUS_INSERTING);
    let checks: Vec<If> = notifies
        .iter()
        .map(|notify| If::new(&pending, vec![notify, &acknowledge]))
        .collect();
    let mut body: Vec<&dyn Aml> = vec![&acquire];
    for (select, check) in selects.iter().zip(&checks) {
        body.push(select);
        body.push(check);
    }
    body.push(&release);
    let mscn = Method::new("MSCN".into(), 0, false, body);

    Device::new(
        "MHPC".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A06")),
            &Name::new("_UID".into(), &"Memory hotplug"),
            &Name::new("_CRS".into(), &crs),
            &lock,
            &region,
            &field,
            &msta,
            &mcrs,
            &mscn,
        ],
    )
    .to_aml_bytes(sink);
}
