//! The sans-IO WireGuard router. It owns the peers, the allowed-IPs table and the shared
//! handshake rate limiter, and turns three kinds of input into output through a
//! [`Transmit`] sink:
//!
//! ```text
//!  outbound  TUN packet ─► destination ─► allowed IPs (LPM) ─► peer ─► MTU check ─► pad ─►
//!            Tunn::encapsulate ─► sink.send(endpoint, datagram)
//!            (no peer: ICMP unreachable; too big: ICMP fragmentation needed / packet too big,
//!             both written back to the TUN)
//!
//!  inbound   datagram ─► message type ─► peer by receiver index (initiations: MAC check,
//!            cookie under load, then peer by static key) ─► Tunn::decapsulate ─► roam endpoint
//!            ─► inner source ∈ this peer's allowed IPs? ─► sink.write_tun(packet)
//!
//!  timers    tick(now) ─► per peer Tunn::update_timers + persistent keepalive ─► sink.send
//! ```
//!
//! Concurrency: the configuration (peer set, allowed IPs, keys) sits behind one `RwLock` that
//! the packet path takes for reading once per batch ([`Engine::batch`]); each peer has its own
//! mutex held only for one `Tunn` call and the copy of its output into the sink. The sink only
//! copies; drivers make their syscalls after the batch is released, so no lock is ever held
//! across a syscall.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use parking_lot::{RwLock, RwLockReadGuard};

use crate::allowed_ips::AllowedIps;
use crate::config::{AllowedIpChange, DeviceUpdate, PeerSnapshot, PeerUpdate, SetError};
use crate::key::Key;
use crate::packet;
use crate::peer::{Endpoint, Peer, PeerState};
use crate::stats::{DropReason, Stats};

/// Bytes of scratch the engine needs per call: the largest IP packet plus WireGuard's
/// overhead, rounded up. Drivers own one such buffer per worker.
pub const SCRATCH_LEN: usize = 65536 + 64;

/// WireGuard's data-message overhead: 16-byte header + 16-byte tag.
pub const DATA_OVERHEAD: usize = 32;

/// Default tunnel MTU (1500 underlay minus IPv6 + UDP + WireGuard overhead).
pub const DEFAULT_MTU: usize = 1420;

/// Handshake initiations the shared rate limiter lets through per second before it demands
/// cookies (boringtun counts each initiation twice: our pre-check and the peer's own check).
const HANDSHAKES_PER_SECOND: u64 = 2 * 100;

/// Most peers a device holds: boringtun routes messages by a 24-bit peer index.
pub const MAX_PEERS: usize = 1 << 24;

/// Where the engine puts its output. Implementations copy into their own buffers; they must
/// not block or make syscalls (the engine may hold a peer lock while calling them).
pub trait Transmit {
    /// Send one WireGuard datagram to a peer.
    fn send(&mut self, to: &Endpoint, datagram: &[u8]);
    /// Write one IP packet to the TUN device.
    fn write_tun(&mut self, packet: &[u8]);
}

/// The WireGuard router. Share it as `Arc<Engine>` between workers, timers and the UAPI server.
pub struct Engine {
    config: RwLock<Config>,
    stats: Stats,
    /// Engine time in milliseconds since `epoch`, advanced by [`Engine::tick`]: the packet path
    /// reads it instead of the clock.
    now_ms: AtomicU64,
    epoch: Instant,
    /// When the rate limiter's count was last reset (engine ms).
    limiter_reset_ms: AtomicU64,
}

struct Config {
    private_key: Option<Key>,
    public_key: Option<Key>,
    mtu: usize,
    peers: Vec<Option<Arc<Peer>>>,
    free_slots: Vec<u32>,
    by_key: HashMap<Key, u32>,
    allowed_ips: AllowedIps<u32>,
    rate_limiter: Arc<RateLimiter>,
}

