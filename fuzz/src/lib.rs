//! What the fuzz targets share: a reader for structured values in the fuzzer's bytes
//! ([`Reader`]), split virtqueues laid out in guest memory from an input ([`QueueInput`]), an
//! in-memory TAP queue ([`MemTap`]), fakes for the seams of the PCI and virtio transport
//! ([`Vectors`], [`IoEvents`], [`Interrupts`], [`Dummy`]), and descriptor passing over Unix
//! sockets ([`Records`], [`memfd`], [`send_with_fds`]).
//!
//! Nothing here parses what the targets test: each target hands the bytes to the crate's own
//! code and checks what comes out. The binary seed inputs in `fuzz/corpus/` are written by
//! `fuzz/seeds.py`, which follows the formats described here.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pci::{MsiMessage, MsiVectors};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Reads little-endian values from the front of the fuzzer's bytes; past the end everything
/// reads as zero, so every input decodes.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_le_bytes(b)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.bytes(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(b)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let s = self.bytes(8);
        b[..s.len()].copy_from_slice(s);
        u64::from_le_bytes(b)
    }

    /// A length-prefixed (u16) piece.
    pub fn piece(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }
}

/// Guest memory of the queue targets: one region from 0.
pub const QUEUE_MEM_SIZE: u64 = 0x10000;

/// Where the rings of a queue of `size` entries are: the descriptor table at 0, the available
/// ring right after it, the used ring after that (4-byte aligned). Buffers may be anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl RingLayout {
    /// The layout for a queue of `size` entries.
    pub fn new(size: u16) -> Self {
        let desc = 0;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            size,
            desc,
            avail,
            used,
        }
    }
}

/// A queue target's input: a 6-byte header, then a guest memory image, then the rest.
///
/// | bytes | meaning |
/// | --- | --- |
/// | 0 | queue size: `1 << (b % 9)` (1 to 256) |
/// | 1 | flags: bit 0 `EVENT_IDX`; the other bits are the target's |
/// | 2 | the target's budget (chains per call) |
/// | 3 | a byte for the target |
/// | 4..6 | length of the image (u16) |
/// | 6.. | the image: guest memory from address 0 (rings as in [`RingLayout`], buffers) |
/// | then | the rest: the target's (packets for the receive queue, ...) |
#[derive(Debug)]
pub struct QueueInput<'a> {
    /// Guest memory with the image in it.
    pub mem: GuestMemoryMmap,
    /// Where the rings are.
    pub layout: RingLayout,
    /// Header byte 1.
    pub flags: u8,
    /// Header byte 2.
    pub budget: u8,
    /// Header byte 3.
    pub extra: u8,
    /// What follows the image.
    pub rest: Reader<'a>,
}

impl<'a> QueueInput<'a> {
    /// Decodes `data` and writes the image into fresh guest memory.
    ///
    /// # Panics
    ///
    /// If guest memory cannot be created (not the input's fault).
    pub fn new(data: &'a [u8]) -> Self {
        let mut r = Reader::new(data);
        let size = 1u16 << (r.u8() % 9);
        let flags = r.u8();
        let budget = r.u8();
        let extra = r.u8();
        let image_len = usize::from(r.u16());
        let image = r.bytes(image_len);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), QUEUE_MEM_SIZE as usize)])
            .expect("guest memory");
        mem.write_slice(image, GuestAddress(0))
            .expect("the image fits guest memory");
        let layout = RingLayout::new(size);
        // The used ring is the device's: it starts empty, whatever the image says.
        mem.write_slice(&[0u8; 4], GuestAddress(layout.used))
            .expect("the used ring is in guest memory");
        QueueInput {
            mem,
            layout,
            flags,
            budget,
            extra,
            rest: r,
        }
    }

    /// The queue as a transport hands it over after the driver enabled it.
    ///
    /// # Panics
    ///
    /// If the layout is not valid (a bug in [`RingLayout`]).
    pub fn queue(&self) -> Queue {
        let l = self.layout;
        let mut q = Queue::new(256).expect("queue");
        q.set_size(l.size);
        q.set_desc_table_address(Some(l.desc as u32), Some(0));
        q.set_avail_ring_address(Some(l.avail as u32), Some(0));
        q.set_used_ring_address(Some(l.used as u32), Some(0));
        q.set_event_idx(self.flags & 1 != 0);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem), "ring layout {l:?} not valid");
        q
    }

    /// The used ring's entries `(head, len)` the device wrote (from index 0, as a device
    /// starting from reset does). Only meaningful for a device that writes no buffer: a
    /// driver may place buffers over the used ring.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let l = self.layout;
        let mut idx = [0u8; 2];
        let _ = self.mem.read_slice(&mut idx, GuestAddress(l.used + 2));
        let idx = u16::from_le_bytes(idx);
        (0..idx.min(l.size))
            .map(|i| {
                let mut e = [0u8; 8];
                let _ = self
                    .mem
                    .read_slice(&mut e, GuestAddress(l.used + 4 + 8 * u64::from(i)));
                (
                    u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect()
    }
}

/// Device-readable and device-writable byte counts of a chain, as its descriptors say (walked
/// on a copy, by `virtio_queue`'s own iterator).
pub fn chain_lengths<M>(chain: &DescriptorChain<M>) -> (u64, u64)
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mut readable = 0u64;
    let mut writable = 0u64;
    for d in chain.clone() {
        if d.is_write_only() {
            writable += u64::from(d.len());
        } else {
            readable += u64::from(d.len());
        }
    }
    (readable, writable)
}

