//! virtio-fs (virtio 1.2 section 5.11, device type 26) with a minimal FUSE
//! client: FUSE_INIT, then FUSE_LOOKUP of one file in the root directory,
//! FUSE_OPEN, FUSE_READ and FUSE_RELEASE of it. Keys `fs.tag`, `fs.file` and
//! `fs.content` (per device `fs<N>.*`) are described in docs/test-guest.md.
//!
//! Queue 0 is the hiprio queue (set up, never used: the guest sends no
//! FORGET/INTERRUPT), queue 1 the first request queue. Every request is one
//! descriptor chain: the device-readable `fuse_in_header` and arguments, then
//! the device-writable `fuse_out_header` and reply payload (FUSE_READ: the
//! data in a buffer of its own). Struct layouts follow the Linux uapi
//! `<linux/fuse.h>` (protocol 7.31, all fields little-endian here).

use core::fmt::Write;

use crate::report::{Ascii, StrBuf};
use crate::stage2::{check_msix, check_named, check_pcicfg, finish_init, report_init, Keys};
use crate::virtio::{Buf, DmaPage, IrqTally, Queue, Transport, Why, F_VERSION_1};
use crate::why;

/// Device configuration: `tag[36]` (UTF-8, NUL-padded) and le32 `num_request_queues`.
const TAG_LEN: usize = 36;
const CFG_NUM_REQUEST_QUEUES: u64 = 36;
/// Queue 0: hiprio; queue 1: the first request queue.
const QUEUES: u16 = 2;

/// FUSE opcodes.
const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_INIT: u32 = 26;
/// Protocol version the guest speaks.
const FUSE_MAJOR: u32 = 7;
const FUSE_MINOR: u32 = 31;
/// `fuse_in_header`: len u32, opcode u32, unique u64, nodeid u64, uid u32, gid u32, pid u32,
/// total_extlen u16, padding u16.
const IN_HEADER_LEN: usize = 40;
/// `fuse_out_header`: len u32, error i32 (0 or a negative errno), unique u64.
const OUT_HEADER_LEN: usize = 16;
/// Node ID of the root directory.
const ROOT_ID: u64 = 1;
/// `fuse_entry_out` (128 bytes): nodeid at 0, then `fuse_attr` at 40 with size at +8 and
/// mode at +60.
const ENTRY_OUT_LEN: usize = 128;
const ENTRY_ATTR_SIZE: usize = 48;
const ENTRY_ATTR_MODE: usize = 100;
const S_IFMT: u64 = 0o170_000;
const S_IFREG: u64 = 0o100_000;
/// `fuse_init_out` (64 bytes): major, minor, max_readahead, flags (u32), max_background,
/// congestion_threshold (u16), max_write (u32 at 20), ...
const INIT_OUT_LEN: usize = 64;
const INIT_OUT_MAX_WRITE: usize = 20;
/// `fuse_open_out` (16 bytes): fh u64, open_flags u32, padding.
const OPEN_OUT_LEN: usize = 16;
const O_RDONLY: u64 = 0;
/// Bytes asked for by FUSE_READ (the data page).
const READ_SIZE: usize = 4096;
/// max_readahead offered in FUSE_INIT.
const MAX_READAHEAD: u64 = 4096;

/// Where the reply (out header and payload) goes in the request page; the request itself
/// starts at 0.
const REPLY_OFF: usize = 2048;
/// Largest request (header and arguments) the page holds.
const MAX_REQUEST: usize = REPLY_OFF;

