//! ACPI checks: RSDP, every table reachable from the XSDT/RSDT plus the
//! DSDT, the MADT (CPUs, IOAPICs), the MCFG (ECAM window) and the FADT,
//! from which the power-off method is derived (`\_S5` in the DSDT).
//!
//! All of this is data supplied by the VMM or firmware: every length and
//! address is checked before use.

use core::fmt::Write;

use crate::arch::MAX_CPUS;
use crate::expect::Expectations;
use crate::report::{check, Ascii, StrBuf};
use crate::startinfo::StartInfo;
use crate::{phys, println, shutdown};

/// Size of the common table header.
const HEADER_LEN: u32 = 36;
/// Upper bound on a sane table length.
const MAX_TABLE_LEN: u32 = 16 << 20;
/// Most tables tracked (root table, its entries and the DSDT).
const MAX_TABLES: usize = 48;
/// FADT flag: HW_REDUCED_ACPI.
const FADT_HW_REDUCED: u32 = 1 << 20;
/// FADT flag: TMR_VAL_EXT (32-bit PM timer).
const FADT_TMR_VAL_EXT: u32 = 1 << 8;
/// Generic Address Structure space IDs.
const GAS_MEMORY: u8 = 0;
const GAS_IO: u8 = 1;

/// One ACPI table header as found in memory.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    /// Physical address.
    pub addr: u64,
    /// Signature.
    pub sig: [u8; 4],
    /// Length from the header (0 if unreadable).
    pub len: u32,
    /// Header, length and checksum all good.
    pub valid: bool,
}

impl Table {
    const EMPTY: Table = Table {
        addr: 0,
        sig: [0; 4],
        len: 0,
        valid: false,
    };
}

/// A Generic Address Structure.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gas {
    /// Address space (0 memory, 1 I/O).
    pub space: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Address.
    pub addr: u64,
}

impl Gas {
    fn read(addr: u64) -> Gas {
        Gas {
            space: phys::read_u8(addr),
            bit_width: phys::read_u8(addr + 1),
            addr: phys::read_u64(addr + 4),
        }
    }
}

/// What the guest needs from the FADT.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fadt {
    /// FADT flags.
    pub flags: u32,
    /// PM1a control block I/O port (0: none).
    pub pm1a_cnt: u64,
    /// PM1b control block I/O port (0: none).
    pub pm1b_cnt: u64,
    /// PM timer I/O port (0: none).
    pub pm_tmr: u16,
    /// PM timer is 32 bits wide (else 24).
    pub pm_tmr_32: bool,
    /// SLEEP_CONTROL_REG (ACPI 5+, hardware-reduced platforms).
    pub sleep_ctl: Gas,
    /// PM1a event block I/O port (status register; the enable register follows at
    /// `pm1_evt_len / 2`), 0: none.
    pub pm1a_evt: u64,
    /// Length of the PM1 event blocks in bytes.
    pub pm1_evt_len: u8,
    /// DSDT address (X_DSDT if set, else DSDT).
    pub dsdt: u64,
}

/// Most IOAPICs recorded from the MADT.
pub const MAX_IOAPICS: usize = 8;

/// One IOAPIC of the MADT.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ioapic {
    /// MMIO base.
    pub addr: u64,
    /// GSI of its pin 0.
    pub gsi_base: u32,
}

/// The MADT summary used by the SMP check (and the IOAPICs, for the lifecycle mode).
#[derive(Clone, Copy, Debug)]
pub struct Madt {
    /// Local APIC MMIO base (after any type-5 override).
    pub lapic_base: u64,
    /// APIC IDs of enabled CPUs, in MADT order.
    pub cpus: [u32; MAX_CPUS],
    /// Number of valid entries in `cpus`.
    pub ncpus: usize,
    /// Enabled CPUs beyond `MAX_CPUS` (not stored).
    pub extra_cpus: usize,
    /// APIC ID of every Local APIC entry (enabled or not: CPU hotplug starts the others), by
    /// processor UID below `MAX_CPUS`; `u32::MAX` where there is none.
    pub apic_by_uid: [u32; MAX_CPUS],
    /// IOAPICs in MADT order (the first [`MAX_IOAPICS`]).
    pub ioapics: [Ioapic; MAX_IOAPICS],
    /// Number of valid entries in `ioapics`.
    pub nioapics: usize,
}

