//! The vCPUs of one VM instance: how a vCPU is set up (the same at boot and when hot-added),
//! the threads that run them, and vCPU hotplug through the ACPI CPU hotplug registers
//! (`vm.resize` with `desired_vcpus`).
//!
//! vCPU `i` (KVM vCPU id = its APIC ID) is present while a thread runs it. Growing creates the
//! missing vCPUs (or takes back the ones parked by an earlier removal), starts their threads,
//! marks them inserted in the registers and lets the caller raise the GED: the guest sees a
//! device check on `\_SB_.CPxx` and starts the CPU with INIT-SIPI-SIPI (KVM creates every vCPU
//! but the boot one waiting for INIT, like an x86 AP). Shrinking marks the top vCPUs for
//! removal; once the guest has stopped one, it writes EJECT and [`Vcpus::ejected`] stops the
//! thread. KVM cannot destroy a single vCPU, so its fd is parked here and reused if the vCPU is
//! added again (the guest's INIT resets it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use arch::x86_64::topology::Topology;
use arch::x86_64::{cpu, cpuid};
use devices::cpu_hotplug::CpuHotplug;
use hypervisor::{CpuIdEntry, Hypervisor, MsrEntry, Vcpu};
use vm_config::VmConfig;

use crate::vcpu::{self, VcpuContext, VcpuThread};
use crate::vm::VmError;

/// Why a vCPU resize is refused (the texts are Cloud Hypervisor's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResizeError {
    /// `desired_vcpus` was 0.
    #[error("Requested zero vCPUs")]
    Zero,
    /// `desired_vcpus` was above `max_vcpus`.
    #[error("Requested vCPUs exceed maximum")]
    AboveMax,
    /// The guest has not yet ejected a vCPU an earlier resize removed (HTTP 429).
    #[error("Still pending removed vCPU")]
    RemovalPending,
}

/// What every vCPU of an instance is set up with.
#[derive(Debug)]
pub struct VcpuSetup {
    /// The hypervisor's CPUID, brand string filled in.
    supported: Vec<CpuIdEntry>,
    /// AMD's HWCR.TscFreqSel, when the host is AMD.
    hwcr: Option<MsrEntry>,
    topology: Topology,
    /// `cpus.nested`: leave the virtualization extensions visible.
    nested: bool,
}

impl VcpuSetup {
    /// The set-up for `config`'s vCPUs on `hv`.
    pub fn new(hv: &dyn Hypervisor, config: &VmConfig) -> Result<Self, VmError> {
        let mut supported = hv
            .supported_cpuid()
            .map_err(crate::vm::hv_err("reading the supported CPUID"))?;
        cpuid::fill_brand_string(&mut supported, &cpuid::host_brand_leaves());
        Ok(Self {
            hwcr: cpuid::amd_hwcr(&supported),
            supported,
            topology: config.cpus.presented_topology().arch(),
            nested: config.cpus.nested,
        })
    }

    /// Creates vCPU `id` (KVM's vCPU id is its APIC ID) with its CPUID, the boot MSRs, FPU and
    /// LAPIC pins. Its registers are the reset state: the boot vCPU's are set by the caller.
    pub fn create(&self, vm: &dyn hypervisor::Vm, id: u32) -> Result<Box<dyn Vcpu>, VmError> {
        let vcpu = vm
            .create_vcpu(self.topology.apic_id(id))
            .map_err(crate::vm::hv_err(format!("creating vcpu{id}")))?;
        let err = |what: &str| crate::vm::hv_err(format!("setting up vcpu{id}: {what}"));
        let mut table = cpuid::vcpu_cpuid(&self.supported, id, &self.topology);
        if !self.nested {
            cpuid::hide_virtualization(&mut table);
        }
        vcpu.set_cpuid(&table).map_err(err("CPUID"))?;
        vcpu.set_msrs(&cpu::boot_msrs()).map_err(err("MSRs"))?;
        if let Some(msr) = self.hwcr {
            // Best effort: older KVM refuses writes to HWCR; the guest then only logs a warning.
            if let Err(e) = vcpu.set_msrs(&[msr]) {
                log::debug!("vcpu{id}: HWCR.TscFreqSel not settable: {e}");
            }
        }
        vcpu.set_fpu(&cpu::boot_fpu()).map_err(err("FPU"))?;
        let mut lapic = vcpu.lapic().map_err(err("LAPIC"))?;
        cpu::set_lint_pins(&mut lapic);
        vcpu.set_lapic(&lapic).map_err(err("LAPIC"))?;
        Ok(vcpu)
    }
}

