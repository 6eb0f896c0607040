//! Hostile mode (`hostile=1`): after the stage-2 checks the guest attacks the VMM through
//! the first virtio-blk device — malformed descriptor chains, bad queue setups, a runaway
//! available index, junk accesses to the virtio and PCI configuration, a BAR move — and
//! after each attack checks that the device (reset and re-initialised if it asked for that
//! with DEVICE_NEEDS_RESET) still works. One `hostile.<attack>` check per attack; the details
//! name the outcome (`outcome=returned ...`, `outcome=needs_reset`, ...). See
//! docs/test-guest.md for what passes.
//!
//! Everything goes through the guest's virtio layer (`virtio.rs`): raw descriptor chains
//! ([`RawDesc`]), queue registers programmed as given ([`Transport::program_queue`]), single
//! accesses of any width and alignment ([`Region::write_any`]).
//!
//! [`Transport::program_queue`]: crate::virtio::Transport::program_queue
//! [`Region::write_any`]: crate::virtio::Region::write_any

use core::fmt::Write;

use crate::blk::{host_byte, status_name, Blk, SECTOR, S_OK, S_UNWRITTEN, T_IN};
use crate::pci::{self, BarKind, Bdf, Bus, Mech};
use crate::report::{check, StrBuf};
use crate::stage2::{Keys, Rng};
use crate::time::{self, Deadline};
use crate::virtio::{
    Buf, IrqTally, QueueRings, RawDesc, Region, Why, REQUEST_TIMEOUT_US, S_NEEDS_RESET,
};
use crate::{arch, println, why};

/// A guest-physical address outside RAM: 28 GiB, above the RAM of every guest the tests
/// configure and inside the guest's identity map. Devices are handed it in descriptors and
/// ring addresses; the guest itself never touches it.
pub const OUTSIDE_RAM: u64 = 0x7_0000_0000;

/// Device status FAILED.
const S_FAILED: u8 = 0x80;

/// How long the configuration interrupt may take after DEVICE_NEEDS_RESET shows.
const CONFIG_IRQ_WAIT_US: u64 = 100_000;

/// Check details.
type Detail = StrBuf<480>;

/// What one attack reports: PASS with a detail, or FAIL with why.
type Outcome = Result<Detail, Why>;

type Attack = fn(&mut Hostile<'_>) -> Outcome;

/// The attacks in the order they run; `survivors` comes last.
const ATTACKS: [(&str, Attack); 11] = [
    ("desc_oob", desc_oob),
    ("desc_loop", desc_loop),
    ("desc_zero_len", desc_zero_len),
    ("desc_huge", desc_huge),
    ("status_readonly", status_readonly),
    ("bad_queue_size", bad_queue_size),
    ("ring_oob", ring_oob),
    ("avail_idx_jump", avail_idx_jump),
    ("config_oob", config_oob),
    ("pci_cfg_junk", pci_cfg_junk),
    ("bar_move", bar_move),
];

struct Hostile<'a> {
    b: Blk,
    bus: &'a Bus,
    /// The disk holds the host pattern (`blk.pattern.sector` given): reads are compared.
    pattern: bool,
}

fn report(name: &str, r: &Outcome) {
    let mut n: StrBuf<48> = StrBuf::new();
    let _ = write!(n, "hostile.{name}");
    match r {
        Ok(d) => check(n.as_str(), true, format_args!("{d}")),
        Err(w) => check(n.as_str(), false, format_args!("{w}")),
    }
}

/// Runs every attack on `blk`, then `survivors` (`rng` and `blk` still work).
pub fn run(bus: &Bus, blk: Option<Blk>, rng: Option<Rng>, keys: &Keys<'_>) {
    let Some(b) = blk else {
        for name in ATTACKS.iter().map(|a| a.0).chain(["survivors"]) {
            report(
                name,
                &Err(why!("not attempted: no working virtio-blk device (blk0)")),
            );
        }
        return;
    };
    println!(
        "INFO hostile start {} {} capacity={} outside_ram={OUTSIDE_RAM:#x}",
        b.name, b.t.func.bdf, b.capacity
    );
    let mut h = Hostile {
        b,
        bus,
        pattern: keys.get("blk", 0, "pattern.sector").is_some(),
    };
    for (name, attack) in ATTACKS {
        let r = ready(&mut h).and_then(|()| attack(&mut h));
        report(name, &r);
    }
    let r = ready(&mut h).and_then(|()| survivors(&mut h, rng));
    report("survivors", &r);
}

/// Before an attack: a device a previous attack left broken is reset and set up again, so
/// that each attack starts from a working device.
fn ready(h: &mut Hostile<'_>) -> Result<(), Why> {
    let st = h.b.t.status();
    if h.b.dead.is_some() || h.b.queues[0].is_none() || st & (S_NEEDS_RESET | S_FAILED) != 0 {
        h.b.reinit()
            .map_err(|w| why!("not attempted: the device (status {st:#x}) cannot be re-initialised after the previous attack: {w}"))?;
    }
    Ok(())
}

