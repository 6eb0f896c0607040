//! vCPU threads: one per vCPU, named `vcpu<N>`, running guest code and dispatching exits to the
//! port I/O and MMIO buses.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use hypervisor::{Vcpu, VmExit};

use crate::control::{VmControl, VmEvent};

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: i32) {}

/// Installs a do-nothing handler (without SA_RESTART) so the kick signal interrupts `KVM_RUN`.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler does nothing and is
        // async-signal-safe; the return value is checked.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                log::error!("cannot install the vCPU kick handler: {}", std::io::Error::last_os_error());
            }
        }
    });
}

/// What a vCPU thread needs besides its vCPU.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// Port I/O bus.
    pub io_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Where stop requests and failures go.
    pub control: Arc<VmControl>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    id: u32,
    handle: JoinHandle<()>,
    done: Arc<AtomicBool>,
}

impl VcpuThread {
    /// Starts vCPU `id` on its own thread.
    pub fn spawn(id: u32, mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let done = Arc::new(AtomicBool::new(false));
        let done_flag = done.clone();
        let handle = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
            run_loop(id, vcpu.as_mut(), &ctx);
            done_flag.store(true, Ordering::SeqCst);
        })?;
        Ok(Self { id, handle, done })
    }

    /// Kicks the thread out of the guest until it notices the stop request, then joins it.
    pub fn stop(self) {
        let pthread = self.handle.as_pthread_t();
        while !self.done.load(Ordering::SeqCst) {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(pthread, kick_signal()) };
            std::thread::sleep(Duration::from_micros(200));
        }
        if self.handle.join().is_err() {
            log::error!("vcpu{} thread panicked", self.id);
        }
    }
}

fn run_loop(id: u32, vcpu: &mut dyn Vcpu, ctx: &VcpuContext) {
    while !ctx.control.should_stop() {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                ctx.control.post(VmEvent::Failed(format!("vcpu{id}: {e}: {}", source_chain(&e))));
                break;
            }
        };
        match exit {
            VmExit::IoIn { port, data } => {
                if !ctx.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            VmExit::IoOut { port, data } => {
                if !ctx.io_bus.write(u64::from(port), data) {
                    log::trace!("vcpu{id}: write to unclaimed port {port:#x}");
                }
            }
            VmExit::MmioRead { addr, data } => {
                if !ctx.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
            }
            VmExit::MmioWrite { addr, data } => {
                if !ctx.mmio_bus.write(addr, data) {
                    log::debug!("vcpu{id}: write to unclaimed MMIO {addr:#x}");
                }
            }
            VmExit::Interrupted | VmExit::Halt => {}
            VmExit::Shutdown => {
                log::warn!("vcpu{id}: triple fault; resetting the VM");
                ctx.control.post(VmEvent::Reset);
            }
            VmExit::Reset => ctx.control.post(VmEvent::Reset),
            VmExit::PowerOff => ctx.control.post(VmEvent::PowerOff),
            VmExit::InternalError { suberror, data } => {
                let state = describe(vcpu);
                ctx.control.post(VmEvent::Failed(format!(
                    "vcpu{id}: hypervisor internal error (suberror {suberror}, data {data:x?}); {state}"
                )));
            }
            VmExit::FailEntry { reason } => {
                let state = describe(vcpu);
                ctx.control.post(VmEvent::Failed(format!("vcpu{id}: VM entry failed (reason {reason:#x}); {state}")));
            }
            VmExit::Unexpected(what) => {
                let state = describe(vcpu);
                ctx.control.post(VmEvent::Failed(format!("vcpu{id}: unexpected exit {what}; {state}")));
            }
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// A one-line register summary for failure reports.
fn describe(vcpu: &dyn Vcpu) -> String {
    match (vcpu.regs(), vcpu.sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    }
}
