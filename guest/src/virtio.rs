//! The modern virtio-pci transport (virtio 1.2, section 4.1) as a driver
//! sees it: vendor capabilities, the device-status handshake, feature
//! negotiation, split virtqueues in guest RAM, notifications, MSI-X.
//!
//! All device memory the guest shares with the device comes from a static,
//! page-aligned arena in the image (`.bss`), which the identity map makes
//! physical == virtual. Descriptor chains are placed from a free list (blk,
//! rng and console issue one request at a time per queue; net keeps many
//! receive buffers and a batch of frames in flight) and completions are
//! polled from the used ring; with MSI-X each completion is also expected to
//! raise the queue's interrupt vector, which the CPL0 handler in boot.s
//! counts (`arch::irq_count`).

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{fence, AtomicUsize, Ordering};

use crate::arch::{self, inb, inl, inw, outb, outl, outw};
use crate::pci::{
    self, Bar, BarKind, Function, Mech, CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_IO, CMD_MEM,
};
use crate::phys;
use crate::report::StrBuf;
use crate::time::Deadline;

/// Error text for the transport's checks.
pub type Why = StrBuf<320>;

/// Makes a [`Why`] from format arguments.
#[macro_export]
macro_rules! why {
    ($($arg:tt)*) => {{
        let mut w: $crate::virtio::Why = $crate::report::StrBuf::new();
        let _ = core::fmt::Write::write_fmt(&mut w, format_args!($($arg)*));
        w
    }};
}

/// Feature bits (virtio 1.2 section 6).
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Device status bits.
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_FAILED: u8 = 128;

/// Common configuration layout (virtio 1.2 4.1.4.3).
const C_DFSELECT: u64 = 0x00;
const C_DF: u64 = 0x04;
const C_GFSELECT: u64 = 0x08;
const C_GF: u64 = 0x0c;
const C_MSIX_CONFIG: u64 = 0x10;
const C_NUM_QUEUES: u64 = 0x12;
const C_STATUS: u64 = 0x14;
const C_CFG_GENERATION: u64 = 0x15;
const C_Q_SELECT: u64 = 0x16;
const C_Q_SIZE: u64 = 0x18;
const C_Q_MSIX: u64 = 0x1a;
const C_Q_ENABLE: u64 = 0x1c;
const C_Q_NOTIFY_OFF: u64 = 0x1e;
const C_Q_DESC: u64 = 0x20;
const C_Q_DRIVER: u64 = 0x28;
const C_Q_DEVICE: u64 = 0x30;
/// Minimum length of the common configuration structure (up to queue_device).
const COMMON_MIN_LEN: u64 = 0x38;

/// virtio_pci_cap cfg_type values.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Address of an MSI to the local APIC with ID 0 (physical destination mode).
const MSI_ADDRESS: u32 = 0xfee0_0000;

/// Virtqueue descriptor flags.
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Queue size used: at most this many descriptors.
const MAX_QUEUE_SIZE: u16 = 64;
/// Offsets of the rings inside a queue's page (64 descriptors use 1 KiB).
const AVAIL_OFF: usize = 1024;
const USED_OFF: usize = 2048;

/// How long one request may take (completion and interrupt).
pub const REQUEST_TIMEOUT_US: u64 = 2_000_000;

const PAGE: usize = 4096;
const DMA_PAGES: usize = 96;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; DMA_PAGES * PAGE]>);

// SAFETY: the arena is only reached through `DmaPage`s, each handed out once
// by `alloc_page`; the guest runs its checks on one CPU.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; DMA_PAGES * PAGE]));
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);

/// One 4 KiB page of guest RAM shared with devices.
#[derive(Clone, Copy, Debug)]
pub struct DmaPage {
    ptr: *mut u8,
}

impl DmaPage {
    /// A zeroed page from the arena, or `None` when it is used up.
    pub fn alloc() -> Option<DmaPage> {
        let i = ARENA_NEXT.fetch_add(1, Ordering::SeqCst);
        if i >= DMA_PAGES {
            return None;
        }
        // SAFETY: page i lies inside the arena and is handed out only once.
        let ptr = unsafe { ARENA.0.get().cast::<u8>().add(i * PAGE) };
        let p = DmaPage { ptr };
        for off in 0..PAGE {
            p.write8(off, 0);
        }
        Some(p)
    }

    /// Guest-physical address of byte `off` (identity map: the same as the
    /// virtual address).
    pub fn phys(&self, off: usize) -> u64 {
        self.ptr as u64 + off as u64
    }

    /// Reads byte `off` (< 4096) as the device left it.
    pub fn read8(&self, off: usize) -> u8 {
        assert!(off < PAGE);
        // SAFETY: inside this page; volatile because the device writes it.
        unsafe { self.ptr.add(off).read_volatile() }
    }

    /// Writes byte `off` (< 4096).
    pub fn write8(&self, off: usize, v: u8) {
        assert!(off < PAGE);
        // SAFETY: inside this page; volatile because the device reads it.
        unsafe { self.ptr.add(off).write_volatile(v) }
    }

    /// Copies `data` into the page at `off` (the range must fit).
    pub fn write_bytes(&self, off: usize, data: &[u8]) {
        assert!(off.checked_add(data.len()).is_some_and(|e| e <= PAGE));
        for (i, &b) in data.iter().enumerate() {
            self.write8(off + i, b);
        }
    }