fn config_irqs(h: &Hostile<'_>) -> u64 {
    h.b.t.config_vector().map_or(0, arch::irq_count)
}

/// Waits (at most `us`) until vector `v` has counted more than `before` interrupts.
fn wait_irq(v: Option<u8>, before: u64, us: u64) -> bool {
    let Some(v) = v else {
        return false;
    };
    let d = Deadline::after_us(us);
    while arch::irq_count(v) <= before {
        if d.passed() {
            return false;
        }
        arch::pause();
    }
    true
}

/// Reads sector 0 on queue 0 and requires the host pattern (if given) and the queue's
/// interrupt.
fn read_ok(h: &mut Hostile<'_>, sector: u64) -> Result<(), Why> {
    let v = h.b.queues[0].as_ref().and_then(|q| q.vector);
    let before = v.map_or(0, arch::irq_count);
    h.b.read_sector_checked(sector, h.pattern)?;
    if v.is_some() && !wait_irq(v, before, 0) {
        return Err(why!("sector {sector} read completed without its interrupt"));
    }
    Ok(())
}

/// The end of every attack: if the device asked for a reset (DEVICE_NEEDS_RESET; FAILED is
/// treated alike) the configuration interrupt must have come (counted from `cfg_before`);
/// the device is reset and re-initialised. Then a normal read must work.
fn recover(h: &mut Hostile<'_>, d: &mut Detail, cfg_before: u64) -> Result<(), Why> {
    let st = h.b.t.status();
    if st & (S_NEEDS_RESET | S_FAILED) != 0 {
        if st & S_NEEDS_RESET != 0
            && !wait_irq(h.b.t.config_vector(), cfg_before, CONFIG_IRQ_WAIT_US)
        {
            return Err(why!(
                "{d}; DEVICE_NEEDS_RESET (status {st:#x}) without a configuration interrupt"
            ));
        }
        h.b.reinit()
            .map_err(|w| why!("{d}; re-initialisation after status {st:#x} failed: {w}"))?;
        let _ = write!(d, "; reset and re-initialised");
    }
    read_ok(h, 0).map_err(|w| why!("{d}; afterwards: {w}"))?;
    let _ = write!(d, "; sector 0 read OK afterwards");
    Ok(())
}

/// A descriptor linked to the one at position `next`.
fn link(buf: Buf, next: usize) -> RawDesc {
    RawDesc {
        buf,
        next: Some(next),
    }
}

/// The last descriptor of a chain.
fn last(buf: Buf) -> RawDesc {
    RawDesc { buf, next: None }
}

/// What became of a chain.
enum Fate {
    /// It came back in the used ring: used length and status byte.
    Returned { len: u32, status: u8 },
    /// The device set DEVICE_NEEDS_RESET instead of returning it.
    NeedsReset,
}

/// Submits `descs` on queue 0 and waits (at most 2 s) until the chain comes back or the
/// device sets DEVICE_NEEDS_RESET.
fn submit(h: &mut Hostile<'_>, descs: &[RawDesc]) -> Result<Fate, Why> {
    let b = &mut h.b;
    let Some(q) = b.queues[0].as_mut() else {
        return Err(why!("queue 0 not set up"));
    };
    if q.add_raw(descs).is_none() {
        return Err(why!("no free descriptors"));
    }
    q.kick();
    let d = Deadline::after_us(REQUEST_TIMEOUT_US);
    let mut spins = 0u32;
    let used = loop {
        if let Some(u) = q.pop_used() {
            break Some(u);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) && b.t.status() & S_NEEDS_RESET != 0 {
            break None;
        }
        if d.passed() {
            return Err(why!(
                "the chain was neither returned nor did the device set DEVICE_NEEDS_RESET within 2 s (status {:#x})",
                b.t.status()
            ));
        }
        arch::pause();
    };
    match used {
        Some(u) if !u.known => Err(why!("the device returned bogus descriptor id {}", u.id)),
        Some(u) => Ok(Fate::Returned {
            len: u.len,
            status: b.status_byte(),
        }),
        None => Ok(Fate::NeedsReset),
    }
}

/// A malformed chain: submitted, its fate judged by `judge` (for returned chains: used
/// length and status byte; `Err` when the device did what it must not), then [`recover`].
fn chain_attack(
    h: &mut Hostile<'_>,
    what: &str,
    descs: &[RawDesc],
    judge: fn(u32, u8) -> Result<(), &'static str>,
) -> Outcome {
    let cfg0 = config_irqs(h);
    let mut d = Detail::new();
    let _ = write!(d, "{what}: ");
    match submit(h, descs)? {
        Fate::Returned { len, status } => {
            let _ = write!(
                d,
                "outcome=returned used_len={len} status={}",
                status_name(status)
            );
            judge(len, status).map_err(|e| why!("{d}: {e}"))?;
        }
        Fate::NeedsReset => {
            let _ = write!(d, "outcome=needs_reset");
        }
    }
    recover(h, &mut d, cfg0)?;
    Ok(d)
}

