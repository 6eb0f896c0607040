//! Network transmit benchmark (`bench=net`): Ethernet frames (ethertype 0x88b5) sent on the
//! first virtio-net device as fast as it takes them, for `bench.secs` seconds per frame size
//! (`bench.frame=BYTES[,BYTES...]`, default 1514 and 64). Prints per size
//! `BENCH net.tx.<size> <rate> frames/s` and `BENCH net.tx.<size>.mbps <rate> Mbit/s`
//! (the guest's view: frames the device returned, timed by the TSC) and a `bench.net` check
//! (every frame came back, no bogus id, no stall). No receive traffic.
//!
//! Like the block benchmark (bench.rs): the stage-1 memory, SMP and RTC checks are skipped,
//! the PCI checks find the device, the TSC rate is measured against the CMOS clock, and
//! completions are found by polling the used ring at CPL3 with used-buffer notifications off
//! (VIRTQ_AVAIL_F_NO_INTERRUPT): an interrupt costs an emulated CPL0 entry on PVM hosts.
//!
//! How frames go: the transmit queue (queue 1) is kept full — every descriptor (at most 64,
//! the guest's queue size) holds one frame, one descriptor per frame (the 12-byte
//! virtio_net_hdr_v1, all zeroes, and the frame behind it in one device-readable buffer, each
//! in its own 2 KiB slot). Every used element taken is refilled at once; after each round of
//! refills the device is notified unless it has set VIRTQ_USED_F_NO_NOTIFY (it is still
//! working through the ring). The frames' content never changes, so a slot can be reused as
//! soon as its descriptor comes back.
//!
//! For the host side (scripts/bench-net), each size is framed by two lines:
//! `INFO bench net.tx.<size> start ...` just before the first frame and
//! `INFO bench net.tx.<size> stop ...` once the last one came back; the host counts what
//! reached its TAP in between. Nothing is sent for 0.5 s after a `stop` line.

use core::fmt::Write;

use crate::acpi::Acpi;
use crate::net::{self, Mac, BROADCAST, ETHERTYPE, ETH_HLEN, F_MAC, HDR_LEN, MAX_FRAME};
use crate::report::StrBuf;
use crate::stage2::{self, Keys};
use crate::virtio::{Buf, DmaPage, Queue, Transport, Why, F_VERSION_1};
use crate::{arch, expect, println, time, why};

/// Frame sizes run without `bench.frame`.
const DEFAULT_SIZES: [usize; 2] = [MAX_FRAME, 64];
/// Most sizes one run takes.
const MAX_SIZES: usize = 8;
/// Smallest frame: an Ethernet header and the 46-byte minimum payload (no FCS).
const MIN_FRAME: usize = 60;
/// One frame (header + frame) per 2 KiB slot, a slot per descriptor.
const SLOT: usize = 2048;
const PAGE: usize = 4096;
const SLOTS: usize = 64;
const PAGES: usize = SLOTS * SLOT / PAGE;
/// Pause between two frame sizes.
const GAP_US: u64 = 500_000;

/// What one frame size did.
struct Stats {
    frames: u64,
    ticks: u64,
    /// Notifications sent (MMIO writes to the notify window).
    kicks: u64,
    /// Refill rounds after which the device had set VIRTQ_USED_F_NO_NOTIFY.
    kicks_skipped: u64,
    /// Most frames seen returned by one poll of the used ring.
    max_batch: u64,
    /// Polls of the used ring that found nothing new.
    empty_polls: u64,
    /// Used-buffer interrupts (MSI-X) that came anyway.
    irqs: u64,
}

/// `bench=net`: runs the benchmark and reports `bench.net`.
pub fn run(acpi: &Acpi, cmdline: &str, secs: u64) {
    match bench(acpi, cmdline, secs) {
        Ok(d) => crate::report::check("bench.net", true, format_args!("{d}")),
        Err(w) => crate::report::check("bench.net", false, format_args!("{w}")),
    }
}

