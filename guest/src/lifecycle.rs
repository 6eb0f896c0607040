//! Machine lifecycle features the host-side tests drive through the command line:
//! boot-progress (POST) codes on port 0x80, reboots counted in CMOS NVRAM, `mode=boot`, and
//! the `lifecycle=1` mode for the VMM's control-plane tests (pause/resume, reboot, NMI, power
//! button; time by the TSC and by kvmclock; `lifecycle.hold=1` to stay up after the report;
//! see [`run`] and docs/test-guest.md, "Lifecycle mode").

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::{self, Acpi};
use crate::arch::{self, inl, inw, outb, outw};
use crate::bench::{self, Data, Engine, Next, Scratch, Shape};
use crate::blk::{self, Blk, SECTOR, S_OK, T_FLUSH, T_OUT};
use crate::kvmclock::{self, Absent, KvmClock};
use crate::regions::Regions;
use crate::report::{check, StrBuf};
use crate::rtc::cmos;
use crate::startinfo::StartInfo;
use crate::virtio::Why;
use crate::{expect, phys, println, stage2, time, why};

/// Boot-progress port; the VMM logs writes with a timestamp.
const POST_PORT: u16 = 0x80;
/// POST code written on entry to the CPL3 Rust code.
pub const POST_ENTERED: u8 = 0x01;
/// POST code written when the checks are done, just before power-off.
pub const POST_DONE: u8 = 0xfe;

/// CMOS NVRAM byte holding how many times this machine has rebooted. CMOS is battery-backed:
/// it survives a reset but not a power cycle.
const CMOS_BOOT_COUNT: u8 = 0x7c;
/// CMOS NVRAM byte counting the boots of the lifecycle mode (`LIFECYCLE boot=<n>`).
const CMOS_LIFECYCLE_BOOTS: u8 = 0x7d;

/// Writes a POST code.
pub fn post(code: u8) {
    outb(POST_PORT, code);
}

fn cmos_write(reg: u8, value: u8) {
    outb(0x70, reg);
    outb(0x71, value);
}

/// `reboot.count=N [reboot.method=cf9|kbd]`: reset the machine N times before running the
/// checks, counting boots in CMOS NVRAM. Prints `INFO boot.count=K` on every boot.
pub fn maybe_reboot(cmdline: &str) {
    let Some(wanted) = expect::value(cmdline, "reboot.count").and_then(expect::parse_u64) else {
        return;
    };
    let count = cmos(CMOS_BOOT_COUNT);
    println!("INFO boot.count={count}");
    if u64::from(count) >= wanted {
        return;
    }
    cmos_write(CMOS_BOOT_COUNT, count.wrapping_add(1));
    let method = expect::value(cmdline, "reboot.method").unwrap_or("cf9");
    println!("INFO rebooting via {method}");
    match method {
        // i8042 command 0xfe pulses the CPU reset line.
        "kbd" => outb(0x64, 0xfe),
        // Reset control register: RST_CPU | SYS_RST.
        _ => outb(0xcf9, 0x06),
    }
    crate::time::delay_us(1_000_000);
    println!("FAULT reset-ignored method={method}");
}

// ---------------------------------------------------------------------------------------------
// The lifecycle mode (`lifecycle=1`)
// ---------------------------------------------------------------------------------------------

const MIB: u64 = 1024 * 1024;
/// Bytes per block write: one slot of the stream's region.
const BLOCK: u64 = 4096;
/// Time between two `TICK` lines, in milliseconds of TSC time.
const TICK_MS: u64 = 100;
/// How long the final report waits for the writes still in flight.
const DRAIN_SECS: u64 = 10;
/// GED event register bit: the power button was pressed.
const GED_POWER_BUTTON: u32 = 1;
/// GED event bit: PCI slots were added or are to be ejected (the VMM's hotplug registers).
const GED_PCI_HOTPLUG: u32 = 2;
/// GED event bit: vCPUs were added or are to be ejected (the VMM's CPU hotplug registers).
const GED_CPU_HOTPLUG: u32 = 4;
/// GED event bit: RAM was hot-added (the VMM's memory hotplug registers).
const GED_MEMORY_HOTPLUG: u32 = 8;
/// PM1 status/enable bit of the fixed-hardware power button.
const PM1_PWRBTN: u16 = 1 << 8;