/// A TAP queue in memory: packets to hand to the receive path, and what the transmit path
/// wrote.
#[derive(Debug)]
pub struct MemTap {
    rx: Mutex<VecDeque<Vec<u8>>>,
    /// Packets written, in order.
    pub tx: Mutex<Vec<Vec<u8>>>,
    fd: EventFd,
}

impl MemTap {
    /// A TAP that will hand out `packets`, then `WouldBlock`.
    ///
    /// # Panics
    ///
    /// If an eventfd cannot be created.
    pub fn new(packets: Vec<Vec<u8>>) -> Self {
        Self {
            rx: Mutex::new(packets.into()),
            tx: Mutex::new(Vec::new()),
            fd: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Packets not read yet.
    pub fn unread(&self) -> usize {
        self.rx.lock().map(|r| r.len()).unwrap_or(0)
    }
}

impl AsRawFd for MemTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl net_util::TapQueue for MemTap {
    fn if_name(&self) -> &str {
        "fuzz0"
    }

    fn read_packet(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let Some(packet) = self.rx.lock().ok().and_then(|mut r| r.pop_front()) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // As a TAP does: the packet is cut at the buffers' end.
        let mut done = 0;
        for b in bufs.iter_mut() {
            let n = (packet.len() - done).min(b.len());
            b[..n].copy_from_slice(&packet[done..done + n]);
            done += n;
        }
        Ok(done)
    }

    fn write_packet(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let packet: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let n = packet.len();
        if let Ok(mut tx) = self.tx.lock() {
            tx.push(packet);
        }
        Ok(n)
    }

    fn set_vnet_hdr_size(&self, _size: usize) -> Result<(), net_util::NetError> {
        Ok(())
    }

    fn set_offload(&self, _flags: u32) -> Result<(), net_util::NetError> {
        Ok(())
    }

    fn set_queue_enabled(&self, _enabled: bool) -> Result<(), net_util::NetError> {
        Ok(())
    }
}

/// MSI-X delivery that records what the device sent.
#[derive(Debug, Default)]
pub struct Vectors {
    /// Route updates.
    pub updates: AtomicUsize,
    /// Vectors triggered, in order.
    pub triggered: Mutex<Vec<u16>>,
}

impl MsiVectors for Vectors {
    fn update(&self, _vector: u16, _msg: MsiMessage, _enabled: bool) -> io::Result<()> {
        self.updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        if let Ok(mut t) = self.triggered.lock() {
            t.push(vector);
        }
        Ok(())
    }
}

/// Ioeventfd registration as KVM does it (an address another descriptor holds is refused),
/// checking the transport's bookkeeping: a descriptor is never registered twice at one
/// address, and only what was registered (or refused) is unregistered.
#[derive(Debug, Default)]
pub struct IoEvents {
    registered: Mutex<Vec<(RawFd, u64)>>,
    refused: Mutex<Vec<(RawFd, u64)>>,
}

impl IoEvents {
    /// Addresses registered now.
    pub fn addresses(&self) -> Vec<u64> {
        lock(&self.registered).iter().map(|r| r.1).collect()
    }
}

impl virtio_devices::transport::IoEventRegistrar for IoEvents {
    fn register(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        let key = (fd.as_raw_fd(), addr);
        let mut r = lock(&self.registered);
        assert!(!r.contains(&key), "ioeventfd {key:?} registered twice");
        if r.iter().any(|&(_, a)| a == addr) {
            lock(&self.refused).push(key);
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        r.push(key);
        Ok(())
    }

    fn unregister(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        let key = (fd.as_raw_fd(), addr);
        let mut r = lock(&self.registered);
        if let Some(i) = r.iter().position(|&k| k == key) {
            r.swap_remove(i);
            return Ok(());
        }
        let mut refused = lock(&self.refused);
        let i = refused.iter().position(|&k| k == key);
        let i = i.unwrap_or_else(|| panic!("ioeventfd {key:?} unregistered, never registered"));
        refused.swap_remove(i);
        Err(io::Error::from_raw_os_error(libc::ENOENT))
    }
}

/// Interrupts towards the driver, counted.
#[derive(Debug, Default)]
pub struct Interrupts {
    /// Queue interrupts.
    pub queue: AtomicUsize,
    /// Configuration interrupts.
    pub config: AtomicUsize,
    /// `needs_reset` calls.
    pub needs_reset: AtomicUsize,
}

impl virtio_devices::VirtioInterrupt for Interrupts {
    fn signal_queue(&self, _queue: u16) {
        self.queue.fetch_add(1, Ordering::Relaxed);
    }

    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::Relaxed);
    }

    fn needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a [`Dummy`] device shares with the harness.
#[derive(Debug, Default)]
pub struct DummyState {
    /// Activations seen.
    pub activations: AtomicUsize,
    /// The interrupt of the running device, for the harness to raise.
    pub interrupt: Mutex<Option<Arc<dyn virtio_devices::VirtioInterrupt>>>,
}

impl DummyState {
    /// Raises the queue `queue` interrupt (or the configuration one for `None`) if the device
    /// runs.
    pub fn signal(&self, queue: Option<u16>) {
        let Some(i) = self.interrupt.lock().ok().and_then(|i| i.clone()) else {
            return;
        };
        match queue {
            Some(q) => i.signal_queue(q),
            None => i.signal_config(),
        }
    }
}

/// A virtio device without a data path, for the transport targets: two queues, a 16-byte
/// writable configuration space whose first byte is an id, and checks on what the transport
/// hands it at activation.
#[derive(Debug)]
pub struct Dummy {
    config: [u8; 16],
    state: Arc<DummyState>,
    active: bool,
}

/// Feature bits [`Dummy`] offers: VERSION_1, EVENT_IDX, INDIRECT_DESC and device bit 0.
pub const DUMMY_FEATURES: u64 = virtio_devices::VIRTIO_F_VERSION_1
    | virtio_devices::VIRTIO_RING_F_EVENT_IDX
    | virtio_devices::VIRTIO_RING_F_INDIRECT_DESC
    | 1;

impl Dummy {
    /// A dummy device whose configuration space starts with `id`.
    pub fn new(id: u8, state: Arc<DummyState>) -> Self {
        let mut config = [0; 16];
        config[0] = id;
        Self {
            config,
            state,
            active: false,
        }
    }
}

impl virtio_devices::VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        virtio_devices::device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 256]
    }

    fn features(&self) -> u64 {
        DUMMY_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio_chain::read_config(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The id stays.
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = offset
                .checked_add(i)
                .filter(|&o| o > 0)
                .and_then(|o| self.config.get_mut(o))
            {
                *c = *b;
            }
        }
    }

    fn activate(
        &mut self,
        a: virtio_devices::Activation,
    ) -> Result<(), virtio_devices::ActivateError> {
        // What the transport promises a device: accepted features within the offer and with
        // VERSION_1, each queue valid in guest memory with a power-of-two size, indices
        // distinct.
        assert!(!self.active, "activated twice without a reset");
        assert_eq!(a.features & !DUMMY_FEATURES, 0, "features beyond the offer");
        assert_ne!(a.features & virtio_devices::VIRTIO_F_VERSION_1, 0);
        let mem = vm_memory::GuestAddressSpace::memory(&a.mem);
        let mut seen = Vec::new();
        for q in &a.queues {
            assert!(
                q.queue.is_valid(&*mem),
                "invalid queue {} activated",
                q.index
            );
            assert!(q.queue.size().is_power_of_two());
            assert!(!seen.contains(&q.index));
            seen.push(q.index);
        }
        self.active = true;
        self.state.activations.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut i) = self.state.interrupt.lock() {
            *i = Some(a.interrupt);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
        if let Ok(mut i) = self.state.interrupt.lock() {
            *i = None;
        }
    }

    fn pause(&mut self) -> Result<(), virtio_devices::pause::PauseError> {
        Ok(())
    }

    fn resume(&mut self) {}
}