/// For chains the device cannot have served: no OK status, nothing claimed written but the
/// status byte.
fn not_served(len: u32, status: u8) -> Result<(), &'static str> {
    if status == S_OK {
        return Err("status OK for a request the device cannot have carried out");
    }
    if len > 1 {
        return Err("used length claims data was written");
    }
    Ok(())
}

fn desc_oob(h: &mut Hostile<'_>) -> Outcome {
    let (hdr, st) = h.b.prepare(T_IN, 0);
    let data = Buf {
        addr: OUTSIDE_RAM,
        len: SECTOR as u32,
        write: true,
    };
    chain_attack(
        h,
        "read of sector 0 into a data descriptor at 0x7_0000_0000 (outside RAM)",
        &[link(hdr, 1), link(data, 2), last(st)],
        not_served,
    )
}

fn desc_loop(h: &mut Hostile<'_>) -> Outcome {
    let (hdr, _) = h.b.prepare(T_IN, 0);
    let data = h.b.data_buf(SECTOR as u32, true);
    chain_attack(
        h,
        "header -> data descriptor whose next is itself (NEXT set)",
        &[link(hdr, 1), link(data, 1)],
        |_, status| {
            if status == S_OK {
                Err("status OK for a chain without an end")
            } else {
                Ok(())
            }
        },
    )
}

fn desc_zero_len(h: &mut Hostile<'_>) -> Outcome {
    let (hdr, st) = h.b.prepare(T_IN, 0);
    let data = h.b.data_buf(0, true);
    chain_attack(
        h,
        "read of sector 0 with a 0-byte data descriptor",
        &[link(hdr, 1), link(data, 2), last(st)],
        // A 0-byte read is a legal no-op for a device that reads chains as byte streams:
        // OK is allowed, as long as no data is claimed.
        |len, _| {
            if len > 1 {
                Err("used length claims data was written")
            } else {
                Ok(())
            }
        },
    )
}

fn desc_huge(h: &mut Hostile<'_>) -> Outcome {
    let (hdr, st) = h.b.prepare(T_IN, 0);
    let data = h.b.data_buf(0xffff_ffff, true);
    chain_attack(
        h,
        "read of sector 0 into a data descriptor of 0xffffffff bytes (crosses the 3-4 GiB hole)",
        &[link(hdr, 1), link(data, 2), last(st)],
        not_served,
    )
}

fn status_readonly(h: &mut Hostile<'_>) -> Outcome {
    let (hdr, mut st) = h.b.prepare(T_IN, 0);
    st.write = false;
    let data = h.b.data_buf(SECTOR as u32, true);
    chain_attack(
        h,
        "read of sector 0 whose status descriptor is device-readable (after a writable one)",
        &[link(hdr, 1), link(data, 2), last(st)],
        |_, status| {
            if status == S_UNWRITTEN {
                Ok(())
            } else {
                Err("the device wrote into a device-readable descriptor")
            }
        },
    )
}

/// Resets the device and sets queue 0 up with `rings` as given (negotiation and MSI-X as
/// before), then DRIVER_OK. The device must set DEVICE_NEEDS_RESET and raise the
/// configuration interrupt (`outcome=needs_reset`) or accept the setup
/// (`outcome=accepted`: the spec does not say what a device does with it); either way it is
/// reset and set up properly afterwards and must work.
fn bad_setup(
    h: &mut Hostile<'_>,
    d: &mut Detail,
    rings: impl Fn(u16) -> QueueRings,
) -> Result<(), Why> {
    let b = &mut h.b;
    b.queues = [None, None];
    b.t.negotiate(b.t.features)?;
    if let Some(entries) = b.t.msix.map(|m| m.entries) {
        b.t.setup_msix(entries, b.apic_id)?;
    }
    let max = b.t.queue_max(0);
    let r = rings(max);
    let _ = write!(
        d,
        "queue 0 size={} (max {max}) desc={:#x} driver={:#x} device={:#x}",
        r.size, r.desc, r.driver, r.device
    );
    let cfg0 = config_irqs(h);
    if let Err(w) = h.b.t.program_queue(0, r) {
        let _ = write!(d, " [{w}]");
    }
    h.b.t.set_driver_ok();
    let irq = wait_irq(h.b.t.config_vector(), cfg0, CONFIG_IRQ_WAIT_US);
    let st = h.b.t.status();
    if st & S_NEEDS_RESET != 0 {
        let _ = write!(d, ": outcome=needs_reset status={st:#x} config_irq={irq}");
        if !irq {
            return Err(why!(
                "{d}: DEVICE_NEEDS_RESET without a configuration interrupt"
            ));
        }
    } else {
        let _ = write!(d, ": outcome=accepted status={st:#x} config_irq={irq}");
    }
    // Whatever the device did, the driver now resets it and sets it up properly.
    h.b.reinit()
        .map_err(|w| why!("{d}; re-initialisation failed: {w}"))?;
    let _ = write!(d, "; reset and re-initialised");
    read_ok(h, 0).map_err(|w| why!("{d}; afterwards: {w}"))?;
    let _ = write!(d, "; sector 0 read OK afterwards");
    Ok(())
}

