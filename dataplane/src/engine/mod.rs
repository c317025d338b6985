//! The sans-IO WireGuard router. It owns the peers, the allowed-IPs table, the MAC and
//! cookie checks of handshake messages and the per-source handshake limit, and turns three
//! kinds of input into output through a [`Transmit`] sink. One module per flow, each
//! opening with its pipeline:
//!
//! - [`send`] — outbound: a TUN packet → allowed IPs → peer → MTU → pad → encapsulate;
//! - [`receive`] — inbound: a datagram → message type → peer → decapsulate → roam →
//!   cryptokey check → TUN;
//! - [`timers`] — time passing: retransmits, rekeying, keepalives, expiry;
//! - [`messages`] — the wire format's sizes and offsets;
//! - `cookies` — the responder's cookies under load: the secret, MAC2's check, the reply;
//! - [`source_limit`] — per-source token buckets for cookie-carrying handshakes under load;
//! - this module — the configuration (keys, peer set, allowed IPs) and how an update
//!   changes it ([`Engine::apply`]).
//!
//! Time is an input: the caller gives the engine its start ([`Engine::new`]) and every later
//! instant ([`Engine::tick`]); the packet path uses the time of the last tick. The engine
//! reads no clock but the wall clock, once, when it is made: initiations carry a TAI64N
//! timestamp (see `crate::noise::Clock`).
//!
//! Load is an input too: the driver that queues handshake messages knows how loaded it is
//! and says so per message ([`Batch::handle_handshake`]); under load, an initiation or
//! response without a valid cookie gets a cookie reply instead of a Diffie-Hellman.
//!
//! Concurrency: the configuration sits behind one `RwLock` that the packet path takes for
//! reading once per batch ([`Engine::batch`]); each peer has its own mutex held only for one
//! call into its Noise state and the copy of its output into the sink. The sink only copies; drivers make
//! their syscalls after the batch is released, so no lock is ever held across a syscall.

mod cookies;
pub mod messages;
pub mod receive;
pub mod send;
pub mod source_limit;
pub mod timers;

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tailsk8s_noise::Identity;

use crate::allowed_ips::AllowedIps;
use crate::config::{AllowedIpChange, DeviceUpdate, PeerSnapshot, PeerUpdate, SetError};
use crate::key::Key;
use crate::noise::{Clock, DeviceKeys};
use crate::peer::{Endpoint, Peer, Traffic};
use crate::stats::{DropReason, Stats, Tally};
use cookies::Cookies;
use source_limit::SourceLimit;

pub use messages::{DATA_OVERHEAD, MAX_PEERS};

/// Bytes of scratch the engine needs per call: the largest IP packet plus WireGuard's
/// overhead, rounded up. Drivers own one such buffer per worker.
pub const SCRATCH_LEN: usize = 65536 + 64;

/// Default tunnel MTU, as `wg-quick` picks it: a 1500-byte underlay minus IPv6 + UDP +
/// WireGuard data overhead (40 + 8 + 32). The one home of this value: the config file's
/// default and the `wg`-only router's MTU refer to it.
pub const DEFAULT_MTU: usize = 1420;
const _: () = assert!(
    DEFAULT_MTU <= u16::MAX as usize,
    "an MTU fits the TUN's u16"
);

/// Where the engine puts its output. Implementations copy into their own buffers (or lend
/// room in them, [`Transmit::send_built`]); they must not block or make syscalls (the engine
/// may hold a peer lock while calling them).
pub trait Transmit {
    /// Send one WireGuard datagram to a peer.
    fn send(&mut self, to: &Endpoint, datagram: &[u8]);
    /// Send one datagram of the session with the peer whose public key is `peer` (every
    /// datagram but cookie replies). A driver whose send can still fail keeps the key, so the
    /// drop is counted against that peer ([`Engine::count_send_drop`]); by default it is
    /// forgotten.
    fn send_for_peer(&mut self, peer: &Key, to: &Endpoint, datagram: &[u8]) {
        let _ = peer;
        self.send(to, datagram);
    }
    /// Write one IP packet to the TUN device.
    fn write_tun(&mut self, packet: &[u8]);

