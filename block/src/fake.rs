//! [`FakeDisk`]: an in-memory [`DiskBackend`] with fault injection, for tests.

use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::disk::{check_range, BlockError, DiskBackend};

/// The operations [`FakeDisk`] records, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeOp {
    /// `read_at(offset, len)`.
    Read(u64, u64),
    /// `write_at(offset, len)`.
    Write(u64, u64),
    /// `flush()`.
    Flush,
    /// `discard(offset, len)`.
    Discard(u64, u64),
    /// `write_zeroes(offset, len, may_unmap)`.
    WriteZeroes(u64, u64, bool),
    /// `resize(new_size)`.
    Resize(u64),
}

#[derive(Debug, Default)]
struct State {
    data: Vec<u8>,
    failures_pending: usize,
    ops: Vec<FakeOp>,
}

/// An in-memory disk for tests: a `Vec<u8>` behind a mutex, an operation log, and fault
/// injection ([`FakeDisk::fail_next`]). Discard and write-zeroes zero the range.
///
/// Available with `cfg(test)` or the `test-utils` feature.
///
/// ```
/// use block::{DiskBackend, FakeDisk};
///
/// let disk = FakeDisk::new(4096);
/// disk.write_at(512, &[1, 2, 3]).unwrap();
/// disk.fail_next(1);
/// assert!(disk.flush().is_err());
/// assert!(disk.flush().is_ok());
/// assert_eq!(&disk.contents()[512..515], &[1, 2, 3]);
/// ```
#[derive(Debug)]
pub struct FakeDisk {
    state: Mutex<State>,
    read_only: bool,
    logical_block_size: u32,
}

impl FakeDisk {
    /// A writable disk of `size` zero bytes.
    pub fn new(size: usize) -> Self {
        Self::with_data(vec![0; size])
    }

    /// A writable disk holding `data`.
    pub fn with_data(data: Vec<u8>) -> Self {
        FakeDisk {
            state: Mutex::new(State {
                data,
                ..State::default()
            }),
            read_only: false,
            logical_block_size: 512,
        }
    }

    /// Makes the disk read-only (writes fail with [`BlockError::ReadOnly`]).
    pub fn make_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Sets the logical block size the disk reports.
    pub fn with_logical_block_size(mut self, size: u32) -> Self {
        self.logical_block_size = size;
        self
    }

    /// Makes the next `count` operations (of any kind) fail with [`BlockError::Io`].
    pub fn fail_next(&self, count: usize) {
        self.lock().failures_pending = count;
    }

    /// A copy of the disk's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// The operations performed so far, failed ones included.
    pub fn ops(&self) -> Vec<FakeOp> {
        self.lock().ops.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs `op`, then applies fault injection, the read-only check and the range check.
    fn begin(
        &self,
        op: FakeOp,
        name: &'static str,
        write: bool,
        offset: u64,
        len: u64,
    ) -> Result<MutexGuard<'_, State>, BlockError> {
        let mut state = self.lock();
        state.ops.push(op);
        let path = PathBuf::from("<fake disk>");
        if state.failures_pending > 0 {
            state.failures_pending -= 1;
            return Err(BlockError::Io {
                path,
                op: name,
                offset,
                len,
                source: io::Error::other("injected fault"),
            });
        }
        if write && self.read_only {
            return Err(BlockError::ReadOnly { path });
        }
        check_range(&path, state.data.len() as u64, offset, len)?;
        Ok(state)
    }
}

/// Converts a range already checked against the in-memory size into slice bounds.
fn bounds(offset: u64, len: u64) -> std::ops::Range<usize> {
    // Both fit in usize: `check_range` bounded them by the length of a `Vec`.
    let start = offset as usize;
    start..start + len as usize
}

impl DiskBackend for FakeDisk {
    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        let state = self.begin(FakeOp::Read(offset, len), "read", false, offset, len)?;
        buf.copy_from_slice(&state.data[bounds(offset, len)]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        let mut state = self.begin(FakeOp::Write(offset, len), "write", true, offset, len)?;
        state.data[bounds(offset, len)].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.begin(FakeOp::Flush, "flush", false, 0, 0).map(drop)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let mut state = self.begin(FakeOp::Discard(offset, len), "discard", true, offset, len)?;
        state.data[bounds(offset, len)].fill(0);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        let op = FakeOp::WriteZeroes(offset, len, may_unmap);
        let mut state = self.begin(op, "write-zeroes", true, offset, len)?;
        state.data[bounds(offset, len)].fill(0);
        Ok(())
    }

    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        let mut state = self.begin(FakeOp::Resize(new_size), "resize", true, 0, 0)?;
        let size = usize::try_from(new_size)
            .ok()
            .filter(|_| new_size.is_multiple_of(512));
        let Some(size) = size else {
            return Err(BlockError::UnalignedResize {
                path: PathBuf::from("<fake disk>"),
                size: new_size,
                align: 512,
            });
        };
        state.data.resize(size, 0);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fault_injection_and_log() {
        let disk = FakeDisk::new(1024);
        disk.fail_next(2);
        assert!(matches!(disk.write_at(0, &[1]), Err(BlockError::Io { .. })));
        assert!(disk.read_at(0, &mut [0]).is_err());
        disk.write_at(0, &[1, 2]).unwrap();
        disk.discard(1, 1).unwrap();
        assert_eq!(&disk.contents()[..3], &[1, 0, 0]);
        assert_eq!(
            disk.ops(),
            vec![
                FakeOp::Write(0, 1),
                FakeOp::Read(0, 1),
                FakeOp::Write(0, 2),
                FakeOp::Discard(1, 1)
            ]
        );
        assert!(matches!(
            disk.write_at(1020, &[0; 8]),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn fake_resize_grows_and_shrinks_in_sectors() {
        let disk = FakeDisk::new(1024);
        disk.write_at(0, &[7]).unwrap();
        disk.resize(4096).unwrap();
        assert_eq!(disk.size(), 4096);
        assert_eq!(disk.contents()[0], 7);
        disk.write_at(4000, &[1]).unwrap();
        disk.resize(512).unwrap();
        assert_eq!(disk.size(), 512);
        assert!(matches!(
            disk.resize(513),
            Err(BlockError::UnalignedResize { size: 513, .. })
        ));
        assert!(matches!(
            FakeDisk::new(512).make_read_only().resize(1024),
            Err(BlockError::ReadOnly { .. })
        ));
    }

    #[test]
    fn read_only_fake() {
        let disk = FakeDisk::new(512).make_read_only();
        assert!(disk.read_only());
        assert!(matches!(
            disk.write_zeroes(0, 512, false),
            Err(BlockError::ReadOnly { .. })
        ));
        disk.flush().unwrap();
    }
}
