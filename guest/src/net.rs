//! virtio-net checks (`virtio.net<n>.*`): the MAC address in the device
//! configuration, test frames from the host on receiveq 0 (`rx`), test
//! frames to the host on transmitq 1 (`tx`), and MSI-X delivery.
//!
//! Test frames (docs/test-guest.md; `e2e::net_test_frame` builds the same
//! bytes): Ethernet, ethertype 0x88b5 (IEEE local experimental), payload
//! `NIMBUS-NET-TX <i>` or `NIMBUS-NET-RX <i>`, a NUL byte, then a pattern
//! up to [`payload_len`] bytes. Every frame carries the 12-byte
//! virtio_net_hdr_v1 (VERSION_1); no offload is negotiated, so the header
//! is all zeroes on transmit and must say "no checksum, no GSO" on receive.
//!
//! The guest receives first and transmits afterwards: a host that sends its
//! frames after the `INFO virtio.net<n>.rx.ready` line is then certainly
//! capturing by the time the guest's frames leave.

use core::fmt::{self, Write};

use crate::report::{Ascii, StrBuf};
use crate::stage2::{self, Keys};
use crate::time::Deadline;
use crate::virtio::{
    Buf, DmaPage, IrqTally, Queue, Transport, Used, Why, F_VERSION_1, REQUEST_TIMEOUT_US,
};
use crate::{arch, expect, net_mq, println, why};

pub(crate) const F_MAC: u64 = 1 << 5;
pub(crate) const F_MRG_RXBUF: u64 = 1 << 15;

/// virtio_net_hdr_v1: with VERSION_1 num_buffers is always present.
pub(crate) const HDR_LEN: usize = 12;
pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETHERTYPE: u16 = 0x88b5;
/// Largest payload (MTU 1500) and frame (without FCS).
const MAX_PAYLOAD: usize = 1500;
pub(crate) const MAX_FRAME: usize = ETH_HLEN + MAX_PAYLOAD;
/// Payload length of test frame `i` is `PAYLOAD_SIZES[i % 8]`.
const PAYLOAD_SIZES: [usize; 8] = [1500, 64, 1024, 333, 1499, 65, 800, 257];
pub(crate) const BROADCAST: Mac = Mac([0xff; 6]);