/// The vCPUs of an instance and their threads.
pub struct Vcpus {
    setup: VcpuSetup,
    hv_vm: Arc<dyn hypervisor::Vm>,
    ctx: VcpuContext,
    /// Host CPUs of the vCPUs that have an affinity (`--cpus affinity=`).
    affinity: Vec<vm_config::CpuAffinity>,
    /// `cpus.max_vcpus`.
    max: u32,
    /// The running vCPUs, in index order: `0..present`.
    threads: Vec<VcpuThread>,
    /// vCPUs created but not running: the boot vCPUs before [`Vcpus::start`], then the ones
    /// the guest ejected (parked fds).
    idle: BTreeMap<u32, Box<dyn Vcpu>>,
    /// Running vCPUs the guest was asked to eject and has not yet.
    removing: BTreeSet<u32>,
    /// The CPU hotplug registers the DSDT's processor objects read and write.
    registers: Arc<Mutex<CpuHotplug>>,
}

impl std::fmt::Debug for Vcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpus")
            .field("present", &self.threads.len())
            .field("idle", &self.idle.keys().collect::<Vec<_>>())
            .field("removing", &self.removing)
            .finish_non_exhaustive()
    }
}

impl Vcpus {
    /// The vCPUs `boot` (created with `setup`, index order, the boot vCPU's registers set),
    /// not yet running; up to `max` of them; `registers` is the CPU hotplug block on the bus.
    pub fn new(
        (setup, boot): (VcpuSetup, Vec<Box<dyn Vcpu>>),
        hv_vm: Arc<dyn hypervisor::Vm>,
        ctx: VcpuContext,
        config: &vm_config::CpusConfig,
        registers: Arc<Mutex<CpuHotplug>>,
    ) -> Self {
        Self {
            setup,
            hv_vm,
            ctx,
            affinity: config.affinity.clone().unwrap_or_default(),
            max: u32::from(config.max_vcpus),
            threads: Vec::new(),
            idle: (0u32..).zip(boot).collect(),
            removing: BTreeSet::new(),
            registers,
        }
    }

    fn registers(&self) -> MutexGuard<'_, CpuHotplug> {
        self.registers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts every created vCPU (at boot: the boot vCPUs).
    pub fn start(&mut self) -> Result<(), VmError> {
        let ids: Vec<u32> = self.idle.keys().copied().collect();
        for id in ids {
            self.run(id)?;
        }
        Ok(())
    }

    /// Starts a thread on vCPU `id`: its parked fd, or a new one.
    fn run(&mut self, id: u32) -> Result<(), VmError> {
        let vcpu = match self.idle.remove(&id) {
            Some(vcpu) => vcpu,
            None => self.setup.create(self.hv_vm.as_ref(), id)?,
        };
        let thread =
            VcpuThread::spawn(id, vcpu, self.ctx.clone()).map_err(|source| VmError::Os {
                what: "spawning a vCPU thread",
                source,
            })?;
        if let Some(a) = self.affinity.iter().find(|a| u32::from(a.vcpu) == id) {
            if let Err(source) = thread.pin(&a.host_cpus) {
                self.idle.extend(thread.stop().map(|vcpu| (id, vcpu)));
                return Err(VmError::Affinity {
                    vcpu: id,
                    host_cpus: a.host_cpus.clone(),
                    source,
                });
            }
            log::info!("vcpu{id}: pinned to host CPUs {:?}", a.host_cpus);
        }
        let at = self.threads.partition_point(|t| t.id() < id);
        self.threads.insert(at, thread);
        Ok(())
    }

