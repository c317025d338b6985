//! The reconciler: from the desired peer set (static `[[peer]]`s plus Tailscale cluster nodes
//! with their accepted announcements) to per-peer changes of the data plane, and the kernel
//! routes that follow.
//!
//! Per peer, never wholesale: a peer whose key, endpoint, keepalive, preshared key and allowed
//! IPs are unchanged gets no block at all, so its session, counters and roamed endpoint
//! survive every resync; a changed pod-CIDR set or endpoint is updated in place
//! (`update_only`, allowed IPs added and removed one by one, never `replace_allowed_ips`); a
//! peer no longer desired is removed. Removals go first in the update, additions after, so a
//! prefix moving from one peer to another is never removed from its new owner.
//!
//! Conflicts between static and Tailscale peers are resolved by ONE rule: **the config file
//! wins**. A Tailscale peer whose announced key is a static peer's key is ignored; a Tailscale
//! peer's pod CIDR that overlaps a static peer's allowed IPs, or this node's own pod CIDRs, is
//! withheld from it. Between Tailscale peers (which Tailscale's single-primary rule should
//! prevent), the node with the smaller stable ID keeps a disputed key or pod CIDR. Each
//! conflict is logged once when it appears and once when it is gone. A Tailscale node left
//! with no pod CIDR (none approved, or all withheld) is not a peer.
//!
//! [`Applier`] is the thin IO shell: it holds the two inputs of the desired set — the config
//! file's [`StaticPeers`] (replaced by a reload) and the last Tailscale peers (replaced by
//! each sync of the peer source) — and rebuilds the set whenever either changes, under its
//! one lock, so a reload and a sync never undo each other. It sends the diff through the one
//! door into the data plane ([`DeviceControl::set`]), remembers what was applied only when
//! that succeeded, and then brings the kernel routes to the new set (the [`RouteManager`]
//! adds and removes only the routes that changed).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use ipnet::IpNet;
use std::sync::Arc;

use tailsk8s_dataplane::config::{AllowedIpChange, DeviceControl, DeviceUpdate, PeerUpdate};
use tailsk8s_dataplane::key::Key;

use crate::announcement::Accepted;
use crate::config::PeerConfig;
use crate::routes::RouteManager;

/// Keepalive for Tailscale peers: keeps NAT mappings open, and makes a live path heard every
/// few seconds even when idle, which the path choice ([`crate::path`]) needs to tell a dead
/// direct path within its 10 s. The cost is one 32-byte message per peer per 5 s each way.
pub const TAILSCALE_KEEPALIVE: u16 = 5;

/// Where a desired peer comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// A `[[peer]]` of the config file (its line).
    Static { line: usize },
    /// A tailnet cluster node.
    Tailscale {
        stable_id: String,
        host_name: String,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Static { line } => write!(f, "static peer at line {line}"),
            Origin::Tailscale {
                stable_id,
                host_name,
            } => write!(f, "tailnet node {host_name} ({stable_id})"),
        }
    }
}

/// One peer as the data plane should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    /// Seconds, 0 = off.
    pub persistent_keepalive: u16,
    pub preshared_key: Option<Key>,
    pub origin: Origin,
}

impl DesiredPeer {
    /// Whether the data plane needs a change to go from `self` to `other` (origin aside).
    fn same_in_data_plane(&self, other: &DesiredPeer) -> bool {
        self.public_key == other.public_key
            && self.endpoint == other.endpoint
            && self.allowed_ips == other.allowed_ips
            && self.persistent_keepalive == other.persistent_keepalive
            && self.preshared_key == other.preshared_key
    }
}

/// A Tailscale cluster node whose announcement was fetched and accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailscalePeer {
    pub stable_id: String,
    pub host_name: String,
    pub accepted: Accepted,
}

