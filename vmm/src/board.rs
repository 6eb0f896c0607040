//! What a booted VM keeps across guest resets: the serial and console sinks (a file keeps
//! growing across reboots), the battery-backed CMOS (clock offset and NVRAM), and every device's
//! host side, opened once per boot (disk images and their locks, TAP queues, vhost-user
//! connections). Each VM instance built on the board gets fresh guest-facing devices from it
//! ([`BoardDevice::instance`]).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_devices::config_change::ConfigChange;
use virtio_devices::vhost_user::{Endpoint, VhostUserDevice};
use virtio_devices::VirtioDevice;
use vm_config::{
    ConsoleConfig, ConsoleOutputMode, DiskConfig, FsConfig, ImageType, NetConfig, PmemConfig,
    VhostMode, VmConfig, VsockConfig,
};

use crate::console_relay::ConsoleRelay;
use crate::fds::FdStore;
use crate::serial_input::{InputSink, InputTarget};
use crate::vm::VmError;

/// Where a serial port's or console's output goes.
#[derive(Debug)]
pub enum OutputSink {
    /// No device at all.
    Off,
    /// Device present, output dropped.
    Null,
    /// The VMM's standard output.
    Stdout,
    /// A file.
    File(File),
    /// A pseudo-terminal or a Unix socket, with its relay thread (input comes back through it).
    Relay(ConsoleRelay),
}

impl OutputSink {
    /// Opens the sink for a serial port or console; `what` names it in errors and thread
    /// names (`serial`, `console`, `debug-console`).
    pub fn open(
        mode: ConsoleOutputMode,
        file: Option<&Path>,
        socket: Option<&Path>,
        what: &'static str,
    ) -> Result<Self, VmError> {
        Ok(match mode {
            ConsoleOutputMode::Off => Self::Off,
            ConsoleOutputMode::Null => Self::Null,
            ConsoleOutputMode::Tty => Self::Stdout,
            ConsoleOutputMode::File => {
                let path = file.unwrap_or(Path::new(""));
                let file = File::create(path).map_err(|source| VmError::Open {
                    what,
                    path: path.display().to_string(),
                    source,
                })?;
                Self::File(file)
            }
            ConsoleOutputMode::Pty => Self::Relay(ConsoleRelay::pty(what)?),
            ConsoleOutputMode::Socket => {
                Self::Relay(ConsoleRelay::socket(what, socket.unwrap_or(Path::new("")))?)
            }
        })
    }

    /// A writer for one VM instance's device; `None` when there is no device.
    pub fn writer(&self) -> Result<Option<Box<dyn Write + Send>>, VmError> {
        Ok(match self {
            Self::Off => None,
            Self::Null => Some(Box::new(std::io::sink())),
            Self::Stdout => Some(Box::new(std::io::stdout())),
            Self::File(f) => Some(Box::new(f.try_clone().map_err(|source| VmError::Os {
                what: "output file handle",
                source,
            })?)),
            Self::Relay(r) => Some(r.writer()),
        })
    }

    /// The allocated pseudo-terminal's path, for a `pty` console.
    pub fn pty_path(&self) -> Option<&Path> {
        match self {
            Self::Relay(r) => r.pty_path(),
            _ => None,
        }
    }
}

/// The host side of one virtio device.
#[derive(Debug)]
enum HostSide {
    /// A disk image served by Nimbus itself.
    Disk {
        image: Arc<dyn block::DiskBackend>,
        num_queues: u16,
        queue_size: u16,
        serial: String,
        poll: std::time::Duration,
        /// Shared with each instance's virtio-blk device: announces a resize to its driver.
        config_change: ConfigChange,
    },
    /// TAP queues served by Nimbus itself.
    Tap {
        taps: Vec<net_util::Tap>,
        mac: net_util::MacAddr,
        queue_size: u16,
        mtu: Option<u16>,
        offloads: net_util::Offloads,
    },
    /// A connection to a vhost-user backend (block, net or fs).
    VhostUser(VhostUserDevice),
    /// The entropy device, reading this file.
    Rng(std::path::PathBuf),
    /// The virtio console, writing to the board's console sink.
    Console,
    /// virtio-vsock: the hybrid backend's listening socket, bound once per boot.
    Vsock(VsockListener),
    /// A pmem file, mapped anew by each VM instance.
    Pmem(crate::pmem::PmemFile),
    /// The memory balloon (its target is the configuration's, which `vm.resize` keeps).
    Balloon(vm_config::BalloonConfig),
}

