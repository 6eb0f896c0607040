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
                log::error!(
                    "cannot install the vCPU kick handler: {}",
                    std::io::Error::last_os_error()
                );
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
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
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
                ctx.control.post(VmEvent::Failed(format!(
                    "vcpu{id}: {}",
                    nimbus_log::error_chain(&e)
                )));
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
                ctx.control.post(VmEvent::Failed(format!(
                    "vcpu{id}: VM entry failed (reason {reason:#x}); {state}"
                )));
            }
            VmExit::Unexpected(what) => {
                let state = describe(vcpu);
                ctx.control.post(VmEvent::Failed(format!(
                    "vcpu{id}: unexpected exit {what}; {state}"
                )));
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use hypervisor::fake::{FakeVcpu, ScriptedExit};

    use super::*;

    /// Records writes and the name of the thread that made them.
    #[derive(Default)]
    struct Register(Vec<Vec<u8>>, Vec<String>);
    impl devices::BusDevice for Register {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.push(data.to_vec());
            self.1.push(
                std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }

    /// What a scripted vCPU run did.
    struct ScriptRun {
        event: VmEvent,
        /// (address, bytes supplied) for each read exit.
        reads: Vec<(u64, Vec<u8>)>,
        /// Bytes written to the port device.
        writes: Vec<Vec<u8>>,
        /// Names of the threads that wrote to the port device.
        threads: Vec<String>,
    }

    fn run_script(script: Vec<ScriptedExit>) -> ScriptRun {
        run_script_on(3, script)
    }

    fn run_script_on(id: u32, script: Vec<ScriptedExit>) -> ScriptRun {
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let port = Arc::new(Mutex::new(Register::default()));
        let mmio = Arc::new(Mutex::new(Register::default()));
        io_bus.insert(port.clone(), 0x3f8, 8).expect("port");
        mmio_bus
            .insert(mmio.clone(), 0xd000_0000, 0x1000)
            .expect("mmio");
        let control = Arc::new(VmControl::default());
        let vcpu = FakeVcpu::new(script);
        let reads = vcpu.reads();
        let ctx = VcpuContext {
            io_bus,
            mmio_bus,
            control: control.clone(),
        };
        let thread = VcpuThread::spawn(id, Box::new(vcpu), ctx).expect("spawn");
        let event = control.wait();
        thread.stop();
        let reads = reads.lock().map(|r| r.clone()).unwrap_or_default();
        let (writes, threads) = port
            .lock()
            .map(|p| (p.0.clone(), p.1.clone()))
            .unwrap_or_default();
        ScriptRun {
            event,
            reads,
            writes,
            threads,
        }
    }

    #[test]
    fn exits_reach_the_buses_and_unclaimed_reads_float_high() {
        let ScriptRun {
            event,
            reads,
            writes,
            ..
        } = run_script(vec![
            ScriptedExit::IoOut(0x3f8, vec![b'A']),
            ScriptedExit::IoIn(0x3fd, 1),
            ScriptedExit::IoIn(0x1234, 2),
            ScriptedExit::MmioRead(0xd000_0004, 4),
            ScriptedExit::MmioRead(0xe000_0000, 4),
            ScriptedExit::MmioWrite(0xe000_0000, vec![1]),
            ScriptedExit::PowerOff,
        ]);
        assert_eq!(event, VmEvent::PowerOff);
        assert_eq!(writes, vec![vec![b'A']]);
        assert_eq!(
            reads,
            vec![
                (0x3fd, vec![0x45]),
                (0x1234, vec![0xff, 0xff]),
                (0xd000_0004, vec![0x44; 4]),
                (0xe000_0000, vec![0xff; 4]),
            ]
        );
    }

    #[test]
    fn exits_are_handled_on_the_thread_named_after_the_vcpu() {
        let ScriptRun { threads, .. } = run_script_on(
            7,
            vec![ScriptedExit::IoOut(0x3f8, vec![1]), ScriptedExit::PowerOff],
        );
        assert_eq!(threads, vec!["vcpu7".to_string()]);
    }

    #[test]
    fn triple_fault_resets() {
        assert_eq!(
            run_script(vec![ScriptedExit::Shutdown]).event,
            VmEvent::Reset
        );
    }

    #[test]
    fn emulation_failures_fail_the_vm_with_the_reason() {
        let event = run_script(vec![ScriptedExit::InternalError(1)]).event;
        assert!(
            matches!(&event, VmEvent::Failed(m) if m.contains("vcpu3") && m.contains("suberror 1")),
            "{event:?}"
        );
        let event = run_script(vec![ScriptedExit::Unexpected("Hypercall".into())]).event;
        assert!(
            matches!(&event, VmEvent::Failed(m) if m.contains("Hypercall")),
            "{event:?}"
        );
    }

    #[test]
    fn stop_kicks_an_idle_vcpu() {
        let control = Arc::new(VmControl::default());
        let ctx = VcpuContext {
            io_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(Bus::new()),
            control: control.clone(),
        };
        let thread = VcpuThread::spawn(1, Box::new(FakeVcpu::new([])), ctx).expect("spawn");
        control.post(VmEvent::PowerOff);
        thread.stop();
    }
}
