//! A peer's Noise state: its handshake, its sessions and WireGuard's timer rules, on
//! `tailsk8s-noise` (our own handshake and transport data), built on the peer's first use
//! rather than when the peer is configured.
//!
//! Why our own rather than boringtun's `Tunn` (issue 9): the transport keys are ours, so data
//! messages are sealed and opened with the AEAD chosen for the CPU and behind the kernel's
//! 8,128-message replay window (boringtun's is 1,024: several workers encrypting for one peer
//! could push its packets out of it), and the timer rules run on engine time, so tests step
//! them without a mock clock.
//!
//! Why lazily: building one costs two X25519 operations (the static-static Diffie-Hellman and
//! the keys derived from the peer's public key), and a node of a large cluster is configured
//! with thousands of peers it may never exchange a packet with. A fresh state and one never
//! built are indistinguishable from outside: neither has a session, both refuse everything but
//! an initiation, and `wg show` reads nothing from either.
//!
//! First use is a packet for the peer from the TUN, an initiation from it, or a keepalive due
//! to it. A response, cookie reply or data message only names a receiver index, and a fresh
//! state could only refuse it: such a message never builds one (it would buy anyone who can
//! send us a datagram a Diffie-Hellman per datagram); see [`crate::engine::receive`].
//!
//! - [`handshake`] — initiations and responses sent and consumed, cookie replies taken;
//! - [`sessions`] — the current, previous and next session and the packets waiting for one;
//! - [`timers`] — WireGuard's timer rules, run from the engine's tick;
//! - this module — the state's parts, the device's share ([`DeviceKeys`]) and its clock.

mod handshake;
mod sessions;
mod timers;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use tailsk8s_noise::Identity;

use crate::key::Key;
use crate::stats::DropReason;
use sessions::Sessions;

pub(crate) use sessions::Opened;

pub(crate) use handshake::Handshake;

/// What the device lends to every peer's Noise state: its identity (private key and the MAC
/// and cookie keys derived from it) and its clock.
#[derive(Clone, Copy)]
pub(crate) struct DeviceKeys<'a> {
    pub identity: &'a Identity,
    pub clock: &'a Clock,
}

/// What a peer brings to its Noise state.
#[derive(Clone, Copy)]
pub(crate) struct PeerKeys {
    pub public_key: Key,
    /// The high 24 bits of every receiver index this peer's sessions use (see
    /// [`crate::peer::Peer`]).
    pub slot: u32,
    pub preshared_key: Option<Key>,
    /// A low-order public key never gets a Noise state: nothing is sent to it.
    pub low_order: bool,
}

/// The time the Noise states run on: engine time in milliseconds, which the engine passes
/// in, and what it takes to turn that into the instants transport data expires by and the
/// TAI64N timestamps initiations carry.
pub(crate) struct Clock {
    /// Engine time 0.
    epoch: Instant,
    /// The wall clock at engine time 0, read once when the engine was made: timestamps are
    /// this plus engine time, so a wall clock stepped later cannot make them go backwards.
    wall_epoch: Duration,
    /// The last timestamp handed out, in nanoseconds: each one is later than the last (a
    /// responder refuses an initiation not newer than the previous one it accepted).
    last_timestamp_ns: AtomicU64,
}

impl Clock {
    pub(crate) fn new(epoch: Instant, wall: SystemTime) -> Clock {
        Clock {
            epoch,
            wall_epoch: wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            last_timestamp_ns: AtomicU64::new(0),
        }
    }

    /// The instant of engine time `now_ms`.
    #[inline]
    pub(crate) fn instant(&self, now_ms: u64) -> Instant {
        self.epoch + Duration::from_millis(now_ms)
    }

    /// A TAI64N timestamp for an initiation sent at engine time `now_ms`.
    fn timestamp(&self, now_ms: u64) -> [u8; 12] {
        let now = (self.wall_epoch + Duration::from_millis(now_ms)).as_nanos() as u64;
        let previous = self
            .last_timestamp_ns
            .fetch_update(Relaxed, Relaxed, |last| Some(now.max(last + 1)))
            .unwrap_or(0);
        let ns = now.max(previous + 1);
        tailsk8s_noise::primitives::tai64n(Duration::from_nanos(ns))
    }
}

/// A peer's Noise state, or nothing yet.
#[derive(Default)]
pub(crate) struct Noise {
    state: Option<Box<PeerNoise>>,
}

impl Noise {
    /// The state, if it was built.
    #[inline]
    pub(crate) fn built(&mut self) -> Option<&mut PeerNoise> {
        self.state.as_deref_mut()
    }

    /// The state, built now if this is the peer's first use. `None` when the device has no
    /// private key or the peer's key is low-order (nothing can be sent or received).
    #[inline]
    pub(crate) fn get_or_build(
        &mut self,
        peer: PeerKeys,
        device: Option<DeviceKeys<'_>>,
    ) -> Option<&mut PeerNoise> {
        if self.state.is_none() {
            self.state = build(peer, device?);
        }
        self.state.as_deref_mut()
    }

