//! The Tailscale peer source: the control plane's async side. It runs three tasks on the
//! control plane's one tokio runtime (on its own thread, beside the data plane's threads and
//! the router's status socket and metrics server; see [`crate::router`]):
//!
//! - the **sync loop**: reads LocalAPI `/status` at start, after a `watch-ipn-bus` message
//!   (debounced), every `resync`, and when a failed announcement fetch is due again; turns the
//!   view into cluster nodes (tag, approved pod CIDRs inside the cluster CIDRs), fetches the
//!   announcements of new or changed nodes only (bounded concurrency), and hands the
//!   Tailscale peers to the [`Applier`], which joins them with the config file's static peers
//!   (its own, so a reload changes them without the source) — the one door into the data
//!   plane stays `DeviceUpdate`;
//! - the **watch** task: follows `watch-ipn-bus` as a change signal only, reconnecting with
//!   backoff;
//! - the **announcement server**, bound to this node's tailnet addresses (rebound when they
//!   change).
//!
//! When the LocalAPI is unreachable, errors or returns garbage, or tailscaled is not
//! `Running`, the source is *stale*: the last good peer set stays applied, the data plane and
//! the kernel are not touched, it retries with backoff (1 s doubling up to `resync`), and it
//! logs one line when it becomes stale and one when it is fresh again — never per retry.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use parking_lot::Mutex;
use tailsk8s_dataplane::key::Key;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::announcement::fetch::{fetch_many, Target, MAX_CONCURRENT_FETCHES};
use crate::announcement::server::{self, Caller, Whois};
use crate::announcement::{accept, Announcement};
use crate::config::TailscaleConfig;
use crate::path::{Endpoints, Observed, PathMonitor};
use crate::reconcile::{Applier, Desired, Origin, StaticPeers, TailscalePeer};
use crate::tailscale::{cluster_nodes, ClusterNode, LocalApi, TailnetView};

/// After a watch message, wait this long for more before re-reading the status.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// The first retry delay after a failure; it doubles up to `resync`.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The shortest time between two fetches of an unchanged node's announcement. Nothing in the
/// tailnet status changes when a node's router restarts with a new WireGuard key (a lost key
/// file), so known announcements are re-read slowly: every 10 × `resync`, at least this, with
/// a per-node spread so a large cluster does not re-fetch all at once.
pub const MIN_ANNOUNCEMENT_REFRESH: Duration = Duration::from_secs(300);

/// Everything the source needs from the config file (all of it fixed until a restart; the
/// static peers, which a reload may change, are the [`Applier`]'s).
#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub tailscale: TailscaleConfig,
    pub cluster_cidrs: Vec<IpNet>,
}

/// The LocalAPI as the announcement server's [`Whois`].
#[derive(Debug, Clone)]
pub struct LocalApiWhois(pub LocalApi);

