//! virtio-blk checks (`virtio.blk<n>.*`): capacity, pattern reads, writes
//! with FLUSH, GET_ID, an out-of-range read, read-only disks, a second
//! request queue, MSI-X delivery and masking, and (`blk.resize=1`) a capacity
//! change made by the host.
//!
//! The disk patterns (see docs/test-guest.md) are functions of the absolute
//! byte offset, so the host can write and verify the image independently.

use core::fmt::Write;

use crate::report::{check, StrBuf};
use crate::stage2::{self, Keys};
use crate::virtio::{Buf, DmaPage, IrqTally, Queue, Transport, Why, F_VERSION_1};
use crate::{arch, println, time, why};

/// Sector size of virtio-blk requests.
pub const SECTOR: u64 = 512;
/// Bytes the write check writes (8 sectors).
const WRITE_LEN: usize = 4096;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Request status values (0xff: the guest's "not written" marker).
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// What the guest puts in the status byte before submitting a request.
pub const S_UNWRITTEN: u8 = 0xff;
/// Offset of the status byte in the header page.
const STATUS_OFF: usize = 64;

const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;

/// Byte at absolute offset `o` of a disk the host filled with its pattern.
pub fn host_byte(o: u64) -> u8 {
    ((o >> 9) as u8) ^ ((o & 0x1ff) as u8) ^ 0xa5
}

/// Byte at absolute offset `o` of the sectors the guest writes.
pub fn guest_byte(o: u64) -> u8 {
    ((o >> 9) as u8).wrapping_mul(7) ^ 0x3c ^ ((o & 0xff) as u8)
}

/// Name of a request status for details.
pub fn status_name(s: u8) -> &'static str {
    match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        0xff => "unwritten",
        _ => "invalid",
    }
}

/// A virtio-blk device the guest drives, kept after its checks for the hostile mode and
/// the benchmark.
pub struct Blk {
    /// The transport.
    pub t: Transport,
    /// `virtio.blk<n>`.
    pub name: StrBuf<24>,
    /// Request queues (queue 1 only with MQ).
    pub queues: [Option<Queue>; 2],
    /// Request header at 0, status byte at 64.
    pub hdr: DmaPage,
    /// Data buffer (one page).
    pub data: DmaPage,
    /// Set when the device failed to complete a request: later requests
    /// are not attempted.
    pub dead: Option<Why>,
    tally: IrqTally,
    /// Capacity in sectors (0 until read).
    pub capacity: u64,
    /// Where MSI-X messages go.
    pub apic_id: u32,
}

impl Blk {
    fn check(&self, what: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
        let mut n: StrBuf<48> = StrBuf::new();
        let _ = write!(n, "{}.{what}", self.name);
        check(n.as_str(), ok, detail);
    }

    /// Writes a request header (`kind`, `sector`) into the header page and marks the status
    /// byte unwritten. Returns the header buffer (device-readable, 16 bytes) and the status
    /// buffer (device-writable, 1 byte).
    pub fn prepare(&self, kind: u32, sector: u64) -> (Buf, Buf) {
        for (i, b) in kind
            .to_le_bytes()
            .iter()
            .chain(&0u32.to_le_bytes())
            .chain(&sector.to_le_bytes())
            .enumerate()
        {
            self.hdr.write8(i, *b);
        }
        self.hdr.write8(STATUS_OFF, S_UNWRITTEN);
        let hdr = Buf {
            addr: self.hdr.phys(0),
            len: 16,
            write: false,
        };
        let status = Buf {
            addr: self.hdr.phys(STATUS_OFF),
            len: 1,
            write: true,
        };
        (hdr, status)
    }

    /// The status byte of the last request.
    pub fn status_byte(&self) -> u8 {
        self.hdr.read8(STATUS_OFF)
    }

    /// The data page as one buffer of `len` bytes.
    pub fn data_buf(&self, len: u32, dev_writes: bool) -> Buf {
        Buf {
            addr: self.data.phys(0),
            len,
            write: dev_writes,
        }
    }

