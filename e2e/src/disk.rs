//! Disk images for the virtio-blk checks: the host and guest byte patterns, writing and
//! verifying images, and the block soak mode's keys and checks.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write as _};
use std::path::Path;

/// Sector size of the disk patterns.
pub const SECTOR_SIZE: u64 = 512;

/// Sectors the guest's `write` check writes, from `blk.pattern.sector`.
pub const GUEST_WRITE_SECTORS: u64 = 8;

/// The host pattern (`blk.pattern.sector`): the byte at absolute offset `o`
/// of the disk image.
pub fn disk_pattern_byte(o: u64) -> u8 {
    ((o >> 9) as u8) ^ ((o & 0x1ff) as u8) ^ 0xa5
}

/// The guest pattern: the byte the guest writes at absolute offset `o` of
/// sectors `S..S + 8` (`S` = `blk.pattern.sector`).
pub fn guest_pattern_byte(o: u64) -> u8 {
    ((o >> 9) as u8).wrapping_mul(7) ^ 0x3c ^ ((o & 0xff) as u8)
}

/// Creates (or truncates) `path` as a raw disk image of `size` bytes (a
/// multiple of 512) filled with the host pattern ([`disk_pattern_byte`]).
pub fn write_disk_pattern(path: &Path, size: u64) -> std::io::Result<()> {
    if !size.is_multiple_of(SECTOR_SIZE) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("disk size {size} is not a multiple of {SECTOR_SIZE}"),
        ));
    }
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut chunk = vec![0u8; 1 << 16];
    let mut o = 0u64;
    while o < size {
        let n = chunk
            .len()
            .min(usize::try_from(size - o).unwrap_or(usize::MAX));
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = disk_pattern_byte(o + i as u64);
        }
        w.write_all(&chunk[..n])?;
        o += n as u64;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Checks a disk image prepared by [`write_disk_pattern`]: exactly `size`
/// bytes, the host pattern everywhere except, if `guest_sector` is given,
/// sectors `guest_sector..guest_sector + GUEST_WRITE_SECTORS`, which must hold
/// the guest pattern ([`guest_pattern_byte`]). The error names the number of
/// wrong bytes and the first few.
pub fn verify_disk_pattern(
    path: &Path,
    size: u64,
    guest_sector: Option<u64>,
) -> Result<(), String> {
    let len = image_len(path)?;
    if len != size {
        return Err(format!(
            "{} is {len} bytes, expected {size}",
            path.display()
        ));
    }
    let guest = guest_sector.map(|s| s * SECTOR_SIZE..(s + GUEST_WRITE_SECTORS) * SECTOR_SIZE);
    compare_image(path, 0..size, |at| match &guest {
        Some(g) if g.contains(&at) => (guest_pattern_byte(at), "guest pattern"),
        _ => (disk_pattern_byte(at), "host pattern"),
    })
}

fn image_len(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))
}

/// Compares the bytes `range` of the image at `path` with `want(offset)` (the expected byte and
/// the name of what it belongs to). The error names the number of wrong bytes and the first few.
///
/// # Errors
/// If the image cannot be read or any byte differs.
pub fn compare_image(
    path: &Path,
    range: std::ops::Range<u64>,
    want: impl Fn(u64) -> (u8, &'static str),
) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(range.start))
        .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let (mut o, mut wrong, mut first) = (range.start, 0u64, String::new());
    while o < range.end {
        let n = chunk
            .len()
            .min(usize::try_from(range.end - o).unwrap_or(usize::MAX));
        r.read_exact(&mut chunk[..n])
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for (i, &got) in chunk[..n].iter().enumerate() {
            let at = o + i as u64;
            let (expected, which) = want(at);
            if got != expected {
                if wrong < 8 {
                    let _ = write!(
                        first,
                        "\n  offset {at:#x} (sector {}): {got:#04x}, expected {expected:#04x} ({which})",
                        at / SECTOR_SIZE
                    );
                }
                wrong += 1;
            }
        }
        o += n as u64;
    }
    if wrong == 0 {
        Ok(())
    } else {
        Err(format!(
            "{}: {wrong} byte(s) in {:#x}..{:#x} differ from what was expected:{first}",
            path.display(),
            range.start,
            range.end
        ))
    }
}