/// The counter the main loop increments, in RAM (`TICK n=`).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The command-line keys of the mode.
struct Config {
    /// `lifecycle.ticks`: the final report after this many ticks (`None`: only on the power
    /// button).
    ticks: Option<u64>,
    /// `lifecycle.blk.depth`: writes kept in flight.
    depth: u64,
    /// `lifecycle.blk.mib`: the region the stream writes, `[0, mib MiB)`.
    mib: u64,
    /// `lifecycle.blk.count`: writes in all (`None`: no limit).
    count: Option<u64>,
    /// `lifecycle.blk.iops`: most writes per second, by the TSC (0: no limit).
    iops: u64,
    /// `lifecycle.hold=1`: after the final report, stay up (see [`hold`]) instead of
    /// powering off.
    hold: bool,
}

impl Config {
    fn parse(cmdline: &str) -> Result<Config, Why> {
        let optional = |key: &str, range: (u64, u64)| -> Result<Option<u64>, Why> {
            match expect::value(cmdline, key) {
                None => Ok(None),
                Some(_) => expect::number(cmdline, key, 0, range).map(Some),
            }
        };
        Ok(Config {
            ticks: optional("lifecycle.ticks", (1, u64::MAX))?,
            depth: expect::number(cmdline, "lifecycle.blk.depth", 8, (1, 32))?,
            mib: expect::number(cmdline, "lifecycle.blk.mib", 4, (1, 1 << 20))?,
            count: optional("lifecycle.blk.count", (0, u64::from(u32::MAX)))?,
            iops: expect::number(cmdline, "lifecycle.blk.iops", 0, (0, 10_000_000))?,
            hold: expect::number(cmdline, "lifecycle.hold", 0, (0, 1))? == 1,
        })
    }
}