    /// Builds one datagram of the session with `peer` where it will be sent from, and sends
    /// it as [`Transmit::send_for_peer`] would: `build` writes it into room of at least `len`
    /// bytes and returns its length (`None`: nothing to send) with a result for the caller.
    /// A sink with a datagram buffer of its own lends room in it, sparing a copy of every
    /// sealed packet (the outbox: 1.5 % of a sending router's CPU); by default the datagram
    /// is built in `scratch` and passed to `send_for_peer`.
    fn send_built<R>(
        &mut self,
        peer: &Key,
        to: &Endpoint,
        len: usize,
        scratch: &mut [u8],
        build: impl FnOnce(&mut [u8]) -> (Option<usize>, R),
    ) -> R {
        let _ = len;
        let (built, result) = build(scratch);
        if let Some(n) = built {
            self.send_for_peer(peer, to, &scratch[..n]);
        }
        result
    }
}

/// The WireGuard router. Share it as `Arc<Engine>` between workers, timers and the UAPI server.
pub struct Engine {
    config: RwLock<Config>,
    stats: Stats,
    /// Engine time in milliseconds since `epoch`, advanced by [`Engine::tick`]: the packet path
    /// reads it instead of a clock.
    now_ms: AtomicU64,
    /// The instant the caller created the engine at: engine time 0.
    epoch: Instant,
    /// Handshakes with a valid cookie under load, per source. Only the handshake path
    /// takes it, for one lookup.
    source_limit: Mutex<SourceLimit>,
    /// The secret our cookies come from. Only the handshake path under load takes it.
    cookies: Mutex<Cookies>,
    /// Engine time for the peers' Noise states.
    clock: Clock,
}

struct Config {
    private_key: Option<Key>,
    public_key: Option<Key>,
    mtu: usize,
    peers: Vec<Option<Arc<Peer>>>,
    free_slots: Vec<u32>,
    by_key: HashMap<Key, u32>,
    allowed_ips: AllowedIps<u32>,
    /// The private key and what derives from it (MAC1 and cookie keys), with it.
    identity: Option<Arc<Identity>>,
}

impl Engine {
    /// An engine with no private key and no peers; `now` is its time 0 (later instants come
    /// through [`Engine::tick`]). Reads the wall clock once (initiations' timestamps).
    pub fn new(mtu: usize, now: Instant) -> Engine {
        Engine {
            config: RwLock::new(Config {
                private_key: None,
                public_key: None,
                mtu,
                peers: Vec::new(),
                free_slots: Vec::new(),
                by_key: HashMap::new(),
                allowed_ips: AllowedIps::new(),
                identity: None,
            }),
            stats: Stats::default(),
            now_ms: AtomicU64::new(0),
            epoch: now,
            source_limit: Mutex::new(SourceLimit::new()),
            cookies: Mutex::new(Cookies::default()),
            clock: Clock::new(now, SystemTime::now()),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn mtu(&self) -> usize {
        self.config.read().mtu
    }

    pub fn set_mtu(&self, mtu: usize) {
        self.config.write().mtu = mtu;
    }

    pub fn public_key(&self) -> Option<Key> {
        self.config.read().public_key
    }

    pub fn peer_count(&self) -> usize {
        self.config.read().peer_count()
    }

    /// Engine time as of the last tick.
    pub fn now(&self) -> Duration {
        Duration::from_millis(self.now_ms.load(Relaxed))
    }

    /// Applies the key and peer parts of an update (the listen port and fwmark belong to the
    /// socket driver, which handles them before calling this). Returns true when some peer
    /// wants a packet sent right away (a keepalive just switched on): call [`Engine::tick`].
    pub fn apply(&self, update: &DeviceUpdate) -> Result<bool, SetError> {
        let mut config = self.config.write();
        if let Some(key) = update.private_key {
            config.set_private_key(key);
        }
        if update.replace_peers {
            let keys: Vec<Key> = config.by_key.keys().copied().collect();
            for key in keys {
                config.remove_peer(&key);
            }
        }
        let mut send_now = false;
        for peer_update in &update.peers {
            send_now |= config.apply_peer(peer_update)?;
        }
        Ok(send_now)
    }

    /// The peers as `wg show` reports them, in slot order. `wall` and `now` are the caller's
    /// wall clock and monotonic clock, read together: the engine keeps a handshake's time as
    /// engine time and reports it as `wall` minus the handshake's age at `now` (so a wall
    /// clock stepped since then does not matter). The age is taken at `now`, not at the last
    /// tick: otherwise two reads within one tick would date the same handshake differently.
    pub fn peer_snapshots(
        &self,
        wall: SystemTime,
        now: Instant,
    ) -> (Option<Key>, Vec<PeerSnapshot>) {
        let config = self.config.read();
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let peers = config
            .peers
            .iter()
            .flatten()
            .map(|peer| {
                let state = peer.state.lock();
                PeerSnapshot {
                    public_key: peer.public_key,
                    preshared_key: state.preshared_key,
                    endpoint: state.endpoint.map(|e| e.addr),
                    last_handshake: state.last_handshake_ms.map(|at| {
                        let age = Duration::from_millis(now_ms.saturating_sub(at));
                        wall.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH)
                    }),
                    rx_bytes: state.traffic.rx_bytes,
                    tx_bytes: state.traffic.tx_bytes,
                    rx_packets: state.traffic.rx_packets,
                    tx_packets: state.traffic.tx_packets,
                    handshake_initiations: state.traffic.handshake_initiations,
                    drops: peer.drops.totals(),
                    persistent_keepalive: state.persistent_keepalive,
                    allowed_ips: config.allowed_ips.prefixes_of(peer.slot),
                }
            })
            .collect();
        (config.private_key, peers)
    }

    /// Counts a drop that happened after the engine let go of a datagram (a driver's send
    /// failed): device-wide, and against the peer whose key the datagram was sent for, if it
    /// is still a peer. Takes the configuration for reading: call it with no lock held, never
    /// per packet in steady state (drops are the exception).
    pub fn count_send_drop(&self, peer: Option<&Key>, reason: DropReason) {
        let config = self.config.read();
        match peer
            .and_then(|key| config.by_key.get(key))
            .and_then(|&slot| config.peer(slot))
        {
            Some(peer) => self.stats.peer_drop(&peer.drops, reason),
            None => self.stats.drop(reason),
        }
    }

    /// Takes the configuration for reading for one batch of packets. Hold it only while the
    /// engine produces output; release it before any syscall.
    pub fn batch(&self) -> Batch<'_> {
        let now_ms = self.now_ms.load(Relaxed);
        Batch {
            engine: self,
            config: self.config.read(),
            now_ms,
            tally: Tally::default(),
            last_route: Cell::new(None),
        }
    }
}