fn queue0_rings(h: &Hostile<'_>) -> Result<QueueRings, Why> {
    h.b.queues[0]
        .as_ref()
        .map(|q| q.rings())
        .ok_or_else(|| why!("queue 0 not set up"))
}

fn bad_queue_size(h: &mut Hostile<'_>) -> Outcome {
    let good = queue0_rings(h)?;
    let mut d = Detail::new();
    bad_setup(h, &mut d, |_| QueueRings { size: 3, ..good })?;
    let _ = write!(d, " | ");
    bad_setup(h, &mut d, |max| QueueRings {
        size: max.saturating_mul(2),
        ..good
    })?;
    Ok(d)
}

fn ring_oob(h: &mut Hostile<'_>) -> Outcome {
    let good = queue0_rings(h)?;
    let mut d = Detail::new();
    bad_setup(h, &mut d, |_| QueueRings {
        desc: OUTSIDE_RAM,
        ..good
    })?;
    Ok(d)
}

fn avail_idx_jump(h: &mut Hostile<'_>) -> Outcome {
    let cfg0 = config_irqs(h);
    let mut d = Detail::new();
    // Every available slot names the same harmless chain (a read of sector 0), so a device
    // that serves the bogus entries only reads.
    let (hdr, st) = h.b.prepare(T_IN, 0);
    let data = h.b.data_buf(SECTOR as u32, true);
    let b = &mut h.b;
    let Some(q) = b.queues[0].as_mut() else {
        return Err(why!("queue 0 not set up"));
    };
    let used0 = q.used_idx();
    let Some(head) = q.add(&[hdr, data, st]) else {
        return Err(why!("no free descriptors"));
    };
    for slot in 0..q.size {
        q.set_avail_slot_raw(slot, head);
    }
    let size = q.size;
    let jump = used0.wrapping_add(size).wrapping_add(8);
    q.set_avail_idx_raw(jump);
    q.kick();
    let _ = write!(
        d,
        "avail idx {used0} -> {jump} (queue size {size}, chain {head} in every slot)"
    );
    let deadline = Deadline::after_us(500_000);
    let mut needs_reset = false;
    while !deadline.passed() {
        if b.t.status() & S_NEEDS_RESET != 0 {
            needs_reset = true;
            break;
        }
        time::delay_us(1000);
    }
    let Some(q) = b.queues[0].as_ref() else {
        return Err(why!("queue 0 not set up"));
    };
    let n1 = q.used_idx().wrapping_sub(used0);
    time::delay_us(100_000);
    let n2 = q.used_idx().wrapping_sub(used0);
    if n2 != n1 {
        return Err(why!(
            "{d}: the device is still returning chains ({n1} then {n2} used entries)"
        ));
    }
    if u32::from(n2) > u32::from(size) + 8 {
        return Err(why!(
            "{d}: the device returned {n2} used entries, more than the driver made available"
        ));
    }
    let _ = write!(
        d,
        ": outcome={} used_entries={n2}",
        if needs_reset {
            "needs_reset"
        } else if n2 == 0 {
            "ignored"
        } else {
            "served"
        }
    );
    // The available ring is garbage now: the driver resets the device in any case
    // (`recover` does it when the device asked for it).
    if h.b.t.status() & (S_NEEDS_RESET | S_FAILED) == 0 {
        h.b.reinit()
            .map_err(|w| why!("{d}; re-initialisation failed: {w}"))?;
        let _ = write!(d, "; reset and re-initialised");
    }
    recover(h, &mut d, cfg0)?;
    Ok(d)
}

/// Reads the read-only and driver-programmed fields a junk write must not change.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct CommonSnapshot {
    device_features: u64,
    num_queues: u16,
    status: u8,
    config_vector: u16,
    q0_size: u16,
    q0_vector: u16,
    q0_enable: u16,
    q0_desc: u64,
    capacity: Option<u64>,
}

