//! Counters the data plane keeps instead of logging: every dropped packet by reason, plus
//! packet and byte totals per direction. Relaxed atomics, read by `tailsk8s status` / metrics.
//!
//! Drops are counted device-wide, and a drop that concerns a peer is counted against that
//! peer too ([`DropCounters`] in each peer, bumped with [`Stats::peer_drop`]): the device's
//! totals are the sum over every drop, the peers' counters a breakdown of part of them.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the engine dropped a packet or datagram. The snake_case name is the `reason` label used
/// in metrics, logs and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum DropReason {
    /// A TUN packet whose destination is in no peer's allowed IPs.
    NoRoute,
    /// A decrypted packet whose inner source is not in the sending peer's allowed IPs.
    NotAllowed,
    /// A TUN packet that is not IPv4/IPv6 or whose header is inconsistent.
    MalformedPacket,
    /// A datagram that is not a well-formed WireGuard message.
    MalformedDatagram,
    /// A datagram addressed to a receiver index or static key we do not know.
    UnknownPeer,
    /// Authentication failed: bad MAC on a handshake message or bad AEAD tag on data.
    DecryptFailed,
    /// A data message whose counter was seen before (a duplicate).
    Replay,
    /// A data message more than 8,128 behind the session's newest (the kernel's replay
    /// window), or past the session's last counter.
    ReplayTooOld,
    /// A handshake message that failed (stale timestamp, wrong state, bad index).
    HandshakeFailed,
    /// A data message for which no session exists (yet or any more).
    NoSession,
    /// A handshake initiation without a valid cookie while under load (a cookie reply went out).
    UnderLoad,
    /// A TUN packet larger than the tunnel MTU (an ICMP error went back when allowed).
    TooBig,
    /// The device has no private key, so nothing can be sent or received.
    NoPrivateKey,
    /// The peer has no endpoint yet, so there is nowhere to send.
    NoEndpoint,
    /// The peer's public key is a low-order point: nothing is ever sent to it.
    LowOrderKey,
    /// An output queue was full (a driver could not take more this batch).
    QueueFull,
    /// The kernel refused to send a datagram (no route to the endpoint, and the like).
    SendFailed,
    /// A handshake message that found the handshake queue full (a flood beyond what the
    /// handshake thread keeps up with).
    HandshakeQueueFull,
    /// A handshake message with a valid cookie under load, beyond its source's rate; or an
    /// initiation from a peer less than 20 ms after the last one accepted from it.
    RateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 19] = [
        DropReason::NoRoute,
        DropReason::NotAllowed,
        DropReason::MalformedPacket,
        DropReason::MalformedDatagram,
        DropReason::UnknownPeer,
        DropReason::DecryptFailed,
        DropReason::Replay,
        DropReason::ReplayTooOld,
        DropReason::HandshakeFailed,
        DropReason::NoSession,
        DropReason::UnderLoad,
        DropReason::TooBig,
        DropReason::NoPrivateKey,
        DropReason::NoEndpoint,
        DropReason::LowOrderKey,
        DropReason::QueueFull,
        DropReason::SendFailed,
        DropReason::HandshakeQueueFull,
        DropReason::RateLimited,
    ];

    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::NotAllowed => "not_allowed",
            DropReason::MalformedPacket => "malformed_packet",
            DropReason::MalformedDatagram => "malformed_datagram",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replay => "replay",
            DropReason::ReplayTooOld => "replay_too_old",
            DropReason::HandshakeFailed => "handshake_failed",
            DropReason::NoSession => "no_session",
            DropReason::UnderLoad => "under_load",
            DropReason::TooBig => "too_big",
            DropReason::NoPrivateKey => "no_private_key",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::LowOrderKey => "low_order_key",
            DropReason::QueueFull => "queue_full",
            DropReason::SendFailed => "send_failed",
            DropReason::HandshakeQueueFull => "handshake_queue_full",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// Drops by reason, counted with relaxed atomics: the device's and each peer's.
#[derive(Debug, Default)]
pub struct DropCounters([AtomicU64; DropReason::ALL.len()]);

impl DropCounters {
    #[inline]
    pub fn add(&self, reason: DropReason) {
        self.0[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Relaxed)
    }

    /// The counts as of now.
    pub fn totals(&self) -> DropTotals {
        DropTotals(std::array::from_fn(|i| self.0[i].load(Relaxed)))
    }
}

/// Drops by reason at one instant (a snapshot of [`DropCounters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropTotals([u64; DropReason::ALL.len()]);

impl DropTotals {
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// Every reason with its count, in [`DropReason::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }

