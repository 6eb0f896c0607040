//! virtio-balloon checks (`virtio.balloon<n>.*`), driven with the host: the guest
//! touches `balloon.mib` MiB of its RAM at `balloon.base` (default 128 MiB),
//! prints `INFO virtio.balloon<n>.touched`, and waits for the host to raise the
//! target (`vm.resize desired_balloon`, a configuration change interrupt); it
//! then inflates exactly those pages, prints `INFO virtio.balloon<n>.inflated`
//! and waits for the target to fall to 0, checks that the pages it gave read
//! as zeros (the host dropped them) and deflates them.

use core::fmt::Write;

use crate::report::StrBuf;
use crate::stage2::{self, check_named, Keys};
use crate::virtio::{Buf, DmaPage, Queue, Transport, F_VERSION_1};
use crate::{arch, expect, phys, println, time};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Page numbers per request (one DMA page of le32s).
const PFNS_PER_REQUEST: u64 = 1024;
/// How long the guest waits for the host to change the target.
const WAIT_US: u64 = 30_000_000;
/// What the guest writes into every page it touches.
const TOUCH: u8 = 0x5a;

fn num_pages(t: &Transport) -> u32 {
    t.read_config(|r| r.r32(0)).unwrap_or(u32::MAX)
}

/// Configuration change interrupts so far (0 without MSI-X).
fn config_irqs(t: &Transport) -> u64 {
    t.config_vector().map_or(0, arch::irq_count)
}

/// Waits until the target is `want`; returns the configuration interrupts seen since
/// `before` (read before the guest told the host it was ready: the host may act at once).
fn wait_target(t: &Transport, want: u32, before: u64) -> Result<u64, u32> {
    let vector = t.config_vector();
    let deadline = time::Deadline::after_us(WAIT_US);
    loop {
        let now = num_pages(t);
        if now == want {
            // The device changes the field, then raises the interrupt: give it 100 ms to land.
            let late = time::Deadline::after_us(100_000);
            let seen = || vector.map_or(0, arch::irq_count) - before;
            while vector.is_some() && seen() == 0 && !late.passed() {
                time::delay_us(100);
            }
            return Ok(seen());
        }
        if deadline.passed() {
            return Err(now);
        }
        time::delay_us(1000);
    }
}

/// Gives (`queue` 0) or takes back (1) the pages `[base, base + bytes)`;
/// returns how many requests completed and how many were made.
fn send_pages(q: &mut Queue, page: &DmaPage, base: u64, bytes: u64) -> (u64, u64) {
    let total = bytes / PAGE;
    let (mut done, mut made) = (0, 0);
    let mut next = 0;
    while next < total {
        let k = (total - next).min(PFNS_PER_REQUEST);
        for i in 0..k {
            let pfn = ((base / PAGE) + next + i) as u32;
            page.write_bytes((i * 4) as usize, &pfn.to_le_bytes());
        }
        made += 1;
        let c = q.transact(
            &[Buf {
                addr: page.phys(0),
                len: (k * 4) as u32,
                write: false,
            }],
            true,
        );
        if c.used.is_some() {
            done += 1;
        }
        next += k;
    }
    (done, made)
}

/// `VIRTIO_BALLOON_F_REPORTING`.
const F_REPORTING: u64 = 1 << 5;

/// Negotiates (with free page reporting when `report`), sets up MSI-X and the two or three
/// queues, reports `init` and `pcicfg`.
fn init(
    t: &mut Transport,
    name: &str,
    report: bool,
    apic_id: u32,
) -> Option<(Option<Queue>, Option<Queue>, Option<Queue>)> {
    let wanted = F_VERSION_1 | if report { F_REPORTING } else { 0 };
    let r = t.negotiate(wanted).and_then(|()| {
        let nq = if t.features & F_REPORTING != 0 { 3 } else { 2 };
        // Without MSI-X the device is polled; the checks below allow for it.
        let _ = t.setup_msix(1 + nq, apic_id);
        let q0 = t.setup_queue(0)?;
        let q1 = t.setup_queue(1)?;
        let q2 = if nq == 3 { Some(t.setup_queue(2)?) } else { None };
        t.driver_ok()?;
        Ok((Some(q0), Some(q1), q2))
    });
    match r {
        Ok((q0, q1, q2)) => {
            let queues = [q0, q1];
            stage2::report_init(name, t, &queues);
            stage2::check_pcicfg(t, name, 4);
            let [q0, q1] = queues;
            Some((q0, q1, q2))
        }
        Err(w) => {
            t.fail();
            check_named(name, "init", false, format_args!("{} {w}", t.func.bdf));
            None
        }
    }
}

