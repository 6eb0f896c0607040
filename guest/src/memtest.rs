//! `memmap` and `memtouch`: the memory map adds up to the configured RAM and
//! avoids the APIC window; the first and last page of every RAM range can be
//! written and read back.

use core::fmt::Write;

use crate::expect::Expectations;
use crate::regions::Regions;
use crate::report::{check, StrBuf};
use crate::startinfo::{StartInfo, E820_RAM};
use crate::{arch, println};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Slack allowed below the configured RAM (legacy hole, firmware).
const MEM_SLACK: u64 = 2 * MIB;
/// IOAPIC/LAPIC window that must never be RAM.
const APIC_WINDOW: (u64, u64) = (0xfec0_0000, 0x1_0000_0000);
/// Most pages memtouch tests (two per RAM entry).
const MAX_PAGES: usize = 128;

fn type_name(kind: u32) -> &'static str {
    match kind {
        1 => "ram",
        2 => "reserved",
        3 => "acpi",
        4 => "nvs",
        5 => "unusable",
        7 => "pmem",
        _ => "other",
    }
}

/// The `memmap` check. Prints every entry as `INFO memmap ...`.
pub fn check_memmap(si: &StartInfo, expect: &Expectations) {
    if si.version < 1 || si.memmap_entries == 0 {
        check(
            "memmap",
            false,
            format_args!(
                "no memory map in start info (version={} entries={})",
                si.version, si.memmap_entries
            ),
        );
        return;
    }
    if !si.memmap_readable() {
        check(
            "memmap",
            false,
            format_args!(
                "memory map at {:#x} ({} entries) not readable",
                si.memmap_paddr, si.memmap_entries
            ),
        );
        return;
    }
    let mut ram: u64 = 0;
    let mut problems: StrBuf<200> = StrBuf::new();
    for (i, e) in si.memmap().enumerate() {
        println!(
            "INFO memmap addr={:#x} size={:#x} end={:#x} type={} ({})",
            e.addr,
            e.size,
            e.end(),
            e.kind,
            type_name(e.kind)
        );
        if e.kind != E820_RAM {
            continue;
        }
        ram = ram.saturating_add(e.size);
        if e.addr < APIC_WINDOW.1 && APIC_WINDOW.0 < e.end() {
            let _ = write!(
                problems,
                " RAM {:#x}-{:#x} overlaps the APIC window",
                e.addr,
                e.end()
            );
        }
        for (j, f) in si.memmap().enumerate() {
            if j > i && f.kind == E820_RAM && f.addr < e.end() && e.addr < f.end() {
                let _ = write!(problems, " RAM entries {i} and {j} overlap");
            }
        }
    }
    let mut detail: StrBuf<300> = StrBuf::new();
    let _ = write!(
        detail,
        "entries={} ram={} ({} MiB)",
        si.memmap_entries,
        ram,
        ram / MIB
    );
    let mut ok = problems.is_empty();
    match expect.mem.get() {
        Ok(mem) => {
            let _ = write!(detail, " expect.mem={mem}");
            if ram > mem || ram < mem.saturating_sub(MEM_SLACK) {
                ok = false;
                let _ = write!(
                    detail,
                    " RAM total outside [expect.mem - 2 MiB, expect.mem]"
                );
            }
        }
        Err(why) => {
            ok = false;
            let _ = write!(detail, " {why}");
        }
    }
    if !problems.is_empty() {
        let _ = write!(detail, ";{problems}");
    }
    check("memmap", ok, format_args!("{detail}"));
}

#[repr(C, align(4096))]
struct Page([u64; 512]);

/// Original contents of the tested pages, restored afterwards (the memory
/// map need not mark firmware data, e.g. SeaBIOS's ACPI tables under QEMU).
struct SaveArea(core::cell::UnsafeCell<[Page; MAX_PAGES]>);
// SAFETY: only the BSP uses the save area, before any AP is started.
unsafe impl Sync for SaveArea {}
static SAVE: SaveArea = SaveArea(core::cell::UnsafeCell::new(
    [const { Page([0; 512]) }; MAX_PAGES],
));

