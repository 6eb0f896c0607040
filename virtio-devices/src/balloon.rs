//! virtio-balloon (virtio 1.2 section 5.5): the host asks the guest for memory back by raising
//! the target (`num_pages`, a configuration change interrupt); the guest gives pages on the
//! inflate queue, which the host drops from its memory (`MADV_DONTNEED`, or `MADV_REMOVE` on
//! a memfd, where `DONTNEED` would keep the file's pages), takes them back on the deflate
//! queue (nothing to do: the next touch faults in a zero page), sends statistics on the stats
//! queue and, with free page reporting, hands free ranges to drop on the reporting queue.
//!
//! Every page number comes from the guest: a range outside guest RAM is counted and skipped,
//! never advised; the page lists are read in bounded chunks whatever their length.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_chain::queue::{add_used, QueueDrain};
use virtio_chain::{ChainError, QueueError, SgList};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config_change::ConfigChange;
use crate::pause::PauseError;
use crate::worker::{QueueHandler, WorkerSlot};
use crate::{
    device_type, ActivateError, Activation, ActiveQueue, GuestMemoryAtomic, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// `VIRTIO_BALLOON_F_STATS_VQ`.
pub const F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// `VIRTIO_BALLOON_F_REPORTING`.
pub const F_REPORTING: u64 = 1 << 5;
/// The balloon's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PAGE_SIZE: u64 = 4096;
const QUEUE_SIZE: u16 = 128;
/// Page numbers read from guest memory at a time.
const PFN_CHUNK: usize = 512;
/// Bytes of one statistic (le16 tag, le64 value).
const STAT_SIZE: usize = 10;
/// Statistics kept from one buffer at most (virtio 1.2 defines 11 tags).
const MAX_STATS: usize = 32;

/// Errors of the host's side of the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The target does not fit the device's 32-bit page count.
    #[error("balloon size {0} bytes is more than the device can ask for")]
    TooLarge(u64),
}

/// What a queue of the balloon is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The queue roles for the negotiated `features`: inflate and deflate, then the stats queue
/// and the reporting queue when negotiated (a queue whose feature is off takes no index).
fn roles(features: u64) -> Vec<Role> {
    let mut r = vec![Role::Inflate, Role::Deflate];
    if features & F_STATS_VQ != 0 {
        r.push(Role::Stats);
    }
    if features & F_REPORTING != 0 {
        r.push(Role::Reporting);
    }
    r
}

/// State shared between the device, its worker and the VMM ([`BalloonHandle`]).
#[derive(Debug, Default)]
struct Shared {
    /// `num_pages`: the target the host asks for.
    target: AtomicU32,
    /// `actual`: what the driver says it holds.
    actual: AtomicU32,
    /// Pages the guest inflated, deflated, and reported free; page numbers refused.
    inflated: AtomicU64,
    deflated: AtomicU64,
    reported_bytes: AtomicU64,
    refused: AtomicU64,
    /// The latest statistics (tag, value).
    stats: Mutex<Vec<(u16, u64)>>,
    /// How target changes reach the driver while the device runs.
    config: ConfigChange,
}

/// The VMM's hold on a balloon: change its target, read what the guest gave.
#[derive(Clone, Debug)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
    /// Written to ask the worker for fresh statistics.
    refresh: Arc<EventFd>,
}

impl BalloonHandle {
    /// Asks the guest for `bytes` (rounded down to pages), raising the configuration change
    /// interrupt when the driver is running.
    pub fn set_target(&self, bytes: u64) -> Result<(), BalloonError> {
        let pages = u32::try_from(bytes / PAGE_SIZE).map_err(|_| BalloonError::TooLarge(bytes))?;
        self.shared.target.store(pages, Ordering::SeqCst);
        self.shared.config.notify();
        Ok(())
    }

