//! The outbound flow: an IP packet read from the TUN leaves as a WireGuard datagram.
//!
//! ```text
//!  TUN packet ─► destination ─► allowed IPs (LPM) ─► peer ─► MTU check ─► pad to 16 ─►
//!      peer usable? (key, not low-order, endpoint) ─► its Noise state (built on first use)
//!      ─► sealed with the current session ─► send(endpoint, datagram)
//!
//!  no peer:   ICMP host unreachable  ─► write_tun
//!  too big:   ICMP fragmentation needed (IPv4 with DF) / packet too big (IPv6) ─► write_tun
//!  no session: the packet waits (up to 128 per peer) and a handshake initiation goes out
//! ```
//!
//! Every drop after the peer is found counts against that peer too.

use super::messages::{DATA_OVERHEAD, INITIATION_LEN};
use super::{count_sent, Batch, Transmit, SCRATCH_LEN};
use crate::noise::Outgoing;
use crate::packet;
use crate::stats::{DropReason, Stats};

impl Batch<'_> {
    /// A packet read from the TUN: `buf[..len]` is the packet; the rest of `buf` is room the
    /// engine may use to pad it in place (WireGuard pads plaintext to 16 bytes).
    pub fn handle_tun_packet(
        &mut self,
        buf: &mut [u8],
        len: usize,
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        let stats = &self.engine.stats;
        let Some(packet) = buf.get(..len) else {
            stats.drop(DropReason::MalformedPacket);
            return;
        };
        let Some(destination) = packet::destination(packet) else {
            stats.drop(DropReason::MalformedPacket);
            return;
        };
        let config = &*self.config;
        let Some(peer) = self.route(destination).and_then(|slot| config.peer(slot)) else {
            stats.drop(DropReason::NoRoute);
            if let Some(n) = packet::icmp_unreachable(packet, destination, &mut scratch[..]) {
                Stats::add(&stats.icmp_errors_sent, 1);
                tx.write_tun(&scratch[..n]);
            }
            return;
        };
        let mtu = config.mtu;
        if len > mtu {
            stats.peer_drop(&peer.drops, DropReason::TooBig);
            if packet::dont_fragment(packet) {
                let mtu16 = u16::try_from(mtu).unwrap_or(u16::MAX);
                if let Some(n) = packet::icmp_too_big(packet, mtu16, destination, &mut scratch[..])
                {
                    Stats::add(&stats.icmp_errors_sent, 1);
                    tx.write_tun(&scratch[..n]);
                }
            }
            return;
        }
        // Pad to a multiple of 16, never beyond the MTU or the caller's buffer.
        let padded = (len.next_multiple_of(16)).min(mtu).min(buf.len()).max(len);
        buf[len..padded].fill(0);

        let mut state = peer.state.lock();
        let state = &mut *state;
        if state.low_order {
            stats.peer_drop(&peer.drops, DropReason::LowOrderKey);
            return;
        }
        // The peer's first use builds its Noise state (`crate::noise`).
        let device = config.device_keys(&self.engine.clock);
        let Some(noise) = state.noise.get_or_build(state.noise_keys(peer), device) else {
            stats.peer_drop(&peer.drops, DropReason::NoPrivateKey);
            return;
        };
        let (Some(device), Some(endpoint)) = (device, state.endpoint) else {
            stats.peer_drop(&peer.drops, DropReason::NoEndpoint);
            return;
        };
        // Sealed where the sink sends it from: room for the data message, or for the
        // initiation of the handshake the packet would wait for.
        let room = (padded + DATA_OVERHEAD).max(INITIATION_LEN);
        let (now_ms, tally, traffic) = (self.now_ms, &self.tally, &mut state.traffic);
        let outgoing = tx.send_built(&peer.public_key, &endpoint, room, &mut scratch[..], |out| {
            let outgoing = noise.send(device, now_ms, &buf[..padded], out);
            let sent = match outgoing {
                Outgoing::Data(n) | Outgoing::Initiation(n) => {
                    count_sent(tally, traffic, &out[..n]);
                    Some(n)
                }
                Outgoing::Queued | Outgoing::Dropped(_) => None,
            };
            (sent, outgoing)
        });
        let dropped_waiting = noise.take_queue_drops();
        match outgoing {
            // A data message, or the initiation of the handshake the packet waits for.
            Outgoing::Data(_) | Outgoing::Initiation(_) => {
                self.tally.tun_packet_in();
                state.last_sent_ms = self.now_ms;
            }
            Outgoing::Queued => {}
            Outgoing::Dropped(reason) => stats.peer_drop(&peer.drops, reason),
        }
        for _ in 0..dropped_waiting {
            stats.peer_drop(&peer.drops, DropReason::NoSession);
        }
    }
}