    /// Resets the device and sets it up again as at start (same features, queues, MSI-X
    /// vectors and ring pages); clears `dead`.
    pub fn reinit(&mut self) -> Result<(), Why> {
        self.queues = [None, None];
        init_queues(self)?;
        self.dead = None;
        Ok(())
    }

    /// Reads sector `s` (one sector) on queue 0 and compares it with the host pattern if
    /// `pattern`.
    pub fn read_sector_checked(&mut self, s: u64, pattern: bool) -> Result<(), Why> {
        self.read(0, s, SECTOR as u32)?;
        if pattern {
            if let Some(w) = self.mismatch(s, SECTOR as usize, host_byte) {
                return Err(why!("sector {s}: {w}"));
            }
        }
        Ok(())
    }

    /// One request on queue `q`: `len` data bytes (device-writable if
    /// `dev_writes`). Returns the status byte.
    fn request(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        len: u32,
        dev_writes: bool,
    ) -> Result<u8, Why> {
        self.request_irq(q, kind, sector, len, dev_writes, true)
    }

    fn request_irq(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        len: u32,
        dev_writes: bool,
        irq: bool,
    ) -> Result<u8, Why> {
        if let Some(d) = &self.dead {
            return Err(why!("not attempted: {d}"));
        }
        let (hdr, status) = self.prepare(kind, sector);
        let data = self.data_buf(len, dev_writes);
        let Some(queue) = self.queues.get_mut(q).and_then(Option::as_mut) else {
            return Err(why!("queue {q} not set up"));
        };
        let c = if len > 0 {
            queue.transact(&[hdr, data, status], irq)
        } else {
            queue.transact(&[hdr, status], irq)
        };
        self.tally.add(&c);
        if c.used.is_none() {
            let w = why!("request type {kind} sector {sector} not completed within 2 s");
            self.dead = Some(w);
            return Err(why!(
                "request type {kind} sector {sector} not completed within 2 s"
            ));
        }
        Ok(self.status_byte())
    }

    /// Reads `len` bytes at `sector` into the data page; status must be OK.
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Result<(), Why> {
        for i in 0..len as usize {
            self.data.write8(i, 0);
        }
        match self.request(q, T_IN, sector, len, true)? {
            S_OK => Ok(()),
            s => Err(why!("read of sector {sector} returned {}", status_name(s))),
        }
    }

    /// First byte of the data page that differs from `f(absolute offset)`.
    pub fn mismatch(&self, sector: u64, len: usize, f: fn(u64) -> u8) -> Option<Why> {
        (0..len).find_map(|i| {
            let o = sector * SECTOR + i as u64;
            let (got, want) = (self.data.read8(i), f(o));
            (got != want).then(|| why!("byte at offset {o:#x} is {got:#04x}, expected {want:#04x}"))
        })
    }

    fn fill(&self, sector: u64, len: usize, f: fn(u64) -> u8) {
        for i in 0..len {
            self.data.write8(i, f(sector * SECTOR + i as u64));
        }
    }
}

/// Initialises device `n` (reporting `init`). Returns the device, and why MSI-X could not
/// be set up if it could not; `None` if initialisation failed (reported).
pub fn open(t: Transport, n: usize, apic_id: u32) -> Option<(Blk, Option<Why>)> {
    let mut name: StrBuf<24> = StrBuf::new();
    let _ = write!(name, "virtio.blk{n}");
    let (Some(hdr), Some(data)) = (DmaPage::alloc(), DmaPage::alloc()) else {
        stage2::check_named(
            name.as_str(),
            "init",
            false,
            format_args!("out of DMA memory"),
        );
        return None;
    };
    let mut b = Blk {
        t,
        name,
        queues: [None, None],
        hdr,
        data,
        dead: None,
        tally: IrqTally::default(),
        capacity: 0,
        apic_id,
    };
    match init(&mut b) {
        Ok(e) => Some((b, e)),
        Err(w) => {
            b.t.fail();
            b.check("init", false, format_args!("{} {w}", b.t.func.bdf));
            None
        }
    }
}