/// Where the [`PciSetup`] puts ECAM, as the VMM does.
pub const ECAM_START: u64 = 0xe000_0000;
/// Its size.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// Where it puts PCI segment 1's ECAM area (one bus), as the VMM does.
pub const ECAM1_START: u64 = 0xf000_0000;
/// Its size.
pub const ECAM1_SIZE: u64 = 0x10_0000;
/// Initial BAR 0 of the device in slot `n` (1, 2): `BAR_BASE + (n - 1) * BAR0_SIZE`.
pub const BAR_BASE: u64 = 0xc000_0000;

/// Two PCI segments as the VMM builds them (`--platform num_pci_segments=2`): segment 0's bus
/// with the host bridge and a virtio-pci device ([`Dummy`]) in slot 1, behind ECAM and the 0xcf8
/// ports, and segment 1's bus with its host bridge and a device in slot 2, behind its own ECAM
/// area only; both BAR 0s placed (not decoding until the driver sets COMMAND.MEMORY); guest
/// memory of [`QUEUE_MEM_SIZE`].
pub struct PciSetup {
    /// The MMIO bus (ECAM and the BARs).
    pub mmio: Arc<devices::Bus>,
    /// Segment 0's bus.
    pub pci: Arc<Mutex<pci::PciBus>>,
    /// Segment 1's bus.
    pub pci1: Arc<Mutex<pci::PciBus>>,
    /// 0xcf8..0xd00.
    pub cf8: pci::PciConfigIo,
    /// The devices in slot 1 (segment 0) and slot 2 (segment 1).
    pub devices: Vec<Arc<Mutex<virtio_devices::transport::VirtioPciDevice>>>,
    /// Their MSI-X deliveries.
    pub vectors: Vec<Arc<Vectors>>,
    /// Their state.
    pub states: Vec<Arc<DummyState>>,
    /// Ioeventfds registered.
    pub ioevents: Arc<IoEvents>,
}

