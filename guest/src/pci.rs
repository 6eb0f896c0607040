//! Stage-2 PCI checks on bus 0 of every PCI segment: enumeration through
//! both configuration mechanisms on segment 0 (ECAM from the MCFG, and ports
//! 0xcf8/0xcfc), through each other segment's own ECAM area (from its MCFG
//! entry), BAR sizing and placement, capability lists.
//!
//! Nothing here assumes an address: the ECAM window comes from the MCFG and
//! BAR addresses from the BARs (assigned by firmware under QEMU, by the VMM
//! under Nimbus). Everything read from configuration space is untrusted.

use core::fmt::{self, Write};

use crate::acpi::{Ecam, MAX_SEGMENTS};
use crate::arch::{inb, inl, inw, outb, outl, outw};
use crate::expect;
use crate::report::{check, StrBuf};
use crate::{phys, println};

/// Most functions on one bus (32 devices x 8 functions).
pub const MAX_FUNCS: usize = 256;
/// Most capabilities followed in one list.
pub const MAX_CAPS: usize = 48;

/// COMMAND register bits.
pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

/// Capability IDs.
pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_MSIX: u8 = 0x11;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// A function on bus 0 of a PCI segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bdf {
    /// PCI segment (0 for the configuration ports).
    pub seg: u16,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl Bdf {
    /// Device `dev`, function `func` on segment 0.
    pub const fn new(dev: u8, func: u8) -> Self {
        Bdf { seg: 0, dev, func }
    }
}

/// `00:DD.F` on segment 0 (as before segments existed), `SSSS:00:DD.F` elsewhere.
impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.seg != 0 {
            write!(f, "{:04x}:", self.seg)?;
        }
        write!(f, "00:{:02x}.{}", self.dev, self.func)
    }
}

/// The address of bus 0 in each segment's ECAM area (0: the segment has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamBases(pub [u64; MAX_SEGMENTS]);

impl EcamBases {
    /// The address of bus 0 of segment `seg`, if it has an ECAM area.
    pub fn base(&self, seg: u16) -> Option<u64> {
        self.0.get(usize::from(seg)).copied().filter(|&b| b != 0)
    }
}

/// How configuration space is reached.
#[derive(Clone, Copy, Debug)]
pub enum Mech {
    /// Memory-mapped (ECAM), per segment.
    Ecam(EcamBases),
    /// Configuration mechanism #1 (ports 0xcf8/0xcfc), first 256 bytes of segment 0 only.
    Io,
}

impl Mech {
    /// The ECAM address of register `off` of `b`, if its segment has ECAM.
    fn ecam_addr(bases: EcamBases, b: Bdf, off: u16) -> Option<u64> {
        Some(
            bases.base(b.seg)?
                + (u64::from(b.dev & 31) << 15)
                + (u64::from(b.func & 7) << 12)
                + u64::from(off & 0xfff),
        )
    }

    fn io_select(b: Bdf, off: u16) {
        outl(
            CONFIG_ADDRESS,
            0x8000_0000
                | (u32::from(b.dev & 31) << 11)
                | (u32::from(b.func & 7) << 8)
                | u32::from(off & 0xfc),
        );
    }

    /// Reads a 32-bit register (`off` dword aligned).
    pub fn read32(self, b: Bdf, off: u16) -> u32 {
        match self {
            Mech::Ecam(bases) => Self::ecam_addr(bases, b, off & !3).map_or(!0, phys::mmio_read32),
            Mech::Io if off < 256 && b.seg == 0 => {
                Self::io_select(b, off);
                inl(CONFIG_DATA)
            }
            Mech::Io => 0xffff_ffff,
        }
    }

    /// Reads a 16-bit register (`off` word aligned).
    pub fn read16(self, b: Bdf, off: u16) -> u16 {
        match self {
            Mech::Ecam(bases) => Self::ecam_addr(bases, b, off & !1).map_or(!0, phys::mmio_read16),
            Mech::Io if off < 256 && b.seg == 0 => {
                Self::io_select(b, off);
                inw(CONFIG_DATA + (off & 2))
            }
            Mech::Io => 0xffff,
        }
    }

