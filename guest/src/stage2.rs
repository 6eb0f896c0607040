//! Stage 2: PCI on bus 0 and the modern virtio-pci devices found there
//! (blk, net, rng, console, fs). Runs after the stage-1 checks. Command-line
//! keys are described in docs/test-guest.md.

use core::fmt::Write;

use crate::acpi::Acpi;
use crate::pci::{self, Bus};
use crate::report::{check, Ascii, StrBuf};
use crate::virtio::{Buf, DmaPage, IrqTally, Queue, Transport, Why, F_VERSION_1};
use crate::{arch, balloon, blk, expect, fs, hostile, net, phys, pmem, println, vsock, why};

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Device kinds driven: name and virtio device type (device ID 0x1040 + type).
const KINDS: [(&str, u16); 8] = [
    ("net", 1),
    ("blk", 2),
    ("console", 3),
    ("rng", 4),
    ("balloon", 5),
    ("fs", 26),
    ("vsock", 19),
    ("pmem", 27),
];
/// Transitional device IDs of the first four kinds (virtio-fs and virtio-pmem have none).
const TRANSITIONAL: [u16; 4] = [0x1000, 0x1001, 0x1003, 0x1005];

const LAPIC_ID: u64 = 0x20;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;

/// Console message written when no `console.message` is given.
const DEFAULT_CONSOLE_MESSAGE: &str = "nimbus-test-guest";

/// Command-line lookup for per-device keys: `<kind><n>.<field>` wins over
/// `<kind>.<field>`.
pub struct Keys<'a> {
    text: &'a str,
}

impl<'a> Keys<'a> {
    /// Lookups in command line `text`.
    pub fn new(text: &'a str) -> Self {
        Keys { text }
    }

    /// The value for device `n` of `kind`.
    pub fn get(&self, kind: &str, n: usize, field: &str) -> Option<&'a str> {
        let mut k: StrBuf<64> = StrBuf::new();
        let _ = write!(k, "{kind}{n}.{field}");
        expect::value(self.text, k.as_str()).or_else(|| {
            let mut k: StrBuf<64> = StrBuf::new();
            let _ = write!(k, "{kind}.{field}");
            expect::value(self.text, k.as_str())
        })
    }
}

/// Runs all stage-2 checks, then, with `hostile=1`, the hostile mode (see docs/test-guest.md).
pub fn run(acpi: &Acpi, cmdline: &str) {
    let (bus, apic_id) = setup(acpi, cmdline);
    let keys = Keys { text: cmdline };
    let (blk, rng) = run_virtio(&bus, &keys, apic_id);
    if expect::value(cmdline, "hostile") == Some("1") {
        hostile::run(&bus, blk, rng, &keys);
    }
    let spurious = arch::spurious_count();
    if spurious != 0 {
        println!("INFO stage2 spurious_interrupts={spurious}");
    }
}

/// The local APIC set up for MSI-X delivery, then the PCI checks (`pci.*`, with the
/// expectations on `cmdline`). Returns the buses and the BSP's APIC ID.
pub fn setup(acpi: &Acpi, cmdline: &str) -> (Bus, u32) {
    let lapic = acpi.madt.as_ref().map_or(0xfee0_0000, |m| m.lapic_base);
    arch::set_lapic_eoi(lapic + LAPIC_EOI);
    // Software-enable the local APIC (SVR bit 8), spurious vector 0xff.
    let svr = phys::mmio_read32(lapic + LAPIC_SVR);
    phys::mmio_write32(lapic + LAPIC_SVR, svr | 0x1ff);
    let apic_id = phys::mmio_read32(lapic + LAPIC_ID) >> 24;
    println!(
        "INFO stage2 lapic={lapic:#x} apic_id={apic_id} svr={svr:#x}->{:#x}",
        phys::mmio_read32(lapic + LAPIC_SVR)
    );

    let mut bus = pci::check_enum(acpi.ecam, &acpi.segments, cmdline);
    pci::check_bars(&mut bus);
    pci::check_caps(&bus);
    (bus, apic_id)
}

/// The modern virtio devices of `kind` (`blk`, `rng`, ...) on the bus, in bus order.
pub fn functions_of<'b>(bus: &'b Bus, kind: &'b str) -> impl Iterator<Item = &'b pci::Function> {
    bus.functions().iter().filter(move |f| {
        f.vendor == VIRTIO_VENDOR && kind_of(f.device).is_some_and(|k| KINDS[k].0 == kind)
    })
}

fn parse_expect(v: &str) -> Option<[u32; KINDS.len()]> {
    let mut out = [0; KINDS.len()];
    for item in v.split(',') {
        let (k, c) = item.split_once(':')?;
        let i = KINDS.iter().position(|x| x.0 == k)?;
        out[i] = u32::try_from(expect::parse_u64(c)?).ok()?;
    }
    Some(out)
}

