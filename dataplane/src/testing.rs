//! The in-memory engine fixture shared by every user that drives engines without sockets or
//! a TUN: the engine's own tests, the benchmarks, the fuzz targets and the allocation test.
//! A [`Capture`] sink, a [`Node`] (an engine with its key, address, scratch buffer and its
//! own time), and two nodes wired back to back ([`pair`], [`pump`], [`established_pair`]).
//!
//! Compiled only for this crate's unit tests and with the `testing` feature, which the
//! benches, the fuzz targets and this crate's integration tests enable. A workspace-wide
//! build unifies the feature into the library the router links (the fuzz targets are a
//! member), which only adds this module: it changes nothing else and the router never calls
//! it. Setup failures panic: they are bugs in the fixture or the test, not findings.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use crate::config::{AllowedIpChange, DeviceUpdate, PeerSnapshot, PeerUpdate};
use crate::engine::{new_scratch, Engine, Transmit, DEFAULT_MTU, SCRATCH_LEN};
use crate::key::Key;
use crate::peer::Endpoint;
use crate::stats::DropReason;

/// Everything engine calls produced, copied out of the engine's buffers. [`Capture::clear`]
/// keeps the buffers for the next calls, so a warm capture copies without allocating.
#[derive(Debug, Default)]
pub struct Capture {
    /// Datagrams, with where they were sent.
    pub sent: Vec<(Endpoint, Vec<u8>)>,
    /// Packets written to the TUN.
    pub tun: Vec<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

impl Capture {
    /// Forgets what was captured, keeping its buffers for reuse.
    pub fn clear(&mut self) {
        let sent = self.sent.drain(..).map(|(_, buf)| buf);
        self.spare.extend(sent.chain(self.tun.drain(..)));
    }

    fn copy(spare: &mut Vec<Vec<u8>>, bytes: &[u8]) -> Vec<u8> {
        let mut buf = spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        buf
    }
}

impl Transmit for Capture {
    fn send(&mut self, to: &Endpoint, datagram: &[u8]) {
        let buf = Capture::copy(&mut self.spare, datagram);
        self.sent.push((*to, buf));
    }

    fn write_tun(&mut self, packet: &[u8]) {
        let buf = Capture::copy(&mut self.spare, packet);
        self.tun.push(buf);
    }
}

/// A wall-clock date the fixture reports engine time 0 as, so that snapshots are the same
/// from one call to the next (2026-01-01T00:00:00Z).
const WALL_START: Duration = Duration::from_secs(1_767_225_600);

/// One engine under test: its keys, the address it listens on, its scratch buffer, and the
/// instant that is its time 0 (the fixture passes time in; the engine reads no clock).
pub struct Node {
    pub engine: Engine,
    pub private: Key,
    pub public: Key,
    pub addr: SocketAddr,
    pub start: Instant,
    pub scratch: Box<[u8; SCRATCH_LEN]>,
    /// Where a datagram is copied to be handed over (the engine opens data in place).
    received: Vec<u8>,
}

impl Node {
    /// An engine with `private` as its key, listening on `addr`, time 0 at `start`.
    pub fn new(private: Key, addr: &str, start: Instant) -> Node {
        let engine = Engine::new(DEFAULT_MTU, start);
        let node = Node {
            engine,
            private,
            public: private.public_key(),
            addr: parse(addr),
            start,
            scratch: new_scratch(),
            received: Vec::new(),
        };
        node.apply(&DeviceUpdate {
            private_key: Some(Some(private)),
            ..Default::default()
        });
        node
    }

    /// Applies an update the test means to be valid.
    pub fn apply(&self, update: &DeviceUpdate) -> bool {
        match self.engine.apply(update) {
            Ok(send_now) => send_now,
            Err(e) => panic!("fixture configuration refused: {e}"),
        }
    }

    /// Adds (or updates) the peer `public` with an endpoint and allowed IPs.
    pub fn add_peer(&self, public: Key, endpoint: Option<SocketAddr>, allowed: &[IpNet]) {
        let mut peer = PeerUpdate::new(public);
        peer.endpoint = endpoint;
        peer.allowed_ips = allowed.iter().copied().map(AllowedIpChange::Add).collect();
        self.apply(&DeviceUpdate {
            peers: vec![peer],
            ..Default::default()
        });
    }

    /// Makes `other` a peer of this node, at its address, with `allowed` prefixes.
    pub fn add_node(&self, other: &Node, allowed: &[&str]) {
        let allowed: Vec<IpNet> = allowed.iter().map(|a| parse(a)).collect();
        self.add_peer(other.public, Some(other.addr), &allowed);
    }

    /// A packet read from the TUN: `buf[..len]` is the packet, the rest is room to pad in.
    pub fn tun_packet(&mut self, buf: &mut [u8], len: usize, tx: &mut impl Transmit) {
        self.engine
            .batch()
            .handle_tun_packet(buf, len, &mut self.scratch, tx);
    }