/// The `lifecycle=1` mode, instead of the memory, SMP, RTC and virtio checks: counts its boots
/// in CMOS, arms the NMI counter (boot.s) and the ACPI GED's interrupt, keeps a stream of
/// block writes going on the first virtio-blk device and runs a counting loop that prints a
/// `TICK` line every 100 ms of TSC time, until `lifecycle.ticks` ticks or a power-button
/// press; then drains the writes, FLUSHes and reports (`lifecycle.blk`, `lifecycle.counter`).
/// The loop also reads kvmclock when the VMM offers it. The caller prints `TESTS DONE`, then
/// powers off, or calls [`hold`] when this returns true (`lifecycle.hold=1`).
pub fn run(si: &StartInfo, acpi: &Acpi, avoid: &Regions, cmdline: &str) -> bool {
    let boot = cmos(CMOS_LIFECYCLE_BOOTS);
    cmos_write(CMOS_LIFECYCLE_BOOTS, boot.wrapping_add(1));
    println!("LIFECYCLE boot={boot}");
    let cfg = match Config::parse(cmdline) {
        Ok(c) => c,
        Err(w) => {
            check("lifecycle.config", false, format_args!("{w}"));
            return false;
        }
    };
    // Local APIC on (MSI-X and IOAPIC delivery), PCI checks.
    let (bus, apic_id) = stage2::setup(acpi, "");
    let mut ged = arm_ged(acpi, apic_id);
    if let Some(g) = ged.as_mut() {
        g.cpus = crate::cpuhp::Cpus::prepare(si, avoid, acpi.madt.as_ref());
    }
    let pm1 = if ged.is_none() { arm_pm1(acpi) } else { None };
    let mut stream = match cfg.count {
        Some(0) => {
            println!("INFO lifecycle.blk off (lifecycle.blk.count=0)");
            None
        }
        _ => Some(Stream::open(&bus, apic_id, si, avoid, &cfg, boot)),
    };
    let khz = match time::calibrate_rtc() {
        Some(khz) => khz,
        None => {
            println!("INFO lifecycle the CMOS clock does not tick: TSC rate not measured");
            time::tsc_khz()
        }
    };
    let mut start: StrBuf<300> = StrBuf::new();
    // The end of the highest RAM range of the memory map: RAM hot-added before a reboot is
    // boot RAM after it.
    let ram_top = si
        .memmap()
        .filter(|e| e.kind == 1)
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    let _ = write!(
        start,
        "boot={boot} tsc_khz={khz} tick_ms={TICK_MS} ram_top={ram_top:#x}"
    );
    match cfg.ticks {
        Some(t) => {
            let _ = write!(start, " ticks={t}");
        }
        None => {
            let _ = write!(start, " ticks=unlimited");
        }
    }
    match &stream {
        Some(Ok(s)) => {
            let _ = write!(
                start,
                " blk={} depth={} mib={} slots={} count=",
                s.b.t.func.bdf, cfg.depth, cfg.mib, s.slots
            );
            let _ = match cfg.count {
                Some(c) => write!(start, "{c}"),
                None => write!(start, "unlimited"),
            };
            let _ = match cfg.iops {
                0 => write!(start, " iops=unlimited"),
                n => write!(start, " iops={n}"),
            };
        }
        Some(Err(_)) => {
            let _ = write!(start, " blk=failed");
        }
        None => {
            let _ = write!(start, " blk=off");
        }
    }
    match &ged {
        Some(g) => {
            let _ = write!(start, " ged_vector={:#x}", g.vector);
        }
        None => {
            let _ = write!(start, " ged=absent");
        }
    }
    if pm1.is_some() {
        let _ = write!(start, " pm1_button=polled");
    }
    let _ = write!(start, " nmi={}", arch::nmis());
    let clock = match KvmClock::register() {
        Ok(c) => {
            println!(
                "INFO lifecycle.kvmclock msr={:#x} addr={:#x} flags={:#x}",
                kvmclock::MSR_KVM_SYSTEM_TIME_NEW,
                c.addr(),
                c.flags()
            );
            Some(c)
        }
        Err(why) => {
            match why {
                Absent::NoKvm => println!("INFO lifecycle.kvmclock absent"),
                Absent::NoClocksource2(f) => println!(
                    "INFO lifecycle.kvmclock absent: KVM without CLOCKSOURCE2 (cpuid 0x40000001 eax={f:#x})"
                ),
                Absent::NotUpdated(a) => println!(
                    "INFO lifecycle.kvmclock absent: area {a:#x} not written within 100 ms of registering it"
                ),
            }
            None
        }
    };
    let period = khz.saturating_mul(TICK_MS).max(1);
    let ms = |ticks: u64| ticks as f64 / khz.max(1) as f64;
    let mut kc = clock.as_ref().map(KcTrack::new);
    let t0 = arch::rdtsc();
    println!("INFO lifecycle start {start} tsc={t0}");

    // Gaps count from here: printing the start line is not one.
    let mut prev = arch::rdtsc();
    if let Some(k) = kc.as_mut() {
        k.restart_gap();
    }
    let mut next_tick = t0.saturating_add(period);
    let mut ticks = 0u64;
    let mut gap = 0u64; // largest since the previous TICK
    let mut max_gap = 0u64; // largest over the run
    let mut backwards = 0u64;
    let mut pressed = ged.as_ref().is_some_and(|g| g.pressed_early);
    loop {
        let n = COUNTER.load(Ordering::Relaxed) + 1;
        COUNTER.store(n, Ordering::Relaxed);
        let now = arch::rdtsc();
        match now.checked_sub(prev) {
            Some(d) => {
                gap = gap.max(d);
                max_gap = max_gap.max(d);
            }
            None => backwards += 1,
        }
        prev = now;
        if let Some(k) = kc.as_mut() {
            k.step();
        }
        if let Some(g) = ged.as_mut() {
            pressed |= g.poll();
        }
        if let Some(Ok(s)) = stream.as_mut() {
            s.step(false);
        }
        if now >= next_tick {
            ticks += 1;
            let (done, inflight) = match &stream {
                Some(Ok(s)) => (s.completed, s.engine.in_flight()),
                _ => (0, 0),
            };
            println!(
                "TICK n={n} t_ms={} gap_ms={:.3} nmi={} ged={} blk_done={done} blk_inflight={inflight} {}",
                (now - t0) / khz.max(1),
                ms(gap),
                arch::nmis(),
                ged.as_ref().map_or(0, Ged::count),
                KcTick(kc.as_ref())
            );
            gap = 0;
            if let Some(k) = kc.as_mut() {
                k.gap = 0;
            }
            next_tick = now.saturating_add(period);
            if let Some(p) = &pm1 {
                pressed |= p.poll();
            }
            if cfg.ticks.is_some_and(|t| ticks >= t) && !pressed {
                break;
            }
        }
        if pressed {
            println!("LIFECYCLE power-button");
            break;
        }
    }

    // Final report.
    match stream.as_mut() {
        Some(Ok(s)) => s.finish(),
        Some(Err(w)) => check("lifecycle.blk", false, format_args!("{w}")),
        None => {}
    }
    let n = COUNTER.load(Ordering::Relaxed);
    let mut detail: StrBuf<300> = StrBuf::new();
    let _ = write!(
        detail,
        "n={n} ticks={ticks} max_gap_ms={:.3} max_kc_gap_ms={}",
        ms(max_gap),
        KcMs(kc.as_ref().map(|k| k.max_gap))
    );
    if backwards != 0 {
        let _ = write!(detail, "; the TSC went backwards {backwards} time(s)");
    }
    let mut kc_ok = true;
    if let Some(k) = kc.as_ref().filter(|k| k.back_stable + k.back_other != 0) {
        // Backward steps count as a failure only while the area promised a stable clock.
        kc_ok = k.back_stable == 0;
        let _ = write!(
            detail,
            "; kvmclock went backwards {} time(s) while flagged stable, {} time(s) while not, by at most {} ns",
            k.back_stable, k.back_other, k.max_back
        );
    }
    check(
        "lifecycle.counter",
        n > 0 && backwards == 0 && kc_ok,
        format_args!("{detail}"),
    );
    println!("INFO lifecycle.nmi count={}", arch::nmis());
    println!(
        "INFO lifecycle.ged count={}",
        ged.as_ref().map_or(0, Ged::count)
    );
    cfg.hold
}