fn kind_of(device: u16) -> Option<usize> {
    let t = device.checked_sub(0x1040)?;
    KINDS.iter().position(|k| k.1 == t)
}

/// Checks every modern virtio device; returns the first blk and rng device if they work.
fn run_virtio(bus: &Bus, keys: &Keys<'_>, apic_id: u32) -> (Option<blk::Blk>, Option<Rng>) {
    let mut modern = [0u32; KINDS.len()];
    let mut transitional = [0u32; KINDS.len()];
    for f in bus.functions().iter().filter(|f| f.vendor == VIRTIO_VENDOR) {
        if let Some(i) = kind_of(f.device) {
            modern[i] += 1;
        } else if let Some(i) = TRANSITIONAL.iter().position(|&d| d == f.device) {
            transitional[i] += 1;
            println!(
                "INFO virtio {} {:04x}:{:04x} transitional {}: ignored",
                f.bdf, f.vendor, f.device, KINDS[i].0
            );
        } else {
            println!(
                "INFO virtio {} {:04x}:{:04x} not exercised",
                f.bdf, f.vendor, f.device
            );
        }
    }
    let mut found: StrBuf<120> = StrBuf::new();
    for (i, (k, _)) in KINDS.iter().enumerate() {
        let _ = write!(found, "{}{k}={}", if i > 0 { " " } else { "" }, modern[i]);
    }
    let wanted = expect::value(keys.text, "expect.virtio");
    let parsed = wanted.map(parse_expect);
    match parsed {
        None => check(
            "virtio.count",
            true,
            format_args!("{found} (no expect.virtio given)"),
        ),
        Some(None) => check(
            "virtio.count",
            false,
            format_args!(
                "{found}; bad expect.virtio value \"{}\"",
                Ascii(wanted.unwrap_or("").as_bytes())
            ),
        ),
        Some(Some(exp)) => check(
            "virtio.count",
            exp == modern,
            format_args!("{found} expect.virtio={}", wanted.unwrap_or("")),
        ),
    }
    let mut bad: StrBuf<120> = StrBuf::new();
    if let Some(Some(exp)) = parsed {
        for i in 0..KINDS.len() {
            if transitional[i] > 0 && modern[i] < exp[i] {
                let _ = write!(
                    bad,
                    " {} transitional {} device(s) where modern ones were expected",
                    transitional[i], KINDS[i].0
                );
            }
        }
    }
    let ntrans: u32 = transitional.iter().sum();
    check(
        "virtio.modern",
        bad.is_empty(),
        format_args!("transitional_ignored={ntrans}{bad}"),
    );

    let mut index = [0usize; KINDS.len()];
    let (mut first_blk, mut first_rng) = (None, None);
    for f in bus.functions().iter().filter(|f| f.vendor == VIRTIO_VENDOR) {
        let Some(k) = kind_of(f.device) else {
            continue;
        };
        let n = index[k];
        index[k] += 1;
        let mut name: StrBuf<24> = StrBuf::new();
        let _ = write!(name, "virtio.{}{n}", KINDS[k].0);
        let t = match Transport::probe(bus.mech, f) {
            Ok(t) => t,
            Err(w) => {
                check_named(name.as_str(), "init", false, format_args!("{} {w}", f.bdf));
                continue;
            }
        };
        match KINDS[k].0 {
            "blk" => {
                let b = blk::run(t, n, keys, apic_id);
                if n == 0 {
                    first_blk = b;
                }
            }
            "rng" => {
                let r = run_rng(t, name.as_str(), apic_id);
                if n == 0 {
                    first_rng = r;
                }
            }
            "console" => run_console(t, name.as_str(), n, keys, apic_id),
            "fs" => fs::run(t, n, keys, apic_id),
            "vsock" => vsock::run(t, n, keys, apic_id),
            "pmem" => pmem::run(t, n, keys, apic_id),
            "balloon" => balloon::run(t, n, keys, apic_id),
            _ => net::run(t, n, keys, apic_id),
        }
    }
    (first_blk, first_rng)
}

/// Prints `TEST <name>.<what> ...`.
pub fn check_named(name: &str, what: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
    let mut n: StrBuf<48> = StrBuf::new();
    let _ = write!(n, "{name}.{what}");
    check(n.as_str(), ok, detail);
}

/// The rest of the initialisation after feature negotiation: MSI-X (one
/// entry for configuration changes plus one per queue), queues `0..nq`,
/// DRIVER_OK. Returns the queues and, if MSI-X could not be set up, why
/// (the device then runs with polling only).
pub fn finish_init(
    t: &mut Transport,
    nq: u16,
    apic_id: u32,
) -> Result<([Option<Queue>; 2], Option<Why>), Why> {
    let msix_err = t.setup_msix(1 + nq, apic_id).err();
    let mut queues = [None, None];
    for q in 0..nq.min(2) {
        queues[usize::from(q)] = Some(t.setup_queue(q)?);
    }
    t.driver_ok()?;
    Ok((queues, msix_err))
}

