//! vCPU threads: one per vCPU, named `vcpu<N>`, running guest code and dispatching exits to the
//! port I/O and MMIO buses.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use hypervisor::{Vcpu, VmExit};
use nimbus_thread::ThreadClass;

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

/// The MSR of the time-stamp counter.
const MSR_IA32_TSC: u32 = 0x10;

/// Requests to all vCPU threads of a VM: pause and resume, NMIs.
#[derive(Debug, Default)]
pub struct VcpuGate {
    /// Threads must park at their next check.
    pause: AtomicBool,
    /// Bumped by every `vm.nmi`; each thread injects one NMI per bump it has not seen.
    nmi: AtomicU64,
    /// Threads parked now.
    parked: Mutex<usize>,
    changed: Condvar,
}

impl VcpuGate {
    fn parked(&self) -> MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes parked threads so they look at the stop flag.
    fn wake(&self) {
        let _guard = self.parked();
        self.changed.notify_all();
    }

    /// The vCPU thread's side of a pause, once the last exit's instruction is complete: saves
    /// the TSC, waits until resumed (or stopped), and puts the TSC back so the guest does not
    /// see the paused time.
    fn park(&self, id: u32, vcpu: &mut dyn Vcpu, control: &VmControl, stop: &AtomicBool) {
        let tsc = match vcpu.msrs(&[MSR_IA32_TSC]) {
            Ok(m) => m.first().copied(),
            Err(e) => {
                log::warn!("vcpu{id}: cannot save the TSC at pause: {e}");
                None
            }
        };
        let mut parked = self.parked();
        *parked += 1;
        self.changed.notify_all();
        let stopping = || control.should_stop() || stop.load(Ordering::SeqCst);
        while self.pause.load(Ordering::SeqCst) && !stopping() {
            parked = self.changed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
        self.changed.notify_all();
        drop(parked);
        if let Some(tsc) = tsc.filter(|_| !stopping()) {
            if let Err(e) = vcpu.set_msrs(&[tsc]) {
                log::warn!("vcpu{id}: cannot restore the TSC after the pause: {e}");
            }
        }
    }
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
    /// Pause and NMI requests.
    pub gate: Arc<VcpuGate>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    id: u32,
    /// The thread gives its vCPU back when it ends.
    handle: JoinHandle<Box<dyn Vcpu>>,
    done: Arc<AtomicBool>,
    /// Set to stop this thread alone (the VM's stop switch stops them all).
    stop: Arc<AtomicBool>,
    gate: Arc<VcpuGate>,
}

impl VcpuThread {
    /// Starts vCPU `id` on its own thread.
    pub fn spawn(id: u32, mut vcpu: Box<dyn Vcpu>, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let done = Arc::new(AtomicBool::new(false));
        let done_flag = done.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let gate = ctx.gate.clone();
        let handle = nimbus_thread::spawn(ThreadClass::Vcpu, format!("vcpu{id}"), move || {
            run_loop(id, vcpu.as_mut(), &ctx, &stop_flag);
            done_flag.store(true, Ordering::SeqCst);
            ctx.gate.wake();
            vcpu
        })?;
        Ok(Self {
            id,
            handle,
            done,
            stop,
            gate,
        })
    }

    /// The vCPU's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Lets the thread run only on the host CPUs `cpus` (`--cpus affinity=`).
    pub fn pin(&self, cpus: &[usize]) -> std::io::Result<()> {
        // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes inside it for indices
        // below CPU_SETSIZE (checked), and pthread_setaffinity_np reads the size given. The
        // thread has not been joined, so its pthread_t is valid.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &cpu in cpus {
                if cpu >= libc::CPU_SETSIZE as usize {
                    return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                }
                libc::CPU_SET(cpu, &mut set);
            }
            let rc = libc::pthread_setaffinity_np(
                self.handle.as_pthread_t(),
                std::mem::size_of::<libc::cpu_set_t>(),
                &set,
            );
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
        }
        Ok(())
    }

    /// Interrupts `KVM_RUN` so the thread looks at its requests.
    fn kick(&self) {
        if !self.done.load(Ordering::SeqCst) {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(self.handle.as_pthread_t(), kick_signal()) };
        }
    }

    /// Stops the thread (whether or not the whole VM stops): kicks it out of the guest until
    /// it notices, joins it and returns its vCPU, which can run again on a new thread (`None`
    /// if the thread panicked).
    pub fn stop(self) -> Option<Box<dyn Vcpu>> {
        self.stop.store(true, Ordering::SeqCst);
        while !self.done.load(Ordering::SeqCst) {
            self.gate.wake();
            self.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
        match self.handle.join() {
            Ok(vcpu) => Some(vcpu),
            Err(_) => {
                log::error!("vcpu{} thread panicked", self.id);
                None
            }
        }
    }
}

