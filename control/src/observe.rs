//! What a running router reports about itself: one [`Status`] document, built at read time
//! from the device's snapshot, the applied peer set, the peer source's state and the worker
//! heartbeats. `/metrics`, `/healthz`, `/readyz` ([`crate::metrics`]) and `tailsk8s status`
//! ([`crate::status`]) all read it, so they cannot disagree.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tailsk8s_dataplane::config::DeviceControl;
use tailsk8s_dataplane::device::DeviceHealth;

use crate::path::{Path, PathMonitor};
use crate::peer_source::{Freshness, SyncStats};
use crate::reconcile::{Applier, Origin};

/// A device thread that has not gone round its loop for this long is stuck (they wake at
/// least every 100 ms).
pub const STALLED_AFTER: Duration = Duration::from_secs(3);

/// A session older than this is expired (WireGuard's reject-after-time, 180 s): a peer whose
/// last handshake is older is not `connected`.
const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// The peer source's shared state, as the router reads it.
#[derive(Clone)]
pub struct SourceHandles {
    pub freshness: Arc<Mutex<Freshness>>,
    pub stats: Arc<Mutex<SyncStats>>,
    pub paths: Arc<Mutex<PathMonitor>>,
}

/// Everything the router's reports read from.
#[derive(Clone)]
pub struct RouterView {
    pub interface: String,
    pub device: Arc<dyn DeviceControl>,
    pub health: DeviceHealth,
    pub applier: Option<Arc<Mutex<Applier>>>,
    pub source: Option<SourceHandles>,
}

/// The router's state, as `tailsk8s status --json` prints it (see README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub workers: usize,
    /// TUN offloads (TSO/USO reads, GRO writes) in force.
    pub offload: bool,
    pub key_loaded: bool,
    /// `None` without a `[tailscale]` table.
    pub source: Option<SourceStatus>,
    pub peers: Vec<PeerStatus>,
    /// Device-wide drops by reason (every reason, zero or not).
    pub drops: Vec<DropCount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub reason: String,
    pub count: u64,
}

/// The Tailscale peer source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// `starting`, `fresh` or `stale`.
    pub state: String,
    /// Why it is stale.
    pub reason: Option<String>,
    /// Unix time (seconds) of the last good sync.
    pub last_sync: Option<f64>,
    pub sync_age_seconds: Option<f64>,
    pub errors: u64,
    /// How long the last good sync took.
    pub reconcile_seconds: Option<f64>,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: String,
    /// The Tailscale node name; empty for a static peer.
    pub node: String,
    /// The peer's allowed IPs (its pod CIDRs).
    pub pod_cidrs: Vec<String>,
    pub endpoint: Option<String>,
    /// `direct` or `tailnet` (static peers are always `direct`).
    pub path: String,
    /// `connected` (a handshake within 180 s), `connecting`, or `no_endpoint`.
    pub state: String,
    /// Unix time (seconds) of the last completed handshake.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub handshake_attempts: u64,
    /// Drops that concern this peer, by reason: only the reasons that happened (absent from
    /// a router older than the field).
    #[serde(default)]
    pub drops: Vec<DropCount>,
}

pub const PEER_STATES: [&str; 3] = ["connected", "connecting", "no_endpoint"];

impl RouterView {
    /// Reads everything now.
    pub fn status(&self) -> Status {
        let now = SystemTime::now();
        let snapshot = self.device.get();
        let applied = self.applier.as_ref().map(|a| a.lock().applied().clone());
        let paths = self.source.as_ref().map(|s| s.paths.clone());
        let peers = snapshot
            .peers
            .iter()
            .map(|p| {
                let node = match applied.as_ref().and_then(|a| a.get(&p.public_key)) {
                    Some(desired) => match &desired.origin {
                        Origin::Tailscale { host_name, .. } => host_name.clone(),
                        Origin::Static { .. } => String::new(),
                    },
                    None => String::new(),
                };
                let path = paths
                    .as_ref()
                    .and_then(|paths| paths.lock().path(&p.public_key))
                    .unwrap_or(Path::Direct);
                let fresh = p.last_handshake.is_some_and(|at| {
                    now.duration_since(at).unwrap_or_default() < SESSION_LIFETIME
                });
                let state = if fresh {
                    "connected"
                } else if p.endpoint.is_none() {
                    "no_endpoint"
                } else {
                    "connecting"
                };
                PeerStatus {
                    public_key: p.public_key.to_string(),
                    node,
                    pod_cidrs: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    path: path_name(path).to_string(),
                    state: state.to_string(),
                    last_handshake: p
                        .last_handshake
                        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    rx_packets: p.rx_packets,
                    tx_packets: p.tx_packets,
                    handshake_attempts: p.handshake_initiations,
                    drops: p
                        .drops
                        .iter()
                        .filter(|(_, count)| *count > 0)
                        .map(|(reason, count)| DropCount {
                            reason: reason.name().to_string(),
                            count,
                        })
                        .collect(),
                }
            })
            .collect();
        let source = self.source.as_ref().map(|s| {
            let (state, reason) = match &*s.freshness.lock() {
                Freshness::Starting => ("starting", None),
                Freshness::Fresh => ("fresh", None),
                Freshness::Stale(why) => ("stale", Some(why.clone())),
            };
            let stats = s.stats.lock().clone();
            SourceStatus {
                state: state.to_string(),
                reason,
                last_sync: stats
                    .synced_at
                    .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64()),
                sync_age_seconds: stats
                    .synced_at
                    .map(|at| now.duration_since(at).unwrap_or_default().as_secs_f64()),
                errors: stats.errors,
                reconcile_seconds: stats.reconcile.map(|d| d.as_secs_f64()),
            }
        });
        Status {
            interface: self.interface.clone(),
            workers: self.health.workers(),
            offload: self.health.offload(),
            key_loaded: snapshot.private_key.is_some(),
            source,
            peers,
            drops: self
                .health
                .stats()
                .drops()
                .map(|(reason, count)| DropCount {
                    reason: reason.name().to_string(),
                    count,
                })
                .collect(),
        }
    }

    /// `/healthz`: `Err(why)` when the device stopped or one of its threads is stuck.
    pub fn live(&self) -> Result<(), String> {
        if let Some(reason) = self.health.exit_reason() {
            return Err(format!("device stopped: {reason:?}"));
        }
        let stalled = self.health.stalled_threads(STALLED_AFTER);
        if !stalled.is_empty() {
            return Err(format!("stuck threads: {}", stalled.join(", ")));
        }
        Ok(())
    }

    /// `/readyz`: `Err(why)` until the TUN is up, the key loaded and the peers applied (from
    /// the config file, and with a Tailscale source, from a sync that is not stale).
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.health.tun_exists() {
            return Err("the TUN interface is gone".into());
        }
        if self.device.get().private_key.is_none() {
            return Err("no private key".into());
        }
        if self.applier.is_none() {
            return Err("no config applied".into());
        }
        if let Some(source) = &self.source {
            if let Freshness::Stale(why) = &*source.freshness.lock() {
                return Err(format!("peer source stale: {why}"));
            }
            if source.stats.lock().synced_at.is_none() {
                return Err("peer source has not synced yet".into());
            }
        }
        Ok(())
    }
}

pub fn path_name(path: Path) -> &'static str {
    match path {
        Path::Direct => "direct",
        Path::Tailnet => "tailnet",
    }
}