/// The frame sizes asked for (`bench.frame`), or why they are unusable.
fn frame_sizes(cmdline: &str) -> Result<([usize; MAX_SIZES], usize), Why> {
    let mut sizes = [0; MAX_SIZES];
    let Some(v) = expect::value(cmdline, "bench.frame") else {
        sizes[..DEFAULT_SIZES.len()].copy_from_slice(&DEFAULT_SIZES);
        return Ok((sizes, DEFAULT_SIZES.len()));
    };
    let mut n = 0;
    for item in v.split(',') {
        let size = expect::parse_u64(item)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| (MIN_FRAME..=MAX_FRAME).contains(s))
            .ok_or_else(|| {
                why!("bad bench.frame value \"{item}\" ({MIN_FRAME}..={MAX_FRAME} bytes)")
            })?;
        if n == MAX_SIZES {
            return Err(why!("bench.frame: at most {MAX_SIZES} sizes"));
        }
        sizes[n] = size;
        n += 1;
    }
    Ok((sizes, n))
}

fn bench(acpi: &Acpi, cmdline: &str, secs: u64) -> Result<StrBuf<300>, Why> {
    let (sizes, nsizes) = frame_sizes(cmdline)?;
    let keys = Keys::new(cmdline);
    let dst = match expect::value(cmdline, "bench.dst") {
        None => BROADCAST,
        Some(v) => Mac::parse(v).ok_or_else(|| why!("bad bench.dst value"))?,
    };
    let (bus, apic_id) = stage2::setup(acpi, "");
    let Some(f) = stage2::functions_of(&bus, "net").next() else {
        return Err(why!("no modern virtio-net device"));
    };
    let mut t = Transport::probe(bus.mech, f)?;
    let name = "virtio.net0";
    let Some((mut queues, _)) = stage2::bring_up(&mut t, name, 1, F_VERSION_1 | F_MAC, 2, apic_id)
    else {
        return Err(why!("virtio-net initialisation failed"));
    };
    let src = net::check_mac(&t, name, keys.get("net", 0, "mac"));
    let Some(q) = queues[1].as_mut() else {
        return Err(why!("no transmitq"));
    };
    let Some(pages) = net::alloc_pages::<PAGES>() else {
        return Err(why!("out of DMA memory"));
    };
    let Some(khz) = time::calibrate_rtc() else {
        return Err(why!(
            "the CMOS clock does not tick: cannot calibrate the TSC"
        ));
    };
    let depth = usize::from(q.size).min(SLOTS);
    println!(
        "INFO bench net {} tsc_khz={khz} (CMOS clock) queue={}/{} in_flight={depth} src={src} dst={dst} secs={secs}",
        t.func.bdf, q.size, q.max
    );
    q.set_interrupts(false);
    let hz = khz * 1000;
    let mut total = 0u64;
    for (i, &size) in sizes[..nsizes].iter().enumerate() {
        if i > 0 {
            // A quiet gap, so the host reads the previous size's final counts in peace.
            time::delay_us(GAP_US);
        }
        for slot in 0..depth {
            write_frame(&pages, slot, size, dst, src);
        }
        println!("INFO bench net.tx.{size} start frame={size} bytes in_flight={depth}");
        let s = run_size(q, &pages, size, depth, secs * hz)?;
        total += s.frames;
        let elapsed = s.ticks as f64 / hz as f64;
        let fps = s.frames as f64 / elapsed;
        println!(
            "INFO bench net.tx.{size} stop frames={} secs={elapsed:.3} kicks={} kicks_skipped={} max_batch={} empty_polls={} irqs={}",
            s.frames, s.kicks, s.kicks_skipped, s.max_batch, s.empty_polls, s.irqs
        );
        println!("BENCH net.tx.{size} {fps:.0} frames/s");
        println!(
            "BENCH net.tx.{size}.mbps {:.1} Mbit/s",
            fps * size as f64 * 8.0 / 1e6
        );
    }
    let mut d = StrBuf::new();
    let _ = write!(
        d,
        "{total} frames in {nsizes} size(s) of {secs} s on {name}, every one returned"
    );
    Ok(d)
}