/// Parks every thread of `threads` (all sharing one gate) between two guest exits; returns
/// when all have parked or ended.
pub fn pause_all(threads: &[VcpuThread]) {
    let Some(gate) = threads.first().map(|t| t.gate.clone()) else {
        return;
    };
    gate.pause.store(true, Ordering::SeqCst);
    loop {
        let running = threads
            .iter()
            .filter(|t| !t.done.load(Ordering::SeqCst))
            .count();
        let parked = gate.parked();
        if *parked >= running {
            return;
        }
        let _ = gate
            .changed
            .wait_timeout(parked, Duration::from_micros(200))
            .unwrap_or_else(|p| p.into_inner());
        for t in threads {
            t.kick();
        }
    }
}

/// Lets the threads parked by [`pause_all`] run the guest again.
pub fn resume_all(threads: &[VcpuThread]) {
    if let Some(t) = threads.first() {
        t.gate.pause.store(false, Ordering::SeqCst);
        t.gate.wake();
    }
}

/// Injects one NMI into every vCPU of `threads` (at its next entry into the guest).
pub fn nmi_all(threads: &[VcpuThread]) {
    if let Some(t) = threads.first() {
        t.gate.nmi.fetch_add(1, Ordering::SeqCst);
    }
    for t in threads {
        t.kick();
    }
}