const DEFAULT_TX_COUNT: u32 = 8;
const DEFAULT_RX_COUNT: u32 = 4;
const MAX_TX_COUNT: u32 = 100_000;
const MAX_RX_COUNT: u32 = 64;
const DEFAULT_RX_WAIT_S: u64 = 10;
const MAX_RX_WAIT_S: u64 = 600;
const DEFAULT_RX_BUFSIZE: usize = 2048;
/// Without MRG_RXBUF every buffer must hold a whole frame and its header.
const MIN_RX_BUFSIZE_NO_MRG: usize = HDR_LEN + MAX_FRAME;
const RX_PAGES: usize = 8;
const TX_PAGES: usize = 4;
/// Each frame being transmitted (header + frame) has a 2 KiB slot.
const TX_SLOT: usize = 2048;
const TX_SLOTS: usize = TX_PAGES * 4096 / TX_SLOT;
const PAGE: usize = 4096;
/// Most queue pairs the guest drives (`net.pairs`).
pub(crate) const MAX_PAIRS: usize = 8;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mac(pub(crate) [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Mac {
    /// Parses `xx:xx:xx:xx:xx:xx` (hex digits, either case).
    pub(crate) fn parse(s: &str) -> Option<Mac> {
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in m.iter_mut() {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(Mac(m))
    }
}

/// Which way a test frame travels (the marker word).
#[derive(Clone, Copy, Debug)]
enum Dir {
    /// Guest to host: `NIMBUS-NET-TX <i>`.
    Tx,
    /// Host to guest: `NIMBUS-NET-RX <i>`.
    Rx,
}

impl Dir {
    fn prefix(self) -> &'static [u8] {
        match self {
            Dir::Tx => b"NIMBUS-NET-TX ",
            Dir::Rx => b"NIMBUS-NET-RX ",
        }
    }
}

/// Payload length of test frame `i`.
fn payload_len(i: u32) -> usize {
    PAYLOAD_SIZES[i as usize % PAYLOAD_SIZES.len()]
}

/// Payload byte at offset `o` of test frame `i`, after the marker and its NUL.
fn pattern_byte(i: u32, o: usize) -> u8 {
    ((o as u32).wrapping_mul(7).wrapping_add(i.wrapping_mul(13)) as u8) ^ 0x5a
}

/// Writes test frame `i` into `out`; returns its length.
fn build_frame(out: &mut [u8; MAX_FRAME], dir: Dir, i: u32, dst: Mac, src: Mac) -> usize {
    out[..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    out[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let mut marker: StrBuf<32> = StrBuf::new();
    let _ = write!(marker, "{i}");
    let prefix = dir.prefix();
    let digits = marker.as_str().as_bytes();
    let len = payload_len(i);
    for (o, b) in out[ETH_HLEN..ETH_HLEN + len].iter_mut().enumerate() {
        *b = if o < prefix.len() {
            prefix[o]
        } else if o < prefix.len() + digits.len() {
            digits[o - prefix.len()]
        } else if o == prefix.len() + digits.len() {
            0
        } else {
            pattern_byte(i, o)
        };
    }
    ETH_HLEN + len
}

/// The index of a test frame travelling `dir` (ethertype and marker), if
/// `frame` is one; the rest of the frame is not checked.
fn test_frame_index(frame: &[u8], dir: Dir) -> Option<u32> {
    if frame.len() < ETH_HLEN || frame[12..14] != ETHERTYPE.to_be_bytes() {
        return None;
    }
    let rest = frame[ETH_HLEN..].strip_prefix(dir.prefix())?;
    let end = rest.iter().position(|&b| b == 0)?;
    let digits = core::str::from_utf8(&rest[..end]).ok()?;
    u32::try_from(expect::parse_u64(digits)?).ok()
}

/// Allocates `N` DMA pages.
pub(crate) fn alloc_pages<const N: usize>() -> Option<[DmaPage; N]> {
    let first = DmaPage::alloc()?;
    let mut pages = [first; N];
    for p in pages.iter_mut().skip(1) {
        *p = DmaPage::alloc()?;
    }
    Some(pages)
}

/// Waits (bounded) until `vector` has counted more than `base` interrupts;
/// records the outcome. True without a vector (no MSI-X: nothing expected).
fn wait_irq(tally: &mut IrqTally, vector: Option<u8>, base: u64) -> bool {
    let Some(v) = vector else {
        return true;
    };
    let d = Deadline::after_us(REQUEST_TIMEOUT_US);
    while arch::irq_count(v) <= base {
        if d.passed() {
            tally.waited += 1;
            return false;
        }
        arch::pause();
    }
    tally.waited += 1;
    tally.signalled += 1;
    true
}

/// The next used element, waiting at most [`REQUEST_TIMEOUT_US`].
fn pop_used_wait(q: &mut Queue) -> Option<Used> {
    let d = Deadline::after_us(REQUEST_TIMEOUT_US);
    loop {
        if let Some(u) = q.pop_used() {
            return Some(u);
        }
        if d.passed() {
            return None;
        }
        arch::pause();
    }
}

/// Initialises the device and runs every `virtio.net<n>.*` check; with
/// `net<n>.pairs` the multi-queue variant ([`net_mq::run`]).
pub fn run(mut t: Transport, n: usize, keys: &Keys<'_>, apic_id: u32) {
    let mut name: StrBuf<24> = StrBuf::new();
    let _ = write!(name, "virtio.net{n}");
    let name = name.as_str();
    let key = |field: &str| keys.get("net", n, field);
    if let Some(pairs) = key("pairs") {
        net_mq::run(t, name, &key, apic_id, pairs);
        return;
    }
    let wanted = wanted_features(&key);
    // Device configuration starts with u8 mac[6].
    let Some((mut queues, msix_err)) = stage2::bring_up(&mut t, name, 1, wanted, 2, apic_id) else {
        return;
    };
    let mac = check_mac(&t, name, key("mac"));
    let mut tally = IrqTally::default();
    traffic(&t, &mut queues, 1, name, mac, &key, &mut tally);
    match msix_err {
        Some(w) => stage2::check_named(name, "msix", false, format_args!("{w}")),
        None if tally.waited == 0 => {
            println!("INFO {name}.msix not run: no traffic (net.rx.count=0 net.tx.count=0)");
        }
        None => stage2::check_msix(&t, name, &tally, &queues),
    }
}

/// The single-queue feature set: VERSION_1, MAC and MRG_RXBUF (unless
/// `net.mrg_rxbuf=0`).
pub(crate) fn wanted_features<'a>(key: &impl Fn(&str) -> Option<&'a str>) -> u64 {
    let mut wanted = F_VERSION_1 | F_MAC | F_MRG_RXBUF;
    if key("mrg_rxbuf") == Some("0") {
        wanted &= !F_MRG_RXBUF;
    }
    wanted
}

/// What the `tx` check sent and got back, per queue pair.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TxPerPair {
    /// Frames put on each pair's transmitq.
    pub(crate) sent: [u32; MAX_PAIRS],
    /// Of those, returned in the used ring.
    pub(crate) returned: [u32; MAX_PAIRS],
}

/// The `rx` and `tx` checks on queue pairs `0..pairs` of `qs` (receiveq `k`
/// at `qs[2k]`, transmitq `k` at `qs[2k + 1]`): the host's frames are taken
/// from every receiveq, frame `i` is transmitted on pair `i % pairs`. With
/// more than one pair (or `net.pairs`) the details name the queues. Returns
/// the transmit counts per pair when `tx` ran.
pub(crate) fn traffic<'a>(
    t: &Transport,
    qs: &mut [Option<Queue>],
    pairs: usize,
    name: &str,
    mac: Mac,
    key: &impl Fn(&str) -> Option<&'a str>,
    tally: &mut IrqTally,
) -> Option<TxPerPair> {
    let multi = key("pairs").is_some();
    match parse_rx_keys(t, key) {
        Err(w) => stage2::check_named(name, "rx", false, format_args!("{w}")),
        Ok(None) => println!("INFO {name}.rx not run: net.rx.count=0"),
        Ok(Some(cfg)) => check_rx(qs, pairs, multi, name, mac, &cfg, tally),
    }
    match key("tx.count").map(|v| expect::parse_u64(v).filter(|&c| c <= u64::from(MAX_TX_COUNT))) {
        Some(None) => {
            stage2::check_named(
                name,
                "tx",
                false,
                format_args!("bad net.tx.count value (0..={MAX_TX_COUNT})"),
            );
            None
        }
        Some(Some(0)) => {
            println!("INFO {name}.tx not run: net.tx.count=0");
            None
        }
        count => {
            let count = count.flatten().map_or(DEFAULT_TX_COUNT, |c| c as u32);
            check_tx(qs, pairs, multi, name, mac, count, tally)
        }
    }
}

/// `mac`: VIRTIO_NET_F_MAC offered, the address unicast and nonzero, equal
/// to `net.mac` if given. Returns the address the traffic checks use (the
/// device's, else `net.mac`, else a locally administered placeholder).
pub(crate) fn check_mac(t: &Transport, name: &str, want: Option<&str>) -> Mac {
    let want_mac = want.map(Mac::parse);
    let fallback = match want_mac {
        Some(Some(m)) => m,
        _ => Mac([0x02, 0, 0, 0, 0, 0x01]),
    };
    if t.offered & F_MAC == 0 {
        stage2::check_named(
            name,
            "mac",
            false,
            format_args!("VIRTIO_NET_F_MAC not offered (using {fallback} for traffic)"),
        );
        return fallback;
    }
    let Some(mac) = t.read_config(|r| Mac(core::array::from_fn(|i| r.r8(i as u64)))) else {
        stage2::check_named(
            name,
            "mac",
            false,
            format_args!("device configuration unreadable"),
        );
        return fallback;
    };
    let mut detail: StrBuf<200> = StrBuf::new();
    let _ = write!(detail, "mac={mac}");
    let mut ok = true;
    if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
        ok = false;
        let _ = write!(detail, " not a unicast address");
    }
    match (want, want_mac) {
        (Some(w), Some(None)) => {
            ok = false;
            let _ = write!(detail, " bad net.mac value \"{}\"", Ascii(w.as_bytes()));
        }
        (_, Some(Some(m))) => {
            ok &= m == mac;
            let _ = write!(detail, " expected={m}");
        }
        _ => {
            let _ = write!(detail, " (no net.mac given)");
        }
    }
    stage2::check_named(name, "mac", ok, format_args!("{detail}"));
    mac
}