impl Whois for LocalApiWhois {
    async fn whois(&self, addr: std::net::SocketAddr) -> Result<Option<Caller>, String> {
        match self.0.whois(addr).await {
            Ok(node) => Ok(node.map(|n| Caller {
                stable_id: n.stable_id,
                tags: n.tags,
            })),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Whether the source's view of the tailnet is current; logs each change once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    Starting,
    Fresh,
    Stale(String),
}

#[derive(Debug)]
struct Health {
    state: Arc<Mutex<Freshness>>,
}

impl Health {
    fn fresh(&self) {
        let mut state = self.state.lock();
        if *state != Freshness::Fresh {
            if let Freshness::Stale(_) = *state {
                tracing::info!("peer source fresh again: tailscaled's LocalAPI answers");
            }
            *state = Freshness::Fresh;
        }
    }

    fn stale(&self, why: String) {
        let mut state = self.state.lock();
        if !matches!(*state, Freshness::Stale(_)) {
            tracing::warn!(
                "peer source stale, keeping the last good peer set: {why} (retrying with backoff)"
            );
        }
        *state = Freshness::Stale(why);
    }
}

/// How the source's syncs went, for metrics and `tailsk8s status`.
#[derive(Debug, Clone, Default)]
pub struct SyncStats {
    /// When the last good sync (status read, announcements fetched, peers applied) ended.
    pub synced_at: Option<std::time::SystemTime>,
    /// Failed LocalAPI reads and failed applies since start.
    pub errors: u64,
    /// How long the last good sync took.
    pub reconcile: Option<Duration>,
}

/// What the source remembers about one cluster node between syncs.
#[derive(Debug, Clone)]
struct Known {
    tailnet_ips: Vec<IpAddr>,
    announcement: Option<Announcement>,
    failures: u32,
    retry_at: Option<Instant>,
    /// When the announcement is re-read even if nothing changed (see
    /// [`MIN_ANNOUNCEMENT_REFRESH`]).
    refresh_at: Option<Instant>,
}

/// The running source (see the module comment).
pub struct PeerSource {
    localapi: LocalApi,
    settings: SourceSettings,
    applier: Arc<Mutex<Applier>>,
    /// This router's announcement, serialised.
    document: String,
    known: BTreeMap<String, Known>,
    health: Health,
    apply_failing: bool,
    /// The tailnet addresses the announcement server is bound to, and its stop switch.
    served: Option<(Vec<IpAddr>, watch::Sender<bool>)>,
    self_ips: Vec<IpAddr>,
    /// Direct or tailnet path per Tailscale peer (see [`crate::path`]).
    paths: Arc<Mutex<PathMonitor>>,
    stats: Arc<Mutex<SyncStats>>,
}

impl PeerSource {
    pub fn new(
        settings: SourceSettings,
        applier: Arc<Mutex<Applier>>,
        announcement: &Announcement,
    ) -> PeerSource {
        PeerSource {
            // A hung tailscaled must not hold the source much past a resync.
            localapi: LocalApi::new(settings.tailscale.socket.clone()).with_timeout(
                settings
                    .tailscale
                    .resync
                    .clamp(Duration::from_secs(2), Duration::from_secs(10)),
            ),
            settings,
            applier,
            document: announcement.to_json(),
            known: BTreeMap::new(),
            health: Health {
                state: Arc::new(Mutex::new(Freshness::Starting)),
            },
            apply_failing: false,
            served: None,
            self_ips: Vec::new(),
            paths: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// The path per peer, shared (for status reporting).
    pub fn paths(&self) -> Arc<Mutex<PathMonitor>> {
        self.paths.clone()
    }

    /// How the syncs went, shared (for status reporting).
    pub fn sync_stats(&self) -> Arc<Mutex<SyncStats>> {
        self.stats.clone()
    }

    /// The source's freshness, shared (for status reporting).
    pub fn freshness(&self) -> Arc<Mutex<Freshness>> {
        self.health.state.clone()
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let (signal_tx, mut signal_rx) = mpsc::channel::<()>(1);
        let path_watch = tokio::spawn(watch_paths(self.paths.clone(), self.applier.clone()));
        let watcher = tokio::spawn(follow_watch(
            self.localapi.clone(),
            signal_tx,
            self.settings.tailscale.resync,
            shutdown.clone(),
        ));
        let resync = self.settings.tailscale.resync;
        let mut backoff = FIRST_BACKOFF;
        let mut next_read = Instant::now();
        loop {
            let wake = self.next_retry().map_or(next_read, |r| r.min(next_read));
            let signalled = tokio::select! {
                _ = tokio::time::sleep_until(wake) => false,
                Some(()) = signal_rx.recv() => true,
                changed = shutdown.changed() => {
                    // A dropped sender means no one can stop us any more: stop now.
                    if changed.is_err() {
                        break;
                    }
                    false
                }
            };
            if *shutdown.borrow() {
                break;
            }
            if signalled {
                // Debounce: one re-read for a burst of messages.
                tokio::time::sleep(DEBOUNCE).await;
                while signal_rx.try_recv().is_ok() {}
            }
            // A hung tailscaled or a slow peer must not hold up the router's exit.
            let status = tokio::select! {
                status = self.localapi.status() => status,
                () = stopped(&mut shutdown) => break,
            };
            match status {
                Ok(view) if view.is_running() => {
                    self.health.fresh();
                    backoff = FIRST_BACKOFF;
                    next_read = Instant::now() + resync;
                    let mut stop = shutdown.clone();
                    let started = std::time::Instant::now();
                    tokio::select! {
                        () = self.sync(view) => {}
                        () = stopped(&mut stop) => break,
                    }
                    let mut stats = self.stats.lock();
                    if self.apply_failing {
                        stats.errors += 1;
                    } else {
                        stats.synced_at = Some(std::time::SystemTime::now());
                        stats.reconcile = Some(started.elapsed());
                    }
                }
                Ok(view) => {
                    self.stats.lock().errors += 1;
                    self.health
                        .stale(format!("tailscaled is {}, not Running", view.backend_state));
                    next_read = Instant::now() + backoff;
                    backoff = (backoff * 2).min(resync);
                }
                Err(e) => {
                    self.stats.lock().errors += 1;
                    self.health.stale(e.to_string());
                    next_read = Instant::now() + backoff;
                    backoff = (backoff * 2).min(resync);
                }
            }
        }
        if let Some((_, stop)) = self.served.take() {
            let _ = stop.send(true);
        }
        watcher.abort();
        path_watch.abort();
    }

    /// How long until an unchanged node's announcement is re-read: 10 × resync (at least
    /// [`MIN_ANNOUNCEMENT_REFRESH`]) plus up to half of that again, spread by stable ID.
    fn refresh_after(&self, stable_id: &str) -> Duration {
        let base = (self.settings.tailscale.resync * 10).max(MIN_ANNOUNCEMENT_REFRESH);
        let spread = stable_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
            % 1000;
        base + base / 2 * spread / 1000
    }

    fn next_retry(&self) -> Option<Instant> {
        self.known.values().filter_map(|k| k.retry_at).min()
    }

    /// One pass over a good view: membership, fetches, desired set, apply.
    async fn sync(&mut self, view: TailnetView) {
        self.serve_on(&view.self_node.tailnet_ips);
        self.self_ips = view.self_node.tailnet_ips.clone();
        let nodes = cluster_nodes_with_pods(&view, &self.settings);

        // Forget nodes that left, lost the tag or every approved pod CIDR.
        let before = self.known.len();
        self.known
            .retain(|id, _| nodes.iter().any(|n| &n.node.stable_id == id));
        let gone = before - self.known.len();

        let now = Instant::now();
        let mut targets = Vec::new();
        for n in &nodes {
            let due = match self.known.get(&n.node.stable_id) {
                None => true,
                Some(k) if k.tailnet_ips != n.node.tailnet_ips => true,
                Some(k) if k.announcement.is_some() => k.refresh_at.is_some_and(|r| r <= now),
                Some(k) => k.retry_at.is_none_or(|r| r <= now),
            };
            if due {
                targets.push((
                    n.node.stable_id.clone(),
                    self.targets_of(&n.node.tailnet_ips),
                ));
            }
        }
        let fetched = targets.len();
        if !targets.is_empty() {
            for (id, result) in fetch_many(targets, MAX_CONCURRENT_FETCHES).await {
                let Some(node) = nodes.iter().find(|n| n.node.stable_id == id) else {
                    continue;
                };
                let refresh_after = self.refresh_after(&id);
                let entry = self.known.entry(id).or_insert_with(|| Known {
                    tailnet_ips: node.node.tailnet_ips.clone(),
                    announcement: None,
                    failures: 0,
                    retry_at: None,
                    refresh_at: None,
                });
                let moved = entry.tailnet_ips != node.node.tailnet_ips;
                entry.tailnet_ips = node.node.tailnet_ips.clone();
                match result {
                    // A failed refresh of a known, unmoved node keeps what it announced: its
                    // router may be restarting, and its session must not drop for that.
                    Err(e) if entry.announcement.is_some() && !moved => {
                        tracing::debug!(
                            node = %node.node.host_name,
                            "refreshing the node's announcement failed, keeping the last: {e}"
                        );
                        entry.refresh_at = Some(Instant::now() + self.settings.tailscale.resync);
                    }
                    Ok(a) => {
                        if entry.announcement.as_ref() != Some(&a) {
                            tracing::info!(
                                node = %node.node.host_name,
                                id = %node.node.stable_id,
                                public_key = %a.public_key,
                                endpoints = ?a.endpoints,
                                "announcement accepted"
                            );
                        }
                        entry.announcement = Some(a);
                        entry.failures = 0;
                        entry.retry_at = None;
                        entry.refresh_at = Some(Instant::now() + refresh_after);
                    }
                    Err(e) => {
                        if entry.failures == 0 {
                            tracing::warn!(
                                node = %node.node.host_name,
                                id = %node.node.stable_id,
                                "cannot fetch the node's announcement (retrying with backoff): {e}"
                            );
                        }
                        entry.announcement = None;
                        entry.failures = entry.failures.saturating_add(1);
                        let delay = FIRST_BACKOFF
                            .saturating_mul(1 << entry.failures.min(16).saturating_sub(1))
                            .min(self.settings.tailscale.resync);
                        entry.retry_at = Some(Instant::now() + delay);
                    }
                }
            }
        }

        let peers = tailscale_peers(&nodes, |id| self.known.get(id)?.announcement.as_ref());
        let applier = self.applier.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut applier = applier.lock();
            let done = applier.set_tailscale(peers);
            // What the conflict rule left of the Tailscale peers, as applied.
            let tailscale: Vec<(Key, String, Option<std::net::SocketAddr>)> = applier
                .applied()
                .values()
                .filter_map(|peer| match &peer.origin {
                    Origin::Tailscale { stable_id, .. } => {
                        Some((peer.public_key, stable_id.clone(), peer.endpoint))
                    }
                    Origin::Static { .. } => None,
                })
                .collect();
            (done, tailscale)
        })
        .await
        .map(|(done, tailscale)| {
            self.set_paths(&tailscale);
            done
        });
        match applied {
            Ok(Ok(done)) => {
                if self.apply_failing {
                    tracing::info!("peer changes apply again");
                    self.apply_failing = false;
                }
                if done.peer_blocks > 0 || fetched > 0 || gone > 0 {
                    tracing::info!(
                        cluster_nodes = nodes.len(),
                        fetched,
                        changed = done.peer_blocks,
                        peers = done.peers,
                        "peers synced from the tailnet"
                    );
                }
            }
            Ok(Err(e)) => {
                if !self.apply_failing {
                    tracing::warn!("cannot apply peer changes (retrying at the next sync): {e:#}");
                    self.apply_failing = true;
                }
            }
            Err(e) => tracing::warn!("peer apply task failed: {e}"),
        }
    }

    /// Hands the path monitor the applied Tailscale peers, each with its direct endpoint and
    /// its WireGuard port on its first tailnet address (IPv4 first).
    fn set_paths(&self, tailscale: &[(Key, String, Option<std::net::SocketAddr>)]) {
        let paths: Vec<(Key, Endpoints)> = tailscale
            .iter()
            .filter_map(|(key, stable_id, direct)| {
                let known = self.known.get(stable_id)?;
                let port = known.announcement.as_ref()?.listen_port;
                let mut ips = known.tailnet_ips.clone();
                ips.sort_by_key(|ip| ip.is_ipv6());
                Some((
                    *key,
                    Endpoints {
                        direct: (*direct)?,
                        tailnet: std::net::SocketAddr::new(*ips.first()?, port),
                    },
                ))
            })
            .collect();
        self.paths
            .lock()
            .set_peers(paths, std::time::Instant::now());
    }

    /// Where to fetch a node's announcement: its tailnet addresses (IPv4 first), each from our
    /// tailnet address of the same family.
    fn targets_of(&self, ips: &[IpAddr]) -> Vec<Target> {
        let mut ips = ips.to_vec();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips.into_iter()
            .map(|ip| Target {
                peer: std::net::SocketAddr::new(ip, self.settings.tailscale.announce_port),
                local: self
                    .self_ips
                    .iter()
                    .find(|own| own.is_ipv4() == ip.is_ipv4())
                    .copied(),
            })
            .collect()
    }

    /// (Re)binds the announcement server when this node's tailnet addresses change.
    fn serve_on(&mut self, ips: &[IpAddr]) {
        if self
            .served
            .as_ref()
            .is_some_and(|(served, _)| served == ips)
            || ips.is_empty()
        {
            return;
        }
        if let Some((_, stop)) = self.served.take() {
            let _ = stop.send(true);
        }
        let port = self.settings.tailscale.announce_port;
        match server::bind(ips, port) {
            Ok(listeners) => {
                let (stop_tx, mut stop_rx) = watch::channel(false);
                tracing::info!(addresses = ?ips, port, "announcement server listening");
                tokio::spawn(server::serve(
                    listeners,
                    self.document.clone(),
                    LocalApiWhois(self.localapi.clone()),
                    self.settings.tailscale.tag.clone(),
                    async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    },
                ));
                self.served = Some((ips.to_vec(), stop_tx));
            }
            Err(e) => {
                tracing::warn!(addresses = ?ips, port, "cannot bind the announcement server (retrying at the next sync): {e}");
            }
        }
    }
}

/// The pure part of a resync: the cluster nodes of a view, each with its approved pod CIDRs
/// ([`cluster_nodes`], minus nodes with none). Allocation and time are linear in the peers.
pub fn cluster_nodes_with_pods(view: &TailnetView, settings: &SourceSettings) -> Vec<ClusterNode> {
    cluster_nodes(view, &settings.tailscale.tag, &settings.cluster_cidrs)
        .into_iter()
        .filter(|n| !n.pod_cidrs.is_empty())
        .collect()
}

/// The Tailscale peers from cluster nodes and their (cached) announcements: every node whose
/// announcement is known, with its pod CIDRs cut down to the approved.
pub fn tailscale_peers<'a>(
    nodes: &[ClusterNode],
    announcement_of: impl Fn(&str) -> Option<&'a Announcement>,
) -> Vec<TailscalePeer> {
    nodes
        .iter()
        .filter_map(|n| {
            let a = announcement_of(&n.node.stable_id)?;
            Some(TailscalePeer {
                stable_id: n.node.stable_id.clone(),
                host_name: n.node.host_name.clone(),
                accepted: accept(a, &n.pod_cidrs),
            })
        })
        .collect()
}