/// The device configuration's capacity (sectors) and blk_size.
pub fn read_capacity(t: &Transport) -> Option<(u64, u32)> {
    t.read_config(|r| (u64::from(r.r32(0)) | (u64::from(r.r32(4)) << 32), r.r32(20)))
}

/// Initialises the device and runs every `virtio.blk<n>.*` check. Returns the device if it
/// was initialised and has a nonzero capacity (for the hostile mode).
pub fn run(t: Transport, n: usize, keys: &Keys<'_>, apic_id: u32) -> Option<Blk> {
    let key = |field: &str| keys.get("blk", n, field);
    let pattern = key("pattern.sector");
    let serial = key("serial");
    let readonly = key("readonly");
    let (mut b, msix_err) = open(t, n, apic_id)?;
    // Device configuration starts with le64 capacity (32-bit accesses).
    stage2::check_pcicfg(&b.t, b.name.as_str(), 4);

    // capacity
    let Some((capacity, blk_size)) = read_capacity(&b.t) else {
        b.check(
            "capacity",
            false,
            format_args!("device configuration unreadable"),
        );
        return None;
    };
    b.capacity = capacity;
    let pattern_sector = match pattern.map(crate::expect::parse_u64) {
        None => None,
        Some(Some(s)) => Some(s),
        Some(None) => {
            b.check(
                "capacity",
                false,
                format_args!("bad blk.pattern.sector value"),
            );
            return None;
        }
    };
    let mut ok = capacity > 0;
    let mut detail: StrBuf<200> = StrBuf::new();
    let _ = write!(
        detail,
        "sectors={capacity} bytes={}",
        capacity.saturating_mul(SECTOR)
    );
    if b.t.features & F_BLK_SIZE != 0 {
        let _ = write!(detail, " blk_size={blk_size}");
    }
    if let Some(s) = pattern_sector {
        if capacity < 16 || s.saturating_add(8) > capacity {
            ok = false;
            let _ = write!(
                detail,
                " too small for blk.pattern.sector={s} (needs >= 16 and > S+8)"
            );
        }
    }
    b.check("capacity", ok, format_args!("{detail}"));
    if capacity == 0 {
        return None;
    }

    // read: sectors 0, 1 and the last one.
    let mut detail: StrBuf<300> = StrBuf::new();
    let mut ok = true;
    let last = capacity - 1;
    let sectors = [0, 1, last];
    for (i, &s) in sectors.iter().enumerate() {
        if s >= capacity || sectors[..i].contains(&s) {
            continue;
        }
        match b.read(0, s, SECTOR as u32) {
            Ok(()) => {
                if pattern_sector.is_some() {
                    if let Some(w) = b.mismatch(s, SECTOR as usize, host_byte) {
                        ok = false;
                        let _ = write!(detail, " sector {s}: {w}");
                    }
                }
            }
            Err(w) => {
                ok = false;
                let _ = write!(detail, " {w}");
            }
        }
    }
    let _ = write!(
        detail,
        " {}",
        if pattern_sector.is_some() {
            "(host pattern checked)"
        } else {
            "(no blk.pattern.sector given: status only)"
        }
    );
    b.check("read", ok, format_args!("sectors 0,1,{last}{detail}"));

    check_get_id(&mut b, serial);
    check_flush(&mut b);

    let ro_expected = readonly == Some("1");
    if let Some(s) = pattern_sector.filter(|_| !ro_expected) {
        check_write(&mut b, s);
    } else if !ro_expected {
        println!("INFO {}.write not run: no blk.pattern.sector given", b.name);
    }
    if ro_expected {
        check_readonly(&mut b, pattern_sector.unwrap_or(0));
    }
    check_oob(&mut b, pattern_sector.is_some());
    check_mq(&mut b, pattern_sector.is_some());
    match msix_err {
        Some(w) => b.check("msix", false, format_args!("{w}")),
        None => {
            check_msix_mask(&mut b);
            stage2::check_msix(&b.t, b.name.as_str(), &b.tally, &b.queues);
        }
    }
    if key("resize") == Some("1") {
        check_resize(&mut b);
    }
    Some(b)
}