/// The listening socket of a vsock device; the socket file is removed when the board goes.
#[derive(Debug)]
struct VsockListener {
    cid: u32,
    path: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl VsockListener {
    /// Binds `path`; a socket file left by a VMM that is gone (nobody accepts on it) is
    /// replaced.
    fn bind(cid: u32, path: &Path) -> Result<Self, VmError> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let err = |source| VmError::Open {
            what: "vsock socket",
            path: path.display().to_string(),
            source,
        };
        let listener = match UnixListener::bind(path) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let is_socket = std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
                if !is_socket || UnixStream::connect(path).is_ok() {
                    return Err(err(e));
                }
                std::fs::remove_file(path).map_err(err)?;
                UnixListener::bind(path).map_err(err)?
            }
            other => other.map_err(err)?,
        };
        Ok(Self {
            cid,
            path: path.to_path_buf(),
            listener,
        })
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why `vm.resize-disk` could not resize a disk ([`Board::resize_disk`]).
#[derive(Debug, thiserror::Error)]
pub enum ResizeDiskError {
    /// No disk has this id (Cloud Hypervisor answers 404).
    #[error("no disk with id {0}")]
    UnknownDisk(String),
    /// The disk is served by a vhost-user backend, which owns the image and its size.
    #[error(
        "disk {0} is served by a vhost-user backend: its image belongs to the backend, which \
         Nimbus cannot ask to resize it"
    )]
    VhostUser(String),
    /// The image refused the new size.
    #[error("disk {id}")]
    Image {
        /// The disk's id.
        id: String,
        /// Cause.
        #[source]
        source: block::BlockError,
    },
}

impl ResizeDiskError {
    /// The HTTP status Cloud Hypervisor answers with: 404 for an unknown disk, else 500.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownDisk(_) => 404,
            _ => 500,
        }
    }
}

/// What kind of device a [`BoardDevice`] is, for the device tree and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Disk,
    /// virtio-net.
    Net,
    /// virtio-fs.
    Fs,
    /// virtio-rng.
    Rng,
    /// virtio-console.
    Console,
    /// virtio-vsock.
    Vsock,
    /// virtio-pmem.
    Pmem,
    /// virtio-balloon.
    Balloon,
}

/// One device of the board, with its id.
#[derive(Debug)]
pub struct BoardDevice {
    /// The device's id (user-given or generated, see [`vm_config::VmConfig::name_devices`]).
    pub id: String,
    /// Its kind.
    pub kind: DeviceKind,
    /// How the backend is reached, for logs (`image /path`, `tap tap0`, `vhost-user /sock`).
    pub backend: String,
    /// PCI segment.
    pub pci_segment: u16,
    /// PCI slot asked for, if any.
    pub slot: Option<u8>,
    host: HostSide,
}

impl BoardDevice {
    /// Its balloon configuration, if it is the balloon (the VM instance keeps a handle on it,
    /// [`crate::vm::Vm::resize_balloon`]).
    pub fn balloon_config(&self) -> Option<&vm_config::BalloonConfig> {
        match &self.host {
            HostSide::Balloon(b) => Some(b),
            _ => None,
        }
    }