    /// Reads an 8-bit register.
    pub fn read8(self, b: Bdf, off: u16) -> u8 {
        match self {
            Mech::Ecam(bases) => Self::ecam_addr(bases, b, off).map_or(!0, phys::mmio_read8),
            Mech::Io if off < 256 && b.seg == 0 => {
                Self::io_select(b, off);
                inb(CONFIG_DATA + (off & 3))
            }
            Mech::Io => 0xff,
        }
    }

    /// Writes a 32-bit register (`off` dword aligned).
    pub fn write32(self, b: Bdf, off: u16, v: u32) {
        match self {
            Mech::Ecam(bases) => {
                if let Some(a) = Self::ecam_addr(bases, b, off & !3) {
                    phys::mmio_write32(a, v);
                }
            }
            Mech::Io if off < 256 && b.seg == 0 => {
                Self::io_select(b, off);
                outl(CONFIG_DATA, v);
            }
            Mech::Io => {}
        }
    }

    /// Writes a 16-bit register (`off` word aligned).
    pub fn write16(self, b: Bdf, off: u16, v: u16) {
        match self {
            Mech::Ecam(bases) => {
                if let Some(a) = Self::ecam_addr(bases, b, off & !1) {
                    phys::mmio_write16(a, v);
                }
            }
            Mech::Io if off < 256 && b.seg == 0 => {
                Self::io_select(b, off);
                outw(CONFIG_DATA + (off & 2), v);
            }
            Mech::Io => {}
        }
    }

    /// Writes an 8-bit register.
    pub fn write8(self, b: Bdf, off: u16, v: u8) {
        match self {
            Mech::Ecam(bases) => {
                if let Some(a) = Self::ecam_addr(bases, b, off) {
                    phys::mmio_write8(a, v);
                }
            }
            Mech::Io if off < 256 && b.seg == 0 => {
                Self::io_select(b, off);
                outb(CONFIG_DATA + (off & 3), v);
            }
            Mech::Io => {}
        }
    }
}

/// What a BAR register turned out to be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BarKind {
    /// Not implemented (reads back 0 after writing all ones).
    #[default]
    None,
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space (the next BAR holds the upper half).
    Mem64,
    /// Upper half of the preceding 64-bit BAR.
    Upper,
}

/// One sized BAR.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bar {
    /// Kind.
    pub kind: BarKind,
    /// Address as programmed (0: unassigned).
    pub addr: u64,
    /// Size in bytes (a power of two for a well-formed BAR).
    pub size: u64,
    /// Prefetchable memory.
    pub prefetch: bool,
}

impl Bar {
    /// Memory or I/O BAR with an address.
    pub fn assigned(&self) -> bool {
        matches!(self.kind, BarKind::Io | BarKind::Mem32 | BarKind::Mem64) && self.addr != 0
    }

    /// Whether `[off, off + len)` lies inside the BAR.
    pub fn contains(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.size)
    }
}

/// One function's identity and BARs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Function {
    /// Location.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base class, sub-class, programming interface).
    pub class: u32,
    /// Revision ID.
    pub rev: u8,
    /// Header type (bit 7: multi-function).
    pub header: u8,
    /// BARs (only the first 6 / 2 / 0 exist for header types 0 / 1 / other).
    pub bars: [Bar; 6],
}

impl Function {
    fn same_identity(&self, o: &Function) -> bool {
        self.bdf == o.bdf
            && self.vendor == o.vendor
            && self.device == o.device
            && self.class == o.class
            && self.rev == o.rev
            && self.header == o.header
    }

    /// Number of BAR registers for this header type.
    pub fn nbars(&self) -> usize {
        match self.header & 0x7f {
            0 => 6,
            1 => 2,
            _ => 0,
        }
    }
}

/// The functions found on bus 0 of each segment, segment 0's first.
pub struct Bus {
    /// How configuration space is reached (ECAM when the MCFG offers it).
    pub mech: Mech,
    /// Functions in device/function order.
    pub funcs: [Function; MAX_FUNCS],
    /// Number of valid entries in `funcs`.
    pub n: usize,
}

impl Bus {
    /// The functions found.
    pub fn functions(&self) -> &[Function] {
        &self.funcs[..self.n]
    }
}

fn absent(id: u32) -> bool {
    let vendor = id & 0xffff;
    vendor == 0xffff || vendor == 0
}