    /// The bytes the driver says the balloon holds (`actual`).
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.shared.actual.load(Ordering::SeqCst)) * PAGE_SIZE
    }

    /// Counters for `vm.counters`: pages inflated and deflated, bytes reported free, page
    /// numbers refused, the balloon's size, and the guest's latest statistics (`stat_<tag>`).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.shared;
        let mut c = vec![
            ("inflated_pages", s.inflated.load(Ordering::SeqCst)),
            ("deflated_pages", s.deflated.load(Ordering::SeqCst)),
            ("reported_bytes", s.reported_bytes.load(Ordering::SeqCst)),
            ("refused_pages", s.refused.load(Ordering::SeqCst)),
            ("actual_bytes", self.actual_bytes()),
        ];
        const NAMES: [&str; 11] = [
            "stat_swap_in",
            "stat_swap_out",
            "stat_major_faults",
            "stat_minor_faults",
            "stat_free_memory",
            "stat_total_memory",
            "stat_available_memory",
            "stat_disk_caches",
            "stat_hugetlb_allocations",
            "stat_hugetlb_failures",
            "stat_oom_kills",
        ];
        for &(tag, value) in s.stats.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(name) = NAMES.get(usize::from(tag)) {
                c.push((name, value));
            }
        }
        // Ask for newer statistics for the next reader (the driver answers when it can).
        let _ = self.refresh.write(1);
        c
    }
}

/// The balloon device.
#[derive(Debug)]
pub struct Balloon {
    features: u64,
    shared: Arc<Shared>,
    refresh: Arc<EventFd>,
    name: String,
    worker: WorkerSlot,
}

impl Balloon {
    /// A balloon asking for `size` bytes at first; `deflate_on_oom` and `reporting` choose the
    /// features offered; its thread is called `name`.
    pub fn new(
        size: u64,
        deflate_on_oom: bool,
        reporting: bool,
        name: String,
    ) -> std::io::Result<(Self, BalloonHandle)> {
        let mut features = VIRTIO_F_VERSION_1 | crate::VIRTIO_RING_F_EVENT_IDX | F_STATS_VQ;
        if deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        if reporting {
            features |= F_REPORTING;
        }
        let shared = Arc::new(Shared::default());
        let refresh = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let handle = BalloonHandle {
            shared: shared.clone(),
            refresh: refresh.clone(),
        };
        handle
            .set_target(size)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok((
            Self {
                features,
                shared,
                refresh,
                name,
                worker: WorkerSlot::default(),
            },
            handle,
        ))
    }
}

/// Outcome of serving a queue once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BalloonOutcome {
    /// Pages dropped from host memory.
    pub released_pages: u64,
    /// Pages taken back.
    pub deflated_pages: u64,
    /// Bytes of free ranges dropped.
    pub reported_bytes: u64,
    /// Page numbers (or ranges) outside guest RAM, or that the host could not drop.
    pub refused: u64,
    /// Chains returned with length 0 because they were malformed.
    pub malformed: u64,
}

/// Drops `[addr, addr + len)` of guest RAM from host memory. Refused (false) unless the whole
/// range lies inside one RAM region.
pub fn release<M: GuestMemoryBackend>(mem: &M, addr: u64, len: u64) -> bool {
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return false;
    };
    let Some(offset) = addr.checked_sub(region.start_addr().0) else {
        return false;
    };
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return false;
    }
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(offset)) else {
        return false;
    };
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    // Shared file pages stay in the file unless punched out.
    let advice = if region.file_offset().is_some() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: `host..host+len` lies inside this region's mapping (checked above); dropping its
    // pages only makes the guest's next access see zeros, which the guest asked for.
    let rc = unsafe { libc::madvise(host.cast(), len, advice) };
    rc == 0
}

/// Calls `f` with each run of consecutive page numbers in the readable part `list`, read in
/// bounded chunks; a trailing partial number is ignored.
fn for_each_run<M: GuestMemory>(
    list: &SgList,
    mem: &M,
    mut f: impl FnMut(u64, u64),
) -> Result<(), ChainError> {
    let mut cursor = list.cursor();
    let total = list.len() / 4;
    let mut run: Option<(u64, u64)> = None;
    let mut buf = [0u8; PFN_CHUNK * 4];
    let mut left = total;
    while left > 0 {
        let n = left.min(PFN_CHUNK as u64) as usize;
        cursor
            .read(mem, &mut buf[..n * 4])
            .map_err(|_| ChainError::MemoryAccess)?;
        left -= n as u64;
        for raw in buf[..n * 4].chunks_exact(4) {
            let pfn = u64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
            run = match run {
                Some((first, count)) if first + count == pfn => Some((first, count + 1)),
                Some((first, count)) => {
                    f(first, count);
                    Some((pfn, 1))
                }
                None => Some((pfn, 1)),
            };
        }
    }
    if let Some((first, count)) = run {
        f(first, count);
    }
    Ok(())
}

