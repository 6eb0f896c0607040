//! One client connection of the server: its buffers, descriptors, timers and the state machine
//! that reads, parses, dispatches and writes without ever blocking.
//!
//! Requests are served strictly one at a time: while one is with the handler nothing more is
//! read or parsed, and the next buffered request is parsed only once the previous response is
//! queued, so replies never overtake each other.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use crate::request::{Progress, RequestParser};
use crate::response::{Response, CONTINUE};
use crate::server::{ReplyQueue, Responder};
use crate::socket::{recv_with_fds, send_with_fds, shutdown_write};
use crate::{Handler, Limits};

/// How long a connection being closed keeps reading (and discarding) after its last response,
/// so the client can read that response instead of getting a reset.
const LINGER: Duration = Duration::from_secs(2);

/// Compact the input buffer once this many consumed bytes sit at its front.
const COMPACT_AT: usize = 64 * 1024;

/// Reads one drive may do before giving other connections their turn (epoll reports the
/// socket again at once when more is waiting).
const READS_PER_DRIVE: u32 = 16;

/// What the server has to do with a connection after driving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Keep it, waiting for the events in [`Connection::interest`].
    Keep,
    /// Drop it (closing the socket).
    Close,
}

/// What a connection needs from the server while it is driven.
pub(crate) struct Context<'a> {
    pub(crate) handler: &'a dyn Handler,
    pub(crate) replies: &'a Arc<ReplyQueue>,
    pub(crate) limits: &'a Limits,
    pub(crate) scratch: &'a mut [u8],
    pub(crate) now: Instant,
}

/// Result of one step of the state machine.
enum Step {
    /// Something changed: go round again.
    Again,
    /// Nothing more can happen until an event.
    Wait,
    /// The connection is finished.
    Close,
}

/// One accepted client connection.
#[derive(Debug)]
pub(crate) struct Connection {
    id: u64,
    stream: UnixStream,
    /// Whether it counts towards the connection limit (not so for 503 rejections).
    counted: bool,
    /// Received bytes; `input[..input_start]` is already used.
    input: Vec<u8>,
    input_start: usize,
    /// Stream offset of `input[0]`.
    input_base: u64,
    /// Descriptors not yet given to a request, each batch with the stream offset just past the
    /// bytes it arrived with; it belongs to the request holding the byte before that offset.
    fd_batches: VecDeque<(u64, Vec<OwnedFd>)>,
    unclaimed_fds: usize,
    parser: RequestParser,
    continue_sent: bool,
    /// Bytes to write; `output[..output_pos]` is written.
    output: Vec<u8>,
    output_pos: usize,
    /// A request is with the handler; the value says whether to keep the connection after it.
    in_flight: Option<bool>,
    close_after_output: bool,
    read_closed: bool,
    /// Deadline of the closing phase (write side shut, discarding input until EOF).
    lingering: Option<Instant>,
    /// When the partly received request times out.
    request_deadline: Option<Instant>,
    /// When a write that makes no progress gives up.
    stall_deadline: Option<Instant>,
    /// Reads done in the current drive.
    reads: u32,
    /// Events the connection is registered for with epoll (empty: not registered).
    pub(crate) registered: EventSet,
}

impl Connection {
    /// A new connection on a non-blocking socket.
    pub(crate) fn new(id: u64, stream: UnixStream, limits: &Limits, counted: bool) -> Self {
        Connection {
            id,
            stream,
            counted,
            input: Vec::new(),
            input_start: 0,
            input_base: 0,
            fd_batches: VecDeque::new(),
            unclaimed_fds: 0,
            parser: RequestParser::new(limits),
            continue_sent: false,
            output: Vec::new(),
            output_pos: 0,
            in_flight: None,
            close_after_output: false,
            read_closed: false,
            lingering: None,
            request_deadline: None,
            stall_deadline: None,
            reads: 0,
            registered: EventSet::empty(),
        }
    }

    /// The socket.
    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether it counts towards the connection limit.
    pub(crate) fn counted(&self) -> bool {
        self.counted
    }

    /// Answers the connection with an error and closes it once the answer is written.
    pub(crate) fn reject(&mut self, status: u16, message: String) {
        self.fail(status, message);
    }