/// Everything the ACPI checks found.
#[derive(Debug)]
pub struct Acpi {
    /// RSDP address (0 if none).
    pub rsdp: u64,
    /// Tables: the root table, its entries, then the DSDT.
    pub tables: [Table; MAX_TABLES],
    /// Number of valid entries in `tables`.
    pub count: usize,
    /// Parsed FADT, if present and valid.
    pub fadt: Option<Fadt>,
    /// Parsed MADT, if present and valid.
    pub madt: Option<Madt>,
    /// The MCFG allocation for PCI segment 0 that covers bus 0, if any.
    pub ecam: Option<Ecam>,
    /// Per PCI segment `s` < [`MAX_SEGMENTS`], its first MCFG allocation that starts at bus 0.
    pub segments: [Option<Ecam>; MAX_SEGMENTS],
}

/// The PCI segments the guest looks at (those with a higher number are only reported).
pub const MAX_SEGMENTS: usize = 16;

/// One MCFG allocation (an ECAM window).
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    /// Base address of the window (the address of bus `start_bus`).
    pub base: u64,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

impl Acpi {
    /// The first valid table with signature `sig`.
    pub fn find(&self, sig: &[u8; 4]) -> Option<Table> {
        self.tables[..self.count]
            .iter()
            .find(|t| &t.sig == sig && t.valid)
            .copied()
    }

    fn push(&mut self, t: Table) {
        if self.count < MAX_TABLES {
            self.tables[self.count] = t;
            self.count += 1;
        }
    }

    /// Physical ranges `[start, end)` occupied by ACPI data (for memtouch).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let rsdp = (self.rsdp != 0).then_some((self.rsdp, self.rsdp + 36));
        rsdp.into_iter()
            .chain(self.tables[..self.count].iter().map(|t| {
                (
                    t.addr,
                    t.addr.saturating_add(u64::from(t.len.max(HEADER_LEN))),
                )
            }))
    }
}

fn sig_name(sig: &[u8; 4]) -> StrBuf<8> {
    let mut s = StrBuf::new();
    for &b in sig {
        let c = if b.is_ascii_alphanumeric() || b == b'_' {
            char::from(b)
        } else {
            '?'
        };
        let _ = s.write_char(c);
    }
    s
}

/// Reads and validates the header of the table at `addr`.
fn read_table(addr: u64) -> Table {
    if !phys::readable(addr, u64::from(HEADER_LEN)) {
        return Table {
            addr,
            ..Table::EMPTY
        };
    }
    let mut sig = [0u8; 4];
    phys::read_bytes(addr, &mut sig);
    let len = phys::read_u32(addr + 4);
    let valid = (HEADER_LEN..=MAX_TABLE_LEN).contains(&len)
        && phys::readable(addr, u64::from(len))
        && phys::checksum(addr, u64::from(len)) == 0;
    Table {
        addr,
        sig,
        len,
        valid,
    }
}

/// Prints `TEST acpi.<SIG>` for one table.
fn report_table(t: &Table) {
    let mut name: StrBuf<16> = StrBuf::new();
    let _ = write!(name, "acpi.{}", sig_name(&t.sig));
    let mut detail: StrBuf<160> = StrBuf::new();
    let _ = write!(detail, "addr={:#x} len={}", t.addr, t.len);
    if phys::readable(t.addr, u64::from(HEADER_LEN)) {
        let mut oem = [0u8; 6];
        phys::read_bytes(t.addr + 10, &mut oem);
        let _ = write!(
            detail,
            " rev={} oem=\"{}\"",
            phys::read_u8(t.addr + 8),
            Ascii(&oem)
        );
        if !t.valid {
            let len_ok = (HEADER_LEN..=MAX_TABLE_LEN).contains(&t.len)
                && phys::readable(t.addr, u64::from(t.len));
            let _ = if len_ok {
                write!(
                    detail,
                    " bad checksum (sum={:#x})",
                    phys::checksum(t.addr, u64::from(t.len))
                )
            } else {
                write!(detail, " bad length")
            };
        }
    } else {
        let _ = write!(detail, " unreadable address");
    }
    check(name.as_str(), t.valid, format_args!("{detail}"));
}