/// A conflict between sources, as logged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Conflict {
    /// The Tailscale node announced a key that a static peer (or a node with a smaller stable
    /// ID) already has: it is ignored.
    SameKey {
        key: Key,
        kept: Origin,
        ignored: String,
    },
    /// A pod CIDR of the Tailscale node overlaps a prefix already claimed: withheld from it.
    PodCidr {
        prefix: IpNet,
        claimed_by: String,
        withheld_from: String,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::SameKey { key, kept, ignored } => write!(
                f,
                "tailnet node {ignored} announces public key {key}, already the key of the \
                 {kept}: the node is ignored (the config file wins, then the smaller stable ID)"
            ),
            Conflict::PodCidr {
                prefix,
                claimed_by,
                withheld_from,
            } => write!(
                f,
                "pod CIDR {prefix} of tailnet node {withheld_from} overlaps {claimed_by}: \
                 withheld from the node (the config file wins, then the smaller stable ID)"
            ),
        }
    }
}

/// The desired peer set and the conflicts met building it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub peers: BTreeMap<Key, DesiredPeer>,
    pub conflicts: BTreeSet<Conflict>,
}

impl Desired {
    /// Every allowed IP of every peer: the kernel routes to the TUN.
    pub fn routes(&self) -> Vec<IpNet> {
        self.peers
            .values()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect()
    }
}

/// Builds the desired peer set. `preshared` maps static peers' keys to their preshared keys;
/// `own_pod_cidrs` are this node's (never routed to a peer).
pub fn desired_peers(
    statics: &[PeerConfig],
    preshared: &BTreeMap<Key, Key>,
    tailscale: &[TailscalePeer],
    own_pod_cidrs: &[IpNet],
) -> Desired {
    let mut desired = Desired::default();
    // Prefixes claimed so far and by whom (for overlap checks and messages).
    let mut claimed: Vec<(IpNet, String)> = own_pod_cidrs
        .iter()
        .map(|p| (*p, "this node's own pod CIDRs".to_string()))
        .collect();
    for peer in statics {
        let origin = Origin::Static { line: peer.line };
        claimed.extend(peer.allowed_ips.iter().map(|p| (*p, origin.to_string())));
        desired.peers.insert(
            peer.public_key,
            DesiredPeer {
                public_key: peer.public_key,
                endpoint: peer.endpoint,
                allowed_ips: peer.allowed_ips.iter().copied().collect(),
                persistent_keepalive: peer.persistent_keepalive.unwrap_or(0),
                preshared_key: preshared.get(&peer.public_key).copied(),
                origin,
            },
        );
    }
    let mut nodes: Vec<&TailscalePeer> = tailscale.iter().collect();
    nodes.sort_by(|a, b| a.stable_id.cmp(&b.stable_id));
    for node in nodes {
        let name = format!("{} ({})", node.host_name, node.stable_id);
        let key = node.accepted.public_key;
        if let Some(holder) = desired.peers.get(&key) {
            desired.conflicts.insert(Conflict::SameKey {
                key,
                kept: holder.origin.clone(),
                ignored: name,
            });
            continue;
        }
        let mut allowed_ips = BTreeSet::new();
        for prefix in &node.accepted.pod_cidrs {
            let overlap = claimed
                .iter()
                .find(|(p, _)| p.contains(prefix) || prefix.contains(p));
            match overlap {
                Some((_, by)) => {
                    desired.conflicts.insert(Conflict::PodCidr {
                        prefix: *prefix,
                        claimed_by: by.clone(),
                        withheld_from: name.clone(),
                    });
                }
                None => {
                    allowed_ips.insert(*prefix);
                }
            }
        }
        if allowed_ips.is_empty() {
            // Nothing approved (any more) or all withheld: it may carry no pod traffic, so it
            // is not a peer; a withdrawn approval removes the peer with its routes.
            continue;
        }
        let origin = Origin::Tailscale {
            stable_id: node.stable_id.clone(),
            host_name: node.host_name.clone(),
        };
        claimed.extend(allowed_ips.iter().map(|p| (*p, origin.to_string())));
        desired.peers.insert(
            key,
            DesiredPeer {
                public_key: key,
                endpoint: node.accepted.endpoints.first().copied(),
                allowed_ips,
                persistent_keepalive: TAILSCALE_KEEPALIVE,
                preshared_key: None,
                origin,
            },
        );
    }
    desired
}