/// `blk.resize=1`: prints `INFO <name>.waiting capacity=<sectors>`, waits up to 30 s for the
/// host to change the capacity (`vm.resize-disk`), counts the configuration change
/// interrupts, prints `INFO <name>.resized capacity=<sectors> config_irqs=<n>` and reads the
/// new last sector (zeros when the disk grew).
fn check_resize(b: &mut Blk) {
    let vector = b.t.config_vector();
    let irqs = || vector.map_or(0, arch::irq_count);
    // Read before telling the host it may go: it may act at once.
    let before = irqs();
    let old = b.capacity;
    println!("INFO {}.waiting capacity={old}", b.name);
    let deadline = time::Deadline::after_us(30_000_000);
    let new = loop {
        match read_capacity(&b.t) {
            Some((c, _)) if c != old => break Some(c),
            _ if deadline.passed() => break None,
            _ => time::delay_us(1000),
        }
    };
    let Some(new) = new else {
        b.check(
            "resize",
            false,
            format_args!("capacity still {old} sectors after 30 s"),
        );
        return;
    };
    // The device changes the capacity, then raises the interrupt: give it 100 ms to land.
    let late = time::Deadline::after_us(100_000);
    while vector.is_some() && irqs() == before && !late.passed() {
        time::delay_us(100);
    }
    let seen = irqs() - before;
    b.capacity = new;
    println!("INFO {}.resized capacity={new} config_irqs={seen}", b.name);
    let mut detail: StrBuf<200> = StrBuf::new();
    let _ = write!(
        detail,
        "capacity {old} -> {new} sectors, {seen} configuration interrupt(s)"
    );
    let mut ok = seen > 0 || vector.is_none();
    if let Some(last) = new.checked_sub(1) {
        let read = b.read(0, last, SECTOR as u32).and_then(|()| {
            // A grown disk's new sectors read as zeros.
            let stale = b
                .mismatch(last, SECTOR as usize, |_| 0)
                .filter(|_| new > old);
            stale.map_or(Ok(()), Err)
        });
        match read {
            Ok(()) => {
                let _ = write!(detail, ", new last sector {last} read");
            }
            Err(w) => {
                ok = false;
                let _ = write!(detail, ", new last sector {last}: {w}");
            }
        }
    }
    b.check("resize", ok, format_args!("{detail}"));
}

/// Handshake and queues, then the `init` line. Ok(Some(w)): initialised, but MSI-X could
/// not be set up.
fn init(b: &mut Blk) -> Result<Option<Why>, Why> {
    let msix_err = init_queues(b)?;
    stage2::report_init(b.name.as_str(), &b.t, &b.queues);
    Ok(msix_err)
}

/// Handshake and queues (a second queue if MQ offers one). Ok(Some(w)): initialised, but
/// MSI-X could not be set up.
fn init_queues(b: &mut Blk) -> Result<Option<Why>, Why> {
    b.t.negotiate(F_VERSION_1 | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ)?;
    let mut nq = 1;
    if b.t.features & F_MQ != 0 && b.t.read_config(|r| r.r16(34)).unwrap_or(1) > 1 {
        nq = 2;
    }
    let (queues, msix_err) = stage2::finish_init(&mut b.t, nq, b.apic_id)?;
    b.queues = queues;
    Ok(msix_err)
}