/// The desired peer set of one resync: `statics` plus [`tailscale_peers`].
pub fn desired_from_nodes<'a>(
    nodes: &[ClusterNode],
    statics: &StaticPeers,
    announcement_of: impl Fn(&str) -> Option<&'a Announcement>,
) -> Desired {
    statics.desired(&tailscale_peers(nodes, announcement_of))
}

/// How often the data plane's counters are read for the path choice.
pub const PATH_TICK: Duration = Duration::from_secs(1);

/// Reads the data plane every [`PATH_TICK`] and moves peers between their direct and tailnet
/// endpoints as [`PathMonitor`] decides (`update_only` endpoint changes, nothing else). Only
/// peers applied as Tailscale peers are looked at: a reload may have given a key to a static
/// peer since the last sync told the monitor its peers.
async fn watch_paths(paths: Arc<Mutex<PathMonitor>>, applier: Arc<Mutex<Applier>>) {
    let device = applier.lock().device();
    let mut tick = tokio::time::interval(PATH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let device_now = device.clone();
        let applier_now = applier.clone();
        let Ok((snapshot, tailscale)) = tokio::task::spawn_blocking(move || {
            let tailscale: std::collections::BTreeSet<Key> = applier_now
                .lock()
                .applied()
                .values()
                .filter(|p| matches!(p.origin, Origin::Tailscale { .. }))
                .map(|p| p.public_key)
                .collect();
            (device_now.get(), tailscale)
        })
        .await
        else {
            continue;
        };
        let observed: Vec<Observed> = snapshot
            .peers
            .iter()
            .filter(|p| tailscale.contains(&p.public_key))
            .map(|p| Observed {
                public_key: p.public_key,
                endpoint: p.endpoint,
                rx_bytes: p.rx_bytes,
            })
            .collect();
        let changes = paths.lock().tick(&observed, std::time::Instant::now());
        if changes.is_empty() {
            continue;
        }
        let update = tailsk8s_dataplane::config::DeviceUpdate {
            peers: changes
                .into_iter()
                .map(
                    |(key, endpoint, _)| tailsk8s_dataplane::config::PeerUpdate {
                        update_only: true,
                        endpoint: Some(endpoint),
                        ..tailsk8s_dataplane::config::PeerUpdate::new(key)
                    },
                )
                .collect(),
            ..Default::default()
        };
        let device_now = device.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || device_now.set(update)).await {
            tracing::warn!("cannot change a peer's path: {e}");
        }
    }
}