/// What the config file contributes to the desired peer set: its static `[[peer]]`s, their
/// preshared keys (by public key), and this node's own pod CIDRs (never routed to a peer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticPeers {
    pub peers: Vec<PeerConfig>,
    pub preshared: BTreeMap<Key, Key>,
    pub own_pod_cidrs: Vec<IpNet>,
}

impl StaticPeers {
    /// The desired set: these static peers plus `tailscale`, under the one conflict rule.
    pub fn desired(&self, tailscale: &[TailscalePeer]) -> Desired {
        desired_peers(&self.peers, &self.preshared, tailscale, &self.own_pod_cidrs)
    }
}

/// The per-peer changes that turn `current` into `desired`: removals first, then additions
/// and in-place changes. Empty when nothing changed.
pub fn diff(
    current: &BTreeMap<Key, DesiredPeer>,
    desired: &BTreeMap<Key, DesiredPeer>,
) -> Vec<PeerUpdate> {
    let mut removals = Vec::new();
    let mut additions = Vec::new();
    for (key, old) in current {
        match desired.get(key) {
            None => removals.push(PeerUpdate {
                remove: true,
                ..PeerUpdate::new(*key)
            }),
            Some(new) => {
                let gone: Vec<AllowedIpChange> = old
                    .allowed_ips
                    .difference(&new.allowed_ips)
                    .copied()
                    .map(AllowedIpChange::Remove)
                    .collect();
                if !gone.is_empty() {
                    removals.push(PeerUpdate {
                        update_only: true,
                        allowed_ips: gone,
                        ..PeerUpdate::new(*key)
                    });
                }
            }
        }
    }
    for (key, new) in desired {
        match current.get(key) {
            None => additions.push(PeerUpdate {
                preshared_key: new.preshared_key.map(Some),
                endpoint: new.endpoint,
                persistent_keepalive: Some(new.persistent_keepalive),
                allowed_ips: new
                    .allowed_ips
                    .iter()
                    .copied()
                    .map(AllowedIpChange::Add)
                    .collect(),
                ..PeerUpdate::new(*key)
            }),
            Some(old) if old.same_in_data_plane(new) => {}
            Some(old) => {
                let update = PeerUpdate {
                    update_only: true,
                    // An endpoint can be changed, not unset (as in UAPI): a peer that no
                    // longer announces one keeps the last, or its roamed one.
                    endpoint: new.endpoint.filter(|_| new.endpoint != old.endpoint),
                    persistent_keepalive: (new.persistent_keepalive != old.persistent_keepalive)
                        .then_some(new.persistent_keepalive),
                    preshared_key: (new.preshared_key != old.preshared_key)
                        .then_some(new.preshared_key),
                    allowed_ips: new
                        .allowed_ips
                        .difference(&old.allowed_ips)
                        .copied()
                        .map(AllowedIpChange::Add)
                        .collect(),
                    ..PeerUpdate::new(*key)
                };
                if update
                    != (PeerUpdate {
                        update_only: true,
                        ..PeerUpdate::new(*key)
                    })
                {
                    additions.push(update);
                }
            }
        }
    }
    removals.extend(additions);
    removals
}

/// Logs conflicts once: when they appear and when they are gone.
#[derive(Debug, Default)]
pub struct ConflictLog {
    known: BTreeSet<Conflict>,
}

