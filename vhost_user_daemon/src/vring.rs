//! The ring type of the daemons' backends ([`Vring`]): the backend crate's `VringRwLock`, with
//! the descriptors a frontend hands over for a ring's notifications checked before use.
//!
//! The crate takes whatever descriptor comes with `SET_VRING_KICK`, `SET_VRING_CALL` or
//! `SET_VRING_ERR`, reads 8 bytes from the kick when epoll says it is readable (holding the
//! ring's lock) and writes 8 bytes to the call. A pipe with three bytes in it as the kick, or a
//! full pipe as the call, blocks the worker there for ever, the ring's lock with it: the
//! protocol thread then waits for ever at the next `GET_VRING_BASE`, and the daemon at the end
//! of the connection (even after SIGTERM). A read that fails ends the worker thread for good.
//! So a descriptor that is not an eventfd drops the connection ([`drop_connection`]); an
//! eventfd is made non-blocking (Nimbus, QEMU and Cloud Hypervisor create theirs so anyway), so
//! a frontend that drains or fills its own eventfd cannot block a worker either; and a kick
//! that cannot be read does not end the worker. A ring size that is not a power of two, which
//! the crate lets through to a queue that ignores it, drops the connection too.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::OnceLock;

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as VirtQueError, Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::fault;
use crate::memory::GuestMemory;
use crate::serve::{drop_connection, ConnectionFault};

/// The ring type the backends use: one reader-writer lock per queue, so the protocol thread
/// (`GET_VRING_BASE`, ...) waits for a worker in the middle of a queue and vice versa; the
/// frontend's notification descriptors checked (see the module).
#[derive(Clone)]
pub struct Vring<B: Bitmap + 'static = ()>(VringRwLock<GuestMemory<B>>);

impl<B: Bitmap + 'static> std::fmt::Debug for Vring<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vring").finish_non_exhaustive()
    }
}

impl<'a, B: Bitmap + 'static> VringStateGuard<'a, GuestMemory<B>> for Vring<B> {
    type G = <VringRwLock<GuestMemory<B>> as VringStateGuard<'a, GuestMemory<B>>>::G;
}

impl<'a, B: Bitmap + 'static> VringStateMutGuard<'a, GuestMemory<B>> for Vring<B> {
    type G = <VringRwLock<GuestMemory<B>> as VringStateMutGuard<'a, GuestMemory<B>>>::G;
}

/// The identity (`st_dev`, `st_ino`) that every eventfd shares: the kernel makes them all on
/// one anonymous inode. Found once with an eventfd of our own ([`init`]).
static EVENTFD_INODE: OnceLock<Option<(u64, u64)>> = OnceLock::new();

fn eventfd_inode() -> Option<(u64, u64)> {
    *EVENTFD_INODE.get_or_init(|| {
        // SAFETY: eventfd takes no memory.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            log::warn!(
                "cannot make an eventfd to recognise others by: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: eventfd just created `fd`; the File owns and closes it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let meta = file.metadata().ok()?;
        Some((meta.dev(), meta.ino()))
    })
}

/// Learns what an eventfd looks like. Called before the system call filters apply (it makes
/// an eventfd, which the protocol thread may not); otherwise the first check does it.
pub fn init() {
    let _ = eventfd_inode();
}

/// What `meta` describes, when it is not an eventfd.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_fifo() {
        "a pipe or FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "another kind of anonymous file"
    }
}

/// Checks that `file`, the frontend's `role` descriptor of a ring, is an eventfd and makes it
/// non-blocking; otherwise drops the connection and returns `None`.
fn checked(file: Option<File>, role: &'static str) -> Option<File> {
    let file = file?;
    match check(&file, role) {
        Ok(()) => Some(file),
        Err(fault) => {
            drop_connection(fault);
            None
        }
    }
}

fn check(file: &File, role: &'static str) -> Result<(), ConnectionFault> {
    let inspect = |source| ConnectionFault::Descriptor { role, source };
    let meta = file.metadata().map_err(inspect)?;
    // Another anonymous-inode file (an epoll, a timerfd) shares the eventfd's inode; what it
    // does wrong is caught when it is used (`read_kick`), and it cannot block.
    if eventfd_inode().is_some_and(|id| id != (meta.dev(), meta.ino())) {
        return Err(ConnectionFault::NotAnEventfd {
            role,
            kind: kind(&meta),
        });
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(F_GETFL) on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(inspect(io::Error::last_os_error()));
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above, F_SETFL with the flags just read.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(inspect(io::Error::last_os_error()));
        }
    }
    Ok(())
}

