//! The thread that serves a device's queues: it sleeps in epoll on the queues' kick eventfds
//! and a stop eventfd, and hands each kicked queue to the device's [`QueueHandler`].

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use nimbus_log::error_chain;
use virtio_chain::poll::{poll_queue, AdaptivePoll};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::pause::{PauseError, PauseSwitch};
use crate::{ActiveQueue, GuestMemoryAtomic, VirtioInterrupt};

/// Device logic for kicked queues.
pub trait QueueHandler: Send {
    /// What breaks the device: after an error the worker logs it (with its causes), sets
    /// DEVICE_NEEDS_RESET and stops.
    type Error: std::error::Error + Send + 'static;

    /// Processes queue `queue`; returns whether the driver must be interrupted.
    fn process(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, Self::Error>;

    /// The longest the worker busy-polls a queue after serving it before it sleeps again
    /// ([`virtio_chain::poll`]; the window adapts below it); zero (the default) never polls.
    fn poll_window(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// A descriptor besides the queue kicks whose readiness the handler wants (e.g. an input
    /// source). Level-triggered: the handler must consume what made it readable.
    fn extra_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// [`QueueHandler::extra_fd`] is readable; returns the indices of queues whose driver must
    /// be interrupted.
    fn on_extra(
        &mut self,
        _queues: &mut [ActiveQueue],
        _mem: &GuestMemoryAtomic,
    ) -> Result<Vec<u16>, Self::Error> {
        Ok(Vec::new())
    }
}

/// A device's worker while the driver runs it: what [`crate::VirtioDevice`]'s `activate`,
/// `reset`, `pause` and `resume` do with it, written once.
#[derive(Debug, Default)]
pub struct WorkerSlot(Option<Worker>);

impl WorkerSlot {
    /// Starts the worker for `activation` (replacing, so stopping, any earlier one).
    pub fn start<H: QueueHandler + 'static>(
        &mut self,
        name: &str,
        handler: H,
        activation: crate::Activation,
    ) -> Result<(), crate::ActivateError> {
        self.0 = Some(Worker::start(name, handler, activation)?);
        Ok(())
    }

    /// Holds `worker`, started by the device itself (replacing, so stopping, any earlier one).
    pub fn hold(&mut self, worker: Worker) {
        self.0 = Some(worker);
    }

    /// Stops and joins the worker, if any.
    pub fn stop(&mut self) {
        self.0 = None;
    }

    /// Parks the worker between two requests; nothing to park when none runs.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.0.as_ref().map_or(Ok(()), Worker::pause)
    }

    /// Lets a parked worker go on.
    pub fn resume(&self) {
        if let Some(w) = &self.0 {
            w.resume();
        }
    }
}

/// A running worker thread.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    pause: Arc<PauseSwitch>,
    handle: Option<JoinHandle<Vec<ActiveQueue>>>,
}

const STOP_TOKEN: u64 = u64::MAX;
const EXTRA_TOKEN: u64 = u64::MAX - 1;
const PAUSE_TOKEN: u64 = u64::MAX - 2;

impl Worker {
    /// Starts a thread named `name` of `class` serving `queues` with `handler`.
    pub fn spawn<H: QueueHandler + 'static>(
        class: nimbus_thread::ThreadClass,
        name: String,
        mut handler: H,
        mut queues: Vec<ActiveQueue>,
        mem: GuestMemoryAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, q) in queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        if let Some(fd) = handler.extra_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, EXTRA_TOKEN),
            )?;
        }
        let pause = Arc::new(PauseSwitch::new(&name)?);
        epoll.ctl(
            ControlOperation::Add,
            pause.fd(),
            EpollEvent::new(EventSet::IN, PAUSE_TOKEN),
        )?;
        let thread_pause = pause.clone();
        let stop_fd = stop.try_clone()?;
        let mut polls: Vec<QueuePoll> = queues
            .iter()
            .map(|_| QueuePoll {
                window: AdaptivePoll::new(handler.poll_window()),
                idle_since: None,
            })
            .collect();
        let handle = nimbus_thread::spawn(class, name.clone(), move || {
            // Buffers may already be waiting from before activation.
            for (q, poll) in queues.iter_mut().zip(polls.iter_mut()) {
                if !serve(&name, &mut handler, q, poll, &mem, interrupt.as_ref()) {
                    return queues;
                }
            }
            let mut events = vec![EpollEvent::default(); queues.len() + 3];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("{name}: epoll failed: {e}");
                        interrupt.needs_reset();
                        return queues;
                    }
                };
                for ev in &events[..n] {
                    let token = ev.data();
                    if token == STOP_TOKEN {
                        let _ = stop_fd.read();
                        return queues;
                    }
                    if token == PAUSE_TOKEN {
                        if !thread_pause.park_if_asked() {
                            return queues;
                        }
                        // Events gathered before the pause may be stale: wait again.
                        break;
                    }
                    if token == EXTRA_TOKEN {
                        match handler.on_extra(&mut queues, &mem) {
                            Ok(signal) => {
                                signal.into_iter().for_each(|q| interrupt.signal_queue(q))
                            }
                            Err(e) => {
                                log::error!("{name}: {}; device needs reset", error_chain(&e));
                                interrupt.needs_reset();
                                return queues;
                            }
                        }
                        continue;
                    }
                    let (Some(q), Some(poll)) = (
                        queues.get_mut(token as usize),
                        polls.get_mut(token as usize),
                    ) else {
                        continue;
                    };
                    let _ = q.kick.read();
                    if !serve(&name, &mut handler, q, poll, &mem, interrupt.as_ref()) {
                        return queues;
                    }
                }
            }
        })?;
        Ok(Self {
            stop,
            pause,
            handle: Some(handle),
        })
    }

    /// Parks the thread between two requests (see [`crate::pause`]).
    pub fn pause(&self) -> Result<(), PauseError> {
        self.pause.pause()
    }

    /// Lets a paused thread go on.
    pub fn resume(&self) {
        self.pause.resume();
    }

    /// Starts a device's worker for `activation`: the usual body of [`VirtioDevice::activate`].
    ///
    /// [`VirtioDevice::activate`]: crate::VirtioDevice::activate
    pub fn start<H: QueueHandler + 'static>(
        name: &str,
        handler: H,
        activation: crate::Activation,
    ) -> Result<Self, crate::ActivateError> {
        Self::spawn(
            nimbus_thread::ThreadClass::DeviceWorker,
            name.to_string(),
            handler,
            activation.queues,
            activation.mem,
            activation.interrupt,
        )
        .map_err(crate::ActivateError::Resource)
    }

    /// Stops the thread and returns the queues it served.
    pub fn stop(mut self) -> Vec<ActiveQueue> {
        self.join()
    }

    fn join(&mut self) -> Vec<ActiveQueue> {
        self.pause.exit();
        let _ = self.stop.write(1);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(queues)) => queues,
            Some(Err(_)) => {
                log::error!("virtio worker thread panicked");
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.join();
        }
    }
}