fn common_snapshot(h: &Hostile<'_>) -> CommonSnapshot {
    let c = h.b.t.common();
    c.w32(0x00, 0);
    let lo = c.r32(0x04);
    c.w32(0x00, 1);
    let hi = c.r32(0x04);
    c.w16(0x16, 0);
    CommonSnapshot {
        device_features: (u64::from(hi) << 32) | u64::from(lo),
        num_queues: c.r16(0x12),
        status: c.r8(0x14),
        config_vector: c.r16(0x10),
        q0_size: c.r16(0x18),
        q0_vector: c.r16(0x1a),
        q0_enable: c.r16(0x1c),
        q0_desc: u64::from(c.r32(0x20)) | (u64::from(c.r32(0x24)) << 32),
        capacity: crate::blk::read_capacity(&h.b.t).map(|c| c.0),
    }
}

impl CommonSnapshot {
    /// The fields that differ from `o`, as `name a -> b`.
    fn diff(&self, o: &CommonSnapshot) -> StrBuf<200> {
        let mut d = StrBuf::new();
        let mut field = |name: &str, a: u64, b: u64| {
            if a != b {
                let _ = write!(d, " {name} {a:#x} -> {b:#x}");
            }
        };
        field("device_feature", self.device_features, o.device_features);
        field("num_queues", self.num_queues.into(), o.num_queues.into());
        field("device_status", self.status.into(), o.status.into());
        field(
            "config_msix_vector",
            self.config_vector.into(),
            o.config_vector.into(),
        );
        field("q0.size", self.q0_size.into(), o.q0_size.into());
        field("q0.msix_vector", self.q0_vector.into(), o.q0_vector.into());
        field("q0.enable", self.q0_enable.into(), o.q0_enable.into());
        field("q0.desc", self.q0_desc, o.q0_desc);
        field(
            "capacity",
            self.capacity.unwrap_or(u64::MAX),
            o.capacity.unwrap_or(u64::MAX),
        );
        d
    }
}

/// One junk access: offset, width, value (`None`: a read).
type Junk = (u64, u8, Option<u64>);

/// Makes the accesses in `junk` that fit in `r`; after each write the common configuration
/// and capacity must read as in `before`. Returns the number of accesses made.
fn apply(
    h: &Hostile<'_>,
    r: &Region,
    tag: &str,
    junk: &[Junk],
    before: &CommonSnapshot,
) -> Result<usize, Why> {
    let mut n = 0;
    for &(off, width, v) in junk {
        if off + u64::from(width) > r.len() {
            continue;
        }
        n += 1;
        let Some(v) = v else {
            let _ = r.read_any(off, width);
            continue;
        };
        r.write_any(off, width, v);
        let now = common_snapshot(h);
        if now != *before {
            return Err(why!(
                "a {width}-byte write of {v:#x} at {tag}+{off:#x} changed:{}",
                before.diff(&now)
            ));
        }
    }
    Ok(n)
}

fn config_oob(h: &mut Hostile<'_>) -> Outcome {
    let cfg0 = config_irqs(h);
    let before = common_snapshot(h);
    let mut d = Detail::new();
    let _ = write!(d, "accesses");
    let common = *h.b.t.common();
    // Read-only fields at natural and odd widths and offsets; 8-byte accesses; unaligned
    // accesses next to device_status.
    let common_junk: [Junk; 12] = [
        (0x04, 4, Some(0xdead_beef)),       // device_feature (RO)
        (0x12, 2, Some(0x1234)),            // num_queues (RO)
        (0x12, 1, Some(0x7f)),              // num_queues, one byte
        (0x15, 1, Some(0x5a)),              // config_generation (RO)
        (0x1e, 2, Some(0x77)),              // queue_notify_off (RO)
        (0x00, 8, Some(0xdead_beef << 32)), // device_feature_select = 0, device_feature (RO)
        (0x13, 2, Some(0xffff)),            // unaligned word over num_queues/device_status
        (0x11, 4, Some(0xffff_ffff)),       // unaligned dword, ditto
        (0x00, 8, None),
        (0x13, 2, None),
        (0x11, 4, None),
        (0x1d, 8, None),
    ];
    let n = apply(h, &common, "common", &common_junk, &before).map_err(|w| why!("{d}: {w}"))?;
    let _ = write!(d, " common:{n}");
    // Past the common configuration structure, up to the next structure in its BAR.
    if let Some(gap) = h.b.t.common_gap() {
        let end = gap.len();
        let gap_junk: [Junk; 10] = [
            (0, 1, Some(0xff)),
            (1, 2, Some(0xffff)),
            (3, 4, Some(0xffff_ffff)),
            (8, 8, Some(u64::MAX)),
            (end.saturating_sub(8), 8, Some(u64::MAX)),
            (end.saturating_sub(1), 1, Some(0xff)),
            (0, 8, None),
            (3, 4, None),
            (end.saturating_sub(8), 8, None),
            (end.saturating_sub(1), 1, None),
        ];
        let n = apply(h, &gap, "common_end", &gap_junk, &before).map_err(|w| why!("{d}: {w}"))?;
        let _ = write!(d, " past_common:{n}");
    }
    // Device configuration: the read-only capacity at odd widths, and past the end of
    // struct virtio_blk_config (60 bytes) inside the window. The writable field
    // (writeback, 0x20) is left alone.
    if let Some(dev) = h.b.t.device {
        let dev_junk: [Junk; 9] = [
            (0x00, 4, Some(0xffff_ffff)),
            (0x01, 2, Some(0xffff)),
            (0x04, 8, Some(u64::MAX)),
            (0x100, 4, Some(0xffff_ffff)),
            (0x101, 2, Some(0xffff)),
            (0x200, 8, Some(u64::MAX)),
            (dev.len().saturating_sub(1), 1, Some(0xff)),
            (0x01, 8, None),
            (0x101, 4, None),
        ];
        let n = apply(h, &dev, "device", &dev_junk, &before).map_err(|w| why!("{d}: {w}"))?;
        let _ = write!(d, " device:{n}");
    }
    let after = common_snapshot(h);
    let _ = write!(
        d,
        "; read-only fields, status, queue 0 and capacity unchanged after each write (features={:#x} num_queues={} status={:#x} capacity={:?})",
        after.device_features, after.num_queues, after.status, after.capacity
    );
    recover(h, &mut d, cfg0)?;
    Ok(d)
}

