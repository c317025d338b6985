//! A peer's Noise state (boringtun's `Tunn`: its handshake, sessions and timers), built on the
//! peer's first use rather than when the peer is configured.
//!
//! Why lazily: building one costs two X25519 operations (the static-static Diffie-Hellman and
//! our own public key) and about 10 KiB, and a node of a large cluster is configured with
//! thousands of peers it may never exchange a packet with — 5,000 of them made most of a
//! router's start. A fresh state and one never built are indistinguishable from outside:
//! neither has a session, both refuse everything but an initiation, and `wg show` reads
//! nothing from either.
//!
//! First use is a packet for the peer from the TUN, an initiation from it, or a keepalive due
//! to it. A response, cookie reply or data message only names a receiver index, and a fresh
//! state could only refuse it: such a message never builds one (it would buy anyone who can
//! send us a datagram a Diffie-Hellman per datagram); see [`crate::engine::receive`].

use std::sync::Arc;

use boringtun::noise::{rate_limiter::RateLimiter, Tunn};

use crate::key::Key;

/// What the device lends to every peer's Noise state: its private key and the MAC1 checker
/// the peers share.
#[derive(Clone, Copy)]
pub(crate) struct DeviceKeys<'a> {
    pub private_key: &'a Key,
    pub rate_limiter: &'a Arc<RateLimiter>,
}

/// What a peer brings to its Noise state.
#[derive(Clone, Copy)]
pub(crate) struct PeerKeys {
    pub public_key: Key,
    /// Doubles as boringtun's 24-bit peer index (see [`crate::peer::Peer`]).
    pub slot: u32,
    pub preshared_key: Option<Key>,
    /// A low-order public key never gets a Noise state: nothing is sent to it.
    pub low_order: bool,
}

/// A peer's Noise state, or nothing yet.
#[derive(Default)]
pub(crate) struct Noise {
    tunn: Option<Box<Tunn>>,
}

impl Noise {
    /// The state, if it was built.
    #[inline]
    pub(crate) fn built(&mut self) -> Option<&mut Tunn> {
        self.tunn.as_deref_mut()
    }

    /// The state, built now if this is the peer's first use. `None` when the device has no
    /// private key or the peer's key is low-order (nothing can be sent or received).
    #[inline]
    pub(crate) fn get_or_build(
        &mut self,
        peer: PeerKeys,
        device: Option<DeviceKeys<'_>>,
    ) -> Option<&mut Tunn> {
        if self.tunn.is_none() {
            self.tunn = build(peer, device?);
        }
        self.tunn.as_deref_mut()
    }

    /// Forgets the state (its sessions end); the next use builds a fresh one. For a new
    /// private key of the device or a new preshared key of the peer.
    pub(crate) fn reset(&mut self) {
        self.tunn = None;
    }

    /// Whether the state was built.
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        self.tunn.is_some()
    }
}

#[cold]
fn build(peer: PeerKeys, device: DeviceKeys<'_>) -> Option<Box<Tunn>> {
    if peer.low_order {
        return None;
    }
    Some(Box::new(Tunn::new(
        x25519_dalek::StaticSecret::from(device.private_key.0),
        x25519_dalek::PublicKey::from(peer.public_key.0),
        peer.preshared_key.map(|k| k.0),
        None,
        peer.slot,
        Some(device.rate_limiter.clone()),
    )))
}