fn check_get_id(b: &mut Blk, serial: Option<&str>) {
    for i in 0..20 {
        b.data.write8(i, 0);
    }
    let st = match b.request(0, T_GET_ID, 0, 20, true) {
        Ok(s) => s,
        Err(w) => {
            b.check("get_id", false, format_args!("{w}"));
            return;
        }
    };
    let mut id = [0u8; 20];
    for (i, c) in id.iter_mut().enumerate() {
        *c = b.data.read8(i);
    }
    let len = id.iter().position(|&c| c == 0).unwrap_or(20);
    let id = &id[..len];
    let shown = crate::report::Ascii(id);
    match (st, serial) {
        (S_OK, Some(want)) => b.check(
            "get_id",
            id == want.as_bytes(),
            format_args!("id=\"{shown}\" expected=\"{want}\""),
        ),
        (S_OK, None) => b.check(
            "get_id",
            true,
            format_args!("id=\"{shown}\" (no blk.serial given)"),
        ),
        (S_UNSUPP, None) => b.check(
            "get_id",
            true,
            format_args!("GET_ID unsupported (no blk.serial given)"),
        ),
        (s, _) => b.check(
            "get_id",
            false,
            format_args!("GET_ID returned {}", status_name(s)),
        ),
    }
}

fn flush(b: &mut Blk) -> Result<(), Why> {
    match b.request(0, T_FLUSH, 0, 0, false)? {
        S_OK => Ok(()),
        s => Err(why!("FLUSH returned {}", status_name(s))),
    }
}

fn check_flush(b: &mut Blk) {
    if b.t.offered & F_FLUSH == 0 {
        b.check(
            "flush",
            false,
            format_args!("VIRTIO_BLK_F_FLUSH not offered"),
        );
        return;
    }
    match flush(b) {
        Ok(()) => b.check("flush", true, format_args!("FLUSH returned OK")),
        Err(w) => b.check("flush", false, format_args!("{w}")),
    }
}

fn check_write(b: &mut Blk, s: u64) {
    if s.saturating_add(8) > b.capacity {
        b.check(
            "write",
            false,
            format_args!("sectors {s}..{} beyond capacity", s + 8),
        );
        return;
    }
    let result = (|| -> Result<(), Why> {
        b.fill(s, WRITE_LEN, guest_byte);
        match b.request(0, T_OUT, s, WRITE_LEN as u32, false)? {
            S_OK => {}
            st => return Err(why!("write returned {}", status_name(st))),
        }
        if b.t.features & F_FLUSH != 0 {
            flush(b)?;
        }
        b.read(0, s, WRITE_LEN as u32)?;
        match b.mismatch(s, WRITE_LEN, guest_byte) {
            Some(w) => Err(why!("read back: {w}")),
            None => Ok(()),
        }
    })();
    match result {
        Ok(()) => b.check(
            "write",
            true,
            format_args!("sectors {s}..{} written, flushed, read back", s + 8),
        ),
        Err(w) => b.check("write", false, format_args!("sectors {s}..{}: {w}", s + 8)),
    }
}

fn check_readonly(b: &mut Blk, s: u64) {
    let mut detail: StrBuf<300> = StrBuf::new();
    let mut ok = b.t.offered & F_RO != 0;
    if !ok {
        let _ = write!(detail, " VIRTIO_BLK_F_RO not offered;");
    }
    let s = s.min(b.capacity.saturating_sub(8));
    let result = (|| -> Result<(), Why> {
        b.read(0, s, WRITE_LEN as u32)?;
        let mut before = [0u8; WRITE_LEN];
        for (i, x) in before.iter_mut().enumerate() {
            *x = b.data.read8(i);
        }
        b.fill(s, WRITE_LEN, guest_byte);
        let st = b.request(0, T_OUT, s, WRITE_LEN as u32, false)?;
        let mut bad = None;
        if st != S_IOERR {
            bad = Some(why!("write returned {} instead of IOERR", status_name(st)));
        }
        b.read(0, s, WRITE_LEN as u32)?;
        if let Some(i) = (0..WRITE_LEN).find(|&i| b.data.read8(i) != before[i]) {
            return Err(why!("data changed at offset {:#x}", s * SECTOR + i as u64));
        }
        bad.map_or(Ok(()), Err)
    })();
    if let Err(w) = result {
        ok = false;
        let _ = write!(detail, " {w}");
    }
    b.check(
        "readonly",
        ok,
        format_args!(
            "write to sectors {s}..{}:{}",
            s + 8,
            if ok {
                " IOERR, data unchanged"
            } else {
                detail.as_str()
            }
        ),
    );
}

