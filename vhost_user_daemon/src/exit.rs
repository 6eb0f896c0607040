//! The exit events of a backend's worker threads, and the reclaiming of the descriptors
//! vhost-user-backend 0.24 leaks ([`ExitEvents`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use log::{debug, warn};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// One worker's exit event: the crate polls the consumer, the daemon writes the notifier.
type ExitEvent = (EventConsumer, EventNotifier);

/// An exit event consumer handed to the crate: the descriptor number it got, and a duplicate
/// of the same eventfd to recognise that descriptor by later.
#[derive(Debug)]
struct HandedOut {
    fd: RawFd,
    keeper: EventConsumer,
}

/// The exit events of a backend's worker threads, one per thread, handed to the crate once
/// each ([`VhostUserBackend::exit_event`](vhost_user_backend::VhostUserBackend::exit_event)).
#[derive(Debug)]
pub struct ExitEvents {
    events: Mutex<Vec<Option<ExitEvent>>>,
    handed_out: Mutex<Vec<HandedOut>>,
}

impl ExitEvents {
    /// One exit event for each of `threads` worker threads.
    ///
    /// # Errors
    ///
    /// The index of the thread whose eventfd could not be created, and why.
    pub fn new(threads: usize) -> Result<Self, (usize, io::Error)> {
        let events = (0..threads)
            .map(|thread| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .map(Some)
                    .map_err(|source| (thread, source))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ExitEvents {
            events: Mutex::new(events),
            handed_out: Mutex::new(Vec::new()),
        })
    }

    /// The crate asks once per worker when the daemon is created; without an exit event a
    /// worker never ends and dropping the daemon (which joins the workers) hangs.
    pub fn take(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let taken = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(thread_index)
            .and_then(Option::take);
        // Asked twice, or for a thread that does not exist: make a new one if possible.
        let (consumer, notifier) = match taken {
            Some(event) => event,
            None => new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(|e| warn!("worker {thread_index}: cannot create an exit event: {e}"))
                .ok()?,
        };
        match consumer.try_clone() {
            Ok(keeper) => self
                .handed_out
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(HandedOut {
                    fd: consumer.as_raw_fd(),
                    keeper,
                }),
            // Only the descriptor's later reclaim is lost.
            Err(e) => debug!("worker {thread_index}: cannot duplicate the exit event: {e}"),
        }
        Some((consumer, notifier))
    }

    /// Closes the exit event descriptors handed to the crate. vhost-user-backend 0.24 turns
    /// each into a raw descriptor for its epoll and never closes it, so without this every
    /// connection of a `--keep-running` daemon leaks one descriptor per queue.
    ///
    /// A descriptor is closed only if it still refers to the eventfd handed out (checked with
    /// `kcmp`): one that the crate closed after all, its number since reused, is left alone.
    /// Returns how many were closed.
    ///
    /// # Safety
    ///
    /// The `VhostUserDaemon` that used these events must have been dropped, its worker threads
    /// joined: nothing may use the handed-out descriptors any more.
    pub unsafe fn close_orphaned(&self) -> usize {
        let handed_out = std::mem::take(
            &mut *self
                .handed_out
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut closed = 0;
        for h in handed_out {
            if same_open_file(h.fd, h.keeper.as_raw_fd()) {
                // SAFETY: `h.fd` is a descriptor this backend created and gave to the crate,
                // which dropped every user of it (the caller guarantees), and which still
                // refers to our eventfd, so it was not closed and reused for another file.
                // Taking ownership and dropping it closes it exactly once.
                drop(unsafe { OwnedFd::from_raw_fd(h.fd) });
                closed += 1;
            } else {
                debug!("exit event descriptor {} already closed", h.fd);
            }
        }
        closed
    }
}

/// Whether descriptors `a` and `b` of this process refer to the same open file description.
/// False if the kernel cannot tell (`kcmp` unavailable).
fn same_open_file(a: RawFd, b: RawFd) -> bool {
    /// `KCMP_FILE` from `<linux/kcmp.h>`.
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: getpid has no preconditions.
    let pid = libc::c_long::from(unsafe { libc::getpid() });
    // SAFETY: kcmp compares two descriptors of our own process; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    rc == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn orphaned_exit_events_are_closed_once() {
        let events = ExitEvents::new(2).unwrap();
        // What the crate does: keep the notifier, turn the consumer into a raw descriptor.
        let (c0, n0) = events.take(0).unwrap();
        let (c1, n1) = events.take(1).unwrap();
        let fd0 = c0.into_raw_fd();
        let fd1 = c1.into_raw_fd();
        // The test's own handle on fd0's eventfd, to recognise fd0 by afterwards: other tests'
        // threads may reuse the number as soon as it is closed.
        // SAFETY: fd0 is open (just handed out) and only borrowed to be duplicated.
        let witness = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd0) }
            .try_clone_to_owned()
            .unwrap();
        // The crate closed one after all: it must not be closed again.
        // SAFETY: fd1 came from into_raw_fd just above and is owned by nobody else.
        drop(unsafe { OwnedFd::from_raw_fd(fd1) });
        drop((n0, n1));
        // SAFETY: no daemon uses these events.
        assert_eq!(unsafe { events.close_orphaned() }, 1);
        assert!(
            !same_open_file(fd0, witness.as_raw_fd()),
            "fd0 still refers to the exit eventfd"
        );
        // SAFETY: as above.
        assert_eq!(unsafe { events.close_orphaned() }, 0, "nothing left");
    }
}
