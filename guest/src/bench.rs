//! Block benchmark (`bench=blk`): random 4 KiB reads at queue depth 1 and 32, random 4 KiB
//! writes at depth 32, sequential 1 MiB reads and writes at depth 1 and 4, against the first
//! virtio-blk device, for `bench.secs` seconds each (default 5; `bench.only=TEXT` runs only
//! the workloads whose name contains TEXT). Prints
//! `BENCH <name> <value> <unit>` lines (see docs/test-guest.md) and a `bench.blk` check
//! (every request completed with status OK).
//!
//! The stage-1 memory, SMP and RTC checks are skipped; ACPI and the PCI checks run as usual
//! (they find the device). The TSC rate is measured against the CMOS clock, the same way
//! under every VMM.
//!
//! How requests go: one queue (queue 0, 64 entries), every request a chain of two
//! descriptors — a read is header (device-readable) + data and status byte in one
//! device-writable buffer, a write is header and data in one device-readable buffer + the
//! status byte — so 32 requests fit in 64 descriptors (virtio 1.x lets the device see a
//! chain as two byte streams, whatever its descriptor boundaries). Completions are found by
//! polling the used ring at CPL3 with used-buffer notifications off
//! (VIRTQ_AVAIL_F_NO_INTERRUPT): on PVM hosts an interrupt costs the guest an emulated
//! CPL0 entry, which would dominate the measurement. The device is notified after each
//! batch of submissions unless it has asked not to be (VIRTQ_USED_F_NO_NOTIFY while it is
//! still working through the ring). Buffers live in free RAM found from the memory map.
//!
//! The device setup ([`open_first_blk`], [`open_blk_on`], [`polled_queue`]) and the request
//! engine ([`drive`], or [`Engine`] one step at a time) are shared with the block soak mode
//! (soak.rs) and the lifecycle mode's block stream (lifecycle.rs).

use core::fmt::Write;

use crate::acpi::Acpi;
use crate::blk::{self, Blk, SECTOR, S_OK, S_UNWRITTEN, T_IN, T_OUT};
use crate::pci::Bus;
use crate::regions::Regions;
use crate::report::{check, StrBuf};
use crate::startinfo::{StartInfo, E820_RAM};
use crate::virtio::{Buf, Queue, Transport, Why};
use crate::{arch, expect, println, stage2, time, why};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Free RAM the benchmark needs: 32 slots of 4 KiB + 8 KiB, or four 1 MiB + 8 KiB slots.
const SCRATCH: u64 = 6 * MIB;
/// Most requests in flight (two descriptors each on a 64-entry queue).
const MAX_DEPTH: usize = 32;
/// Offset of the request header in a slot; the data follows it at 0x1000 (page aligned),
/// the status byte follows the data.
const HDR_OFF: u64 = 0x1000 - 16;
const DATA_OFF: u64 = 0x1000;

/// A piece of free guest RAM, reached through the identity map.
#[derive(Clone, Copy)]
pub struct Scratch {
    /// Guest-physical (= virtual) address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Scratch {
    fn write8(&self, off: u64, v: u8) {
        assert!(off < self.len);
        // SAFETY: inside a RAM range the memory map reports and nothing else uses (see
        // `free_ram`); identity-mapped and writable at CPL3.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u8, v) }
    }

    fn read8(&self, off: u64) -> u8 {
        assert!(off < self.len);
        // SAFETY: as for `write8`.
        unsafe { core::ptr::read_volatile((self.base + off) as *const u8) }
    }

