//! Vectored disk I/O on lists of memory slices (guest buffers): straight `preadv`/`pwritev` for
//! backends with a file descriptor, a bounce buffer for the others.

use std::io;
use std::os::unix::io::RawFd;

use vm_memory::{VolatileMemoryError, VolatileSlice};

use crate::aligned::with_bounce_buffer;
use crate::disk::{BlockError, DiskBackend};

/// Largest piece a bounced access moves at once: bounds the bounce buffer, whatever length the
/// slices add up to.
const BOUNCE_CHUNK: u64 = 1 << 20;

/// Most iovecs one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Total length of `bufs` in bytes.
pub(crate) fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// A position in a list of slices, advanced by the bytes copied in or out.
struct SliceCursor<'s, 'a> {
    bufs: &'s [VolatileSlice<'a>],
    index: usize,
    offset: usize,
}

impl<'s, 'a> SliceCursor<'s, 'a> {
    fn new(bufs: &'s [VolatileSlice<'a>]) -> Self {
        SliceCursor {
            bufs,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `f` with the next pieces of the slices, `len` bytes in all (fewer if the slices
    /// end first), and the matching range of a buffer of `len` bytes.
    fn each_piece(
        &mut self,
        len: usize,
        mut f: impl FnMut(VolatileSlice<'a>, std::ops::Range<usize>),
    ) -> Result<(), VolatileMemoryError> {
        let mut done = 0;
        while done < len {
            let Some(buf) = self.bufs.get(self.index) else {
                break;
            };
            let rest = buf.offset(self.offset)?;
            let n = rest.len().min(len - done);
            f(rest.subslice(0, n)?, done..done + n);
            done += n;
            self.offset += n;
            if self.offset == buf.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }

    /// Copies `data` into the slices at the cursor.
    fn fill(&mut self, data: &[u8]) -> Result<(), VolatileMemoryError> {
        self.each_piece(data.len(), |piece, range| piece.copy_from(&data[range]))
    }

    /// Copies bytes from the slices at the cursor into `out`.
    fn drain(&mut self, out: &mut [u8]) -> Result<(), VolatileMemoryError> {
        self.each_piece(out.len(), |piece, range| {
            piece.copy_to(&mut out[range]);
        })
    }
}

/// [`DiskBackend::read_vectored_at`] or [`DiskBackend::write_vectored_at`] through this
/// thread's bounce buffer and [`DiskBackend::read_at`] or [`DiskBackend::write_at`], at most
/// [`BOUNCE_CHUNK`] bytes at a time.
pub(crate) fn bounced<D: DiskBackend + ?Sized>(
    disk: &D,
    direction: Direction,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
) -> Result<(), BlockError> {
    let len = total_len(bufs);
    let mut cursor = SliceCursor::new(bufs);
    with_bounce_buffer(len.min(BOUNCE_CHUNK) as usize, |bounce| {
        let mut done = 0u64;
        while done < len {
            let piece = &mut bounce[..(len - done).min(BOUNCE_CHUNK) as usize];
            match direction {
                Direction::Read => {
                    disk.read_at(offset + done, piece)?;
                    cursor.fill(piece).map_err(BlockError::Buffer)?;
                }
                Direction::Write => {
                    cursor.drain(piece).map_err(BlockError::Buffer)?;
                    disk.write_at(offset + done, piece)?;
                }
            }
            done += piece.len() as u64;
        }
        Ok(())
    })
}

/// Which way a vectored system call moves data.
#[derive(Clone, Copy)]
pub(crate) enum Direction {
    /// File to memory (`preadv`).
    Read,
    /// Memory to file (`pwritev`).
    Write,
}

impl Direction {
    /// The operation's name in error messages.
    pub(crate) fn op(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// Moves every byte of `bufs` between them and `fd` at `offset` with `preadv`/`pwritev`,
/// repeating after short transfers and `EINTR`.
///
/// # Errors
///
/// The system call's error; `UnexpectedEof` when a read finds the end of the file, `WriteZero`
/// when a write makes no progress.
pub(crate) fn transfer(
    fd: RawFd,
    direction: Direction,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
) -> io::Result<()> {
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            // For a read the kernel writes through this pointer. The slices' guards are
            // trivial (no Xen mapping), so the pointer stays valid as long as `bufs` borrows
            // the memory.
            iov_base: b.ptr_guard_mut().as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    let mut position = offset;
    while first < iovecs.len() {
        let count = (iovecs.len() - first).min(IOV_MAX);
        let file_offset = libc::off_t::try_from(position)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let batch = &iovecs[first..first + count];
        // SAFETY: `batch` holds `count` valid iovecs, each describing memory a `VolatileSlice`
        // guarantees is mapped and `iov_len` bytes long for the lifetime of `bufs`, which
        // outlives the call; the memory may be shared with a guest, which is why it is only
        // ever accessed by the kernel here, never through a Rust reference.
        let moved = unsafe {
            match direction {
                Direction::Read => {
                    libc::preadv(fd, batch.as_ptr(), count as libc::c_int, file_offset)
                }
                Direction::Write => {
                    libc::pwritev(fd, batch.as_ptr(), count as libc::c_int, file_offset)
                }
            }
        };
        let mut moved = match usize::try_from(moved) {
            Ok(0) => {
                return Err(match direction {
                    Direction::Read => io::ErrorKind::UnexpectedEof.into(),
                    Direction::Write => io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        position += moved as u64;
        // Drop the iovecs done and shorten the one the call stopped in.
        while moved > 0 {
            let iov = &mut iovecs[first];
            if moved >= iov.iov_len {
                moved -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `moved < iov_len`, so the result stays inside the same slice.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(moved) }.cast();
                iov.iov_len -= moved;
                moved = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fake::{FakeDisk, FakeOp};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn bounced_read_and_write_scatter_across_slices() {
        let data = pattern(3 << 20);
        let disk = FakeDisk::with_data(data.clone());
        // Three uneven buffers, 2.5 MiB + 1 in all: more than one bounce chunk.
        let (mut a, mut b, mut c) = (vec![0u8; 1000], vec![0u8; 2 << 20], vec![0u8; 523_289]);
        let bufs = [
            VolatileSlice::from(a.as_mut_slice()),
            VolatileSlice::from(b.as_mut_slice()),
            VolatileSlice::from(c.as_mut_slice()),
        ];
        let len = total_len(&bufs) as usize;
        disk.read_vectored_at(4096, &bufs).unwrap();
        let got: Vec<u8> = [a.as_slice(), &b, &c].concat();
        assert_eq!(got, data[4096..4096 + len]);
        // The disk saw 1 MiB pieces, not one access per slice.
        let reads: Vec<_> = disk
            .ops()
            .into_iter()
            .filter(|op| matches!(op, FakeOp::Read { .. }))
            .collect();
        assert_eq!(reads.len(), 3, "{reads:?}");

        let mut fresh = [vec![1u8; 512], vec![2u8; 1 << 20], vec![3u8; 1536]];
        let [x, y, z] = &mut fresh;
        let bufs = [
            VolatileSlice::from(x.as_mut_slice()),
            VolatileSlice::from(y.as_mut_slice()),
            VolatileSlice::from(z.as_mut_slice()),
        ];
        disk.write_vectored_at(512, &bufs).unwrap();
        let contents = disk.contents();
        assert_eq!(contents[..512], data[..512]);
        assert!(contents[512..1024].iter().all(|&v| v == 1));
        assert!(contents[1024..1024 + (1 << 20)].iter().all(|&v| v == 2));
        let end = 1024 + (1 << 20);
        assert!(contents[end..end + 1536].iter().all(|&v| v == 3));
        assert_eq!(contents[end + 1536..], data[end + 1536..]);
    }

    #[test]
    fn transfer_spans_more_than_iov_max_slices_and_stops_at_end_of_file() {
        let dir = std::env::temp_dir().join(format!("nimbus-vectored-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        use std::os::unix::io::AsRawFd;
        let fd = file.as_raw_fd();
        let data = pattern(3000 * 700);
        let mut src = data.clone();
        // 3000 slices of 700 bytes: more than IOV_MAX, so several calls.
        let bufs: Vec<VolatileSlice<'_>> = src.chunks_mut(700).map(VolatileSlice::from).collect();
        transfer(fd, Direction::Write, 100, &bufs).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk[100..], data[..]);

        let mut dst = vec![0u8; data.len()];
        let bufs: Vec<VolatileSlice<'_>> = dst.chunks_mut(700).map(VolatileSlice::from).collect();
        transfer(fd, Direction::Read, 100, &bufs).unwrap();
        assert_eq!(dst, data);

        // Reading past the end of the file is an error, not a silent short read.
        let mut tail = vec![0u8; 1000];
        let bufs = [VolatileSlice::from(tail.as_mut_slice())];
        let err = transfer(fd, Direction::Read, on_disk.len() as u64 - 10, &bufs).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