/// The configuration space (first 256 bytes) as junk writes must leave it: every dword but
/// those of the PCI configuration access capability (cfg_type 5), whose window fields are
/// the driver's to write.
#[derive(Clone, Copy, PartialEq, Eq)]
struct PciSnapshot {
    space: [u32; 64],
    ncaps: usize,
}

fn pci_snapshot(m: Mech, b: Bdf, header: u8) -> PciSnapshot {
    let caps = pci::caps(m, b, header);
    let mut space: [u32; 64] = core::array::from_fn(|i| m.read32(b, 4 * i as u16));
    for at in caps.with_id(pci::CAP_VENDOR) {
        if m.read8(b, u16::from(at) + 3) == 5 {
            // The header dword stays in; bar, offset, length and data are writable.
            for w in space.iter_mut().skip(usize::from(at) / 4 + 1).take(4) {
                *w = 0;
            }
        }
    }
    PciSnapshot {
        space,
        ncaps: caps.n,
    }
}

impl PciSnapshot {
    /// The first dword that differs from `o`.
    fn diff(&self, o: &PciSnapshot) -> Option<(usize, u32, u32)> {
        (0..64)
            .find(|&i| self.space[i] != o.space[i])
            .map(|i| (4 * i, self.space[i], o.space[i]))
    }
}

