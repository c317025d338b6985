//! The path to each Tailscale peer: **direct** (its announced underlay endpoint) or **tailnet**
//! (its tailnet address and WireGuard port, so our encrypted datagrams ride through
//! tailscaled — slower, but it crosses NATs and partitions of the underlay).
//!
//! Decided from outside the data plane, with what it already reports and does:
//! - a peer is *heard* when its received-bytes counter grows; Tailscale peers have a short
//!   persistent keepalive (see [`crate::reconcile::TAILSCALE_KEEPALIVE`]), so a live path is
//!   heard every few seconds even when idle;
//! - on the direct path, a peer not heard for [`FALLBACK_AFTER`] is moved to its tailnet
//!   address (one `update_only` endpoint change through `DeviceUpdate`);
//! - on the tailnet path, every [`PROBE_EVERY`] the endpoint is set back to direct: the data
//!   plane roams to the address of the latest authenticated packet, so if the direct path
//!   works the peer answers from it and both sides stay direct; if not, the peer's next packet
//!   still comes over the tailnet and the endpoint roams straight back (the probe costs at most
//!   what we send until then).
//!
//! The path in force is read back from the data plane's endpoint (roaming may have moved it)
//! and each change is logged once.
//!
//! MTU: tailscale0's MTU is 1280, our tunnel's 1420 plus up to 80 bytes of WireGuard overhead.
//! The router's UDP socket does not set "don't fragment", so on the tailnet path the kernel
//! fragments our outer datagrams to fit tailscale0 (IPv4 and IPv6 alike; it is the sender) and
//! the peer's kernel reassembles them: the inner MTU stays 1420 for every peer, at the cost of
//! two tailscaled packets per full-size datagram on that path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tailsk8s_dataplane::key::Key;

/// A direct path not heard from for this long is given up for the tailnet path.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);
/// How often a peer on the tailnet path is probed on its direct path.
pub const PROBE_EVERY: Duration = Duration::from_secs(20);

/// Which way our datagrams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Direct,
    Tailnet,
}

/// The two endpoints of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub direct: SocketAddr,
    pub tailnet: SocketAddr,
}

#[derive(Debug, Clone)]
struct PeerPath {
    endpoints: Endpoints,
    /// The path the data plane's endpoint shows.
    path: Path,
    rx_bytes: u64,
    heard_at: Instant,
    switched_at: Instant,
}

/// The path state of every Tailscale peer.
#[derive(Debug, Default)]
pub struct PathMonitor {
    peers: BTreeMap<Key, PeerPath>,
}

/// What the data plane reports of one peer, for [`PathMonitor::tick`].
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub rx_bytes: u64,
}