impl Config {
    fn peer(&self, slot: u32) -> Option<&Arc<Peer>> {
        self.peers.get(slot as usize).and_then(|p| p.as_ref())
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
        let peer = Arc::new(Peer::new(public_key, slot));
        peer.state.lock().reset_tunn(
            &public_key,
            slot,
            self.private_key.as_ref(),
            &self.rate_limiter,
        );
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
        if let Some(public) = self.public_key {
            // A peer with our own public key makes no sense; the kernel drops it.
            self.remove_peer(&public);
            self.rate_limiter = Arc::new(new_rate_limiter(&public));
        }
        for peer in self.peers.iter().flatten() {
            let mut state = peer.state.lock();
            // A fresh Tunn: sessions expire and a new handshake may start at once.
            state.reset_tunn(
                &peer.public_key,
                peer.slot,
                self.private_key.as_ref(),
                &self.rate_limiter,
            );
        }
    }
}

fn new_rate_limiter(public: &Key) -> RateLimiter {
    RateLimiter::new(
        &x25519_dalek::PublicKey::from(public.0),
        HANDSHAKES_PER_SECOND,
    )
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(DEFAULT_MTU)
    }
}

impl Engine {
    /// An engine with no private key and no peers.
    pub fn new(mtu: usize) -> Engine {
        Engine {
            config: RwLock::new(Config {
                private_key: None,
                public_key: None,
                mtu,
                peers: Vec::new(),
                free_slots: Vec::new(),
                by_key: HashMap::new(),
                allowed_ips: AllowedIps::new(),
                rate_limiter: Arc::new(new_rate_limiter(&Key::ZERO)),
            }),
            stats: Stats::default(),
            now_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            limiter_reset_ms: AtomicU64::new(0),
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
            send_now |= Self::apply_peer(&mut config, peer_update)?;
        }
        Ok(send_now)
    }