/// Prints the `init` PASS line.
pub fn report_init(name: &str, t: &Transport, queues: &[Option<Queue>]) {
    let mut detail: StrBuf<400> = StrBuf::new();
    let _ = write!(
        detail,
        "{} {:04x}:{:04x} offered={:#x} negotiated={:#x} num_queues={}",
        t.func.bdf,
        t.func.vendor,
        t.func.device,
        t.offered,
        t.features,
        t.num_queues()
    );
    for q in queues.iter().flatten() {
        let _ = write!(detail, " q{}:size={}/{}", q.index, q.size, q.max);
        if let Some(v) = q.vector {
            let _ = write!(detail, ",vector={v:#x}");
        }
    }
    if let Some(m) = &t.msix {
        let _ = write!(
            detail,
            " msix_table_size={} config_vector={:#x}",
            m.size, m.base_vector
        );
    }
    println!("INFO {name} caps{}", t.layout);
    check_named(name, "init", true, format_args!("{detail}"));
}

/// `<name>.pcicfg`: the PCI configuration access capability reads what a
/// direct BAR read gives.
/// `dev_width` is the width of the first device configuration field
/// (0: the device has no configuration).
pub fn check_pcicfg(t: &Transport, name: &str, dev_width: u8) {
    let (ok, detail) = t.pcicfg_compare(dev_width);
    check_named(name, "pcicfg", ok, format_args!("{detail}"));
}

/// `<name>.msix`: every completion waited for came with its vector.
pub fn check_msix(t: &Transport, name: &str, tally: &IrqTally, queues: &[Option<Queue>]) {
    let mut vectors: StrBuf<120> = StrBuf::new();
    if let Some(m) = &t.msix {
        let _ = write!(vectors, "config={:#x}", m.base_vector);
    }
    for q in queues.iter().flatten() {
        if let Some(v) = q.vector {
            let _ = write!(vectors, " q{}={v:#x}({} irqs)", q.index, arch::irq_count(v));
        }
    }
    check_named(
        name,
        "msix",
        tally.waited > 0 && tally.signalled == tally.waited,
        format_args!(
            "completions={} signalled={} vectors: {vectors}",
            tally.waited, tally.signalled
        ),
    );
}

/// Negotiates `wanted`, runs [`finish_init`] with `nq` queues and reports
/// `init` and `pcicfg`. None if initialisation failed (reported).
pub fn bring_up(
    t: &mut Transport,
    name: &str,
    dev_width: u8,
    wanted: u64,
    nq: u16,
    apic_id: u32,
) -> Option<([Option<Queue>; 2], Option<Why>)> {
    let r = t
        .negotiate(wanted)
        .and_then(|()| finish_init(t, nq, apic_id));
    match r {
        Ok((queues, msix_err)) => {
            report_init(name, t, &queues);
            check_pcicfg(t, name, dev_width);
            Some((queues, msix_err))
        }
        Err(w) => {
            t.fail();
            check_named(name, "init", false, format_args!("{} {w}", t.func.bdf));
            None
        }
    }
}

/// A virtio-rng device kept after its checks (the hostile mode's `survivors` check).
pub struct Rng {
    /// The transport.
    pub t: Transport,
    queue: Option<Queue>,
    page: DmaPage,
}

/// What [`Rng::read64`] got.
pub struct RngRead {
    /// Bytes received (at most 64).
    pub got: usize,
    /// Requests made.
    pub requests: u32,
    /// The bytes (only the first `got` are meaningful).
    pub bytes: [u8; 64],
    /// Why it stopped early.
    pub err: Option<Why>,
}

impl RngRead {
    /// 64 bytes arrived and they are not all equal.
    pub fn ok(&self) -> bool {
        let all_equal = self.bytes.iter().all(|&b| b == self.bytes[0]);
        self.err.is_none() && self.got == 64 && !all_equal
    }
}

impl core::fmt::Display for RngRead {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let all_equal = self.bytes.iter().all(|&b| b == self.bytes[0]);
        write!(
            f,
            "{} bytes in {} request(s), first 8: ",
            self.got, self.requests
        )?;
        for b in &self.bytes[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(
            f,
            "{}{}",
            if all_equal { " (all bytes equal)" } else { "" },
            self.err.as_ref().map_or("", |w| w.as_str())
        )
    }
}