    fn write_bytes(&self, off: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            self.write8(off + i as u64, b);
        }
    }

    /// Address of bytes `off..off + len`, checked to lie inside.
    fn at(&self, off: u64, len: u64) -> *mut u8 {
        assert!(off.checked_add(len).is_some_and(|end| end <= self.len));
        (self.base + off) as *mut u8
    }

    /// Fills `off..off + len` (a multiple of 8) with the 8-byte little-endian words
    /// `tag | i`, `i` the word's index.
    fn fill_tagged(&self, off: u64, len: u64, tag: u64) {
        // SAFETY: as for `fill`.
        let data = unsafe { core::slice::from_raw_parts_mut(self.at(off, len), len as usize) };
        for (i, w) in data.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(tag | i as u64).to_le_bytes());
        }
    }

    /// Fills `off..off + len` with `f(origin + i)` (plain stores, so the loop vectorises).
    fn fill(&self, off: u64, len: u64, origin: u64, f: fn(u64) -> u8) {
        // SAFETY: inside the scratch RAM (see `write8`); callers fill the data area of a slot
        // that is not in flight (the device does not touch it), and the slice ends here.
        let data = unsafe { core::slice::from_raw_parts_mut(self.at(off, len), len as usize) };
        for (i, b) in data.iter_mut().enumerate() {
            *b = f(origin + i as u64);
        }
    }

    /// The first `i` in `0..len` where byte `off + i` is not `f(origin + i)`: `(origin + i,
    /// got, want)`.
    fn mismatch(&self, off: u64, len: u64, origin: u64, f: fn(u64) -> u8) -> Option<(u64, u8, u8)> {
        // SAFETY: as for `fill`: a completed slot, which the device no longer writes.
        let data = unsafe { core::slice::from_raw_parts(self.at(off, len), len as usize) };
        // Fast path: compare everything, then look for the position only if needed.
        let all = data
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, &b)| acc | (b ^ f(origin + i as u64)));
        if all == 0 {
            return None;
        }
        data.iter().enumerate().find_map(|(i, &got)| {
            let o = origin + i as u64;
            (got != f(o)).then(|| (o, got, f(o)))
        })
    }
}

/// `size` bytes of RAM (2 MiB aligned) that no boot structure, ACPI table or the guest image
/// occupies, from the memory map.
fn free_ram(si: &StartInfo, avoid: &Regions, size: u64) -> Option<Scratch> {
    const ALIGN: u64 = 2 * MIB;
    let up = |a: u64| a.checked_add(ALIGN - 1).map(|a| a & !(ALIGN - 1));
    for e in si.memmap().filter(|e| e.kind == E820_RAM) {
        let mut start = up(e.addr.max(MIB))?;
        while let Some(end) = start.checked_add(size).filter(|&end| end <= e.end()) {
            match avoid.overlapping(start, end) {
                None if crate::phys::readable(start, size) => {
                    return Some(Scratch {
                        base: start,
                        len: size,
                    })
                }
                None => break,
                Some((_, o_end)) => start = up(o_end)?,
            }
        }
    }
    None
}

/// xorshift64.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

/// What the requests of one [`drive`] run look like.
#[derive(Clone, Copy)]
pub struct Shape {
    /// `T_IN`, `T_OUT` or `T_FLUSH`.
    pub kind: u32,
    /// Data bytes per request (0 for FLUSH).
    pub bs: u64,
    /// Most requests in flight (at most 32).
    pub depth: usize,
    /// What the data is.
    pub data: Data,
}

/// The data of the requests of one [`Shape`].
#[derive(Clone, Copy)]
pub enum Data {
    /// Whatever the buffer holds is written; reads are not checked.
    Any,
    /// A function of the absolute byte offset: written (`T_OUT`) or checked on completion
    /// with status OK (`T_IN`; a mismatch ends the run).
    Pattern(fn(u64) -> u8),
    /// (`T_OUT`) Every 8-byte little-endian word `i` of a request is `tag | i`, with the tag
    /// given by [`Next::Tagged`] (0 for [`Next::Submit`]). Reads are not checked.
    Tagged,
}

/// One workload.
struct Workload {
    name: &'static str,
    pattern: Pattern,
    shape: Shape,
}

/// What one workload did.
struct Stats {
    done: u64,
    errors: u64,
    ticks: u64,
}

/// Runs the benchmark (`bench=<kind>`: `blk`, or `net` in netbench.rs) and reports it.
pub fn run(kind: &str, si: &StartInfo, acpi: &Acpi, avoid: &Regions, cmdline: &str) {
    let secs = expect::value(cmdline, "bench.secs")
        .and_then(expect::parse_u64)
        .filter(|s| (1..=600).contains(s))
        .unwrap_or(5);
    match kind {
        "blk" => {}
        "net" => return crate::netbench::run(acpi, cmdline, secs),
        _ => {
            check(
                "bench.blk",
                false,
                format_args!("unknown benchmark bench={kind}"),
            );
            return;
        }
    }
    let only = expect::value(cmdline, "bench.only");
    match bench_blk(si, acpi, avoid, secs, only) {
        Ok(d) => check("bench.blk", true, format_args!("{d}")),
        Err(w) => check("bench.blk", false, format_args!("{w}")),
    }
}