/// Runs all ACPI checks and returns what was found.
pub fn run(si: &StartInfo, expect: &Expectations) -> Acpi {
    let mut acpi = Acpi {
        rsdp: si.rsdp_paddr,
        tables: [Table::EMPTY; MAX_TABLES],
        count: 0,
        fadt: None,
        madt: None,
        ecam: None,
        segments: [None; MAX_SEGMENTS],
    };

    if let Some(root) = check_rsdp(si.rsdp_paddr) {
        walk_root(&mut acpi, root);
    } else {
        acpi.rsdp = 0;
    }

    // FADT -> DSDT.
    if let Some(facp) = acpi.find(b"FACP") {
        let fadt = parse_fadt(&facp, true);
        acpi.fadt = Some(fadt);
        if fadt.dsdt != 0 {
            let dsdt = read_table(fadt.dsdt);
            report_table(&dsdt);
            if dsdt.valid && &dsdt.sig != b"DSDT" {
                check(
                    "acpi.dsdt-signature",
                    false,
                    format_args!("FADT DSDT pointer leads to \"{}\"", Ascii(&dsdt.sig)),
                );
            }
            acpi.push(Table {
                sig: *b"DSDT",
                ..dsdt
            });
        }
    }

    let mut missing: StrBuf<64> = StrBuf::new();
    for sig in [b"FACP", b"APIC", b"MCFG", b"DSDT"] {
        if acpi.find(sig).is_none() {
            let _ = write!(missing, " {}", sig_name(sig));
        }
    }
    if missing.is_empty() {
        check(
            "acpi.required",
            true,
            format_args!("FACP APIC MCFG DSDT present"),
        );
    } else {
        check(
            "acpi.required",
            false,
            format_args!("missing or invalid:{missing}"),
        );
    }

    acpi.madt = check_madt(acpi.find(b"APIC"), expect);
    acpi.segments = check_mcfg(acpi.find(b"MCFG"));
    acpi.ecam = acpi.segments[0];
    plan_shutdown(&acpi);
    acpi
}

/// Root table address and entry size (4 for the RSDT, 8 for the XSDT).
struct Root {
    addr: u64,
    entry_size: u64,
}

fn check_rsdp(addr: u64) -> Option<Root> {
    if addr == 0 {
        check("acpi.rsdp", false, format_args!("rsdp_paddr is 0"));
        return None;
    }
    if !phys::readable(addr, 20) {
        check(
            "acpi.rsdp",
            false,
            format_args!("rsdp_paddr {addr:#x} not readable"),
        );
        return None;
    }
    let mut sig = [0u8; 8];
    phys::read_bytes(addr, &mut sig);
    let mut oem = [0u8; 6];
    phys::read_bytes(addr + 9, &mut oem);
    let rev = phys::read_u8(addr + 15);
    let rsdt = u64::from(phys::read_u32(addr + 16));
    let sum20 = phys::checksum(addr, 20);
    let mut detail: StrBuf<200> = StrBuf::new();
    let _ = write!(
        detail,
        "addr={addr:#x} rev={rev} oem=\"{}\" rsdt={rsdt:#x}",
        Ascii(&oem)
    );
    let mut ok = &sig == b"RSD PTR ";
    if !ok {
        let _ = write!(detail, " bad signature \"{}\"", Ascii(&sig));
    }
    if sum20 != 0 {
        ok = false;
        let _ = write!(detail, " bad checksum (sum={sum20:#x})");
    }
    let mut xsdt = 0;
    if rev >= 2 {
        let len = phys::read_u32(addr + 20);
        xsdt = phys::read_u64(addr + 24);
        let _ = write!(detail, " xsdt={xsdt:#x} len={len}");
        if !(36..=4096).contains(&len) || !phys::readable(addr, u64::from(len)) {
            ok = false;
            let _ = write!(detail, " bad length");
        } else if phys::checksum(addr, u64::from(len)) != 0 {
            ok = false;
            let _ = write!(detail, " bad extended checksum");
        }
    }
    check("acpi.rsdp", ok, format_args!("{detail}"));
    if !ok {
        return None;
    }
    if rev >= 2 && xsdt != 0 {
        Some(Root {
            addr: xsdt,
            entry_size: 8,
        })
    } else {
        Some(Root {
            addr: rsdt,
            entry_size: 4,
        })
    }
}

fn walk_root(acpi: &mut Acpi, root: Root) {
    let t = read_table(root.addr);
    report_table(&t);
    acpi.push(t);
    let expected: &[u8; 4] = if root.entry_size == 8 {
        b"XSDT"
    } else {
        b"RSDT"
    };
    if !t.valid || &t.sig != expected {
        if t.valid {
            check(
                "acpi.root",
                false,
                format_args!("expected {} at {:#x}", sig_name(expected), t.addr),
            );
        }
        return;
    }
    let n = u64::from(t.len - HEADER_LEN) / root.entry_size;
    for i in 0..n {
        let at = t.addr + u64::from(HEADER_LEN) + i * root.entry_size;
        let addr = if root.entry_size == 8 {
            phys::read_u64(at)
        } else {
            u64::from(phys::read_u32(at))
        };
        let entry = read_table(addr);
        report_table(&entry);
        acpi.push(entry);
    }
}