    /// A datagram from `from`, received on `local_ip` (copied, as a driver would receive
    /// it into its own buffer).
    pub fn datagram(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        tx: &mut impl Transmit,
    ) {
        self.received.clear();
        self.received.extend_from_slice(datagram);
        self.engine.batch().handle_datagram(
            from,
            local_ip,
            &mut self.received,
            &mut self.scratch,
            tx,
        );
    }

    /// `packet` read from the TUN (copied with room to pad); returns what the engine did.
    pub fn tun_in(&mut self, packet: &[u8]) -> Capture {
        let mut buf = vec![0u8; packet.len() + 64];
        buf[..packet.len()].copy_from_slice(packet);
        let mut out = Capture::default();
        self.tun_packet(&mut buf, packet.len(), &mut out);
        out
    }

    /// A packet read from the TUN into `buf[..len]`, the rest of `buf` being room to pad in;
    /// returns what the engine did.
    pub fn tun_buf_in(&mut self, buf: &mut [u8], len: usize) -> Capture {
        let mut out = Capture::default();
        self.tun_packet(buf, len, &mut out);
        out
    }

    /// `datagram` from `from`, received on this node's own address.
    pub fn net_in(&mut self, from: SocketAddr, datagram: &[u8]) -> Capture {
        self.net_in_at(from, Some(self.addr.ip()), datagram)
    }

    /// `datagram` from `from`, received on `local_ip`.
    pub fn net_in_at(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
    ) -> Capture {
        let mut out = Capture::default();
        self.datagram(from, local_ip, datagram, &mut out);
        out
    }

    /// A timer tick at `at` after this node's time 0.
    pub fn tick(&mut self, at: Duration) -> Capture {
        let mut out = Capture::default();
        self.engine
            .tick(self.start + at, &mut self.scratch, &mut out);
        out
    }

    /// The peers as `wg show` reports them, dated from a fixed wall-clock start.
    pub fn peers(&self) -> Vec<PeerSnapshot> {
        let wall = SystemTime::UNIX_EPOCH + WALL_START + self.engine.now();
        self.engine
            .peer_snapshots(wall, self.start + self.engine.now())
            .1
    }

    /// The peer with public key `key`.
    pub fn peer(&self, key: &Key) -> PeerSnapshot {
        match self.peers().into_iter().find(|p| p.public_key == *key) {
            Some(peer) => peer,
            None => panic!("no peer {key:?}"),
        }
    }

    /// Packets dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.engine.stats().dropped(reason)
    }
}

/// Parses a literal the test itself wrote; a typo there is a test bug.
pub fn parse<T: std::str::FromStr>(s: &str) -> T {
    match s.parse() {
        Ok(v) => v,
        Err(_) => panic!("fixture literal {s:?} does not parse"),
    }
}

/// Node A (198.18.0.1, pods 198.19.1.0/24 and fd00:19:1::/64) and node B (198.18.0.2,
/// pods 198.19.2.0/24 and fd00:19:2::/64), each the other's peer, no session yet, both
/// with time 0 at `start`.
pub fn pair(start: Instant) -> (Node, Node) {
    let a = Node::new(Key::generate_private(), "198.18.0.1:51820", start);
    let b = Node::new(Key::generate_private(), "198.18.0.2:51820", start);
    a.add_node(&b, &["198.19.2.0/24", "fd00:19:2::/64"]);
    b.add_node(&a, &["198.19.1.0/24", "fd00:19:1::/64"]);
    (a, b)
}

/// Delivers everything `first` sends, back and forth between a and b, in order, until both
/// are quiet (`first` came from a when `first_from_a`). Returns what reached each side's TUN.
pub fn pump(
    a: &mut Node,
    b: &mut Node,
    first: Capture,
    first_from_a: bool,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut tuns = (Vec::new(), Vec::new());
    let mut queue = std::collections::VecDeque::new();
    let mut absorb = |out: Capture, from_a: bool, queue: &mut std::collections::VecDeque<_>| {
        if from_a {
            tuns.0.extend(out.tun);
        } else {
            tuns.1.extend(out.tun);
        }
        queue.extend(out.sent.into_iter().map(|(_, d)| (from_a, d)));
    };
    absorb(first, first_from_a, &mut queue);
    let mut rounds = 0;
    while let Some((from_a, datagram)) = queue.pop_front() {
        rounds += 1;
        assert!(rounds < 1000, "ping-pong never settles");
        let out = if from_a {
            b.net_in(a.addr, &datagram)
        } else {
            a.net_in(b.addr, &datagram)
        };
        absorb(out, !from_a, &mut queue);
    }
    tuns
}

/// A [`pair`] with a session: `packet` from a's TUN started the handshake and arrived at
/// b's TUN intact.
pub fn established_pair(start: Instant, packet: &[u8]) -> (Node, Node) {
    let (mut a, mut b) = pair(start);
    let out = a.tun_in(packet);
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert_eq!(
        b_tun,
        vec![packet.to_vec()],
        "the first packet crosses the new session"
    );
    (a, b)
}