    /// The events to wait for before driving the connection again.
    pub(crate) fn interest(&self) -> EventSet {
        if self.output_pos < self.output.len() {
            EventSet::OUT
        } else if self.lingering.is_some() {
            EventSet::IN
        } else if self.in_flight.is_some() || self.read_closed {
            EventSet::empty()
        } else {
            EventSet::IN
        }
    }

    /// The earliest time [`Connection::check_timers`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        [self.lingering, self.stall_deadline, self.request_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// Acts on expired timers: a request that took too long gets 408, a stalled write or a
    /// finished linger closes the connection.
    pub(crate) fn check_timers(&mut self, ctx: &mut Context<'_>) -> Outcome {
        let expired = |deadline: Option<Instant>| deadline.is_some_and(|d| d <= ctx.now);
        if expired(self.lingering) || expired(self.stall_deadline) {
            return Outcome::Close;
        }
        if expired(self.request_deadline) {
            self.request_deadline = None;
            if self.in_flight.is_none() && !self.close_after_output {
                let secs = ctx.limits.request_timeout.as_secs_f64();
                self.fail(408, format!("request not completed within {secs} s"));
                return self.drive(ctx);
            }
        }
        Outcome::Keep
    }

    /// Queues the handler's response to the request in flight (ignored if there is none).
    pub(crate) fn deliver(&mut self, response: &Response) {
        let Some(keep_alive) = self.in_flight.take() else {
            log::warn!("connection {}: unexpected response dropped", self.id);
            return;
        };
        self.output.extend_from_slice(&response.to_bytes());
        if !keep_alive {
            self.close_after_output = true;
        }
    }

    /// Does everything possible without blocking: writes, reads, parses and dispatches.
    pub(crate) fn drive(&mut self, ctx: &mut Context<'_>) -> Outcome {
        self.reads = 0;
        loop {
            let step = self.step(ctx);
            match step {
                Step::Again => continue,
                Step::Wait => return Outcome::Keep,
                Step::Close => return Outcome::Close,
            }
        }
    }

    fn step(&mut self, ctx: &mut Context<'_>) -> Step {
        match self.flush(ctx) {
            Err(e) => {
                log::debug!("connection {}: write failed: {e}", self.id);
                return Step::Close;
            }
            Ok(false) => return Step::Wait,
            Ok(true) => {}
        }
        if self.lingering.is_some() {
            return self.discard_input(ctx.scratch);
        }
        if self.close_after_output {
            if let Err(e) = shutdown_write(self.stream.as_fd()) {
                log::debug!("connection {}: shutdown failed: {e}", self.id);
                return Step::Close;
            }
            let Some(until) = ctx.now.checked_add(LINGER) else {
                return Step::Close;
            };
            self.lingering = Some(until);
            self.request_deadline = None;
            return Step::Again;
        }
        if self.in_flight.is_some() {
            return Step::Wait;
        }
        let (used, progress) = match self.parser.advance(&self.input[self.input_start..]) {
            Ok(result) => result,
            Err(e) => {
                self.fail(e.status, e.message);
                return Step::Again;
            }
        };
        self.consume(used);
        match progress {
            Progress::Done(request, keep_alive) => self.dispatch(*request, keep_alive, ctx),
            Progress::NeedMore { continue_wanted } => {
                if continue_wanted && !self.continue_sent {
                    self.continue_sent = true;
                    self.output.extend_from_slice(CONTINUE);
                    return Step::Again;
                }
                if self.has_partial_request() {
                    if self.request_deadline.is_none() {
                        // A timeout too large to add means none.
                        self.request_deadline = ctx.now.checked_add(ctx.limits.request_timeout);
                    }
                } else {
                    self.request_deadline = None;
                }
                self.read(ctx)
            }
        }
    }

