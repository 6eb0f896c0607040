//! The VMM's command loop: the one owner of the VM. API requests, the command line's initial
//! create and boot, termination signals and the guest's power events all arrive here as
//! [`Command`]s, one at a time; [`legality`] is the one place that decides which request is
//! legal in which [`VmState`].

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use api_http::Responder;
use hypervisor::Hypervisor;
use serde::Serialize;
use vm_config::{ConfigError, ConsoleOutputMode, VmConfig, VsockConfig};

use crate::api::{self, ApiBody, ApiError, ApiReply, ApiRequest};
use crate::board::{Board, DeviceSpec};
use crate::control::{EventSink, VmEvent};
use crate::events::EventMonitor;
use crate::fds::FdStore;
use crate::serial_input::{spawn_forwarder, InputTarget, TerminalGuard};
use crate::vcpus::ResizeError;
use crate::vm::{InstanceHandlers, Vm, VmError};

/// Something for the command loop to do.
#[derive(Debug)]
pub enum Command {
    /// An API request and where its answer goes.
    Api(ApiRequest, Responder),
    /// The first power event or failure of VM instance `instance`.
    Guest {
        /// Which instance (events of an instance already replaced are stale).
        instance: u64,
        /// What happened.
        event: VmEvent,
    },
    /// The guest of VM instance `instance` ejected the device in `slot` of PCI segment
    /// `segment` (after `vm.remove-device`).
    Eject {
        /// Which instance.
        instance: u64,
        /// PCI segment.
        segment: u16,
        /// Slot on its bus 0.
        slot: u8,
    },
    /// The guest of VM instance `instance` ejected vCPU `cpu` (after `vm.resize` shrank the
    /// vCPUs).
    EjectVcpu {
        /// Which instance.
        instance: u64,
        /// The vCPU's index.
        cpu: u32,
    },
    /// A device of VM instance `instance` asks for its activation or reset to run here.
    Device {
        /// Which instance.
        instance: u64,
        /// The device's id.
        id: String,
    },
    /// A termination signal.
    Signal(i32),
}

/// The VM's lifecycle state, as `vm.info` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Configured, not booted.
    Created,
    /// Running guest code.
    Running,
    /// Shut down (can be booted again).
    Shutdown,
    /// Paused.
    Paused,
}

/// How the VMM ends.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Clean: the guest powered off, `vmm.shutdown`, or a termination signal.
    Done,
    /// The VM failed (a vCPU could not go on, or a guest reset could not rebuild the VM).
    Failed(String),
}

/// Whether `request` is legal in `state` (`None`: no VM was created).
pub fn legality(state: Option<VmState>, request: &ApiRequest) -> Result<(), ApiError> {
    use ApiRequest as R;
    use VmState::*;
    let not_created = || ApiError::plain(404, &["VM is not created"]);
    let not_running = || ApiError::plain(500, &["VM is not running"]);
    match (state, request) {
        (_, R::VmmPing | R::VmmShutdown | R::VmDelete) => Ok(()),
        (None, R::VmCreate(_)) => Ok(()),
        (Some(_), R::VmCreate(_)) => Err(ApiError::plain(500, &["VM is already created"])),
        (_, R::NotYet(route)) => Err(ApiError::plain(
            500,
            &[&format!("{route} is not supported by Nimbus yet")],
        )),
        (None, _) => Err(not_created()),
        (Some(_), R::VmInfo | R::VmResize(_)) => Ok(()),
        (Some(Created | Shutdown), R::VmBoot) => Ok(()),
        (Some(Running | Paused), R::VmBoot) => Err(ApiError::plain(500, &["VM is already booted"])),
        (Some(Running), R::VmPause) => Ok(()),
        (Some(Paused), R::VmPause) => Err(ApiError::plain(500, &["VM is already paused"])),
        (Some(Paused), R::VmResume) => Ok(()),
        (Some(Running), R::VmResume) => Err(ApiError::plain(500, &["VM is not paused"])),
        (
            Some(Running | Paused),
            R::VmShutdown | R::VmReboot | R::VmPowerButton | R::VmNmi | R::VmCounters,
        ) => Ok(()),
        (Some(Created | Shutdown), R::VmReboot) => Err(ApiError::plain(404, &["VM is not booted"])),
        // Only a booted VM has its images open (Cloud Hypervisor: 500 before boot).
        (Some(Running | Paused), R::ResizeDisk(_)) => Ok(()),
        // Before boot the configuration changes; on a booted VM the device is hot-plugged.
        (
            Some(_),
            R::AddDisk(_)
            | R::AddNet(..)
            | R::AddFs(_)
            | R::AddVsock(_)
            | R::AddPmem(_)
            | R::RemoveDevice(_),
        ) => Ok(()),
        (Some(_), _) => Err(not_running()),
    }
}