fn run_loop(id: u32, vcpu: &mut dyn Vcpu, ctx: &VcpuContext, stop: &AtomicBool) {
    // NMIs asked for before this thread started (a vCPU hot-added or started again later) are
    // not for it.
    let mut nmis_seen = ctx.gate.nmi.load(Ordering::SeqCst);
    // Set while a pause is pending: KVM finishes the instruction of the last I/O exit (which
    // may need more exits, e.g. `rep outsb`) and then returns at once instead of entering the
    // guest; that return is the pause point.
    let mut immediate_exit = false;
    while !ctx.control.should_stop() && !stop.load(Ordering::SeqCst) {
        if ctx.gate.pause.load(Ordering::SeqCst) && !immediate_exit {
            vcpu.set_immediate_exit(true);
            immediate_exit = true;
        }
        let nmis = ctx.gate.nmi.load(Ordering::SeqCst);
        if nmis != nmis_seen {
            nmis_seen = nmis;
            if let Err(e) = vcpu.nmi() {
                log::warn!("vcpu{id}: cannot inject an NMI: {e}");
            }
        }
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
            VmExit::Interrupted if immediate_exit => {
                vcpu.set_immediate_exit(false);
                immediate_exit = false;
                ctx.gate.park(id, vcpu, &ctx.control, stop);
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

    /// A stop switch whose events arrive on a channel.
    fn channel_control() -> (Arc<VmControl>, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let control = VmControl::new(Box::new(move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        }));
        (Arc::new(control), rx)
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
        let (control, events) = channel_control();
        let vcpu = FakeVcpu::new(script);
        let reads = vcpu.reads();
        let ctx = VcpuContext {
            io_bus,
            mmio_bus,
            control: control.clone(),
            gate: Arc::default(),
        };
        let thread = VcpuThread::spawn(id, Box::new(vcpu), ctx).expect("spawn");
        let event = events.recv_timeout(Duration::from_secs(10)).expect("event");
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
        let (control, _events) = channel_control();
        let ctx = VcpuContext {
            io_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(Bus::new()),
            control: control.clone(),
            gate: Arc::default(),
        };
        let thread = VcpuThread::spawn(1, Box::new(FakeVcpu::new([])), ctx).expect("spawn");
        control.post(VmEvent::PowerOff);
        thread.stop();
    }

    /// Counts port writes, each taking a millisecond.
    #[derive(Default)]
    struct SlowPort(Arc<std::sync::atomic::AtomicUsize>);
    impl devices::BusDevice for SlowPort {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            std::thread::sleep(Duration::from_millis(1));
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn paused_vcpus_make_no_progress_and_get_their_tsc_back() {
        let io_bus = Arc::new(Bus::new());
        let port = SlowPort::default();
        let writes = port.0.clone();
        io_bus
            .insert(Arc::new(Mutex::new(port)), 0x80, 1)
            .expect("port");
        let (control, _events) = channel_control();
        let gate: Arc<VcpuGate> = Arc::default();
        let mut threads = Vec::new();
        let mut states = Vec::new();
        for id in 0..2 {
            let vcpu = FakeVcpu::new(vec![ScriptedExit::IoOut(0x80, vec![1]); 2000]);
            let state = vcpu.state();
            state
                .lock()
                .map(|mut s| s.msrs.insert(MSR_IA32_TSC, 1000 + u64::from(id)))
                .expect("state");
            states.push(state);
            let ctx = VcpuContext {
                io_bus: io_bus.clone(),
                mmio_bus: Arc::new(Bus::new()),
                control: control.clone(),
                gate: gate.clone(),
            };
            threads.push(VcpuThread::spawn(id, Box::new(vcpu), ctx).expect("spawn"));
        }
        std::thread::sleep(Duration::from_millis(30));
        pause_all(&threads);
        let at_pause = writes.load(Ordering::SeqCst);
        assert!(at_pause > 0, "no progress before the pause");
        // Time passes on the host while the VM is paused.
        for s in &states {
            s.lock()
                .map(|mut s| s.msrs.insert(MSR_IA32_TSC, 999_999))
                .expect("state");
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            writes.load(Ordering::SeqCst),
            at_pause,
            "progress while paused"
        );
        for (id, s) in states.iter().enumerate() {
            let s = s.lock().expect("state");
            assert!(
                s.immediate_exits >= 1,
                "vcpu{id} parked without completing its exit"
            );
        }
        resume_all(&threads);
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            writes.load(Ordering::SeqCst) > at_pause,
            "no progress after resume"
        );
        for (id, s) in states.iter().enumerate() {
            let s = s.lock().expect("state");
            assert_eq!(
                s.msrs.get(&MSR_IA32_TSC),
                Some(&(1000 + id as u64)),
                "vcpu{id}: the TSC jumped across the pause"
            );
        }
        nmi_all(&threads);
        std::thread::sleep(Duration::from_millis(30));
        for s in &states {
            assert_eq!(s.lock().expect("state").nmis, 1);
        }
        // Stopping paused vCPUs does not hang.
        pause_all(&threads);
        control.stop();
        for t in threads {
            t.stop();
        }
    }

    #[test]
    fn one_thread_stops_alone_and_its_vcpu_runs_again() {
        let io_bus = Arc::new(Bus::new());
        let counts: Vec<Arc<std::sync::atomic::AtomicUsize>> = (0..2)
            .map(|port| {
                let dev = SlowPort::default();
                let count = dev.0.clone();
                io_bus
                    .insert(Arc::new(Mutex::new(dev)), 0x80 + port, 1)
                    .expect("port");
                count
            })
            .collect();
        let (control, _events) = channel_control();
        let ctx = VcpuContext {
            io_bus,
            mmio_bus: Arc::new(Bus::new()),
            control: control.clone(),
            gate: Arc::default(),
        };
        let script = |port: u16| vec![ScriptedExit::IoOut(port, vec![1]); 5000];
        let t0 = VcpuThread::spawn(0, Box::new(FakeVcpu::new(script(0x80))), ctx.clone())
            .expect("spawn");
        let t1 = VcpuThread::spawn(1, Box::new(FakeVcpu::new(script(0x81))), ctx.clone())
            .expect("spawn");
        assert_eq!((t0.id(), t1.id()), (0, 1));
        std::thread::sleep(Duration::from_millis(30));
        let vcpu = t1.stop().expect("vcpu1 given back");
        let stopped_at = counts[1].load(Ordering::SeqCst);
        assert!(stopped_at > 0);
        let before = counts[0].load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            counts[0].load(Ordering::SeqCst) > before,
            "vcpu0 stopped too"
        );
        assert_eq!(counts[1].load(Ordering::SeqCst), stopped_at, "vcpu1 ran on");
        // The same vCPU on a new thread goes on with its script.
        let t1 = VcpuThread::spawn(1, vcpu, ctx).expect("respawn");
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            counts[1].load(Ordering::SeqCst) > stopped_at,
            "vcpu1 did not run again"
        );
        control.stop();
        t0.stop();
        t1.stop();
    }
}