    /// Copies `out.len()` bytes from the page at `off` (the range must fit).
    pub fn read_bytes(&self, off: usize, out: &mut [u8]) {
        assert!(off.checked_add(out.len()).is_some_and(|e| e <= PAGE));
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.read8(off + i);
        }
    }

    fn read16(&self, off: usize) -> u16 {
        assert!(off + 2 <= PAGE && off.is_multiple_of(2));
        // SAFETY: aligned and inside this page.
        unsafe { self.ptr.add(off).cast::<u16>().read_volatile() }
    }

    fn write16(&self, off: usize, v: u16) {
        assert!(off + 2 <= PAGE && off.is_multiple_of(2));
        // SAFETY: aligned and inside this page.
        unsafe { self.ptr.add(off).cast::<u16>().write_volatile(v) }
    }

    fn read32(&self, off: usize) -> u32 {
        assert!(off + 4 <= PAGE && off.is_multiple_of(4));
        // SAFETY: aligned and inside this page.
        unsafe { self.ptr.add(off).cast::<u32>().read_volatile() }
    }

    fn write32(&self, off: usize, v: u32) {
        assert!(off + 4 <= PAGE && off.is_multiple_of(4));
        // SAFETY: aligned and inside this page.
        unsafe { self.ptr.add(off).cast::<u32>().write_volatile(v) }
    }

    fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
}

/// A window into a BAR (memory or I/O space); accesses outside it read
/// all ones and are not written.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    io: bool,
    base: u64,
    len: u64,
}

impl Region {
    fn new(bar: &Bar, off: u64, len: u64) -> Option<Region> {
        Self::check(bar, off, len).ok()
    }

    /// The window `[off, off + len)` of `bar`, or why it cannot be used.
    fn check(bar: &Bar, off: u64, len: u64) -> Result<Region, &'static str> {
        if !bar.assigned() {
            return Err("BAR not implemented or not assigned");
        }
        if !bar.contains(off, len) {
            return Err("window extends past the end of the BAR");
        }
        let io = bar.kind == BarKind::Io;
        let base = bar.addr + off;
        if io && base + len > 0x1_0000 {
            return Err("I/O window beyond port 0xffff");
        }
        if !io && !phys::readable(base, len) {
            return Err("memory window beyond the guest's identity map");
        }
        Ok(Region { io, base, len })
    }

    fn ok(&self, off: u64, size: u64) -> bool {
        off.checked_add(size).is_some_and(|e| e <= self.len)
    }

    /// Reads 8 bits at `off`.
    pub fn r8(&self, off: u64) -> u8 {
        match (self.ok(off, 1), self.io) {
            (false, _) => 0xff,
            (true, true) => inb((self.base + off) as u16),
            (true, false) => phys::mmio_read8(self.base + off),
        }
    }

    /// Reads 16 bits at `off`.
    pub fn r16(&self, off: u64) -> u16 {
        match (self.ok(off, 2), self.io) {
            (false, _) => 0xffff,
            (true, true) => inw((self.base + off) as u16),
            (true, false) => phys::mmio_read16(self.base + off),
        }
    }

    /// Reads 32 bits at `off`.
    pub fn r32(&self, off: u64) -> u32 {
        match (self.ok(off, 4), self.io) {
            (false, _) => 0xffff_ffff,
            (true, true) => inl((self.base + off) as u16),
            (true, false) => phys::mmio_read32(self.base + off),
        }
    }

    /// Writes 8 bits at `off`.
    pub fn w8(&self, off: u64, v: u8) {
        match (self.ok(off, 1), self.io) {
            (false, _) => {}
            (true, true) => outb((self.base + off) as u16, v),
            (true, false) => phys::mmio_write8(self.base + off, v),
        }
    }

    /// Writes 16 bits at `off`.
    pub fn w16(&self, off: u64, v: u16) {
        match (self.ok(off, 2), self.io) {
            (false, _) => {}
            (true, true) => outw((self.base + off) as u16, v),
            (true, false) => phys::mmio_write16(self.base + off, v),
        }
    }

    /// Writes 32 bits at `off`.
    pub fn w32(&self, off: u64, v: u32) {
        match (self.ok(off, 4), self.io) {
            (false, _) => {}
            (true, true) => outl((self.base + off) as u16, v),
            (true, false) => phys::mmio_write32(self.base + off, v),
        }
    }

    /// Writes a 64-bit field as two 32-bit halves, low first.
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }

    /// Length of the window in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Address (memory) or port (I/O) of the window's first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One access of `width` bytes (1, 2, 4 or 8) at `off`, at any alignment (the hostile
    /// checks); all ones outside the window and for 8-byte I/O accesses.
    pub fn read_any(&self, off: u64, width: u8) -> u64 {
        match (self.ok(off, u64::from(width)), self.io, width) {
            (false, _, _) | (true, true, 8) => u64::MAX,
            (true, true, 1) => u64::from(self.r8(off)),
            (true, true, 2) => u64::from(inw((self.base + off) as u16)),
            (true, true, _) => u64::from(inl((self.base + off) as u16)),
            (true, false, _) => phys::mmio_read_any(self.base + off, width),
        }
    }

    /// One write of `width` bytes (1, 2, 4 or 8) at `off`, at any alignment; nothing outside
    /// the window or for 8-byte I/O accesses.
    pub fn write_any(&self, off: u64, width: u8, v: u64) {
        match (self.ok(off, u64::from(width)), self.io, width) {
            (false, _, _) | (true, true, 8) => {}
            (true, true, 1) => self.w8(off, v as u8),
            (true, true, 2) => outw((self.base + off) as u16, v as u16),
            (true, true, _) => outl((self.base + off) as u16, v as u32),
            (true, false, _) => phys::mmio_write_any(self.base + off, width, v),
        }
    }

    /// The same window after its BAR moved from `old` (`size` bytes) to `new`; unchanged if
    /// the window is not in that BAR.
    fn rebased(self, io: bool, old: u64, size: u64, new: u64) -> Region {
        if self.io == io && self.base >= old && self.base - old < size {
            Region {
                base: self.base - old + new,
                ..self
            }
        } else {
            self
        }
    }
}