fn parse_fadt(t: &Table, verbose: bool) -> Fadt {
    let a = t.addr;
    let len = u64::from(t.len);
    let field32 = |off: u64| {
        if off + 4 <= len {
            phys::read_u32(a + off)
        } else {
            0
        }
    };
    let field64 = |off: u64| {
        if off + 8 <= len {
            phys::read_u64(a + off)
        } else {
            0
        }
    };
    let gas = |off: u64| {
        if off + 12 <= len {
            Gas::read(a + off)
        } else {
            Gas::default()
        }
    };
    let flags = field32(112);
    let io_port = |legacy: u32, x: Gas| {
        if legacy != 0 {
            u64::from(legacy)
        } else if x.space == GAS_IO {
            x.addr
        } else {
            0
        }
    };
    let pm1a_cnt = io_port(field32(64), gas(172));
    let pm1b_cnt = io_port(field32(68), gas(184));
    let pm_tmr = u16::try_from(io_port(field32(76), gas(208))).unwrap_or(0);
    let pm1a_evt = io_port(field32(56), gas(148));
    let pm1_evt_len = if 89 <= len { phys::read_u8(a + 88) } else { 0 };
    let x_dsdt = field64(140);
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        u64::from(field32(40))
    };
    let fadt = Fadt {
        flags,
        pm1a_cnt,
        pm1b_cnt,
        pm_tmr,
        pm_tmr_32: flags & FADT_TMR_VAL_EXT != 0,
        sleep_ctl: gas(244),
        pm1a_evt,
        pm1_evt_len,
        dsdt,
    };
    if !verbose {
        return fadt;
    }
    println!(
        "INFO fadt rev={} len={} flags={:#x} hw_reduced={} pm1a_cnt={:#x} pm1b_cnt={:#x} pm_tmr={:#x} sleep_ctl={}:{}:{:#x} dsdt={:#x}",
        phys::read_u8(a + 8),
        t.len,
        flags,
        flags & FADT_HW_REDUCED != 0,
        pm1a_cnt,
        pm1b_cnt,
        pm_tmr,
        fadt.sleep_ctl.space,
        fadt.sleep_ctl.bit_width,
        fadt.sleep_ctl.addr,
        dsdt
    );
    fadt
}

fn check_madt(t: Option<Table>, expect: &Expectations) -> Option<Madt> {
    let Some(t) = t else {
        check("acpi.madt", false, format_args!("no valid MADT"));
        return None;
    };
    if t.len < 44 {
        check(
            "acpi.madt",
            false,
            format_args!("MADT too short ({} bytes)", t.len),
        );
        return None;
    }
    let mut madt = Madt {
        lapic_base: u64::from(phys::read_u32(t.addr + 36)),
        cpus: [0; MAX_CPUS],
        ncpus: 0,
        extra_cpus: 0,
        apic_by_uid: [u32::MAX; MAX_CPUS],
        ioapics: [Ioapic::default(); MAX_IOAPICS],
        nioapics: 0,
    };
    println!(
        "INFO madt lapic_base={:#x} flags={:#x}",
        madt.lapic_base,
        phys::read_u32(t.addr + 40)
    );
    let mut ioapics = 0u32;
    let mut malformed = false;
    let mut off = 44u64;
    let end = u64::from(t.len);
    while off + 2 <= end {
        let e = t.addr + off;
        let kind = phys::read_u8(e);
        let elen = u64::from(phys::read_u8(e + 1));
        if elen < 2 || off + elen > end {
            malformed = true;
            println!("INFO madt malformed entry at offset {off} type={kind} len={elen}");
            break;
        }
        let mut enabled_id = None;
        match (kind, elen) {
            (0, 8..) => {
                let flags = phys::read_u32(e + 4);
                let id = phys::read_u8(e + 3);
                let uid = phys::read_u8(e + 2);
                println!("INFO madt lapic uid={uid} apic_id={id} flags={flags:#x}");
                if let Some(slot) = madt.apic_by_uid.get_mut(usize::from(uid)) {
                    *slot = u32::from(id);
                }
                if flags & 1 != 0 {
                    enabled_id = Some(u32::from(id));
                }
            }
            (1, 12..) => {
                ioapics += 1;
                let io = Ioapic {
                    addr: u64::from(phys::read_u32(e + 4)),
                    gsi_base: phys::read_u32(e + 8),
                };
                println!(
                    "INFO madt ioapic id={} addr={:#x} gsi_base={}",
                    phys::read_u8(e + 2),
                    io.addr,
                    io.gsi_base
                );
                if madt.nioapics < MAX_IOAPICS {
                    madt.ioapics[madt.nioapics] = io;
                    madt.nioapics += 1;
                }
            }
            (2, 10..) => println!(
                "INFO madt override bus={} irq={} gsi={} flags={:#x}",
                phys::read_u8(e + 2),
                phys::read_u8(e + 3),
                phys::read_u32(e + 4),
                phys::read_u16(e + 8)
            ),
            (4, 6..) => println!(
                "INFO madt lapic-nmi uid={:#x} flags={:#x} lint={}",
                phys::read_u8(e + 2),
                phys::read_u16(e + 3),
                phys::read_u8(e + 5)
            ),
            (5, 12..) => {
                madt.lapic_base = phys::read_u64(e + 4);
                println!("INFO madt lapic-override addr={:#x}", madt.lapic_base);
            }
            (9, 16..) => {
                let id = phys::read_u32(e + 4);
                let flags = phys::read_u32(e + 8);
                println!(
                    "INFO madt x2apic id={} flags={:#x} uid={}",
                    id,
                    flags,
                    phys::read_u32(e + 12)
                );
                if flags & 1 != 0 {
                    enabled_id = Some(id);
                }
            }
            _ => println!("INFO madt entry type={kind} len={elen}"),
        }
        if let Some(id) = enabled_id {
            if madt.ncpus < MAX_CPUS {
                madt.cpus[madt.ncpus] = id;
                madt.ncpus += 1;
            } else {
                madt.extra_cpus += 1;
            }
        }
        off += elen;
    }
    let enabled = madt.ncpus + madt.extra_cpus;
    let mut detail: StrBuf<160> = StrBuf::new();
    let _ = write!(
        detail,
        "enabled_cpus={enabled} ioapics={ioapics} lapic_base={:#x}",
        madt.lapic_base
    );
    let mut ok = !malformed && ioapics >= 1;
    if malformed {
        let _ = write!(detail, " malformed entry list");
    }
    if ioapics == 0 {
        let _ = write!(detail, " no IOAPIC");
    }
    match expect.cpus.get() {
        Ok(n) => {
            let _ = write!(detail, " expect.cpus={n}");
            ok &= usize::try_from(n).is_ok_and(|n| n == enabled);
        }
        Err(why) => {
            ok = false;
            let _ = write!(detail, " {why}");
        }
    }
    check("acpi.madt", ok, format_args!("{detail}"));
    Some(madt)
}

