//! The Tailscale peer source: the control plane's async side. One tokio runtime (on its own
//! thread, beside the data plane's threads) runs three tasks:
//!
//! - the **sync loop**: reads LocalAPI `/status` at start, after a `watch-ipn-bus` message
//!   (debounced), every `resync`, and when a failed announcement fetch is due again; turns the
//!   view into cluster nodes (tag, approved pod CIDRs inside the cluster CIDRs), fetches the
//!   announcements of new or changed nodes only (bounded concurrency), and hands the desired
//!   peer set to the [`Applier`] — the one door into the data plane stays `DeviceUpdate`;
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
use crate::config::{PeerConfig, TailscaleConfig};
use crate::reconcile::{desired_peers, Applier, TailscalePeer};
use crate::tailscale::{cluster_nodes, ClusterNode, LocalApi, TailnetView};

/// After a watch message, wait this long for more before re-reading the status.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// The first retry delay after a failure; it doubles up to `resync`.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Everything the source needs from the config file.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub tailscale: TailscaleConfig,
    pub cluster_cidrs: Vec<IpNet>,
    pub own_pod_cidrs: Vec<IpNet>,
    pub statics: Vec<PeerConfig>,
    pub preshared: BTreeMap<Key, Key>,
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

/// What the source remembers about one cluster node between syncs.
#[derive(Debug, Clone)]
struct Known {
    tailnet_ips: Vec<IpAddr>,
    announcement: Option<Announcement>,
    failures: u32,
    retry_at: Option<Instant>,
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
}

impl PeerSource {
    pub fn new(
        settings: SourceSettings,
        applier: Arc<Mutex<Applier>>,
        announcement: &Announcement,
    ) -> PeerSource {
        PeerSource {
            localapi: LocalApi::new(settings.tailscale.socket.clone()),
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
        }
    }

    /// The source's freshness, shared (for status reporting).
    pub fn freshness(&self) -> Arc<Mutex<Freshness>> {
        self.health.state.clone()
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let (signal_tx, mut signal_rx) = mpsc::channel::<()>(1);
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
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                Some(()) = signal_rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while signal_rx.try_recv().is_ok() {}
                }
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            if *shutdown.borrow() {
                break;
            }
            match self.localapi.status().await {
                Ok(view) if view.is_running() => {
                    self.health.fresh();
                    backoff = FIRST_BACKOFF;
                    next_read = Instant::now() + resync;
                    self.sync(view).await;
                }
                Ok(view) => {
                    self.health
                        .stale(format!("tailscaled is {}, not Running", view.backend_state));
                    next_read = Instant::now() + backoff;
                    backoff = (backoff * 2).min(resync);
                }
                Err(e) => {
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
    }

    fn next_retry(&self) -> Option<Instant> {
        self.known.values().filter_map(|k| k.retry_at).min()
    }

    /// One pass over a good view: membership, fetches, desired set, apply.
    async fn sync(&mut self, view: TailnetView) {
        self.serve_on(&view.self_node.tailnet_ips);
        self.self_ips = view.self_node.tailnet_ips.clone();
        let nodes: Vec<ClusterNode> = cluster_nodes(
            &view,
            &self.settings.tailscale.tag,
            &self.settings.cluster_cidrs,
        )
        .into_iter()
        .filter(|n| !n.pod_cidrs.is_empty())
        .collect();

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
                Some(k) => k.announcement.is_none() && k.retry_at.is_none_or(|r| r <= now),
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
                let entry = self.known.entry(id).or_insert_with(|| Known {
                    tailnet_ips: node.node.tailnet_ips.clone(),
                    announcement: None,
                    failures: 0,
                    retry_at: None,
                });
                entry.tailnet_ips = node.node.tailnet_ips.clone();
                match result {
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

        let peers: Vec<TailscalePeer> = nodes
            .iter()
            .filter_map(|n| {
                let a = self.known.get(&n.node.stable_id)?.announcement.as_ref()?;
                Some(TailscalePeer {
                    stable_id: n.node.stable_id.clone(),
                    host_name: n.node.host_name.clone(),
                    accepted: accept(a, &n.pod_cidrs),
                })
            })
            .collect();
        let desired = desired_peers(
            &self.settings.statics,
            &self.settings.preshared,
            &peers,
            &self.settings.own_pod_cidrs,
        );
        let applier = self.applier.clone();
        let applied = tokio::task::spawn_blocking(move || applier.lock().apply(desired)).await;
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
