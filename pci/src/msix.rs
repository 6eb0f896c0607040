//! MSI-X: the vector table and pending-bit array in a BAR, the capability's enable and function
//! mask bits, and the delivery rule: a vector fires only when MSI-X is enabled and neither the
//! function nor the entry is masked; otherwise its pending bit is set and it fires on unmask.

use std::sync::Arc;

/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASK: u32 = 1;

/// An MSI message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address (64-bit).
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// Delivers MSI-X vectors: the VMM routes each vector to the hypervisor (GSI + irqfd).
pub trait MsiVectors: Send + Sync + std::fmt::Debug {
    /// Vector `vector` now sends `msg` (`enabled` false: the route may be dropped).
    fn update(&self, vector: u16, msg: MsiMessage, enabled: bool) -> std::io::Result<()>;
    /// Sends vector `vector` to the guest.
    fn trigger(&self, vector: u16) -> std::io::Result<()>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_CONTROL_MASK != 0
    }
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

/// MSI-X state of one function.
#[derive(Debug)]
pub struct Msix {
    table: Vec<Entry>,
    pending: Vec<u64>,
    control: u16,
    vectors: Arc<dyn MsiVectors>,
}

impl Msix {
    /// `count` vectors (1..=2048), all masked, delivered through `vectors`.
    pub fn new(count: u16, vectors: Arc<dyn MsiVectors>) -> Self {
        let count = count.clamp(1, 2048);
        let table = vec![
            Entry {
                control: VECTOR_CONTROL_MASK,
                ..Default::default()
            };
            usize::from(count)
        ];
        Self {
            pending: vec![0; usize::from(count).div_ceil(64)],
            table,
            control: 0,
            vectors,
        }
    }

    /// Number of vectors.
    pub fn count(&self) -> u16 {
        self.table.len() as u16
    }

    /// The capability body (ID, next, control, table offset/BIR, PBA offset/BIR) for a table at
    /// `table_offset` and PBA at `pba_offset` in BAR `bar`; and the writable mask (control's
    /// enable and function-mask bits).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let mut body = [0u8; 12];
        body[0] = MSIX_CAP_ID;
        body[2..4].copy_from_slice(&(self.count() - 1).to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut mask = [0u8; 12];
        mask[3] = 0xc0;
        (body, mask)
    }