/// The `acpi.mcfg` check; returns, per segment below [`MAX_SEGMENTS`], the first allocation
/// that starts at bus 0.
fn check_mcfg(t: Option<Table>) -> [Option<Ecam>; MAX_SEGMENTS] {
    let mut found = [None; MAX_SEGMENTS];
    let Some(t) = t else {
        check("acpi.mcfg", false, format_args!("no valid MCFG"));
        return found;
    };
    let n = u64::from(t.len.saturating_sub(44)) / 16;
    if n == 0 {
        check(
            "acpi.mcfg",
            false,
            format_args!("no allocation in MCFG (len={})", t.len),
        );
        return found;
    }
    let mut ok = true;
    let mut detail: StrBuf<200> = StrBuf::new();
    // A table longer than any real one is read no further than 256 entries.
    for i in 0..n.min(256) {
        let e = t.addr + 44 + i * 16;
        let base = phys::read_u64(e);
        let seg = phys::read_u16(e + 8);
        let start = phys::read_u8(e + 10);
        let end = phys::read_u8(e + 11);
        println!("INFO mcfg base={base:#x} segment={seg} bus={start}-{end}");
        let _ = write!(
            detail,
            "{}base={base:#x} segment={seg} bus={start}-{end}",
            if i > 0 { "; " } else { "" }
        );
        ok &= base != 0 && start <= end;
        let slot = found.get_mut(usize::from(seg));
        if let Some(slot @ None) = slot {
            if start == 0 && base != 0 {
                *slot = Some(Ecam {
                    base,
                    start_bus: start,
                    end_bus: end,
                });
            }
        }
    }
    check("acpi.mcfg", ok, format_args!("{detail}"));
    found
}

