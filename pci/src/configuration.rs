//! A type-0 PCI configuration space: 4 KiB of registers (256 bytes conventional, the rest
//! PCIe extended space reading as zero) with per-bit write masks, write-1-to-clear bits,
//! BARs and a capability list.

/// Bytes of configuration space per function (PCIe).
pub const CONFIG_SPACE_SIZE: usize = 4096;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;

/// Register (dword) index of COMMAND/STATUS.
pub const COMMAND_REG: usize = 1;
/// COMMAND: I/O space decode.
pub const COMMAND_IO: u32 = 1 << 0;
/// COMMAND: memory space decode.
pub const COMMAND_MEMORY: u32 = 1 << 1;
/// COMMAND: bus master.
pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// COMMAND: INTx disable.
pub const COMMAND_INTX_DISABLE: u32 = 1 << 10;
/// STATUS (upper half of register 1): capability list present.
const STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// First BAR register.
pub const BAR0_REG: usize = 4;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
const CAPABILITY_POINTER_REG: usize = 0xd;
const INTERRUPT_REG: usize = 0xf;
/// First byte available for capabilities.
const FIRST_CAPABILITY_OFFSET: usize = 0x40;

/// What kind of BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (uses two BAR slots).
    Memory64,
}

/// One BAR's fixed properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR slot (0..6).
    pub index: usize,
    /// Size in bytes: a power of two, at least 4 KiB here (page-sized so it can be mapped).
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: BarKind,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigurationError {
    /// BAR slot out of range or already used.
    #[error("BAR slot {0} is invalid or taken")]
    BarSlot(usize),
    /// BAR size not a power of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two >= 16")]
    BarSize(u64),
    /// BAR address not aligned to its size.
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment {
        /// Address.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// No room left for a capability.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// Identity of a function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code (base class).
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A function's configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    /// Bits cleared by writing 1.
    rw1c: Box<[u32; NUM_REGS]>,
    bars: [Option<Bar>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    /// A type-0 header with `ids`; COMMAND's decode, bus-master and INTx-disable bits writable.
    pub fn new(ids: PciIds) -> Self {
        let mut regs = Box::new([0u32; NUM_REGS]);
        let mut writable = Box::new([0u32; NUM_REGS]);
        let mut rw1c = Box::new([0u32; NUM_REGS]);
        regs[0] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        regs[2] = u32::from(ids.class) << 24
            | u32::from(ids.subclass) << 16
            | u32::from(ids.prog_if) << 8
            | u32::from(ids.revision);
        regs[0xb] = u32::from(ids.subsystem) << 16 | u32::from(ids.subsystem_vendor);
        writable[COMMAND_REG] =
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        // STATUS error bits are RW1C.
        rw1c[COMMAND_REG] = 0xf900_0000;
        // Cache line size and latency timer are writable scratch registers.
        writable[3] = 0x0000_ffff;
        // Interrupt line is scratch for the OS; interrupt pin 0 (no INTx).
        writable[INTERRUPT_REG] = 0x0000_00ff;
        Self {
            regs,
            writable,
            rw1c,
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY_OFFSET,
        }
    }

    /// Declares BAR `bar` at `addr`.
    pub fn add_bar(&mut self, bar: Bar, addr: u64) -> Result<(), ConfigurationError> {
        let slots = if bar.kind == BarKind::Memory64 { 2 } else { 1 };
        if bar.index + slots > NUM_BARS
            || (bar.index..bar.index + slots).any(|i| self.bar_slot_used(i))
        {
            return Err(ConfigurationError::BarSlot(bar.index));
        }
        if !bar.size.is_power_of_two()
            || bar.size < 16
            || (bar.kind == BarKind::Memory32 && bar.size > 1 << 31)
        {
            return Err(ConfigurationError::BarSize(bar.size));
        }
        if !addr.is_multiple_of(bar.size)
            || (bar.kind == BarKind::Memory32 && addr + bar.size > 1 << 32)
        {
            return Err(ConfigurationError::BarAlignment {
                addr,
                size: bar.size,
            });
        }
        let reg = BAR0_REG + bar.index;
        let flags = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 => 0b100,
        } | if bar.prefetchable { 0b1000 } else { 0 };
        let mask = !(bar.size - 1);
        self.regs[reg] = (addr as u32 & 0xffff_fff0) | flags;
        self.writable[reg] = mask as u32 & 0xffff_fff0;
        if bar.kind == BarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[bar.index] = Some(bar);
        Ok(())
    }

    fn bar_slot_used(&self, slot: usize) -> bool {
        self.bars
            .iter()
            .flatten()
            .any(|b| b.index == slot || (b.kind == BarKind::Memory64 && b.index + 1 == slot))
    }

    /// The BARs declared.
    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The address BAR `index` holds now (whatever decode says).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let reg = BAR0_REG + index;
        let low = u64::from(self.regs[reg] & 0xffff_fff0);
        Some(match bar.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => low | u64::from(self.regs[reg + 1]) << 32,
        })
    }

    /// Where BAR `index` decodes: its address while memory decode is on and the address is a
    /// real placement (not the all-ones value left by sizing), else `None`.
    pub fn decoded_bar(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index).copied().flatten()?;
        if self.regs[COMMAND_REG] & COMMAND_MEMORY == 0 {
            return None;
        }
        let addr = self.bar_address(index)?;
        let top_mask = match bar.kind {
            BarKind::Memory32 => 0xffff_ffffu64,
            BarKind::Memory64 => u64::MAX,
        };
        // A BAR still holding the sizing pattern (all address bits set) is not placed.
        if addr == (!(bar.size - 1)) & top_mask & !0xf || addr == 0 {
            return None;
        }
        Some((addr, bar.size))
    }

    /// Appends a capability: `body` starts with the capability ID byte and a placeholder next
    /// pointer byte. Returns its offset. `writable` masks, per byte of `body`, the bits the guest
    /// may change (None: read-only).
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: Option<&[u8]>,
    ) -> Result<usize, ConfigurationError> {
        let len = body.len().max(2);
        let offset = self.next_capability;
        let end = offset + len.div_ceil(4) * 4;
        if end > 0x100 {
            return Err(ConfigurationError::CapabilitySpace(len));
        }
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        self.set_byte(offset + 1, 0);
        if let Some(mask) = writable {
            for (i, m) in mask.iter().enumerate().take(body.len()) {
                let at = offset + i;
                let shift = (at % 4) * 8;
                self.writable[at / 4] |= u32::from(*m) << shift;
            }
        }
        match self.last_capability {
            None => self.regs[CAPABILITY_POINTER_REG] = offset as u32,
            Some(prev) => self.set_byte(prev + 1, offset as u8),
        }
        self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
        self.last_capability = Some(offset);
        self.next_capability = end;
        Ok(offset)
    }

    fn set_byte(&mut self, at: usize, v: u8) {
        let shift = (at % 4) * 8;
        let r = &mut self.regs[at / 4];
        *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
    }

    /// Reads register (dword) `reg`; out of range reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Sets register `reg` from the device side (ignores masks).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`,
    /// honouring write masks and write-1-to-clear bits. Misaligned or oversized writes are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let (Some(cur), Ok(offset)) = (self.regs.get(reg).copied(), usize::try_from(offset)) else {
            return;
        };
        if !matches!(data.len(), 1 | 2 | 4) || offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut lanes = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            value |= u32::from(*b) << shift;
            lanes |= 0xff << shift;
        }
        let writable = self.writable[reg] & lanes;
        let clear = self.rw1c[reg] & lanes & value;
        self.regs[reg] = ((cur & !writable) | (value & writable)) & !clear;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfiguration {
        PciConfiguration::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0,
            revision: 1,
            ..Default::default()
        })
    }

    #[test]
    fn ids_and_readonly_fields() {
        let mut c = config();
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write_reg(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2) >> 24, 1);
        assert_eq!(c.read_reg(NUM_REGS), 0xffff_ffff);
    }

    #[test]
    fn bar_sizing_and_decode() {
        let mut c = config();
        c.add_bar(
            Bar {
                index: 0,
                size: 0x8000,
                kind: BarKind::Memory64,
                prefetchable: false,
            },
            0x1_0000_0000,
        )
        .expect("bar");
        assert_eq!(c.decoded_bar(0), None, "decode off at reset");
        c.write_reg(COMMAND_REG, 0, &[COMMAND_MEMORY as u8]);
        assert_eq!(c.decoded_bar(0), Some((0x1_0000_0000, 0x8000)));
        // Sizing: all ones, read back the size mask and the type bits.
        c.write_reg(COMMAND_REG, 0, &[0]);
        c.write_reg(BAR0_REG, 0, &[0xff; 4]);
        c.write_reg(BAR0_REG + 1, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(BAR0_REG), 0xffff_8004);
        assert_eq!(c.read_reg(BAR0_REG + 1), 0xffff_ffff);
        c.write_reg(COMMAND_REG, 0, &[COMMAND_MEMORY as u8]);
        assert_eq!(c.decoded_bar(0), None, "sizing pattern is not a placement");
        // Relocation.
        c.write_reg(BAR0_REG, 0, &0xc000_0000u32.to_le_bytes());
        c.write_reg(BAR0_REG + 1, 0, &0u32.to_le_bytes());
        assert_eq!(c.decoded_bar(0), Some((0xc000_0000, 0x8000)));
        // Misaligned address bits are masked off.
        c.write_reg(BAR0_REG, 0, &0xc000_1234u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
    }

    #[test]
    fn bar_validation() {
        let mut c = config();
        let bar = |index, size| Bar {
            index,
            size,
            kind: BarKind::Memory32,
            prefetchable: false,
        };
        assert_eq!(
            c.add_bar(bar(0, 0x3000), 0),
            Err(ConfigurationError::BarSize(0x3000))
        );
        assert!(c.add_bar(bar(0, 0x1000), 0x800).is_err());
        c.add_bar(
            Bar {
                index: 4,
                size: 0x1000,
                kind: BarKind::Memory64,
                prefetchable: false,
            },
            0x1000,
        )
        .expect("bar4");
        assert_eq!(
            c.add_bar(bar(5, 0x1000), 0x2000),
            Err(ConfigurationError::BarSlot(5))
        );
        assert_eq!(
            c.add_bar(bar(6, 0x1000), 0x2000),
            Err(ConfigurationError::BarSlot(6))
        );
    }

    #[test]
    fn capabilities_are_linked_and_masked() {
        let mut c = config();
        let a = c
            .add_capability(&[0x11, 0, 1, 2, 3, 4], Some(&[0, 0, 0xff, 0, 0, 0]))
            .expect("cap a");
        let b = c.add_capability(&[0x09, 0, 7], None).expect("cap b");
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(c.read_reg(CAPABILITY_POINTER_REG) & 0xff, 0x40);
        assert_ne!(c.read_reg(COMMAND_REG) & STATUS_CAP_LIST, 0);
        assert_eq!((c.read_reg(0x40 / 4) >> 8) & 0xff, 0x48, "next pointer");
        assert_eq!((c.read_reg(0x48 / 4) >> 8) & 0xff, 0, "end of list");
        c.write_reg(0x40 / 4, 2, &[0xaa, 0xbb]);
        assert_eq!(c.read_reg(0x40 / 4) >> 16, 0x02aa);
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut c = config();
        c.set_reg(COMMAND_REG, c.read_reg(COMMAND_REG) | 0x2000_0000);
        c.write_reg(COMMAND_REG, 2, &[0, 0]);
        assert_ne!(c.read_reg(COMMAND_REG) & 0x2000_0000, 0);
        c.write_reg(COMMAND_REG, 2, &[0, 0x20]);
        assert_eq!(c.read_reg(COMMAND_REG) & 0x2000_0000, 0);
    }
}