/// The queue logic of [`Balloon`] without its worker thread (for tests and the fuzz targets).
pub struct BalloonQueues {
    roles: Vec<Role>,
    shared: Arc<Shared>,
    refresh: Arc<EventFd>,
    /// The stats buffer the driver left with the device, answered when fresh stats are wanted.
    stats_head: Option<u16>,
}

impl std::fmt::Debug for BalloonQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonQueues")
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl BalloonQueues {
    /// Queue logic for a driver that negotiated `features` (the roles of the queues follow).
    pub fn new(features: u64) -> std::io::Result<Self> {
        Ok(Self {
            roles: roles(features),
            shared: Arc::default(),
            refresh: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            stats_head: None,
        })
    }

    /// Serves every available chain of `queue` (index `index`).
    pub fn serve_queue<M: GuestMemoryBackend>(
        &mut self,
        index: u16,
        queue: &mut virtio_queue::Queue,
        mem: &M,
    ) -> Result<(BalloonOutcome, bool), QueueError> {
        let role = self.roles.get(usize::from(index)).copied();
        let mut out = BalloonOutcome::default();
        let mut drain = QueueDrain::new(queue, mem, usize::MAX);
        while let Some(mut chain) = drain.next_chain()? {
            let head = chain.head_index();
            let parts = match virtio_chain::split(&mut chain) {
                Ok(p) => p,
                Err(_) => {
                    out.malformed += 1;
                    drain.complete(head, 0)?;
                    continue;
                }
            };
            match role {
                Some(Role::Inflate) => {
                    let r = for_each_run(&parts.readable, mem, |first, count| {
                        let ok = first
                            .checked_mul(PAGE_SIZE)
                            .is_some_and(|addr| release(mem, addr, count * PAGE_SIZE));
                        if ok {
                            out.released_pages += count;
                        } else {
                            out.refused += count;
                        }
                    });
                    if r.is_err() {
                        out.malformed += 1;
                    }
                }
                Some(Role::Deflate) => {
                    out.deflated_pages += parts.readable.len() / 4;
                }
                Some(Role::Stats) => {
                    let mut buf = [0u8; STAT_SIZE * MAX_STATS];
                    let len = (parts.readable.len() as usize).min(buf.len()) / STAT_SIZE;
                    if parts
                        .readable
                        .read_into(mem, &mut buf[..len * STAT_SIZE])
                        .is_ok()
                    {
                        let stats = buf[..len * STAT_SIZE]
                            .chunks_exact(STAT_SIZE)
                            .map(|s| {
                                let tag = u16::from_le_bytes([s[0], s[1]]);
                                let mut v = [0u8; 8];
                                v.copy_from_slice(&s[2..]);
                                (tag, u64::from_le_bytes(v))
                            })
                            .collect();
                        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
                    }
                    // Kept until fresh statistics are wanted; a buffer given twice replaces
                    // the older one, which goes back.
                    if let Some(old) = self.stats_head.replace(head) {
                        drain.complete(old, 0)?;
                    }
                    continue;
                }
                Some(Role::Reporting) => {
                    for &(addr, len) in parts.writable.segments() {
                        if release(mem, addr.0, u64::from(len)) {
                            out.reported_bytes += u64::from(len);
                        } else {
                            out.refused += 1;
                        }
                    }
                }
                None => out.malformed += 1,
            }
            drain.complete(head, 0)?;
        }
        let s = &self.shared;
        s.inflated.fetch_add(out.released_pages, Ordering::Relaxed);
        s.deflated.fetch_add(out.deflated_pages, Ordering::Relaxed);
        s.reported_bytes
            .fetch_add(out.reported_bytes, Ordering::Relaxed);
        s.refused.fetch_add(out.refused, Ordering::Relaxed);
        if out.refused > 0 || out.malformed > 0 {
            nimbus_log::warn_limited!(
                "virtio-balloon queue {index}: {} page(s) refused, {} malformed chain(s)",
                out.refused,
                out.malformed
            );
        }
        Ok((out, drain.finish()?.needs_notification))
    }
}

