//! virtio devices and the virtio-pci transport.
#![deny(missing_docs)]
