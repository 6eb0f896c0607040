//! The server: one thread, one epoll set over the listener, every connection, a wake-up eventfd
//! for replies sent from other threads, and the caller's stop eventfd.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::connection::{Connection, Context, Outcome};
use crate::{Limits, Request, Response};

/// Epoll token of the listening socket.
const LISTENER: u64 = 0;
/// Epoll token of the caller's stop eventfd.
const STOP: u64 = 1;
/// Epoll token of the wake-up eventfd.
const WAKE: u64 = 2;
/// First connection id (ids are never reused, so a late reply cannot reach a newer connection).
const FIRST_CONNECTION: u64 = 3;

/// How long accepting pauses after an error such as running out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Size of the buffer each read uses.
const READ_CHUNK: usize = 64 * 1024;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be made non-blocking.
    #[error("cannot make the API socket {socket} non-blocking")]
    Nonblocking {
        /// The socket's path.
        socket: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The epoll instance could not be created.
    #[error("cannot create an epoll instance")]
    Epoll(#[source] io::Error),
    /// The wake-up eventfd could not be created.
    #[error("cannot create the wake-up eventfd")]
    WakeEventFd(#[source] io::Error),
    /// A descriptor could not be added to the epoll set.
    #[error("cannot watch the {what} with epoll")]
    Register {
        /// Which descriptor.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for events failed.
    #[error("epoll_wait failed on the API socket {socket}")]
    Wait {
        /// The socket's path.
        socket: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Serves requests. Called on the server thread, one request at a time per connection; it
/// answers through the [`Responder`], at once or later from any thread.
pub trait Handler: Send + Sync {
    /// Handles one request; `reply` sends the response (dropping it unsent answers 500).
    fn handle(&self, request: Request, reply: Responder);
}

impl<F> Handler for F
where
    F: Fn(Request, Responder) + Send + Sync,
{
    fn handle(&self, request: Request, reply: Responder) {
        self(request, reply)
    }
}

/// Replies waiting for the server thread, and the eventfd that wakes it.
#[derive(Debug)]
pub(crate) struct ReplyQueue {
    wake: EventFd,
    pending: Mutex<Vec<(u64, Response)>>,
}

impl ReplyQueue {
    fn push(&self, connection: u64, response: Response) {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((connection, response));
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the API server: {e}");
        }
    }

    fn take(&self) -> Vec<(u64, Response)> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

/// Sends the response to one request; may be moved to another thread.
///
/// Dropping it without calling [`Responder::send`] answers 500 with
/// `["internal error: request dropped"]`. If the client has gone in the meantime the response
/// is dropped silently.
#[derive(Debug)]
pub struct Responder {
    queue: Arc<ReplyQueue>,
    connection: u64,
    sent: bool,
}

impl Responder {
    pub(crate) fn new(queue: Arc<ReplyQueue>, connection: u64) -> Self {
        Responder {
            queue,
            connection,
            sent: false,
        }
    }

    /// Sends the response; the server thread writes it.
    pub fn send(mut self, response: Response) {
        self.sent = true;
        self.queue.push(self.connection, response);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.sent {
            log::warn!("API request dropped without a response");
            let message = ["internal error: request dropped".to_string()];
            self.queue
                .push(self.connection, Response::error(500, &message));
        }
    }
}

/// The HTTP server on a Unix listening socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    socket: String,
    limits: Limits,
    epoll: Epoll,
    replies: Arc<ReplyQueue>,
    next_id: u64,
    scratch: Vec<u8>,
}

impl Server {
    /// A server on `listener` (bound and listening already), made non-blocking here.
    pub fn new(listener: UnixListener, limits: Limits) -> Result<Self, ServerError> {
        let socket = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "(unnamed)".to_string());
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Nonblocking {
                socket: socket.clone(),
                source,
            })?;
        let epoll = Epoll::new().map_err(ServerError::Epoll)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(ServerError::WakeEventFd)?;
        Ok(Server {
            listener,
            socket,
            limits,
            epoll,
            replies: Arc::new(ReplyQueue {
                wake,
                pending: Mutex::new(Vec::new()),
            }),
            next_id: FIRST_CONNECTION,
            scratch: vec![0; READ_CHUNK],
        })
    }

    /// Serves until `stop` is written (its counter is left for the caller to read); then writes
    /// the answers already sent through responders, closes every connection and returns. Requests go to `handler` on this thread.
    pub fn run(&mut self, handler: &dyn Handler, stop: &EventFd) -> Result<(), ServerError> {
        let fixed = [
            (self.listener.as_raw_fd(), LISTENER, "API socket"),
            (stop.as_raw_fd(), STOP, "stop eventfd"),
            (self.replies.wake.as_raw_fd(), WAKE, "wake-up eventfd"),
        ];
        let mut added = Vec::new();
        let mut result = Ok(());
        for (fd, token, what) in fixed {
            let event = EpollEvent::new(EventSet::IN, token);
            match self.epoll.ctl(ControlOperation::Add, fd, event) {
                Ok(()) => added.push(fd),
                Err(source) => {
                    result = Err(ServerError::Register { what, source });
                    break;
                }
            }
        }
        if result.is_ok() {
            let mut connections = HashMap::new();
            result = self.serve(handler, &mut connections);
            // Dropping the connections closes them, which also removes them from epoll.
            drop(connections);
        }
        for fd in added {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        result
    }

    fn serve(
        &mut self,
        handler: &dyn Handler,
        connections: &mut HashMap<u64, Connection>,
    ) -> Result<(), ServerError> {
        let mut events = vec![EpollEvent::default(); 64];
        let mut accept_paused_until: Option<Instant> = None;
        loop {
            let deadline = connections
                .values()
                .filter_map(Connection::next_deadline)
                .chain(accept_paused_until)
                .min();
            let timeout = deadline.map_or(-1, |d| {
                let wait = d.saturating_duration_since(Instant::now());
                // Round up so the deadline has passed when we wake.
                i32::try_from(wait.as_millis() + 1).unwrap_or(i32::MAX)
            });
            let count = match self.epoll.wait(timeout, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ServerError::Wait {
                        socket: self.socket.clone(),
                        source,
                    })
                }
            };
            let ready = &events[..count];
            if ready.iter().any(|e| e.data() == STOP) {
                log::info!("API server on {} stopping", self.socket);
                // Answers already given (e.g. to vmm.shutdown) still go out.
                self.deliver_replies(handler, connections);
                return Ok(());
            }
            for event in ready {
                match event.data() {
                    LISTENER => {
                        let resume_at = Instant::now().checked_add(ACCEPT_BACKOFF);
                        if !self.accept(handler, connections) && resume_at.is_some() {
                            self.set_listening(false);
                            accept_paused_until = resume_at;
                        }
                    }
                    WAKE => {
                        // Only resets the counter; the queue is emptied below.
                        let _ = self.replies.wake.read();
                    }
                    id => self.drive(handler, connections, id, None),
                }
            }
            self.deliver_replies(handler, connections);
            let now = Instant::now();
            if accept_paused_until.is_some_and(|t| t <= now) {
                accept_paused_until = None;
                self.set_listening(true);
            }
            let expired: Vec<u64> = connections
                .iter()
                .filter(|(_, c)| c.next_deadline().is_some_and(|d| d <= now))
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                self.drive(handler, connections, id, Some(now));
            }
            self.deliver_replies(handler, connections);
        }
    }

    /// Accepts every pending connection; false when accepting failed and should pause.
    fn accept(
        &mut self,
        handler: &dyn Handler,
        connections: &mut HashMap<u64, Connection>,
    ) -> bool {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    log::warn!("cannot accept on {}: {e}", self.socket);
                    return false;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("cannot make an API connection non-blocking: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let active = connections.values().filter(|c| c.counted()).count();
            let max = self.limits.max_connections;
            if active < max {
                log::debug!("connection {id} accepted on {}", self.socket);
                let connection = Connection::new(id, stream, &self.limits, true);
                connections.insert(id, connection);
                self.update_interest(connections, id);
                continue;
            }
            log::warn!("API connection refused: {max} connections already open");
            // The refusal is written and lingers like any closing connection, so the client
            // reads it rather than a reset; refusals beyond another `max` are just closed.
            if connections.len() - active >= max {
                continue;
            }
            let mut connection = Connection::new(id, stream, &self.limits, false);
            connection.reject(503, format!("too many connections (at most {max})"));
            connections.insert(id, connection);
            self.drive(handler, connections, id, None);
        }
    }

    /// Hands the queued replies to their connections, which may dispatch their next request
    /// (whose reply may queue at once): repeats until the queue stays empty.
    fn deliver_replies(
        &mut self,
        handler: &dyn Handler,
        connections: &mut HashMap<u64, Connection>,
    ) {
        loop {
            let replies = self.replies.take();
            if replies.is_empty() {
                return;
            }
            for (id, response) in replies {
                let Some(connection) = connections.get_mut(&id) else {
                    log::debug!("response for closed connection {id} dropped");
                    continue;
                };
                connection.deliver(&response);
                self.drive(handler, connections, id, None);
            }
        }
    }

    /// Drives one connection (or, with `timers_at`, acts on its expired timers), then updates
    /// its epoll registration or drops it.
    fn drive(
        &mut self,
        handler: &dyn Handler,
        connections: &mut HashMap<u64, Connection>,
        id: u64,
        timers_at: Option<Instant>,
    ) {
        let Some(connection) = connections.get_mut(&id) else {
            return;
        };
        let mut ctx = Context {
            handler,
            replies: &self.replies,
            limits: &self.limits,
            scratch: &mut self.scratch,
            now: timers_at.unwrap_or_else(Instant::now),
        };
        let outcome = if timers_at.is_some() {
            connection.check_timers(&mut ctx)
        } else {
            connection.drive(&mut ctx)
        };
        match outcome {
            Outcome::Close => {
                log::debug!("connection {id} closed");
                connections.remove(&id);
            }
            Outcome::Keep => self.update_interest(connections, id),
        }
    }

    /// Registers the connection for the events it waits for, or removes it from epoll when it
    /// waits for none (so a hung-up peer cannot make the loop spin).
    fn update_interest(&self, connections: &mut HashMap<u64, Connection>, id: u64) {
        let Some(connection) = connections.get_mut(&id) else {
            return;
        };
        let wanted = connection.interest();
        if wanted == connection.registered {
            return;
        }
        let fd: RawFd = connection.stream().as_raw_fd();
        let result = if wanted.is_empty() {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else if connection.registered.is_empty() {
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(wanted, id))
        } else {
            self.epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(wanted, id))
        };
        match result {
            Ok(()) => connection.registered = wanted,
            Err(e) => {
                log::warn!("connection {id}: cannot update its epoll registration: {e}");
                connections.remove(&id);
            }
        }
    }

    /// Starts or stops watching the listening socket.
    fn set_listening(&self, on: bool) {
        let fd = self.listener.as_raw_fd();
        let result = if on {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, LISTENER),
            )
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        };
        if let Err(e) = result {
            log::warn!("cannot change the watch on {}: {e}", self.socket);
        }
    }
}
