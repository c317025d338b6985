//! The inbound flow: a datagram from the listen socket becomes an IP packet on the TUN (or a
//! handshake answer on the wire).
//!
//! ```text
//!  datagram ─► message type (messages::message_header)
//!     ├─ initiation ─► MAC1 check; under load: cookie reply unless MAC2 is valid, then the
//!     │                source's token bucket ─► DH reveals static key ─► peer by key
//!     ├─ response ─► under load: as an initiation ─► peer by receiver index
//!     └─ cookie reply, data ─► peer by receiver index (messages::slot_of)
//!  ─► the peer's Tunn (an initiation builds it on first use; anything else finds none on a
//!     peer never used, and is refused as a fresh one would refuse it) ─► Tunn::decapsulate
//!     ├─ handshake done  ─► roam, last handshake ─► response / queued packets / keepalive ─► send
//!     ├─ keepalive, cookie ─► count (roam unless a cookie reply)
//!     └─ data ─► roam ─► inner header intact? ─► inner source ∈ this peer's allowed IPs?
//!                ─► write_tun
//! ```
//!
//! Drivers hand handshake messages (initiation, response, cookie reply) to
//! [`Batch::handle_handshake`], saying whether they are under load, and everything else to
//! [`Batch::handle_datagram`] (which takes handshake messages too, as if not loaded).
//!
//! A drop after the peer is known (by its receiver index, or by its key after the
//! Diffie-Hellman of an initiation) counts against that peer too; before, device-wide only.
//!
//! Functions in the order a datagram meets them: [`Batch::handle_datagram`] (the pipeline),
//! `find_peer`, `check_handshake`, `deliver`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, TunnResult};

use super::messages::{
    data_counter, message_header, slot_of, DATA_OVERHEAD, MESSAGE_COOKIE_REPLY, MESSAGE_DATA,
    MESSAGE_INITIATION, MESSAGE_RESPONSE,
};
use super::{drop_reason, send_counted, Batch, Config, Transmit, SCRATCH_LEN};
use crate::key::Key;
use crate::packet;
use crate::peer::{Endpoint, Peer, PeerState};
use crate::stats::{DropCounters, DropReason, Stats};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;