fn pattern(page: u64, i: u64) -> u64 {
    (page | i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xa5a5_5a5a_0f0f_f0f0
}

/// First usable page of `[start, end)` scanning upwards (or downwards), or
/// `None`.
fn pick(start: u64, end: u64, avoid: &Regions, up: bool) -> Option<u64> {
    let lo = start.max(MIB).div_ceil(PAGE) * PAGE;
    let hi = end.min(arch::mapped_limit_bytes()) / PAGE * PAGE; // exclusive
    if hi < lo + PAGE {
        return None;
    }
    let mut p = if up { lo } else { hi - PAGE };
    loop {
        match avoid.overlapping(p, p + PAGE) {
            None => return Some(p),
            Some((s, e)) => {
                if up {
                    p = e.div_ceil(PAGE) * PAGE;
                    if p + PAGE > hi {
                        return None;
                    }
                } else {
                    let below = s / PAGE * PAGE;
                    if below < lo + PAGE {
                        return None;
                    }
                    p = below - PAGE;
                }
            }
        }
    }
}

/// The `memtouch` check.
pub fn check_memtouch(si: &StartInfo, avoid: &Regions) {
    if avoid.overflowed {
        check(
            "memtouch",
            false,
            format_args!("too many reserved ranges to track"),
        );
        return;
    }
    let mut pages = [0u64; MAX_PAGES];
    let mut n = 0;
    let mut dropped = 0;
    let mut ram_entries = 0;
    for e in si.memmap().filter(|e| e.kind == E820_RAM) {
        ram_entries += 1;
        for up in [true, false] {
            if let Some(p) = pick(e.addr, e.end(), avoid, up) {
                if pages[..n].contains(&p) {
                    continue;
                }
                if n < MAX_PAGES {
                    pages[n] = p;
                    n += 1;
                } else {
                    dropped += 1;
                }
            }
        }
    }
    if n == 0 {
        check(
            "memtouch",
            false,
            format_args!("no testable page (ram entries={ram_entries})"),
        );
        return;
    }
    let save = SAVE.0.get().cast::<Page>();
    for (k, &p) in pages[..n].iter().enumerate() {
        let ptr = p as *mut u64;
        for i in 0..512 {
            // SAFETY: p is a mapped RAM page outside the image and every
            // boot structure (see `pick`); slot k < MAX_PAGES of the save area.
            unsafe {
                (*save.add(k)).0[i] = ptr.add(i).read_volatile();
                ptr.add(i).write_volatile(pattern(p, i as u64));
            }
        }
    }
    let mut bad = 0u64;
    let mut first_bad: Option<(u64, u64, u64)> = None;
    for (k, &p) in pages[..n].iter().enumerate() {
        let ptr = p as *mut u64;
        for i in 0..512 {
            // SAFETY: as above.
            let got = unsafe { ptr.add(i).read_volatile() };
            let want = pattern(p, i as u64);
            if got != want {
                bad += 1;
                first_bad.get_or_insert((p + 8 * i as u64, want, got));
            }
            // SAFETY: as above; restores the original contents.
            unsafe { ptr.add(i).write_volatile((*save.add(k)).0[i]) };
        }
    }
    let mut list: StrBuf<400> = StrBuf::new();
    for (k, p) in pages[..n].iter().enumerate() {
        let _ = write!(list, "{}{:#x}", if k > 0 { "," } else { "" }, p);
    }
    match first_bad {
        None => check(
            "memtouch",
            dropped == 0,
            format_args!("pages={n} dropped={dropped} at {list}"),
        ),
        Some((addr, want, got)) => check(
            "memtouch",
            false,
            format_args!(
                "{bad} bad words; first at {addr:#x}: wrote {want:#x} read {got:#x}; pages {list}"
            ),
        ),
    }
}