/// `lifecycle.hold=1`, after `TESTS DONE`: prints `LIFECYCLE held` and parks the CPU (halted
/// at CPL0 with interrupts off: no serial output, no exits, no host CPU time) until the VMM
/// stops the machine. The host can still pause, resume and read the VMM's counters; NMIs are
/// still counted.
pub fn hold() -> ! {
    println!("LIFECYCLE held");
    arch::park()
}

/// kvmclock as the loop sees it, in ns: like the TSC, read once per iteration.
struct KcTrack<'a> {
    clock: &'a KvmClock,
    /// At the loop's start.
    start: u64,
    /// The previous iteration's reading.
    prev: u64,
    /// Largest step between two consecutive readings since the previous `TICK`, and over the
    /// run.
    gap: u64,
    max_gap: u64,
    /// Steps backwards while the area's flags had PVCLOCK_TSC_STABLE, and without it; the
    /// largest one.
    back_stable: u64,
    back_other: u64,
    max_back: u64,
}

impl<'a> KcTrack<'a> {
    fn new(clock: &'a KvmClock) -> Self {
        let (start, _) = clock.now_ns();
        KcTrack {
            clock,
            start,
            prev: start,
            gap: 0,
            max_gap: 0,
            back_stable: 0,
            back_other: 0,
            max_back: 0,
        }
    }

    /// Gaps count from now (the previous reading is taken again).
    fn restart_gap(&mut self) {
        self.prev = self.clock.now_ns().0;
    }

    /// One iteration's reading.
    fn step(&mut self) {
        let (now, flags) = self.clock.now_ns();
        match now.checked_sub(self.prev) {
            Some(d) => {
                self.gap = self.gap.max(d);
                self.max_gap = self.max_gap.max(d);
            }
            None => {
                if flags & kvmclock::PVCLOCK_TSC_STABLE != 0 {
                    self.back_stable += 1;
                } else {
                    self.back_other += 1;
                }
                self.max_back = self.max_back.max(self.prev - now);
            }
        }
        self.prev = now;
    }
}