impl std::fmt::Debug for PciSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciSetup").finish_non_exhaustive()
    }
}

/// Locks `m`, whatever an earlier holder did.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciSetup {
    /// Builds the bus; `control` puts activations and resets behind
    /// `VirtioPciDevice::run_pending`, as the VMM does.
    ///
    /// # Panics
    ///
    /// If the setup itself fails.
    pub fn new(control: Option<Arc<dyn virtio_devices::transport::DeviceControl>>) -> Self {
        let mem = vm_memory::GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), QUEUE_MEM_SIZE as usize)])
                .expect("guest memory"),
        );
        let mmio = Arc::new(devices::Bus::new());
        let mapper = Arc::new(pci::MmioBarMapper::new(&mmio));
        let pci = Arc::new(Mutex::new(pci::PciBus::new(mapper.clone())));
        let pci1 = Arc::new(Mutex::new(pci::PciBus::new(mapper)));
        for (bus, peer, start, size) in [
            (&pci, &pci1, ECAM_START, ECAM_SIZE),
            (&pci1, &pci, ECAM1_START, ECAM1_SIZE),
        ] {
            mmio.insert(
                Arc::new(Mutex::new(
                    pci::PciEcam::new(bus.clone()).with_peers(vec![peer.clone()]),
                )),
                start,
                size,
            )
            .expect("ECAM");
        }
        let cf8 = pci::PciConfigIo::new(pci.clone()).with_peers(vec![pci1.clone()]);
        let ioevents = Arc::new(IoEvents::default());
        let mut setup = PciSetup {
            mmio,
            pci,
            pci1,
            cf8,
            devices: Vec::new(),
            vectors: Vec::new(),
            states: Vec::new(),
            ioevents,
        };
        for slot in 1..=2u8 {
            let state = Arc::new(DummyState::default());
            let vectors = Arc::new(Vectors::default());
            let bar0 = BAR_BASE + u64::from(slot - 1) * virtio_devices::transport::BAR0_SIZE;
            let mut dev = virtio_devices::transport::VirtioPciDevice::new(
                Box::new(Dummy::new(slot, state.clone())),
                bar0,
                vectors.clone(),
                setup.ioevents.clone(),
                mem.clone(),
            )
            .expect("virtio-pci device");
            if let Some(c) = &control {
                dev = dev.with_control(c.clone());
            }
            let dev = Arc::new(Mutex::new(dev));
            let shared: pci::SharedPciDevice = dev.clone();
            let bus = if slot == 1 { &setup.pci } else { &setup.pci1 };
            let got = lock(bus).add_device(shared, Some(slot)).expect("slot");
            assert_eq!(got, slot);
            setup.devices.push(dev);
            setup.vectors.push(vectors);
            setup.states.push(state);
        }
        setup
    }

    /// Checks that both ECAM areas are still on the MMIO bus and each device's decoded BAR 0
    /// reaches that device, unless it overlaps the other device's decoded BAR or an ECAM area
    /// (then the guest's placement was refused).
    ///
    /// # Panics
    ///
    /// When it does not.
    pub fn check_bars(&self) {
        use pci::PciDevice;
        for start in [ECAM_START, ECAM1_START] {
            assert!(
                self.mmio.read(start, &mut [0u8; 4]),
                "ECAM at {start:#x} is no longer on the MMIO bus"
            );
        }
        let bars: Vec<Option<(u64, u64)>> = self
            .devices
            .iter()
            .map(|d| {
                lock(d)
                    .decoded_bars()
                    .first()
                    .map(|&(_, addr, size)| (addr, size))
            })
            .collect();
        let overlaps = |a: (u64, u64), b: (u64, u64)| {
            a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
        };
        for (i, bar) in bars.iter().enumerate() {
            let Some(bar) = *bar else {
                continue;
            };
            let contested = overlaps(bar, (ECAM_START, ECAM_SIZE))
                || overlaps(bar, (ECAM1_START, ECAM1_SIZE))
                || bar.0.checked_add(bar.1).is_none()
                || bars
                    .iter()
                    .enumerate()
                    .any(|(j, other)| j != i && other.is_some_and(|o| overlaps(bar, o)));
            if contested {
                continue;
            }
            // The device configuration space starts with the device's id (its slot).
            let mut id = [0u8; 1];
            assert!(
                self.mmio.read(bar.0 + 0x2000, &mut id),
                "BAR 0 of slot {} decodes at {:#x} but nothing is mapped there",
                i + 1,
                bar.0
            );
            assert_eq!(
                usize::from(id[0]),
                i + 1,
                "BAR 0 of slot {} at {:#x} reaches another device",
                i + 1,
                bar.0
            );
        }
    }
}