/// The first virtio-blk device, set up for [`drive`]: what [`open_first_blk`] returns.
pub struct Rig {
    /// The device (`virtio.blk0.init` reported).
    pub b: Blk,
    /// Its capacity in sectors.
    pub capacity: u64,
    /// [`SCRATCH`] bytes of free RAM for the request buffers.
    pub mem: Scratch,
    /// TSC rate measured against the CMOS clock (also stored for `time`).
    pub khz: u64,
}

/// The PCI checks (through `stage2::setup`), then the first modern virtio-blk device
/// initialised (reporting `virtio.blk0.init`), its capacity (at least `min_bytes`), free RAM
/// for the buffers and the TSC rate against the CMOS clock (1-2 s).
pub fn open_first_blk(
    si: &StartInfo,
    acpi: &Acpi,
    avoid: &Regions,
    min_bytes: u64,
) -> Result<Rig, Why> {
    let (bus, apic_id) = stage2::setup(acpi, "");
    let (b, capacity, mem) = open_blk_on(&bus, apic_id, si, avoid, min_bytes)?;
    let Some(khz) = time::calibrate_rtc() else {
        return Err(why!(
            "the CMOS clock does not tick: cannot calibrate the TSC"
        ));
    };
    Ok(Rig {
        b,
        capacity,
        mem,
        khz,
    })
}

/// The first modern virtio-blk device on `bus` initialised (reporting `virtio.blk0.init`,
/// MSI-X to the local APIC `apic_id`), its capacity in sectors (at least `min_bytes`) and
/// [`SCRATCH`] bytes of free RAM for the request buffers.
pub fn open_blk_on(
    bus: &Bus,
    apic_id: u32,
    si: &StartInfo,
    avoid: &Regions,
    min_bytes: u64,
) -> Result<(Blk, u64, Scratch), Why> {
    let Some(f) = stage2::functions_of(bus, "blk").next() else {
        return Err(why!("no modern virtio-blk device"));
    };
    let t = Transport::probe(bus.mech, f)?;
    let Some((b, _)) = blk::open(t, 0, apic_id) else {
        return Err(why!("virtio-blk initialisation failed"));
    };
    let Some((capacity, _)) = blk::read_capacity(&b.t) else {
        return Err(why!("device configuration unreadable"));
    };
    if capacity < min_bytes.div_ceil(SECTOR) {
        return Err(why!(
            "disk of {capacity} sectors is smaller than {} MiB",
            min_bytes.div_ceil(MIB)
        ));
    }
    let Some(mem) = free_ram(si, avoid, SCRATCH) else {
        return Err(why!(
            "no {} MiB of free RAM in the memory map",
            SCRATCH / MIB
        ));
    };
    Ok((b, capacity, mem))
}

/// Queue 0 of `b` with used-buffer notifications off, checked to hold [`MAX_DEPTH`]
/// two-descriptor requests.
pub fn polled_queue(b: &mut Blk) -> Result<&mut Queue, Why> {
    let Some(q) = b.queues[0].as_mut() else {
        return Err(why!("queue 0 not set up"));
    };
    if usize::from(q.size) < 2 * MAX_DEPTH {
        return Err(why!(
            "queue 0 has {} entries; {} are needed",
            q.size,
            2 * MAX_DEPTH
        ));
    }
    q.set_interrupts(false);
    Ok(q)
}