/// Scans bus 0 of segment `seg` with one mechanism into `out[n..]`; returns the new count.
fn scan(mech: Mech, seg: u16, out: &mut [Function; MAX_FUNCS], mut n: usize) -> usize {
    for dev in 0..32u8 {
        let f0 = Bdf { seg, dev, func: 0 };
        if absent(mech.read32(f0, 0)) {
            continue;
        }
        let funcs = if mech.read8(f0, 0x0e) & 0x80 != 0 {
            8
        } else {
            1
        };
        for func in 0..funcs {
            let bdf = Bdf { seg, dev, func };
            let id = mech.read32(bdf, 0);
            if absent(id) || n == MAX_FUNCS {
                continue;
            }
            let class_rev = mech.read32(bdf, 0x08);
            out[n] = Function {
                bdf,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class: class_rev >> 8,
                rev: class_rev as u8,
                header: (mech.read32(bdf, 0x0c) >> 16) as u8,
                bars: [Bar::default(); 6],
            };
            n += 1;
        }
    }
    n
}

/// `pci.enum`, `pci.hostbridge` and `pci.segments`. Returns bus 0 of every
/// segment as seen through ECAM (or segment 0 through the I/O ports if there
/// is no usable MCFG allocation for it).
pub fn check_enum(
    ecam: Option<Ecam>,
    segments: &[Option<Ecam>; MAX_SEGMENTS],
    cmdline: &str,
) -> Bus {
    let mut io = Bus {
        mech: Mech::Io,
        funcs: [Function::default(); MAX_FUNCS],
        n: 0,
    };
    io.n = scan(Mech::Io, 0, &mut io.funcs, 0);
    let Some(e) = ecam else {
        check(
            "pci.enum",
            false,
            format_args!(
                "no MCFG allocation for segment 0 bus 0; {} functions through 0xcf8",
                io.n
            ),
        );
        print_functions(&io);
        check_hostbridge(&io);
        return io;
    };
    let mut bases = [0; MAX_SEGMENTS];
    bases[0] = e.base;
    for (b, s) in bases.iter_mut().zip(segments).skip(1) {
        *b = s.map_or(0, |s| s.base);
    }
    let mut mm = Bus {
        mech: Mech::Ecam(EcamBases(bases)),
        funcs: [Function::default(); MAX_FUNCS],
        n: 0,
    };
    mm.n = scan(mm.mech, 0, &mut mm.funcs, 0);
    let mut detail: StrBuf<300> = StrBuf::new();
    let _ = write!(
        detail,
        "functions={} ecam={:#x} (buses {}-{}) io={}",
        mm.n, e.base, e.start_bus, e.end_bus, io.n
    );
    let mut ok = mm.n > 0 && mm.n == io.n;
    if mm.n == 0 {
        let _ = write!(detail, " no function found");
    }
    for f in mm.functions() {
        match io.functions().iter().find(|g| g.bdf == f.bdf) {
            Some(g) if g.same_identity(f) => {}
            Some(g) => {
                ok = false;
                let _ = write!(
                    detail,
                    " {}: ecam {:04x}:{:04x} class={:06x} rev={:02x} hdr={:02x} but io {:04x}:{:04x} class={:06x} rev={:02x} hdr={:02x}",
                    f.bdf, f.vendor, f.device, f.class, f.rev, f.header,
                    g.vendor, g.device, g.class, g.rev, g.header
                );
            }
            None => {
                ok = false;
                let _ = write!(detail, " {} only through ECAM", f.bdf);
            }
        }
    }
    for g in io.functions() {
        if !mm.functions().iter().any(|f| f.bdf == g.bdf) {
            ok = false;
            let _ = write!(detail, " {} only through 0xcf8", g.bdf);
        }
    }
    if ok {
        let _ = write!(detail, " (ECAM and 0xcf8 agree)");
    }
    check("pci.enum", ok, format_args!("{detail}"));
    check_hostbridge(&mm);
    for seg in 1..MAX_SEGMENTS as u16 {
        if bases[usize::from(seg)] != 0 {
            mm.n = scan(mm.mech, seg, &mut mm.funcs, mm.n);
        }
    }
    print_functions(&mm);
    check_segments(&mm, &bases, expect::value(cmdline, "expect.segments"));
    mm
}