fn check_oob(b: &mut Blk, pattern: bool) {
    let cap = b.capacity;
    let result = (|| -> Result<(), Why> {
        match b.request(0, T_IN, cap, SECTOR as u32, true)? {
            S_IOERR => {}
            st => return Err(why!("read of sector {cap} returned {}", status_name(st))),
        }
        b.read(0, 0, SECTOR as u32)?;
        if pattern {
            if let Some(w) = b.mismatch(0, SECTOR as usize, host_byte) {
                return Err(why!("sector 0 afterwards: {w}"));
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => b.check(
            "oob",
            true,
            format_args!(
                "read of sector {cap} (= capacity) got IOERR; sector 0 read OK afterwards"
            ),
        ),
        Err(w) => b.check("oob", false, format_args!("{w}")),
    }
}

fn check_mq(b: &mut Blk, pattern: bool) {
    if b.queues[1].is_none() {
        println!(
            "INFO {}.mq not run: MQ {} (num_queues={})",
            b.name,
            if b.t.offered & F_MQ != 0 {
                "offered with one queue"
            } else {
                "not offered"
            },
            b.t.num_queues()
        );
        return;
    }
    let result = (|| -> Result<(), Why> {
        b.read(0, 0, SECTOR as u32)?;
        let mut q0 = [0u8; SECTOR as usize];
        for (i, x) in q0.iter_mut().enumerate() {
            *x = b.data.read8(i);
        }
        b.read(1, 0, SECTOR as u32)?;
        if let Some(i) = (0..SECTOR as usize).find(|&i| b.data.read8(i) != q0[i]) {
            return Err(why!("sector 0 through queue 1 differs at byte {i}"));
        }
        if pattern {
            if let Some(w) = b.mismatch(0, SECTOR as usize, host_byte) {
                return Err(why!("sector 0 through queue 1: {w}"));
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => b.check(
            "mq",
            true,
            format_args!("sector 0 read through queue 1 matches queue 0"),
        ),
        Err(w) => b.check("mq", false, format_args!("{w}")),
    }
}

/// Masks queue 0's MSI-X entry, completes a request (no interrupt, PBA bit
/// set), unmasks (the interrupt arrives, PBA bit clear).
fn check_msix_mask(b: &mut Blk) {
    let (Some(m), Some((e, v))) = (
        b.t.msix,
        b.queues[0]
            .as_ref()
            .and_then(|q| Some((q.entry?, q.vector?))),
    ) else {
        b.check(
            "msix_mask",
            false,
            format_args!("queue 0 has no MSI-X vector"),
        );
        return;
    };
    let before = arch::irq_count(v);
    m.set_masked(e, true);
    let st = b.request_irq(0, T_IN, 0, SECTOR as u32, true, false);
    time::delay_us(50_000);
    let while_masked = arch::irq_count(v) - before;
    let pending = m.pending(e);
    m.set_masked(e, false);
    let d = time::Deadline::after_us(crate::virtio::REQUEST_TIMEOUT_US);
    while arch::irq_count(v) == before && !d.passed() {
        arch::pause();
    }
    let after = arch::irq_count(v) - before;
    let pending_after = m.pending(e);
    let mut detail: StrBuf<300> = StrBuf::new();
    let _ = write!(
        detail,
        "entry={e} vector={v:#x} irqs_while_masked={while_masked} pba_pending={pending} irqs_after_unmask={after} pba_pending_after={pending_after}"
    );
    let mut ok = while_masked == 0 && pending && after == 1 && !pending_after;
    match st {
        Ok(S_OK) => {}
        Ok(s) => {
            ok = false;
            let _ = write!(detail, " read returned {}", status_name(s));
        }
        Err(w) => {
            ok = false;
            let _ = write!(detail, " {w}");
        }
    }
    b.check("msix_mask", ok, format_args!("{detail}"));
}