    /// True when MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    fn function_masked(&self) -> bool {
        self.control & CONTROL_FUNCTION_MASK != 0
    }

    /// The guest wrote the capability's message control word (from config space).
    pub fn set_control(&mut self, control: u16) {
        let was_enabled = self.enabled();
        self.control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        if self.enabled() != was_enabled {
            for v in 0..self.count() {
                self.push_route(v);
            }
        }
        self.deliver_pending();
    }

    fn push_route(&self, v: u16) {
        let e = self.table[usize::from(v)];
        let on = self.enabled() && !e.masked();
        if let Err(err) = self.vectors.update(v, e.message(), on) {
            log::warn!("MSI-X vector {v}: cannot update route: {err}");
        }
    }

    fn deliver_pending(&mut self) {
        if !self.enabled() || self.function_masked() {
            return;
        }
        for v in 0..self.count() {
            let (word, bit) = (usize::from(v) / 64, v % 64);
            if self.pending[word] & (1 << bit) != 0 && !self.table[usize::from(v)].masked() {
                self.pending[word] &= !(1 << bit);
                self.fire(v);
            }
        }
    }

    fn fire(&self, v: u16) {
        if let Err(err) = self.vectors.trigger(v) {
            log::warn!("MSI-X vector {v}: cannot signal: {err}");
        }
    }

    /// The device raises vector `v`: delivered now, or left pending while masked.
    /// Out-of-range vectors (including virtio's NO_VECTOR 0xffff) are ignored.
    pub fn signal(&mut self, v: u16) {
        let Some(entry) = self.table.get(usize::from(v)) else {
            return;
        };
        if self.enabled() && !self.function_masked() && !entry.masked() {
            self.fire(v);
        } else {
            self.pending[usize::from(v) / 64] |= 1 << (v % 64);
        }
    }

    /// Reads the table (offset relative to the table start).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((index, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = self.table[index];
        let words = [e.address_lo, e.address_hi, e.data, e.control];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        data.copy_from_slice(&bytes[field..field + data.len()]);
    }

    /// Writes the table; unmasking an entry with its pending bit set delivers it.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let mut bytes = [0u8; 16];
        let e = self.table[index];
        for (i, w) in [e.address_lo, e.address_hi, e.data, e.control]
            .iter()
            .enumerate()
        {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        bytes[field..field + data.len()].copy_from_slice(data);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let new = Entry {
            address_lo: word(0),
            address_hi: word(4),
            data: word(8),
            control: word(12) & VECTOR_CONTROL_MASK,
        };
        self.table[index] = new;
        if new != e {
            self.push_route(index as u16);
        }
        if e.masked() && !new.masked() {
            self.deliver_pending();
        }
    }

    /// Reads the pending-bit array (offset relative to the PBA start). Writes are ignored.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset as usize + i;
            *b = self
                .pending
                .get(byte / 8)
                .map_or(0, |w| (w >> ((byte % 8) * 8)) as u8);
        }
    }

    /// (entry index, byte within the entry) for an aligned 4- or 8-byte access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let index = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        let field = (offset % MSIX_ENTRY_SIZE) as usize;
        (index < self.table.len()).then_some((index, field))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Default)]
    struct Recorder {
        fired: Mutex<Vec<u16>>,
        routes: Mutex<Vec<(u16, MsiMessage, bool)>>,
    }
    impl MsiVectors for Recorder {
        fn update(&self, vector: u16, msg: MsiMessage, enabled: bool) -> std::io::Result<()> {
            self.routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((vector, msg, enabled));
            Ok(())
        }
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            self.fired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(vector);
            Ok(())
        }
    }
    impl Recorder {
        fn fired(&self) -> Vec<u16> {
            self.fired.lock().map(|f| f.clone()).unwrap_or_default()
        }
    }

    fn setup() -> (Msix, Arc<Recorder>) {
        let r = Arc::new(Recorder::default());
        (Msix::new(3, r.clone()), r)
    }

    fn program(m: &mut Msix, v: u64, data: u32, masked: bool) {
        m.write_table(v * 16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(v * 16 + 4, &0u32.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn delivers_only_when_enabled_and_unmasked() {
        let (mut m, r) = setup();
        program(&mut m, 1, 0x41, false);
        m.signal(1);
        assert!(r.fired().is_empty(), "MSI-X disabled");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(r.fired(), vec![1], "pending vector fires on enable");
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.signal(1);
        assert_eq!(r.fired(), vec![1, 1]);
        let routes = r.routes.lock().map(|x| x.clone()).unwrap_or_default();
        assert!(
            routes.contains(&(
                1,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                },
                true
            )),
            "{routes:?}"
        );
    }

    #[test]
    fn entry_and_function_masks_hold_the_vector_pending() {
        let (mut m, r) = setup();
        m.set_control(CONTROL_ENABLE);
        program(&mut m, 0, 0x40, true);
        m.signal(0);
        assert!(r.fired().is_empty());
        program(&mut m, 0, 0x40, false);
        assert_eq!(r.fired(), vec![0], "unmask delivers the pending vector");
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(0);
        assert_eq!(r.fired(), vec![0]);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(r.fired(), vec![0, 0]);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (mut m, r) = setup();
        m.set_control(CONTROL_ENABLE);
        m.write_table(3 * 16, &[1, 2, 3, 4]); // past the table
        m.write_table(2, &[1, 2, 3, 4]); // misaligned
        m.write_table(0, &[1, 2]); // wrong size
        m.signal(0xffff);
        m.signal(3);
        let mut d = [0xaau8; 4];
        m.read_table(3 * 16, &mut d);
        assert_eq!(d, [0; 4]);
        m.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1, "entries start masked");
        assert!(r.fired().is_empty());
        let mut big = [0u8; 64];
        m.read_pba(4096, &mut big);
        assert_eq!(big, [0; 64]);
    }

    #[test]
    fn capability_layout() {
        let (m, _) = setup();
        let (body, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body[0], MSIX_CAP_ID);
        assert_eq!(
            u16::from_le_bytes([body[2], body[3]]),
            2,
            "table size is N-1"
        );
        assert_eq!(
            u32::from_le_bytes([body[4], body[5], body[6], body[7]]),
            0x4000
        );
        assert_eq!(mask[3], 0xc0);
    }
}