/// One batch of packet processing under a read lock of the configuration. Its two entry
/// points live with their flows: [`Batch::handle_tun_packet`] in [`send`],
/// [`Batch::handle_datagram`] in [`receive`].
pub struct Batch<'a> {
    engine: &'a Engine,
    config: RwLockReadGuard<'a, Config>,
    /// Engine time of this batch: the last tick's.
    now_ms: u64,
    /// The batch's packet and datagram counts, added to the device's when it ends.
    tally: Tally,
    /// The last allowed-IPs lookup: an address and its peer's slot.
    last_route: Cell<Option<(IpAddr, Option<u32>)>>,
}

impl Batch<'_> {
    /// The MTU this batch works to.
    pub fn mtu(&self) -> usize {
        self.config.mtu
    }

    /// The slot of the peer whose allowed IPs hold `addr`, remembered for the next packet:
    /// a superpacket's segments share their destination and a GRO run's datagrams their
    /// inner source, so most of a batch's lookups are the one before (the batch holds the
    /// configuration's read lock, so the answer cannot go stale).
    fn route(&self, addr: IpAddr) -> Option<u32> {
        if let Some((last, slot)) = self.last_route.get() {
            if last == addr {
                return slot;
            }
        }
        let slot = self.config.allowed_ips.lookup(addr);
        self.last_route.set(Some((addr, slot)));
        slot
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.engine.stats.add_tally(&self.tally);
    }
}

impl Config {
    fn peer(&self, slot: u32) -> Option<&Arc<Peer>> {
        self.peers.get(slot as usize).and_then(|p| p.as_ref())
    }

    /// What the device lends to its peers' Noise states; `None` without a private key.
    #[inline]
    fn device_keys<'a>(&'a self, clock: &'a Clock) -> Option<DeviceKeys<'a>> {
        self.identity
            .as_deref()
            .map(|identity| DeviceKeys { identity, clock })
    }

    fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    fn add_peer(&mut self, public_key: Key) -> Result<Arc<Peer>, SetError> {
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None if self.peers.len() < MAX_PEERS => {
                self.peers.push(None);
                (self.peers.len() - 1) as u32
            }
            None => {
                return Err(SetError::Invalid(format!(
                    "a device holds at most {MAX_PEERS} peers"
                )))
            }
        };
        // Its Noise state waits for its first use (see `crate::noise`).
        let peer = Arc::new(Peer::new(public_key, slot));
        self.peers[slot as usize] = Some(peer.clone());
        self.by_key.insert(public_key, slot);
        Ok(peer)
    }

    fn remove_peer(&mut self, public_key: &Key) -> bool {
        let Some(slot) = self.by_key.remove(public_key) else {
            return false;
        };
        self.allowed_ips.remove_value(slot);
        self.peers[slot as usize] = None;
        self.free_slots.push(slot);
        true
    }

    fn set_private_key(&mut self, key: Option<Key>) {
        let key = key.map(Key::clamped);
        if key == self.private_key {
            // `wg setconf` sends the key every time: an unchanged key keeps every session.
            return;
        }
        self.private_key = key;
        self.public_key = key.map(|k| k.public_key());
        self.identity = key.map(|k| Arc::new(Identity::new(x25519_dalek::StaticSecret::from(k.0))));
        if let Some(public) = self.public_key {
            // A peer with our own public key makes no sense; the kernel drops it.
            self.remove_peer(&public);
        }
        for peer in self.peers.iter().flatten() {
            // Sessions end; the next use builds a fresh state, and a handshake may start at once.
            peer.state.lock().noise.reset();
        }
    }

    /// One peer's part of an update. Returns true when the peer wants a keepalive now.
    fn apply_peer(&mut self, update: &PeerUpdate) -> Result<bool, SetError> {
        if Some(update.public_key) == self.public_key {
            return Ok(false);
        }
        if update.remove {
            self.remove_peer(&update.public_key);
            return Ok(false);
        }
        let peer = match self.by_key.get(&update.public_key) {
            Some(&slot) => match self.peer(slot) {
                Some(peer) => peer.clone(),
                None => return Err(SetError::Invalid("peer table out of step".into())),
            },
            None if update.update_only => return Ok(false),
            None => self.add_peer(update.public_key)?,
        };
        let mut send_now = false;
        {
            let mut state = peer.state.lock();
            if let Some(psk) = update.preshared_key {
                if psk != state.preshared_key {
                    state.preshared_key = psk;
                    state.noise.reset();
                }
            }
            if let Some(addr) = update.endpoint {
                state.endpoint = Some(Endpoint::new(addr));
            }
            if let Some(interval) = update.persistent_keepalive {
                if state.persistent_keepalive == 0 && interval > 0 {
                    state.keepalive_due = true;
                    send_now = true;
                }
                state.persistent_keepalive = interval;
            }
        }
        if update.replace_allowed_ips {
            self.allowed_ips.remove_value(peer.slot);
        }
        for change in &update.allowed_ips {
            match *change {
                AllowedIpChange::Add(net) => {
                    self.allowed_ips.insert(net, peer.slot);
                }
                AllowedIpChange::Remove(net) => {
                    // Only this peer's own entry goes; someone else's is put back untouched.
                    if let Some(owner) = self.allowed_ips.remove(&net) {
                        if owner != peer.slot {
                            self.allowed_ips.insert(net, owner);
                        }
                    }
                }
            }
        }
        Ok(send_now)
    }
}

/// Counts one datagram out — on the device, and on the peer's `wg show` counter when it
/// belongs to a peer's session (cookie replies do not) — and hands it to the sink, naming
/// the peer (its public key) so that a failed send can be counted against it. Every
/// datagram the engine sends goes through here.
fn send_counted(
    tally: &Tally,
    peer: Option<(&Key, &mut Traffic)>,
    tx: &mut impl Transmit,
    to: &Endpoint,
    datagram: &[u8],
) {
    match peer {
        Some((key, traffic)) => {
            count_sent(tally, traffic, datagram);
            tx.send_for_peer(key, to, datagram);
        }
        None => {
            tally.datagram_out();
            tx.send(to, datagram);
        }
    }
}

/// Counts one datagram sent for a peer, device-wide and in the peer's traffic.
fn count_sent(tally: &Tally, traffic: &mut Traffic, datagram: &[u8]) {
    tally.datagram_out();
    traffic.tx_bytes += datagram.len() as u64;
    traffic.tx_packets += 1;
    if datagram.first() == Some(&messages::MESSAGE_INITIATION) {
        traffic.handshake_initiations += 1;
    }
}

/// A helper for drivers and tests: the engine's scratch buffer, boxed (it is 64 KiB).
pub fn new_scratch() -> Box<[u8; SCRATCH_LEN]> {
    vec![0u8; SCRATCH_LEN]
        .into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| unreachable!("length is SCRATCH_LEN"))
}

#[cfg(test)]
mod tests;