impl Batch<'_> {
    /// A datagram received on the listen socket from `from`, addressed to our `local_ip`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        self.receive(from, local_ip, datagram, false, scratch, tx);
    }

    /// A handshake message (see [`super::messages::is_handshake`]) taken from the driver's
    /// handshake queue; `under_load` when that queue is filling (the driver's policy): then
    /// initiations and responses without a valid cookie get a cookie reply instead of a
    /// Diffie-Hellman, and those with one pass their source's token bucket.
    pub fn handle_handshake(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        under_load: bool,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        self.receive(from, local_ip, datagram, under_load, scratch, tx);
    }

    fn receive(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        under_load: bool,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        let stats = &self.engine.stats;
        Stats::add(&stats.datagrams_in, 1);
        let source = Endpoint {
            addr: from,
            local_ip,
        };
        let Some((peer, message_type)) = self.find_peer(&source, datagram, under_load, scratch, tx)
        else {
            return;
        };
        let mut state = peer.state.lock();
        let state = &mut *state;
        let config = &*self.config;
        let tunn = if message_type == MESSAGE_INITIATION {
            // The peer's first use may be its initiation (`crate::noise`).
            state
                .noise
                .get_or_build(state.noise_keys(&peer), config.device_keys())
        } else {
            state.noise.built()
        };
        let Some(tunn) = tunn else {
            let reason = match config.device_keys() {
                Some(_) if !state.low_order => unbuilt_refusal(config, from, datagram, scratch),
                _ => DropReason::NoPrivateKey,
            };
            stats.peer_drop(&peer.drops, reason);
            return;
        };
        let (inner, inner_source) =
            match tunn.decapsulate(Some(from.ip()), datagram, &mut scratch[..]) {
                TunnResult::WriteToNetwork(reply)
                    if reply.first() == Some(&MESSAGE_COOKIE_REPLY) =>
                {
                    // The peers' limiter is never under load (`new_rate_limiter`): should
                    // boringtun answer with a cookie anyway, it is one, not a handshake.
                    stats.peer_drop(&peer.drops, DropReason::UnderLoad);
                    Stats::add(&stats.cookie_replies_sent, 1);
                    send_counted(stats, None, tx, &source, reply);
                    return;
                }
                TunnResult::WriteToNetwork(reply) => {
                    // A handshake message that completed: a response to send, or our keepalive
                    // that confirms the session we initiated.
                    state.traffic.received(datagram.len());
                    state.endpoint = Some(source);
                    state.last_handshake_ms = Some(self.now_ms);
                    state.last_sent_ms = self.now_ms;
                    // boringtun answers a handshake response with a keepalive. Like the kernel,
                    // send it only when no queued packet goes out to confirm the session
                    // instead. Copied out: the flush below reuses the scratch `reply` lives in.
                    let mut held = [0u8; DATA_OVERHEAD];
                    let keepalive =
                        message_type == MESSAGE_RESPONSE && reply.len() == DATA_OVERHEAD;
                    if keepalive {
                        held.copy_from_slice(reply);
                    } else {
                        let traffic = Some((&peer.public_key, &mut state.traffic));
                        send_counted(stats, traffic, tx, &source, reply);
                    }
                    // Packets queued while the handshake ran go out now.
                    let mut flushed = false;
                    while let TunnResult::WriteToNetwork(queued) =
                        tunn.decapsulate(None, &[], &mut scratch[..])
                    {
                        flushed = true;
                        Stats::add(&stats.tun_packets_in, 1);
                        let traffic = Some((&peer.public_key, &mut state.traffic));
                        send_counted(stats, traffic, tx, &source, queued);
                    }
                    if keepalive && !flushed {
                        let traffic = Some((&peer.public_key, &mut state.traffic));
                        send_counted(stats, traffic, tx, &source, &held);
                    }
                    return;
                }
                TunnResult::WriteToTunnelV4(inner, v4) => (inner, IpAddr::V4(v4)),
                TunnResult::WriteToTunnelV6(inner, v6) => (inner, IpAddr::V6(v6)),
                TunnResult::Done => {
                    // A keepalive or a cookie reply: authentic, nothing to deliver. A cookie
                    // reply is not authenticated by the peer's key, so it does not roam.
                    state.traffic.received(datagram.len());
                    if message_type != MESSAGE_COOKIE_REPLY {
                        state.endpoint = Some(source);
                    }
                    if message_type == MESSAGE_DATA {
                        counter_authenticated(state, datagram);
                    }
                    return;
                }
                TunnResult::Err(WireGuardError::InvalidCounter) if message_type == MESSAGE_DATA => {
                    // Behind boringtun's window: would the kernel's have taken it?
                    let reason = data_counter(datagram)
                        .map_or(DropReason::ReplayTooOld, |(index, counter)| {
                            state.counters_seen.too_old(index, counter)
                        });
                    stats.peer_drop(&peer.drops, reason);
                    return;
                }
                TunnResult::Err(e) => {
                    // The peer's, as the receiver index names it (claimed, not proven: a
                    // forged index fails right here) or as an initiation's key proved it.
                    stats.peer_drop(&peer.drops, drop_reason(&e));
                    return;
                }
            };
        counter_authenticated(state, datagram);
        deliver(
            config,
            stats,
            &peer,
            state,
            source,
            datagram.len(),
            (inner, inner_source),
            tx,
        );
    }

    /// Finds the peer a datagram belongs to. Initiations are checked for MAC1 (and a cookie
    /// under load, answering with a cookie reply) before the Diffie-Hellman that reveals the
    /// sender's static key; every other message names its receiver index (responses under
    /// load are checked as initiations first).
    fn find_peer(
        &self,
        source: &Endpoint,
        datagram: &[u8],
        under_load: bool,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) -> Option<(Arc<Peer>, u8)> {
        let stats = &self.engine.stats;
        let config = &*self.config;
        let (message_type, receiver_index) = match message_header(datagram) {
            Some((MESSAGE_INITIATION, _)) => {
                let (Some(private), Some(public)) = (config.private_key, config.public_key) else {
                    stats.drop(DropReason::NoPrivateKey);
                    return None;
                };
                let checker = if under_load {
                    &config.cookie_checker
                } else {
                    &config.rate_limiter
                };
                let init = match self
                    .check_handshake(checker, under_load, None, source, datagram, scratch, tx)?
                {
                    Packet::HandshakeInit(init) => init,
                    _ => {
                        stats.drop(DropReason::MalformedDatagram);
                        return None;
                    }
                };
                let secret = x25519_dalek::StaticSecret::from(private.0);
                let public = x25519_dalek::PublicKey::from(public.0);
                let Ok(half) = parse_handshake_anon(&secret, &public, &init) else {
                    stats.drop(DropReason::DecryptFailed);
                    return None;
                };
                let Some(peer) = config
                    .by_key
                    .get(&Key(half.peer_static_public))
                    .and_then(|&slot| config.peer(slot))
                else {
                    stats.drop(DropReason::UnknownPeer);
                    return None;
                };
                return Some((peer.clone(), MESSAGE_INITIATION));
            }
            Some((MESSAGE_RESPONSE, Some(receiver_index))) if under_load => {
                // A response's Diffie-Hellman happens in the peer's `Tunn`, which checks
                // MAC1 only: the cookie is checked here. Its drops count against the peer
                // its receiver index names.
                let claimed = config.peer(slot_of(receiver_index)).map(|p| &p.drops);
                self.check_handshake(
                    &config.cookie_checker,
                    true,
                    claimed,
                    source,
                    datagram,
                    scratch,
                    tx,
                )?;
                (MESSAGE_RESPONSE, receiver_index)
            }
            Some((message_type, Some(receiver_index))) => (message_type, receiver_index),
            _ => {
                stats.drop(DropReason::MalformedDatagram);
                return None;
            }
        };
        match config.peer(slot_of(receiver_index)) {
            Some(peer) => Some((peer.clone(), message_type)),
            None => {
                stats.drop(DropReason::UnknownPeer);
                None
            }
        }
    }

    /// MAC1 of a handshake message, and under load its cookie (MAC2) and its source's token
    /// bucket. A message without a valid cookie under load is answered with a cookie reply.
    /// `None` when the message goes no further (counted, and against `peer` when the message
    /// names one).
    #[allow(clippy::too_many_arguments)]
    fn check_handshake<'d>(
        &self,
        checker: &RateLimiter,
        under_load: bool,
        peer: Option<&DropCounters>,
        source: &Endpoint,
        datagram: &'d [u8],
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) -> Option<Packet<'d>> {
        let stats = &self.engine.stats;
        let count = |reason| match peer {
            Some(peer) => stats.peer_drop(peer, reason),
            None => stats.drop(reason),
        };
        match checker.verify_packet(Some(source.addr.ip()), datagram, &mut scratch[..]) {
            Ok(packet) => {
                if under_load
                    && !self
                        .engine
                        .source_limit
                        .lock()
                        .allow(source.addr.ip(), self.now_ms)
                {
                    count(DropReason::RateLimited);
                    return None;
                }
                Some(packet)
            }
            Err(TunnResult::WriteToNetwork(cookie)) => {
                count(DropReason::UnderLoad);
                Stats::add(&stats.cookie_replies_sent, 1);
                send_counted(stats, None, tx, source, cookie);
                None
            }
            Err(TunnResult::Err(e)) => {
                count(drop_reason(&e));
                None
            }
            Err(_) => {
                count(DropReason::MalformedDatagram);
                None
            }
        }
    }
}