impl<B: Bitmap + 'static> VringT<GuestMemory<B>> for Vring<B> {
    fn new(mem: GuestMemory<B>, max_queue_size: u16) -> Result<Self, VirtQueError> {
        VringRwLock::new(mem, max_queue_size).map(Vring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMemory<B>>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMemory<B>>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled);
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base);
    }

    /// The crate calls this right after reading the used index from guest memory
    /// (`SET_VRING_ADDR`), which may have hit memory the frontend took away.
    fn set_queue_next_used(&self, idx: u16) {
        fault::check();
        self.0.set_queue_next_used(idx);
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.0.queue_used_idx()
    }

    /// The crate checks `0 < num <= max`; a size that is not a power of two drops the
    /// connection (the queue would refuse it silently and keep its previous size).
    fn set_queue_size(&self, num: u16) {
        if !num.is_power_of_two() {
            drop_connection(ConnectionFault::RingSize { size: num });
            return;
        }
        self.0.set_queue_size(num);
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled);
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready);
    }

    fn set_kick(&self, file: Option<File>) {
        self.0.set_kick(checked(file, "kick"));
    }

    /// Consumes a kick; never fails (a failure would end the worker thread for good). An
    /// eventfd drained meanwhile (by the frontend) is a kick like another; any other failure
    /// drops the connection and is no kick.
    fn read_kick(&self) -> io::Result<bool> {
        let state = self.0.get_ref();
        if let Some(kick) = state.get_kick() {
            match kick.consume() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    drop(state);
                    drop_connection(ConnectionFault::Kick(e));
                    return Ok(false);
                }
            }
        }
        Ok(state.is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(checked(file, "call"));
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(checked(file, "error"));
    }
}

/// Whether the three rings of `queue`, at its size, lie wholly in `mem`. The backend crate only
/// checks that each starts in guest memory (`SET_VRING_ADDR`); an available ring that runs past
/// the end of memory makes the queue's drain look for a chain it cannot read for ever, holding
/// the ring's lock (`GET_VRING_BASE` then waits for ever too). Backends check this before each
/// drain, as Nimbus's transport does when the driver starts a queue.
pub fn rings_in_memory<M: GuestMemoryBackend>(queue: &Queue, mem: &M) -> bool {
    let size = u64::from(queue.size());
    let rings = [
        (queue.desc_table(), 16 * size),
        (queue.avail_ring(), 6 + 2 * size),
        (queue.used_ring(), 6 + 8 * size),
    ];
    rings
        .iter()
        .all(|&(at, len)| mem.check_range(GuestAddress(at), len as usize))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn vring() -> Vring {
        Vring::new(GuestMemory::new(GuestMemoryMmap::<()>::new()), 64).unwrap()
    }

    fn eventfd(flags: i32) -> File {
        // SAFETY: eventfd takes no memory; the descriptor is owned by the File.
        unsafe { File::from_raw_fd(libc::eventfd(0, flags)) }
    }

    #[test]
    fn an_eventfd_is_taken_and_made_non_blocking() {
        let v = vring();
        let kick = eventfd(libc::EFD_CLOEXEC);
        let witness = kick.try_clone().unwrap();
        v.set_kick(Some(kick));
        assert!(v.get_ref().get_kick().is_some());
        // SAFETY: F_GETFL on our own descriptor.
        let flags = unsafe { libc::fcntl(witness.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        // Drained by someone else: no kick to read, still no error.
        assert!(!v.read_kick().unwrap(), "the ring is not enabled");
        v.set_call(Some(eventfd(libc::EFD_NONBLOCK)));
        assert!(v.get_ref().get_call().is_some());
    }

    #[test]
    fn a_pipe_is_no_eventfd() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: just created, owned by nothing else.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        assert!(matches!(
            check(&r, "kick"),
            Err(ConnectionFault::NotAnEventfd {
                kind: "a pipe or FIFO",
                ..
            })
        ));
        assert!(matches!(
            check(&w, "call"),
            Err(ConnectionFault::NotAnEventfd { .. })
        ));
        let f = tempfile_like();
        assert!(matches!(
            check(&f, "call"),
            Err(ConnectionFault::NotAnEventfd {
                kind: "a regular file",
                ..
            })
        ));
    }

    #[test]
    fn rings_past_the_end_of_memory_are_found() {
        use vm_memory::GuestMemoryMmap;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(64).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        assert!(rings_in_memory(&q, &mem));
        // The available ring starts in memory, 4 bytes before its end.
        q.set_avail_ring_address(Some(0xfffc), Some(0));
        assert!(!rings_in_memory(&q, &mem));
    }

    fn tempfile_like() -> File {
        // SAFETY: a valid C string; the descriptor is owned by the File.
        unsafe {
            File::from_raw_fd(libc::memfd_create(
                c"vring-test".as_ptr(),
                libc::MFD_CLOEXEC,
            ))
        }
    }
}