/// Finds `Name(_S5_, Package(){ SLP_TYPa, ... })` in an AML table and
/// returns SLP_TYPa.
fn find_s5(t: &Table) -> Option<u8> {
    if !t.valid {
        return None;
    }
    let start = t.addr + u64::from(HEADER_LEN);
    let end = t.addr + u64::from(t.len);
    let b = |a: u64| {
        if a < end {
            Some(phys::read_u8(a))
        } else {
            None
        }
    };
    let mut a = start + 1;
    while a + 4 <= end {
        if phys::read_u8(a) == b'_'
            && phys::read_u8(a + 1) == b'S'
            && phys::read_u8(a + 2) == b'5'
            && phys::read_u8(a + 3) == b'_'
        {
            let prev = phys::read_u8(a - 1);
            let named =
                prev == 0x08 || (prev == b'\\' && a >= start + 2 && phys::read_u8(a - 2) == 0x08);
            if named && b(a + 4) == Some(0x12) {
                let lead = b(a + 5)?;
                let follow = u64::from(lead >> 6);
                let elem = a + 6 + follow + 1; // skip PkgLength and NumElements
                match b(elem)? {
                    0x0a => return b(elem + 1),
                    0x0b => return b(elem + 1), // WordPrefix: low byte
                    0x00 => return Some(0),
                    0x01 => return Some(1),
                    _ => {}
                }
            }
        }
        a += 1;
    }
    None
}

/// Why no power-off method could be chosen.
#[derive(Clone, Copy, Debug)]
enum PlanError {
    NoFadt,
    NoS5,
    NoRegister { slp_typ: u8, hw_reduced: bool },
}

impl core::fmt::Display for PlanError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlanError::NoFadt => write!(f, "no valid FADT"),
            PlanError::NoS5 => write!(f, "no \\_S5_ package found in DSDT/SSDT"),
            PlanError::NoRegister {
                slp_typ,
                hw_reduced,
            } => {
                write!(
                    f,
                    "slp_typ={slp_typ} but no usable sleep register (hw_reduced={hw_reduced})"
                )
            }
        }
    }
}

/// Chooses the S5 method from the FADT and `\_S5`.
fn choose_plan(acpi: &Acpi) -> Result<(shutdown::Plan, u8), PlanError> {
    let Some(fadt) = acpi.fadt else {
        return Err(PlanError::NoFadt);
    };
    let s5 = acpi.find(b"DSDT").and_then(|t| find_s5(&t)).or_else(|| {
        acpi.tables[..acpi.count]
            .iter()
            .filter(|t| &t.sig == b"SSDT")
            .find_map(find_s5)
    });
    let Some(slp_typ) = s5 else {
        return Err(PlanError::NoS5);
    };
    let hw_reduced = fadt.flags & FADT_HW_REDUCED != 0;
    let plan = if hw_reduced && fadt.sleep_ctl.addr != 0 {
        match fadt.sleep_ctl.space {
            GAS_IO => Some(shutdown::Plan::SleepControlIo(fadt.sleep_ctl.addr)),
            GAS_MEMORY => Some(shutdown::Plan::SleepControlMmio(fadt.sleep_ctl.addr)),
            _ => None,
        }
    } else if fadt.pm1a_cnt != 0 {
        Some(shutdown::Plan::Pm1 {
            a: fadt.pm1a_cnt,
            b: fadt.pm1b_cnt,
        })
    } else {
        None
    };
    match plan {
        Some(p) => Ok((p, slp_typ)),
        None => Err(PlanError::NoRegister {
            slp_typ,
            hw_reduced,
        }),
    }
}

/// The `acpi.s5` check: records the power-off method for `shutdown`.
fn plan_shutdown(acpi: &Acpi) {
    match choose_plan(acpi) {
        Ok((plan, slp_typ)) => {
            shutdown::set_plan(plan, slp_typ);
            check(
                "acpi.s5",
                true,
                format_args!("slp_typ={slp_typ} method={}", plan.name()),
            );
        }
        Err(why) => check("acpi.s5", false, format_args!("{why}")),
    }
}

/// Finds the power-off method without printing anything, for a run that
/// ends (fault, panic) before the ACPI checks have run.
pub fn plan_shutdown_quietly(start_info_addr: u64) {
    let Some(si) = StartInfo::read(start_info_addr) else {
        return;
    };
    let addr = si.rsdp_paddr;
    if !phys::readable(addr, 36) || phys::checksum(addr, 20) != 0 {
        return;
    }
    let xsdt = if phys::read_u8(addr + 15) >= 2 {
        phys::read_u64(addr + 24)
    } else {
        0
    };
    let (root_addr, entry_size) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(phys::read_u32(addr + 16)), 4)
    };
    let root = read_table(root_addr);
    if !root.valid {
        return;
    }
    let mut acpi = Acpi {
        rsdp: addr,
        tables: [Table::EMPTY; MAX_TABLES],
        count: 0,
        fadt: None,
        madt: None,
        ecam: None,
        segments: [None; MAX_SEGMENTS],
    };
    for i in 0..u64::from(root.len - HEADER_LEN) / entry_size {
        let at = root.addr + u64::from(HEADER_LEN) + i * entry_size;
        let a = if entry_size == 8 {
            phys::read_u64(at)
        } else {
            u64::from(phys::read_u32(at))
        };
        acpi.push(read_table(a));
    }
    if let Some(facp) = acpi.find(b"FACP") {
        let fadt = parse_fadt(&facp, false);
        acpi.fadt = Some(fadt);
        acpi.push(Table {
            sig: *b"DSDT",
            ..read_table(fadt.dsdt)
        });
    }
    if let Ok((plan, slp_typ)) = choose_plan(&acpi) {
        shutdown::set_plan(plan, slp_typ);
    }
}