/// Why a peer whose Noise state was never built drops a message other than an initiation: as
/// a fresh state would (it has no session and sent no initiation), without building one. The
/// message's MAC1 is checked first, as the state would check it.
fn unbuilt_refusal(
    config: &Config,
    from: SocketAddr,
    datagram: &[u8],
    scratch: &mut [u8; SCRATCH_LEN],
) -> DropReason {
    match config
        .rate_limiter
        .verify_packet(Some(from.ip()), datagram, &mut scratch[..])
    {
        Ok(Packet::PacketData(_)) => DropReason::NoSession,
        // A response or cookie reply to an initiation never sent.
        Ok(_) => DropReason::HandshakeFailed,
        Err(TunnResult::Err(e)) => drop_reason(&e),
        // The peers' limiter is never under load (`new_rate_limiter`): no cookie reply.
        Err(_) => DropReason::UnderLoad,
    }
}

/// A data message (a packet or a keepalive) of `state`'s peer was authenticated: its
/// counter is the session's highest so far or behind it.
#[inline]
fn counter_authenticated(state: &mut PeerState, datagram: &[u8]) {
    if let Some((index, counter)) = data_counter(datagram) {
        state.counters_seen.authenticated(index, counter);
    }
}

/// A decrypted data packet from `peer`: roam, then the checks that keep a peer to its own
/// addresses (their drops count against it), then the TUN.
#[allow(clippy::too_many_arguments)]
fn deliver(
    config: &Config,
    stats: &Stats,
    peer: &Peer,
    state: &mut PeerState,
    source: Endpoint,
    wire_len: usize,
    (inner, inner_source): (&[u8], IpAddr),
    tx: &mut impl Transmit,
) {
    // Authentic: count it and roam, even if the checks below drop it.
    state.traffic.received(wire_len);
    state.endpoint = Some(source);
    // boringtun trims to the length the header claims without checking that a whole
    // header remains: a peer could otherwise put a header-less stub on the TUN.
    if packet::ip_len(inner) != Some(inner.len()) || packet::source(inner) != Some(inner_source) {
        stats.peer_drop(&peer.drops, DropReason::MalformedPacket);
        return;
    }
    // Cryptokey routing, inbound: the inner source must route back to the same peer.
    if config.allowed_ips.lookup(inner_source) != Some(peer.slot) {
        stats.peer_drop(&peer.drops, DropReason::NotAllowed);
        return;
    }
    Stats::add(&stats.tun_packets_out, 1);
    tx.write_tun(inner);
}