/// A booted VM: the board (host side of the devices, kept across resets) and the current
/// instance of the machine.
struct Booted {
    board: Board,
    vm: Vm,
    instance: u64,
    /// Instances built on this board (1 + guest resets and reboots).
    boots: u64,
}

/// `vm.info`'s answer.
#[derive(Serialize)]
struct VmInfo<'a> {
    config: &'a VmConfig,
    state: VmState,
    memory_actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_tree: Option<std::collections::BTreeMap<String, crate::device_manager::DeviceNode>>,
}

/// The VMM: the VM's configuration, its state, and the VM while it is booted.
pub struct Vmm {
    hv: Arc<dyn Hypervisor>,
    commands: Receiver<Command>,
    sender: Sender<Command>,
    config: Option<VmConfig>,
    state: VmState,
    booted: Option<Booted>,
    instances: u64,
    fds: FdStore,
    events: EventMonitor,
    input: InputTarget,
    stdin_forwarded: bool,
    terminal: Option<TerminalGuard>,
    start: Instant,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("state", &self.config.as_ref().map(|_| self.state))
            .finish_non_exhaustive()
    }
}

fn config_status(e: &ConfigError) -> u16 {
    match e {
        ConfigError::DuplicateId(_) | ConfigError::DuplicatePath(_) => 409,
        _ => 400,
    }
}