/// A virtio_pci_cap as found in configuration space.
#[derive(Clone, Copy, Debug)]
struct VirtioCap {
    at: u8,
    cfg_type: u8,
    bar: u8,
    offset: u32,
    length: u32,
}

/// The MSI-X capability of a function.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    table: Region,
    pba: Region,
    /// Number of table entries.
    pub size: u16,
    /// CPU vector of table entry 0; entry e raises `base_vector + e`.
    pub base_vector: u8,
    /// Entries programmed (from 0).
    pub entries: u16,
}

impl Msix {
    /// CPU vector programmed into table entry `e`.
    pub fn vector(&self, e: u16) -> Option<u8> {
        (e < self.entries).then(|| self.base_vector + e as u8)
    }

    /// Masks or unmasks table entry `e` (vector control bit 0).
    pub fn set_masked(&self, e: u16, masked: bool) {
        let off = u64::from(e) * 16 + 12;
        let ctl = self.table.r32(off);
        self.table.w32(off, if masked { ctl | 1 } else { ctl & !1 });
        // Read back so the write has reached the device before going on.
        let _ = self.table.r32(off);
    }

    /// The pending bit of entry `e` in the PBA.
    pub fn pending(&self, e: u16) -> bool {
        let word = self.pba.r32(u64::from(e / 32) * 4);
        word & (1 << (e % 32)) != 0
    }
}

/// A modern virtio-pci function being driven.
pub struct Transport {
    /// The PCI function.
    pub func: Function,
    mech: Mech,
    common: Region,
    notify: Region,
    isr: Region,
    notify_mult: u32,
    /// The device-specific configuration, if the device has one.
    pub device: Option<Region>,
    common_cap: VirtioCap,
    device_cap: Option<VirtioCap>,
    pcicfg: Option<u8>,
    msix_cap: Option<u8>,
    /// MSI-X state once enabled.
    pub msix: Option<Msix>,
    /// Feature bits the device offers.
    pub offered: u64,
    /// Feature bits negotiated.
    pub features: u64,
    /// Where each capability was found, for the INFO line.
    pub layout: StrBuf<400>,
    /// Ring pages of queues set up so far, reused when the driver sets a queue up again
    /// after a reset (the hostile checks re-initialise devices several times).
    queue_pages: [Option<DmaPage>; QUEUE_PAGE_CACHE],
}

/// Queues (from index 0) whose ring page a [`Transport`] keeps for re-use.
const QUEUE_PAGE_CACHE: usize = 4;

/// Device status DEVICE_NEEDS_RESET.
pub const S_NEEDS_RESET: u8 = 64;

fn cfg_type_name(t: u8) -> &'static str {
    match t {
        CFG_COMMON => "common",
        CFG_NOTIFY => "notify",
        CFG_ISR => "isr",
        CFG_DEVICE => "device",
        CFG_PCI => "pci",
        8 => "shm",
        _ => "other",
    }
}

impl Transport {
    /// Enables decoding and bus mastering on `f` and finds its virtio
    /// capabilities (the first usable one of each type) and MSI-X.
    pub fn probe(mech: Mech, f: &Function) -> Result<Transport, Why> {
        let b = f.bdf;
        let caps = pci::caps(mech, b, f.header);
        if let Some(e) = &caps.error {
            return Err(why!("capability list: {e}"));
        }
        let mut found: [Option<VirtioCap>; 6] = [None; 6];
        let mut layout: StrBuf<400> = StrBuf::new();
        let mut uses_io = false;
        for at in caps.with_id(pci::CAP_VENDOR) {
            let at16 = u16::from(at);
            let cap_len = mech.read8(b, at16 + 2);
            if cap_len < 16 {
                continue;
            }
            let c = VirtioCap {
                at,
                cfg_type: mech.read8(b, at16 + 3),
                bar: mech.read8(b, at16 + 4),
                offset: mech.read32(b, at16 + 8),
                length: mech.read32(b, at16 + 12),
            };
            let _ = write!(
                layout,
                " {}@{:#x}:bar{}+{:#x}/{:#x}",
                cfg_type_name(c.cfg_type),
                at,
                c.bar,
                c.offset,
                c.length
            );
            let t = usize::from(c.cfg_type);
            if !(1..=5).contains(&t) || found[t].is_some() {
                continue;
            }
            if c.cfg_type == CFG_PCI {
                if cap_len >= 20 {
                    found[t] = Some(c);
                }
                continue;
            }
            if c.cfg_type == CFG_NOTIFY && cap_len < 20 {
                continue;
            }
            let Some(bar) = f.bars.get(usize::from(c.bar)) else {
                let _ = write!(layout, "(unusable: no BAR {})", c.bar);
                continue;
            };
            match Region::check(bar, u64::from(c.offset), u64::from(c.length)) {
                Ok(_) => {
                    uses_io |= bar.kind == BarKind::Io;
                    found[t] = Some(c);
                }
                Err(e) => {
                    let _ = write!(layout, "(unusable: {e})");
                }
            }
        }
        let region = |t: u8| -> Option<Region> {
            let c = found[usize::from(t)]?;
            Region::new(
                &f.bars[usize::from(c.bar)],
                u64::from(c.offset),
                u64::from(c.length),
            )
        };
        let Some(common) = region(CFG_COMMON).filter(|r| r.len >= COMMON_MIN_LEN) else {
            return Err(why!("no usable common configuration capability:{layout}"));
        };
        let Some(notify) = region(CFG_NOTIFY).filter(|r| r.len >= 2) else {
            return Err(why!("no usable notification capability:{layout}"));
        };
        let Some(isr) = region(CFG_ISR) else {
            return Err(why!("no usable ISR capability:{layout}"));
        };
        let notify_mult =
            found[usize::from(CFG_NOTIFY)].map_or(0, |c| mech.read32(b, u16::from(c.at) + 16));
        let _ = write!(layout, " notify_off_multiplier={notify_mult}");
        let msix_cap = caps.with_id(pci::CAP_MSIX).next();
        let cmd = mech.read16(b, 0x04);
        let mut want = cmd | CMD_MEM | CMD_BUS_MASTER | CMD_INTX_DISABLE;
        if uses_io {
            want |= CMD_IO;
        }
        mech.write16(b, 0x04, want);
        Ok(Transport {
            func: *f,
            mech,
            common,
            notify,
            isr,
            notify_mult,
            device: region(CFG_DEVICE),
            common_cap: found[usize::from(CFG_COMMON)].unwrap_or(VirtioCap {
                at: 0,
                cfg_type: CFG_COMMON,
                bar: 0,
                offset: 0,
                length: 0,
            }),
            device_cap: found[usize::from(CFG_DEVICE)],
            pcicfg: found[usize::from(CFG_PCI)].map(|c| c.at),
            msix_cap,
            msix: None,
            offered: 0,
            features: 0,
            layout,
            queue_pages: [None; QUEUE_PAGE_CACHE],
        })
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.r8(C_STATUS)
    }