/// The ACPI Generic Event Device (`_HID` "ACPI0013") as the AML describes it: the interrupt of
/// its `_CRS` and the operation region its `_EVT` reads the event register from.
#[derive(Clone, Copy, Debug)]
pub struct Ged {
    /// Signature of the table it was found in.
    pub table: [u8; 4],
    /// GSI of its interrupt (Extended Interrupt descriptor, or the IRQ of an IRQ descriptor).
    pub gsi: u32,
    /// The descriptor says edge-triggered (else level).
    pub edge: bool,
    /// The descriptor says active low (else active high).
    pub active_low: bool,
    /// Address space of the event register: [`GAS_IO`] (1) or [`GAS_MEMORY`] (0).
    pub space: u8,
    /// Port or physical address of the event register.
    pub addr: u64,
    /// Length of the operation region in bytes.
    pub len: u64,
}

impl Ged {
    /// Whether the event register is an I/O port (else memory).
    pub fn is_io(&self) -> bool {
        self.space == GAS_IO
    }
}

/// Bounded byte access to one AML table body.
struct Aml {
    start: u64,
    end: u64,
}

impl Aml {
    fn b(&self, a: u64) -> Option<u8> {
        (a >= self.start && a < self.end).then(|| phys::read_u8(a))
    }

    /// PkgLength at `a`: (value, bytes it takes). The package ends at `a + value`.
    fn pkg_len(&self, a: u64) -> Option<(u64, u64)> {
        let lead = self.b(a)?;
        let follow = u64::from(lead >> 6);
        if follow == 0 {
            return Some((u64::from(lead & 0x3f), 1));
        }
        let mut v = u64::from(lead & 0x0f);
        for i in 0..follow {
            v |= u64::from(self.b(a + 1 + i)?) << (4 + 8 * i);
        }
        Some((v, 1 + follow))
    }

    /// A ComputationalData integer at `a` (Zero, One, Ones, Byte/Word/DWord/QWordPrefix):
    /// (value, bytes it takes).
    fn integer(&self, a: u64) -> Option<(u64, u64)> {
        let le = |n: u64| -> Option<u64> {
            let mut v = 0u64;
            for i in 0..n {
                v |= u64::from(self.b(a + 1 + i)?) << (8 * i);
            }
            Some(v)
        };
        match self.b(a)? {
            0x00 => Some((0, 1)),
            0x01 => Some((1, 1)),
            0xff => Some((u64::MAX, 1)),
            0x0a => Some((le(1)?, 2)),
            0x0b => Some((le(2)?, 3)),
            0x0c => Some((le(4)?, 5)),
            0x0e => Some((le(8)?, 9)),
            _ => None,
        }
    }

    fn matches(&self, a: u64, bytes: &[u8]) -> bool {
        bytes
            .iter()
            .enumerate()
            .all(|(i, &x)| self.b(a + i as u64) == Some(x))
    }

    /// First position in `[from, to)` where `bytes` occur.
    fn find(&self, from: u64, to: u64, bytes: &[u8]) -> Option<u64> {
        (from..to).find(|&a| self.matches(a, bytes))
    }
}

/// Looks for the Generic Event Device in the DSDT, then the SSDTs. `None`: there is none;
/// `Some(Err)`: there is one but its `_CRS` or event register could not be understood.
///
/// Not an AML interpreter: it finds the string "ACPI0013", the innermost `Device` package
/// around it, and in that package `Name(_CRS, Buffer)` (Extended Interrupt or IRQ descriptor)
/// and the first `OperationRegion` in SystemIO or SystemMemory with constant offset and
/// length — the way VMMs (Nimbus, Cloud Hypervisor) write it.
pub fn find_ged(acpi: &Acpi) -> Option<Result<Ged, &'static str>> {
    let tables = acpi.find(b"DSDT").into_iter().chain(
        acpi.tables[..acpi.count]
            .iter()
            .filter(|t| &t.sig == b"SSDT" && t.valid)
            .copied(),
    );
    for t in tables {
        let aml = Aml {
            start: t.addr + u64::from(HEADER_LEN),
            end: t.addr + u64::from(t.len),
        };
        let Some(hid) = aml.find(aml.start, aml.end, b"\x0dACPI0013\x00") else {
            continue;
        };
        return Some(parse_ged(&aml, hid, t.sig));
    }
    None
}