/// Parameters of the `rx` check.
struct RxConfig {
    count: u32,
    bufsize: usize,
    wait_s: u64,
    mrg: bool,
    /// Why the buffer size differs from `net.rx.bufsize`, if it does.
    note: Option<&'static str>,
}

/// The rx keys; `Ok(None)` when `net.rx.count=0`.
fn parse_rx_keys<'a>(
    t: &Transport,
    key: &impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<RxConfig>, Why> {
    let count = match key("rx.count").map(expect::parse_u64) {
        None => DEFAULT_RX_COUNT,
        Some(Some(c)) if c <= u64::from(MAX_RX_COUNT) => c as u32,
        Some(_) => return Err(why!("bad net.rx.count value (0..={MAX_RX_COUNT})")),
    };
    if count == 0 {
        return Ok(None);
    }
    let wait_s = match key("rx.wait").map(expect::parse_u64) {
        None => DEFAULT_RX_WAIT_S,
        Some(Some(s)) if (1..=MAX_RX_WAIT_S).contains(&s) => s,
        Some(_) => return Err(why!("bad net.rx.wait value (1..={MAX_RX_WAIT_S} seconds)")),
    };
    let mut bufsize = match key("rx.bufsize").map(expect::parse_u64) {
        None => DEFAULT_RX_BUFSIZE,
        Some(Some(b)) if b.is_power_of_two() && (64..=PAGE as u64).contains(&b) => b as usize,
        Some(_) => return Err(why!("bad net.rx.bufsize value (a power of two, 64..=4096)")),
    };
    let mrg = t.features & F_MRG_RXBUF != 0;
    let mut note = None;
    if !mrg && bufsize < MIN_RX_BUFSIZE_NO_MRG {
        bufsize = DEFAULT_RX_BUFSIZE;
        note = Some(" (raised: MRG_RXBUF not negotiated)");
    }
    Ok(Some(RxConfig {
        count,
        bufsize,
        wait_s,
        mrg,
        note,
    }))
}

