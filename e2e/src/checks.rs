//! What the test guest is asked to check and what it reports: the check names of each stage
//! and device, and the guest command-line keys that ask for them (docs/test-guest.md).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::format_mac;

/// The checks every stage-1 guest run must report as passed, whatever the VMM.
pub const STAGE1_CHECKS: &[&str] = &[
    "pvh.magic",
    "cmdline",
    "memmap",
    "memtouch",
    "acpi.rsdp",
    "acpi.FACP",
    "acpi.APIC",
    "acpi.MCFG",
    "acpi.DSDT",
    "acpi.required",
    "acpi.madt",
    "acpi.mcfg",
    "acpi.s5",
    "smp",
    "rtc",
];

/// The stage-2 PCI checks every guest run reports (with or without virtio
/// devices). Without `expect.virtio`, `virtio.count` only reports what it found.
pub const STAGE2_PCI_CHECKS: &[&str] = &[
    "pci.enum",
    "pci.hostbridge",
    "pci.bars",
    "pci.caps",
    "pci.segments",
    "virtio.count",
    "virtio.modern",
];

/// Checks every modern virtio-blk device reports when the command line has
/// `blk.pattern.sector` (without `blk.readonly=1`). `mq` is reported only if
/// the device offers a second queue, `readonly` only with `blk.readonly=1`
/// (which replaces `write`).
pub const VIRTIO_BLK_CHECKS: &[&str] = &[
    "init",
    "pcicfg",
    "capacity",
    "read",
    "get_id",
    "flush",
    "write",
    "oob",
    "msix_mask",
    "msix",
];

/// Checks every modern virtio-rng device reports.
pub const VIRTIO_RNG_CHECKS: &[&str] = &["init", "pcicfg", "read", "msix"];

/// Checks every modern virtio-console device reports.
pub const VIRTIO_CONSOLE_CHECKS: &[&str] = &["init", "pcicfg", "write", "msix"];

/// Checks every modern virtio-net device reports when the host exchanges
/// the test frames ([`exchange_test_frames`](crate::exchange_test_frames)). With `net.rx.count=0` there
/// is no `rx`, with `net.tx.count=0` no `tx`, with both no `msix`.
pub const VIRTIO_NET_CHECKS: &[&str] = &["init", "pcicfg", "mac", "rx", "tx", "msix"];

/// Checks a virtio-net device driven with several queue pairs (`net<n>.pairs`, see
/// [`boot_net_mq`](crate::boot_net_mq)) reports when the host exchanges the test frames.
pub const VIRTIO_NET_MQ_CHECKS: &[&str] =
    &["init", "pcicfg", "mac", "ctrl", "rx", "tx", "mq", "msix"];

/// The hostile mode's attacks (`hostile=1`, see docs/test-guest.md), in the order the guest
/// runs them; each is reported as `hostile.<attack>`. `survivors` (rng and blk still work)
/// comes last.
pub const HOSTILE_ATTACKS: &[&str] = &[
    "desc_oob",
    "desc_loop",
    "desc_zero_len",
    "desc_huge",
    "status_readonly",
    "bad_queue_size",
    "ring_oob",
    "avail_idx_jump",
    "config_oob",
    "pci_cfg_junk",
    "bar_move",
    "survivors",
];

/// Full check names of the hostile mode: `hostile.<attack>` for each of [`HOSTILE_ATTACKS`].
pub fn hostile_checks() -> Vec<String> {
    HOSTILE_ATTACKS
        .iter()
        .map(|a| format!("hostile.{a}"))
        .collect()
}

/// Full check names for device `n` of `kind` (`blk`, `rng`, `console`,
/// `net`): `virtio.<kind><n>.<check>` for each of `checks`.
pub fn virtio_checks(kind: &str, n: usize, checks: &[&str]) -> Vec<String> {
    checks
        .iter()
        .map(|c| format!("virtio.{kind}{n}.{c}"))
        .collect()
}

