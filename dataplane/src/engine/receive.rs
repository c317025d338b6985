//! The inbound flow: a datagram from the listen socket becomes an IP packet on the TUN (or a
//! handshake answer on the wire).
//!
//! ```text
//!  datagram ─► message type (messages::message_header)
//!     ├─ initiation ─► MAC1; under load: cookie reply unless MAC2 is valid, then the
//!     │                source's token bucket ─► DH reveals the static key ─► peer by key
//!     │                ─► its Noise state (built on first use) ─► timestamp, flood checks
//!     │                ─► response ─► send
//!     ├─ response ─► under load: as an initiation ─► peer by receiver index ─► completes our
//!     │              initiation ─► waiting packets (or a keepalive) ─► send
//!     ├─ cookie reply ─► peer by receiver index ─► the cookie for our next MAC2
//!     └─ data ─► peer by receiver index ─► session by receiver index ─► replay window,
//!                open in place ─► roam ─► inner header intact? ─► inner source ∈ this peer's
//!                allowed IPs? ─► write_tun (a first message on the session we answered:
//!                it is confirmed, waiting packets go out)
//! ```
//!
//! Only an initiation builds a peer's Noise state; anything else finds none on a peer never
//! used, and is refused as a fresh one would refuse it (`crate::noise`).
//!
//! Drivers hand handshake messages (initiation, response, cookie reply) to
//! [`Batch::handle_handshake`], saying whether they are under load, and everything else to
//! [`Batch::handle_datagram`] (which takes handshake messages too, as if not loaded).
//!
//! A drop after the peer is known (by its receiver index, or by its key after the
//! Diffie-Hellman of an initiation) counts against that peer too; before, device-wide only.
//!
//! Functions in the order a datagram meets them: [`Batch::handle_datagram`] (the pipeline),
//! `find_peer`, `check_handshake`, then one per message type, and `deliver`.

use std::net::{IpAddr, SocketAddr};

use tailsk8s_noise::OpenedInitiation;

use super::messages::{
    message_header, slot_of, MESSAGE_COOKIE_REPLY, MESSAGE_DATA, MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
};
use super::{send_counted, Batch, Transmit, SCRATCH_LEN};
use crate::noise::{DeviceKeys, Outgoing};
use crate::packet;
use crate::peer::{Endpoint, Peer, PeerState};
use crate::stats::{DropCounters, DropReason, Stats};

/// A datagram as the driver hands it over: lent for opening in place, or only to read.
enum Datagram<'d> {
    Mutable(&'d mut [u8]),
    Shared(&'d [u8]),
}

impl Datagram<'_> {
    fn bytes(&mut self) -> &[u8] {
        match self {
            Datagram::Mutable(buf) => buf,
            Datagram::Shared(bytes) => bytes,
        }
    }
}

/// The peer a datagram belongs to, and what was learnt finding it.
enum Found {
    /// An initiation, opened as far as its sender's static key.
    Initiation(Box<OpenedInitiation>),
    /// Any other message, by the receiver index it names.
    Indexed(u8, u32),
}