fn bench_blk(
    si: &StartInfo,
    acpi: &Acpi,
    avoid: &Regions,
    secs: u64,
    only: Option<&str>,
) -> Result<StrBuf<300>, Why> {
    let Rig {
        mut b,
        capacity,
        mem,
        khz,
    } = open_first_blk(si, acpi, avoid, 2 * MIB)?;
    println!(
        "INFO bench blk {} capacity={capacity} sectors tsc_khz={khz} (CMOS clock) buffers={:#x}+{:#x} secs={secs}",
        b.t.func.bdf, mem.base, mem.len
    );
    let exits = measure_exits(&mut b);
    let q = polled_queue(&mut b)?;
    let workload = |name, write, pattern, bs, depth| Workload {
        name,
        pattern,
        shape: Shape {
            kind: if write { T_OUT } else { T_IN },
            bs,
            depth,
            data: Data::Any,
        },
    };
    let workloads = [
        workload("blk.randread.4k.qd1", false, Pattern::Random, 4 * KIB, 1),
        workload("blk.randread.4k.qd32", false, Pattern::Random, 4 * KIB, 32),
        workload("blk.randwrite.4k.qd32", true, Pattern::Random, 4 * KIB, 32),
        workload("blk.read.1m.qd1", false, Pattern::Sequential, MIB, 1),
        workload("blk.write.1m.qd1", true, Pattern::Sequential, MIB, 1),
        workload("blk.read.1m.qd4", false, Pattern::Sequential, MIB, 4),
        workload("blk.write.1m.qd4", true, Pattern::Sequential, MIB, 4),
    ];
    let hz = khz * 1000;
    let mut errors = 0;
    let mut ran = 0;
    for w in workloads
        .iter()
        .filter(|w| only.is_none_or(|o| w.name.contains(o)))
    {
        ran += 1;
        let s = run_workload(q, &mem, capacity, w, secs * hz)?;
        errors += s.errors;
        let elapsed = s.ticks as f64 / hz as f64;
        let per_s = s.done as f64 / elapsed;
        if w.shape.bs >= MIB {
            println!(
                "BENCH {} {:.1} MiB/s",
                w.name,
                per_s * w.shape.bs as f64 / MIB as f64
            );
        } else {
            println!("BENCH {} {:.0} IOPS", w.name, per_s);
        }
        if w.shape.depth == 1 {
            println!("BENCH {}.lat {:.1} us", w.name, 1e6 / per_s);
        }
    }
    println!("BENCH blk.notify.exit {:.2} us", exits.0);
    println!("BENCH mmio.read.exit {:.2} us", exits.1);
    if errors != 0 {
        return Err(why!("{errors} request(s) did not complete with status OK"));
    }
    let mut d = StrBuf::new();
    let _ = write!(
        d,
        "{ran} workload(s) of {secs} s on {}, every request OK",
        b.name
    );
    Ok(d)
}

/// Average cost in µs of a queue notification (an MMIO write the VMM may serve with an
/// ioeventfd, without leaving the kernel) and of an MMIO read of the common configuration
/// (served by the VMM in user space), 20 000 of each.
fn measure_exits(b: &mut Blk) -> (f64, f64) {
    const N: u64 = 20_000;
    let us = |ticks: u64| ticks as f64 * 1000.0 / time::tsc_khz() as f64 / N as f64;
    let notify = match b.queues[0].as_ref() {
        Some(q) => {
            let t0 = arch::rdtsc();
            for _ in 0..N {
                q.kick();
            }
            us(arch::rdtsc() - t0)
        }
        None => 0.0,
    };
    let c = *b.t.common();
    let t0 = arch::rdtsc();
    for _ in 0..N {
        let _ = c.r16(0x12);
    }
    (notify, us(arch::rdtsc() - t0))
}

/// Places the request of slot `k` for `sector` in the queue (filling its data first for a
/// write with a pattern or a tag). Returns the head descriptor.
fn submit(
    q: &mut Queue,
    mem: &Scratch,
    w: &Shape,
    stride: u64,
    k: usize,
    (sector, tag): (u64, u64),
) -> Option<u16> {
    let slot = k as u64 * stride;
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&w.kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_bytes(slot + HDR_OFF, &hdr);
    match (w.kind, w.data) {
        (T_OUT, Data::Pattern(f)) => mem.fill(slot + DATA_OFF, w.bs, sector * SECTOR, f),
        (T_OUT, Data::Tagged) => mem.fill_tagged(slot + DATA_OFF, w.bs, tag),
        _ => {}
    }
    let status_off = slot + DATA_OFF + w.bs;
    mem.write8(status_off, S_UNWRITTEN);
    let bs = w.bs as u32;
    let chain = match w.kind {
        T_OUT => [
            Buf {
                addr: mem.base + slot + HDR_OFF,
                len: 16 + bs,
                write: false,
            },
            Buf {
                addr: mem.base + status_off,
                len: 1,
                write: true,
            },
        ],
        // T_IN, and T_FLUSH with bs = 0 (header, then the status byte alone).
        _ => [
            Buf {
                addr: mem.base + slot + HDR_OFF,
                len: 16,
                write: false,
            },
            Buf {
                addr: mem.base + slot + DATA_OFF,
                len: bs + 1,
                write: true,
            },
        ],
    };
    q.add(&chain)
}

