//! Guest console input from the VMM's standard input (`--console tty`, else `--serial tty`).
//!
//! A thread named `serial_stdin` reads standard input and feeds the [`InputSink`] of the VM
//! currently running (the virtio console's input buffer or the UART; the target changes on every
//! reboot). Bytes wait while the guest's side is full; none are dropped. On a terminal, input is switched to non-canonical, no-echo mode so each key
//! reaches the guest at once; signals stay on, so Ctrl-C still stops the VMM. [`TerminalGuard`]
//! restores the terminal.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::serial::Serial;

/// Takes input bytes for the guest.
pub trait InputSink: Send + Sync + std::fmt::Debug {
    /// Accepts as many of `bytes` as fit now; returns how many.
    fn push(&self, bytes: &[u8]) -> usize;
}

/// The 16550's receive FIFO.
#[derive(Debug)]
pub struct SerialInput(pub Arc<Mutex<Serial>>);

impl InputSink for SerialInput {
    fn push(&self, bytes: &[u8]) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes)
    }
}

impl InputSink for virtio_devices::console::ConsoleInput {
    fn push(&self, bytes: &[u8]) -> usize {
        virtio_devices::console::ConsoleInput::push(self, bytes)
    }
}

/// Where input goes, if a VM is running.
pub type InputTarget = Arc<Mutex<Option<Arc<dyn InputSink>>>>;

/// Restores the terminal settings of standard input when dropped.
#[derive(Debug)]
pub struct TerminalGuard {
    saved: Option<libc::termios>,
}

impl TerminalGuard {
    /// Switches standard input to non-canonical, no-echo mode if it is a terminal.
    pub fn raw_stdin() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: a zeroed termios is a valid buffer for tcgetattr, which fills it; results are
        // checked before use.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return Self { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) != 0 {
                return Self { saved: None };
            }
            Self { saved: Some(saved) }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: restores settings read from the same descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &saved) };
        }
    }
}

/// Starts the thread forwarding `input` to `target` until `input` ends.
pub fn spawn_forwarder(
    mut input: impl Read + Send + 'static,
    target: InputTarget,
) -> std::io::Result<()> {
    nimbus_thread::spawn(
        nimbus_thread::ThreadClass::ConsoleInput,
        "serial_stdin",
        move || {
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("serial input stopped: {e}");
                        return;
                    }
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let sink = target.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let taken = sink.map_or(0, |s| s.push(rest));
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        // The guest's side is full, or no VM between reboots: let it drain.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use devices::BusDevice;

    use super::*;

    #[derive(Debug, Default)]
    struct NoIrq;
    impl devices::Interrupt for NoIrq {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn input_waits_for_fifo_room_and_loses_nothing() {
        let uart = Arc::new(Mutex::new(Serial::new(
            Arc::new(NoIrq),
            Box::new(std::io::sink()),
        )));
        let sink: Arc<dyn InputSink> = Arc::new(SerialInput(uart.clone()));
        let target: InputTarget = Arc::new(Mutex::new(Some(sink)));
        let text: Vec<u8> = (0..200u8).map(|i| b'a' + i % 26).collect();
        spawn_forwarder(std::io::Cursor::new(text.clone()), target).expect("spawn");
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < text.len() && std::time::Instant::now() < deadline {
            let mut u = uart.lock().unwrap_or_else(|p| p.into_inner());
            let mut lsr = [0u8];
            u.read(5, &mut lsr);
            if lsr[0] & 1 == 1 {
                let mut b = [0u8];
                u.read(0, &mut b);
                got.push(b[0]);
            } else {
                drop(u);
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        assert_eq!(got, text);
    }
}