    /// Writes the device status register.
    pub fn set_status(&self, s: u8) {
        self.common.w8(C_STATUS, s);
    }

    /// The common configuration window.
    pub fn common(&self) -> &Region {
        &self.common
    }

    /// How configuration space is reached.
    pub fn mech(&self) -> Mech {
        self.mech
    }

    /// The BAR (index) whose memory range holds the notification window.
    pub fn notify_bar(&self) -> Option<usize> {
        let n = self.notify;
        self.func.bars.iter().position(|b| {
            b.assigned()
                && (b.kind == BarKind::Io) == n.io
                && n.base >= b.addr
                && n.base - b.addr < b.size
        })
    }

    /// The part of the common configuration's BAR from the end of the common configuration
    /// window (its capability's length) to the next virtio structure or MSI-X window in that
    /// BAR (or the BAR's end): bytes a driver has no reason to touch. `None` if there is none.
    pub fn common_gap(&self) -> Option<Region> {
        let c = self.common;
        let bar = self.func.bars.iter().find(|b| {
            b.assigned()
                && (b.kind == BarKind::Io) == c.io
                && c.base >= b.addr
                && c.base - b.addr < b.size
        })?;
        let start = c.base + c.len;
        let mut end = bar.addr + bar.size;
        let mut others = [Some(self.notify), Some(self.isr), self.device, None, None];
        if let Some(m) = &self.msix {
            others[3] = Some(m.table);
            others[4] = Some(m.pba);
        }
        for w in others.iter().flatten().filter(|w| w.io == c.io) {
            if w.base < start && w.base + w.len > start {
                return None;
            }
            if w.base >= start && w.base < end {
                end = w.base;
            }
        }
        (end > start).then_some(Region {
            io: c.io,
            base: start,
            len: end - start,
        })
    }

    /// Resets the device (status 0) and waits (at most 1 s) until it reads back 0.
    pub fn reset(&self) -> Result<(), Why> {
        self.set_status(0);
        let d = Deadline::after_us(1_000_000);
        while self.status() != 0 {
            if d.passed() {
                return Err(why!("device status stays {:#x} after reset", self.status()));
            }
            arch::pause();
        }
        Ok(())
    }