/// What [`drive`]'s (or [`Engine::submit`]'s) source of requests says.
pub enum Next {
    /// Submit a request at this sector.
    Submit(u64),
    /// Submit a request at `sector` carrying `tag` (see [`Data::Tagged`]; handed back in
    /// [`Done::tag`]).
    Tagged {
        /// Its sector.
        sector: u64,
        /// Its tag.
        tag: u64,
    },
    /// Nothing to submit yet (rate limit); ask again.
    Wait,
    /// No more requests: let those in flight complete and return.
    Done,
}

/// One completed request, as [`drive`] hands it to its caller.
pub struct Done {
    /// Its sector.
    pub sector: u64,
    /// Its tag (0 unless submitted with [`Next::Tagged`]).
    pub tag: u64,
    /// Its status byte.
    pub status: u8,
    /// TSC at completion.
    pub tsc: u64,
}

/// The request engine behind [`drive`], one step at a time, for callers that do other work
/// between steps (the lifecycle mode): up to `depth` requests of one [`Shape`] in flight on
/// a polled queue, each in its own slot of the scratch RAM.
pub struct Engine<'n> {
    name: &'n str,
    w: Shape,
    stride: u64,
    /// Which slot each head descriptor belongs to (`usize::MAX`: none).
    slot_of: [usize; 64],
    /// Each slot's sector and tag.
    req_of: [(u64, u64); MAX_DEPTH],
    /// Free slots (bit k: slot k).
    free: u64,
    in_flight: usize,
    exhausted: bool,
    /// Descriptor ids that have been the head of a request (bit d: id d).
    heads: u64,
}

impl<'n> Engine<'n> {
    /// An idle engine for requests shaped `w` (depth clamped to 1..=32) in `mem`; `name`
    /// starts its error texts.
    pub fn new(mem: &Scratch, w: &Shape, name: &'n str) -> Result<Self, Why> {
        let stride = DATA_OFF + w.bs + 0x1000;
        let depth = w.depth.clamp(1, MAX_DEPTH);
        if depth as u64 * stride > mem.len {
            return Err(why!("{name}: buffers do not fit in the scratch RAM"));
        }
        Ok(Engine {
            name,
            w: *w,
            stride,
            slot_of: [usize::MAX; 64],
            req_of: [(0, 0); MAX_DEPTH],
            free: (1 << depth) - 1,
            in_flight: 0,
            exhausted: false,
            heads: 0,
        })
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the source of requests has said [`Next::Done`].
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }

    /// Asks `next` (given the TSC) for a request whenever a slot is free, until it says
    /// [`Next::Wait`] or [`Next::Done`], and notifies the device after the batch: always when
    /// the queue was idle, else unless it has set VIRTQ_USED_F_NO_NOTIFY. Returns whether
    /// anything was submitted.
    pub fn submit(
        &mut self,
        q: &mut Queue,
        mem: &Scratch,
        mut next: impl FnMut(u64) -> Next,
    ) -> Result<bool, Why> {
        let idle = self.in_flight == 0;
        let mut added = false;
        while self.free != 0 && !self.exhausted {
            let req = match next(arch::rdtsc()) {
                Next::Submit(s) => (s, 0),
                Next::Tagged { sector, tag } => (sector, tag),
                Next::Wait => break,
                Next::Done => {
                    self.exhausted = true;
                    break;
                }
            };
            let k = self.free.trailing_zeros() as usize;
            let head = submit(q, mem, &self.w, self.stride, k, req)
                .ok_or_else(|| why!("{}: queue full", self.name))?;
            self.slot_of[usize::from(head)] = k;
            self.heads |= 1 << head;
            self.req_of[k] = req;
            self.free &= !(1 << k);
            self.in_flight += 1;
            added = true;
        }
        if added {
            if idle {
                q.kick();
            } else {
                q.kick_if_needed();
            }
        }
        Ok(added)
    }

