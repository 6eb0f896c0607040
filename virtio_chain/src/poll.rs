//! Busy-polling a queue's available index for a short while after serving it, so that a
//! driver submitting its next request right after a completion is served without a
//! notification: no VM exit for the driver, no thread wake-up for the device. The device keeps
//! driver notifications suppressed while it polls and re-enables them before it sleeps.
//!
//! The window adapts ([`AdaptivePoll`], QEMU's `poll-grow`/`poll-shrink` rule): a driver that
//! comes back later than the configured maximum shrinks it, down to not polling at all, so a
//! slow, steady driver does not cost a spinning core; one that comes back within the maximum
//! grows it again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// How long a device polls after serving a queue unless configured otherwise: about one VM
/// round trip on the hosts measured (docs/performance.md), as QEMU's default `poll-max-ns`
/// (32 µs).
pub const DEFAULT_POLL: Duration = Duration::from_micros(32);

/// Smallest window [`AdaptivePoll`] grows to from zero (QEMU's initial 4 µs).
const GROW_FROM: Duration = Duration::from_micros(4);

/// A queue's polling window, adapted to how long the driver takes to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
}

impl AdaptivePoll {
    /// Starts at (and never grows past) `max`; a zero `max` never polls.
    pub fn new(max: Duration) -> Self {
        AdaptivePoll { max, window: max }
    }

    /// Whether this queue polls at all (a non-zero maximum).
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The driver made buffers available `idle` after the queue was last drained (found by
    /// polling, or by its notification after the device went to sleep). Within the window:
    /// nothing to change. Later than the maximum: polling would not have helped, halve the
    /// window (to zero below 1 µs). Between the two: a longer window would have caught it,
    /// double it (from 4 µs), up to the maximum.
    pub fn record(&mut self, idle: Duration) {
        if idle <= self.window {
            return;
        }
        if idle > self.max {
            self.window /= 2;
            if self.window < Duration::from_micros(1) {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max {
            self.window = if self.window.is_zero() {
                GROW_FROM
            } else {
                self.window * 2
            }
            .min(self.max);
        }
    }
}

/// Spins until the driver's available index at `avail_ring` (the guest address of the
/// available ring) differs from `next_avail` or `deadline` passes; whether it moved. A guest
/// memory error ends the spin with `false` (the next regular pass reports it).
pub fn spin_for_avail<M: GuestMemory + ?Sized>(
    mem: &M,
    avail_ring: GuestAddress,
    next_avail: u16,
    deadline: Instant,
) -> bool {
    // The index follows the le16 flags.
    let Some(idx_addr) = avail_ring.checked_add(2) else {
        return false;
    };
    let mut spins = 0u32;
    loop {
        match mem.load::<u16>(idx_addr, Ordering::Acquire) {
            Ok(idx) if u16::from_le(idx) != next_avail => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        // Reading the clock costs more than a load; look at it every few dozen spins.
        if spins.is_multiple_of(32) && Instant::now() >= deadline {
            return false;
        }
    }
}

/// After a queue was drained (driver notifications enabled): polls it for `window` with
/// notifications suppressed. Returns true when the driver made buffers available meanwhile
/// (notifications then stay suppressed: serve the queue again), false when it did not
/// (notifications are enabled again and nothing arrived in between: sleep until the next one).
///
/// # Errors
///
/// The queue's rings are not accessible.
pub fn poll_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    window: Duration,
) -> Result<bool, virtio_queue::Error> {
    queue.disable_notification(mem)?;
    if queue.event_idx_enabled() {
        // virtio-queue leaves `avail_event` alone when it disables notifications, and the
        // driver would still notify for the next buffer. One behind the next index to read
        // never matches: the driver notifies only once `enable_notification` sets it again.
        let addr = GuestAddress(queue.used_ring())
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::InvalidSize)?;
        let never = queue.next_avail().wrapping_sub(1).to_le();
        mem.store(never, addr, Ordering::Release)
            .map_err(virtio_queue::Error::GuestMemory)?;
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    let deadline = Instant::now() + window;
    if spin_for_avail(
        mem,
        GuestAddress(queue.avail_ring()),
        queue.next_avail(),
        deadline,
    ) {
        return Ok(true);
    }
    // True when buffers arrived between the last look and the re-enabling.
    queue.enable_notification(mem)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::testing::{Buf, TestDriver};

    #[test]
    fn the_window_shrinks_for_slow_drivers_and_grows_for_quick_ones() {
        let us = Duration::from_micros;
        let mut p = AdaptivePoll::new(us(32));
        assert_eq!(p.window(), us(32));
        // Caught by polling: no change.
        p.record(us(5));
        assert_eq!(p.window(), us(32));
        // A driver that comes back after 1 ms: halve, down to no polling at all.
        for want in [16, 8, 4, 2, 1, 0] {
            p.record(us(1000));
            assert_eq!(p.window(), us(want));
        }
        p.record(us(1000));
        assert_eq!(p.window(), Duration::ZERO);
        // It speeds up: 20 µs would have been caught by a longer window; grow back to the max.
        for want in [4, 8, 16, 32, 32] {
            p.record(us(20));
            assert_eq!(p.window(), us(want));
        }
        // Zero maximum: never polls.
        let mut off = AdaptivePoll::new(Duration::ZERO);
        assert!(!off.enabled() && p.enabled());
        off.record(us(1));
        assert_eq!(off.window(), Duration::ZERO);
    }

    #[test]
    fn with_event_idx_the_driver_is_told_not_to_notify_while_the_device_polls() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut driver = TestDriver::new(&mem, 16, 0x1000, 0x8000);
        let mut queue = driver.queue(true);
        let event_addr = GuestAddress(queue.used_ring() + 4 + 8 * 16);
        std::thread::scope(|s| {
            let mem = &mem;
            let driver_side = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                // What a driver reads before deciding to notify.
                let seen: u16 = mem.read_obj(event_addr).expect("avail_event");
                let addr = driver.alloc(64, 0);
                driver.add_chain(&[Buf::r(addr, 64)]);
                seen
            });
            assert!(poll_queue(&mut queue, mem, Duration::from_secs(10)).expect("poll"));
            // One behind next_avail (0): no index the driver publishes matches it.
            assert_eq!(driver_side.join().expect("driver"), u16::MAX);
        });
        // Nothing more comes: notifications are enabled again at the next index to read.
        let mut next = queue.next_avail();
        assert_eq!(next, 0);
        next += 1;
        queue.set_next_avail(next);
        assert!(!poll_queue(&mut queue, &mem, Duration::from_millis(2)).expect("poll"));
        let event: u16 = mem.read_obj(event_addr).expect("avail_event");
        assert_eq!(event, 1);
    }