impl ConflictLog {
    /// Logs the difference between the known conflicts and `now`; returns how many are new.
    pub fn update(&mut self, now: &BTreeSet<Conflict>) -> usize {
        let mut new = 0;
        for c in now.difference(&self.known) {
            tracing::warn!("peer conflict: {c}");
            new += 1;
        }
        for c in self.known.difference(now) {
            tracing::info!("peer conflict resolved: {c}");
        }
        self.known = now.clone();
        new
    }
}

/// Applies desired peer sets to the data plane and the kernel, per peer.
pub struct Applier {
    device: Arc<dyn DeviceControl>,
    routes: Option<RouteManager>,
    /// The config file's part of the desired set.
    statics: StaticPeers,
    /// The peer source's part, as of its last sync (none without a source).
    tailscale: Vec<TailscalePeer>,
    applied: BTreeMap<Key, DesiredPeer>,
    conflicts: ConflictLog,
    /// The routes lag the applied peers (a route command failed): retried on every apply.
    routes_stale: bool,
}

/// What one change of the [`Applier`]'s inputs changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Peer blocks sent to the data plane (0: it was not called).
    pub peer_blocks: usize,
    /// Peers now configured.
    pub peers: usize,
}

impl Applier {
    /// Makes the device exactly the static peers with one update that also sets the device's
    /// own settings (`base`: private key, port, fwmark), replacing whatever peers it had, and
    /// routes the allowed IPs. `routes` is `None` when the kernel is not to be touched.
    pub fn start(
        device: Arc<dyn DeviceControl>,
        mut routes: Option<RouteManager>,
        base: DeviceUpdate,
        statics: StaticPeers,
    ) -> anyhow::Result<Applier> {
        let desired = statics.desired(&[]);
        let empty = BTreeMap::new();
        let update = DeviceUpdate {
            replace_peers: true,
            peers: diff(&empty, &desired.peers),
            ..base
        };
        device.set(update)?;
        if let Some(manager) = &mut routes {
            manager.sync(&desired.routes())?;
        }
        let mut conflicts = ConflictLog::default();
        conflicts.update(&desired.conflicts);
        Ok(Applier {
            device,
            routes,
            statics,
            tailscale: Vec::new(),
            applied: desired.peers,
            conflicts,
            routes_stale: false,
        })
    }

    /// A reload: the config file's new static peers, with the last Tailscale peers as they
    /// are. Unchanged peers (static or Tailscale) get no update. When the data plane refuses
    /// the change, the previous static peers stay in force (and are what later syncs use).
    pub fn set_statics(&mut self, statics: StaticPeers) -> anyhow::Result<Applied> {
        let previous = std::mem::replace(&mut self.statics, statics);
        let desired = self.statics.desired(&self.tailscale);
        let wanted = desired.peers.clone();
        let result = self.apply(desired);
        if result.is_err() && self.applied != wanted {
            self.statics = previous;
        }
        result
    }

    /// A sync of the peer source: its new Tailscale peers, with the static peers as they are.
    /// Kept even when applying fails, so the next change (or retry) starts from them.
    pub fn set_tailscale(&mut self, peers: Vec<TailscalePeer>) -> anyhow::Result<Applied> {
        self.tailscale = peers;
        let desired = self.statics.desired(&self.tailscale);
        self.apply(desired)
    }

    /// Brings the data plane and the routes from the last applied set to `desired`, touching
    /// only the peers that differ. On failure nothing is recorded as applied: the next call
    /// retries the same diff.
    fn apply(&mut self, desired: Desired) -> anyhow::Result<Applied> {
        self.conflicts.update(&desired.conflicts);
        let updates = diff(&self.applied, &desired.peers);
        let peer_blocks = updates.len();
        if !updates.is_empty() {
            self.device.set(DeviceUpdate {
                peers: updates,
                ..DeviceUpdate::default()
            })?;
            self.routes_stale = true;
        }
        // Also without a data plane change: a peer's origin may have moved (a static peer
        // taking over a tailnet node's key with the same settings).
        self.applied = desired.peers;
        if self.routes_stale {
            let wanted = self.applied_routes();
            if let Some(manager) = &mut self.routes {
                manager.sync(&wanted)?;
            }
            self.routes_stale = false;
        }
        Ok(Applied {
            peer_blocks,
            peers: self.applied.len(),
        })
    }