/// The `TICK` line's kvmclock fields: `kc_ms=<ms since the loop started> kc_gap_ms=<largest
/// gap since the previous TICK, ms with three decimals>`, or `kc_ms=na kc_gap_ms=na` without
/// kvmclock.
struct KcTick<'a, 'b>(Option<&'a KcTrack<'b>>);

impl core::fmt::Display for KcTick<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(k) => write!(
                f,
                "kc_ms={} kc_gap_ms={}",
                k.prev.saturating_sub(k.start) / 1_000_000,
                KcMs(Some(k.gap))
            ),
            None => write!(f, "kc_ms=na kc_gap_ms=na"),
        }
    }
}

/// Nanoseconds as milliseconds with three decimals (exact, µs resolution), or `na`.
struct KcMs(Option<u64>);

impl core::fmt::Display for KcMs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(ns) => {
                let us = ns / 1000;
                write!(f, "{}.{:03}", us / 1000, us % 1000)
            }
            None => write!(f, "na"),
        }
    }
}

/// The ACPI Generic Event Device, armed: its IOAPIC pin raises a counted vector.
struct Ged {
    vector: u8,
    /// I/O port (else memory address) of the event register.
    io: bool,
    addr: u64,
    /// Interrupts handled so far.
    seen: u64,
    /// The register already had the power button's bit when the pin was programmed (a press
    /// during boot, whose interrupt could not be delivered).
    pressed_early: bool,
    /// What CPU hotplug events need (`None`: they are not handled).
    cpus: Option<crate::cpuhp::Cpus>,
}

impl Ged {
    /// GED interrupts counted so far.
    fn count(&self) -> u64 {
        arch::irq_count(self.vector)
    }

    /// Reads (and so clears) the event register.
    fn read(&self) -> u32 {
        if self.io {
            inl(self.addr as u16)
        } else {
            phys::mmio_read32(self.addr)
        }
    }

    /// On a new interrupt, reads the event register; whether it reports the power button.
    fn poll(&mut self) -> bool {
        let c = self.count();
        if c == self.seen {
            return false;
        }
        self.seen = c;
        let events = self.read();
        if events & GED_PCI_HOTPLUG != 0 {
            crate::hotplug::scan();
        }
        if events & GED_CPU_HOTPLUG != 0 {
            match &self.cpus {
                Some(cpus) => cpus.scan(),
                None => println!("INFO cpuhp event ignored: CPU hotplug could not be prepared"),
            }
        }
        if events & GED_MEMORY_HOTPLUG != 0 {
            crate::memhp::scan();
        }
        if events & GED_POWER_BUTTON != 0 {
            return true;
        }
        println!("INFO lifecycle.ged interrupt events={events:#x}");
        false
    }
}