    fn apply_peer(config: &mut Config, update: &PeerUpdate) -> Result<bool, SetError> {
        if Some(update.public_key) == config.public_key {
            return Ok(false);
        }
        if update.remove {
            config.remove_peer(&update.public_key);
            return Ok(false);
        }
        let peer = match config.by_key.get(&update.public_key) {
            Some(&slot) => match config.peer(slot) {
                Some(peer) => peer.clone(),
                None => return Err(SetError::Invalid("peer table out of step".into())),
            },
            None if update.update_only => return Ok(false),
            None => config.add_peer(update.public_key)?,
        };
        let mut send_now = false;
        {
            let mut state = peer.state.lock();
            if let Some(psk) = update.preshared_key {
                if psk != state.preshared_key {
                    state.preshared_key = psk;
                    state.reset_tunn(
                        &peer.public_key,
                        peer.slot,
                        config.private_key.as_ref(),
                        &config.rate_limiter,
                    );
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
            config.allowed_ips.remove_value(peer.slot);
        }
        for change in &update.allowed_ips {
            match *change {
                AllowedIpChange::Add(net) => {
                    config.allowed_ips.insert(net, peer.slot);
                }
                AllowedIpChange::Remove(net) => {
                    // Only this peer's own entry goes; someone else's is put back untouched.
                    if let Some(owner) = config.allowed_ips.remove(&net) {
                        if owner != peer.slot {
                            config.allowed_ips.insert(net, owner);
                        }
                    }
                }
            }
        }
        Ok(send_now)
    }

    /// The peers as `wg show` reports them, in slot order.
    pub fn peer_snapshots(&self) -> (Option<Key>, Vec<PeerSnapshot>) {
        let config = self.config.read();
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
                    last_handshake: state.last_handshake,
                    rx_bytes: state.rx_bytes,
                    tx_bytes: state.tx_bytes,
                    persistent_keepalive: state.persistent_keepalive,
                    allowed_ips: config.allowed_ips.prefixes_of(peer.slot),
                }
            })
            .collect();
        (config.private_key, peers)
    }

    /// Takes the configuration for reading for one batch of packets. Hold it only while the
    /// engine produces output; release it before any syscall.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            engine: self,
            config: self.config.read(),
            now_ms: self.now_ms.load(Relaxed),
        }
    }

    /// Advances engine time and runs every peer's timers: handshake retries, rekeying,
    /// passive and persistent keepalives, session expiry. Call every 100–250 ms.
    pub fn tick(&self, now: Instant, scratch: &mut [u8; SCRATCH_LEN], tx: &mut impl Transmit) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.now_ms.fetch_max(now_ms, Relaxed);
        let config = self.config.read();
        let last_reset = self.limiter_reset_ms.load(Relaxed);
        if now_ms.saturating_sub(last_reset) >= 1000 {
            self.limiter_reset_ms.store(now_ms, Relaxed);
            config.rate_limiter.reset_count();
        }
        for peer in config.peers.iter().flatten() {
            let mut state = peer.state.lock();
            let state = &mut *state;
            let Some(tunn) = state.tunn.as_mut() else {
                continue;
            };
            let mut sent = false;
            if let TunnResult::WriteToNetwork(datagram) = tunn.update_timers(&mut scratch[..]) {
                if let Some(endpoint) = state.endpoint {
                    state.tx_bytes += datagram.len() as u64;
                    Stats::add(&self.stats.datagrams_out, 1);
                    tx.send(&endpoint, datagram);
                    sent = true;
                }
            }
            let interval_ms = u64::from(state.persistent_keepalive) * 1000;
            let keepalive_needed = state.keepalive_due
                || (interval_ms > 0 && now_ms.saturating_sub(state.last_sent_ms) >= interval_ms);
            if keepalive_needed && !sent {
                state.keepalive_due = false;
                if let Some(endpoint) = state.endpoint {
                    // An empty packet: a keepalive on a session, or a handshake without one.
                    if let TunnResult::WriteToNetwork(datagram) =
                        tunn.encapsulate(&[], &mut scratch[..])
                    {
                        state.tx_bytes += datagram.len() as u64;
                        Stats::add(&self.stats.datagrams_out, 1);
                        tx.send(&endpoint, datagram);
                        sent = true;
                    }
                }
            }
            if sent {
                state.last_sent_ms = now_ms;
            }
        }
    }

    /// Engine time as of the last tick.
    pub fn now(&self) -> Duration {
        Duration::from_millis(self.now_ms.load(Relaxed))
    }
}