    /// vCPUs running (including those the guest was asked to eject and has not yet).
    pub fn present(&self) -> u32 {
        u32::try_from(self.threads.len()).unwrap_or(u32::MAX)
    }

    /// Grows or shrinks the running vCPUs to `desired`, as Cloud Hypervisor does: nothing to
    /// do is fine; 0, a removal the guest has not finished, or more than `max_vcpus` are
    /// errors. `notify` tells the guest (a GED CPU hotplug event) when the registers changed,
    /// also when a vCPU could not be created after others were added (those stay).
    pub fn resize(
        &mut self,
        desired: u32,
        notify: impl FnOnce() -> Result<(), VmError>,
    ) -> Result<(), VmError> {
        self.reap();
        let present = self.present();
        if desired == present {
            return Ok(());
        }
        if desired == 0 {
            return Err(ResizeError::Zero.into());
        }
        if !self.removing.is_empty() {
            return Err(ResizeError::RemovalPending.into());
        }
        if desired > self.max {
            return Err(ResizeError::AboveMax.into());
        }
        if desired < present {
            for id in desired..present {
                self.removing.insert(id);
                self.registers().cpu_removing(id);
                log::info!("vcpu{id}: the guest is asked to eject it");
            }
            return notify();
        }
        let mut added = Ok(());
        for id in present..desired {
            added = self.run(id);
            if added.is_err() {
                break;
            }
            self.registers().cpu_added(id);
            log::info!("vcpu{id}: added");
        }
        if self.present() > present {
            notify()?;
        }
        added
    }

    /// The guest ejected vCPU `id` (after [`Vcpus::resize`] asked; the registers only report
    /// such ejections): its thread stops and its fd is parked. Returns whether it was still to
    /// do ([`Vcpus::resize`] may have seen the ejection in the registers first).
    pub fn ejected(&mut self, id: u32) -> bool {
        if !self.removing.contains(&id) {
            log::debug!("vcpu{id}: ejection already handled");
            return false;
        }
        self.remove(id)
    }

    /// Finishes the removals the guest has ejected (the registers no longer enable the vCPU)
    /// whose [`Vcpus::ejected`] call is still on its way, so that a resize counts what the
    /// guest sees.
    fn reap(&mut self) {
        let ejected: Vec<u32> = {
            let registers = self.registers();
            self.removing
                .iter()
                .copied()
                .filter(|&id| !registers.is_enabled(id))
                .collect()
        };
        for id in ejected {
            self.remove(id);
        }
    }

    /// Stops the thread of vCPU `id`, which the guest ejected, and parks its fd.
    fn remove(&mut self, id: u32) -> bool {
        self.removing.remove(&id);
        let Some(at) = self.threads.iter().position(|t| t.id() == id) else {
            return false;
        };
        let thread = self.threads.remove(at);
        if let Some(vcpu) = thread.stop() {
            self.idle.insert(id, vcpu);
        }
        log::info!("vcpu{id}: ejected by the guest; its thread ended");
        true
    }

    /// Parks every running vCPU between two guest exits.
    pub fn pause(&self) {
        vcpu::pause_all(&self.threads);
    }

    /// Lets the vCPUs parked by [`Vcpus::pause`] run again.
    pub fn resume(&self) {
        vcpu::resume_all(&self.threads);
    }

    /// Injects an NMI into every running vCPU.
    pub fn nmi(&self) {
        vcpu::nmi_all(&self.threads);
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.ctx.control.stop();
        for t in self.threads.drain(..) {
            t.stop();
        }
    }
}
