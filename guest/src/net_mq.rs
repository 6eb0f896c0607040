//! virtio-net with several queue pairs (`net<n>.pairs=N`): VIRTIO_NET_F_CTRL_VQ
//! and VIRTIO_NET_F_MQ negotiated, receiveq/transmitq of pairs `0..N` and the
//! control queue at index `2 * max_virtqueue_pairs` (virtio 1.2, 5.1.2), the
//! control queue's VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET answered `ERR` for 0 and
//! `max + 1` and `OK` for `N` (`ctrl`), then the traffic checks of
//! [`net::traffic`] over all `N` pairs and a summary (`mq`).
//!
//! Nothing here depends on the device's implementation: an in-process device
//! and a vhost-user backend look the same to the guest.

use core::fmt::Write;

use crate::net::{self, Mac, MAX_PAIRS};
use crate::report::StrBuf;
use crate::stage2;
use crate::virtio::{Buf, DmaPage, IrqTally, Queue, Transport, Why};
use crate::{expect, println, why};

const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;

/// Offset of le16 max_virtqueue_pairs in the device configuration.
const CFG_MAX_PAIRS: u64 = 8;
/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX: the most pairs a device may announce.
const VQ_PAIRS_MAX: u16 = 0x8000;

/// VIRTIO_NET_CTRL_MQ and its VQ_PAIRS_SET command (le16 virtqueue_pairs).
const CTRL_CLASS_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Acknowledgements.
const ACK_OK: u8 = 0;
const ACK_ERR: u8 = 1;
/// What the guest leaves in the ack byte: a device that writes nothing shows.
const ACK_UNWRITTEN: u8 = 0xff;

/// Unused pairs whose queues the `mq` check looks at (the first ones).
const UNUSED_PAIRS_CHECKED: u16 = 8;

/// Every queue the guest may set up: `2 * MAX_PAIRS` plus the control queue.
const MAX_QUEUES: usize = 2 * MAX_PAIRS + 1;

/// Brings the device up with `pairs_text` (`net.pairs`) queue pairs and runs
/// the `virtio.net<n>.*` checks: `init`, `pcicfg`, `mac`, `ctrl`, `rx`, `tx`,
/// `mq`, `msix`.
pub fn run<'a>(
    mut t: Transport,
    name: &str,
    key: &impl Fn(&str) -> Option<&'a str>,
    apic_id: u32,
    pairs_text: &str,
) {
    let pairs = match expect::parse_u64(pairs_text) {
        Some(p) if (1..=MAX_PAIRS as u64).contains(&p) => p as u16,
        _ => {
            stage2::check_named(
                name,
                "init",
                false,
                format_args!("bad net.pairs value (1..={MAX_PAIRS}): device left alone"),
            );
            return;
        }
    };
    let setup = match bring_up(&mut t, key, pairs, apic_id) {
        Ok(s) => s,
        Err(w) => {
            t.fail();
            stage2::check_named(
                name,
                "init",
                false,
                format_args!("{} net.pairs={pairs}: {w}", t.func.bdf),
            );
            return;
        }
    };
    let Setup {
        mut queues,
        max_pairs,
        msix_err,
    } = setup;
    let used = 2 * usize::from(pairs) + 1;
    stage2::report_init(name, &t, &queues[..used]);
    println!(
        "INFO {name}.mq max_virtqueue_pairs={max_pairs} pairs={pairs} num_queues={} controlq={}",
        t.num_queues(),
        2 * u32::from(max_pairs)
    );
    stage2::check_pcicfg(&t, name, 1);
    let mac: Mac = net::check_mac(&t, name, key("mac"));
    let mut tally = IrqTally::default();

    let ctrl_ok = check_ctrl(
        queues[used - 1].as_mut(),
        name,
        pairs,
        max_pairs,
        &mut tally,
    );
    let tx = net::traffic(
        &t,
        &mut queues[..used - 1],
        usize::from(pairs),
        name,
        mac,
        key,
        &mut tally,
    );
    check_mq(&t, name, pairs, max_pairs, ctrl_ok, tx.as_ref());
    match msix_err {
        Some(w) => stage2::check_named(name, "msix", false, format_args!("{w}")),
        None => stage2::check_msix(&t, name, &tally, &queues[..used]),
    }
}