/// Finds the GED in the AML and programs its IOAPIC redirection entry: edge, fixed, physical
/// destination `apic_id`, polarity from its `_CRS`, a vector of the counted range, unmasked.
/// `None` (with an `INFO lifecycle.ged absent` line) if the tables have no GED; a GED that
/// cannot be armed is a failed `lifecycle.ged` check.
fn arm_ged(acpi: &Acpi, apic_id: u32) -> Option<Ged> {
    let g = match acpi::find_ged(acpi) {
        None => {
            println!("INFO lifecycle.ged absent");
            return None;
        }
        Some(Err(why)) => {
            check("lifecycle.ged", false, format_args!("GED found: {why}"));
            return None;
        }
        Some(Ok(g)) => g,
    };
    let mut found: StrBuf<200> = StrBuf::new();
    let _ = write!(
        found,
        "table={} gsi={} crs={},{} register={}:{:#x}/{}",
        crate::report::Ascii(&g.table),
        g.gsi,
        if g.edge { "edge" } else { "level" },
        if g.active_low {
            "active-low"
        } else {
            "active-high"
        },
        if g.is_io() { "io" } else { "mem" },
        g.addr,
        g.len
    );
    let armed = (|| -> Result<Ged, Why> {
        if g.is_io() && g.addr > 0xfffc {
            return Err(why!("event register port {:#x} out of range", g.addr));
        }
        if !g.is_io() && !phys::readable(g.addr, 4) {
            return Err(why!("event register {:#x} not mapped", g.addr));
        }
        let madt = acpi.madt.as_ref().ok_or_else(|| why!("no MADT"))?;
        let (io, pin) = madt.ioapics[..madt.nioapics]
            .iter()
            .find_map(|io| {
                let pin = g.gsi.checked_sub(io.gsi_base)?;
                (pin < ioapic_pins(io.addr)).then_some((io.addr, pin))
            })
            .ok_or_else(|| why!("no IOAPIC of the MADT has GSI {}", g.gsi))?;
        let vector = arch::alloc_vectors(1).ok_or_else(|| why!("out of interrupt vectors"))?;
        // Redirection entry: high dword = destination APIC ID (bits 56..63); low dword =
        // vector, fixed delivery (0), physical destination (bit 11 = 0), polarity (bit 13),
        // edge trigger (bit 15 = 0), unmasked (bit 16 = 0). Written high first, so the entry
        // is complete when the low half unmasks it.
        let low = u32::from(vector) | (u32::from(g.active_low) << 13);
        ioapic_write(io, 0x11 + 2 * pin, (apic_id & 0xff) << 24);
        ioapic_write(io, 0x10 + 2 * pin, low);
        let back = ioapic_read(io, 0x10 + 2 * pin);
        if back & 0x1_afff != low {
            return Err(why!(
                "IOAPIC {io:#x} pin {pin}: redirection entry reads {back:#x} after writing {low:#x}"
            ));
        }
        let _ = write!(
            found,
            " ioapic={io:#x} pin={pin} vector={vector:#x} trigger=edge dest_apic_id={apic_id}"
        );
        let mut armed = Ged {
            vector,
            io: g.is_io(),
            addr: g.addr,
            seen: 0,
            pressed_early: false,
            cpus: None,
        };
        // A press before the pin was programmed left its bit in the register: take it now.
        // Interrupts counted from here on are looked at by `poll`, so none is missed.
        armed.seen = armed.count();
        armed.pressed_early = armed.read() & GED_POWER_BUTTON != 0;
        Ok(armed)
    })();
    match armed {
        Ok(a) => {
            println!(
                "INFO lifecycle.ged {found}{}",
                if a.pressed_early {
                    " pressed-before-armed"
                } else {
                    ""
                }
            );
            Some(a)
        }
        Err(w) => {
            check("lifecycle.ged", false, format_args!("{found}: {w}"));
            None
        }
    }
}

/// Number of redirection entries of the IOAPIC at `base` (version register bits 16..23, + 1).
fn ioapic_pins(base: u64) -> u32 {
    if !phys::readable(base, 0x20) {
        return 0;
    }
    ((ioapic_read(base, 1) >> 16) & 0xff) + 1
}

fn ioapic_read(base: u64, reg: u32) -> u32 {
    phys::mmio_write32(base, reg);
    phys::mmio_read32(base + 0x10)
}

fn ioapic_write(base: u64, reg: u32, value: u32) {
    phys::mmio_write32(base, reg);
    phys::mmio_write32(base + 0x10, value);
}

/// The fixed-hardware power button of a FADT that has PM1 event registers (QEMU q35), polled:
/// PWRBTN_EN set so that a press sets PWRBTN_STS (its SCI stays masked at the IOAPIC).
struct Pm1 {
    sts: u16,
}

impl Pm1 {
    /// Whether the button was pressed (clears the status bit).
    fn poll(&self) -> bool {
        if inw(self.sts) & PM1_PWRBTN == 0 {
            return false;
        }
        outw(self.sts, PM1_PWRBTN);
        true
    }
}

fn arm_pm1(acpi: &Acpi) -> Option<Pm1> {
    let f = acpi.fadt?;
    let hw_reduced = f.flags & (1 << 20) != 0;
    if hw_reduced || f.pm1a_evt == 0 || f.pm1_evt_len < 4 || f.pm1a_evt > 0xfff0 {
        return None;
    }
    let sts = f.pm1a_evt as u16;
    let en = sts + u16::from(f.pm1_evt_len / 2);
    outw(sts, PM1_PWRBTN);
    outw(en, inw(en) | PM1_PWRBTN);
    println!("INFO lifecycle.pm1 power button polled: PM1a_STS={sts:#x} PM1a_EN={en:#x}");
    Some(Pm1 { sts })
}