impl QueueHandler for BalloonQueues {
    type Error = QueueError;

    fn process(
        &mut self,
        q: &mut ActiveQueue,
        mem: &GuestMemoryAtomic,
    ) -> Result<bool, QueueError> {
        let mem = mem.memory();
        Ok(self.serve_queue(q.index, &mut q.queue, &*mem)?.1)
    }

    fn extra_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.refresh.as_raw_fd())
    }

    fn on_extra(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &GuestMemoryAtomic,
    ) -> Result<Vec<u16>, QueueError> {
        let _ = self.refresh.read();
        let Some(head) = self.stats_head.take() else {
            return Ok(Vec::new());
        };
        let Some(index) = self.roles.iter().position(|r| *r == Role::Stats) else {
            return Ok(Vec::new());
        };
        let Some(q) = queues.iter_mut().find(|q| usize::from(q.index) == index) else {
            return Ok(Vec::new());
        };
        let mem = mem.memory();
        add_used(&mut q.queue, &*mem, head, 0)?;
        Ok(vec![q.index])
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; roles(self.features).len()]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..4].copy_from_slice(&self.shared.target.load(Ordering::SeqCst).to_le_bytes());
        config[4..8].copy_from_slice(&self.shared.actual.load(Ordering::SeqCst).to_le_bytes());
        virtio_chain::read_config(&config, offset, data);
    }

    fn config_generation(&self) -> u8 {
        self.shared.config.generation()
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write; whole-field writes only.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.shared.actual.store(v, Ordering::SeqCst);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let roles = roles(a.features);
        if a.queues.len() != roles.len() {
            return Err(ActivateError::InvalidSetup(format!(
                "{} queues enabled, want {} for features {:#x}",
                a.queues.len(),
                roles.len(),
                a.features
            )));
        }
        self.shared.config.attach(a.interrupt.clone());
        let handler = BalloonQueues {
            roles,
            shared: self.shared.clone(),
            refresh: self.refresh.clone(),
            stats_head: None,
        };
        self.worker.start(&self.name, handler, a)
    }

    fn reset(&mut self) {
        self.shared.config.detach();
        self.worker.stop();
        self.shared.actual.store(0, Ordering::SeqCst);
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.pause()
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        BalloonHandle {
            shared: self.shared.clone(),
            refresh: self.refresh.clone(),
        }
        .counters()
    }
}