/// The device after initialisation.
struct Setup {
    /// receiveq `k` at `2k`, transmitq `k` at `2k + 1` for `k < pairs`, the
    /// control queue at `2 * pairs` (its device index is `2 * max_pairs`).
    queues: [Option<Queue>; MAX_QUEUES],
    max_pairs: u16,
    /// Why MSI-X could not be set up, if it could not.
    msix_err: Option<Why>,
}

/// Negotiation (CTRL_VQ and MQ required), max_virtqueue_pairs, MSI-X (entry 0
/// configuration, `1 + i` queue `i < 2 * pairs`, the next one the control
/// queue), the queues, DRIVER_OK.
fn bring_up<'a>(
    t: &mut Transport,
    key: &impl Fn(&str) -> Option<&'a str>,
    pairs: u16,
    apic_id: u32,
) -> Result<Setup, Why> {
    t.negotiate(net::wanted_features(key) | F_CTRL_VQ | F_MQ)?;
    let missing = (F_CTRL_VQ | F_MQ) & !t.features;
    if missing != 0 {
        return Err(why!(
            "needs VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ;{}{} not offered (offered={:#x})",
            if missing & F_CTRL_VQ != 0 {
                " CTRL_VQ"
            } else {
                ""
            },
            if missing & F_MQ != 0 { " MQ" } else { "" },
            t.offered
        ));
    }
    let Some(max_pairs) = t.read_config(|r| r.r16(CFG_MAX_PAIRS)) else {
        return Err(why!("device configuration unreadable"));
    };
    if !(1..=VQ_PAIRS_MAX).contains(&max_pairs) {
        return Err(why!(
            "max_virtqueue_pairs={max_pairs} is outside 1..={VQ_PAIRS_MAX:#x}"
        ));
    }
    if max_pairs < pairs {
        return Err(why!(
            "max_virtqueue_pairs={max_pairs} is less than net.pairs={pairs}"
        ));
    }
    // Queue indices are 16 bits: controlq 2 * 0x8000 cannot be selected.
    let Some(ctrl_index) = max_pairs.checked_mul(2) else {
        return Err(why!(
            "max_virtqueue_pairs={max_pairs}: control queue {} has no 16-bit queue index",
            2 * u32::from(max_pairs)
        ));
    };
    let msix_err = t.setup_msix(2 * pairs + 2, apic_id).err();
    let mut queues: [Option<Queue>; MAX_QUEUES] = core::array::from_fn(|_| None);
    for i in 0..2 * pairs {
        queues[usize::from(i)] = Some(t.setup_queue(i)?);
    }
    queues[usize::from(2 * pairs)] = Some(t.setup_queue(ctrl_index)?);
    t.driver_ok()?;
    Ok(Setup {
        queues,
        max_pairs,
        msix_err,
    })
}

/// Names an ack byte.
fn ack_name(ack: u8) -> &'static str {
    match ack {
        ACK_OK => "OK",
        ACK_ERR => "ERR",
        ACK_UNWRITTEN => "unwritten",
        _ => "bogus",
    }
}