/// Receive buffers: `nbufs` single-descriptor buffers of `bufsize` bytes in
/// `RX_PAGES` pages (none straddles a page).
struct RxBufs {
    pages: [DmaPage; RX_PAGES],
    bufsize: usize,
    nbufs: usize,
    /// Buffer posted under each head descriptor.
    of_head: [u16; 64],
    /// Buffers posted since the last notification.
    unkicked: bool,
}

impl RxBufs {
    /// Buffers of `bufsize` bytes in `npages` (1..=[`RX_PAGES`]) new DMA pages, as many as
    /// fit, at most the size of `q` and 64. `None` when the DMA memory is used up.
    fn new(q: &Queue, bufsize: usize, npages: usize) -> Option<RxBufs> {
        let npages = npages.clamp(1, RX_PAGES);
        let first = DmaPage::alloc()?;
        let mut pages = [first; RX_PAGES];
        for p in pages.iter_mut().take(npages).skip(1) {
            *p = DmaPage::alloc()?;
        }
        Some(RxBufs {
            pages,
            bufsize,
            nbufs: (npages * (PAGE / bufsize)).min(usize::from(q.size)).min(64),
            of_head: [0; 64],
            unkicked: false,
        })
    }

    fn at(&self, b: usize) -> (DmaPage, usize) {
        let per_page = PAGE / self.bufsize;
        (self.pages[b / per_page], (b % per_page) * self.bufsize)
    }

    fn post(&mut self, q: &mut Queue, b: usize) -> bool {
        let (page, off) = self.at(b);
        let buf = Buf {
            addr: page.phys(off),
            len: self.bufsize as u32,
            write: true,
        };
        match q.add(&[buf]) {
            Some(head) => {
                self.of_head[usize::from(head) % 64] = b as u16;
                self.unkicked = true;
                true
            }
            None => false,
        }
    }

    /// The buffer behind a used element (the caller reposts it).
    fn buffer(&self, u: &Used) -> Result<usize, Why> {
        if !u.known {
            return Err(why!("used id {} is not a buffer in flight", u.id));
        }
        Ok(usize::from(self.of_head[u.id as usize % 64]))
    }

    /// Why a used length is impossible, if it is.
    fn bad_len(&self, u: &Used) -> Option<Why> {
        (u.len as usize > self.bufsize).then(|| {
            why!(
                "used length {} exceeds the buffer ({} bytes)",
                u.len,
                self.bufsize
            )
        })
    }

