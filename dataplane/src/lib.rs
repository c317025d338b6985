//! tailsk8s data plane: everything that touches packets.
//!
//! The heart is [`engine::Engine`], a sans-IO WireGuard router: it is fed "a packet came
//! from the TUN", "a datagram came from that address" and "time passed", and it hands back
//! what to write where through a [`engine::Transmit`] sink. No sockets, threads or clocks
//! live inside it (only the wall clock is read, once, to date handshakes). Each peer's Noise
//! state (`noise`: handshake, sessions, timer rules) is built on `tailsk8s-noise`.
//! Around it sit thin Linux drivers (`tun`, `udp`, `outbox`, on the OS calls in `sys`), the
//! device that ties them together with its worker threads (`device`, placed by `affinity`
//! through `steering`), and the UAPI server that `wg` talks to (`uapi`). `testing` (unit
//! tests and the `testing` feature only) wires engines back to back in memory.

pub mod affinity;
pub mod allowed_ips;
pub mod checksum;
pub mod config;
pub mod control;
pub mod device;
pub mod engine;
pub mod gro;
pub mod key;
pub(crate) mod noise;
pub mod offload;
pub mod outbox;
pub mod packet;
pub mod peer;
pub mod stats;
pub mod steering;
pub(crate) mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tun;
pub mod uapi;
pub mod udp;
pub mod vnet;