fn pci_cfg_junk(h: &mut Hostile<'_>) -> Outcome {
    let cfg0 = config_irqs(h);
    let f = h.b.t.func;
    let b = f.bdf;
    let m = h.b.t.mech();
    let before = pci_snapshot(m, b, f.header);
    let io_before = pci_snapshot(Mech::Io, b, f.header);
    let mut d = Detail::new();
    m.write32(b, 0x00, 0xffff_ffff); // vendor/device ID
    m.write32(b, 0x08, 0); // class code, revision
    m.write32(b, 0x2c, 0xffff_ffff); // subsystem IDs
    let rom = m.read32(b, 0x30); // expansion ROM BAR: probed, then put back
    m.write32(b, 0x30, 0xffff_ffff);
    m.write32(b, 0x30, rom);
    m.write32(b, 0x34, 0xffff_ffff); // capability pointer
    m.write16(b, 0x02, 0x1234);
    m.write8(b, 0x00, 0);
    m.write8(b, 0x0e, 0x80); // header type (multi-function bit)
    m.write8(b, 0x34, 0x00);
    m.write8(b, 0x34, 0x41); // misaligned capability pointer
                             // Capability headers (ID and next pointer) are read-only; so are the virtio
                             // capabilities' bodies except the PCI configuration access window.
    let caps = pci::caps(m, b, f.header);
    for &(at, id) in &caps.list[..caps.n] {
        let a = u16::from(at);
        m.write8(b, a, 0xff);
        m.write8(b, a + 1, at);
        if id == pci::CAP_VENDOR && m.read8(b, a + 3) != 5 {
            m.write8(b, a + 3, 5);
            m.write32(b, a + 4, 0x0000_0005);
            m.write32(b, a + 8, 0xffff_fff0);
            m.write32(b, a + 12, 0xffff_ffff);
        }
        if id == pci::CAP_MSIX {
            m.write32(b, a + 4, 0xffff_fff7); // table offset/BIR (RO)
            m.write32(b, a + 8, 0xffff_fff7); // PBA offset/BIR (RO)
        }
    }
    let mut odd = 0;
    // Unaligned and over-wide ECAM accesses; bytes that would reach COMMAND carry its
    // current value so that a VMM that splits them changes nothing.
    if let Some(base) = match m {
        Mech::Ecam(bases) => bases.base(b.seg),
        Mech::Io => None,
    } {
        let fa = base + (u64::from(b.dev) << 15) + (u64::from(b.func) << 12);
        let cmd = u64::from(m.read16(b, 0x04));
        crate::phys::mmio_write_any(fa + 1, 2, 0xffff);
        crate::phys::mmio_write_any(fa + 2, 4, 0xffff | (cmd << 16));
        crate::phys::mmio_write_any(fa + 3, 1, 0x00);
        crate::phys::mmio_write_any(fa + 8, 8, u64::from(m.read32(b, 0x0c)) << 32);
        // Latency timer (may be writable: its current value) and header type (read-only).
        let latency = u64::from(m.read8(b, 0x0d));
        crate::phys::mmio_write_any(fa + 0x0d, 2, 0xff00 | latency);
        let _ = crate::phys::mmio_read_any(fa + 1, 2);
        let _ = crate::phys::mmio_read_any(fa + 3, 4);
        let _ = crate::phys::mmio_read_any(fa, 8);
        let _ = crate::phys::mmio_read_any(fa + 0xffe, 2);
        let _ = crate::phys::mmio_read_any(fa + 0xffc, 8);
        odd += 10;
        // An absent function on bus 0 and a function on bus 1 (no bridge there).
        let absent = (0..32u8)
            .rev()
            .map(|dev| Bdf {
                seg: b.seg,
                dev,
                func: 7,
            })
            .find(|x| {
                h.bus.functions().iter().all(|g| g.bdf != *x) && m.read32(*x, 0) & 0xffff == 0xffff
            });
        if let Some(x) = absent {
            m.write32(x, 0x00, 0);
            m.write32(x, 0x04, 0xffff_ffff);
            m.write32(x, 0x10, 0xffff_ffff);
            let id = m.read32(x, 0);
            if id != 0xffff_ffff {
                return Err(why!(
                    "absent function {x} reads ID {id:#x} after junk writes"
                ));
            }
            odd += 4;
        }
        let bus1 = base + (1 << 20);
        if crate::phys::readable(bus1, 4) {
            crate::phys::mmio_write32(bus1 + 4, 0xffff_ffff);
            let id = crate::phys::mmio_read32(bus1);
            if id != 0xffff_ffff {
                return Err(why!("bus 1 device 0 reads ID {id:#x} (nothing is there)"));
            }
            odd += 2;
        }
    }
    // Mechanism #1 with reserved address bits set, and a byte write into the device ID.
    let addr = 0x8000_0000 | (u32::from(b.dev) << 11) | (u32::from(b.func) << 8);
    arch::outl(0xcf8, addr | 0x2);
    let _ = arch::inl(0xcfc);
    arch::outl(0xcf8, addr);
    arch::outw(0xcfe, 0x1234);
    arch::outb(0xcfd, 0x00);
    let _ = arch::inw(0xcfd);
    odd += 6;
    let after = pci_snapshot(m, b, f.header);
    let io_after = pci_snapshot(Mech::Io, b, f.header);
    let _ = write!(
        d,
        "junk writes to IDs, class, header type, ROM BAR, capability pointer and headers, virtio and MSI-X capability bodies; {odd} unaligned/over-wide/absent-function accesses"
    );
    for (how, a, z) in [("ECAM", &before, &after), ("0xcf8", &io_before, &io_after)] {
        if let Some((off, was, now)) = a.diff(z) {
            return Err(why!(
                "{d}: configuration dword {off:#x} read {was:#x}, now {now:#x} ({how})"
            ));
        }
    }
    let _ = write!(
        d,
        "; ID {:04x}:{:04x}: all 256 bytes (IDs, class, header, COMMAND, BARs, {} capabilities) unchanged through ECAM and 0xcf8",
        after.space[0] & 0xffff,
        after.space[0] >> 16,
        after.ncaps
    );
    recover(h, &mut d, cfg0)?;
    Ok(d)
}

/// An address to move BAR `i` of the device to: 256 MiB further up for a 64-bit BAR, or a
/// free slot in Nimbus's 32-bit window (0xc0000000..0xe0000000) for a 32-bit BAR there,
/// never overlapping another assigned BAR on the bus.
fn free_bar_address(h: &Hostile<'_>, i: usize) -> Option<u64> {
    let bar = h.b.t.func.bars[i];
    let overlaps = |a: u64| {
        h.bus.functions().iter().any(|f| {
            f.bars.iter().any(|o| {
                o.assigned()
                    && o.kind != BarKind::Io
                    && a < o.addr.saturating_add(o.size)
                    && o.addr < a + bar.size
            })
        })
    };
    let usable = |a: u64| !overlaps(a) && crate::phys::readable(a, bar.size);
    match bar.kind {
        BarKind::Mem64 => (1..8u64)
            .map(|k| bar.addr + k * 0x1000_0000)
            .find(|&a| usable(a)),
        BarKind::Mem32 if (0xc000_0000..0xe000_0000).contains(&bar.addr) => {
            let slots = 0x2000_0000 / bar.size;
            (0..slots)
                .map(|k| 0xc000_0000 + k * bar.size)
                .find(|&a| a != bar.addr && usable(a))
        }
        _ => None,
    }
}