    /// All drops, whatever the reason.
    pub fn sum(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Device-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    drops: DropCounters,
    /// Packets read from the TUN and sent encrypted.
    pub tun_packets_in: AtomicU64,
    /// Decrypted packets written to the TUN.
    pub tun_packets_out: AtomicU64,
    /// WireGuard datagrams received / sent (all message types).
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// ICMP errors generated back to local senders.
    pub icmp_errors_sent: AtomicU64,
    /// Cookie replies sent while under load.
    pub cookie_replies_sent: AtomicU64,
}

impl Stats {
    #[inline]
    pub fn drop(&self, reason: DropReason) {
        self.drops.add(reason);
    }

    /// A drop that concerns a peer: counted device-wide, as [`Stats::drop`], and against the
    /// peer (`peer` is its counters).
    #[inline]
    pub fn peer_drop(&self, peer: &DropCounters, reason: DropReason) {
        self.drops.add(reason);
        peer.add(reason);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(reason)
    }

    /// Every reason with its count, in a fixed order.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.dropped(*r)))
    }

    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Adds what one batch counted (see [`Tally`]) and clears it.
    pub fn add_tally(&self, tally: &Tally) {
        for (counter, cell) in [
            (&self.tun_packets_in, &tally.tun_packets_in),
            (&self.tun_packets_out, &tally.tun_packets_out),
            (&self.datagrams_in, &tally.datagrams_in),
            (&self.datagrams_out, &tally.datagrams_out),
        ] {
            let n = cell.take();
            if n > 0 {
                Stats::add(counter, n);
            }
        }
    }
}

/// The per-packet totals of [`Stats`] as one batch counts them, added to the device's once
/// when the batch ends ([`Stats::add_tally`]). Every worker adds to the same device counters:
/// an atomic add per packet moved their cache line between CPUs each time (1–2 % of a
/// router's samples at full rate), one per batch does not. Cells, because the engine passes
/// the tally along with shared borrows of its configuration; a batch stays on one thread.
#[derive(Debug, Default)]
pub struct Tally {
    tun_packets_in: Cell<u64>,
    tun_packets_out: Cell<u64>,
    datagrams_in: Cell<u64>,
    datagrams_out: Cell<u64>,
}

impl Tally {
    /// A packet read from the TUN went out encrypted.
    #[inline]
    pub fn tun_packet_in(&self) {
        bump(&self.tun_packets_in);
    }

    /// A decrypted packet goes to the TUN.
    #[inline]
    pub fn tun_packet_out(&self) {
        bump(&self.tun_packets_out);
    }

    /// A datagram arrived.
    #[inline]
    pub fn datagram_in(&self) {
        bump(&self.datagrams_in);
    }

    /// A datagram goes out.
    #[inline]
    pub fn datagram_out(&self) {
        bump(&self.datagrams_out);
    }
}

#[inline]
fn bump(cell: &Cell<u64>) {
    cell.set(cell.get() + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
        let s = Stats::default();
        s.drop(DropReason::Replay);
        s.drop(DropReason::Replay);
        assert_eq!(s.dropped(DropReason::Replay), 2);
        assert_eq!(s.drops().filter(|(_, n)| *n > 0).count(), 1);
    }

    #[test]
    fn a_tally_reaches_the_device_counters_once_and_is_cleared() {
        let s = Stats::default();
        let tally = Tally::default();
        tally.tun_packet_in();
        tally.tun_packet_in();
        tally.datagram_out();
        tally.datagram_in();
        tally.tun_packet_out();
        tally.tun_packet_out();
        tally.tun_packet_out();
        s.add_tally(&tally);
        s.add_tally(&tally);
        let read = |c: &AtomicU64| c.load(Relaxed);
        assert_eq!(read(&s.tun_packets_in), 2);
        assert_eq!(read(&s.datagrams_out), 1);
        assert_eq!(read(&s.datagrams_in), 1);
        assert_eq!(read(&s.tun_packets_out), 3);
    }

    #[test]
    fn a_peer_drop_counts_on_the_device_and_the_peer() {
        let s = Stats::default();
        let peer = DropCounters::default();
        s.peer_drop(&peer, DropReason::TooBig);
        s.drop(DropReason::TooBig);
        assert_eq!(s.dropped(DropReason::TooBig), 2);
        let totals = peer.totals();
        assert_eq!(totals.get(DropReason::TooBig), 1);
        assert_eq!(totals.sum(), 1);
        assert_eq!(totals.iter().count(), DropReason::ALL.len());
    }
}
