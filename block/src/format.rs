//! Recognising image formats Nimbus does not serve, so such an image is refused instead of
//! being shown to the guest as raw bytes (where a guest write would corrupt it).

use crate::disk::{BlockError, DiskBackend};

/// What an image's first (and, for VHD, last) bytes say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// No known header: raw bytes.
    Raw,
    /// QCOW (version 1, 2 or 3).
    Qcow,
    /// VHDX.
    Vhdx,
    /// VMDK (sparse extent).
    Vmdk,
    /// A fixed VHD (footer in the last 512 bytes).
    FixedVhd,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Qcow => "qcow2",
            Self::Vhdx => "vhdx",
            Self::Vmdk => "vmdk",
            Self::FixedVhd => "vhd",
        })
    }
}

const SECTOR: u64 = 512;

/// Looks at `disk`'s header (and VHD footer).
pub fn detect_format(disk: &dyn DiskBackend) -> Result<ImageFormat, BlockError> {
    let size = disk.size();
    if size < SECTOR {
        return Ok(ImageFormat::Raw);
    }
    let mut head = [0u8; SECTOR as usize];
    disk.read_at(0, &mut head)?;
    if head.starts_with(b"QFI\xfb") {
        return Ok(ImageFormat::Qcow);
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(ImageFormat::Vhdx);
    }
    if head.starts_with(b"KDMV") {
        return Ok(ImageFormat::Vmdk);
    }
    let mut tail = [0u8; SECTOR as usize];
    disk.read_at(size - SECTOR, &mut tail)?;
    if tail.starts_with(b"conectix") {
        return Ok(ImageFormat::FixedVhd);
    }
    Ok(ImageFormat::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeDisk;

    fn with(offset: u64, bytes: &[u8], size: u64) -> ImageFormat {
        let disk = FakeDisk::new(size as usize);
        disk.write_at(offset, bytes).expect("write");
        detect_format(&disk).expect("detect")
    }

    #[test]
    fn known_headers_are_recognised() {
        assert_eq!(with(0, b"QFI\xfb\0\0\0\x03", 4096), ImageFormat::Qcow);
        assert_eq!(with(0, b"vhdxfile", 4096), ImageFormat::Vhdx);
        assert_eq!(with(0, b"KDMV", 4096), ImageFormat::Vmdk);
        assert_eq!(with(4096 - 512, b"conectix", 4096), ImageFormat::FixedVhd);
        assert_eq!(with(0, b"\x7fELF", 4096), ImageFormat::Raw);
        assert_eq!(with(0, b"QF", 100), ImageFormat::Raw);
    }
}