    /// Gives a complete request, with its descriptors, to the handler.
    fn dispatch(
        &mut self,
        mut request: crate::Request,
        keep_alive: bool,
        ctx: &mut Context<'_>,
    ) -> Step {
        let end = self.input_base + self.input_start as u64;
        let mut fds = Vec::new();
        while let Some((batch_end, _)) = self.fd_batches.front() {
            if *batch_end > end {
                break;
            }
            if let Some((_, batch)) = self.fd_batches.pop_front() {
                self.unclaimed_fds -= batch.len();
                fds.extend(batch);
            }
        }
        if fds.len() > ctx.limits.max_fds_per_request {
            let max = ctx.limits.max_fds_per_request;
            self.fail(
                400,
                format!("more than {max} file descriptors with one request"),
            );
            return Step::Again;
        }
        request.fds = fds;
        self.in_flight = Some(keep_alive);
        self.continue_sent = false;
        self.request_deadline = None;
        log::debug!(
            "connection {}: {} {} ({} bytes, {} fds)",
            self.id,
            request.method,
            request.path,
            request.body.len(),
            request.fds.len()
        );
        ctx.handler
            .handle(request, Responder::new(Arc::clone(ctx.replies), self.id));
        // A reply sent already is in the queue; the server delivers it next.
        Step::Wait
    }

    /// Reads once from the socket (after parsing what was there before).
    fn read(&mut self, ctx: &mut Context<'_>) -> Step {
        if self.read_closed {
            if self.has_partial_request() {
                self.fail(400, "connection closed in the middle of a request".into());
                return Step::Again;
            }
            return Step::Close;
        }
        if self.reads >= READS_PER_DRIVE {
            return Step::Wait;
        }
        self.reads += 1;
        let received = match recv_with_fds(self.stream.as_fd(), ctx.scratch) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Step::Again,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) => {
                log::debug!("connection {}: read failed: {e}", self.id);
                return Step::Close;
            }
        };
        if received.truncated {
            self.fail(400, "too many file descriptors in one message".into());
            return Step::Again;
        }
        if received.len == 0 {
            self.read_closed = true;
            return Step::Again;
        }
        self.input.extend_from_slice(&ctx.scratch[..received.len]);
        if !received.fds.is_empty() {
            let end = self.input_base + self.input.len() as u64;
            self.unclaimed_fds += received.fds.len();
            self.fd_batches.push_back((end, received.fds));
            let max = ctx.limits.max_fds_per_request;
            if self.unclaimed_fds > max {
                self.fail(
                    400,
                    format!("more than {max} file descriptors with one request"),
                );
            }
        }
        Step::Again
    }

    /// In the closing phase: reads and drops whatever comes until end-of-file.
    fn discard_input(&mut self, scratch: &mut [u8]) -> Step {
        while self.reads < READS_PER_DRIVE {
            self.reads += 1;
            match recv_with_fds(self.stream.as_fd(), scratch) {
                Ok(received) if received.len == 0 => return Step::Close,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(_) => return Step::Close,
            }
        }
        Step::Wait
    }

    /// Writes queued output; `Ok(true)` when all of it is written.
    fn flush(&mut self, ctx: &Context<'_>) -> io::Result<bool> {
        let before = self.output_pos;
        while self.output_pos < self.output.len() {
            match send_with_fds(self.stream.as_fd(), &self.output[self.output_pos..], &[]) {
                Ok(n) => self.output_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.output_pos == self.output.len() {
            self.output.clear();
            self.output_pos = 0;
            self.stall_deadline = None;
            return Ok(true);
        }
        if self.output_pos > before || self.stall_deadline.is_none() {
            self.stall_deadline = ctx.now.checked_add(ctx.limits.request_timeout);
        }
        Ok(false)
    }

    /// Queues an error answer, drops everything received, and closes after writing.
    fn fail(&mut self, status: u16, message: String) {
        log::debug!("connection {}: {status}: {message}", self.id);
        self.output
            .extend_from_slice(&Response::error(status, &[message]).to_bytes());
        self.close_after_output = true;
        self.parser.reset();
        self.input_base += self.input.len() as u64;
        self.input.clear();
        self.input_start = 0;
        self.fd_batches.clear();
        self.unclaimed_fds = 0;
        self.request_deadline = None;
    }

    /// Marks `used` input bytes as consumed.
    fn consume(&mut self, used: usize) {
        self.input_start += used;
        if self.input_start == self.input.len() || self.input_start >= COMPACT_AT {
            self.input.drain(..self.input_start);
            self.input_base += self.input_start as u64;
            self.input_start = 0;
        }
    }

    /// Whether part of a request has been received.
    fn has_partial_request(&self) -> bool {
        self.parser.in_progress() || self.input_start < self.input.len()
    }
}