    /// Marks the device FAILED (after a handshake error).
    pub fn fail(&self) {
        self.set_status(self.status() | S_FAILED);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 required;
    /// `wanted` & offered accepted), FEATURES_OK read back.
    pub fn negotiate(&mut self, wanted: u64) -> Result<(), Why> {
        self.reset()?;
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        self.common.w32(C_DFSELECT, 0);
        let lo = self.common.r32(C_DF);
        self.common.w32(C_DFSELECT, 1);
        let hi = self.common.r32(C_DF);
        self.offered = (u64::from(hi) << 32) | u64::from(lo);
        if self.offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(why!("VERSION_1 not offered (features={:#x})", self.offered));
        }
        self.features = self.offered & (wanted | F_VERSION_1 | F_ACCESS_PLATFORM);
        self.common.w32(C_GFSELECT, 0);
        self.common.w32(C_GF, self.features as u32);
        self.common.w32(C_GFSELECT, 1);
        self.common.w32(C_GF, (self.features >> 32) as u32);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.fail();
            return Err(why!(
                "FEATURES_OK not accepted (offered={:#x} driver={:#x})",
                self.offered,
                self.features
            ));
        }
        Ok(())
    }

    /// Number of queues the device reports.
    pub fn num_queues(&self) -> u16 {
        self.common.r16(C_NUM_QUEUES)
    }

    /// Enables MSI-X with `entries` table entries (0: config, 1 + i: queue
    /// i), each raising its own CPU vector at the local APIC `apic_id`, and
    /// assigns entry 0 to configuration changes.
    pub fn setup_msix(&mut self, entries: u16, apic_id: u32) -> Result<(), Why> {
        let Some(cap) = self.msix_cap else {
            return Err(why!("no MSI-X capability"));
        };
        let (m, b) = (self.mech, self.func.bdf);
        let c = u16::from(cap);
        let ctl = m.read16(b, c + 2);
        let size = (ctl & 0x7ff) + 1;
        let table_reg = m.read32(b, c + 4);
        let pba_reg = m.read32(b, c + 8);
        let bar_of = |reg: u32| self.func.bars.get((reg & 7) as usize).copied();
        let table = bar_of(table_reg)
            .and_then(|bar| Region::new(&bar, u64::from(table_reg & !7), u64::from(size) * 16));
        let pba = bar_of(pba_reg).and_then(|bar| {
            Region::new(
                &bar,
                u64::from(pba_reg & !7),
                u64::from(size.div_ceil(64)) * 8,
            )
        });
        let (Some(table), Some(pba)) = (table, pba) else {
            return Err(why!(
                "MSI-X table ({table_reg:#x}) or PBA ({pba_reg:#x}) outside its BAR (size {size})"
            ));
        };
        let entries = entries.min(size);
        // Setting MSI-X up again (after a device reset) keeps the CPU vectors it had.
        let base = match self.msix {
            Some(m) if m.entries >= entries => m.base_vector,
            _ => {
                let n = u8::try_from(entries).unwrap_or(u8::MAX);
                let Some(base) = arch::alloc_vectors(n) else {
                    return Err(why!("out of interrupt vectors"));
                };
                base
            }
        };
        m.write16(b, c + 2, ctl | MSIX_ENABLE | MSIX_FUNCTION_MASK);
        for e in 0..entries {
            let off = u64::from(e) * 16;
            table.w32(off, MSI_ADDRESS | ((apic_id & 0xff) << 12));
            table.w32(off + 4, 0);
            table.w32(off + 8, u32::from(base) + u32::from(e));
            table.w32(off + 12, 0);
        }
        m.write16(b, c + 2, (ctl | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
        let now = m.read16(b, c + 2);
        if now & (MSIX_ENABLE | MSIX_FUNCTION_MASK) != MSIX_ENABLE {
            return Err(why!("MSI-X message control reads {now:#x} after enabling"));
        }
        self.msix = Some(Msix {
            table,
            pba,
            size,
            base_vector: base,
            entries,
        });
        self.common.w16(C_MSIX_CONFIG, 0);
        let got = self.common.r16(C_MSIX_CONFIG);
        if got != 0 {
            return Err(why!("config_msix_vector reads {got:#x} after writing 0"));
        }
        Ok(())
    }

    /// Sets up queue `index` with at most [`MAX_QUEUE_SIZE`] entries; with
    /// MSI-X it signals table entry `1 + index` (or the last entry).
    pub fn setup_queue(&mut self, index: u16) -> Result<Queue, Why> {
        self.common.w16(C_Q_SELECT, index);
        let max = self.common.r16(C_Q_SIZE);
        if max == 0 {
            return Err(why!("queue {index} not available (queue_size 0)"));
        }
        if max < 4 {
            return Err(why!(
                "queue {index}: queue_size {max} is too small for the guest's requests (needs 4)"
            ));
        }
        let mut size = max.min(MAX_QUEUE_SIZE);
        // Split virtqueues have power-of-two sizes.
        while !size.is_power_of_two() {
            size &= size - 1;
        }
        let mem = self.queue_page(index)?;
        let rings = QueueRings {
            size,
            desc: mem.phys(0),
            driver: mem.phys(AVAIL_OFF),
            device: mem.phys(USED_OFF),
        };
        let (entry, notify_off) = self.program_queue(index, rings)?;
        Ok(Queue {
            index,
            size,
            max,
            mem,
            notify: self.notify,
            notify_off,
            avail_idx: 0,
            last_used: 0,
            // size is a power of two <= 64.
            free: u64::MAX >> (64 - u32::from(size)),
            chains: [0; MAX_QUEUE_SIZE as usize],
            entry,
            vector: entry.and_then(|e| self.msix.as_ref().and_then(|m| m.vector(e))),
        })
    }

    /// A zeroed ring page for queue `index`: the one it had before if it was set up already.
    fn queue_page(&mut self, index: u16) -> Result<DmaPage, Why> {
        if let Some(p) = self.queue_pages.get(usize::from(index)).copied().flatten() {
            for off in 0..PAGE {
                p.write8(off, 0);
            }
            return Ok(p);
        }
        let Some(p) = DmaPage::alloc() else {
            return Err(why!("out of DMA memory"));
        };
        if let Some(slot) = self.queue_pages.get_mut(usize::from(index)) {
            *slot = Some(p);
        }
        Ok(p)
    }

    /// Queue `index`'s maximum size (queue_size as the device reports it before the
    /// driver writes it).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.common.w16(C_Q_SELECT, index);
        self.common.r16(C_Q_SIZE)
    }

    /// Whether queue `index` reads enabled (queue_enable = 1).
    pub fn queue_enabled(&self, index: u16) -> bool {
        self.common.w16(C_Q_SELECT, index);
        self.common.r16(C_Q_ENABLE) == 1
    }

    /// Programs queue `index` with `rings` exactly as given (no check of size or
    /// addresses: the hostile checks hand the device bad values on purpose), its MSI-X
    /// entry, and enables it. Returns the MSI-X entry and the notification offset.
    pub fn program_queue(
        &mut self,
        index: u16,
        rings: QueueRings,
    ) -> Result<(Option<u16>, u64), Why> {
        self.common.w16(C_Q_SELECT, index);
        self.common.w16(C_Q_SIZE, rings.size);
        self.common.w64(C_Q_DESC, rings.desc);
        self.common.w64(C_Q_DRIVER, rings.driver);
        self.common.w64(C_Q_DEVICE, rings.device);
        let mut entry = None;
        if let Some(m) = &self.msix {
            let e = (1 + index).min(m.entries.saturating_sub(1));
            self.common.w16(C_Q_MSIX, e);
            let got = self.common.r16(C_Q_MSIX);
            if got != e {
                return Err(why!(
                    "queue {index}: queue_msix_vector reads {got:#x} after writing {e}"
                ));
            }
            entry = Some(e);
        }
        let notify_off = u64::from(self.common.r16(C_Q_NOTIFY_OFF)) * u64::from(self.notify_mult);
        if !self.notify.ok(notify_off, 2) {
            return Err(why!(
                "queue {index}: notify offset {notify_off:#x} outside the notify region (len {:#x})",
                self.notify.len
            ));
        }
        self.common.w16(C_Q_ENABLE, 1);
        if self.common.r16(C_Q_ENABLE) != 1 {
            return Err(why!("queue {index}: queue_enable does not read back 1"));
        }
        Ok((entry, notify_off))
    }

    /// Sets DRIVER_OK (with ACKNOWLEDGE, DRIVER, FEATURES_OK) without looking at the result.
    pub fn set_driver_ok(&self) {
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }

    /// The CPU vector of MSI-X entry 0 (configuration changes), if MSI-X is on.
    pub fn config_vector(&self) -> Option<u8> {
        self.msix.as_ref().and_then(|m| m.vector(0))
    }

    /// Moves memory BAR `bar` to `new` (decoding off while the BAR changes, COMMAND
    /// restored afterwards) and follows it: every window of this transport in that BAR
    /// (common, notify, device configuration, MSI-X table and PBA) now points at the new
    /// place. Queues keep their own copy of the notify window: see [`Queue::follow`].
    pub fn move_bar(&mut self, bar: usize, new: u64) -> Result<(), Why> {
        let Some(old) = self.func.bars.get(bar).copied() else {
            return Err(why!("no BAR {bar}"));
        };
        let is64 = match old.kind {
            BarKind::Mem64 => true,
            BarKind::Mem32 if new >> 32 == 0 => false,
            _ => {
                return Err(why!(
                    "BAR {bar} is {:?}: cannot move it to {new:#x}",
                    old.kind
                ))
            }
        };
        if !old.assigned() || !new.is_multiple_of(old.size) || !phys::readable(new, old.size) {
            return Err(why!(
                "cannot move BAR {bar} ({:#x}, size {:#x}) to {new:#x}",
                old.addr,
                old.size
            ));
        }
        let (m, b) = (self.mech, self.func.bdf);
        let reg = 0x10 + 4 * bar as u16;
        let cmd = m.read16(b, 0x04);
        m.write16(b, 0x04, cmd & !(CMD_MEM | CMD_IO));
        let low_flags = m.read32(b, reg) & 0xf;
        m.write32(b, reg, (new as u32 & !0xf) | low_flags);
        if is64 {
            m.write32(b, reg + 4, (new >> 32) as u32);
        }
        m.write16(b, 0x04, cmd);
        let lo = u64::from(m.read32(b, reg) & !0xf);
        let hi = if is64 {
            u64::from(m.read32(b, reg + 4))
        } else {
            0
        };
        let now = (hi << 32) | lo;
        if now != new {
            return Err(why!("BAR {bar} reads {now:#x} after writing {new:#x}"));
        }
        self.func.bars[bar].addr = new;
        let r = |w: Region| w.rebased(false, old.addr, old.size, new);
        self.common = r(self.common);
        self.notify = r(self.notify);
        self.isr = r(self.isr);
        self.device = self.device.map(r);
        if let Some(mx) = self.msix.as_mut() {
            mx.table = r(mx.table);
            mx.pba = r(mx.pba);
        }
        Ok(())
    }

    /// Sets DRIVER_OK; fails if the device then reports an error state.
    pub fn driver_ok(&mut self) -> Result<(), Why> {
        self.set_driver_ok();
        let s = self.status();
        if s & (S_FAILED | S_NEEDS_RESET) != 0 || s & S_DRIVER_OK == 0 {
            return Err(why!("device status {s:#x} after DRIVER_OK"));
        }
        Ok(())
    }

    /// Reads the device configuration with `f`, retrying while
    /// config_generation changes (bounded).
    pub fn read_config<T>(&self, f: impl Fn(&Region) -> T) -> Option<T> {
        let dev = self.device.as_ref()?;
        for _ in 0..16 {
            let g = self.common.r8(C_CFG_GENERATION);
            let v = f(dev);
            if self.common.r8(C_CFG_GENERATION) == g {
                return Some(v);
            }
        }
        None
    }

    /// Reads `width` (1, 2 or 4) bytes at `off` in BAR `bar` through the
    /// PCI configuration access capability (cfg_type 5) at `at`.
    fn pcicfg_read(&self, at: u8, bar: u8, off: u32, width: u8) -> u32 {
        let (m, b, a) = (self.mech, self.func.bdf, u16::from(at));
        m.write8(b, a + 4, bar);
        m.write32(b, a + 8, off);
        m.write32(b, a + 12, u32::from(width));
        let v = m.read32(b, a + 16);
        match width {
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v,
        }
    }

    /// The `pcicfg` check: num_queues in the common configuration and, if
    /// `dev_width` is nonzero and the device has a device configuration,
    /// its first field (`dev_width` bytes: the natural width of that field),
    /// each read through the PCI configuration access capability and
    /// directly. Returns whether all agree and a description.
    pub fn pcicfg_compare(&self, dev_width: u8) -> (bool, StrBuf<200>) {
        let mut d: StrBuf<200> = StrBuf::new();
        let Some(at) = self.pcicfg else {
            let _ = write!(d, "no PCI configuration access capability (cfg_type 5)");
            return (false, d);
        };
        let c = self.common_cap;
        let via = self.pcicfg_read(at, c.bar, c.offset + C_NUM_QUEUES as u32, 2);
        let direct = u32::from(self.common.r16(C_NUM_QUEUES));
        let mut ok = via == direct;
        let _ = write!(
            d,
            "common.num_queues via cfg_type 5 {via:#x} direct {direct:#x}"
        );
        if let (Some(c), Some(dev), 1 | 2 | 4) = (self.device_cap, &self.device, dev_width) {
            let via = self.pcicfg_read(at, c.bar, c.offset, dev_width);
            let direct = match dev_width {
                1 => u32::from(dev.r8(0)),
                2 => u32::from(dev.r16(0)),
                _ => dev.r32(0),
            };
            ok &= via == direct;
            let _ = write!(
                d,
                "; device[0..{dev_width}] via cfg_type 5 {via:#x} direct {direct:#x}"
            );
        }
        (ok, d)
    }
}