/// Completes when the stop switch turns true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Follows watch-ipn-bus: every message (and every reconnection) signals "re-read".
async fn follow_watch(
    localapi: LocalApi,
    signal: mpsc::Sender<()>,
    max_backoff: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let mut lost = false;
    let mut backoff = FIRST_BACKOFF;
    while !*shutdown.borrow() {
        let why = match localapi.watch().await {
            Ok(mut stream) => {
                if lost {
                    tracing::info!("following watch-ipn-bus again");
                    lost = false;
                    let _ = signal.try_send(());
                }
                backoff = FIRST_BACKOFF;
                loop {
                    match stream.next().await {
                        Ok(Some(_)) => {
                            let _ = signal.try_send(());
                        }
                        Ok(None) => break "tailscaled closed the stream".to_string(),
                        Err(e) => break e.to_string(),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        if !lost {
            tracing::warn!("watch-ipn-bus lost ({why}); still re-reading the status every resync");
            lost = true;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

#[cfg(test)]
mod tests {
    //! The source against the real LocalAPI stand-in and real announcement servers on
    //! loopback addresses (as the nodes' "tailnet addresses"); the data plane is a recorder
    //! of the updates that reach its door.

    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use tailsk8s_dataplane::config::{DeviceControl, DeviceSnapshot, DeviceUpdate, SetError};
    use tailsk8s_tailnet_sim::{Behaviour, LocalApiServer, SimNode, Tailnet};

    use super::*;

    #[derive(Default)]
    struct Recorder {
        updates: Mutex<Vec<DeviceUpdate>>,
    }

    impl DeviceControl for Recorder {
        fn get(&self) -> DeviceSnapshot {
            DeviceSnapshot::default()
        }
        fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
            self.updates.lock().push(update);
            Ok(())
        }
    }

    fn lo(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_follows_the_tailnet_and_keeps_the_last_good_set_when_it_goes_stale() {
        let dir = tempfile::tempdir().unwrap();
        let tailnet = Tailnet::new();
        let mut me = SimNode::numbered(1).with_approved_routes(&[net("198.19.1.0/24")]);
        me.tailnet_ips = vec![lo(41)];
        let mut peer = SimNode::numbered(2)
            .with_approved_routes(&[net("198.19.2.0/24"), net("fd00:19:2::/64")]);
        peer.tailnet_ips = vec![lo(42)];
        tailnet.add(me.clone());
        tailnet.add(peer.clone());
        let mut my_api =
            LocalApiServer::start(&tailnet, &me.stable_id, dir.path().join("1.sock")).unwrap();
        let peer_api =
            LocalApiServer::start(&tailnet, &peer.stable_id, dir.path().join("2.sock")).unwrap();

        // The peer's router: its announcement server on its "tailnet address".
        let listeners = server::bind(&[lo(42)], 0).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        let peer_key = Key::generate_private().public_key();
        let peer_announcement = Announcement {
            public_key: peer_key,
            listen_port: 51820,
            endpoints: vec!["198.18.0.2:51820".parse().unwrap()],
            // Claims more than approved: only the approved part is accepted.
            pod_cidrs: vec![net("198.19.2.0/24"), net("198.19.3.0/24")],
        };
        tokio::spawn(server::serve(
            listeners,
            peer_announcement.to_json(),
            LocalApiWhois(LocalApi::new(peer_api.socket().to_path_buf())),
            "tag:k8s-node".into(),
            std::future::pending(),
        ));

        let recorder = Arc::new(Recorder::default());
        let applier = Applier::start(
            recorder.clone(),
            None,
            DeviceUpdate::default(),
            Default::default(),
        )
        .unwrap();
        let settings = SourceSettings {
            tailscale: TailscaleConfig {
                socket: my_api.socket().to_path_buf(),
                tag: "tag:k8s-node".into(),
                announce_port: port,
                resync: Duration::from_secs(1),
            },
            cluster_cidrs: vec![net("198.19.0.0/16"), net("fd00:19::/32")],
        };
        let mine = Announcement {
            public_key: Key::generate_private().public_key(),
            listen_port: 51820,
            endpoints: Vec::new(),
            pod_cidrs: vec![net("198.19.1.0/24")],
        };
        let source = PeerSource::new(settings, Arc::new(Mutex::new(applier)), &mine);
        let freshness = source.freshness();
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = tokio::spawn(source.run(stop_rx));

        // Discovery: one update adding the peer with its approved pod CIDR only.
        wait_until("the peer", || recorder.updates.lock().len() >= 2).await;
        {
            let updates = recorder.updates.lock();
            let added = &updates[1].peers;
            assert_eq!(added.len(), 1);
            assert_eq!(added[0].public_key, peer_key);
            assert_eq!(
                added[0].allowed_ips,
                vec![tailsk8s_dataplane::config::AllowedIpChange::Add(net(
                    "198.19.2.0/24"
                ))]
            );
            assert_eq!(added[0].endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        }
        assert_eq!(*freshness.lock(), Freshness::Fresh);
        // Our own announcement server, on our "tailnet address", answers the tagged peer.
        let ours = crate::announcement::fetch::fetch(Target {
            peer: std::net::SocketAddr::new(lo(41), port),
            local: Some(lo(42)),
        });
        assert_eq!(ours.await.unwrap(), mine);

        // Garbage, errors, silence and no socket: stale, and the data plane is not touched.
        for behaviour in [Behaviour::Garbage, Behaviour::Error(500), Behaviour::Silent] {
            my_api.set_behaviour(behaviour.clone());
            wait_until(&format!("stale on {behaviour:?}"), || {
                matches!(*freshness.lock(), Freshness::Stale(_))
            })
            .await;
            my_api.set_behaviour(Behaviour::Normal);
            wait_until("fresh again", || *freshness.lock() == Freshness::Fresh).await;
        }
        my_api.stop();
        wait_until("stale without a socket", || {
            matches!(*freshness.lock(), Freshness::Stale(_))
        })
        .await;
        my_api.restart().unwrap();
        wait_until("fresh after restart", || {
            *freshness.lock() == Freshness::Fresh
        })
        .await;
        assert_eq!(
            recorder.updates.lock().len(),
            2,
            "a stale source must not touch the data plane"
        );

        // The tag goes: the peer is removed.
        tailnet.update(&peer.stable_id, |n| n.tags.clear()).unwrap();
        wait_until("the removal", || recorder.updates.lock().len() >= 3).await;
        assert!(recorder.updates.lock()[2].peers[0].remove);
        // And, untagged, it may no longer read our announcement (tailscaled's whois says so).
        let refused = crate::announcement::fetch::fetch(Target {
            peer: std::net::SocketAddr::new(lo(41), port),
            local: Some(lo(42)),
        });
        assert!(matches!(
            refused.await,
            Err(crate::announcement::fetch::FetchError::Status { status: 403, .. })
        ));
        // Nor may an address tailscaled does not know.
        let unknown = crate::announcement::fetch::fetch(Target {
            peer: std::net::SocketAddr::new(lo(41), port),
            local: Some(lo(43)),
        });
        assert!(matches!(
            unknown.await,
            Err(crate::announcement::fetch::FetchError::Status { status: 403, .. })
        ));

        // A hung tailscaled does not hold up the exit: stop while a status read hangs.
        my_api.set_behaviour(Behaviour::Silent);
        let seen = my_api.requests().len();
        wait_until("a status read to hang", || {
            my_api.requests()[seen..]
                .iter()
                .any(|r| r.target.contains("/status"))
        })
        .await;
        let _ = stop_tx.send(true);
        tokio::time::timeout(Duration::from_secs(1), running)
            .await
            .expect("the source stops at once")
            .unwrap();
    }

    #[test]
    fn unchanged_announcements_are_refreshed_slowly_and_spread() {
        let applier = Applier::start(
            Arc::new(Recorder::default()),
            None,
            DeviceUpdate::default(),
            Default::default(),
        )
        .unwrap();
        let settings = SourceSettings {
            tailscale: TailscaleConfig {
                socket: "/nonexistent".into(),
                tag: "tag:k8s-node".into(),
                announce_port: 1,
                resync: Duration::from_secs(60),
            },
            cluster_cidrs: Vec::new(),
        };
        let mine = Announcement {
            public_key: Key::generate_private().public_key(),
            listen_port: 1,
            endpoints: Vec::new(),
            pod_cidrs: Vec::new(),
        };
        let source = PeerSource::new(settings, Arc::new(Mutex::new(applier)), &mine);
        let base = Duration::from_secs(600);
        let delays: Vec<Duration> = (0..50)
            .map(|i| source.refresh_after(&format!("n{i:02}CNTRL")))
            .collect();
        assert!(
            delays.iter().all(|d| (base..=base * 3 / 2).contains(d)),
            "{delays:?}"
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 25, "refreshes are not spread: {delays:?}");
    }
}