impl Batch<'_> {
    /// A datagram received on the listen socket from `from`, addressed to our `local_ip`. A
    /// data message is opened where it lies: what `datagram` holds afterwards is unspecified.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &mut [u8],
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        let datagram = Datagram::Mutable(datagram);
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
        let datagram = Datagram::Shared(datagram);
        self.receive(from, local_ip, datagram, under_load, scratch, tx);
    }

    fn receive(
        &self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        mut whole: Datagram<'_>,
        under_load: bool,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        let datagram = whole.bytes();
        let stats = &self.engine.stats;
        self.tally.datagram_in();
        let source = Endpoint {
            addr: from,
            local_ip,
        };
        let Some((peer, found)) = self.find_peer(&source, datagram, under_load, tx) else {
            return;
        };
        let mut state = peer.state.lock();
        let state = &mut *state;
        let config = &*self.config;
        let Some(device) = config.device_keys(&self.engine.clock) else {
            stats.peer_drop(&peer.drops, DropReason::NoPrivateKey);
            return;
        };
        let noise = match found {
            // The peer's first use may be its initiation (`crate::noise`).
            Found::Initiation(_) => state
                .noise
                .get_or_build(state.noise_keys(peer), Some(device)),
            Found::Indexed(..) => state.noise.built(),
        };
        let Some(noise) = noise else {
            let reason = if state.low_order {
                DropReason::LowOrderKey
            } else {
                unbuilt_refusal(device, datagram)
            };
            stats.peer_drop(&peer.drops, reason);
            return;
        };
        let now_ms = self.now_ms;
        let result = match found {
            Found::Initiation(opened) => {
                match noise.consume_initiation(device, now_ms, *opened, &mut scratch[..]) {
                    Ok(n) => {
                        state.traffic.received(datagram.len());
                        state.endpoint = Some(source);
                        state.last_sent_ms = now_ms;
                        let traffic = Some((&peer.public_key, &mut state.traffic));
                        send_counted(&self.tally, traffic, tx, &source, &scratch[..n]);
                        Ok(())
                    }
                    Err(reason) => Err(reason),
                }
            }
            Found::Indexed(MESSAGE_RESPONSE, _) => {
                match noise.consume_response(device, now_ms, datagram) {
                    Ok(()) => {
                        state.traffic.received(datagram.len());
                        state.endpoint = Some(source);
                        state.last_handshake_ms = Some(now_ms);
                        // What waited for the session goes out; if nothing did, a keepalive
                        // confirms the session to the responder.
                        self.send_waiting(peer, state, device, source, scratch, tx, true);
                        Ok(())
                    }
                    Err(reason) => Err(reason),
                }
            }
            Found::Indexed(MESSAGE_COOKIE_REPLY, _) => {
                // Not authenticated by the peer's key: no roaming.
                noise
                    .consume_cookie_reply(now_ms, datagram)
                    .map(|()| state.traffic.received(datagram.len()))
            }
            Found::Indexed(_, receiver) => {
                self.receive_data(peer, state, device, source, receiver, whole, scratch, tx)
            }
        };
        if let Err(reason) = result {
            stats.peer_drop(&peer.drops, reason);
        }
    }

    /// A data message of `peer`: opened in a copy in `scratch`, then delivered.
    #[allow(clippy::too_many_arguments)]
    fn receive_data(
        &self,
        peer: &Peer,
        state: &mut PeerState,
        device: DeviceKeys<'_>,
        source: Endpoint,
        receiver: u32,
        datagram: Datagram<'_>,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) -> Result<(), DropReason> {
        let now_ms = self.now_ms;
        let Some(noise) = state.noise.built() else {
            return Err(DropReason::NoSession);
        };
        // Opened where it lies when the driver lent it; else in a copy in `scratch`.
        let buf: &mut [u8] = match datagram {
            Datagram::Mutable(buf) => buf,
            Datagram::Shared(bytes) => {
                let buf = scratch
                    .get_mut(..bytes.len())
                    .ok_or(DropReason::MalformedDatagram)?;
                buf.copy_from_slice(bytes);
                buf
            }
        };
        let wire_len = buf.len();
        let opened = noise.open(device, now_ms, receiver, buf)?;
        if opened.confirmed {
            state.last_handshake_ms = Some(now_ms);
        }
        // Authentic: count it and roam, even if the checks below drop it.
        state.traffic.received(wire_len);
        state.endpoint = Some(source);
        if !opened.plaintext.is_empty() {
            self.deliver(peer, &buf[opened.plaintext.clone()], tx);
        }
        if opened.confirmed {
            self.send_waiting(peer, state, device, source, scratch, tx, false);
        }
        Ok(())
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
        tx: &mut impl Transmit,
    ) -> Option<(&Peer, Found)> {
        let stats = &self.engine.stats;
        let config = &*self.config;
        let (message_type, receiver_index) = match message_header(datagram) {
            Some((MESSAGE_INITIATION, _)) => {
                let Some(identity) = config.identity.as_deref() else {
                    stats.drop(DropReason::NoPrivateKey);
                    return None;
                };
                self.check_handshake(under_load, None, source, datagram, tx)?;
                let opened = match tailsk8s_noise::open_initiation(identity, datagram) {
                    Ok(opened) => opened,
                    Err(_) => {
                        stats.drop(DropReason::DecryptFailed);
                        return None;
                    }
                };
                let key = crate::key::Key(*opened.initiator().as_bytes());
                let Some(peer) = config.by_key.get(&key).and_then(|&slot| config.peer(slot)) else {
                    stats.drop(DropReason::UnknownPeer);
                    return None;
                };
                return Some((peer, Found::Initiation(Box::new(opened))));
            }
            Some((MESSAGE_RESPONSE, Some(receiver_index))) if under_load => {
                // The cookie is checked here, before the response's Diffie-Hellman; its
                // drops count against the peer its receiver index names.
                let claimed = config.peer(slot_of(receiver_index)).map(|p| &p.drops);
                self.check_handshake(true, claimed, source, datagram, tx)?;
                (MESSAGE_RESPONSE, receiver_index)
            }
            Some((message_type, Some(receiver_index))) => (message_type, receiver_index),
            _ => {
                stats.drop(DropReason::MalformedDatagram);
                return None;
            }
        };
        match config.peer(slot_of(receiver_index)) {
            Some(peer) => Some((peer, Found::Indexed(message_type, receiver_index))),
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
    fn check_handshake(
        &self,
        under_load: bool,
        peer: Option<&DropCounters>,
        source: &Endpoint,
        datagram: &[u8],
        tx: &mut impl Transmit,
    ) -> Option<()> {
        let stats = &self.engine.stats;
        let count = |reason| match peer {
            Some(peer) => stats.peer_drop(peer, reason),
            None => stats.drop(reason),
        };
        let Some(identity) = self.config.identity.as_deref() else {
            count(DropReason::NoPrivateKey);
            return None;
        };
        if !tailsk8s_noise::mac1_valid(identity, datagram) {
            count(DropReason::DecryptFailed);
            return None;
        }
        if !under_load {
            return Some(());
        }
        let checked =
            self.engine
                .cookies
                .lock()
                .check(identity, self.now_ms, source.addr, datagram);
        if let Err(reply) = checked {
            count(DropReason::UnderLoad);
            if let Some(reply) = reply {
                Stats::add(&stats.cookie_replies_sent, 1);
                send_counted(&self.tally, None, tx, source, &reply);
            }
            return None;
        }
        if !self
            .engine
            .source_limit
            .lock()
            .allow(source.addr.ip(), self.now_ms)
        {
            count(DropReason::RateLimited);
            return None;
        }
        Some(())
    }
}

impl Batch<'_> {
    /// Sends what waited for a new session (a keepalive instead when nothing did and
    /// `keepalive_if_none`, to confirm a session we initiated).
    #[allow(clippy::too_many_arguments)]
    fn send_waiting(
        &self,
        peer: &Peer,
        state: &mut PeerState,
        device: DeviceKeys<'_>,
        source: Endpoint,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
        keepalive_if_none: bool,
    ) {
        let (tally, now_ms) = (&self.tally, self.now_ms);
        let Some(noise) = state.noise.built() else {
            return;
        };
        let mut sent = noise.flush(device, now_ms, &mut scratch[..], |datagram| {
            tally.tun_packet_in();
            send_counted(
                tally,
                Some((&peer.public_key, &mut state.traffic)),
                tx,
                &source,
                datagram,
            );
        });
        if !sent && keepalive_if_none {
            if let Outgoing::Data(n) = noise.send(device, now_ms, &[], &mut scratch[..]) {
                let traffic = Some((&peer.public_key, &mut state.traffic));
                send_counted(tally, traffic, tx, &source, &scratch[..n]);
                sent = true;
            }
        }
        if sent {
            state.last_sent_ms = now_ms;
        }
    }

    /// A decrypted data packet from `peer` (its plaintext, padding included): the checks
    /// that keep a peer to its own addresses (their drops count against it), then the TUN.
    fn deliver(&self, peer: &Peer, plaintext: &[u8], tx: &mut impl Transmit) {
        let stats = &self.engine.stats;
        // The header must be whole and claim no more than arrived; padding after it goes.
        let Some(inner) = packet::ip_len(plaintext).and_then(|n| plaintext.get(..n)) else {
            stats.peer_drop(&peer.drops, DropReason::MalformedPacket);
            return;
        };
        let Some(inner_source) = packet::source(inner) else {
            stats.peer_drop(&peer.drops, DropReason::MalformedPacket);
            return;
        };
        // Cryptokey routing, inbound: the inner source must route back to the same peer.
        if self.route(inner_source) != Some(peer.slot) {
            stats.peer_drop(&peer.drops, DropReason::NotAllowed);
            return;
        }
        self.tally.tun_packet_out();
        tx.write_tun(inner);
    }
}

/// Why a peer whose Noise state was never built drops a message other than an initiation: as
/// a fresh state would (it has no session and sent no initiation). A handshake message's
/// MAC1 is checked first, as the state would check it.
fn unbuilt_refusal(device: DeviceKeys<'_>, datagram: &[u8]) -> DropReason {
    match message_header(datagram) {
        Some((MESSAGE_DATA, _)) => DropReason::NoSession,
        Some((MESSAGE_RESPONSE, _)) if !tailsk8s_noise::mac1_valid(device.identity, datagram) => {
            DropReason::DecryptFailed
        }
        // A response or cookie reply to an initiation never sent.
        _ => DropReason::HandshakeFailed,
    }
}