    /// Takes one received frame, starting with used element `first` (more
    /// elements with MRG_RXBUF), into `frame`; reposts every buffer taken.
    /// Returns the frame length, whether it spanned several buffers, and
    /// notes on the header that do not fail the check.
    fn take(
        &mut self,
        q: &mut Queue,
        first: Used,
        mrg: bool,
        frame: &mut [u8; MAX_FRAME],
    ) -> Result<(usize, u16, bool), Why> {
        let b = self.buffer(&first)?;
        let (page, off) = self.at(b);
        let len = (first.len as usize).min(self.bufsize);
        let mut hdr = [0u8; HDR_LEN];
        if len >= HDR_LEN {
            page.read_bytes(off, &mut hdr);
        }
        let mut flen = len.saturating_sub(HDR_LEN).min(MAX_FRAME);
        page.read_bytes(off + HDR_LEN.min(len), &mut frame[..flen]);
        self.post(q, b);
        if let Some(w) = self.bad_len(&first) {
            return Err(w);
        }
        if len < HDR_LEN {
            return Err(why!("used length {len} is shorter than the header"));
        }
        let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
        let mut oversize = len - HDR_LEN > MAX_FRAME;
        let mut result = Ok(());
        if mrg {
            if num_buffers == 0 {
                result = Err(why!("num_buffers=0 with MRG_RXBUF"));
            }
            for k in 1..num_buffers {
                let Some(u) = pop_used_wait(q) else {
                    return Err(why!(
                        "buffer {} of {num_buffers} of a frame not returned within 2 s",
                        k + 1
                    ));
                };
                let b = self.buffer(&u)?;
                let (page, off) = self.at(b);
                let n = (u.len as usize).min(self.bufsize);
                if flen + n > MAX_FRAME {
                    oversize = true;
                } else {
                    page.read_bytes(off, &mut frame[flen..flen + n]);
                    flen += n;
                }
                self.post(q, b);
                if let Some(w) = self.bad_len(&u) {
                    return Err(w);
                }
            }
        }
        if oversize {
            return Err(why!("frame longer than {MAX_FRAME} bytes"));
        }
        // Neither GUEST_CSUM nor any GUEST_* offload is negotiated.
        if hdr[0] != 0 || hdr[1] != 0 {
            return Err(why!(
                "header flags={:#x} gso_type={:#x} (no offload negotiated: both must be 0)",
                hdr[0],
                hdr[1]
            ));
        }
        result.map(|()| (flen, num_buffers, mrg && num_buffers > 1))
    }
}

/// What one received frame turned out to be.
// Short-lived, on the stack; there is no heap to box the reason into.
#[allow(clippy::large_enum_variant)]
enum RxVerdict {
    /// Not a receive test frame (router solicitations from the host, ...).
    Ignored,
    /// Test frame `i`, intact and new.
    Good(u32),
    /// Test frame `i`, but wrong.
    Bad(u32, Why),
}

/// Judges `frame` against the receive test frames `0..count`, `got` being the
/// ones already received (bit `i`); `expected` is scratch space.
fn judge_rx(
    frame: &[u8],
    count: u32,
    got: u64,
    mac: Mac,
    expected: &mut [u8; MAX_FRAME],
) -> RxVerdict {
    let Some(i) = test_frame_index(frame, Dir::Rx) else {
        return RxVerdict::Ignored;
    };
    let len = frame.len();
    let dst = Mac(core::array::from_fn(|k| frame[k]));
    let src = Mac(core::array::from_fn(|k| frame[6 + k]));
    let want_len = build_frame(expected, Dir::Rx, i, dst, src);
    let why = if i >= count {
        why!("index beyond net.rx.count={count}")
    } else if got & (1 << i) != 0 {
        why!("duplicate")
    } else if dst != mac && dst != BROADCAST {
        why!("to {dst}, not to {mac}")
    } else if len != want_len {
        why!("{len} bytes, expected {want_len}")
    } else if let Some(o) = (0..len).find(|&o| frame[o] != expected[o]) {
        why!(
            "byte {o} is {:#04x}, expected {:#04x}",
            frame[o],
            expected[o]
        )
    } else {
        return RxVerdict::Good(i);
    };
    RxVerdict::Bad(i, why)
}