/// Where slot `k` is: its page and offset.
fn slot_at(pages: &[DmaPage; PAGES], k: usize) -> (DmaPage, usize) {
    (pages[k * SLOT / PAGE], (k * SLOT) % PAGE)
}

/// Writes the header and a `size`-byte frame into slot `k`: `dst`, `src`, ethertype 0x88b5,
/// the marker `NIMBUS-NET-BENCH`, then bytes counting up.
fn write_frame(pages: &[DmaPage; PAGES], k: usize, size: usize, dst: Mac, src: Mac) {
    let (page, off) = slot_at(pages, k);
    let mut buf = [0u8; HDR_LEN + MAX_FRAME];
    let frame = &mut buf[HDR_LEN..HDR_LEN + size];
    frame[..6].copy_from_slice(&dst.0);
    frame[6..12].copy_from_slice(&src.0);
    frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let marker = b"NIMBUS-NET-BENCH";
    for (o, b) in frame[ETH_HLEN..].iter_mut().enumerate() {
        *b = marker.get(o).copied().unwrap_or(o as u8);
    }
    page.write_bytes(off, &buf[..HDR_LEN + size]);
}

/// Puts the frame of slot `k` in the queue; returns its descriptor.
fn submit(q: &mut Queue, pages: &[DmaPage; PAGES], k: usize, size: usize) -> Result<u16, Why> {
    let (page, off) = slot_at(pages, k);
    let buf = Buf {
        addr: page.phys(off),
        len: (HDR_LEN + size) as u32,
        write: false,
    };
    q.add(&[buf]).ok_or_else(|| why!("no free descriptor"))
}

/// Keeps `depth` frames in flight for `ticks` TSC ticks, then lets the last ones come back.
/// Counts every frame returned; the time runs to the last one.
fn run_size(
    q: &mut Queue,
    pages: &[DmaPage; PAGES],
    size: usize,
    depth: usize,
    ticks: u64,
) -> Result<Stats, Why> {
    // Which slot each descriptor carries.
    let mut slot_of = [usize::MAX; SLOTS];
    let q_vector = q.vector;
    let mut s = Stats {
        frames: 0,
        ticks: 0,
        kicks: 1,
        kicks_skipped: 0,
        max_batch: 0,
        empty_polls: 0,
        irqs: 0,
    };
    let irqs = || q_vector.map_or(0, arch::irq_count);
    let irqs0 = irqs();
    let t0 = arch::rdtsc();
    let end = t0 + ticks;
    for k in 0..depth {
        let head = submit(q, pages, k, size)?;
        slot_of[usize::from(head)] = k;
    }
    q.kick();
    let mut in_flight = depth;
    // Nothing returned within 2 s (by the TSC rate) ends the run.
    let stall = 2 * time::tsc_khz() * 1000;
    let mut last_progress = t0;
    while in_flight > 0 {
        let mut batch = 0u64;
        let now = arch::rdtsc();
        while let Some(u) = q.pop_used() {
            let k = slot_of.get(u.id as usize).copied().unwrap_or(usize::MAX);
            if !u.known || k == usize::MAX {
                return Err(why!("net.tx.{size}: the device returned bogus id {}", u.id));
            }
            slot_of[u.id as usize] = usize::MAX;
            batch += 1;
            if now < end {
                let head = submit(q, pages, k, size)?;
                slot_of[usize::from(head)] = k;
            } else {
                in_flight -= 1;
            }
        }
        if batch == 0 {
            s.empty_polls += 1;
            if now - last_progress > stall {
                return Err(why!(
                    "net.tx.{size}: no frame returned for 2 s ({in_flight} in flight)"
                ));
            }
            arch::pause();
            continue;
        }
        last_progress = now;
        s.frames += batch;
        s.max_batch = s.max_batch.max(batch);
        s.ticks = now - t0;
        if now < end {
            if q.kick_if_needed() {
                s.kicks += 1;
            } else {
                s.kicks_skipped += 1;
            }
        }
    }
    s.irqs = irqs() - irqs0;
    Ok(s)
}
