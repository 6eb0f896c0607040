//! Block soak (`soak=blk`): write a region of the first virtio-blk device sequentially with
//! the guest pattern, rate-limited, FLUSH, read it all back and compare; one `soak.blk`
//! check. Made for host tests that disturb the device's backend while the guest writes
//! (kill and restart a vhost-user daemon): progress lines to synchronise on, and a long,
//! configurable tolerance for a device that stops completing requests for a while.
//!
//! Keys: `soak.mib=N` (region `[0, N MiB)`, default 256), `soak.mibps=N` (write rate limit
//! by the TSC, default 64, 0 = none), `soak.stall=S` (seconds without any completion while
//! requests are in flight before giving up, default 30).
//!
//! Lines: `INFO soak blk start ...`, `INFO soak blk written=<M> MiB` every 8 MiB of
//! completed writes (and at the end of the region), `INFO soak blk flushed`,
//! `INFO soak blk read=<M> MiB` likewise while reading back, then `TEST soak.blk PASS|FAIL`.
//!
//! Setup and the request engine are bench.rs's (same device setup, same polled queue with
//! interrupts off, same descriptor layout); the stage-1 memory, SMP and RTC checks are
//! skipped as for the benchmarks.

use core::fmt::Write;

use crate::acpi::Acpi;
use crate::bench::{self, Data, Next, Shape};
use crate::blk::{self, SECTOR, S_OK, T_FLUSH, T_IN, T_OUT};
use crate::regions::Regions;
use crate::report::{check, StrBuf};
use crate::startinfo::StartInfo;
use crate::virtio::Why;
use crate::{arch, expect, println, why};

const MIB: u64 = 1024 * 1024;
/// Bytes per read or write request.
const BS: u64 = 64 * 1024;
/// Requests in flight.
const DEPTH: usize = 16;
/// A progress line every this many bytes.
const PROGRESS: u64 = 8 * MIB;

/// Runs the soak (`soak=<kind>`, only `blk`) and reports `soak.blk`.
pub fn run(kind: &str, si: &StartInfo, acpi: &Acpi, avoid: &Regions, cmdline: &str) {
    let result = match kind {
        "blk" => soak_blk(si, acpi, avoid, cmdline),
        _ => Err(why!("unknown soak mode soak={kind}")),
    };
    match result {
        Ok(d) => check("soak.blk", true, format_args!("{d}")),
        Err(w) => check("soak.blk", false, format_args!("{w}")),
    }
}

fn soak_blk(
    si: &StartInfo,
    acpi: &Acpi,
    avoid: &Regions,
    cmdline: &str,
) -> Result<StrBuf<300>, Why> {
    let mib = expect::number(cmdline, "soak.mib", 256, (1, 1 << 20))?;
    let mibps = expect::number(cmdline, "soak.mibps", 64, (0, 1 << 20))?;
    let stall = expect::number(cmdline, "soak.stall", 30, (1, 3600))?;
    let bytes = mib * MIB;
    let bench::Rig {
        mut b,
        capacity,
        mem,
        khz,
    } = bench::open_first_blk(si, acpi, avoid, bytes)?;
    if b.t.features & blk::F_FLUSH == 0 {
        return Err(why!("VIRTIO_BLK_F_FLUSH not offered"));
    }
    println!(
        "INFO soak blk start {} capacity={capacity} sectors mib={mib} mibps={mibps} stall={stall} s bs={} KiB depth={DEPTH} tsc_khz={khz} (CMOS clock)",
        b.t.func.bdf,
        BS / 1024
    );
    let q = bench::polled_queue(&mut b)?;
    let hz = khz * 1000;
    let requests = bytes / BS;
    let secs = |t0: u64, t1: u64| t1.saturating_sub(t0) as f64 / hz as f64;

    // Write: request i may go out once i * BS bytes are due at the rate limit.
    let mut shape = Shape {
        kind: T_OUT,
        bs: BS,
        depth: DEPTH,
        data: Data::Pattern(blk::guest_byte),
    };
    let t0 = arch::rdtsc();
    let mut submitted = 0u64;
    let next = |now: u64| {
        if submitted == requests {
            return Next::Done;
        }
        let due = u128::from(submitted * BS) * u128::from(hz) / u128::from(mibps * MIB).max(1);
        if mibps != 0 && u128::from(now - t0) < due {
            return Next::Wait;
        }
        submitted += 1;
        Next::Submit((submitted - 1) * BS / SECTOR)
    };
    let mut written = 0u64;
    let mut t_write = t0;
    bench::drive(q, &mem, &shape, "write", stall, next, |d| {
        if d.status != S_OK {
            return Err(why!(
                "write of sector {} returned {} after {} MiB",
                d.sector,
                blk::status_name(d.status),
                written / MIB
            ));
        }
        written += BS;
        t_write = d.tsc;
        if written.is_multiple_of(PROGRESS) || written == bytes {
            println!("INFO soak blk written={} MiB", written / MIB);
        }
        Ok(())
    })?;
    let write_secs = secs(t0, t_write);

    // FLUSH, through the same engine (same stall tolerance).
    shape.kind = T_FLUSH;
    shape.bs = 0;
    shape.data = Data::Any;
    let mut flushes = 0;
    bench::drive(
        q,
        &mem,
        &shape,
        "flush",
        stall,
        |_| match flushes {
            0 => {
                flushes += 1;
                Next::Submit(0)
            }
            _ => Next::Done,
        },
        |d| match d.status {
            S_OK => Ok(()),
            s => Err(why!("FLUSH returned {}", blk::status_name(s))),
        },
    )?;
    println!("INFO soak blk flushed");

    // Read back without a rate limit; `drive` compares every byte with the pattern.
    shape = Shape {
        kind: T_IN,
        bs: BS,
        depth: DEPTH,
        data: Data::Pattern(blk::guest_byte),
    };
    let t1 = arch::rdtsc();
    let mut sent = 0u64;
    let mut read = 0u64;
    let mut t_read = t1;
    let next = |_| {
        if sent == requests {
            return Next::Done;
        }
        sent += 1;
        Next::Submit((sent - 1) * BS / SECTOR)
    };
    bench::drive(q, &mem, &shape, "read back", stall, next, |d| {
        if d.status != S_OK {
            return Err(why!(
                "read back of sector {} returned {}",
                d.sector,
                blk::status_name(d.status)
            ));
        }
        read += BS;
        t_read = d.tsc;
        if read.is_multiple_of(PROGRESS) || read == bytes {
            println!("INFO soak blk read={} MiB", read / MIB);
        }
        Ok(())
    })?;
    let read_secs = secs(t1, t_read);

    let mut d = StrBuf::new();
    let _ = write!(
        d,
        "wrote {mib} MiB in {requests} requests in {write_secs:.1} s ({:.1} MiB/s), all OK; flush OK; read back identical in {read_secs:.1} s",
        mib as f64 / write_secs.max(1e-9)
    );
    Ok(d)
}