impl Vmm {
    /// A VMM with no VM, on `hv`; `fds` holds descriptors handed over on the command line,
    /// `events` is the event monitor, `start` the process start.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        fds: FdStore,
        events: EventMonitor,
        start: Instant,
    ) -> Self {
        let (sender, commands) = channel();
        Self {
            hv,
            commands,
            sender,
            config: None,
            state: VmState::Created,
            booted: None,
            instances: 0,
            fds,
            events,
            input: InputTarget::default(),
            stdin_forwarded: false,
            terminal: None,
            start,
        }
    }

    /// Where commands for this VMM go (the API thread, the signal thread).
    pub fn sender(&self) -> Sender<Command> {
        self.sender.clone()
    }

    /// Carries out one API request now (the command line's create and boot use this too).
    pub fn request(&mut self, request: ApiRequest) -> ApiReply {
        let state = self.config.as_ref().map(|_| self.state);
        legality(state, &request)?;
        match request {
            ApiRequest::VmmPing => self.ping(),
            ApiRequest::VmmShutdown => {
                self.delete();
                Ok(ApiBody::EmptyOk)
            }
            ApiRequest::VmCreate(config) => self.create(*config),
            ApiRequest::VmDelete => {
                self.delete();
                Ok(ApiBody::NoContent)
            }
            ApiRequest::VmBoot => self.boot(),
            ApiRequest::VmShutdown => {
                self.shutdown();
                Ok(ApiBody::NoContent)
            }
            ApiRequest::VmReboot => self.reboot(),
            ApiRequest::VmPowerButton => self
                .with_vm("The power button could not be pressed", |vm| {
                    vm.power_button()
                }),
            ApiRequest::VmNmi => self.with_vm("The NMI could not be injected", |vm| {
                vm.nmi();
                Ok(())
            }),
            ApiRequest::VmPause => self.pause(),
            ApiRequest::VmResume => self.resume(),
            ApiRequest::VmInfo => self.info(),
            ApiRequest::VmCounters => self.counters(),
            ApiRequest::VmResize(resize) => self.resize(&resize),
            ApiRequest::AddDisk(disk) => self.add_device(
                |c| c.disks.get_or_insert_with(Vec::new).push(*disk),
                |c| c.disks.as_ref()?.last().map(DeviceSpec::Disk),
            ),
            ApiRequest::AddFs(fs) => self.add_device(
                |c| c.fs.get_or_insert_with(Vec::new).push(*fs),
                |c| c.fs.as_ref()?.last().map(DeviceSpec::Fs),
            ),
            ApiRequest::AddVsock(vsock) => self.add_vsock(*vsock),
            ApiRequest::AddPmem(pmem) => self.add_device(
                |c| c.pmem.get_or_insert_with(Vec::new).push(*pmem),
                |c| c.pmem.as_ref()?.last().map(DeviceSpec::Pmem),
            ),
            ApiRequest::AddNet(mut net, fds) => {
                let numbers: Vec<i32> = fds.into_iter().map(|fd| self.fds.insert(fd)).collect();
                if !numbers.is_empty() {
                    net.fds = Some(numbers.clone());
                }
                let reply = self.add_device(
                    |c| c.net.get_or_insert_with(Vec::new).push(*net),
                    |c| c.net.as_ref()?.last().map(DeviceSpec::Net),
                );
                if reply.is_err() {
                    self.fds.release(&numbers);
                }
                reply
            }
            ApiRequest::RemoveDevice(id) => self.remove_device(&id),
            ApiRequest::ResizeDisk(resize) => self.resize_disk(&resize),
            ApiRequest::NotYet(_) => Err(ApiError::plain(500, &["not supported"])),
        }
    }

    /// Runs commands until the VMM must exit.
    pub fn run(&mut self) -> Outcome {
        loop {
            let Ok(command) = self.commands.recv() else {
                return Outcome::Done;
            };
            match command {
                Command::Api(request, responder) => {
                    let exit = matches!(request, ApiRequest::VmmShutdown);
                    let reply = self.request(request);
                    let ok = reply.is_ok();
                    responder.send(api::response(reply));
                    if exit && ok {
                        self.events.emit("vmm", "shutdown", &[]);
                        return Outcome::Done;
                    }
                }
                Command::Guest { instance, event } => {
                    if let Some(outcome) = self.guest_event(instance, event) {
                        return outcome;
                    }
                }
                Command::Eject {
                    instance,
                    segment,
                    slot,
                } => self.ejected(instance, segment, slot),
                Command::EjectVcpu { instance, cpu } => {
                    if let Some(b) = self.booted.as_mut().filter(|b| b.instance == instance) {
                        b.vm.eject_vcpu(cpu);
                    }
                }
                Command::Device { instance, id } => {
                    if let Some(b) = self.booted.as_mut().filter(|b| b.instance == instance) {
                        b.vm.run_device_request(&id);
                    }
                }
                Command::Signal(signal) => {
                    log::info!("signal {signal}: stopping the VM and exiting");
                    self.delete();
                    self.events.emit("vmm", "shutdown", &[]);
                    return Outcome::Done;
                }
            }
        }
    }

    /// Emits an event on the monitor.
    pub fn emit(&mut self, source: &str, event: &str) {
        self.events.emit(source, event, &[]);
    }

    fn ping(&self) -> ApiReply {
        let own = env!("CARGO_PKG_VERSION");
        let ping = api::PingResponse {
            build_version: format!("v{}-nimbus-{own}", crate::cli::CH_COMPAT_VERSION),
            version: crate::cli::CH_COMPAT_VERSION.to_string(),
            pid: i64::from(std::process::id()),
            features: vec!["kvm".into()],
        };
        json_reply(&ping)
    }

    fn create(&mut self, config: VmConfig) -> ApiReply {
        config
            .validate()
            .map_err(|e| ApiError::new(config_status(&e), "The VM could not be created", &e))?;
        if config.landlock_enable {
            nimbus_landlock::restrict(&crate::landlock::rules(&config))
                .map_err(|e| ApiError::new(500, "The VM could not be created", &e))?;
        }
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(ApiBody::NoContent)
    }

    /// Applies `change` to the configuration of a VM that is not running, if the result is
    /// valid.
    fn change_config(&mut self, change: impl FnOnce(&mut VmConfig)) -> ApiReply {
        let Some(config) = &self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let mut changed = config.clone();
        change(&mut changed);
        changed
            .validate()
            .map_err(|e| ApiError::new(config_status(&e), "The device could not be added", &e))?;
        self.config = Some(changed);
        Ok(ApiBody::NoContent)
    }

    /// `vm.add-vsock` before boot: a VM has at most one vsock device (Cloud Hypervisor's
    /// rule, answered with its status).
    fn add_vsock(&mut self, vsock: VsockConfig) -> ApiReply {
        if self.config.as_ref().is_some_and(|c| c.vsock.is_some()) {
            return Err(ApiError::plain(
                500,
                &[
                    "The device could not be added",
                    "the VM already has a vsock device (only one is allowed)",
                ],
            ));
        }
        self.add_device(
            |c| c.vsock = Some(vsock),
            |c| c.vsock.as_ref().map(DeviceSpec::Vsock),
        )
    }

    /// `vm.add-*`: applies `change` to the configuration; on a booted VM also opens the new
    /// device (`added` finds it in the changed configuration) and hot-plugs it, answering
    /// its id and PCI address as Cloud Hypervisor does (before boot: 204).
    fn add_device(
        &mut self,
        change: impl FnOnce(&mut VmConfig),
        added: impl for<'c> FnOnce(&'c VmConfig) -> Option<DeviceSpec<'c>>,
    ) -> ApiReply {
        const CONTEXT: &str = "The device could not be added";
        let Some(booted) = &mut self.booted else {
            return self.change_config(change);
        };
        let Some(config) = &self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let mut changed = config.clone();
        change(&mut changed);
        changed.name_devices();
        changed
            .validate()
            .map_err(|e| ApiError::new(config_status(&e), CONTEXT, &e))?;
        let Some(spec) = added(&changed) else {
            return Err(ApiError::plain(
                500,
                &[CONTEXT, "the device is not in the configuration"],
            ));
        };
        booted
            .board
            .add_device(spec, &self.fds)
            .map_err(|e| vm_error(CONTEXT, &e))?;
        let Some(device) = booted.board.devices().last() else {
            return Err(ApiError::plain(
                500,
                &[CONTEXT, "the device was not opened"],
            ));
        };
        let id = device.id.clone();
        match booted.vm.hot_add(&booted.board, device) {
            Ok(bdf) => {
                self.config = Some(changed);
                self.events.emit(
                    "vm",
                    "device-added",
                    &[("id", &id), ("bdf", &bdf.to_string())],
                );
                json_reply(&api::PciDeviceInfo {
                    id,
                    bdf: bdf.to_string(),
                })
            }
            Err(e) => {
                booted.board.remove_device(&id);
                Err(vm_error(CONTEXT, &e))
            }
        }
    }

    /// The guest of instance `instance` ejected the device in `slot` of segment `segment`:
    /// the device goes (threads, interrupts, BAR space), then its host side (image, TAPs,
    /// connection), and it leaves the configuration (its id can be used again).
    fn ejected(&mut self, instance: u64, segment: u16, slot: u8) {
        let Some(booted) = self.booted.as_mut().filter(|b| b.instance == instance) else {
            return;
        };
        let Some(config) = &mut self.config else {
            return;
        };
        // A guest may eject any slot: only devices the configuration lists (not the rng,
        // console or balloon) go, whether or not the host asked.
        let removable = booted
            .vm
            .devices()
            .id_at(segment, slot)
            .is_some_and(|id| DeviceSpec::all(config).iter().any(|d| d.id() == Some(id)));
        if !removable {
            log::warn!(
                "the guest ejected {segment:04x}:00:{slot:02x}.0, where no removable device is"
            );
            return;
        }
        let Some(id) = booted.vm.eject(segment, slot) else {
            return;
        };
        booted.board.remove_device(&id);
        let released = forget_device(config, &id).unwrap_or_default();
        self.fds.release(&released);
        self.events.emit("vm", "device-removed", &[("id", &id)]);
    }

    /// `vm.resize`: the vCPU count (hotplug on a booted VM, see [`Vmm::resize_vcpus`]), the
    /// RAM size (before boot in the configuration; on a booted VM RAM is hot-added, see
    /// [`Vmm::resize_ram`]), then the balloon's target (in the configuration, and in the running
    /// guest), in Cloud Hypervisor's order.
    /// On a booted VM the event monitor gets `vm/resizing`, then `vm/resized` if it worked
    /// (as Cloud Hypervisor's `Vm::resize` emits them).
    fn resize(&mut self, resize: &vm_config::requests::VmResizeData) -> ApiReply {
        let booted = self.booted.is_some();
        if booted {
            self.events.emit("vm", "resizing", &[]);
        }
        let reply = self.apply_resize(resize);
        if booted && reply.is_ok() {
            self.events.emit("vm", "resized", &[]);
        }
        reply
    }

    /// The changes of [`Vmm::resize`].
    fn apply_resize(&mut self, resize: &vm_config::requests::VmResizeData) -> ApiReply {
        const CONTEXT: &str = "The VM could not be resized";
        if let Some(desired) = resize.desired_vcpus {
            self.resize_vcpus(desired)?;
        }
        if let Some(bytes) = resize.desired_ram {
            self.resize_ram(bytes)?;
        }
        let Some(bytes) = resize.desired_balloon else {
            return Ok(ApiBody::NoContent);
        };
        let Some(config) = &mut self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let Some(balloon) = &mut config.balloon else {
            return Err(ApiError::plain(
                500,
                &[CONTEXT, "the VM has no balloon device (--balloon)"],
            ));
        };
        if bytes >= config.memory.size {
            return Err(ApiError::plain(
                500,
                &[
                    CONTEXT,
                    &format!(
                        "desired_balloon {bytes} is not below the RAM size {}",
                        config.memory.size
                    ),
                ],
            ));
        }
        balloon.size = bytes;
        if let Some(b) = &self.booted {
            b.vm.resize_balloon(bytes)
                .map_err(|e| vm_error(CONTEXT, &e))?;
        }
        Ok(ApiBody::NoContent)
    }

    /// `vm.resize desired_ram`: before boot the configuration's RAM size changes (if the
    /// result is valid); on a booted VM RAM grows by ACPI memory hotplug ([`Vm::resize_memory`])
    /// and the configuration follows, as in Cloud Hypervisor, so `vm.info` shows the new size
    /// and a reboot starts with it.
    fn resize_ram(&mut self, bytes: u64) -> ApiReply {
        const CONTEXT: &str = "The VM could not be resized";
        let Some(config) = &mut self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let Some(booted) = &mut self.booted else {
            let mut changed = config.clone();
            changed.memory.size = bytes;
            changed
                .validate()
                .map_err(|e| ApiError::new(config_status(&e), CONTEXT, &e))?;
            *config = changed;
            return Ok(ApiBody::NoContent);
        };
        booted
            .vm
            .resize_memory(bytes)
            .map_err(|e| vm_error(CONTEXT, &e))?;
        config.memory.size = bytes;
        Ok(ApiBody::NoContent)
    }

    /// `vm.resize-disk` on a booted VM: the disk's image gets the new size and the guest a
    /// configuration change interrupt ([`Board::resize_disk`]); the configuration holds no
    /// size, so `vm.info` is unchanged.
    fn resize_disk(&mut self, resize: &vm_config::requests::VmResizeDiskData) -> ApiReply {
        let Some(booted) = &self.booted else {
            return Err(ApiError::plain(500, &["VM is not running"]));
        };
        booted
            .board
            .resize_disk(&resize.id, resize.desired_size)
            .map_err(|e| ApiError::new(e.status(), "The disk could not be resized", &e))?;
        let size = resize.desired_size.to_string();
        self.events
            .emit("vm", "disk-resized", &[("id", &resize.id), ("size", &size)]);
        Ok(ApiBody::NoContent)
    }

    /// `vm.resize` with `desired_vcpus`, as Cloud Hypervisor does: before boot the
    /// configuration's `boot_vcpus` changes (400 if it is then invalid); on a booted VM the
    /// vCPUs grow (hot-added, the guest told) or shrink (the guest asked to eject the top ones,
    /// which go when it has), 429 while an earlier removal is pending, 500 for 0 or more than
    /// `max_vcpus`. Either way `config.cpus.boot_vcpus` (in `vm.info`) says `desired`.
    fn resize_vcpus(&mut self, desired: u32) -> ApiReply {
        const CONTEXT: &str = "The VM could not be resized";
        let Some(config) = &mut self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let Some(booted) = &mut self.booted else {
            let Ok(boot_vcpus) = u8::try_from(desired) else {
                return Err(ApiError::plain(
                    400,
                    &[CONTEXT, &format!("desired_vcpus {desired} is too large")],
                ));
            };
            let mut changed = config.clone();
            changed.cpus.boot_vcpus = boot_vcpus;
            changed
                .validate()
                .map_err(|e| ApiError::new(config_status(&e), CONTEXT, &e))?;
            *config = changed;
            return Ok(ApiBody::NoContent);
        };
        booted.vm.resize_vcpus(desired).map_err(|e| match e {
            // Cloud Hypervisor answers this one with the bare HTTP reason.
            VmError::Resize(ResizeError::RemovalPending) => ApiError {
                status: 429,
                messages: vec!["Too Many Requests".into()],
            },
            e => vm_error(CONTEXT, &e),
        })?;
        // At most max_vcpus (a u8) once the resize succeeded.
        config.cpus.boot_vcpus = u8::try_from(desired).unwrap_or(u8::MAX);
        Ok(ApiBody::NoContent)
    }

    /// `vm.remove-device`: before boot the device leaves the configuration; on a booted VM
    /// the guest is asked to eject it, and it goes when it has ([`Vmm::ejected`]).
    fn remove_device(&mut self, id: &str) -> ApiReply {
        let Some(config) = &mut self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let not_found = || {
            ApiError::plain(
                404,
                &[
                    "The device could not be removed",
                    &format!("no device with id {id}"),
                ],
            )
        };
        if let Some(booted) = &mut self.booted {
            let known = DeviceSpec::all(config).iter().any(|d| d.id() == Some(id));
            if !known {
                return Err(not_found());
            }
            booted
                .vm
                .request_removal(id)
                .map_err(|e| vm_error("The device could not be removed", &e))?;
            return Ok(ApiBody::NoContent);
        }
        let released = forget_device(config, id);
        if released.is_none() {
            return Err(not_found());
        }
        self.fds.release(&released.unwrap_or_default());
        Ok(ApiBody::NoContent)
    }

    /// The sink of instance `instance`'s power events and failures.
    fn sink(&self, instance: u64) -> EventSink {
        let sender = self.sender.clone();
        Box::new(move |event| {
            let _ = sender.send(Command::Guest { instance, event });
        })
    }

    fn boot(&mut self) -> ApiReply {
        let Some(config) = &mut self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        config.name_devices();
        config
            .validate()
            .map_err(|e| ApiError::new(config_status(&e), "The VM could not boot", &e))?;
        let config = config.clone();
        self.events.emit("vm", "booting", &[]);
        self.prepare_console(&config);
        let board = Board::new(&config, &self.fds, self.input.clone(), self.start)
            .map_err(|e| vm_error("The VM could not boot", &e))?;
        // The board found every image of unknown format to be raw: say so in vm.info; and
        // the PTYs it allocated are shown in `file`, where libvirt reads them.
        if let Some(stored) = &mut self.config {
            let [serial, console, debug] = board.pty_paths();
            for (file, pty) in [
                (&mut stored.serial.file, serial),
                (&mut stored.console.file, console),
                (&mut stored.debug_console.file, debug),
            ] {
                if let Some(path) = pty {
                    *file = Some(path.to_path_buf());
                }
            }
            for d in stored.disks.iter_mut().flatten() {
                if !d.vhost_user && d.image_type == vm_config::ImageType::Unknown {
                    d.image_type = vm_config::ImageType::Raw;
                }
            }
        }
        let vm = self
            .instance(&config, &board)
            .map_err(|e| vm_error("The VM could not boot", &e))?;
        self.booted = Some(Booted {
            board,
            vm,
            instance: self.instances,
            boots: 1,
        });
        self.state = VmState::Running;
        log::info!(
            "VM is running ({} vCPUs, {} MiB)",
            config.cpus.boot_vcpus,
            config.memory.size >> 20
        );
        self.events.emit("vm", "booted", &[]);
        Ok(ApiBody::NoContent)
    }

    /// Where instance `instance`'s devices' requests go.
    fn device_requests(&self, instance: u64) -> crate::device_manager::DeviceRequests {
        let sender = self.sender.clone();
        Arc::new(move |id: &str| {
            let _ = sender.send(Command::Device {
                instance,
                id: id.to_string(),
            });
        })
    }

    /// Where instance `instance`'s guest's ejections of hot-removed devices go.
    fn ejects(&self, instance: u64) -> devices::pci_hotplug::EjectHandler {
        let sender = self.sender.clone();
        Arc::new(move |segment, slot| {
            let _ = sender.send(Command::Eject {
                instance,
                segment,
                slot,
            });
        })
    }

    /// Where instance `instance`'s guest's ejections of vCPUs go.
    fn cpu_ejects(&self, instance: u64) -> devices::cpu_hotplug::CpuEjectHandler {
        let sender = self.sender.clone();
        Arc::new(move |cpu| {
            let _ = sender.send(Command::EjectVcpu { instance, cpu });
        })
    }

    /// Builds and starts a new instance of the machine on `board`.
    fn instance(&mut self, config: &VmConfig, board: &Board) -> Result<Vm, VmError> {
        self.instances += 1;
        let mut vm = Vm::new(
            self.hv.as_ref(),
            config,
            board,
            self.sink(self.instances),
            InstanceHandlers {
                requests: self.device_requests(self.instances),
                ejects: self.ejects(self.instances),
                cpu_ejects: self.cpu_ejects(self.instances),
            },
        )?;
        vm.start()?;
        Ok(vm)
    }

    /// Standard input goes to the guest when a console or the serial port is `tty`: the
    /// terminal switches to raw mode and one thread forwards it, for the VMM's lifetime.
    fn prepare_console(&mut self, config: &VmConfig) {
        let tty = ConsoleOutputMode::Tty;
        if config.serial.mode != tty && config.console.mode != tty {
            return;
        }
        if self.terminal.is_none() {
            self.terminal = Some(TerminalGuard::raw_stdin());
        }
        if !self.stdin_forwarded {
            match spawn_forwarder(std::io::stdin(), self.input.clone()) {
                Ok(()) => self.stdin_forwarded = true,
                Err(e) => log::warn!("no console input: cannot start its thread: {e}"),
            }
        }
    }

    /// Tears the booted VM down (vCPUs stopped, devices' threads joined, then the host side
    /// closed).
    fn shutdown(&mut self) {
        if let Some(booted) = self.booted.take() {
            let Booted { board, vm, .. } = booted;
            drop(vm);
            board.detach_inputs();
            drop(board);
            self.state = VmState::Shutdown;
            log::info!("VM shut down");
            self.events.emit("vm", "shutdown", &[]);
        }
    }

    fn delete(&mut self) {
        self.shutdown();
        if self.config.take().is_some() {
            self.fds.clear();
            self.events.emit("vm", "deleted", &[]);
        }
    }

    /// Replaces the running instance with a fresh one on the same board (guest reset or
    /// `vm.reboot`).
    fn reboot(&mut self) -> ApiReply {
        self.events.emit("vm", "rebooting", &[]);
        let (Some(config), Some(booted)) = (self.config.clone(), self.booted.take()) else {
            return Err(ApiError::plain(404, &["VM is not booted"]));
        };
        let Booted {
            board, vm, boots, ..
        } = booted;
        drop(vm);
        board.detach_inputs();
        match self.instance(&config, &board) {
            Ok(vm) => {
                self.booted = Some(Booted {
                    board,
                    vm,
                    instance: self.instances,
                    boots: boots + 1,
                });
                self.state = VmState::Running;
                self.events.emit("vm", "rebooted", &[]);
                Ok(ApiBody::NoContent)
            }
            Err(e) => {
                drop(board);
                self.state = VmState::Shutdown;
                self.events.emit("vm", "shutdown", &[]);
                Err(vm_error("The VM could not reboot", &e))
            }
        }
    }

    fn with_vm(
        &mut self,
        context: &str,
        f: impl FnOnce(&mut Vm) -> Result<(), VmError>,
    ) -> ApiReply {
        let Some(booted) = &mut self.booted else {
            return Err(ApiError::plain(500, &["VM is not running"]));
        };
        f(&mut booted.vm).map_err(|e| vm_error(context, &e))?;
        Ok(ApiBody::NoContent)
    }

    fn pause(&mut self) -> ApiReply {
        self.events.emit("vm", "pausing", &[]);
        self.with_vm("The VM could not be paused", Vm::pause)?;
        self.state = VmState::Paused;
        self.events.emit("vm", "paused", &[]);
        Ok(ApiBody::NoContent)
    }

    fn resume(&mut self) -> ApiReply {
        self.events.emit("vm", "resuming", &[]);
        self.with_vm("The VM could not be resumed", |vm| {
            vm.resume();
            Ok(())
        })?;
        self.state = VmState::Running;
        self.events.emit("vm", "resumed", &[]);
        Ok(ApiBody::NoContent)
    }

    fn info(&self) -> ApiReply {
        let Some(config) = &self.config else {
            return Err(ApiError::plain(404, &["VM is not created"]));
        };
        let info = VmInfo {
            config,
            state: self.state,
            memory_actual_size: config
                .memory
                .size
                .saturating_sub(self.booted.as_ref().map_or(0, |b| b.vm.balloon_bytes())),
            device_tree: self.booted.as_ref().map(|b| b.vm.devices().device_tree()),
        };
        json_reply(&info)
    }

    fn counters(&self) -> ApiReply {
        let Some(booted) = &self.booted else {
            return Err(ApiError::plain(500, &["VM is not running"]));
        };
        json_reply(&booted.vm.devices().counters())
    }

    /// Handles the first event of instance `instance`; `Some` when the VMM must exit.
    fn guest_event(&mut self, instance: u64, event: VmEvent) -> Option<Outcome> {
        if self.booted.as_ref().map(|b| b.instance) != Some(instance) {
            log::debug!("stale event {event:?} of VM instance {instance}");
            return None;
        }
        match event {
            VmEvent::PowerOff => {
                let boots = self.booted.as_ref().map_or(0, |b| b.boots);
                log::info!("guest powered off after {boots} boot(s)");
                self.delete();
                self.events.emit("vmm", "shutdown", &[]);
                Some(Outcome::Done)
            }
            VmEvent::Reset => {
                log::info!("guest reset; rebooting");
                match self.reboot() {
                    Ok(_) => None,
                    Err(e) => Some(Outcome::Failed(e.messages[1..].join(": "))),
                }
            }
            VmEvent::Failed(why) => {
                log::error!("the VM failed: {why}");
                self.delete();
                self.events.emit("vmm", "shutdown", &[]);
                Some(Outcome::Failed(format!("the VM failed: {why}")))
            }
        }
    }
}