    /// Takes every used element the device has returned: hands each completion to `done`,
    /// each used id that names no request in flight to `bogus` (with whether that id was the
    /// head of an earlier request: a duplicate), and checks reads with a pattern. An `Err`
    /// from either callback, or a read mismatch, is returned at once. Returns how many
    /// elements were taken.
    pub fn reap(
        &mut self,
        q: &mut Queue,
        mem: &Scratch,
        mut done: impl FnMut(&Done) -> Result<(), Why>,
        mut bogus: impl FnMut(u32, bool) -> Result<(), Why>,
    ) -> Result<usize, Why> {
        let mut taken = 0;
        while let Some(u) = q.pop_used() {
            taken += 1;
            let now = arch::rdtsc();
            let k = self
                .slot_of
                .get(u.id as usize)
                .copied()
                .unwrap_or(usize::MAX);
            if !u.known || k == usize::MAX {
                let seen = u.id < 64 && self.heads & (1 << u.id) != 0;
                bogus(u.id, seen)?;
                continue;
            }
            self.slot_of[u.id as usize] = usize::MAX;
            self.in_flight -= 1;
            let (sector, tag) = self.req_of[k];
            let data = k as u64 * self.stride + DATA_OFF;
            let status = mem.read8(data + self.w.bs);
            if let (T_IN, Data::Pattern(f), S_OK) = (self.w.kind, self.w.data, status) {
                if let Some((o, got, want)) = mem.mismatch(data, self.w.bs, sector * SECTOR, f) {
                    return Err(why!(
                        "{}: byte at offset {o:#x} is {got:#04x}, expected {want:#04x}",
                        self.name
                    ));
                }
            }
            self.free |= 1 << k;
            done(&Done {
                sector,
                tag,
                status,
                tsc: now,
            })?;
        }
        Ok(taken)
    }
}

/// Keeps up to `w.depth` requests in flight on `q` (polled, see [`polled_queue`]): asks
/// `next` (given the TSC) for a sector whenever a slot is free, until it says
/// [`Next::Done`], and hands every completion to `done` (an `Err` from it ends the run).
/// Reads with a pattern are checked against it. Errors: a bogus used id, a full queue, a
/// read mismatch, or `stall_secs` seconds without any completion while requests are in
/// flight (`<name>: no completion for S s, N requests in flight`). The device is notified
/// after each batch of submissions: always when the queue was idle, else unless it has set
/// VIRTQ_USED_F_NO_NOTIFY.
pub fn drive(
    q: &mut Queue,
    mem: &Scratch,
    w: &Shape,
    name: &str,
    stall_secs: u64,
    mut next: impl FnMut(u64) -> Next,
    mut done: impl FnMut(&Done) -> Result<(), Why>,
) -> Result<(), Why> {
    let mut e = Engine::new(mem, w, name)?;
    let stall = stall_secs.saturating_mul(time::tsc_khz() * 1000);
    let mut last_progress = arch::rdtsc();
    loop {
        let idle = e.in_flight() == 0;
        if e.submit(q, mem, &mut next)? && idle {
            last_progress = arch::rdtsc();
        }
        if e.exhausted() && e.in_flight() == 0 {
            return Ok(());
        }
        let got = e.reap(q, mem, &mut done, |id, _| {
            Err(why!("{name}: the device returned bogus id {id}"))
        })?;
        if got > 0 {
            last_progress = arch::rdtsc();
        } else {
            if e.in_flight() > 0 && arch::rdtsc() - last_progress > stall {
                return Err(why!(
                    "{name}: no completion for {stall_secs} s, {} requests in flight",
                    e.in_flight()
                ));
            }
            arch::pause();
        }
    }
}

/// Keeps `w.shape.depth` requests in flight for `ticks` TSC ticks, then lets the last ones
/// complete. Counts every completion; the time runs to the last one.
fn run_workload(
    q: &mut Queue,
    mem: &Scratch,
    capacity: u64,
    w: &Workload,
    ticks: u64,
) -> Result<Stats, Why> {
    let sectors = w.shape.bs / SECTOR;
    let blocks = capacity / sectors;
    let mut rand = Rand(0x9e37_79b9_7f4a_7c15);
    let mut seq = 0u64;
    let mut s = Stats {
        done: 0,
        errors: 0,
        ticks: 0,
    };
    let t0 = arch::rdtsc();
    let end = t0 + ticks;
    let next = |now: u64| {
        if now >= end {
            return Next::Done;
        }
        Next::Submit(match w.pattern {
            Pattern::Random => (rand.next() % blocks) * sectors,
            Pattern::Sequential => {
                let s = seq * sectors;
                seq = (seq + 1) % blocks;
                s
            }
        })
    };
    // A request not completed within 2 s ends the run.
    drive(q, mem, &w.shape, w.name, 2, next, |d| {
        s.done += 1;
        if d.status != S_OK {
            s.errors += 1;
        }
        s.ticks = d.tsc - t0;
        Ok(())
    })?;
    Ok(s)
}