impl PathMonitor {
    /// The peers to watch (others are forgotten); a peer whose endpoints are unchanged keeps
    /// its state.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = (Key, Endpoints)>, now: Instant) {
        let mut next = BTreeMap::new();
        for (key, endpoints) in peers {
            let state = match self.peers.remove(&key) {
                Some(p) if p.endpoints == endpoints => p,
                _ => PeerPath {
                    endpoints,
                    path: Path::Direct,
                    rx_bytes: 0,
                    heard_at: now,
                    switched_at: now,
                },
            };
            next.insert(key, state);
        }
        self.peers = next;
    }

    /// The path of a peer, as last seen.
    pub fn path(&self, key: &Key) -> Option<Path> {
        self.peers.get(key).map(|p| p.path)
    }

    /// One look at the data plane: returns the endpoint changes to make (fallbacks and
    /// probes), each with the path it moves to.
    pub fn tick(&mut self, observed: &[Observed], now: Instant) -> Vec<(Key, SocketAddr, Path)> {
        let mut changes = Vec::new();
        for seen in observed {
            let Some(peer) = self.peers.get_mut(&seen.public_key) else {
                continue;
            };
            if seen.rx_bytes != peer.rx_bytes {
                peer.rx_bytes = seen.rx_bytes;
                peer.heard_at = now;
            }
            let actual = match seen.endpoint {
                Some(e) if e.ip() == peer.endpoints.tailnet.ip() => Path::Tailnet,
                _ => Path::Direct,
            };
            if actual != peer.path {
                tracing::info!(peer = %seen.public_key, endpoint = ?seen.endpoint, "path now {actual:?}");
                peer.path = actual;
            }
            let quiet = now.saturating_duration_since(peer.heard_at);
            let since_switch = now.saturating_duration_since(peer.switched_at);
            match actual {
                Path::Direct if quiet >= FALLBACK_AFTER && since_switch >= FALLBACK_AFTER => {
                    tracing::info!(
                        peer = %seen.public_key,
                        "not heard on the direct path for {quiet:?}: using its tailnet address {}",
                        peer.endpoints.tailnet
                    );
                    peer.switched_at = now;
                    changes.push((seen.public_key, peer.endpoints.tailnet, Path::Tailnet));
                }
                Path::Tailnet if since_switch >= PROBE_EVERY => {
                    tracing::debug!(peer = %seen.public_key, "probing the direct path");
                    peer.switched_at = now;
                    // Heard or not on the probe, it gets a full FALLBACK_AFTER to show.
                    peer.heard_at = now;
                    changes.push((seen.public_key, peer.endpoints.direct, Path::Direct));
                }
                _ => {}
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key([5; 32]).clamped().public_key()
    }

    fn endpoints() -> Endpoints {
        Endpoints {
            direct: "198.18.0.2:51820".parse().unwrap(),
            tailnet: "100.101.2.12:51820".parse().unwrap(),
        }
    }

    fn seen(endpoint: SocketAddr, rx: u64) -> Observed {
        Observed {
            public_key: key(),
            endpoint: Some(endpoint),
            rx_bytes: rx,
        }
    }

    #[test]
    fn a_silent_direct_path_falls_back_and_is_probed_again() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let e = endpoints();
        let mut m = PathMonitor::default();
        m.set_peers([(key(), e)], t0);
        // Heard every few seconds: stays direct.
        for (s, rx) in [(1, 100), (5, 200), (9, 300), (13, 400)] {
            assert!(m.tick(&[seen(e.direct, rx)], at(s)).is_empty());
        }
        // Silent from 13 s: at 23 s it moves to the tailnet address.
        assert!(m.tick(&[seen(e.direct, 400)], at(22)).is_empty());
        assert_eq!(
            m.tick(&[seen(e.direct, 400)], at(23)),
            vec![(key(), e.tailnet, Path::Tailnet)]
        );
        // The data plane now shows the tailnet endpoint; heard again there.
        assert!(m.tick(&[seen(e.tailnet, 500)], at(24)).is_empty());
        assert_eq!(m.path(&key()), Some(Path::Tailnet));
        // A probe of the direct path every PROBE_EVERY.
        assert!(m.tick(&[seen(e.tailnet, 600)], at(42)).is_empty());
        assert_eq!(
            m.tick(&[seen(e.tailnet, 700)], at(43)),
            vec![(key(), e.direct, Path::Direct)]
        );
        // The direct path answers (roaming keeps it): stays direct.
        assert!(m.tick(&[seen(e.direct, 800)], at(44)).is_empty());
        assert_eq!(m.path(&key()), Some(Path::Direct));
    }

    #[test]
    fn a_failed_probe_roams_back_and_unchanged_peers_keep_their_state() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let e = endpoints();
        let mut m = PathMonitor::default();
        m.set_peers([(key(), e)], t0);
        assert_eq!(m.tick(&[seen(e.direct, 0)], at(10)).len(), 1);
        assert!(m.tick(&[seen(e.tailnet, 10)], at(11)).is_empty());
        m.set_peers([(key(), e)], at(12));
        assert_eq!(
            m.path(&key()),
            Some(Path::Tailnet),
            "a resync keeps the path"
        );
        assert_eq!(
            m.tick(&[seen(e.tailnet, 20)], at(30)),
            vec![(key(), e.direct, Path::Direct)]
        );
        // The peer's next packet came over the tailnet: the data plane roamed back.
        assert!(m.tick(&[seen(e.tailnet, 30)], at(31)).is_empty());
        assert_eq!(m.path(&key()), Some(Path::Tailnet));
        // Removed peers are forgotten.
        m.set_peers([], at(32));
        assert_eq!(m.path(&key()), None);
    }
}