/// A memfd of `size` bytes.
///
/// # Panics
///
/// If it cannot be created.
pub fn memfd(name: &std::ffi::CStr, size: u64) -> File {
    // SAFETY: `name` is a valid C string; the descriptor returned is checked and owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("memfd size");
    file
}

/// Sends `bytes` on `sock` with `fds` attached (`SCM_RIGHTS`), in one `sendmsg`.
///
/// # Errors
///
/// The `sendmsg` error.
pub fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is `space` bytes, room for one header and `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A stream of socket messages from the fuzzer's bytes, each sent with one `sendmsg`:
/// `[fds: u8][len: u16][len bytes]`; `fds % 4` descriptors are attached (the caller says
/// which). At most [`Records::MAX`] records are taken, so that replies never fill the socket.
#[derive(Debug)]
pub struct Records<'a> {
    r: Reader<'a>,
    taken: usize,
}

impl<'a> Records<'a> {
    /// Records taken from one input at most.
    pub const MAX: usize = 48;

    /// The records in `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            r: Reader::new(data),
            taken: 0,
        }
    }
}

impl<'a> Iterator for Records<'a> {
    /// (descriptors to attach, bytes)
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.r.is_empty() || self.taken >= Self::MAX {
            return None;
        }
        self.taken += 1;
        let fds = usize::from(self.r.u8() % 4);
        Some((fds, self.r.piece()))
    }
}