/// Serve-and-poll rounds in a row before the worker goes back to its epoll (where it sees a
/// stop request), kicking itself to resume: a driver that keeps a polled queue busy cannot
/// keep the worker from stopping.
const MAX_POLL_ROUNDS: u32 = 1024;

/// A queue's polling state in the worker.
struct QueuePoll {
    window: AdaptivePoll,
    /// When the queue was last drained and the worker went to sleep on it.
    idle_since: Option<Instant>,
}

/// Runs the handler on one queue, then, if the handler polls, serves the queue again as long
/// as the driver makes buffers available within the poll window; false when the device is
/// now broken.
fn serve<H: QueueHandler>(
    name: &str,
    handler: &mut H,
    q: &mut ActiveQueue,
    poll: &mut QueuePoll,
    mem: &GuestMemoryAtomic,
    interrupt: &dyn VirtioInterrupt,
) -> bool {
    // Woken by the driver's notification: how long it took to come back adapts the window.
    if let Some(since) = poll.idle_since.take() {
        poll.window.record(since.elapsed());
    }
    for _ in 0..MAX_POLL_ROUNDS {
        match handler.process(q, mem) {
            Ok(true) => interrupt.signal_queue(q.index),
            Ok(false) => {}
            Err(e) => {
                log::error!(
                    "{name}: queue {}: {}; device needs reset",
                    q.index,
                    error_chain(&e)
                );
                interrupt.needs_reset();
                return false;
            }
        }
        if !poll.window.enabled() {
            return true;
        }
        let window = poll.window.window();
        let drained = Instant::now();
        use vm_memory::GuestAddressSpace;
        // A broken ring reports at the next regular pass.
        if window.is_zero() || !poll_queue(&mut q.queue, &*mem.memory(), window).unwrap_or(false) {
            poll.idle_since = Some(drained);
            return true;
        }
        poll.window.record(drained.elapsed());
    }
    // Buffers are waiting with notifications suppressed: come back after the epoll round.
    let _ = q.kick.write(1);
    true
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    #[derive(Debug, Default)]
    struct NoInterrupt;
    impl VirtioInterrupt for NoInterrupt {
        fn signal_queue(&self, _queue: u16) {}
        fn signal_config(&self) {}
        fn needs_reset(&self) {}
    }

    /// Counts how often the queue is served.
    struct Counting(Arc<AtomicU32>);
    impl QueueHandler for Counting {
        type Error = std::convert::Infallible;

        fn process(
            &mut self,
            _q: &mut ActiveQueue,
            _mem: &GuestMemoryAtomic,
        ) -> Result<bool, Self::Error> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(false)
        }
    }

    fn wait_for(count: &AtomicU32, want: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count.load(Ordering::SeqCst) < want {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn a_paused_worker_serves_kicks_only_after_resume() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("mem");
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let queue = ActiveQueue {
            index: 0,
            queue: <virtio_queue::Queue as virtio_queue::QueueT>::new(16).expect("queue"),
            kick: kick.try_clone().expect("clone"),
        };
        let served = Arc::new(AtomicU32::new(0));
        let worker = Worker::spawn(
            nimbus_thread::ThreadClass::DeviceWorker,
            "test_worker".into(),
            Counting(served.clone()),
            vec![queue],
            GuestMemoryAtomic::new(mem),
            Arc::new(NoInterrupt),
        )
        .expect("spawn");
        // Served once at start (buffers may wait from before activation), once per kick.
        assert!(wait_for(&served, 1));
        kick.write(1).expect("kick");
        assert!(wait_for(&served, 2));
        worker.pause().expect("pause");
        kick.write(1).expect("kick while paused");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(served.load(Ordering::SeqCst), 2, "served while paused");
        worker.resume();
        assert!(wait_for(&served, 3), "the kick made while paused was lost");
        // Stopping a paused worker does not hang.
        worker.pause().expect("pause");
        assert_eq!(worker.stop().len(), 1);
    }
}