/// Where a queue's rings are and how big it is, as the driver programs them.
#[derive(Clone, Copy, Debug)]
pub struct QueueRings {
    /// queue_size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
}

/// One buffer of a request: guest-physical address, length, and whether
/// the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// One descriptor of a chain given explicitly: its buffer and where `next` points, as a
/// position in the same list (`None`: the chain ends here, no NEXT flag). [`Queue::add`]
/// links the buffers in order; the hostile checks build loops with this.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    /// The buffer.
    pub buf: Buf,
    /// Position (in the list given to [`Queue::add_raw`]) of the next descriptor.
    pub next: Option<usize>,
}

/// Available ring flag: the driver does not want used buffer notifications.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not want available buffer notifications.
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// What happened to one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Completion {
    /// The used ring returned it: (descriptor id, bytes written).
    pub used: Option<(u32, u32)>,
    /// The queue's vector fired (counter incremented) after submission.
    pub irq: bool,
    /// Whether an interrupt was expected (MSI-X vector set and not masked).
    pub irq_expected: bool,
    /// Microseconds from notify until both were seen (or the timeout).
    pub us: u64,
}

/// A split virtqueue in one page of guest RAM. Descriptors come from a free
/// list, so several chains may be in flight ([`Queue::add`], [`Queue::kick`],
/// [`Queue::pop_used`]); [`Queue::transact`] is the one-request-at-a-time
/// form the blk, rng and console checks use.
pub struct Queue {
    /// Queue index.
    pub index: u16,
    /// Size in use.
    pub size: u16,
    /// Maximum size the device reported.
    pub max: u16,
    mem: DmaPage,
    notify: Region,
    notify_off: u64,
    avail_idx: u16,
    last_used: u16,
    /// Free descriptors (bit d: descriptor d), only bits below `size`.
    free: u64,
    /// Descriptors of the chain whose head is d (0: d is not a head in flight).
    chains: [u64; MAX_QUEUE_SIZE as usize],
    /// MSI-X table entry.
    pub entry: Option<u16>,
    /// CPU vector the queue's entry raises.
    pub vector: Option<u8>,
}