/// Checks what must hold for any configuration a parser accepted: it survives a JSON round
/// trip (vm.info shows it, a restore reads it back), and once valid and named, its device ids
/// are distinct and it is still valid.
///
/// # Panics
///
/// When it does not.
pub fn check_vm_config(config: &vm_config::VmConfig) {
    // Descriptor numbers are written out but never read back from JSON (they come with
    // SCM_RIGHTS): compare without them.
    let mut config = config.clone();
    for n in config.net.iter_mut().flatten() {
        n.fds = None;
    }
    let config = &config;
    round_trip(config);
    if config.validate().is_ok() {
        let mut named = config.clone();
        named.name_devices();
        let ids: Vec<String> = named.device_ids().collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(ids.len(), unique.len(), "duplicate device ids {ids:?}");
        if let Err(e) = named.validate() {
            panic!("valid before naming its devices, invalid after: {e}");
        }
        round_trip(&named);
    }
}

/// Checks that `value` survives a JSON round trip.
///
/// # Panics
///
/// When it does not.
pub fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_string(value).expect("serializes");
    let back: T = match serde_json::from_str(&json) {
        Ok(b) => b,
        Err(e) => panic!("{json} does not parse back: {e}"),
    };
    assert_eq!(&back, value, "JSON round trip through {json}");
}

/// How long a frontend waits for a device's call, at most once per input.
pub const WAIT_FOR_CALL_MS: i32 = 2;

/// Guest memory the frontend targets share with a backend: a memfd of [`SHARED_MEM_SIZE`].
pub const SHARED_MEM_SIZE: u64 = 0x10_0000;

/// The descriptors a record of [`Records`] can attach: a memfd (guest memory, or an area a
/// reply hands over) and eventfds (kick, call, error).
#[derive(Debug)]
pub struct Attachments {
    memfd: File,
    eventfds: Vec<EventFd>,
}

impl Attachments {
    /// A memfd of [`SHARED_MEM_SIZE`] and three eventfds: the first comes signalled (as a kick,
    /// a ring gets served as soon as it runs), the second is where a device's call is awaited
    /// ([`Attachments::wait_for_call`]).
    ///
    /// # Panics
    ///
    /// If they cannot be created.
    pub fn new() -> Self {
        let eventfds: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        eventfds[0].write(1).expect("eventfd write");
        Self {
            memfd: memfd(c"fuzz-guest-ram", SHARED_MEM_SIZE),
            eventfds,
        }
    }