impl Rng {
    /// Asks for 64 bytes (at most 16 requests), each completion recorded in `tally`.
    pub fn read64(&mut self, tally: &mut IrqTally) -> RngRead {
        let mut r = RngRead {
            got: 0,
            requests: 0,
            bytes: [0; 64],
            err: None,
        };
        for i in 0..64 {
            self.page.write8(i, 0);
        }
        let Some(q) = self.queue.as_mut() else {
            r.err = Some(why!("queue 0 not set up"));
            return r;
        };
        while r.got < 64 && r.requests < 16 {
            r.requests += 1;
            let c = q.transact(
                &[Buf {
                    addr: self.page.phys(r.got),
                    len: (64 - r.got) as u32,
                    write: true,
                }],
                true,
            );
            tally.add(&c);
            match c.used {
                Some((_, len)) => r.got += (len as usize).min(64 - r.got),
                None => {
                    r.err = Some(why!("request {} not completed within 2 s", r.requests));
                    break;
                }
            }
        }
        r.bytes = core::array::from_fn(|i| self.page.read8(i));
        r
    }
}

fn run_rng(mut t: Transport, name: &str, apic_id: u32) -> Option<Rng> {
    let ([queue, _], msix_err) = bring_up(&mut t, name, 0, F_VERSION_1, 1, apic_id)?;
    let Some(page) = DmaPage::alloc() else {
        check_named(name, "read", false, format_args!("out of DMA memory"));
        return None;
    };
    let mut rng = Rng { t, queue, page };
    let mut tally = IrqTally::default();
    let r = rng.read64(&mut tally);
    check_named(name, "read", r.ok(), format_args!("{r}"));
    match msix_err {
        Some(w) => check_named(name, "msix", false, format_args!("{w}")),
        None => check_msix(&rng.t, name, &tally, core::slice::from_ref(&rng.queue)),
    }
    Some(rng)
}

fn run_console(mut t: Transport, name: &str, n: usize, keys: &Keys<'_>, apic_id: u32) {
    // Neither MULTIPORT nor EMERG_WRITE: port 0 is the plain console on
    // receiveq 0 / transmitq 1. Device configuration starts with le16 cols.
    let Some((mut queues, msix_err)) = bring_up(&mut t, name, 2, F_VERSION_1, 2, apic_id) else {
        return;
    };
    let Some(page) = DmaPage::alloc() else {
        check_named(name, "write", false, format_args!("out of DMA memory"));
        return;
    };
    let input = keys.get("console", n, "input");
    // With `console.input`, a receive buffer waits on receiveq 0 from the start.
    const RX_OFF: usize = 2048;
    const RX_LEN: u32 = 64;
    let rx_buf = Buf {
        addr: page.phys(RX_OFF),
        len: RX_LEN,
        write: true,
    };
    if input.is_some() {
        if let Some(q) = queues[0].as_mut() {
            if q.add(core::slice::from_ref(&rx_buf)).is_some() {
                q.kick();
            }
        }
    }
    let message = keys
        .get("console", n, "message")
        .unwrap_or(DEFAULT_CONSOLE_MESSAGE);
    let bytes = message.as_bytes();
    let len = bytes.len().min(4095);
    for (i, &b) in bytes[..len].iter().enumerate() {
        page.write8(i, b);
    }
    page.write8(len, b'\n');
    let mut tally = IrqTally::default();
    let c = queues[1].as_mut().map(|q| {
        q.transact(
            &[Buf {
                addr: page.phys(0),
                len: len as u32 + 1,
                write: false,
            }],
            true,
        )
    });
    if let Some(c) = &c {
        tally.add(c);
    }
    let used = c.and_then(|c| c.used);
    check_named(
        name,
        "write",
        used.is_some(),
        format_args!(
            "\"{}\\n\" on port 0 transmitq: {}",
            Ascii(&bytes[..len]),
            if used.is_some() {
                "returned by the device"
            } else {
                "not returned within 2 s"
            }
        ),
    );
    if let (Some(expected), Some(q)) = (input, queues[0].as_mut()) {
        let secs = crate::console_io::wait_secs(keys.text, "console.input");
        println!("INFO {name}.input.ready");
        let deadline = crate::time::Deadline::after_us(secs * 1_000_000);
        let mut line = crate::console_io::Line::new();
        while !line.done && !deadline.passed() {
            match q.pop_used() {
                Some(u) => {
                    let len = (u.len.min(RX_LEN)) as usize;
                    for i in 0..len {
                        line.push(page.read8(RX_OFF + i));
                    }
                    if !line.done && q.add(core::slice::from_ref(&rx_buf)).is_some() {
                        q.kick();
                    }
                }
                None => crate::arch::pause(),
            }
        }
        line.report(name, expected, secs);
    }
    match msix_err {
        Some(w) => check_named(name, "msix", false, format_args!("{w}")),
        None => check_msix(&t, name, &tally, &queues),
    }
}