    /// Forgets the state (its sessions end); the next use builds a fresh one. For a new
    /// private key of the device or a new preshared key of the peer.
    pub(crate) fn reset(&mut self) {
        self.state = None;
    }

    /// Whether the state was built.
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        self.state.is_some()
    }

    /// Whether the state holds any session (current, previous or next).
    #[cfg(test)]
    pub(crate) fn has_session(&self) -> bool {
        self.state.as_ref().is_some_and(|s| {
            let sessions = &s.sessions;
            sessions.current.is_some() || sessions.previous.is_some() || sessions.next.is_some()
        })
    }
}

#[cold]
fn build(peer: PeerKeys, device: DeviceKeys<'_>) -> Option<Box<PeerNoise>> {
    if peer.low_order {
        return None;
    }
    Some(Box::new(PeerNoise {
        keys: tailsk8s_noise::Peer::new(
            device.identity,
            x25519_dalek::PublicKey::from(peer.public_key.0),
            peer.preshared_key.map(|k| k.0),
        ),
        slot: peer.slot,
        next_index: 0,
        sessions: Sessions::default(),
        handshake: Handshake::default(),
        timers: timers::Timers::default(),
        queue_drops: 0,
    }))
}

/// One peer's Noise state. Its methods take engine time (`now_ms`) and write what is to be
/// sent into the caller's scratch buffer; the peer's lock is held around each call.
pub(crate) struct PeerNoise {
    /// The peer as the handshake sees it: its key, the preshared key, the static-static DH.
    keys: tailsk8s_noise::Peer,
    slot: u32,
    /// The low byte of the next receiver index this peer's sessions get.
    next_index: u8,
    sessions: Sessions,
    handshake: Handshake,
    timers: timers::Timers,
    /// Waiting packets dropped since the caller last counted them.
    queue_drops: u64,
}

/// What sending a packet (or a keepalive) came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outgoing {
    /// A data message in `scratch[..n]`.
    Data(usize),
    /// No session yet: the packet waits (unless it was a keepalive), and a handshake
    /// initiation in `scratch[..n]` starts one.
    Initiation(usize),
    /// No session yet, a handshake is under way: the packet waits for it.
    Queued,
    /// Dropped, for this reason.
    Dropped(DropReason),
}

impl PeerNoise {
    /// A receiver index for a new session of this peer: the slot above, a byte that changes
    /// with every handshake below, so the current, previous and next sessions differ.
    fn new_index(&mut self) -> u32 {
        self.next_index = self.next_index.wrapping_add(1);
        self.slot << 8 | u32::from(self.next_index)
    }

    /// Seals `packet` (padded already) for the peer, or, without a session, queues it and
    /// starts a handshake. An empty packet is a keepalive: it is never queued.
    pub(crate) fn send(
        &mut self,
        device: DeviceKeys<'_>,
        now_ms: u64,
        packet: &[u8],
        scratch: &mut [u8],
    ) -> Outgoing {
        let at = device.clock.instant(now_ms);
        if let Some(n) = self.sessions.seal(at, packet, scratch) {
            self.timers.sent_authenticated(now_ms, !packet.is_empty());
            return Outgoing::Data(n);
        }
        if !packet.is_empty() && self.sessions.queue(packet) {
            self.queue_drops += 1;
        }
        if self.handshake.in_progress() {
            return Outgoing::Queued;
        }
        match self.initiate(device, now_ms, scratch, false) {
            Some(n) => Outgoing::Initiation(n),
            None => Outgoing::Dropped(DropReason::HandshakeFailed),
        }
    }

    /// Packets that waited for a session and were dropped since the last call (the queue
    /// overflowed, or the handshake was given up): for the caller to count.
    pub(crate) fn take_queue_drops(&mut self) -> u64 {
        std::mem::take(&mut self.queue_drops)
    }

    /// Seals every waiting packet with the current session, handing each data message to
    /// `emit`; `true` when there was one.
    pub(crate) fn flush(
        &mut self,
        device: DeviceKeys<'_>,
        now_ms: u64,
        scratch: &mut [u8],
        mut emit: impl FnMut(&[u8]),
    ) -> bool {
        let at = device.clock.instant(now_ms);
        let mut any = false;
        while let Some(n) = self.sessions.seal_queued(at, scratch) {
            any = true;
            self.timers.sent_authenticated(now_ms, true);
            emit(&scratch[..n]);
        }
        any
    }

    /// Opens the data message copied into `buf` with the session `receiver` names. A
    /// message that confirms the session we agreed to as responder makes it current; the
    /// caller then sends what waited for it ([`PeerNoise::flush`]).
    pub(crate) fn open(
        &mut self,
        device: DeviceKeys<'_>,
        now_ms: u64,
        receiver: u32,
        buf: &mut [u8],
    ) -> Result<Opened, DropReason> {
        let opened = self
            .sessions
            .open(device.clock.instant(now_ms), receiver, buf)?;
        self.timers
            .received_authenticated(now_ms, !opened.plaintext.is_empty());
        if opened.confirmed {
            self.handshake.abandon();
        }
        Ok(opened)
    }
}