/// Drives balloon device `n` (see docs/test-guest.md for its keys).
pub fn run(mut t: Transport, n: usize, keys: &Keys<'_>, apic_id: u32) {
    let mut name: StrBuf<24> = StrBuf::new();
    let _ = write!(name, "virtio.balloon{n}");
    let name = name.as_str();
    // Inflate and deflate (no statistics queue), plus free page reporting with
    // `balloon.report=1`; config starts with le32 num_pages.
    let report = keys.get("balloon", n, "report") == Some("1");
    let Some((inflate, deflate, reporting)) = init(&mut t, name, report, apic_id) else {
        return;
    };
    let target = num_pages(&t);
    if let Some(want) = keys.get("balloon", n, "initial").and_then(expect::parse_size) {
        check_named(
            name,
            "initial",
            u64::from(target) * PAGE == want,
            format_args!("num_pages={target} expected {} bytes", want),
        );
    }
    let Some(mib) = keys.get("balloon", n, "mib").and_then(expect::parse_u64) else {
        return;
    };
    let base = keys
        .get("balloon", n, "base")
        .and_then(expect::parse_size)
        .unwrap_or(128 * MIB);
    let bytes = mib * MIB;
    let (img_start, img_end) = arch::image_range();
    let usable = mib > 0
        && base % PAGE == 0
        && phys::readable(base, bytes)
        && (base + bytes <= img_start || base >= img_end);
    let (Some(mut inflate), Some(mut deflate), Some(page), true) =
        (inflate, deflate, DmaPage::alloc(), usable)
    else {
        check_named(
            name,
            "inflate",
            false,
            format_args!("no queues, no DMA page, or range {base:#x}+{bytes:#x} unusable"),
        );
        return;
    };
    for p in 0..bytes / PAGE {
        phys::mmio_write8(base + p * PAGE, TOUCH);
        phys::mmio_write8(base + p * PAGE + PAGE / 2, TOUCH);
    }
    let before = config_irqs(&t);
    println!("INFO {name}.touched base={base:#x} bytes={bytes:#x}");
    let pages = (bytes / PAGE) as u32;
    let raised = wait_target(&t, pages, before);
    check_named(
        name,
        "raise",
        raised.is_ok_and(|irqs| irqs > 0 || t.config_vector().is_none()),
        format_args!("target {pages} pages: {raised:?} (config interrupts seen, or target seen)"),
    );
    if raised.is_err() {
        return;
    }
    let (done, made) = send_pages(&mut inflate, &page, base, bytes);
    if let Some(dev) = t.device.as_ref() {
        dev.w32(4, pages);
    }
    check_named(
        name,
        "inflate",
        done == made && made > 0,
        format_args!("{pages} pages in {made} requests, {done} completed"),
    );
    let before = config_irqs(&t);
    println!("INFO {name}.inflated pages={pages}");
    let lowered = wait_target(&t, 0, before);
    check_named(
        name,
        "lower",
        lowered.is_ok_and(|irqs| irqs > 0 || t.config_vector().is_none()),
        format_args!("target 0: {lowered:?}"),
    );
    let mut nonzero = 0u64;
    for p in 0..bytes / PAGE {
        if phys::read_u8(base + p * PAGE) != 0 || phys::read_u8(base + p * PAGE + PAGE / 2) != 0 {
            nonzero += 1;
        }
    }
    check_named(
        name,
        "zeroed",
        nonzero == 0,
        format_args!("{nonzero} of {pages} given pages still hold the guest's bytes"),
    );
    let (done, made) = send_pages(&mut deflate, &page, base, bytes);
    if let Some(dev) = t.device.as_ref() {
        dev.w32(4, 0);
    }
    check_named(
        name,
        "deflate",
        done == made && made > 0,
        format_args!("{pages} pages in {made} requests, {done} completed"),
    );
    if keys.get("balloon", n, "hostile") == Some("1") {
        hostile(name, &mut inflate, &mut deflate, &page, base);
    }
    if report {
        report_free(&t, name, reporting, base, bytes);
    }
}

/// Touches the range again, waits for the host's go (a target of one page), reports the
/// whole range free on the reporting queue, and checks that it reads as zeros afterwards.
fn report_free(t: &Transport, name: &str, q: Option<Queue>, base: u64, bytes: u64) {
    let Some(mut q) = q else {
        check_named(name, "report", false, format_args!("REPORTING not negotiated"));
        return;
    };
    for p in 0..bytes / PAGE {
        phys::mmio_write8(base + p * PAGE, TOUCH);
    }
    let before = config_irqs(t);
    println!("INFO {name}.retouched base={base:#x} bytes={bytes:#x}");
    if let Err(now) = wait_target(t, 1, before) {
        check_named(name, "report", false, format_args!("no go from the host: target {now}"));
        return;
    }
    let c = q.transact(
        &[Buf {
            addr: base,
            len: bytes as u32,
            write: true,
        }],
        true,
    );
    let nonzero = (0..bytes / PAGE)
        .filter(|p| phys::read_u8(base + p * PAGE) != 0)
        .count();
    check_named(
        name,
        "report",
        c.used.is_some() && nonzero == 0,
        format_args!(
            "{bytes:#x} bytes at {base:#x} reported free: used={:?}, {nonzero} pages still hold \
             the guest's byte",
            c.used
        ),
    );
    println!("INFO {name}.reported");
}

/// Page numbers the host must refuse (outside RAM: the PCI hole, past 4 GiB of nothing, the
/// largest number), a full page of them in one request, then proof that the device still
/// works: one real page inflated and deflated (the host counts 2048 refused pages).
fn hostile(name: &str, inflate: &mut Queue, deflate: &mut Queue, page: &DmaPage, base: u64) {
    let mut completed = 0;
    for first in [0xc_0000u32, 0xffff_fc00] {
        for i in 0..PFNS_PER_REQUEST as u32 {
            page.write_bytes((i * 4) as usize, &first.wrapping_add(i).to_le_bytes());
        }
        let c = inflate.transact(
            &[Buf {
                addr: page.phys(0),
                len: (PFNS_PER_REQUEST * 4) as u32,
                write: false,
            }],
            true,
        );
        completed += u32::from(c.used.is_some());
    }
    let (done_in, _) = send_pages(inflate, page, base, PAGE);
    let (done_out, _) = send_pages(deflate, page, base, PAGE);
    check_named(
        name,
        "hostile",
        completed == 2 && done_in == 1 && done_out == 1,
        format_args!(
            "2 requests of 1024 page numbers outside RAM: {completed} used; one real page \
             afterwards: inflate {done_in}, deflate {done_out}"
        ),
    );
}