/// Stores the low `width` bytes of `v` little-endian at `b[off..]`.
fn put(b: &mut [u8], off: usize, width: usize, v: u64) {
    b[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

/// Reads `width` (≤ 8) little-endian bytes at `off` of `page`.
fn get(page: &DmaPage, off: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    page.read_bytes(off, &mut b[..width]);
    u64::from_le_bytes(b)
}

fn op_name(op: u32) -> &'static str {
    match op {
        FUSE_LOOKUP => "FUSE_LOOKUP",
        FUSE_OPEN => "FUSE_OPEN",
        FUSE_READ => "FUSE_READ",
        FUSE_RELEASE => "FUSE_RELEASE",
        FUSE_INIT => "FUSE_INIT",
        _ => "FUSE_?",
    }
}

/// Where a request's reply payload goes.
#[derive(Clone, Copy)]
enum Reply {
    /// Right after the out header in the request page, at most this many bytes.
    Inline(usize),
    /// In the data page, in a descriptor of its own, at most this many bytes.
    Data(usize),
}

/// One virtio-fs device's FUSE session on its first request queue.
struct Session {
    queue: Queue,
    page: DmaPage,
    data: DmaPage,
    unique: u64,
    tally: IrqTally,
}

impl Session {
    /// Sends one request (`args` after the in header) to `nodeid` and waits for it. Returns
    /// the length of the reply payload (after the out header) once the device answered with
    /// the same `unique`, error 0 and an out-header length equal to what it wrote.
    fn call(&mut self, op: u32, nodeid: u64, args: &[u8], reply: Reply) -> Result<usize, Why> {
        let name = op_name(op);
        let len = IN_HEADER_LEN + args.len();
        if len > MAX_REQUEST {
            return Err(why!("{name}: request of {len} bytes does not fit"));
        }
        self.unique += 1;
        let mut h = [0u8; IN_HEADER_LEN];
        put(&mut h, 0, 4, len as u64);
        put(&mut h, 4, 4, u64::from(op));
        put(&mut h, 8, 8, self.unique);
        put(&mut h, 16, 8, nodeid);
        // uid, gid, pid, total_extlen, padding: 0.
        self.page.write_bytes(0, &h);
        self.page.write_bytes(IN_HEADER_LEN, args);
        self.page.write_bytes(REPLY_OFF, &[0; OUT_HEADER_LEN]);
        let request = Buf {
            addr: self.page.phys(0),
            len: len as u32,
            write: false,
        };
        let (inline, data) = match reply {
            Reply::Inline(n) => (n, None),
            Reply::Data(n) => (0, Some(n)),
        };
        let header = Buf {
            addr: self.page.phys(REPLY_OFF),
            len: (OUT_HEADER_LEN + inline) as u32,
            write: true,
        };
        let c = match data {
            None => self.queue.transact(&[request, header], true),
            Some(n) => {
                let payload = Buf {
                    addr: self.data.phys(0),
                    len: n as u32,
                    write: true,
                };
                self.queue.transact(&[request, header, payload], true)
            }
        };
        self.tally.add(&c);
        let Some((_, used)) = c.used else {
            return Err(why!("{name} not completed within 2 s"));
        };
        let out_len = get(&self.page, REPLY_OFF, 4);
        let error = get(&self.page, REPLY_OFF + 4, 4) as u32 as i32;
        let unique = get(&self.page, REPLY_OFF + 8, 8);
        if unique != self.unique {
            return Err(why!(
                "{name}: reply unique {unique} for request {}",
                self.unique
            ));
        }
        if error != 0 {
            return Err(why!("{name}: error {error} (negative errno)"));
        }
        if out_len != u64::from(used) || (used as usize) < OUT_HEADER_LEN {
            return Err(why!(
                "{name}: out header len {out_len} but the device wrote {used} bytes"
            ));
        }
        Ok(used as usize - OUT_HEADER_LEN)
    }

    /// FUSE_INIT; returns the detail of the `fuse_init` check.
    fn init(&mut self) -> Result<StrBuf<200>, Why> {
        // fuse_init_in as of 7.31: major, minor, max_readahead, flags.
        let mut a = [0u8; 16];
        put(&mut a, 0, 4, u64::from(FUSE_MAJOR));
        put(&mut a, 4, 4, u64::from(FUSE_MINOR));
        put(&mut a, 8, 4, MAX_READAHEAD);
        let n = self.call(FUSE_INIT, 0, &a, Reply::Inline(INIT_OUT_LEN))?;
        if n < 24 {
            return Err(why!(
                "FUSE_INIT reply of {n} bytes (fuse_init_out needs 24)"
            ));
        }
        let p = |off| get(&self.page, REPLY_OFF + OUT_HEADER_LEN + off, 4);
        let (major, minor, flags, max_write) = (p(0), p(4), p(12), p(INIT_OUT_MAX_WRITE));
        let mut d: StrBuf<200> = StrBuf::new();
        let _ = write!(
            d,
            "sent {FUSE_MAJOR}.{FUSE_MINOR} flags=0; device {major}.{minor} flags={flags:#x} \
             max_write={max_write} reply={n} bytes"
        );
        if major != u64::from(FUSE_MAJOR) {
            return Err(why!("{d}: major version differs"));
        }
        if max_write == 0 {
            return Err(why!("{d}: max_write 0"));
        }
        Ok(d)
    }

    /// FUSE_LOOKUP of `file` in the root; returns its node ID, size and mode.
    fn lookup(&mut self, file: &str) -> Result<(u64, u64, u64), Why> {
        let mut a = [0u8; 256];
        let name = file.as_bytes();
        if name.len() >= a.len() {
            return Err(why!("file name of {} bytes is too long", name.len()));
        }
        a[..name.len()].copy_from_slice(name);
        let n = self.call(
            FUSE_LOOKUP,
            ROOT_ID,
            &a[..=name.len()],
            Reply::Inline(ENTRY_OUT_LEN),
        )?;
        if n < ENTRY_OUT_LEN {
            return Err(why!(
                "FUSE_LOOKUP reply of {n} bytes (fuse_entry_out is 128)"
            ));
        }
        let r = REPLY_OFF + OUT_HEADER_LEN;
        let nodeid = get(&self.page, r, 8);
        let size = get(&self.page, r + ENTRY_ATTR_SIZE, 8);
        let mode = get(&self.page, r + ENTRY_ATTR_MODE, 4);
        if nodeid == 0 {
            return Err(why!("FUSE_LOOKUP returned node ID 0 (negative entry)"));
        }
        Ok((nodeid, size, mode))
    }

    /// FUSE_OPEN (O_RDONLY), FUSE_READ of up to 4 KiB at offset 0 into `out`, FUSE_RELEASE.
    /// Returns the bytes read and the file handle.
    fn read(&mut self, nodeid: u64, out: &mut [u8; READ_SIZE]) -> Result<(usize, u64), Why> {
        // fuse_open_in: flags, open_flags.
        let mut a = [0u8; 8];
        put(&mut a, 0, 4, O_RDONLY);
        let n = self.call(FUSE_OPEN, nodeid, &a, Reply::Inline(OPEN_OUT_LEN))?;
        if n < OPEN_OUT_LEN {
            return Err(why!("FUSE_OPEN reply of {n} bytes (fuse_open_out is 16)"));
        }
        let fh = get(&self.page, REPLY_OFF + OUT_HEADER_LEN, 8);
        // fuse_read_in: fh, offset (u64), size, read_flags (u32), lock_owner (u64), flags,
        // padding (u32).
        let mut a = [0u8; 40];
        put(&mut a, 0, 8, fh);
        put(&mut a, 16, 4, READ_SIZE as u64);
        put(&mut a, 32, 4, O_RDONLY);
        let got = self.call(FUSE_READ, nodeid, &a, Reply::Data(READ_SIZE));
        if let Ok(n) = got {
            self.data.read_bytes(0, &mut out[..n.min(READ_SIZE)]);
        }
        // fuse_release_in: fh (u64), flags, release_flags (u32), lock_owner (u64). Released
        // also when the read failed.
        let mut a = [0u8; 24];
        put(&mut a, 0, 8, fh);
        put(&mut a, 8, 4, O_RDONLY);
        let released = self.call(FUSE_RELEASE, nodeid, &a, Reply::Inline(0));
        let n = got?;
        released?;
        Ok((n.min(READ_SIZE), fh))
    }
}

/// Checks virtio-fs device `n` (`virtio.fs<n>.*`).
pub fn run(mut t: Transport, n: usize, keys: &Keys<'_>, apic_id: u32) {
    let mut name: StrBuf<24> = StrBuf::new();
    let _ = write!(name, "virtio.fs{n}");
    let name = name.as_str();
    let Some(session) = bring_up(&mut t, name, n, keys, apic_id) else {
        for what in ["fuse_init", "lookup", "read", "msix"] {
            check_named(name, what, false, format_args!("device not initialised"));
        }
        return;
    };
    let (mut s, msix_err) = session;
    let file = keys.get("fs", n, "file");
    let content = keys.get("fs", n, "content");
    let init = s.init();
    match &init {
        Ok(d) => check_named(name, "fuse_init", true, format_args!("{d}")),
        Err(w) => check_named(name, "fuse_init", false, format_args!("{w}")),
    }
    let looked_up = match (&init, file, content) {
        (Err(_), _, _) => Err(why!("not attempted: FUSE_INIT failed")),
        (_, None, _) => Err(why!("no fs.file given")),
        (_, _, None) => Err(why!("no fs.content given")),
        (Ok(_), Some(f), Some(c)) => s.lookup(f).and_then(|(id, size, mode)| {
            let d = why!(
                "\"{}\" in node {ROOT_ID}: node={id} size={size} mode={mode:#o} \
                 (expected size {})",
                Ascii(f.as_bytes()),
                c.len()
            );
            if size != c.len() as u64 || mode & S_IFMT != S_IFREG {
                Err(d)
            } else {
                Ok((id, d))
            }
        }),
    };
    match &looked_up {
        Ok((_, d)) => check_named(name, "lookup", true, format_args!("{d}")),
        Err(w) => check_named(name, "lookup", false, format_args!("{w}")),
    }
    let read = match (&looked_up, content) {
        (Ok((id, _)), Some(c)) => {
            let mut buf = [0u8; READ_SIZE];
            s.read(*id, &mut buf).and_then(|(got, fh)| {
                let d = why!(
                    "fh={fh} {got} bytes at offset 0: \"{}\" (expected {} bytes)",
                    Ascii(&buf[..got.min(64)]),
                    c.len()
                );
                if &buf[..got] == c.as_bytes() {
                    Ok(d)
                } else {
                    Err(d)
                }
            })
        }
        _ => Err(why!("not attempted: no successful FUSE_LOOKUP")),
    };
    match &read {
        Ok(d) => check_named(name, "read", true, format_args!("{d}")),
        Err(w) => check_named(name, "read", false, format_args!("{w}")),
    }
    match msix_err {
        Some(w) => check_named(name, "msix", false, format_args!("{w}")),
        None => {
            let tally = s.tally;
            let queues = [None, Some(s.queue)];
            check_msix(&t, name, &tally, &queues);
        }
    }
}

/// Feature negotiation (VERSION_1 only, no VIRTIO_FS_F_NOTIFICATION), both queues,
/// DRIVER_OK, then the device configuration against `fs.tag`: reports `init` and `pcicfg`.
fn bring_up(
    t: &mut Transport,
    name: &str,
    n: usize,
    keys: &Keys<'_>,
    apic_id: u32,
) -> Option<(Session, Option<Why>)> {
    let (Some(page), Some(data)) = (DmaPage::alloc(), DmaPage::alloc()) else {
        check_named(name, "init", false, format_args!("out of DMA memory"));
        return None;
    };
    let r = t
        .negotiate(F_VERSION_1)
        .and_then(|()| finish_init(t, QUEUES, apic_id))
        .and_then(|(queues, msix_err)| {
            let (tag, nrq) = t
                .read_config(|c| {
                    let tag: [u8; TAG_LEN] = core::array::from_fn(|i| c.r8(i as u64));
                    (tag, c.r32(CFG_NUM_REQUEST_QUEUES))
                })
                .ok_or_else(|| why!("no stable device configuration"))?;
            let end = tag.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
            let tag = &tag[..end];
            crate::println!(
                "INFO {name} tag=\"{}\" num_request_queues={nrq}",
                Ascii(tag)
            );
            match keys.get("fs", n, "tag") {
                None => return Err(why!("tag \"{}\": no fs.tag given", Ascii(tag))),
                Some(want) if want.as_bytes() != tag => {
                    return Err(why!("tag \"{}\", expected \"{want}\"", Ascii(tag)));
                }
                Some(_) => {}
            }
            if nrq == 0 {
                return Err(why!("num_request_queues 0"));
            }
            Ok((queues, msix_err))
        });
    let (queues, msix_err) = match r {
        Ok(v) => v,
        Err(w) => {
            t.fail();
            check_named(name, "init", false, format_args!("{} {w}", t.func.bdf));
            return None;
        }
    };
    report_init(name, t, &queues);
    // The first device configuration field is the tag, a byte array.
    check_pcicfg(t, name, 1);
    let [_, Some(queue)] = queues else {
        return None;
    };
    Some((
        Session {
            queue,
            page,
            data,
            unique: 0,
            tally: IrqTally::default(),
        },
        msix_err,
    ))
}