/// Takes device `id` out of `config`; the descriptors it held (a NIC's TAP fds), or `None`
/// when no such device is there.
fn forget_device(config: &mut VmConfig, id: &str) -> Option<Vec<i32>> {
    let has = |d: &Option<String>| d.as_deref() == Some(id);
    let mut released = Vec::new();
    let mut found = false;
    if let Some(disks) = &mut config.disks {
        let before = disks.len();
        disks.retain(|d| !has(&d.id));
        found |= disks.len() != before;
    }
    if let Some(nets) = &mut config.net {
        for n in nets.iter().filter(|n| has(&n.id)) {
            released.extend(n.fds.iter().flatten().copied());
        }
        let before = nets.len();
        nets.retain(|n| !has(&n.id));
        found |= nets.len() != before;
    }
    if let Some(fs) = &mut config.fs {
        let before = fs.len();
        fs.retain(|f| !has(&f.id));
        found |= fs.len() != before;
    }
    if config.vsock.as_ref().is_some_and(|v| has(&v.id)) {
        config.vsock = None;
        found = true;
    }
    if let Some(pmem) = &mut config.pmem {
        let before = pmem.len();
        pmem.retain(|p| !has(&p.id));
        found |= pmem.len() != before;
    }
    found.then_some(released)
}

fn json_reply<T: Serialize>(value: &T) -> ApiReply {
    serde_json::to_vec(value)
        .map(ApiBody::Json)
        .map_err(|e| ApiError::new(500, "The answer could not be encoded", &e))
}