/// `pci.segments`: every segment with an ECAM area has a host bridge at
/// `SSSS:00:00.0`, and with `expect.segments=S:N,...` exactly the segments
/// listed have an ECAM area, each with N functions on its bus 0.
fn check_segments(bus: &Bus, bases: &[u64; MAX_SEGMENTS], wanted: Option<&str>) {
    let mut ok = true;
    let mut detail: StrBuf<300> = StrBuf::new();
    let mut counts = [0usize; MAX_SEGMENTS];
    for f in bus.functions() {
        counts[usize::from(f.bdf.seg)] += 1;
    }
    for seg in 0..MAX_SEGMENTS {
        if bases[seg] == 0 {
            continue;
        }
        let _ = write!(
            detail,
            "{}{seg}:{}",
            if detail.is_empty() { "" } else { "," },
            counts[seg]
        );
        let bridge = bus
            .functions()
            .iter()
            .find(|f| usize::from(f.bdf.seg) == seg && f.bdf.dev == 0 && f.bdf.func == 0);
        if bridge.is_none_or(|f| f.class >> 8 != 0x0600) {
            ok = false;
            let _ = write!(detail, " (no host bridge at {seg:04x}:00:00.0)");
        }
    }
    let _ = write!(detail, " ecam");
    for (seg, b) in bases.iter().enumerate().filter(|(_, b)| **b != 0) {
        let _ = write!(detail, " {seg}={b:#x}");
    }
    if bus.n == MAX_FUNCS {
        ok = false;
        let _ = write!(detail, " more than {MAX_FUNCS} functions");
    }
    match wanted {
        None => {}
        Some(w) => {
            let mut want = [None; MAX_SEGMENTS];
            let mut parsed = true;
            for item in w.split(',') {
                let pair = item
                    .split_once(':')
                    .and_then(|(s, n)| Some((expect::parse_u64(s)?, expect::parse_u64(n)?)));
                match pair {
                    Some((s, n)) if (s as usize) < MAX_SEGMENTS => {
                        want[s as usize] = Some(n as usize)
                    }
                    _ => parsed = false,
                }
            }
            if !parsed {
                ok = false;
                let _ = write!(detail, " bad expect.segments={w}");
            }
            for seg in 0..MAX_SEGMENTS {
                let have = (bases[seg] != 0).then_some(counts[seg]);
                match (have, want[seg]) {
                    (h, w) if h == w => {}
                    (Some(h), Some(w)) => {
                        let _ = write!(detail, " segment {seg}: {h} functions, expected {w}");
                    }
                    (None, _) => {
                        let _ = write!(detail, " segment {seg}: no ECAM area, expected one");
                    }
                    (Some(_), None) => {
                        let _ = write!(detail, " segment {seg}: present, not expected");
                    }
                }
                ok &= have == want[seg];
            }
        }
    }
    check("pci.segments", ok, format_args!("{detail}"));
}

fn print_functions(bus: &Bus) {
    for f in bus.functions() {
        let subsys = if f.header & 0x7f == 0 {
            bus.mech.read32(f.bdf, 0x2c)
        } else {
            0
        };
        println!(
            "INFO pci {} {:04x}:{:04x} class={:#08x} rev={:#04x} header={:#04x} subsys={:04x}:{:04x}",
            f.bdf,
            f.vendor,
            f.device,
            f.class,
            f.rev,
            f.header,
            subsys & 0xffff,
            subsys >> 16
        );
    }
}

fn check_hostbridge(bus: &Bus) {
    match bus.functions().first() {
        Some(f) if f.bdf == Bdf::new(0, 0) => check(
            "pci.hostbridge",
            f.class >> 8 == 0x0600,
            format_args!(
                "00:00.0 {:04x}:{:04x} class={:#08x}",
                f.vendor, f.device, f.class
            ),
        ),
        _ => check(
            "pci.hostbridge",
            false,
            format_args!("no function at 00:00.0"),
        ),
    }
}

