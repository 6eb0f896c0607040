//! Guest memory and rings as the backend crate shares them with a daemon's backend.

use std::sync::{Mutex, PoisonError};

use vhost_user_backend::VringRwLock;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the backend crate shares it: the frontend's regions, replaced as a whole on
/// every `SET_MEM_TABLE`. `B` is the dirty-page bitmap (`()`: no dirty logging).
pub type GuestMemory<B = ()> = GuestMemoryAtomic<GuestMemoryMmap<B>>;

/// The ring type the backends use: one reader-writer lock per queue, so the protocol thread
/// (`GET_VRING_BASE`, ...) waits for a worker in the middle of a queue and vice versa.
pub type Vring<B = ()> = VringRwLock<GuestMemory<B>>;

/// A backend's view of guest memory: what the crate last handed over (`update_memory`).
#[derive(Debug)]
pub struct MemorySlot<B: Bitmap + 'static = ()>(Mutex<GuestMemory<B>>);

impl<B: Bitmap + 'static> MemorySlot<B> {
    /// Starts with `mem` (the object the daemon was created with).
    pub fn new(mem: GuestMemory<B>) -> Self {
        MemorySlot(Mutex::new(mem))
    }

    /// The memory to serve a request with.
    pub fn current(&self) -> GuestMemory<B> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What `VhostUserBackend::update_memory` does with the crate's new memory.
    pub fn replace(&self, mem: GuestMemory<B>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = mem;
    }
}
