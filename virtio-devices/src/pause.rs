//! Pausing a device thread where no request is half-served.
//!
//! A device thread sleeps in epoll; it adds [`PauseSwitch::fd`] to its set and, when that fd is
//! readable, calls [`PauseSwitch::park_if_asked`] between two requests. The controller's
//! [`PauseSwitch::pause`] returns once the thread is parked there; [`PauseSwitch::resume`] lets it
//! go on exactly where it stopped. Kicks and interrupts that arrive meanwhile stay in their
//! eventfds and are served after the resume, so none is lost.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How long [`PauseSwitch::pause`] waits for the thread before giving up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors pausing a device thread.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The thread did not reach a pause point in time (it is stuck in a request).
    #[error("{0}: the device thread did not pause in time")]
    Timeout(String),
    /// The thread could not be woken.
    #[error("{name}: cannot wake the device thread")]
    Wake {
        /// Thread name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// The controller asked; the thread has not parked yet.
    Requested,
    Parked,
    /// The thread must leave its loop (the device is being stopped).
    Exit,
}

/// The controller's and the thread's shared view of a pause.
#[derive(Debug)]
pub struct PauseSwitch {
    name: String,
    phase: Mutex<Phase>,
    changed: Condvar,
    wake: EventFd,
}

impl PauseSwitch {
    /// A switch for the thread called `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        Ok(Self {
            name: name.to_string(),
            phase: Mutex::new(Phase::Running),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The descriptor the thread adds to its epoll set (readable: call
    /// [`PauseSwitch::park_if_asked`]).
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Asks the thread to park and waits until it has.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.pause_within(PAUSE_TIMEOUT)
    }

    fn pause_within(&self, timeout: Duration) -> Result<(), PauseError> {
        let mut phase = self.phase();
        match *phase {
            Phase::Parked | Phase::Exit => return Ok(()),
            Phase::Running | Phase::Requested => *phase = Phase::Requested,
        }
        self.wake.write(1).map_err(|source| PauseError::Wake {
            name: self.name.clone(),
            source,
        })?;
        let deadline = Instant::now() + timeout;
        while *phase == Phase::Requested {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *phase = Phase::Running;
                return Err(PauseError::Timeout(self.name.clone()));
            }
            phase = self
                .changed
                .wait_timeout(phase, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets a parked thread go on (and cancels a pause it has not reached yet).
    pub fn resume(&self) {
        let mut phase = self.phase();
        if matches!(*phase, Phase::Parked | Phase::Requested) {
            *phase = Phase::Running;
            self.changed.notify_all();
        }
    }

    /// Makes the thread leave its loop: a parked thread wakes, a running one sees it at its next
    /// [`PauseSwitch::park_if_asked`].
    pub fn exit(&self) {
        *self.phase() = Phase::Exit;
        self.changed.notify_all();
        let _ = self.wake.write(1);
    }

    /// Thread side, when [`PauseSwitch::fd`] is readable: parks until resumed if a pause was
    /// asked for. Returns false when the thread must leave its loop instead.
    pub fn park_if_asked(&self) -> bool {
        let _ = self.wake.read();
        let mut phase = self.phase();
        if *phase == Phase::Requested {
            *phase = Phase::Parked;
            self.changed.notify_all();
            while *phase == Phase::Parked {
                phase = self.changed.wait(phase).unwrap_or_else(|p| p.into_inner());
            }
        }
        *phase != Phase::Exit
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A thread that counts "requests" until told to exit, checking the switch between them.
    fn counting_thread(
        switch: Arc<PauseSwitch>,
        count: Arc<AtomicU32>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || loop {
            count.fetch_add(1, Ordering::SeqCst);
            let mut fds = [libc::pollfd {
                fd: switch.fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd, 1 ms timeout.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1) };
            if ready == 1 && !switch.park_if_asked() {
                return;
            }
        })
    }

    #[test]
    fn a_paused_thread_makes_no_progress_until_resumed() {
        let switch = Arc::new(PauseSwitch::new("t").expect("switch"));
        let count = Arc::new(AtomicU32::new(0));
        let thread = counting_thread(switch.clone(), count.clone());
        std::thread::sleep(Duration::from_millis(20));
        switch.pause().expect("pause");
        let at_pause = count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            count.load(Ordering::SeqCst),
            at_pause,
            "progress while paused"
        );
        switch.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            count.load(Ordering::SeqCst) > at_pause,
            "no progress after resume"
        );
        switch.pause().expect("pause again");
        switch.exit();
        thread.join().expect("join");
    }

    #[test]
    fn a_thread_that_never_checks_times_out_and_stays_running() {
        let switch = PauseSwitch::new("stuck").expect("switch");
        let start = Instant::now();
        let e = switch
            .pause_within(Duration::from_millis(100))
            .expect_err("nobody parks");
        assert!(e.to_string().contains("stuck"), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(100));
        // A later park_if_asked does not park: the pause was called off.
        assert!(switch.park_if_asked());
    }
}