/// Sizes every BAR of `f` with decoding disabled, restoring the BARs and
/// COMMAND afterwards.
fn size_bars(mech: Mech, f: &mut Function) {
    let nbars = f.nbars();
    if nbars == 0 {
        return;
    }
    let b = f.bdf;
    let cmd = mech.read16(b, 0x04);
    mech.write16(b, 0x04, cmd & !(CMD_IO | CMD_MEM));
    let mut i = 0;
    while i < nbars {
        let off = 0x10 + 4 * i as u16;
        let orig = mech.read32(b, off);
        mech.write32(b, off, 0xffff_ffff);
        let probe = mech.read32(b, off);
        mech.write32(b, off, orig);
        let bar = &mut f.bars[i];
        if probe == 0 || (probe == 0xffff_ffff && orig == 0xffff_ffff) {
            // Not implemented (or the function vanished).
            i += 1;
            continue;
        }
        if probe & 1 != 0 {
            // I/O: bits 31:2 decode; a 16-bit decoder reads back 0 above.
            let mut mask = probe & !3;
            if mask & 0xffff_0000 == 0 {
                mask |= 0xffff_0000;
            }
            *bar = Bar {
                kind: BarKind::Io,
                addr: u64::from(orig & !3),
                size: u64::from((!mask).wrapping_add(1)),
                prefetch: false,
            };
            i += 1;
            continue;
        }
        let prefetch = probe & 8 != 0;
        if (probe >> 1) & 3 == 2 && i + 1 < nbars {
            let orig_hi = mech.read32(b, off + 4);
            mech.write32(b, off + 4, 0xffff_ffff);
            let probe_hi = mech.read32(b, off + 4);
            mech.write32(b, off + 4, orig_hi);
            let mask = (u64::from(probe_hi) << 32) | u64::from(probe & !0xf);
            *bar = Bar {
                kind: BarKind::Mem64,
                addr: (u64::from(orig_hi) << 32) | u64::from(orig & !0xf),
                size: (!mask).wrapping_add(1),
                prefetch,
            };
            f.bars[i + 1].kind = BarKind::Upper;
            i += 2;
        } else {
            let mask = probe & !0xf;
            *bar = Bar {
                kind: BarKind::Mem32,
                addr: u64::from(orig & !0xf),
                size: u64::from((!mask).wrapping_add(1)),
                prefetch,
            };
            i += 1;
        }
    }
    mech.write16(b, 0x04, cmd);
}

/// `pci.bars`: sizes every BAR; assigned BARs must be aligned to their size
/// and must not overlap each other.
pub fn check_bars(bus: &mut Bus) {
    let mech = bus.mech;
    let n = bus.n;
    for f in bus.funcs[..n].iter_mut() {
        size_bars(mech, f);
    }
    let mut detail: StrBuf<400> = StrBuf::new();
    let mut ok = true;
    let mut total = 0;
    let mut assigned = 0;
    let funcs = bus.functions();
    for f in funcs {
        for (i, bar) in f.bars.iter().enumerate() {
            let kind = match bar.kind {
                BarKind::None | BarKind::Upper => continue,
                BarKind::Io => "io",
                BarKind::Mem32 => "mem32",
                BarKind::Mem64 => "mem64",
            };
            total += 1;
            println!(
                "INFO pci.bar {} bar{} {}{} addr={:#x} size={:#x}",
                f.bdf,
                i,
                kind,
                if bar.prefetch { " prefetchable" } else { "" },
                bar.addr,
                bar.size
            );
            if !bar.size.is_power_of_two() {
                ok = false;
                let _ = write!(
                    detail,
                    " {} bar{i} size {:#x} not a power of two",
                    f.bdf, bar.size
                );
                continue;
            }
            if !bar.assigned() {
                continue;
            }
            assigned += 1;
            if !bar.addr.is_multiple_of(bar.size) {
                ok = false;
                let _ = write!(
                    detail,
                    " {} bar{i} at {:#x} not aligned to its size {:#x}",
                    f.bdf, bar.addr, bar.size
                );
            }
        }
    }
    // Overlaps, each pair once.
    for (fi, f) in funcs.iter().enumerate() {
        for (bi, a) in f.bars.iter().enumerate() {
            if !a.assigned() || !a.size.is_power_of_two() {
                continue;
            }
            for (gi, g) in funcs.iter().enumerate().skip(fi) {
                for (ci, c) in g.bars.iter().enumerate() {
                    if (gi, ci) <= (fi, bi) || !c.assigned() || !c.size.is_power_of_two() {
                        continue;
                    }
                    let same_space = (a.kind == BarKind::Io) == (c.kind == BarKind::Io);
                    let a_end = a.addr.saturating_add(a.size);
                    let c_end = c.addr.saturating_add(c.size);
                    if same_space && a.addr < c_end && c.addr < a_end {
                        ok = false;
                        let _ = write!(
                            detail,
                            " {} bar{bi} [{:#x},{:#x}) overlaps {} bar{ci} [{:#x},{:#x})",
                            f.bdf, a.addr, a_end, g.bdf, c.addr, c_end
                        );
                    }
                }
            }
        }
    }
    check(
        "pci.bars",
        ok,
        format_args!("bars={total} assigned={assigned}{detail}"),
    );
}