/// `rx`: posts the receive buffers on receiveqs `qs[2k]`, `k < pairs`,
/// prints `INFO <name>.rx.ready`, and waits for test frames 0..count (each
/// exactly once, intact, to our MAC or broadcast, on any of those queues);
/// other frames are ignored. With `multi` the details count frames per queue.
fn check_rx(
    qs: &mut [Option<Queue>],
    pairs: usize,
    multi: bool,
    name: &str,
    mac: Mac,
    cfg: &RxConfig,
    tally: &mut IrqTally,
) {
    let pairs = pairs.clamp(1, MAX_PAIRS);
    // Eight pages in all, at least one per queue.
    let npages = (RX_PAGES / pairs).max(1);
    let mut bufs: [Option<RxBufs>; MAX_PAIRS] = core::array::from_fn(|_| None);
    let mut base = [0u64; MAX_PAIRS];
    for k in 0..pairs {
        let Some(q) = qs.get_mut(2 * k).and_then(Option::as_mut) else {
            stage2::check_named(name, "rx", false, format_args!("no receiveq {}", 2 * k));
            return;
        };
        let Some(mut rx) = RxBufs::new(q, cfg.bufsize, npages) else {
            stage2::check_named(name, "rx", false, format_args!("out of DMA memory"));
            return;
        };
        base[k] = q.vector.map_or(0, arch::irq_count);
        for b in 0..rx.nbufs {
            rx.post(q, b);
        }
        q.kick();
        rx.unkicked = false;
        bufs[k] = Some(rx);
    }
    let (nbufs, bufsize) = bufs[0].as_ref().map_or((0, 0), |b| (b.nbufs, b.bufsize));
    let mut queues: StrBuf<64> = StrBuf::new();
    if multi {
        let _ = write!(queues, " pairs={pairs} receiveqs=");
        for k in 0..pairs {
            let _ = write!(queues, "{}{}", if k > 0 { "," } else { "" }, 2 * k);
        }
    }
    println!(
        "INFO {name}.rx.ready mac={mac} buffers={nbufs} bufsize={bufsize}{} mrg_rxbuf={} expect={} wait={}s{queues}",
        cfg.note.unwrap_or(""),
        if cfg.mrg { "yes" } else { "no" },
        cfg.count,
        cfg.wait_s
    );

    let all: u64 = if cfg.count >= 64 {
        u64::MAX
    } else {
        (1u64 << cfg.count) - 1
    };
    let mut got = 0u64;
    let mut per_queue = [0u32; MAX_PAIRS];
    let mut frames = 0u32;
    let mut ignored = 0u32;
    let mut merged = 0u32;
    let mut num_buffers_not_1 = 0u32;
    let mut bad = 0u32;
    let mut irq_missed = 0u32;
    let mut detail: StrBuf<300> = StrBuf::new();
    let mut frame = [0u8; MAX_FRAME];
    let mut expected = [0u8; MAX_FRAME];
    let wait = Deadline::after_us(cfg.wait_s * 1_000_000);
    // A flood of other frames must not keep the loop going for ever.
    let hard = Deadline::after_us(cfg.wait_s * 1_000_000 + 2 * REQUEST_TIMEOUT_US);
    // Per queue, frames taken since its ring was last seen empty; their
    // interrupt must come after `base`, read before that empty poll.
    let mut pending = [false; MAX_PAIRS];
    let t0 = arch::rdtsc();
    let mut dead: Option<Why> = None;
    'poll: while !hard.passed() {
        let mut took = false;
        for k in 0..pairs {
            let (Some(q), Some(rx)) = (qs[2 * k].as_mut(), bufs[k].as_mut()) else {
                continue;
            };
            let vector = q.vector;
            let snapshot = vector.map_or(0, arch::irq_count);
            let Some(u) = q.pop_used() else {
                if pending[k] {
                    if !wait_irq(tally, vector, base[k]) {
                        irq_missed += 1;
                    }
                    pending[k] = false;
                }
                base[k] = snapshot;
                if rx.unkicked {
                    q.kick();
                    rx.unkicked = false;
                }
                continue;
            };
            took = true;
            pending[k] = true;
            frames += 1;
            let (len, num_buffers, multi_buf) = match rx.take(q, u, cfg.mrg, &mut frame) {
                Ok(r) => r,
                Err(w) => {
                    bad += 1;
                    let _ = write!(detail, " frame {frames}: {w};");
                    if !u.known {
                        dead = Some(w);
                        break 'poll;
                    }
                    continue;
                }
            };
            if !cfg.mrg && num_buffers != 1 {
                num_buffers_not_1 += 1;
            }
            merged += u32::from(multi_buf);
            match judge_rx(&frame[..len], cfg.count, got, mac, &mut expected) {
                RxVerdict::Ignored => ignored += 1,
                RxVerdict::Good(i) => {
                    got |= 1 << i;
                    per_queue[k] += 1;
                }
                RxVerdict::Bad(i, w) => {
                    bad += 1;
                    let _ = write!(detail, " NIMBUS-NET-RX {i}: {w};");
                }
            }
        }
        if !took {
            if got == all || wait.passed() {
                break;
            }
            arch::pause();
        }
    }
    let us = crate::time::us_since(t0);
    let received = got.count_ones();
    let mut missing: StrBuf<120> = StrBuf::new();
    for i in 0..cfg.count {
        if got & (1 << i) == 0 {
            let _ = write!(missing, "{}{i}", if missing.is_empty() { "" } else { "," });
        }
    }
    if !missing.is_empty() {
        let _ = write!(detail, " missing: {missing};");
    }
    if irq_missed > 0 {
        let _ = write!(
            detail,
            " {irq_missed} batch(es) of used buffers without an interrupt;"
        );
    }
    if let Some(w) = &dead {
        let _ = write!(detail, " stopped: {w};");
    }
    if num_buffers_not_1 > 0 {
        println!(
            "INFO {name}.rx num_buffers != 1 in {num_buffers_not_1} frame(s) without MRG_RXBUF (the spec asks for 1)"
        );
    }
    let mut per: StrBuf<96> = StrBuf::new();
    if multi {
        let _ = write!(per, " per_queue=");
        for (k, n) in per_queue.iter().enumerate().take(pairs) {
            let _ = write!(per, "{}q{}:{n}", if k > 0 { "," } else { "" }, 2 * k);
        }
    }
    stage2::check_named(
        name,
        "rx",
        got == all && bad == 0 && irq_missed == 0 && dead.is_none(),
        format_args!(
            "{received}/{} test frames intact in {} ms (frames={frames} ignored={ignored} multi_buffer={merged} buffers={nbufs} bufsize={bufsize} mrg_rxbuf={}{per}){detail}",
            cfg.count,
            us / 1000,
            if cfg.mrg { "yes" } else { "no" },
        ),
    );
}