/// One batch of packet processing under a read lock of the configuration.
pub struct Batch<'a> {
    engine: &'a Engine,
    config: RwLockReadGuard<'a, Config>,
    now_ms: u64,
}

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
        let Some(peer) = config
            .allowed_ips
            .lookup(destination)
            .and_then(|slot| config.peer(slot))
        else {
            stats.drop(DropReason::NoRoute);
            if let Some(n) = packet::icmp_unreachable(packet, destination, &mut scratch[..]) {
                Stats::add(&stats.icmp_errors_sent, 1);
                tx.write_tun(&scratch[..n]);
            }
            return;
        };
        let mtu = config.mtu;
        if len > mtu {
            stats.drop(DropReason::TooBig);
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
            stats.drop(DropReason::LowOrderKey);
            return;
        }
        let Some(tunn) = state.tunn.as_mut() else {
            stats.drop(DropReason::NoPrivateKey);
            return;
        };
        let Some(endpoint) = state.endpoint else {
            stats.drop(DropReason::NoEndpoint);
            return;
        };
        match tunn.encapsulate(&buf[..padded], &mut scratch[..]) {
            TunnResult::WriteToNetwork(datagram) => {
                Stats::add(&stats.tun_packets_in, 1);
                Stats::add(&stats.datagrams_out, 1);
                state.tx_bytes += datagram.len() as u64;
                state.last_sent_ms = self.now_ms;
                tx.send(&endpoint, datagram);
            }
            // Queued inside boringtun until the handshake completes.
            TunnResult::Done => {}
            TunnResult::Err(e) => stats.drop(drop_reason(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// A datagram received on the listen socket from `from`, addressed to our `local_ip`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
        scratch: &mut [u8; SCRATCH_LEN],
        tx: &mut impl Transmit,
    ) {
        let stats = &self.engine.stats;
        Stats::add(&stats.datagrams_in, 1);
        let config = &*self.config;
        let Some((peer, message_type)) = self.find_peer(from, local_ip, datagram, scratch, tx)
        else {
            return;
        };
        let source = Endpoint {
            addr: from,
            local_ip,
        };
        let mut state = peer.state.lock();
        let state = &mut *state;
        let Some(tunn) = state.tunn.as_mut() else {
            stats.drop(DropReason::NoPrivateKey);
            return;
        };
        let authenticated_roams = message_type != MESSAGE_COOKIE_REPLY;
        let (inner, inner_source) =
            match tunn.decapsulate(Some(from.ip()), datagram, &mut scratch[..]) {
                TunnResult::WriteToNetwork(reply)
                    if reply.first() == Some(&MESSAGE_COOKIE_REPLY) =>
                {
                    // The peer's own rate-limit check went under load between ours and its.
                    stats.drop(DropReason::UnderLoad);
                    Stats::add(&stats.cookie_replies_sent, 1);
                    Stats::add(&stats.datagrams_out, 1);
                    tx.send(&source, reply);
                    return;
                }
                TunnResult::WriteToNetwork(reply) => {
                    // A handshake message that completed: a response to send, or our keepalive
                    // that confirms the session we initiated.
                    state.rx_bytes += datagram.len() as u64;
                    state.endpoint = Some(source);
                    state.last_handshake = Some(SystemTime::now());
                    state.last_sent_ms = self.now_ms;
                    // boringtun answers a handshake response with a keepalive. Like the kernel,
                    // send it only when no queued packet goes out to confirm the session instead.
                    let mut held = [0u8; DATA_OVERHEAD];
                    let keepalive =
                        message_type == MESSAGE_RESPONSE && reply.len() == DATA_OVERHEAD;
                    if keepalive {
                        held.copy_from_slice(reply);
                    } else {
                        state.tx_bytes += reply.len() as u64;
                        Stats::add(&stats.datagrams_out, 1);
                        tx.send(&source, reply);
                    }
                    // Packets queued while the handshake ran go out now.
                    let mut flushed = false;
                    while let TunnResult::WriteToNetwork(queued) =
                        tunn.decapsulate(None, &[], &mut scratch[..])
                    {
                        flushed = true;
                        state.tx_bytes += queued.len() as u64;
                        Stats::add(&stats.datagrams_out, 1);
                        Stats::add(&stats.tun_packets_in, 1);
                        tx.send(&source, queued);
                    }
                    if keepalive && !flushed {
                        state.tx_bytes += DATA_OVERHEAD as u64;
                        Stats::add(&stats.datagrams_out, 1);
                        tx.send(&source, &held);
                    }
                    return;
                }
                TunnResult::WriteToTunnelV4(inner, v4) => (inner, IpAddr::V4(v4)),
                TunnResult::WriteToTunnelV6(inner, v6) => (inner, IpAddr::V6(v6)),
                TunnResult::Done => {
                    // A keepalive or a cookie reply: authentic, nothing to deliver.
                    state.rx_bytes += datagram.len() as u64;
                    if authenticated_roams {
                        state.endpoint = Some(source);
                    }
                    return;
                }
                TunnResult::Err(e) => {
                    stats.drop(drop_reason(&e));
                    return;
                }
            };
        Self::deliver(
            config,
            stats,
            peer.slot,
            state,
            source,
            datagram.len(),
            (inner, inner_source),
            tx,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        config: &Config,
        stats: &Stats,
        slot: u32,
        state: &mut PeerState,
        source: Endpoint,
        wire_len: usize,
        (inner, inner_source): (&[u8], IpAddr),
        tx: &mut impl Transmit,
    ) {
        // Authentic: count it and roam, even if the checks below drop it.
        state.rx_bytes += wire_len as u64;
        state.endpoint = Some(source);
        // boringtun trims to the length the header claims without checking that a whole
        // header remains: a peer could otherwise put a header-less stub on the TUN.
        if packet::ip_len(inner) != Some(inner.len()) || packet::source(inner) != Some(inner_source)
        {
            stats.drop(DropReason::MalformedPacket);
            return;
        }
        if config.allowed_ips.lookup(inner_source) != Some(slot) {
            stats.drop(DropReason::NotAllowed);
            return;
        }
        Stats::add(&stats.tun_packets_out, 1);
        tx.write_tun(inner);
    }

    /// Finds the peer a datagram belongs to. Initiations are checked for MAC1 (and a cookie
    /// under load, answering with a cookie reply) before the Diffie-Hellman that reveals the
    /// sender's static key; every other message names its receiver index.
    fn find_peer(
        &self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
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
                let init = match config.rate_limiter.verify_packet(
                    Some(from.ip()),
                    datagram,
                    &mut scratch[..],
                ) {
                    Ok(Packet::HandshakeInit(init)) => init,
                    Ok(_) => {
                        stats.drop(DropReason::MalformedDatagram);
                        return None;
                    }
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        stats.drop(DropReason::UnderLoad);
                        Stats::add(&stats.cookie_replies_sent, 1);
                        Stats::add(&stats.datagrams_out, 1);
                        tx.send(
                            &Endpoint {
                                addr: from,
                                local_ip,
                            },
                            cookie,
                        );
                        return None;
                    }
                    Err(TunnResult::Err(e)) => {
                        stats.drop(drop_reason(&e));
                        return None;
                    }
                    Err(_) => {
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
            Some((message_type, Some(receiver_index))) => (message_type, receiver_index),
            _ => {
                stats.drop(DropReason::MalformedDatagram);
                return None;
            }
        };
        match config.peer(receiver_index >> 8) {
            Some(peer) => Some((peer.clone(), message_type)),
            None => {
                stats.drop(DropReason::UnknownPeer);
                None
            }
        }
    }
}

const MESSAGE_INITIATION: u8 = 1;
const MESSAGE_RESPONSE: u8 = 2;
const MESSAGE_COOKIE_REPLY: u8 = 3;
const MESSAGE_DATA: u8 = 4;

/// The message type and, for all but initiations, the receiver index, of a datagram whose
/// length fits its type. `None` for anything that is not a WireGuard message.
fn message_header(datagram: &[u8]) -> Option<(u8, Option<u32>)> {
    let header: [u8; 4] = datagram.get(..4)?.try_into().ok()?;
    let message_type = u32::from_le_bytes(header);
    let index_at = |offset: usize| -> Option<u32> {
        let bytes: [u8; 4] = datagram.get(offset..offset + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes))
    };
    match (message_type, datagram.len()) {
        (1, 148) => Some((MESSAGE_INITIATION, None)),
        (2, 92) => Some((MESSAGE_RESPONSE, Some(index_at(8)?))),
        (3, 64) => Some((MESSAGE_COOKIE_REPLY, Some(index_at(4)?))),
        (4, n) if n >= DATA_OVERHEAD => Some((MESSAGE_DATA, Some(index_at(4)?))),
        _ => None,
    }
}

fn drop_reason(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::InvalidMac | WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => DropReason::Replay,
        WireGuardError::NoCurrentSession | WireGuardError::ConnectionExpired => {
            DropReason::NoSession
        }
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType => DropReason::MalformedDatagram,
        WireGuardError::DestinationBufferTooSmall
        | WireGuardError::UnexpectedPacket
        | WireGuardError::WrongIndex
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp
        | WireGuardError::LockFailed => DropReason::HandshakeFailed,
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