/// One element taken from the used ring.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// Descriptor id the device returned.
    pub id: u32,
    /// Bytes the device wrote.
    pub len: u32,
    /// Whether `id` was the head of a chain in flight (if not, nothing was
    /// freed: the device returned a bogus id).
    pub known: bool,
}

impl Queue {
    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> u32 {
        self.free.count_ones()
    }

    /// Places `bufs` (at least one) as one descriptor chain and publishes it
    /// in the available ring, without notifying the device. Returns the head
    /// descriptor, or `None` if there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        let n = bufs.len();
        if n > usize::from(MAX_QUEUE_SIZE) {
            return None;
        }
        let mut raw = [RawDesc {
            buf: Buf {
                addr: 0,
                len: 0,
                write: false,
            },
            next: None,
        }; MAX_QUEUE_SIZE as usize];
        for (i, b) in bufs.iter().enumerate() {
            raw[i] = RawDesc {
                buf: *b,
                next: (i + 1 < n).then_some(i + 1),
            };
        }
        self.add_raw(&raw[..n])
    }

    /// Places `descs` (at least one; the first is the head) in free descriptors, linked as
    /// their `next` fields say (which may loop), and publishes the head in the available
    /// ring without notifying the device. Returns the head descriptor, or `None` if there
    /// are not enough free descriptors.
    pub fn add_raw(&mut self, descs: &[RawDesc]) -> Option<u16> {
        if descs.is_empty() || descs.len() > self.free.count_ones() as usize {
            return None;
        }
        let mut ids = [0u16; MAX_QUEUE_SIZE as usize];
        let mut mask = 0u64;
        for id in ids.iter_mut().take(descs.len()) {
            let d = (self.free & !mask).trailing_zeros();
            mask |= 1 << d;
            *id = d as u16;
        }
        self.free &= !mask;
        for (i, r) in descs.iter().enumerate() {
            let d = usize::from(ids[i]) * 16;
            let mut flags = 0;
            let mut next = 0;
            if let Some(j) = r.next {
                flags |= VIRTQ_DESC_F_NEXT;
                next = ids.get(j).copied().unwrap_or(j as u16);
            }
            if r.buf.write {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            self.mem.write64(d, r.buf.addr);
            self.mem.write32(d + 8, r.buf.len);
            self.mem.write16(d + 12, flags);
            self.mem.write16(d + 14, next);
        }
        let head = ids[0];
        self.chains[usize::from(head)] = mask;
        self.publish(head);
        Some(head)
    }

    /// Puts `head` in the next available ring slot and advances the index.
    fn publish(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        self.mem.write16(AVAIL_OFF + 4 + 2 * slot, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write16(AVAIL_OFF + 2, self.avail_idx);
    }

    /// Notifies the device of new available buffers.
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        self.notify.w16(self.notify_off, self.index);
    }

    /// Notifies the device unless it asked not to be (VIRTQ_USED_F_NO_NOTIFY: it is still
    /// working through the available ring and will see the new buffers). Returns whether
    /// it notified.
    pub fn kick_if_needed(&self) -> bool {
        fence(Ordering::SeqCst);
        if self.mem.read16(USED_OFF) & VIRTQ_USED_F_NO_NOTIFY != 0 {
            return false;
        }
        self.notify.w16(self.notify_off, self.index);
        true
    }

    /// Asks the device for used buffer notifications (interrupts) or not
    /// (VIRTQ_AVAIL_F_NO_INTERRUPT; a device may still send some).
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { VIRTQ_AVAIL_F_NO_INTERRUPT };
        self.mem.write16(AVAIL_OFF, flags);
        fence(Ordering::SeqCst);
    }

    /// Writes the available ring's index as given, without placing anything (hostile).
    pub fn set_avail_idx_raw(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.mem.write16(AVAIL_OFF + 2, idx);
    }

    /// Writes `head` into available ring slot `slot` (modulo the size) without publishing it
    /// (hostile).
    pub fn set_avail_slot_raw(&mut self, slot: u16, head: u16) {
        let slot = usize::from(slot % self.size);
        self.mem.write16(AVAIL_OFF + 4 + 2 * slot, head);
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self) -> u16 {
        self.mem.read16(USED_OFF + 2)
    }

    /// Where this queue's rings are, as programmed.
    pub fn rings(&self) -> QueueRings {
        QueueRings {
            size: self.size,
            desc: self.mem.phys(0),
            driver: self.mem.phys(AVAIL_OFF),
            device: self.mem.phys(USED_OFF),
        }
    }

    /// Takes the notify window from `t` again after [`Transport::move_bar`].
    pub fn follow(&mut self, t: &Transport) {
        self.notify = t.notify;
    }

    /// The notification address of this queue (memory space) or port (I/O).
    pub fn notify_addr(&self) -> u64 {
        self.notify.base + self.notify_off
    }

    /// The next used element, if the device has returned one; frees its
    /// chain.
    pub fn pop_used(&mut self) -> Option<Used> {
        let idx = self.mem.read16(USED_OFF + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % self.size);
        let id = self.mem.read32(USED_OFF + 4 + 8 * slot);
        let len = self.mem.read32(USED_OFF + 4 + 8 * slot + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.chains.get_mut(i))
            .filter(|c| **c != 0);
        let known = match chain {
            Some(c) => {
                self.free |= *c;
                *c = 0;
                true
            }
            None => false,
        };
        Some(Used { id, len, known })
    }

    /// Submits `bufs` and waits (bounded) for the used ring and, if
    /// `irq_expected`, the queue's interrupt. Meant for queues with nothing
    /// else in flight: the first used element is taken as the answer.
    pub fn transact(&mut self, bufs: &[Buf], irq_expected: bool) -> Completion {
        let vector = self.vector.filter(|_| irq_expected);
        let before = vector.map_or(0, arch::irq_count);
        let t0 = arch::rdtsc();
        let d = Deadline::after_us(REQUEST_TIMEOUT_US);
        let mut c = Completion {
            irq_expected: vector.is_some(),
            ..Completion::default()
        };
        if self.add(bufs).is_none() {
            return c;
        }
        self.kick();
        loop {
            if c.used.is_none() {
                c.used = self.pop_used().map(|u| (u.id, u.len));
            }
            if let Some(v) = vector {
                c.irq = arch::irq_count(v) > before;
            }
            if (c.used.is_some() && (c.irq || vector.is_none())) || d.passed() {
                break;
            }
            arch::pause();
        }
        c.us = crate::time::us_since(t0);
        c
    }
}

/// Interrupt bookkeeping for a device's `msix` check.
#[derive(Clone, Copy, Debug, Default)]
pub struct IrqTally {
    /// Completions waited for with an interrupt expected.
    pub waited: u32,
    /// Of those, signalled by the expected vector.
    pub signalled: u32,
}

impl IrqTally {
    /// Records one completion.
    pub fn add(&mut self, c: &Completion) {
        if c.irq_expected && c.used.is_some() {
            self.waited += 1;
            if c.irq {
                self.signalled += 1;
            }
        }
    }
}