/// `ctrl`: VQ_PAIRS_SET with 0 and `max_pairs + 1` (both must be answered
/// VIRTIO_NET_ERR and change nothing), then with `pairs` (VIRTIO_NET_OK).
/// Each command is one chain as Linux builds it: class and command (2 bytes,
/// device-readable), le16 virtqueue_pairs (device-readable), ack (1 byte,
/// device-writable); it must come back with used length 1 and an interrupt
/// on the control queue's vector (counted in `tally` for `msix`). Returns
/// whether the valid command was acknowledged OK.
fn check_ctrl(
    q: Option<&mut Queue>,
    name: &str,
    pairs: u16,
    max_pairs: u16,
    tally: &mut IrqTally,
) -> bool {
    let Some(q) = q else {
        stage2::check_named(name, "ctrl", false, format_args!("no control queue"));
        return false;
    };
    let Some(page) = DmaPage::alloc() else {
        stage2::check_named(name, "ctrl", false, format_args!("out of DMA memory"));
        return false;
    };
    let index = q.index;
    // max_pairs <= 0x8000: max_pairs + 1 fits.
    let cases = [(0, ACK_ERR), (max_pairs + 1, ACK_ERR), (pairs, ACK_OK)];
    let mut detail: StrBuf<300> = StrBuf::new();
    let _ = write!(detail, "controlq {index}:");
    let mut ok = true;
    let mut valid_ok = false;
    for (value, want) in cases {
        page.write_bytes(0, &[CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET]);
        page.write_bytes(2, &value.to_le_bytes());
        page.write8(4, ACK_UNWRITTEN);
        let bufs = [
            Buf {
                addr: page.phys(0),
                len: 2,
                write: false,
            },
            Buf {
                addr: page.phys(2),
                len: 2,
                write: false,
            },
            Buf {
                addr: page.phys(4),
                len: 1,
                write: true,
            },
        ];
        let c = q.transact(&bufs, true);
        tally.add(&c);
        let Some((_, used_len)) = c.used else {
            ok = false;
            let _ = write!(
                detail,
                " VQ_PAIRS_SET({value}) not returned within 2 s (stopped)"
            );
            break;
        };
        let ack = page.read8(4);
        let _ = write!(detail, " VQ_PAIRS_SET({value})={}", ack_name(ack));
        if ack != want {
            ok = false;
            let _ = write!(detail, "[{ack:#04x}, expected {}]", ack_name(want));
        }
        if used_len != 1 {
            ok = false;
            let _ = write!(detail, "[used length {used_len}, expected 1]");
        }
        if c.irq_expected && !c.irq {
            let _ = write!(detail, "[no interrupt]");
        }
        valid_ok = want == ACK_OK && ack == ACK_OK;
    }
    stage2::check_named(name, "ctrl", ok, format_args!("{detail}"));
    valid_ok
}

/// `mq`: the multi-queue layout and its use. Passes when num_queues covers
/// every pair and the control queue (`2 * max_pairs + 1`), the queues of the
/// first unused pairs exist and are still disabled, VQ_PAIRS_SET(`pairs`)
/// was acknowledged OK, and (when `tx` ran) every pair returned every frame
/// put on its transmitq.
fn check_mq(
    t: &Transport,
    name: &str,
    pairs: u16,
    max_pairs: u16,
    ctrl_ok: bool,
    tx: Option<&net::TxPerPair>,
) {
    let mut detail: StrBuf<300> = StrBuf::new();
    let mut ok = true;
    let nq = t.num_queues();
    let want_nq = 2 * u32::from(max_pairs) + 1;
    let _ = write!(
        detail,
        "pairs={pairs} max_virtqueue_pairs={max_pairs} num_queues={nq}"
    );
    if u32::from(nq) < want_nq {
        ok = false;
        let _ = write!(detail, "[expected >= {want_nq}]");
    }
    let unused_end = max_pairs.min(pairs.saturating_add(UNUSED_PAIRS_CHECKED));
    if unused_end > pairs {
        let _ = write!(detail, "; queues {}..{} unused", 2 * pairs, 2 * unused_end);
        for i in 2 * pairs..2 * unused_end {
            let (max, enabled) = (t.queue_max(i), t.queue_enabled(i));
            if max == 0 || enabled {
                ok = false;
                let _ = write!(detail, "[queue {i}: size {max} enabled={enabled}]");
            }
        }
    }
    let _ = write!(
        detail,
        "; VQ_PAIRS_SET({pairs}) {}",
        if ctrl_ok {
            "acknowledged"
        } else {
            "NOT acknowledged"
        }
    );
    ok &= ctrl_ok;
    match tx {
        Some(per) => {
            let _ = write!(detail, "; tx returned/sent per pair:");
            for k in 0..usize::from(pairs) {
                let (r, s) = (per.returned[k], per.sent[k]);
                let _ = write!(detail, " p{k}={r}/{s}");
                ok &= r == s;
            }
        }
        None => {
            let _ = write!(detail, "; no tx");
        }
    }
    stage2::check_named(name, "mq", ok, format_args!("{detail}"));
}
