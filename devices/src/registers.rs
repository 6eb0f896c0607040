//! Byte-wise access to a block of 32-bit little-endian registers, shared by the ACPI hotplug
//! register blocks ([`crate::pci_hotplug`], [`crate::cpu_hotplug`]).
//!
//! The guest's AML uses aligned 32-bit accesses, but a hostile (or just different) guest may
//! access any offset with any length: the block is then handled as if it were `len` bytes of
//! memory. Each register an access touches is read or written once, with a mask of the bytes
//! the access covers; bytes past the block read 0 and writes to them are ignored.

/// A device made of 32-bit registers at offsets `0, 4, 8, ...`.
pub(crate) trait DwordRegisters {
    /// Number of registers in the block.
    const REGISTERS: usize;

    /// Reads the bytes `mask` of register `register` (`< REGISTERS`); bits outside `mask` are
    /// ignored by the caller. May have side effects (read-to-clear) limited to `mask`.
    fn read_register(&mut self, register: usize, mask: u32) -> u32;

    /// Writes the bytes `mask` of register `register` (`< REGISTERS`); `value` has no bits
    /// outside `mask`.
    fn write_register(&mut self, register: usize, value: u32, mask: u32);
}

/// Size of one register in bytes.
const REGISTER_LEN: u64 = 4;

/// The bytes of an access of `len` bytes at `offset` that fall in a block of `registers`
/// registers, in order: `(index in the access, register, bit shift of the byte in the register)`.
fn bytes_of(
    registers: usize,
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (usize, usize, u32)> {
    let block_len = REGISTER_LEN.saturating_mul(registers as u64);
    (0..len).map_while(move |i| {
        let at = offset
            .checked_add(u64::try_from(i).ok()?)
            .filter(|&at| at < block_len)?;
        // at < block_len: the register index fits (it is below `registers`), the shift is < 32.
        Some((
            i,
            (at / REGISTER_LEN) as usize,
            (at % REGISTER_LEN) as u32 * 8,
        ))
    })
}

/// A bus read of `data.len()` bytes at `offset` of `device`'s block.
pub(crate) fn read<D: DwordRegisters>(device: &mut D, offset: u64, data: &mut [u8]) {
    data.fill(0);
    for register in 0..D::REGISTERS {
        let mask = bytes_of(D::REGISTERS, offset, data.len())
            .filter(|&(_, r, _)| r == register)
            .fold(0u32, |mask, (_, _, shift)| mask | 0xff << shift);
        if mask == 0 {
            continue;
        }
        let value = device.read_register(register, mask);
        for (i, _, shift) in
            bytes_of(D::REGISTERS, offset, data.len()).filter(|&(_, r, _)| r == register)
        {
            data[i] = (value >> shift) as u8;
        }
    }
}

/// A bus write of `data` at `offset` of `device`'s block.
pub(crate) fn write<D: DwordRegisters>(device: &mut D, offset: u64, data: &[u8]) {
    for register in 0..D::REGISTERS {
        let (value, mask) = bytes_of(D::REGISTERS, offset, data.len())
            .filter(|&(_, r, _)| r == register)
            .fold((0u32, 0u32), |(value, mask), (i, _, shift)| {
                (value | u32::from(data[i]) << shift, mask | 0xff << shift)
            });
        if mask != 0 {
            device.write_register(register, value, mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two plain read/write registers.
    #[derive(Default)]
    struct Two([u32; 2]);

    impl DwordRegisters for Two {
        const REGISTERS: usize = 2;
        fn read_register(&mut self, register: usize, mask: u32) -> u32 {
            self.0[register] & mask
        }
        fn write_register(&mut self, register: usize, value: u32, mask: u32) {
            self.0[register] = self.0[register] & !mask | value;
        }
    }

    #[test]
    fn accesses_behave_like_memory_inside_the_block_and_read_0_outside() {
        let mut d = Two::default();
        write(&mut d, 0, &0x4433_2211u32.to_le_bytes());
        write(&mut d, 3, &[0xaa, 0xbb, 0xcc]);
        assert_eq!(d.0, [0xaa33_2211, 0x0000_ccbb]);
        let mut b = [0x55u8; 6];
        read(&mut d, 5, &mut b);
        assert_eq!(b, [0xcc, 0, 0, 0, 0, 0]);
        for offset in [8, 100, u64::MAX - 1, u64::MAX] {
            let mut b = [0x55u8; 4];
            read(&mut d, offset, &mut b);
            assert_eq!(b, [0; 4]);
            write(&mut d, offset, &[0xff; 4]);
        }
        assert_eq!(d.0, [0xaa33_2211, 0x0000_ccbb]);
    }
}
