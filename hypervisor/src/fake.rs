//! A scripted [`Vcpu`] for tests of code that drives vCPUs, without `/dev/kvm`.
//!
//! Each [`Vcpu::run`] returns the next [`ScriptedExit`]; what the VMM writes into an `IoIn` or
//! `MmioRead` buffer is recorded and can be inspected through [`FakeVcpu::reads`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::{
    CpuIdEntry, FpuState, LapicState, MsrEntry, Result, SpecialRegisters, StandardRegisters, Vcpu,
    VmExit,
};

/// One exit a [`FakeVcpu`] will produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptedExit {
    /// A port read of `len` bytes.
    IoIn(u16, usize),
    /// A port write.
    IoOut(u16, Vec<u8>),
    /// An MMIO read of `len` bytes.
    MmioRead(u64, usize),
    /// An MMIO write.
    MmioWrite(u64, Vec<u8>),
    /// A triple fault.
    Shutdown,
    /// A hypervisor-level power-off request.
    PowerOff,
    /// An emulation failure.
    InternalError(u32),
    /// Something the VMM does not know.
    Unexpected(String),
}

/// Values read back by the VMM for `IoIn`/`MmioRead` exits: (address, bytes supplied).
pub type Reads = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// State a [`FakeVcpu`] keeps that tests inspect after the vCPU has moved to its thread.
#[derive(Debug, Default)]
pub struct FakeVcpuState {
    /// MSR values written (and readable back); unknown MSRs read as 0.
    pub msrs: std::collections::BTreeMap<u32, u64>,
    /// Every `set_msrs` call, in order.
    pub msr_writes: Vec<Vec<MsrEntry>>,
    /// NMIs injected.
    pub nmis: u32,
    /// `run` calls made with immediate exit set.
    pub immediate_exits: u32,
}

/// A vCPU that replays a script. When the script runs out it keeps returning
/// [`VmExit::Interrupted`], like a vCPU kicked by a signal.
#[derive(Debug, Default)]
pub struct FakeVcpu {
    script: VecDeque<ScriptedExit>,
    buf: Vec<u8>,
    pending_read: Option<u64>,
    reads: Reads,
    regs: StandardRegisters,
    sregs: SpecialRegisters,
    state: Arc<Mutex<FakeVcpuState>>,
    immediate_exit: bool,
}

impl FakeVcpu {
    /// A vCPU that will produce `script` in order.
    pub fn new(script: impl IntoIterator<Item = ScriptedExit>) -> Self {
        Self {
            script: script.into_iter().collect(),
            ..Default::default()
        }
    }

    /// The values the VMM supplied for reads, shared so tests can look after the vCPU is moved.
    pub fn reads(&self) -> Reads {
        self.reads.clone()
    }

    /// MSRs, NMIs and immediate exits, shared so tests can look after the vCPU is moved.
    pub fn state(&self) -> Arc<Mutex<FakeVcpuState>> {
        self.state.clone()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut FakeVcpuState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn collect_pending_read(&mut self) {
        if let Some(addr) = self.pending_read.take() {
            self.reads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((addr, self.buf.clone()));
        }
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        self.collect_pending_read();
        if self.immediate_exit {
            self.with_state(|s| s.immediate_exits += 1);
            return Ok(VmExit::Interrupted);
        }
        let Some(next) = self.script.pop_front() else {
            std::thread::sleep(std::time::Duration::from_millis(1));
            return Ok(VmExit::Interrupted);
        };
        Ok(match next {
            ScriptedExit::IoIn(port, len) => {
                self.buf = vec![0; len];
                self.pending_read = Some(u64::from(port));
                VmExit::IoIn {
                    port,
                    data: &mut self.buf,
                }
            }
            ScriptedExit::IoOut(port, data) => {
                self.buf = data;
                VmExit::IoOut {
                    port,
                    data: &self.buf,
                }
            }
            ScriptedExit::MmioRead(addr, len) => {
                self.buf = vec![0; len];
                self.pending_read = Some(addr);
                VmExit::MmioRead {
                    addr,
                    data: &mut self.buf,
                }
            }
            ScriptedExit::MmioWrite(addr, data) => {
                self.buf = data;
                VmExit::MmioWrite {
                    addr,
                    data: &self.buf,
                }
            }
            ScriptedExit::Shutdown => VmExit::Shutdown,
            ScriptedExit::PowerOff => VmExit::PowerOff,
            ScriptedExit::InternalError(suberror) => VmExit::InternalError {
                suberror,
                data: vec![],
            },
            ScriptedExit::Unexpected(what) => VmExit::Unexpected(what),
        })
    }

    fn regs(&self) -> Result<StandardRegisters> {
        Ok(self.regs)
    }

    fn set_regs(&self, _regs: &StandardRegisters) -> Result<()> {
        Ok(())
    }

    fn sregs(&self) -> Result<SpecialRegisters> {
        Ok(self.sregs)
    }

    fn set_sregs(&self, _sregs: &SpecialRegisters) -> Result<()> {
        Ok(())
    }

    fn set_fpu(&self, _fpu: &FpuState) -> Result<()> {
        Ok(())
    }

    fn set_cpuid(&self, _entries: &[CpuIdEntry]) -> Result<()> {
        Ok(())
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        self.with_state(|s| {
            s.msrs.extend(msrs.iter().map(|m| (m.index, m.data)));
            s.msr_writes.push(msrs.to_vec());
        });
        Ok(())
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>> {
        Ok(self.with_state(|s| {
            indices
                .iter()
                .map(|&index| MsrEntry {
                    index,
                    data: s.msrs.get(&index).copied().unwrap_or(0),
                })
                .collect()
        }))
    }

    fn nmi(&self) -> Result<()> {
        self.with_state(|s| s.nmis += 1);
        Ok(())
    }

    fn lapic(&self) -> Result<LapicState> {
        Ok(LapicState::default())
    }

    fn set_lapic(&self, _lapic: &LapicState) -> Result<()> {
        Ok(())
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.immediate_exit = exit;
    }
}