fn vm_error(context: &str, e: &VmError) -> ApiError {
    let status = match e {
        VmError::Config(c) => config_status(c),
        _ => 500,
    };
    ApiError::new(status, context, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> [Option<VmState>; 5] {
        [
            None,
            Some(VmState::Created),
            Some(VmState::Running),
            Some(VmState::Paused),
            Some(VmState::Shutdown),
        ]
    }

    fn legal_in(request: &ApiRequest) -> Vec<Option<VmState>> {
        states()
            .into_iter()
            .filter(|s| legality(*s, request).is_ok())
            .collect()
    }

    #[test]
    fn the_state_machine_allows_what_cloud_hypervisor_allows() {
        use VmState::*;
        assert_eq!(
            legal_in(&ApiRequest::VmBoot),
            [Some(Created), Some(Shutdown)]
        );
        assert_eq!(legal_in(&ApiRequest::VmPause), [Some(Running)]);
        assert_eq!(legal_in(&ApiRequest::VmResume), [Some(Paused)]);
        assert_eq!(
            legal_in(&ApiRequest::VmShutdown),
            [Some(Running), Some(Paused)]
        );
        assert_eq!(
            legal_in(&ApiRequest::VmReboot),
            [Some(Running), Some(Paused)]
        );
        assert_eq!(legal_in(&ApiRequest::VmDelete).len(), 5);
        assert_eq!(legal_in(&ApiRequest::VmInfo).len(), 4);
        assert_eq!(legal_in(&ApiRequest::VmCreate(Box::default())), [None]);
        assert_eq!(
            legal_in(&ApiRequest::RemoveDevice("_disk0".into())).len(),
            4,
            "before boot (configuration) and after (hotplug)"
        );
        assert!(legal_in(&ApiRequest::NotYet("vm.snapshot")).is_empty());
        let pmem = vm_config::PmemConfig {
            file: "/p".into(),
            size: None,
            iommu: false,
            discard_writes: false,
            id: None,
            pci_segment: 0,
        };
        assert_eq!(legal_in(&ApiRequest::AddPmem(Box::new(pmem))).len(), 4);
        assert_eq!(
            legal_in(&ApiRequest::VmResize(Default::default())).len(),
            4,
            "vm.resize needs a VM, in any state"
        );
        let resize_disk = ApiRequest::ResizeDisk(vm_config::requests::VmResizeDiskData {
            id: "_disk0".into(),
            desired_size: 1 << 20,
        });
        assert_eq!(
            legal_in(&resize_disk),
            [Some(Running), Some(Paused)],
            "vm.resize-disk needs the images open"
        );
    }

    #[test]
    fn illegal_requests_say_why_with_cloud_hypervisors_status() {
        let e = legality(None, &ApiRequest::VmInfo).expect_err("no VM");
        assert_eq!(
            (e.status, e.messages[1].as_str()),
            (404, "VM is not created")
        );
        let e = legality(Some(VmState::Created), &ApiRequest::VmPause).expect_err("not running");
        assert_eq!(e.status, 500);
        let e = legality(
            Some(VmState::Running),
            &ApiRequest::VmCreate(Box::default()),
        )
        .expect_err("twice");
        assert!(e.messages[1].contains("already created"));
        let resize_disk = ApiRequest::ResizeDisk(vm_config::requests::VmResizeDiskData {
            id: "_disk0".into(),
            desired_size: 1 << 20,
        });
        for state in [VmState::Created, VmState::Shutdown] {
            let e = legality(Some(state), &resize_disk).expect_err("not booted");
            assert_eq!(
                (e.status, e.messages[1].as_str()),
                (500, "VM is not running")
            );
        }
        let e = legality(None, &resize_disk).expect_err("no VM");
        assert_eq!(e.status, 404);
        let e = legality(Some(VmState::Running), &ApiRequest::NotYet("vm.snapshot"))
            .expect_err("later");
        assert!(e.messages[1].contains("vm.snapshot"), "{e:?}");
    }
}
