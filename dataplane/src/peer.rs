//! A peer: one remote node, its Noise state (built on first use: see [`crate::noise`]), its
//! endpoint, its traffic counters and its share of the drops. The engine locks a peer only
//! around one call into its Noise state and the copy of its output, never across a syscall.

use std::net::{IpAddr, SocketAddr};

use parking_lot::Mutex;

use crate::key::Key;
use crate::noise::{Noise, PeerKeys};
use crate::stats::DropCounters;

/// Where a peer is reached: its address, and the local address it last sent to (replies
/// leave from there, so a multi-homed node answers from the address the peer used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub local_ip: Option<IpAddr>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            local_ip: None,
        }
    }
}

/// One peer. `slot` is the high 24 bits of its sessions' receiver indices, so incoming
/// messages find their peer from the receiver index alone.
pub struct Peer {
    pub public_key: Key,
    pub slot: u32,
    /// Drops that concern this peer, by reason. Atomics outside the lock: some drops happen
    /// before the lock is taken (too big) or after the engine let go of it (a failed send).
    pub drops: DropCounters,
    pub(crate) state: Mutex<PeerState>,
}

/// The mutable part of a peer, behind its lock.
pub(crate) struct PeerState {
    /// Built on first use; never while the device has no private key, nor for a low-order key.
    pub noise: Noise,
    pub endpoint: Option<Endpoint>,
    pub preshared_key: Option<Key>,
    /// Seconds; 0 = off. Kept here rather than in the Noise state so that changing it keeps
    /// the session.
    pub persistent_keepalive: u16,
    /// Engine ticks (milliseconds of engine time) when we last sent anything to this peer.
    pub last_sent_ms: u64,
    /// Send one keepalive at the next timer tick (persistent keepalive just turned on).
    pub keepalive_due: bool,
    /// Engine time (ms) of the last completed handshake; `wg show` turns it into a date.
    pub last_handshake_ms: Option<u64>,
    /// What went over the wire to and from this peer.
    pub traffic: Traffic,
    pub low_order: bool,
}

impl Peer {
    pub(crate) fn new(public_key: Key, slot: u32) -> Peer {
        Peer {
            public_key,
            slot,
            drops: DropCounters::default(),
            state: Mutex::new(PeerState {
                noise: Noise::default(),
                endpoint: None,
                preshared_key: None,
                persistent_keepalive: 0,
                last_sent_ms: 0,
                keepalive_due: false,
                last_handshake_ms: None,
                traffic: Traffic::default(),
                low_order: public_key.is_low_order_public(),
            }),
        }
    }
}

/// A peer's wire counters, kept under its lock (plain integers: the engine holds the lock
/// whenever it counts).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Traffic {
    /// Wire bytes of WireGuard messages, as `wg show` reports them.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Authenticated WireGuard messages received / messages sent.
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Handshake initiations sent (first tries and retries).
    pub handshake_initiations: u64,
}

impl Traffic {
    /// One authenticated message of `len` wire bytes received.
    #[inline]
    pub fn received(&mut self, len: usize) {
        self.rx_bytes += len as u64;
        self.rx_packets += 1;
    }
}

impl PeerState {
    /// What this peer brings to its Noise state.
    #[inline]
    pub(crate) fn noise_keys(&self, peer: &Peer) -> PeerKeys {
        PeerKeys {
            public_key: peer.public_key,
            slot: peer.slot,
            preshared_key: self.preshared_key,
            low_order: self.low_order,
        }
    }
}