/// The stage-2 command-line keys (see docs/test-guest.md); all optional.
#[derive(Debug, Clone, Default)]
pub struct Stage2Keys {
    /// `expect.virtio=kind:count,...` (kinds `blk`, `net`, `rng`, `console`);
    /// `None` leaves the key out.
    pub virtio: Option<Vec<(&'static str, u32)>>,
    /// `blk.pattern.sector=S`: the disk holds the host pattern; the guest
    /// writes its own to sectors `S..S + 8`.
    pub blk_pattern_sector: Option<u64>,
    /// `blk.serial=...`: expected GET_ID string (no spaces).
    pub blk_serial: Option<String>,
    /// `blk.readonly=1`.
    pub blk_readonly: bool,
    /// `console.message=...`: what the guest writes on the virtio console
    /// (no spaces), followed by a newline.
    pub console_message: Option<String>,
    /// `net.mac=xx:xx:xx:xx:xx:xx`: the MAC address the virtio-net device
    /// must report.
    pub net_mac: Option<[u8; 6]>,
    /// `net.tx.count=N`: test frames the guest transmits (guest default 8).
    pub net_tx_count: Option<u32>,
    /// `net.rx.count=N`: test frames the guest waits for after printing
    /// `INFO virtio.net<n>.rx.ready` (guest default 4; 0: no rx check).
    pub net_rx_count: Option<u32>,
    /// `hostile=1`: after the stage-2 checks the guest attacks the VMM through the first
    /// virtio-blk device and reports `hostile.*` checks ([`hostile_checks`]).
    pub hostile: bool,
    /// `expect.segments=S:N,...`: the PCI segments with an ECAM area and the functions on
    /// each one's bus 0 (host bridge included); `None` leaves the key out.
    pub segments: Option<Vec<(u16, u32)>>,
}

impl Stage2Keys {
    /// The keys as space-separated words (empty if none is set), to append
    /// to a stage-1 command line.
    pub fn to_cmdline(&self) -> String {
        let mut words = Vec::new();
        if let Some(v) = &self.virtio {
            let list: Vec<String> = v.iter().map(|(k, n)| format!("{k}:{n}")).collect();
            words.push(format!("expect.virtio={}", list.join(",")));
        }
        if let Some(s) = self.blk_pattern_sector {
            words.push(format!("blk.pattern.sector={s}"));
        }
        if let Some(s) = &self.blk_serial {
            words.push(format!("blk.serial={s}"));
        }
        if self.blk_readonly {
            words.push("blk.readonly=1".to_string());
        }
        if let Some(m) = &self.console_message {
            words.push(format!("console.message={m}"));
        }
        if let Some(m) = self.net_mac {
            words.push(format!("net.mac={}", format_mac(m)));
        }
        if let Some(n) = self.net_tx_count {
            words.push(format!("net.tx.count={n}"));
        }
        if let Some(n) = self.net_rx_count {
            words.push(format!("net.rx.count={n}"));
        }
        if self.hostile {
            words.push("hostile=1".to_string());
        }
        if let Some(v) = &self.segments {
            let list: Vec<String> = v.iter().map(|(s, n)| format!("{s}:{n}")).collect();
            words.push(format!("expect.segments={}", list.join(",")));
        }
        words.join(" ")
    }
}

/// Current host time in Unix seconds (for `expect.now`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The standard stage-1 guest command line: `expect.cpus=N expect.mem=BYTES
/// expect.now=UNIX_SECONDS` (time taken now).
pub fn stage1_cmdline(cpus: u32, mem_bytes: u64) -> String {
    format!(
        "expect.cpus={cpus} expect.mem={mem_bytes} expect.now={}",
        unix_now()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage2_keys_cmdline() {
        assert_eq!(Stage2Keys::default().to_cmdline(), "");
        let k = Stage2Keys {
            virtio: Some(vec![("blk", 1), ("rng", 1)]),
            blk_pattern_sector: Some(2048),
            blk_serial: Some("abc".into()),
            blk_readonly: true,
            console_message: Some("hi".into()),
            net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            net_tx_count: Some(3),
            net_rx_count: Some(0),
            hostile: true,
            segments: Some(vec![(0, 3), (1, 2)]),
        };
        assert_eq!(
            k.to_cmdline(),
            "expect.virtio=blk:1,rng:1 blk.pattern.sector=2048 blk.serial=abc blk.readonly=1 console.message=hi net.mac=52:54:00:12:34:ab net.tx.count=3 net.rx.count=0 hostile=1 expect.segments=0:3,1:2"
        );
        assert_eq!(hostile_checks()[0], "hostile.desc_oob");
        assert_eq!(hostile_checks().len(), HOSTILE_ATTACKS.len());
        assert_eq!(
            virtio_checks("rng", 0, VIRTIO_RNG_CHECKS)[0],
            "virtio.rng0.init"
        );
    }

    #[test]
    fn stage1_cmdline_has_all_keys() {
        let c = stage1_cmdline(2, 3584 << 20);
        assert!(
            c.starts_with("expect.cpus=2 expect.mem=3758096384 expect.now="),
            "{c}"
        );
    }
}