#[cfg(test)]
mod tests {
    use net_util::testing::{Buf, TestDriver};
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem")
    }

    fn pfns(list: &[u32]) -> Vec<u8> {
        list.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    fn active(driver: &TestDriver, index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: driver.queue(false),
            kick: EventFd::new(0).expect("eventfd"),
        }
    }

    #[test]
    fn inflate_drops_the_named_pages_and_refuses_the_rest() {
        let mem = mem();
        let mut driver = TestDriver::new(&mem, 16, 0, MIB);
        // Eight pages at 2 MiB hold data; the guest gives them, plus pages outside RAM.
        let data = 2 * MIB;
        mem.write_slice(&[0xaa; 8 * 4096], GuestAddress(data))
            .expect("fill");
        let mut list: Vec<u32> = (0..8).map(|i| (data / PAGE_SIZE) as u32 + i).collect();
        list.extend([0x10_0000, u32::MAX, (4 * MIB / PAGE_SIZE) as u32]);
        let bytes = pfns(&list);
        let addr = driver.alloc_data(&bytes);
        driver.add_chain(&[Buf::r(addr, bytes.len() as u32)]);
        let mut queues = BalloonQueues::new(VIRTIO_F_VERSION_1).expect("queues");
        let mut q = driver.queue(false);
        let (out, _) = queues.serve_queue(0, &mut q, &mem).expect("serve");
        assert_eq!(out.released_pages, 8);
        assert_eq!(out.refused, 3);
        let mut back = vec![0xffu8; 8 * 4096];
        mem.read_slice(&mut back, GuestAddress(data)).expect("read");
        assert!(back.iter().all(|&b| b == 0), "the pages were not dropped");
        assert_eq!(driver.take_used(), [(0, 0)]);
    }

    #[test]
    fn a_run_that_leaves_ram_is_refused_whole() {
        let mem = mem();
        // The last page of RAM and the one after it: one run, half outside.
        assert!(!release(&mem, 4 * MIB - 4096, 8192));
        assert!(release(&mem, 4 * MIB - 4096, 4096));
        assert!(!release(&mem, u64::MAX - 4095, 4096));
    }

    #[test]
    fn deflate_counts_stats_wait_for_a_refresh_and_reports_drop_ranges() {
        let mem = mem();
        let features = VIRTIO_F_VERSION_1 | F_STATS_VQ | F_REPORTING;
        let mut queues = BalloonQueues::new(features).expect("queues");
        let shared = queues.shared.clone();
        // Deflate: three pages back, nothing to do but count.
        let mut deflate = TestDriver::new(&mem, 16, 0, 0x4_0000);
        let list = deflate.alloc_data(&pfns(&[1, 2, 3]));
        deflate.add_chain(&[Buf::r(list, 12)]);
        let mut dq = active(&deflate, 1);
        let (out, _) = queues.serve_queue(1, &mut dq.queue, &mem).expect("deflate");
        assert_eq!(out.deflated_pages, 3);
        // Stats: two statistics, kept until a refresh is asked for.
        let mut stats = TestDriver::new(&mem, 16, 0x4_0000, 0x4_0000);
        let mut buf = Vec::new();
        for (tag, v) in [(4u16, 100u64 << 20), (5, 512 << 20)] {
            buf.extend(tag.to_le_bytes());
            buf.extend(v.to_le_bytes());
        }
        let b = stats.alloc_data(&buf);
        stats.add_chain(&[Buf::r(b, buf.len() as u32)]);
        let sq = active(&stats, 2);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mut all = vec![dq, sq];
        queues.process(&mut all[1], &atomic).expect("stats");
        assert!(
            stats.take_used().is_empty(),
            "the stats buffer went back at once"
        );
        assert_eq!(
            *shared.stats.lock().expect("stats"),
            [(4, 100 << 20), (5, 512 << 20)]
        );
        queues.refresh.write(1).expect("refresh");
        assert_eq!(queues.on_extra(&mut all, &atomic).expect("extra"), [2]);
        assert_eq!(stats.take_used().len(), 1);
        // Reporting: a free 1 MiB range is dropped; one outside RAM is refused.
        mem.write_slice(&[0x55; 4096], GuestAddress(3 * MIB))
            .expect("fill");
        let mut report = TestDriver::new(&mem, 16, 0x8_0000, 0x4_0000);
        report.add_chain(&[Buf::w(3 * MIB, MIB as u32)]);
        let mut rq = active(&report, 3);
        // An address outside RAM cannot even be split into a chain: it is malformed.
        report.add_chain(&[Buf::w(64 * MIB, 4096)]);
        let (out, _) = queues.serve_queue(3, &mut rq.queue, &mem).expect("report");
        assert_eq!(out.reported_bytes, MIB);
        assert_eq!(out.malformed, 1);
        let mut back = [0xffu8; 16];
        mem.read_slice(&mut back, GuestAddress(3 * MIB))
            .expect("read");
        assert_eq!(back, [0; 16]);
        assert_eq!(report.take_used().len(), 2);
    }

    #[test]
    fn target_config_and_actual() {
        let (mut dev, handle) =
            Balloon::new(8 * MIB, true, false, "__balloon".into()).expect("new");
        assert_eq!(dev.device_type(), 5);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert_ne!(dev.features() & F_DEFLATE_ON_OOM, 0);
        assert_eq!(dev.features() & F_REPORTING, 0);
        let mut c = [0u8; 8];
        dev.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 2048);
        handle.set_target(16 * MIB).expect("target");
        dev.read_config(0, &mut c[..4]);
        assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 4096);
        dev.write_config(4, &1024u32.to_le_bytes());
        dev.write_config(0, &1u32.to_le_bytes());
        assert_eq!(handle.actual_bytes(), 4 * MIB);
        dev.read_config(0, &mut c[..4]);
        assert_eq!(
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            4096,
            "num_pages is the host's"
        );
        assert!(handle.set_target(u64::MAX).is_err());
    }
}