    fn applied_routes(&self) -> Vec<IpNet> {
        self.applied
            .values()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect()
    }

    /// The peers last applied.
    pub fn applied(&self) -> &BTreeMap<Key, DesiredPeer> {
        &self.applied
    }

    /// The data plane's door, for readers of its state (the path choice).
    pub fn device(&self) -> Arc<dyn DeviceControl> {
        self.device.clone()
    }

    /// The route manager, if any (the router cleans it up on exit).
    pub fn routes_mut(&mut self) -> Option<&mut RouteManager> {
        self.routes.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn key(n: u8) -> Key {
        Key([n; 32]).clamped().public_key()
    }

    fn ts(id: &str, k: Key, pods: &[&str], ep: &str) -> TailscalePeer {
        TailscalePeer {
            stable_id: id.into(),
            host_name: format!("host-{id}"),
            accepted: Accepted {
                public_key: k,
                endpoints: vec![ep.parse().unwrap()],
                pod_cidrs: pods.iter().map(|p| net(p)).collect(),
            },
        }
    }

    fn static_peer(k: Key, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: k,
            endpoint: Some("198.18.0.9:51820".parse().unwrap()),
            allowed_ips: ips.iter().map(|p| net(p)).collect(),
            persistent_keepalive: None,
            preshared_key_file: None,
            line: 7,
        }
    }

    /// `n` distinct nodes, node `i` with 198.19.(i/16).(i%16*16)/28 and fd00:19:i::/64.
    fn cluster(n: usize) -> Vec<TailscalePeer> {
        (0..n)
            .map(|i| {
                let mut private = [7u8; 32];
                private[1..9].copy_from_slice(&(i as u64).to_le_bytes());
                let k = Key(private).clamped().public_key();
                ts(
                    &format!("n{i:04}"),
                    k,
                    &[
                        &format!("198.19.{}.{}/28", i / 16, i % 16 * 16),
                        &format!("fd00:19:{i:x}::/64"),
                    ],
                    &format!("198.18.{}.{}:51820", i / 250, i % 250),
                )
            })
            .collect()
    }

    fn build(tailscale: &[TailscalePeer]) -> Desired {
        desired_peers(&[], &BTreeMap::new(), tailscale, &[net("198.19.250.0/24")])
    }

    #[test]
    fn an_unchanged_peer_set_needs_no_change() {
        let nodes = cluster(3);
        let a = build(&nodes);
        assert_eq!(a.peers.len(), 3);
        assert!(diff(&a.peers, &build(&nodes).peers).is_empty());
    }

    #[test]
    fn a_new_peer_is_added_whole_and_others_are_untouched() {
        let nodes = cluster(3);
        let before = build(&nodes[..2]);
        let after = build(&nodes);
        let updates = diff(&before.peers, &after.peers);
        assert_eq!(updates.len(), 1);
        let u = &updates[0];
        assert_eq!(u.public_key, nodes[2].accepted.public_key);
        assert!(!u.update_only && !u.remove && !u.replace_allowed_ips);
        assert_eq!(u.endpoint, Some(nodes[2].accepted.endpoints[0]));
        assert_eq!(u.persistent_keepalive, Some(TAILSCALE_KEEPALIVE));
        assert_eq!(u.allowed_ips.len(), 2);
    }

    #[test]
    fn a_peer_that_leaves_is_removed() {
        let nodes = cluster(3);
        let updates = diff(&build(&nodes).peers, &build(&nodes[1..]).peers);
        assert_eq!(
            updates,
            vec![PeerUpdate {
                remove: true,
                ..PeerUpdate::new(nodes[0].accepted.public_key)
            }]
        );
    }