/// A capability list, walked with bounds.
pub struct Caps {
    /// (offset, ID) of each capability in list order.
    pub list: [(u8, u8); MAX_CAPS],
    /// Number of valid entries.
    pub n: usize,
    /// Why the walk stopped early, if it did.
    pub error: Option<StrBuf<80>>,
}

impl Caps {
    /// Offsets of the capabilities with `id`, in list order.
    pub fn with_id(&self, id: u8) -> impl Iterator<Item = u8> + '_ {
        self.list[..self.n]
            .iter()
            .filter(move |c| c.1 == id)
            .map(|c| c.0)
    }
}

/// Walks the capability list of `b` (empty unless STATUS bit 4 is set):
/// at most [`MAX_CAPS`] entries, pointers in 0x40..=0xfc and dword aligned,
/// no pointer visited twice.
pub fn caps(mech: Mech, b: Bdf, header: u8) -> Caps {
    let mut c = Caps {
        list: [(0, 0); MAX_CAPS],
        n: 0,
        error: None,
    };
    if mech.read16(b, 0x06) & (1 << 4) == 0 {
        return c;
    }
    let start = if header & 0x7f == 2 { 0x14 } else { 0x34 };
    let mut ptr = mech.read8(b, start);
    let mut seen = [0u64; 4];
    while ptr != 0 {
        let mut why: StrBuf<80> = StrBuf::new();
        if ptr < 0x40 || ptr & 3 != 0 {
            let _ = write!(why, "bad pointer {ptr:#x}");
        } else if seen[usize::from(ptr >> 6)] & (1 << (ptr & 63)) != 0 {
            let _ = write!(why, "loop at {ptr:#x}");
        } else if c.n == MAX_CAPS {
            let _ = write!(why, "more than {MAX_CAPS} capabilities");
        }
        if !why.is_empty() {
            c.error = Some(why);
            break;
        }
        seen[usize::from(ptr >> 6)] |= 1 << (ptr & 63);
        let id = mech.read8(b, u16::from(ptr));
        c.list[c.n] = (ptr, id);
        c.n += 1;
        ptr = mech.read8(b, u16::from(ptr) + 1);
    }
    c
}

fn cap_name(id: u8) -> &'static str {
    match id {
        0x01 => "pm",
        0x05 => "msi",
        0x09 => "vendor",
        0x0d => "ssvid",
        0x10 => "pcie",
        0x11 => "msix",
        0x12 => "sata",
        0x13 => "af",
        _ => "other",
    }
}

/// `pci.caps`: every capability list is well formed.
pub fn check_caps(bus: &Bus) {
    let mut ok = true;
    let mut lists = 0;
    let mut detail: StrBuf<300> = StrBuf::new();
    for f in bus.functions() {
        let c = caps(bus.mech, f.bdf, f.header);
        if c.n == 0 && c.error.is_none() {
            continue;
        }
        lists += 1;
        let mut line: StrBuf<400> = StrBuf::new();
        for &(ptr, id) in &c.list[..c.n] {
            let _ = write!(line, " {ptr:#04x}:{}({id:#04x})", cap_name(id));
        }
        if let Some(e) = &c.error {
            ok = false;
            let _ = write!(line, " ERROR {e}");
            let _ = write!(detail, " {}: {e}", f.bdf);
        }
        println!("INFO pci.caps {}{line}", f.bdf);
    }
    check(
        "pci.caps",
        ok,
        format_args!("functions_with_caps={lists}{detail}"),
    );
}