/// The block-write stream: request `k` writes slot `k % slots` (sectors `8 * slot ..`), 4 KiB
/// whose 8-byte little-endian word `i` is `(k << 32) | ((boot & 0xffff) << 16) | i`. A request
/// is not submitted while the previous one of its slot is still in flight, so each slot ends up
/// holding its last request.
struct Stream {
    b: Blk,
    mem: Scratch,
    engine: Engine<'static>,
    /// Slots of 4 KiB in the region.
    slots: u64,
    /// `(boot & 0xffff) << 16`.
    boot_tag: u64,
    /// `lifecycle.blk.count`.
    limit: Option<u64>,
    /// `lifecycle.blk.iops` (0: no limit) and the TSC of the first step.
    iops: u64,
    t_start: Option<u64>,
    /// Next request number.
    next_k: u64,
    /// Request numbers in flight (the first `n_in_flight`).
    in_flight: [u64; 32],
    n_in_flight: usize,
    submitted: u64,
    completed: u64,
    bytes: u64,
    duplicates: u64,
    unknown: u64,
    errors: u64,
    /// The first problem, for the FAIL detail.
    first: Option<Why>,
    /// Set when the engine failed: the stream stops.
    dead: Option<Why>,
}

impl Stream {
    fn open(
        bus: &crate::pci::Bus,
        apic_id: u32,
        si: &StartInfo,
        avoid: &Regions,
        cfg: &Config,
        boot: u8,
    ) -> Result<Stream, Why> {
        let (mut b, _capacity, mem) = bench::open_blk_on(bus, apic_id, si, avoid, cfg.mib * MIB)?;
        bench::polled_queue(&mut b)?;
        let shape = Shape {
            kind: T_OUT,
            bs: BLOCK,
            depth: cfg.depth as usize,
            data: Data::Tagged,
        };
        let engine = Engine::new(&mem, &shape, "lifecycle.blk")?;
        Ok(Stream {
            b,
            mem,
            engine,
            slots: cfg.mib * MIB / BLOCK,
            boot_tag: u64::from(boot) << 16,
            limit: cfg.count,
            iops: cfg.iops,
            t_start: None,
            next_k: 0,
            in_flight: [0; 32],
            n_in_flight: 0,
            submitted: 0,
            completed: 0,
            bytes: 0,
            duplicates: 0,
            unknown: 0,
            errors: 0,
            first: None,
            dead: None,
        })
    }