    /// Waits at most `ms` milliseconds for the second eventfd (the call) to be signalled.
    pub fn wait_for_call(&self, ms: i32) {
        let mut p = libc::pollfd {
            fd: self.eventfds[1].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let _ = unsafe { libc::poll(&mut p, 1, ms) };
    }

    /// Writes `data` into the memfd at `offset` (cut at its end).
    pub fn poke(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let room = SHARED_MEM_SIZE.saturating_sub(offset) as usize;
        let _ = self.memfd.write_at(&data[..data.len().min(room)], offset);
    }

    /// The descriptors for a record's `fds` byte: `fds % 4` of them, the memfd first unless
    /// bit 2 is set, then eventfds from the one `(fds >> 4) % 3` on.
    pub fn pick(&self, fds: u8) -> Vec<RawFd> {
        let n = usize::from(fds % 4);
        let mut out = Vec::with_capacity(n);
        if n > 0 && fds & 4 == 0 {
            out.push(self.memfd.as_raw_fd());
        }
        let first = usize::from(fds >> 4) % 3;
        out.extend(
            self.eventfds
                .iter()
                .cycle()
                .skip(first)
                .map(|e| e.as_raw_fd())
                .take(n - out.len()),
        );
        out
    }
}

impl Default for Attachments {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends the records of `data` on `sock` (non-blocking: a full socket ends the stream), then
/// shuts its sending side down, so the peer reads the records and then end of file.
///
/// Each record: `[fds: u8][len: u16][len bytes]`, sent with one `sendmsg` with
/// [`Attachments::pick`]`(fds)` attached; or, with bit 3 of `fds` set, guest memory content
/// `[offset: u32][bytes]` written into the memfd ([`Attachments::poke`]); or, with bit 6 set
/// and `waits`, a wait of up to [`WAIT_FOR_CALL_MS`] for the device's call
/// ([`Attachments::wait_for_call`]) before the next record (the first such record only).
pub fn send_records(
    sock: &std::os::unix::net::UnixStream,
    data: &[u8],
    attach: &Attachments,
    waits: bool,
) {
    let _ = sock.set_nonblocking(true);
    let mut r = Reader::new(data);
    let mut sent = 0;
    let mut may_wait = waits;
    while !r.is_empty() && sent < Records::MAX {
        sent += 1;
        let fds = r.u8();
        let bytes = r.piece();
        if fds & 0x40 != 0 {
            // Not a message: wait for the device to serve a ring it was kicked for (once per
            // input: an input whose rings never run waits for nothing).
            if may_wait {
                attach.wait_for_call(WAIT_FOR_CALL_MS);
                may_wait = false;
            }
            continue;
        }
        if fds & 8 != 0 {
            // Not a message: guest memory content, `[offset: u32][bytes]`.
            let mut p = Reader::new(bytes);
            let offset = u64::from(p.u32());
            attach.poke(offset, p.rest());
            continue;
        }
        if bytes.is_empty() {
            continue;
        }
        if send_with_fds(sock.as_raw_fd(), bytes, &attach.pick(fds)).is_err() {
            break;
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A daemon's socket path for this process.
pub fn socket_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("nimbus-fuzz-{tag}-{}.sock", std::process::id()))
}

/// Serves one frontend connection with `device`'s backend, as a vhost-user daemon does
/// (`vhost_user_daemon::serve`: the socket, the backend crate's protocol thread and workers),
/// the frontend sending the records of `data` and hanging up.
///
/// # Panics
///
/// If the socket cannot be set up, or when the connection leaves descriptors open.
pub fn serve_records<D: vhost_user_daemon::Device>(device: &D, tag: &str, data: &[u8]) {
    let attach = Attachments::new();
    let path = socket_path(tag);
    let before = open_fds();
    let socket = vhost_user_daemon::SocketFile::bind(&path).expect("socket");
    let frontend = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    let terminator = vhost_user_daemon::Terminator::new().expect("terminator");
    std::thread::scope(|scope| {
        // The frontend: its messages (and waits for the device), then the hang-up, while the
        // daemon serves the connection.
        scope.spawn(|| send_records(&frontend, data, &attach, true));
        let _ = vhost_user_daemon::serve(device, socket, false, &terminator);
    });
    drop(terminator);
    drop(frontend);
    let after = open_fds();
    assert_eq!(before, after, "descriptors left open by a connection");
}

/// Guest memory in [`Attachments`]' memfd... for the frontend targets: a fresh memfd of
/// [`SHARED_MEM_SIZE`] mapped as guest memory from 0.
///
/// # Panics
///
/// If it cannot be created.
pub fn shared_memory() -> GuestMemoryMmap {
    let file = memfd(c"fuzz-frontend-ram", SHARED_MEM_SIZE);
    let region = vm_memory::MmapRegion::from_file(
        vm_memory::FileOffset::new(file, 0),
        SHARED_MEM_SIZE as usize,
    )
    .expect("mmap");
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
    GuestMemoryMmap::from_regions(vec![region]).expect("guest memory")
}
