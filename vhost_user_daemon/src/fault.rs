//! Guest memory that vanishes under the daemon.
//!
//! A frontend can shrink the file of a memory region after the daemon mapped it
//! (`ftruncate` of its memfd; a memfd without `F_SEAL_SHRINK`, as Nimbus's, Cloud
//! Hypervisor's and many others' are). The next access to a page past the new end raises
//! `SIGBUS` (`BUS_ADRERR`), which would end the daemon. Checking the size before each access
//! would race with the frontend; sealing the file needs a memfd that allows it. So [`install`]
//! sets a `SIGBUS` handler that maps a private zero page over the page that faulted (the access
//! then completes: reads see zeros, writes go nowhere) and records the address; [`check`],
//! called by the protocol thread and the workers after they touch guest memory, then drops the
//! connection ([`ConnectionFault::MemoryVanished`]). The page stays mapped until the
//! connection's memory goes (it is part of the region's mapping, unmapped with it).
//!
//! Only `BUS_ADRERR` is handled this way (a page past the end of a mapped file: in a daemon,
//! whose only shared file mappings are guest memory, that is a region shrunk under it, or a
//! hugetlbfs region without huge pages left). Any other bus error goes to the handler that was
//! there before (the standard library's), as if this one did not exist.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::serve::{drop_connection, ConnectionFault};

/// `BUS_ADRERR` (`<asm-generic/siginfo.h>`): nonexistent physical address, which an access past
/// the end of a mapped file raises.
const BUS_ADRERR: libc::c_int = 2;

/// Faults handled so far.
static FAULTS: AtomicUsize = AtomicUsize::new(0);
/// Faults already reported by [`check`].
static REPORTED: AtomicUsize = AtomicUsize::new(0);
/// The address of the last fault handled.
static ADDRESS: AtomicUsize = AtomicUsize::new(0);
/// The action before ours, for the faults that are not ours; and the page size.
static PREVIOUS: OnceLock<(libc::sigaction, usize)> = OnceLock::new();

/// Installs the handler. Call once, before the system call filters apply (it needs
/// `rt_sigaction`); the handler itself only calls `mmap`, which every thread may.
///
/// # Errors
///
/// If `sigaction` fails.
pub fn install() -> io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: a zeroed sigaction is a valid start; the handler is async-signal-safe (atomics
    // and mmap); the previous action is stored before the new one can run, and the results
    // are checked.
    unsafe {
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
            return Err(io::Error::last_os_error());
        }
        if PREVIOUS.set((previous, page)).is_err() {
            return Ok(());
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `SIGBUS` handler (see the module).
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let Some((previous, page)) = PREVIOUS.get() else {
        return;
    };
    if code == BUS_ADRERR && address != 0 {
        let start = address & !(page - 1);
        // SAFETY: MAP_FIXED over the one page that faulted, which lies past the end of a file
        // mapping (that is what BUS_ADRERR means): nothing can be read there any more, and the
        // mapping it belongs to is the only user of that address range.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                *page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            ADDRESS.store(address, Ordering::Relaxed);
            FAULTS.fetch_add(1, Ordering::Release);
            return;
        }
    }
    // Not ours (or the page could not be replaced): what would have happened without us.
    let handler = previous.sa_sigaction;
    if previous.sa_flags & libc::SA_SIGINFO != 0 && handler > libc::SIG_IGN {
        // SAFETY: the previous action was installed with SA_SIGINFO, so its handler has this
        // signature; it gets what the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(signal, info, context);
    } else {
        // SIG_DFL (or a plain handler): restore it; returning re-runs the access, which then
        // ends the process as it would have.
        // SAFETY: sigaction with a valid action; async-signal-safe.
        unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
    }
}

/// The address of a fault handled since the last call, if any.
pub fn take() -> Option<usize> {
    let faults = FAULTS.load(Ordering::Acquire);
    let reported = REPORTED.swap(faults, Ordering::AcqRel);
    (faults != reported).then(|| ADDRESS.load(Ordering::Relaxed))
}

/// Drops the connection if a fault was handled since the last check.
pub fn check() {
    if let Some(address) = take() {
        drop_connection(ConnectionFault::MemoryVanished { address });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    use super::*;

    /// A memfd mapping whose file is then cut to nothing: reading it raises SIGBUS, which the
    /// handler turns into zeros and a recorded fault.
    #[test]
    fn a_read_past_the_end_of_a_shrunk_file_reads_zeros() {
        install().unwrap();
        // SAFETY: a valid C string; the descriptor is owned by the File.
        let file = unsafe {
            File::from_raw_fd(libc::memfd_create(
                c"fault-test".as_ptr(),
                libc::MFD_CLOEXEC,
            ))
        };
        let len = 2 * 4096;
        file.set_len(len as u64).unwrap();
        // SAFETY: a new shared mapping of the file; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let bytes = p.cast::<u8>();
        // SAFETY: inside the mapping, which the file still covers.
        unsafe { bytes.add(4096).write_volatile(7) };
        let _ = take();
        file.set_len(4096).unwrap();
        // SAFETY: inside the mapping; the page is past the end of the file now.
        let v = unsafe { bytes.add(4096).read_volatile() };
        assert_eq!(v, 0);
        assert_eq!(take(), Some(bytes as usize + 4096));
        assert_eq!(take(), None);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
    }
}