    /// Its pmem file, if it is a pmem device (its guest-facing device needs the address
    /// where the VM instance mapped the file: [`crate::pmem::attach`]).
    pub fn pmem_file(&self) -> Option<&crate::pmem::PmemFile> {
        match &self.host {
            HostSide::Pmem(file) => Some(file),
            _ => None,
        }
    }
}

/// A device of the configuration that can be added to a VM, cold or hot: the part of
/// [`VmConfig`] that describes it (its id given, see [`VmConfig::name_devices`]).
#[derive(Clone, Copy, Debug)]
pub enum DeviceSpec<'a> {
    /// `disks[]`.
    Disk(&'a DiskConfig),
    /// `net[]`.
    Net(&'a NetConfig),
    /// `fs[]`.
    Fs(&'a FsConfig),
    /// `vsock`.
    Vsock(&'a VsockConfig),
    /// `pmem[]`.
    Pmem(&'a PmemConfig),
}

impl DeviceSpec<'_> {
    /// The device's id.
    pub fn id(&self) -> Option<&str> {
        match self {
            DeviceSpec::Disk(d) => d.id.as_deref(),
            DeviceSpec::Net(n) => n.id.as_deref(),
            DeviceSpec::Fs(f) => f.id.as_deref(),
            DeviceSpec::Vsock(v) => v.id.as_deref(),
            DeviceSpec::Pmem(p) => p.id.as_deref(),
        }
    }

    /// Every such device of `config`, in the order they get PCI slots.
    pub fn all(config: &VmConfig) -> Vec<DeviceSpec<'_>> {
        let disks = config.disks.iter().flatten().map(DeviceSpec::Disk);
        let net = config.net.iter().flatten().map(DeviceSpec::Net);
        let fs = config.fs.iter().flatten().map(DeviceSpec::Fs);
        let vsock = config.vsock.iter().map(DeviceSpec::Vsock);
        let pmem = config.pmem.iter().flatten().map(DeviceSpec::Pmem);
        disks
            .chain(net)
            .chain(fs)
            .chain(vsock)
            .chain(pmem)
            .collect()
    }
}

impl BoardDevice {
    /// Opens the host side of `spec` (image, TAPs, vhost-user connection, socket, file);
    /// `fds` holds descriptors handed to the VMM (TAPs).
    fn open(spec: DeviceSpec<'_>, fds: &FdStore) -> Result<Self, VmError> {
        let (id, kind, place, (host, backend)) = match spec {
            DeviceSpec::Disk(d) => {
                let id = id_of(&d.id);
                let opened = open_disk(d, &id)?;
                (
                    id,
                    DeviceKind::Disk,
                    (d.pci_segment, d.pci_device_id),
                    opened,
                )
            }
            DeviceSpec::Net(n) => {
                let id = id_of(&n.id);
                let opened = open_net(n, &id, fds)?;
                (
                    id,
                    DeviceKind::Net,
                    (n.pci_segment, n.pci_device_id),
                    opened,
                )
            }
            DeviceSpec::Fs(f) => {
                let id = id_of(&f.id);
                let socket = f.socket.display().to_string();
                let dev = virtio_devices::vhost_user::fs::connect(
                    Endpoint::Connect(f.socket.clone()),
                    &f.tag,
                    f.num_queues as u16,
                    f.queue_size,
                    id.clone(),
                )
                .map_err(vhost_err(&socket))?;
                let backend = format!("vhost-user {socket} tag {}", f.tag);
                let place = (f.pci_segment, f.pci_device_id);
                (
                    id,
                    DeviceKind::Fs,
                    place,
                    (HostSide::VhostUser(dev), backend),
                )
            }
            DeviceSpec::Vsock(v) => {
                let backend = format!("cid {} socket {}", v.cid, v.socket.display());
                let listener = VsockListener::bind(v.cid, &v.socket)?;
                (
                    id_of(&v.id),
                    DeviceKind::Vsock,
                    (v.pci_segment, None),
                    (HostSide::Vsock(listener), backend),
                )
            }
            DeviceSpec::Pmem(p) => {
                let file =
                    crate::pmem::PmemFile::open(p).map_err(crate::pmem::PmemAttachError::from)?;
                let backend = format!(
                    "file {} ({} bytes{})",
                    p.file.display(),
                    file.size,
                    if p.discard_writes {
                        ", writes discarded"
                    } else {
                        ""
                    }
                );
                (
                    id_of(&p.id),
                    DeviceKind::Pmem,
                    (p.pci_segment, None),
                    (HostSide::Pmem(file), backend),
                )
            }
        };
        Ok(Self::new(id, kind, place, host, backend))
    }

    fn new(
        id: String,
        kind: DeviceKind,
        (pci_segment, slot): (u16, Option<u8>),
        host: HostSide,
        backend: String,
    ) -> Self {
        log::debug!("{id}: {backend}");
        Self {
            id,
            kind,
            backend,
            pci_segment,
            slot,
            host,
        }
    }
}

/// What outlives a guest reset.
#[derive(Debug)]
pub struct Board {
    serial: OutputSink,
    console: OutputSink,
    debug_console: OutputSink,
    debug_console_port: u16,
    /// Where standard input goes: the virtio console when it is `tty`, else the serial port.
    input: InputTarget,
    cmos: Arc<Mutex<devices::rtc::Rtc>>,
    /// The virtio devices, in the order they get PCI slots.
    devices: Vec<BoardDevice>,
    start: Instant,
}

fn vhost_err(socket: &str) -> impl FnOnce(virtio_devices::vhost_user::VhostUserError) -> VmError {
    let socket = socket.to_string();
    move |source| VmError::VhostUser { socket, source }
}

fn open_disk(d: &DiskConfig, id: &str) -> Result<(HostSide, String), VmError> {
    if d.vhost_user {
        let socket = d.vhost_socket.clone().unwrap_or_default();
        let dev = virtio_devices::vhost_user::blk::connect(
            Endpoint::Connect(socket.clone().into()),
            d.num_queues as u16,
            d.queue_size,
            id.to_string(),
        )
        .map_err(vhost_err(&socket))?;
        return Ok((HostSide::VhostUser(dev), format!("vhost-user {socket}")));
    }
    let path = d.path.clone().unwrap_or_default();
    let disk_err = |source| VmError::Disk {
        path: path.display().to_string(),
        source,
    };
    let image = block::RawFile::open(&path, d.readonly, d.direct).map_err(disk_err)?;
    if d.image_type == ImageType::Unknown {
        let format = block::detect_format(&image).map_err(disk_err)?;
        if format != block::ImageFormat::Raw {
            return Err(disk_err(block::BlockError::NotRaw {
                path: path.clone(),
                format,
            }));
        }
    }
    // GET_ID answers the configured serial, else the device id.
    let serial = d.serial.clone().unwrap_or_else(|| id.to_string());
    let host = HostSide::Disk {
        image: Arc::new(image),
        num_queues: d.num_queues as u16,
        queue_size: d.queue_size,
        serial,
        poll: std::time::Duration::from_micros(u64::from(d.poll_us)),
        config_change: ConfigChange::new(),
    };
    Ok((host, format!("image {}", path.display())))
}

fn open_net(n: &NetConfig, id: &str, fds: &FdStore) -> Result<(HostSide, String), VmError> {
    if n.vhost_user {
        let socket = n.vhost_socket.clone().unwrap_or_default();
        let endpoint = match n.vhost_mode {
            VhostMode::Client => Endpoint::Connect(socket.clone().into()),
            VhostMode::Server => Endpoint::listen(socket.as_ref()).map_err(vhost_err(&socket))?,
        };
        if n.vhost_mode == VhostMode::Server {
            log::info!("{id}: waiting for a vhost-user-net backend to connect to {socket}");
        }
        let dev = virtio_devices::vhost_user::net::connect(
            endpoint,
            (n.num_queues / 2) as u16,
            n.queue_size,
            id.to_string(),
        )
        .map_err(vhost_err(&socket))?;
        return Ok((HostSide::VhostUser(dev), format!("vhost-user {socket}")));
    }
    let name = n.tap.clone().unwrap_or_default();
    let err = |source: net_util::NetError| VmError::Net {
        name: if name.is_empty() {
            id.to_string()
        } else {
            name.clone()
        },
        source: Box::new(source),
    };
    let pairs = n.num_queues / 2;
    let taps = match &n.fds {
        Some(numbers) => numbers
            .iter()
            .map(|&fd| {
                let owned = fds.duplicate(fd)?;
                net_util::Tap::from_fd(owned).map_err(err)
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            let taps = net_util::Tap::open_named(&name, pairs).map_err(err)?;
            if let Some(first) = taps.first() {
                if let Some(ip) = n.ip {
                    let mask = n.mask.unwrap_or(std::net::Ipv4Addr::new(255, 255, 255, 0));
                    first.set_ip_addr(ip, mask).map_err(err)?;
                }
                if let Some(host_mac) = &n.host_mac {
                    let mac = host_mac
                        .parse()
                        .map_err(|e| VmError::Failed(format!("{id}: {e}")))?;
                    first.set_mac(mac).map_err(err)?;
                }
                if let Some(mtu) = n.mtu {
                    first.set_mtu(mtu).map_err(err)?;
                }
                first.set_up().map_err(err)?;
            }
            taps
        }
    };
    let mac = match &n.mac {
        Some(m) => m
            .parse()
            .map_err(|e| VmError::Failed(format!("{id}: {e}")))?,
        // Chosen once per boot, so it stays the same across guest reboots.
        None => net_util::MacAddr::random_local(),
    };
    let backend = format!(
        "tap {} mac {mac}",
        taps.first().map_or("?", |t| t.if_name())
    );
    let host = HostSide::Tap {
        taps,
        mac,
        queue_size: n.queue_size,
        mtu: n.mtu,
        offloads: net_util::Offloads {
            csum: n.offload_csum,
            tso: n.offload_tso,
            ufo: n.offload_ufo,
        },
    };
    Ok((host, backend))
}

fn id_of(id: &Option<String>) -> String {
    id.clone().unwrap_or_default()
}

impl Board {
    /// Opens the host side of every device of `config` (whose devices all have ids, see
    /// [`vm_config::VmConfig::name_devices`]); `start` is the VMM's process start (for
    /// boot-progress timing), `fds` holds descriptors handed to the VMM (TAPs), and `input`
    /// is where standard input goes.
    pub fn new(
        config: &VmConfig,
        fds: &FdStore,
        input: InputTarget,
        start: Instant,
    ) -> Result<Self, VmError> {
        let open = |c: &ConsoleConfig, what| {
            OutputSink::open(c.mode, c.file.as_deref(), c.socket.as_deref(), what)
        };
        let serial = open(&config.serial, "serial")?;
        let console = open(&config.console, "console")?;
        let debug = &config.debug_console;
        let debug_console = OutputSink::open(
            debug.mode,
            debug.file.as_deref(),
            debug.socket.as_deref(),
            "debug-console",
        )?;
        let mut devices = DeviceSpec::all(config)
            .into_iter()
            .map(|spec| BoardDevice::open(spec, fds))
            .collect::<Result<Vec<_>, _>>()?;
        let mut add = |id: String, kind, host, backend| {
            devices.push(BoardDevice::new(id, kind, (0, None), host, backend));
        };
        if !matches!(console, OutputSink::Off) {
            let backend = format!("{:?}", config.console.mode);
            add(
                vm_config::CONSOLE_DEVICE_ID.into(),
                DeviceKind::Console,
                HostSide::Console,
                backend,
            );
        }
        if let Some(b) = &config.balloon {
            let backend = format!(
                "size {} deflate_on_oom={} free_page_reporting={}",
                b.size, b.deflate_on_oom, b.free_page_reporting
            );
            add(
                vm_config::BALLOON_DEVICE_ID.into(),
                DeviceKind::Balloon,
                HostSide::Balloon(b.clone()),
                backend,
            );
        }
        let src = config.rng.src.clone();
        let backend = format!("source {}", src.display());
        add(
            vm_config::RNG_DEVICE_ID.into(),
            DeviceKind::Rng,
            HostSide::Rng(src),
            backend,
        );
        Ok(Self {
            serial,
            console,
            debug_console,
            debug_console_port: debug.port(),
            input,
            cmos: Arc::new(Mutex::new(devices::rtc::Rtc::default())),
            devices,
            start,
        })
    }

    /// The virtio devices, in slot order.
    pub fn devices(&self) -> &[BoardDevice] {
        &self.devices
    }

    /// Opens the host side of a device added to the running VM (hotplug); it stays on the
    /// board, so the instances built after a guest reset have it too.
    pub fn add_device(
        &mut self,
        spec: DeviceSpec<'_>,
        fds: &FdStore,
    ) -> Result<&BoardDevice, VmError> {
        let device = BoardDevice::open(spec, fds)?;
        self.devices.push(device);
        Ok(&self.devices[self.devices.len() - 1])
    }

    /// Closes the host side of device `id` (its image, TAPs, connection or socket), once the
    /// guest has ejected it. Whether it was there.
    pub fn remove_device(&mut self, id: &str) -> bool {
        let before = self.devices.len();
        self.devices.retain(|d| d.id != id);
        self.devices.len() != before
    }

    /// `vm.resize-disk`: gives disk `id`'s image `size` bytes ([`block::DiskBackend::resize`])
    /// and tells the running driver (the virtio-blk device reads its capacity from the image;
    /// a configuration change interrupt). The board keeps the image across guest resets, so
    /// later instances have the new size too.
    pub fn resize_disk(&self, id: &str, size: u64) -> Result<(), ResizeDiskError> {
        let device = self
            .devices
            .iter()
            .find(|d| d.id == id && d.kind == DeviceKind::Disk)
            .ok_or_else(|| ResizeDiskError::UnknownDisk(id.to_string()))?;
        match &device.host {
            HostSide::Disk {
                image,
                config_change,
                ..
            } => {
                image
                    .resize(size)
                    .map_err(|source| ResizeDiskError::Image {
                        id: id.to_string(),
                        source,
                    })?;
                let told = config_change.notify();
                log::info!(
                    "{id}: resized to {size} bytes ({})",
                    if told {
                        "the driver was told"
                    } else {
                        "no driver running"
                    }
                );
                Ok(())
            }
            HostSide::VhostUser(_) => Err(ResizeDiskError::VhostUser(id.to_string())),
            _ => Err(ResizeDiskError::UnknownDisk(id.to_string())),
        }
    }

    /// The serial port's sink.
    pub fn serial(&self) -> &OutputSink {
        &self.serial
    }

    /// Where standard input goes.
    pub fn input(&self) -> &InputTarget {
        &self.input
    }

    /// The CMOS RTC (clock offset and NVRAM survive resets).
    pub fn cmos(&self) -> &Arc<Mutex<devices::rtc::Rtc>> {
        &self.cmos
    }

    /// The VMM's process start.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The debug console's sink and I/O port.
    pub fn debug_console(&self) -> (&OutputSink, u16) {
        (&self.debug_console, self.debug_console_port)
    }

    /// The pseudo-terminals allocated for the serial port, the console and the debug console.
    pub fn pty_paths(&self) -> [Option<&Path>; 3] {
        [
            self.serial.pty_path(),
            self.console.pty_path(),
            self.debug_console.pty_path(),
        ]
    }

    /// Where the serial port's input comes from: its PTY or socket, else standard input when
    /// it is `tty` and the virtio console does not take it.
    pub fn serial_input(&self) -> Option<&InputTarget> {
        match (&self.serial, &self.console) {
            (OutputSink::Relay(r), _) => Some(r.input()),
            (OutputSink::Stdout, OutputSink::Stdout) => None,
            (OutputSink::Stdout, _) => Some(&self.input),
            _ => None,
        }
    }

    /// Where the virtio console's input comes from: its PTY or socket, or standard input
    /// when it is `tty`.
    pub fn console_input(&self) -> Option<&InputTarget> {
        match &self.console {
            OutputSink::Relay(r) => Some(r.input()),
            OutputSink::Stdout => Some(&self.input),
            _ => None,
        }
    }

    /// Detaches every input (standard input, PTYs, sockets) from the devices of the instance
    /// that is going away.
    pub fn detach_inputs(&self) {
        for target in [Some(&self.input), self.serial_input(), self.console_input()]
            .into_iter()
            .flatten()
        {
            *target.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// A fresh guest-facing device for `device`, for a new VM instance (not for pmem devices and
    /// the balloon, see [`BoardDevice::pmem_file`] and [`BoardDevice::balloon_config`]).
    pub fn instance(&self, device: &BoardDevice) -> Result<Box<dyn VirtioDevice>, VmError> {
        let id = device.id.clone();
        Ok(match &device.host {
            HostSide::Disk {
                image,
                num_queues,
                queue_size,
                serial,
                poll,
                config_change,
            } => Box::new(
                virtio_devices::block::Block::new(
                    image.clone(),
                    *num_queues,
                    *queue_size,
                    serial,
                    id,
                )
                .with_poll(*poll)
                .with_config_change(config_change.clone()),
            ),
            HostSide::Tap {
                taps,
                mac,
                queue_size,
                mtu,
                offloads,
            } => {
                let taps = taps
                    .iter()
                    .map(net_util::Tap::try_clone)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| VmError::Net {
                        name: id.clone(),
                        source: Box::new(source),
                    })?;
                Box::new(
                    virtio_devices::net::Net::new(taps, *mac, *queue_size, *mtu, id.clone())
                        .map_err(|e| VmError::Failed(format!("{id}: {e}")))?
                        .with_offloads(*offloads),
                )
            }
            HostSide::VhostUser(dev) => Box::new(dev.fresh()),
            HostSide::Rng(src) => {
                let source = File::open(src).map_err(|source| VmError::Open {
                    what: "rng source",
                    path: src.display().to_string(),
                    source,
                })?;
                Box::new(virtio_devices::rng::Rng::new(source, id))
            }
            HostSide::Console => {
                let out = self
                    .console
                    .writer()?
                    .unwrap_or_else(|| Box::new(std::io::sink()));
                // A `tty` console takes standard input (the serial port then gets none); a
                // PTY or socket console, its own.
                let input = match self.console_input() {
                    Some(target) => {
                        let input =
                            virtio_devices::console::ConsoleInput::new().map_err(|source| {
                                VmError::Os {
                                    what: "console input",
                                    source,
                                }
                            })?;
                        let sink: Arc<dyn InputSink> = input.clone();
                        *target.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
                        Some(input)
                    }
                    None => None,
                };
                Box::new(virtio_devices::console::Console::new(out, input, id))
            }
            HostSide::Vsock(v) => {
                let listener = v.listener.try_clone().map_err(|source| VmError::Os {
                    what: "vsock listening socket",
                    source,
                })?;
                Box::new(virtio_devices::vsock::Vsock::new(
                    u64::from(v.cid),
                    v.path.clone(),
                    listener,
                    id,
                ))
            }
            HostSide::Pmem(_) | HostSide::Balloon(_) => {
                return Err(VmError::Failed(format!(
                    "{id}: this device is built by the VM instance (it keeps a hold on it)"
                )))
            }
        })
    }
}