    #[test]
    fn poll_sees_a_buffer_made_available_meanwhile_and_times_out_otherwise() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mut driver = TestDriver::new(&mem, 16, 0x1000, 0x8000);
        let mut queue = driver.queue(false);
        // Nothing arrives: the window passes, notifications come back on.
        let start = Instant::now();
        assert!(!poll_queue(&mut queue, &mem, Duration::from_millis(5)).expect("poll"));
        assert!(start.elapsed() >= Duration::from_millis(5));
        let flags: u16 = mem
            .read_obj(GuestAddress(queue.used_ring()))
            .expect("flags");
        assert_eq!(flags & 1, 0, "VIRTQ_USED_F_NO_NOTIFY left set");

        // A buffer made available while the device polls is seen well before the window ends,
        // with notifications still suppressed.
        std::thread::scope(|s| {
            let mem = &mem;
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let addr = driver.alloc(64, 0);
                driver.add_chain(&[Buf::r(addr, 64)]);
            });
            let start = Instant::now();
            assert!(poll_queue(&mut queue, mem, Duration::from_secs(10)).expect("poll"));
            assert!(start.elapsed() < Duration::from_secs(5));
            let flags: u16 = mem
                .read_obj(GuestAddress(queue.used_ring()))
                .expect("flags");
            assert_eq!(flags & 1, 1, "VIRTQ_USED_F_NO_NOTIFY not set while polling");
        });
    }
}