    #[test]
    fn a_withdrawn_pod_cidr_is_removed_in_place() {
        let mut nodes = cluster(2);
        let before = build(&nodes);
        let withdrawn = nodes[1].accepted.pod_cidrs.remove(0);
        let updates = diff(&before.peers, &build(&nodes).peers);
        assert_eq!(
            updates,
            vec![PeerUpdate {
                update_only: true,
                allowed_ips: vec![AllowedIpChange::Remove(withdrawn)],
                ..PeerUpdate::new(nodes[1].accepted.public_key)
            }]
        );
        // All approval gone: the peer is removed (with its allowed IPs).
        nodes[1].accepted.pod_cidrs.clear();
        let updates = diff(&before.peers, &build(&nodes).peers);
        assert_eq!(
            updates,
            vec![PeerUpdate {
                remove: true,
                ..PeerUpdate::new(nodes[1].accepted.public_key)
            }]
        );
    }

    #[test]
    fn a_changed_endpoint_and_a_moved_prefix_change_only_what_changed() {
        let mut nodes = cluster(2);
        let before = build(&nodes);
        nodes[0].accepted.endpoints = vec!["198.18.7.7:1".parse().unwrap()];
        // Node 1's v6 pod CIDR moves to node 0.
        let moved = nodes[1].accepted.pod_cidrs.remove(1);
        nodes[0].accepted.pod_cidrs.push(moved);
        let updates = diff(&before.peers, &build(&nodes).peers);
        let k0 = nodes[0].accepted.public_key;
        let k1 = nodes[1].accepted.public_key;
        assert_eq!(
            updates,
            vec![
                // Removal first, then the addition to the new owner.
                PeerUpdate {
                    update_only: true,
                    allowed_ips: vec![AllowedIpChange::Remove(moved)],
                    ..PeerUpdate::new(k1)
                },
                PeerUpdate {
                    update_only: true,
                    endpoint: Some("198.18.7.7:1".parse().unwrap()),
                    allowed_ips: vec![AllowedIpChange::Add(moved)],
                    ..PeerUpdate::new(k0)
                },
            ]
        );
    }

    #[test]
    fn the_config_file_wins_conflicts() {
        let static_key = key(200);
        let statics = [static_peer(static_key, &["198.19.1.0/24"])];
        let nodes = [
            // Same key as the static peer: ignored.
            ts("nA", static_key, &["198.19.9.0/24"], "198.18.0.5:1"),
            // Claims the static peer's prefix (wider) and its own: keeps only its own.
            ts(
                "nB",
                key(201),
                &["198.19.0.0/16", "fd00:19:2::/64"],
                "198.18.0.6:1",
            ),
            // Claims this node's own pod CIDR.
            ts("nC", key(202), &["198.19.250.0/24"], "198.18.0.7:1"),
            // Claims nB's v6 prefix exactly: the smaller stable ID (nB) keeps it.
            ts("nD", key(203), &["fd00:19:2::/64"], "198.18.0.8:1"),
        ];
        let d = desired_peers(
            &statics,
            &BTreeMap::new(),
            &nodes,
            &[net("198.19.250.0/24")],
        );
        // nC and nD have nothing left: not peers.
        assert_eq!(d.peers.len(), 2, "static + nB");
        assert_eq!(d.peers[&static_key].origin, Origin::Static { line: 7 });
        assert_eq!(
            d.peers[&static_key].allowed_ips,
            BTreeSet::from([net("198.19.1.0/24")])
        );
        assert_eq!(
            d.peers[&key(201)].allowed_ips,
            BTreeSet::from([net("fd00:19:2::/64")])
        );
        assert!(!d.peers.contains_key(&key(202)) && !d.peers.contains_key(&key(203)));
        assert_eq!(d.conflicts.len(), 4, "{:#?}", d.conflicts);
        assert!(d
            .conflicts
            .iter()
            .any(|c| matches!(c, Conflict::SameKey { ignored, .. } if ignored.contains("nA"))));

        // Logged once: the same conflicts again are not new.
        let mut log = ConflictLog::default();
        assert_eq!(log.update(&d.conflicts), 4);
        assert_eq!(log.update(&d.conflicts), 0);
        assert_eq!(log.update(&BTreeSet::new()), 0);
        assert_eq!(log.update(&d.conflicts), 4);
    }

