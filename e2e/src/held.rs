//! What a VMM process holds, for tests that check a removed device left nothing behind.

use std::os::fd::AsRawFd;
use std::path::Path;

/// Open descriptors and threads of process `pid` (from /proc).
pub fn process_holds(pid: u32) -> (usize, usize) {
    let count = |dir: String| std::fs::read_dir(dir).map_or(0, Iterator::count);
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}

/// Whether another open file description holds an OFD lock on `path` (Nimbus locks the
/// images it serves).
///
/// # Panics
/// If `path` cannot be opened or the lock cannot be queried.
pub fn is_ofd_locked(path: &Path) -> bool {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: a zeroed flock is a valid value of the C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    // SAFETY: F_OFD_GETLK on a valid descriptor with a valid flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    lock.l_type != libc::F_UNLCK as i16
}
