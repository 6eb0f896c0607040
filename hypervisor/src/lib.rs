//! The hypervisor seam of Nimbus.
//!
//! Everything above this crate talks to a [`Hypervisor`], a [`Vm`] and its [`Vcpu`]s through the
//! traits defined here, using the vendor-neutral register types of [`x86_64`]. The only
//! implementation today is KVM ([`kvm`]); nothing else in the tree calls kvm-ioctls.
#![deny(missing_docs)]

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod kvm;
pub mod x86_64;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use x86_64::{
    CpuIdEntry, DescriptorTable, FpuState, LapicState, MsrEntry, Segment, SpecialRegisters,
    StandardRegisters,
};

/// Errors reported by a hypervisor implementation.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor device could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// Device path, e.g. `/dev/kvm`.
        path: String,
        /// Why opening failed.
        #[source]
        source: std::io::Error,
    },
    /// The device answers, but not with the API version this code speaks.
    #[error("{path} is not a usable KVM device (API version {version}, want 12)")]
    ApiVersion {
        /// Device path.
        path: String,
        /// Version reported (-1 when the ioctl itself failed).
        version: i32,
    },
    /// A capability Nimbus relies on is missing.
    #[error("the hypervisor lacks {0}")]
    MissingCapability(&'static str),
    /// An operation on the hypervisor failed.
    #[error("{op} failed")]
    Op {
        /// What was attempted, e.g. `KVM_SET_SREGS`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// The guest read from an I/O port; fill `data` before the next run.
    IoIn {
        /// Port number.
        port: u16,
        /// Bytes to fill (1, 2 or 4).
        data: &'a mut [u8],
    },
    /// The guest wrote to an I/O port.
    IoOut {
        /// Port number.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest read from an unbacked physical address; fill `data` before the next run.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// The guest wrote to an unbacked physical address.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest executed HLT with no in-kernel interrupt controller to wait on it.
    Halt,
    /// The guest triple-faulted (or otherwise shut the CPU down); the machine resets.
    Shutdown,
    /// The guest requested a reset through a hypervisor-level interface (e.g. PSCI).
    Reset,
    /// The guest requested power-off through a hypervisor-level interface.
    PowerOff,
    /// `run` returned because the thread was signalled; check for requests and run again.
    Interrupted,
    /// The hypervisor could not emulate something; the VM cannot continue.
    InternalError {
        /// Hypervisor-specific reason code.
        suberror: u32,
        /// Extra words the hypervisor supplied.
        data: Vec<u64>,
    },
    /// Entering the guest failed.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// Any other exit, described for the log; the VM cannot continue.
    Unexpected(String),
}

/// Address that an ioeventfd watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// An I/O port.
    Pio(u64),
    /// A guest physical MMIO address.
    Mmio(u64),
}

/// Interrupt controller pins a GSI can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqChip {
    /// The master 8259 (IRQ 0-7).
    PicMaster,
    /// The slave 8259 (IRQ 8-15).
    PicSlave,
    /// The IOAPIC.
    Ioapic,
}

/// Where a GSI goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqRoute {
    /// An interrupt controller pin.
    Irqchip {
        /// Global system interrupt number.
        gsi: u32,
        /// Controller.
        chip: IrqChip,
        /// Pin on the controller.
        pin: u32,
    },
    /// A message-signalled interrupt.
    Msi {
        /// Global system interrupt number.
        gsi: u32,
        /// Message address.
        address: u64,
        /// Message data.
        data: u32,
    },
}

/// The routes of a PC's legacy GSIs: 0-15 to both 8259s and the IOAPIC, 16-23 to the IOAPIC.
pub fn legacy_irq_routes(ioapic_pins: u32) -> Vec<IrqRoute> {
    let mut routes = Vec::new();
    for gsi in 0..ioapic_pins {
        routes.push(IrqRoute::Irqchip {
            gsi,
            chip: IrqChip::Ioapic,
            pin: gsi,
        });
        if gsi < 16 {
            let chip = if gsi < 8 {
                IrqChip::PicMaster
            } else {
                IrqChip::PicSlave
            };
            routes.push(IrqRoute::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
    }
    routes
}

/// A hypervisor able to create virtual machines.
pub trait Hypervisor: Send + Sync {
    /// Creates a VM with no memory and no vCPUs.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID leaves the hypervisor can virtualize on this host.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
}

/// One virtual machine: memory slots, interrupt controller, interrupt and notification fds.
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr` in `slot`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped and valid for as long as the slot exists.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
        readonly: bool,
    ) -> Result<()>;
    /// Deletes memory slot `slot` (a mapping made by [`Vm::map_memory`]); the host range may
    /// be unmapped afterwards.
    fn unmap_memory(&self, slot: u32) -> Result<()>;
    /// Creates the interrupt controllers (LAPICs and the IOAPIC) in the hypervisor.
    fn create_irqchip(&self) -> Result<()>;
    /// Creates vCPU `id` (its APIC ID).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Makes each write to `fd` raise interrupt line `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Undoes [`Vm::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Signals `fd` instead of exiting when the guest writes `addr` (matching `datamatch` if set).
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()>;
    /// Undoes [`Vm::register_ioevent`].
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()>;
    /// Sets interrupt line `gsi` to `level`.
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()>;
    /// Replaces the whole GSI routing table.
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()>;
    /// Reads the VM's paravirtual clock (kvmclock) in nanoseconds.
    fn clock(&self) -> Result<u64>;
    /// Sets the VM's paravirtual clock, e.g. back to what [`Vm::clock`] read at pause, so a
    /// guest does not see time jump across it.
    fn set_clock(&self, ns: u64) -> Result<()>;
}

/// One virtual CPU. Owned by the thread that runs it.
pub trait Vcpu: Send + std::fmt::Debug {
    /// Runs guest code until the next exit that needs the VMM.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Reads the general purpose registers.
    fn regs(&self) -> Result<StandardRegisters>;
    /// Writes the general purpose registers.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    /// Reads the segment, control and descriptor table registers.
    fn sregs(&self) -> Result<SpecialRegisters>;
    /// Writes the segment, control and descriptor table registers.
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    /// Writes the x87/SSE state.
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    /// Sets the CPUID leaves this vCPU reports.
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    /// Writes model specific registers.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Reads the model specific registers numbered `indices`, in that order.
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>>;
    /// Injects a non-maskable interrupt, delivered at the next entry into the guest.
    fn nmi(&self) -> Result<()>;
    /// Reads the local APIC register page.
    fn lapic(&self) -> Result<LapicState>;
    /// Writes the local APIC register page.
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    /// Makes the next [`Vcpu::run`] return [`VmExit::Interrupted`] at once (or stops doing so).
    fn set_immediate_exit(&mut self, exit: bool);
}