    /// One step: refill the free slots (none if `stopping`) and take the completions.
    fn step(&mut self, stopping: bool) {
        if self.dead.is_some() {
            return;
        }
        let Stream {
            b,
            mem,
            engine,
            slots,
            boot_tag,
            limit,
            iops,
            t_start,
            next_k,
            in_flight,
            n_in_flight,
            submitted,
            completed,
            bytes,
            duplicates,
            unknown,
            errors,
            first,
            dead,
        } = self;
        let Some(q) = b.queues[0].as_mut() else {
            *dead = Some(why!("queue 0 not set up"));
            return;
        };
        let (slots, boot_tag, iops) = (*slots, *boot_tag, *iops);
        let t0 = *t_start.get_or_insert_with(arch::rdtsc);
        let hz = u128::from(time::tsc_khz()) * 1000;
        let r = engine.submit(q, mem, |now| {
            let k = *next_k;
            if stopping || limit.is_some_and(|l| k >= l) || k > u64::from(u32::MAX) {
                return Next::Done;
            }
            // Rate limit: write k not before k / iops seconds after the start.
            if iops != 0
                && u128::from(now.saturating_sub(t0)) * u128::from(iops) < u128::from(k) * hz
            {
                return Next::Wait;
            }
            // The slot's previous request must have completed (ordering on the disk).
            if k >= slots && in_flight[..*n_in_flight].contains(&(k - slots)) {
                return Next::Wait;
            }
            in_flight[*n_in_flight] = k;
            *n_in_flight += 1;
            *next_k += 1;
            *submitted += 1;
            Next::Tagged {
                sector: (k % slots) * (BLOCK / SECTOR),
                tag: (k << 32) | boot_tag,
            }
        });
        // The first bogus id, kept apart (both callbacks cannot hold `first`).
        let mut first_bogus: Option<Why> = None;
        let r = r.and_then(|_| {
            engine.reap(
                q,
                mem,
                |d| {
                    *completed += 1;
                    let k = d.tag >> 32;
                    if let Some(i) = in_flight[..*n_in_flight].iter().position(|&x| x == k) {
                        *n_in_flight -= 1;
                        in_flight[i] = in_flight[*n_in_flight];
                    }
                    if d.status == S_OK {
                        *bytes += BLOCK;
                    } else {
                        *errors += 1;
                        if first.is_none() {
                            *first = Some(why!(
                                "write {k} (sector {}) returned {}",
                                d.sector,
                                blk::status_name(d.status)
                            ));
                        }
                    }
                    Ok(())
                },
                |id, duplicate| {
                    if duplicate {
                        *duplicates += 1;
                    } else {
                        *unknown += 1;
                    }
                    if first_bogus.is_none() {
                        first_bogus = Some(why!(
                            "used id {id} {}",
                            if duplicate {
                                "returned again (no request in flight)"
                            } else {
                                "never handed out"
                            }
                        ));
                    }
                    Ok(())
                },
            )
        });
        if first.is_none() {
            *first = first_bogus;
        }
        if let Err(w) = r {
            *dead = Some(w);
        }
    }

    /// Stops submitting, waits for the writes in flight, FLUSHes, reports `lifecycle.blk`.
    fn finish(&mut self) {
        let d = time::Deadline::after_us(DRAIN_SECS * 1_000_000);
        while self.engine.in_flight() > 0 && self.dead.is_none() && !d.passed() {
            self.step(true);
            arch::pause();
        }
        let left = self.engine.in_flight();
        let mut problems: StrBuf<400> = StrBuf::new();
        if let Some(w) = &self.dead {
            let _ = write!(problems, "; stream stopped: {w}");
        }
        if let Some(w) = &self.first {
            let _ = write!(problems, "; first problem: {w}");
        }
        if left > 0 {
            let _ = write!(
                problems,
                "; {left} write(s) still in flight after {DRAIN_SECS} s"
            );
        }
        if self.submitted == 0 {
            let _ = write!(problems, "; nothing was submitted");
        }
        if self.completed != self.submitted {
            let _ = write!(
                problems,
                "; {} submitted but {} completed",
                self.submitted, self.completed
            );
        }
        if problems.is_empty() && self.b.t.features & blk::F_FLUSH != 0 {
            if let Err(w) = self.flush() {
                let _ = write!(problems, "; {w}");
            } else {
                println!("INFO lifecycle.blk flushed");
            }
        }
        let ok =
            problems.is_empty() && self.duplicates == 0 && self.unknown == 0 && self.errors == 0;
        check(
            "lifecycle.blk",
            ok,
            format_args!(
                "submitted={} completed={} bytes={} duplicates={} unknown={} errors={}{problems}",
                self.submitted,
                self.completed,
                self.bytes,
                self.duplicates,
                self.unknown,
                self.errors
            ),
        );
    }

    /// One FLUSH through the same queue (nothing else in flight).
    fn flush(&mut self) -> Result<(), Why> {
        let q = bench::polled_queue(&mut self.b)?;
        let shape = Shape {
            kind: T_FLUSH,
            bs: 0,
            depth: 1,
            data: Data::Any,
        };
        let mut sent = false;
        bench::drive(
            q,
            &self.mem,
            &shape,
            "flush",
            DRAIN_SECS,
            |_| {
                if sent {
                    return Next::Done;
                }
                sent = true;
                Next::Submit(0)
            },
            |d| match d.status {
                S_OK => Ok(()),
                s => Err(why!("FLUSH returned {}", blk::status_name(s))),
            },
        )
    }
}
