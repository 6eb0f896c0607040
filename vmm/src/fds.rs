//! Descriptors handed to the VMM by its manager: TAP queues passed on the command line
//! (`--net fd=3`) or with `vm.add-net` (SCM_RIGHTS). The configuration names them by number
//! (as Cloud Hypervisor's does); the store owns them, so each boot of the VM works on
//! duplicates and the originals live until the configuration that names them goes away.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Errors about handed-over descriptors.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// A number on the command line is not an open descriptor of this process.
    #[error("file descriptor {0} is not open")]
    NotOpen(RawFd),
    /// A descriptor the store does not hold (or one of the standard streams).
    #[error("file descriptor {0} was not handed to Nimbus")]
    Unknown(RawFd),
    /// Duplicating failed.
    #[error("cannot duplicate file descriptor {fd}")]
    Dup {
        /// The descriptor.
        fd: RawFd,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The handed-over descriptors, by number.
#[derive(Debug, Default)]
pub struct FdStore {
    fds: BTreeMap<RawFd, OwnedFd>,
}

impl FdStore {
    /// Takes ownership of `fd` and returns its number.
    pub fn insert(&mut self, fd: OwnedFd) -> RawFd {
        let n = fd.as_raw_fd();
        self.fds.insert(n, fd);
        n
    }

    /// Takes ownership of descriptor `fd`, inherited from the parent process (command line).
    pub fn claim_inherited(&mut self, fd: RawFd) -> Result<(), FdError> {
        if fd <= 2 {
            // Standard streams and negative numbers are never TAPs.
            return Err(FdError::Unknown(fd));
        }
        if self.fds.contains_key(&fd) {
            return Ok(());
        }
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(FdError::NotOpen(fd));
        }
        // SAFETY: the descriptor is open, was handed to this process to own, and nothing else
        // in the process has claimed it (checked above).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not for the guest's children (e.g. a helper the VMM runs).
        // SAFETY: FD_CLOEXEC on a descriptor this store owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        self.fds.insert(fd, owned);
        Ok(())
    }

    /// A duplicate of the held descriptor `fd`, for one boot of the VM.
    pub fn duplicate(&self, fd: RawFd) -> Result<OwnedFd, FdError> {
        let held = self.fds.get(&fd).ok_or(FdError::Unknown(fd))?;
        held.try_clone()
            .map_err(|source| FdError::Dup { fd, source })
    }

    /// Closes the held descriptors in `numbers`.
    pub fn release(&mut self, numbers: &[RawFd]) {
        for n in numbers {
            self.fds.remove(n);
        }
    }

    /// Closes every held descriptor.
    pub fn clear(&mut self) {
        self.fds.clear();
    }

    /// How many descriptors are held.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The held descriptor `fd`, borrowed.
    pub fn get(&self, fd: RawFd) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fds.get(&fd).map(|f| f.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just created and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// What `fd` refers to now (device and inode), if it is open: a number reused by a test
    /// running in parallel refers to something else.
    fn identity(fd: RawFd) -> Option<(u64, u64)> {
        // SAFETY: a zeroed stat is a valid buffer for fstat, which fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat only writes into `st`.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
    }

    #[test]
    fn duplicates_leave_the_original_held_until_released() {
        let (r, _w) = pipe();
        let mut store = FdStore::default();
        let n = store.insert(r);
        let pipe_id = identity(n);
        let dup = store.duplicate(n).expect("dup");
        assert_ne!(dup.as_raw_fd(), n);
        drop(dup);
        assert_eq!(identity(n), pipe_id);
        store.release(&[n]);
        assert_ne!(identity(n), pipe_id);
        assert!(matches!(store.duplicate(n), Err(FdError::Unknown(_))));
    }

    #[test]
    fn inherited_descriptors_must_be_open() {
        let (r, _w) = pipe();
        let n = std::os::fd::IntoRawFd::into_raw_fd(r);
        let pipe_id = identity(n);
        let mut store = FdStore::default();
        store.claim_inherited(n).expect("claim");
        store
            .claim_inherited(n)
            .expect("claiming twice is harmless");
        assert_eq!(store.len(), 1);
        store.clear();
        assert_ne!(identity(n), pipe_id);
        assert!(matches!(
            store.claim_inherited(-1),
            Err(FdError::Unknown(_))
        ));
        assert!(matches!(store.claim_inherited(1), Err(FdError::Unknown(1))));
    }
}