    #[test]
    fn a_resync_of_a_thousand_unchanged_peers_changes_nothing_and_one_more_touches_one() {
        let nodes = cluster(1001);
        let before = build(&nodes[..1000]);
        assert_eq!(before.peers.len(), 1000);
        assert!(
            before.conflicts.is_empty(),
            "{:?}",
            before.conflicts.first()
        );
        assert!(diff(&before.peers, &build(&nodes[..1000]).peers).is_empty());
        let updates = diff(&before.peers, &build(&nodes).peers);
        assert_eq!(updates.len(), 1);
        let updates = diff(&before.peers, &build(&nodes[1..1000]).peers);
        assert_eq!(updates.len(), 1);
        assert!(updates[0].remove);
    }

    /// Records every update (the data plane's door, without a device behind it); refuses
    /// them while `refuse` is set.
    #[derive(Default)]
    struct Recorder {
        updates: parking_lot::Mutex<Vec<DeviceUpdate>>,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl DeviceControl for Recorder {
        fn get(&self) -> tailsk8s_dataplane::config::DeviceSnapshot {
            Default::default()
        }
        fn set(&self, update: DeviceUpdate) -> Result<(), tailsk8s_dataplane::config::SetError> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(tailsk8s_dataplane::config::SetError::Invalid(
                    "refused by the test".into(),
                ));
            }
            self.updates.lock().push(update);
            Ok(())
        }
    }

    fn own_pods_only() -> StaticPeers {
        StaticPeers {
            own_pod_cidrs: vec![net("198.19.250.0/24")],
            ..StaticPeers::default()
        }
    }

    #[test]
    fn the_applier_calls_the_data_plane_only_for_changes() {
        let recorder = Arc::new(Recorder::default());
        let nodes = cluster(3);
        let base = DeviceUpdate {
            listen_port: Some(51820),
            ..DeviceUpdate::default()
        };
        let mut applier = Applier::start(recorder.clone(), None, base, own_pods_only()).unwrap();
        {
            let updates = recorder.updates.lock();
            assert_eq!(updates.len(), 1);
            assert!(updates[0].replace_peers && updates[0].listen_port == Some(51820));
            assert!(updates[0].peers.is_empty());
        }
        let first = applier.set_tailscale(nodes[..2].to_vec()).unwrap();
        assert_eq!(
            first,
            Applied {
                peer_blocks: 2,
                peers: 2
            }
        );
        let same = applier.set_tailscale(nodes[..2].to_vec()).unwrap();
        assert_eq!(
            same,
            Applied {
                peer_blocks: 0,
                peers: 2
            }
        );
        assert_eq!(
            recorder.updates.lock().len(),
            2,
            "an unchanged resync calls nothing"
        );
        let more = applier.set_tailscale(nodes.clone()).unwrap();
        assert_eq!(
            more,
            Applied {
                peer_blocks: 1,
                peers: 3
            }
        );
        let updates = recorder.updates.lock();
        assert!(!updates[2].replace_peers && updates[2].private_key.is_none());
        assert_eq!(updates[2].peers[0].public_key, nodes[2].accepted.public_key);
    }

    #[test]
    fn a_reload_beside_tailscale_peers_changes_only_the_static_peers() {
        let recorder = Arc::new(Recorder::default());
        let nodes = cluster(2);
        let (old_key, new_key) = (key(200), key(210));
        let mut statics = own_pods_only();
        statics.peers = vec![static_peer(old_key, &["198.19.100.0/24"])];
        let mut applier =
            Applier::start(recorder.clone(), None, DeviceUpdate::default(), statics).unwrap();
        applier.set_tailscale(nodes.clone()).unwrap();
        assert_eq!(applier.applied().len(), 3);
        let before = recorder.updates.lock().len();

        // The reload: one static peer goes, another comes; the Tailscale peers get nothing.
        let mut reloaded = own_pods_only();
        reloaded.peers = vec![static_peer(new_key, &["198.19.200.0/24"])];
        let done = applier.set_statics(reloaded.clone()).unwrap();
        assert_eq!(
            done,
            Applied {
                peer_blocks: 2,
                peers: 3
            }
        );
        {
            let updates = recorder.updates.lock();
            assert_eq!(updates.len(), before + 1);
            let blocks = &updates[before].peers;
            assert_eq!(
                blocks[0],
                PeerUpdate {
                    remove: true,
                    ..PeerUpdate::new(old_key)
                }
            );
            assert_eq!(blocks[1].public_key, new_key);
            assert!(!blocks[1].update_only && !blocks[1].remove);
            assert_eq!(
                blocks[1].allowed_ips,
                vec![AllowedIpChange::Add(net("198.19.200.0/24"))]
            );
        }
        let mut keys: Vec<Key> = applier.applied().keys().copied().collect();
        let mut expected = vec![
            new_key,
            nodes[0].accepted.public_key,
            nodes[1].accepted.public_key,
        ];
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected);

        // The next sync with the same tailnet keeps the reloaded static peers: nothing to do.
        let synced = applier.set_tailscale(nodes.clone()).unwrap();
        assert_eq!(synced.peer_blocks, 0);
        // Nor does the same file again.
        assert_eq!(applier.set_statics(reloaded).unwrap().peer_blocks, 0);
        assert_eq!(recorder.updates.lock().len(), before + 1);

        // A static peer claiming a node's pod CIDR takes it from the node in place (the
        // config file wins); the node keeps its session and its other prefix.
        let claimed = nodes[0].accepted.pod_cidrs[0];
        let mut claiming = own_pods_only();
        let claimed_text = claimed.to_string();
        claiming.peers = vec![static_peer(new_key, &["198.19.200.0/24", &claimed_text])];
        applier.set_statics(claiming).unwrap();
        {
            let updates = recorder.updates.lock();
            let blocks = &updates[before + 1].peers;
            assert_eq!(blocks.len(), 2, "{blocks:#?}");
            assert_eq!(
                blocks[0],
                PeerUpdate {
                    update_only: true,
                    allowed_ips: vec![AllowedIpChange::Remove(claimed)],
                    ..PeerUpdate::new(nodes[0].accepted.public_key)
                }
            );
            assert_eq!(blocks[1].public_key, new_key);
            assert!(blocks[1].update_only);
        }
    }

    #[test]
    fn a_reload_the_data_plane_refuses_leaves_the_previous_static_peers_in_force() {
        let recorder = Arc::new(Recorder::default());
        let nodes = cluster(1);
        let mut statics = own_pods_only();
        statics.peers = vec![static_peer(key(200), &["198.19.100.0/24"])];
        let mut applier =
            Applier::start(recorder.clone(), None, DeviceUpdate::default(), statics).unwrap();
        applier.set_tailscale(nodes.clone()).unwrap();
        let before = applier.applied().clone();

        recorder
            .refuse
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut reloaded = own_pods_only();
        reloaded.peers = vec![static_peer(key(210), &["198.19.200.0/24"])];
        assert!(applier.set_statics(reloaded).is_err());
        assert_eq!(applier.applied(), &before);
        recorder
            .refuse
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // The next sync does not sneak the refused file in.
        assert_eq!(applier.set_tailscale(nodes).unwrap().peer_blocks, 0);
        assert_eq!(applier.applied(), &before);
    }
}
