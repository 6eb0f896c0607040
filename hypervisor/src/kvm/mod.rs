//! KVM implementation of the hypervisor traits, on kvm-ioctls.
//!
//! Two choices worth knowing:
//! - The in-kernel irqchip (PIC, IOAPIC, LAPICs) is full, not split: the IOAPIC stays in the kernel,
//!   so level and edge GSIs, MSI routing and irqfds work with no userspace interrupt controller.
//!   It is created *after* guest memory is registered (creating it first makes each memory
//!   registration stall; measured ~5 ms here).
//! - No in-kernel PIT: modern guests do not need it and its teardown costs ~15 ms at VM exit.

mod convert;
pub mod ioctls;

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    CpuIdEntry, FpuState, HypervisorError, IoEventAddress, LapicState, MsrEntry, Result,
    SpecialRegisters, StandardRegisters, Vcpu, VmExit,
};

/// Default path of the KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Address where KVM places the three-page TSS needed by Intel's real-mode emulation.
/// It sits just below the IOAPIC, inside the 32-bit MMIO hole, away from RAM and PCI windows.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

fn op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Op {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// KVM opened from a device node.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `path` (normally [`KVM_DEVICE`]) and checks it speaks KVM API version 12 with the
    /// capabilities Nimbus needs.
    pub fn open(path: &str) -> Result<Self> {
        let c_path = std::ffi::CString::new(path).map_err(|_| HypervisorError::Open {
            path: path.to_string(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let fd = Kvm::open_with_cloexec_at(&c_path, true).map_err(|e| HypervisorError::Open {
            path: path.to_string(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        // SAFETY: `fd` was just opened by us and is owned by nothing else.
        let kvm = unsafe { Kvm::from_raw_fd(fd) };
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::ApiVersion {
                path: path.to_string(),
                version,
            });
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(Self { kvm })
    }
}

impl crate::Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Arc<dyn crate::Vm>> {
        let fd = self.kvm.create_vm().map_err(op("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(op("KVM_SET_TSS_ADDR"))?;
        Ok(Arc::new(KvmVm {
            fd,
            irqchip: Mutex::new(false),
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(op("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(convert::cpuid_from_kvm)
            .collect())
    }
}

/// A KVM virtual machine.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    irqchip: Mutex<bool>,
}

impl crate::Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
        readonly: bool,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the host range stays valid while the slot exists.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(op("KVM_SET_USER_MEMORY_REGION"))
    }

    fn unmap_memory(&self, slot: u32) -> Result<()> {
        // A size of 0 deletes the slot.
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot maps nothing.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(op("KVM_SET_USER_MEMORY_REGION (delete)"))
    }

    fn create_irqchip(&self) -> Result<()> {
        let mut created = self.irqchip.lock().unwrap_or_else(|p| p.into_inner());
        if !*created {
            self.fd
                .create_irq_chip()
                .map_err(op("KVM_CREATE_IRQCHIP"))?;
            *created = true;
        }
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(op("KVM_CREATE_VCPU"))?;
        Ok(Box::new(KvmVcpu { fd }))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(op("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(op("KVM_IRQFD(deassign)"))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()> {
        self.ioevent(true, fd, addr, datamatch)
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()> {
        self.ioevent(false, fd, addr, datamatch)
    }

    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.fd.set_irq_line(gsi, level).map_err(op("KVM_IRQ_LINE"))
    }

    fn set_gsi_routing(&self, routes: &[crate::IrqRoute]) -> Result<()> {
        let entries: Vec<_> = routes.iter().map(convert::irq_route_to_kvm).collect();
        let table = kvm_bindings::KvmIrqRouting::from_entries(&entries).map_err(|_| {
            HypervisorError::Op {
                op: "KVM_SET_GSI_ROUTING",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            }
        })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(op("KVM_SET_GSI_ROUTING"))
    }

    fn clock(&self) -> Result<u64> {
        self.fd
            .get_clock()
            .map(|c| c.clock)
            .map_err(op("KVM_GET_CLOCK"))
    }

    fn set_clock(&self, ns: u64) -> Result<()> {
        // No flags: KVM_CLOCK_REALTIME would make KVM add the time elapsed since the read.
        let data = kvm_bindings::kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.fd.set_clock(&data).map_err(op("KVM_SET_CLOCK"))
    }
}

/// A KVM vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        let run_ptr: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VmExit::Interrupted)
            }
            Err(e) => return Err(op("KVM_RUN")(e)),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
            VcpuExit::Hlt => VmExit::Halt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VmExit::Reset,
            VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VmExit::PowerOff,
            VcpuExit::FailEntry(reason, _cpu) => VmExit::FailEntry { reason },
            VcpuExit::InternalError => {
                // SAFETY: `run_ptr` points into the kvm_run mapping owned by `self.fd`, which is
                // alive; the exit reason says the `internal` union member is the valid one.
                let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                VmExit::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
            other => VmExit::Unexpected(format!("{other:?}")),
        })
    }

    fn regs(&self) -> Result<StandardRegisters> {
        self.fd
            .get_regs()
            .map(|r| convert::regs_from_kvm(&r))
            .map_err(op("KVM_GET_REGS"))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(op("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        self.fd
            .get_sregs()
            .map(|s| convert::sregs_from_kvm(&s))
            .map_err(op("KVM_GET_SREGS"))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        // Start from the current state so fields the neutral type does not carry
        // (the pending-interrupt bitmap) keep their values.
        let mut kvm_sregs = self.fd.get_sregs().map_err(op("KVM_GET_SREGS"))?;
        convert::sregs_into_kvm(sregs, &mut kvm_sregs);
        self.fd.set_sregs(&kvm_sregs).map_err(op("KVM_SET_SREGS"))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let kvm_fpu = kvm_bindings::kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&kvm_fpu).map_err(op("KVM_SET_FPU"))
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let kvm_entries: Vec<_> = entries.iter().map(convert::cpuid_to_kvm).collect();
        let cpuid =
            kvm_bindings::CpuId::from_entries(&kvm_entries).map_err(|_| HypervisorError::Op {
                op: "KVM_SET_CPUID2",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            })?;
        self.fd.set_cpuid2(&cpuid).map_err(op("KVM_SET_CPUID2"))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<_> = msrs
            .iter()
            .map(|m| kvm_bindings::kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs =
            kvm_bindings::Msrs::from_entries(&entries).map_err(|_| HypervisorError::Op {
                op: "KVM_SET_MSRS",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            })?;
        let written = self.fd.set_msrs(&kvm_msrs).map_err(op("KVM_SET_MSRS"))?;
        if written != msrs.len() {
            return Err(HypervisorError::Op {
                op: "KVM_SET_MSRS",
                source: std::io::Error::other(format!(
                    "MSR {:#x} rejected",
                    msrs.get(written).map_or(0, |m| m.index)
                )),
            });
        }
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut kvm_msrs =
            kvm_bindings::Msrs::from_entries(&entries).map_err(|_| HypervisorError::Op {
                op: "KVM_GET_MSRS",
                source: std::io::Error::from_raw_os_error(libc::E2BIG),
            })?;
        let read = self
            .fd
            .get_msrs(&mut kvm_msrs)
            .map_err(op("KVM_GET_MSRS"))?;
        if read != indices.len() {
            return Err(HypervisorError::Op {
                op: "KVM_GET_MSRS",
                source: std::io::Error::other(format!(
                    "MSR {:#x} not readable",
                    indices.get(read).copied().unwrap_or(0)
                )),
            });
        }
        Ok(kvm_msrs
            .as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect())
    }

    fn nmi(&self) -> Result<()> {
        self.fd.nmi().map_err(op("KVM_NMI"))
    }

    fn lapic(&self) -> Result<LapicState> {
        let klapic = self.fd.get_lapic().map_err(op("KVM_GET_LAPIC"))?;
        let mut state = LapicState::default();
        for (dst, src) in state.regs.iter_mut().zip(klapic.regs.iter()) {
            *dst = src.to_ne_bytes()[0];
        }
        Ok(state)
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        let mut klapic = kvm_bindings::kvm_lapic_state::default();
        for (dst, src) in klapic.regs.iter_mut().zip(lapic.regs.iter()) {
            *dst = i8::from_ne_bytes([*src]) as _;
        }
        self.fd.set_lapic(&klapic).map_err(op("KVM_SET_LAPIC"))
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }
}

impl KvmVm {
    /// Assigns (or deassigns) an ioeventfd; kvm-ioctls takes the datamatch as a type parameter.
    fn ioevent(
        &self,
        assign: bool,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()> {
        let addr = convert::ioevent_addr(addr);
        let result = match (assign, datamatch) {
            (true, Some(v)) => self.fd.register_ioevent(fd, &addr, v),
            (true, None) => self.fd.register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
            (false, Some(v)) => self.fd.unregister_ioevent(fd, &addr, v),
            (false, None) => self
                .fd
                .unregister_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
        };
        result.map_err(op(if assign {
            "KVM_IOEVENTFD"
        } else {
            "KVM_IOEVENTFD(deassign)"
        }))
    }

    /// The VM file descriptor number (for logs).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}