// Block soak mode (`soak=blk`, docs/test-guest.md "Block soak"): command line, progress lines
// and the image check.

/// The guest's block soak keys: `soak=blk soak.mib=<mib> soak.mibps=<mibps>` (0: no rate
/// limit), plus `soak.stall=<secs>` if given (guest default 30).
pub fn soak_blk_keys(mib: u64, mibps: u64, stall_secs: Option<u64>) -> String {
    let mut keys = format!("soak=blk soak.mib={mib} soak.mibps={mibps}");
    if let Some(s) = stall_secs {
        keys.push_str(&format!(" soak.stall={s}"));
    }
    keys
}

/// The progress line the soak guest prints once `mib` MiB of writes have completed (`mib` a
/// multiple of 8, or the region size); for
/// [`RunningVm::wait_for_line`](crate::RunningVm::wait_for_line).
pub fn soak_blk_written_line(mib: u64) -> String {
    format!("INFO soak blk written={mib} MiB")
}

/// Checks that the bytes `range` of the image at `path` hold the guest pattern
/// ([`guest_pattern_byte`], the data `soak=blk` writes). The error names the number of
/// wrong bytes and the first few.
pub fn verify_guest_pattern(path: &Path, range: std::ops::Range<u64>) -> Result<(), String> {
    let len = image_len(path)?;
    if len < range.end {
        return Err(format!(
            "{} is {len} bytes, shorter than {:#x}",
            path.display(),
            range.end
        ));
    }
    compare_image(path, range, |at| (guest_pattern_byte(at), "guest pattern"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScratchDir;

    #[test]
    fn disk_patterns_match_the_guest_definition() {
        // Spot values from the definitions in docs/test-guest.md.
        assert_eq!(disk_pattern_byte(0), 0xa5);
        assert_eq!(disk_pattern_byte(0x1ff), 0xff ^ 0xa5);
        assert_eq!(disk_pattern_byte(0x201), 0xa5); // sector 1 ^ byte 1
        assert_eq!(guest_pattern_byte(0), 0x3c);
        assert_eq!(guest_pattern_byte(0x203), 7 ^ 0x3c ^ 3);
        assert_eq!(guest_pattern_byte(0x2_0000), 0x3c); // sector 256 wraps to 0
    }

    #[test]
    fn disk_pattern_write_and_verify() {
        let dir = ScratchDir::new("e2e-unit-disk");
        let img = dir.file("disk.img");
        let size = 64 * SECTOR_SIZE;
        write_disk_pattern(&img, size).expect("write image");
        verify_disk_pattern(&img, size, None).expect("fresh image verifies");
        assert!(verify_disk_pattern(&img, size, Some(8)).is_err());
        // Write the guest pattern to sectors 8..16 like the guest does.
        let mut data = std::fs::read(&img).expect("read image");
        for o in 8 * SECTOR_SIZE..16 * SECTOR_SIZE {
            data[o as usize] = guest_pattern_byte(o);
        }
        data[100] ^= 1;
        std::fs::write(&img, &data).expect("write image");
        let err = verify_disk_pattern(&img, size, Some(8)).expect_err("one byte is wrong");
        assert!(
            err.contains("1 byte(s) in 0x0..0x8000 differ") && err.contains("offset 0x64"),
            "{err}"
        );
        data[100] ^= 1;
        std::fs::write(&img, &data).expect("write image");
        verify_disk_pattern(&img, size, Some(8)).expect("guest pattern verifies");
        assert!(verify_disk_pattern(&img, size + SECTOR_SIZE, Some(8)).is_err());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }
}