/// `tx`: sends test frames 0..count from `mac` to broadcast, frame `i` on
/// the transmitq of pair `i % pairs` (`qs[2k + 1]`), in batches of up to
/// [`TX_SLOTS`] frames (chains of 1, 2 and 3 descriptors in turn: header and
/// frame together, header then frame, header then the frame in two halves;
/// one notification per queue and batch); every frame must come back in the
/// used ring and every queue's batch must raise an interrupt. With `multi`
/// the detail counts frames per pair. Returns those counts.
fn check_tx(
    qs: &mut [Option<Queue>],
    pairs: usize,
    multi: bool,
    name: &str,
    mac: Mac,
    count: u32,
    tally: &mut IrqTally,
) -> Option<TxPerPair> {
    let pairs = pairs.clamp(1, MAX_PAIRS);
    if let Some(k) = (0..pairs).find(|&k| qs.get(2 * k + 1).is_none_or(Option::is_none)) {
        stage2::check_named(
            name,
            "tx",
            false,
            format_args!("no transmitq {}", 2 * k + 1),
        );
        return None;
    }
    let Some(pages) = alloc_pages::<TX_PAGES>() else {
        stage2::check_named(name, "tx", false, format_args!("out of DMA memory"));
        return None;
    };
    if multi {
        println!("INFO {name}.tx.start frames={count} from={mac} pairs={pairs}");
    } else {
        println!("INFO {name}.tx.start frames={count} from={mac}");
    }
    let hdr = [0u8; HDR_LEN];
    let mut frame = [0u8; MAX_FRAME];
    let mut per = TxPerPair::default();
    let (mut sent, mut returned, mut bytes, mut batches) = (0u32, 0u32, 0u64, 0u32);
    let (mut bogus, mut irq_missed, mut max_used_len) = (0u32, 0u32, 0u32);
    let mut err: Option<Why> = None;
    let t0 = arch::rdtsc();
    while sent < count && err.is_none() {
        let mut base = [0u64; MAX_PAIRS];
        for (k, b) in base.iter_mut().enumerate().take(pairs) {
            *b = qs[2 * k + 1]
                .as_ref()
                .and_then(|q| q.vector)
                .map_or(0, arch::irq_count);
        }
        let mut in_batch = 0usize;
        let mut batch_of = [0u32; MAX_PAIRS];
        while sent < count && in_batch < TX_SLOTS {
            let k = sent as usize % pairs;
            let Some(q) = qs[2 * k + 1].as_mut().filter(|q| q.free_descriptors() >= 3) else {
                break;
            };
            let page = pages[in_batch * TX_SLOT / PAGE];
            let off = (in_batch * TX_SLOT) % PAGE;
            let len = build_frame(&mut frame, Dir::Tx, sent, BROADCAST, mac);
            page.write_bytes(off, &hdr);
            page.write_bytes(off + HDR_LEN, &frame[..len]);
            let a = page.phys(off);
            let f = a + HDR_LEN as u64;
            let half = (len / 2) as u32;
            let ro = |addr: u64, len: u32| Buf {
                addr,
                len,
                write: false,
            };
            let chains = [
                [ro(a, (HDR_LEN + len) as u32), ro(0, 0), ro(0, 0)],
                [ro(a, HDR_LEN as u32), ro(f, len as u32), ro(0, 0)],
                [
                    ro(a, HDR_LEN as u32),
                    ro(f, half),
                    ro(f + u64::from(half), len as u32 - half),
                ],
            ];
            let c = sent as usize % 3;
            if q.add(&chains[c][..=c]).is_none() {
                err = Some(why!("no free descriptors for frame {sent}"));
                break;
            }
            in_batch += 1;
            batch_of[k] += 1;
            per.sent[k] += 1;
            sent += 1;
            bytes += len as u64;
        }
        if in_batch == 0 {
            break;
        }
        for k in 0..pairs {
            if let Some(q) = qs[2 * k + 1].as_ref().filter(|_| batch_of[k] > 0) {
                q.kick();
                batches += 1;
            }
        }
        for k in 0..pairs {
            let Some(q) = qs[2 * k + 1].as_mut().filter(|_| batch_of[k] > 0) else {
                continue;
            };
            let mut complete = true;
            for _ in 0..batch_of[k] {
                let Some(u) = pop_used_wait(q) else {
                    complete = false;
                    if err.is_none() {
                        err = Some(if multi {
                            why!(
                                "{returned} of {sent} frames returned; the rest on transmitq {} not within 2 s",
                                q.index
                            )
                        } else {
                            why!("{returned} of {sent} frames returned; the rest not within 2 s")
                        });
                    }
                    break;
                };
                returned += 1;
                per.returned[k] += 1;
                bogus += u32::from(!u.known);
                max_used_len = max_used_len.max(u.len);
            }
            if complete && !wait_irq(tally, q.vector, base[k]) {
                irq_missed += 1;
            }
        }
    }
    let us = crate::time::us_since(t0);
    let mut detail: StrBuf<300> = StrBuf::new();
    let _ = write!(
        detail,
        "{returned}/{count} frames ({bytes} bytes, ethertype {ETHERTYPE:#06x}) from {mac} to {BROADCAST} returned in {batches} batch(es), {} ms; chains of 1/2/3 descriptors",
        us / 1000
    );
    if multi {
        let _ = write!(detail, "; per pair (returned/sent):");
        for k in 0..pairs {
            let _ = write!(detail, " p{k}={}/{}", per.returned[k], per.sent[k]);
        }
    }
    if qs.iter().flatten().any(|q| q.vector.is_some()) {
        let _ = write!(
            detail,
            "; {} of {batches} batch(es) signalled",
            batches - irq_missed
        );
    }
    if bogus > 0 {
        let _ = write!(detail, "; {bogus} used id(s) not in flight");
    }
    if max_used_len > 0 {
        println!("INFO {name}.tx used length up to {max_used_len} (the device writes nothing: 0 expected)");
    }
    if let Some(w) = &err {
        let _ = write!(detail, "; {w}");
    }
    stage2::check_named(
        name,
        "tx",
        err.is_none() && returned == count && bogus == 0 && irq_missed == 0,
        format_args!("{detail}"),
    );
    Some(per)
}