fn bar_move(h: &mut Hostile<'_>) -> Outcome {
    let mut d = Detail::new();
    let Some(i) = h.b.t.notify_bar() else {
        return Err(why!("no memory BAR holds the notification window"));
    };
    let old = h.b.t.func.bars[i];
    let Some(new) = free_bar_address(h, i) else {
        return Err(why!(
            "BAR {i} ({:?} at {:#x}, size {:#x}): no address known to be free",
            old.kind,
            old.addr,
            old.size
        ));
    };
    let before = common_snapshot(h);
    let old_notify = h.b.queues[0].as_ref().map_or(0, |q| q.notify_addr());
    h.b.t.move_bar(i, new)?;
    for q in h.b.queues.iter_mut().flatten() {
        q.follow(&h.b.t);
    }
    let _ = write!(d, "BAR {i} moved {:#x} -> {new:#x}", old.addr);
    let after = common_snapshot(h);
    if after != before {
        return Err(why!(
            "{d}: the registers read differently at the new place: {before:x?} / {after:x?}"
        ));
    }
    // Nothing may answer at the old place any more.
    let stale = crate::phys::mmio_read_any(old.addr + (h.b.t.common().base() - new) + 0x12, 2);
    if stale == u64::from(before.num_queues) {
        return Err(why!(
            "{d}: num_queues still reads {stale:#x} at the old address"
        ));
    }
    // A request made available and notified at the OLD notification address must not be
    // served (the ioeventfd must have moved away from there); notified at the new one it
    // completes with its interrupt.
    let (hdr, st) = h.b.prepare(T_IN, 1);
    let data = h.b.data_buf(SECTOR as u32, true);
    for k in 0..SECTOR as usize {
        h.b.data.write8(k, 0);
    }
    let Some(q) = h.b.queues[0].as_mut() else {
        return Err(why!("queue 0 not set up"));
    };
    let used0 = q.used_idx();
    if q.add(&[hdr, data, st]).is_none() {
        return Err(why!("no free descriptors"));
    }
    let vector = q.vector;
    let irq0 = vector.map_or(0, arch::irq_count);
    crate::phys::mmio_write_any(old_notify, 2, u64::from(q.index));
    time::delay_us(100_000);
    if q.used_idx() != used0 {
        return Err(why!(
            "{d}: a notification at the old address {old_notify:#x} was still served"
        ));
    }
    let t0 = arch::rdtsc();
    q.kick();
    let deadline = Deadline::after_us(REQUEST_TIMEOUT_US);
    let used = loop {
        if let Some(u) = q.pop_used() {
            break Some(u);
        }
        if deadline.passed() {
            break None;
        }
        arch::pause();
    };
    let Some(u) = used else {
        return Err(why!(
            "{d}: a notification at the new address {:#x} was not served within 2 s",
            q.notify_addr()
        ));
    };
    let irq = wait_irq(vector, irq0, REQUEST_TIMEOUT_US);
    let us = time::us_since(t0);
    let status = h.b.status_byte();
    let _ = write!(
        d,
        "; old notify {old_notify:#x} ignored for 100 ms; kick at new {:#x}: used_len={} status={} irq={irq} in {us} us",
        h.b.queues[0].as_ref().map_or(0, |q| q.notify_addr()),
        u.len,
        status_name(status)
    );
    if status != S_OK || (vector.is_some() && !irq) {
        return Err(why!(
            "{d}: the request through the moved BAR did not complete properly"
        ));
    }
    if h.pattern {
        if let Some(w) = h.b.mismatch(1, SECTOR as usize, host_byte) {
            return Err(why!("{d}: sector 1: {w}"));
        }
    }
    Ok(d)
}

fn survivors(h: &mut Hostile<'_>, rng: Option<Rng>) -> Outcome {
    let mut d = Detail::new();
    match rng {
        Some(mut r) => {
            let mut tally = IrqTally::default();
            let got = r.read64(&mut tally);
            let _ = write!(
                d,
                "rng: {got} (interrupts {}/{})",
                tally.signalled, tally.waited
            );
            if !got.ok() || tally.signalled != tally.waited {
                return Err(why!("{d}"));
            }
        }
        None => return Err(why!("no working virtio-rng device (rng0)")),
    }
    let last = h.b.capacity.saturating_sub(1);
    for s in [0, last] {
        read_ok(h, s).map_err(|w| why!("{d}; blk: {w}"))?;
    }
    let _ = write!(d, "; blk: sectors 0 and {last} read OK with interrupts");
    Ok(d)
}