fn parse_ged(aml: &Aml, hid: u64, sig: [u8; 4]) -> Result<Ged, &'static str> {
    // The innermost DeviceOp (0x5b 0x82) whose package contains the _HID string.
    let (body, end) = (aml.start..hid)
        .rev()
        .filter(|&a| aml.matches(a, &[0x5b, 0x82]))
        .find_map(|a| {
            let (len, _) = aml.pkg_len(a + 2)?;
            let end = a + 2 + len;
            (hid < end && end <= aml.end).then_some((a + 2, end))
        })
        .ok_or("no Device package around _HID \"ACPI0013\"")?;

    // Name(_CRS, Buffer(size) { resource descriptors })
    let crs = aml
        .find(body, end, b"\x08_CRS\x11")
        .ok_or("no Name(_CRS, Buffer) in the GED")?;
    let buf = crs + 5;
    let (plen, pbytes) = aml.pkg_len(buf + 1).ok_or("bad _CRS buffer")?;
    let buf_end = (buf + 1 + plen).min(end);
    let (size, sbytes) = aml
        .integer(buf + 1 + pbytes)
        .ok_or("_CRS buffer size is not a constant")?;
    let data = buf + 1 + pbytes + sbytes;
    let data_end = data.saturating_add(size).min(buf_end);
    let mut irq = None;
    let mut r = data;
    while r < data_end && irq.is_none() {
        let tag = aml.b(r).ok_or("_CRS runs past its buffer")?;
        if tag & 0x80 != 0 {
            let len = u64::from(aml.b(r + 1).ok_or("bad _CRS")?)
                | (u64::from(aml.b(r + 2).ok_or("bad _CRS")?) << 8);
            let at = r + 3;
            // Extended Interrupt Descriptor: flags, count, then 32-bit interrupt numbers.
            if tag & 0x7f == 0x09 && len >= 6 && aml.b(at + 1).is_some_and(|n| n >= 1) {
                let flags = aml.b(at).unwrap_or(0);
                let mut gsi = 0u32;
                for i in 0..4 {
                    gsi |= u32::from(aml.b(at + 2 + i).ok_or("bad _CRS")?) << (8 * i);
                }
                // Flag bit 1: edge (1) or level (0); bit 2: active low.
                irq = Some((gsi, flags & 2 != 0, flags & 4 != 0));
            }
            r = at + len;
        } else {
            let len = u64::from(tag & 7);
            match (tag >> 3) & 0xf {
                0xf => break, // End Tag
                // IRQ Descriptor: 16-bit mask, optional information byte (bit 0 edge, bit 3
                // active low; without it: edge, active high).
                0x4 if len >= 2 => {
                    let mask = u16::from(aml.b(r + 1).ok_or("bad _CRS")?)
                        | (u16::from(aml.b(r + 2).ok_or("bad _CRS")?) << 8);
                    if mask != 0 {
                        let info = if len >= 3 {
                            aml.b(r + 3).unwrap_or(1)
                        } else {
                            1
                        };
                        irq = Some((mask.trailing_zeros(), info & 1 != 0, info & 8 != 0));
                    }
                }
                _ => {}
            }
            r += 1 + len;
        }
    }
    let (gsi, edge, active_low) = irq.ok_or("no interrupt in the GED's _CRS")?;

    // OperationRegion(name, space, offset, length): 0x5b 0x80 NameSeg space offset length.
    let mut a = body;
    let (space, addr, len) = loop {
        let op = aml
            .find(a, end, &[0x5b, 0x80])
            .ok_or("no SystemIO/SystemMemory OperationRegion in the GED")?;
        let space = aml.b(op + 6);
        let region = aml.integer(op + 7).and_then(|(off, n)| {
            let (len, _) = aml.integer(op + 7 + n)?;
            Some((off, len))
        });
        if let (Some(s @ (GAS_MEMORY | GAS_IO)), Some((off, len))) = (space, region) {
            break (s, off, len);
        }
        a = op + 2;
    };
    if len < 4 {
        return Err("the GED's event register region is shorter than 4 bytes");
    }
    Ok(Ged {
        table: sig,
        gsi,
        edge,
        active_low,
        space,
        addr,
        len,
    })
}
