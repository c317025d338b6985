//! The simulated tailnet both stand-ins serve from: its nodes with their tags, addresses,
//! advertised routes (prefs, set through a node's LocalAPI) and enabled routes (approvals,
//! set through the cloud API or by the test). As on the real control server, a node's
//! primary routes are its advertised routes that are also enabled, each prefix primary on one
//! node only (the first that has it), and an unauthorized node is seen by no one.
//!
//! Every change wakes the watch-ipn-bus streams of every node.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::sync::watch;

/// The tailscaled version the stand-ins claim.
pub const VERSION: &str = "1.102.3-tailnet-sim";
/// The tailnet's MagicDNS suffix.
pub const DNS_SUFFIX: &str = "tail3f9c2.ts.net";

/// One node of the simulated tailnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    /// StableNodeID (`Self.ID`, the cloud API's `nodeId`).
    pub stable_id: String,
    /// The numeric ID (`NodeID`, the cloud API's legacy `id`).
    pub node_id: u64,
    /// tailscaled's key, `nodekey:` + 64 hex (the key of the `Peer` map).
    pub public_key: String,
    pub host_name: String,
    pub tailnet_ips: Vec<IpAddr>,
    pub tags: Vec<String>,
    /// What the node advertises (its prefs' `AdvertiseRoutes`).
    pub advertised_routes: Vec<IpNet>,
    /// What the admin approved (the cloud API's `enabledRoutes`).
    pub enabled_routes: Vec<IpNet>,
    pub online: bool,
    /// Device approval; an unauthorized node is in no one's status and its own
    /// `BackendState` is `NeedsMachineAuth`.
    pub authorized: bool,
    /// `--accept-routes`.
    pub route_all: bool,
}

impl SimNode {
    /// A node numbered `index` (0–255): host `k8s-node-INDEX`, tailnet addresses
    /// 100.101.INDEX.(10+INDEX) and fd7a:115c:a1e0::6f01:INDEX, tagged `tag:k8s-node`,
    /// online, authorized, no routes.
    pub fn numbered(index: u8) -> SimNode {
        SimNode {
            stable_id: format!("n{index:02}SIMCNTRL"),
            node_id: 5_410_286_723_000 + u64::from(index),
            public_key: format!("nodekey:{:064x}", 0xa000 + u64::from(index)),
            host_name: format!("k8s-node-{index}"),
            tailnet_ips: vec![
                IpAddr::from([100, 101, index, 10u8.wrapping_add(index)]),
                IpAddr::from([0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6f01, u16::from(index)]),
            ],
            tags: vec!["tag:k8s-node".into()],
            advertised_routes: Vec::new(),
            enabled_routes: Vec::new(),
            online: true,
            authorized: true,
            route_all: false,
        }
    }

    /// The same node, advertising `routes` with all of them approved.
    pub fn with_approved_routes(mut self, routes: &[IpNet]) -> SimNode {
        self.advertised_routes = routes.to_vec();
        self.enabled_routes = routes.to_vec();
        self
    }

    pub fn dns_name(&self) -> String {
        format!("{}.{DNS_SUFFIX}.", self.host_name)
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: Vec<SimNode>,
}

/// The simulated tailnet, shared by the servers that serve it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Tailnet {
    state: Arc<Mutex<State>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Tailnet {
    fn default() -> Self {
        Tailnet::new()
    }
}

impl Tailnet {
    pub fn new() -> Tailnet {
        Tailnet {
            state: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        }
    }

    /// Adds a node (replacing one with the same stable ID).
    pub fn add(&self, node: SimNode) {
        {
            let mut state = self.state.lock();
            state.nodes.retain(|n| n.stable_id != node.stable_id);
            state.nodes.push(node);
        }
        self.changed();
    }

    /// Removes a node; whether it was there.
    pub fn remove(&self, stable_id: &str) -> bool {
        let removed = {
            let mut state = self.state.lock();
            let before = state.nodes.len();
            state.nodes.retain(|n| n.stable_id != stable_id);
            state.nodes.len() != before
        };
        if removed {
            self.changed();
        }
        removed
    }

    /// Changes one node; `None` when there is no such node.
    pub fn update<R>(&self, stable_id: &str, change: impl FnOnce(&mut SimNode) -> R) -> Option<R> {
        let result = {
            let mut state = self.state.lock();
            state
                .nodes
                .iter_mut()
                .find(|n| n.stable_id == stable_id)
                .map(change)
        };
        if result.is_some() {
            self.changed();
        }
        result
    }

    pub fn node(&self, stable_id: &str) -> Option<SimNode> {
        self.state
            .lock()
            .nodes
            .iter()
            .find(|n| n.stable_id == stable_id)
            .cloned()
    }

    /// Finds a node by its numeric ID (as text) or its stable ID, as the cloud API does.
    pub fn find_device(&self, id: &str) -> Option<SimNode> {
        self.state
            .lock()
            .nodes
            .iter()
            .find(|n| n.stable_id == id || n.node_id.to_string() == id)
            .cloned()
    }

    pub fn nodes(&self) -> Vec<SimNode> {
        self.state.lock().nodes.clone()
    }

    /// The nodes with their primary routes, in insertion order.
    pub fn with_primary_routes(&self) -> Vec<(SimNode, Vec<IpNet>)> {
        let nodes = self.nodes();
        let mut taken: Vec<IpNet> = Vec::new();
        nodes
            .into_iter()
            .map(|node| {
                let mut primary = Vec::new();
                if node.authorized {
                    for route in &node.advertised_routes {
                        if node.enabled_routes.contains(route) && !taken.contains(route) {
                            taken.push(*route);
                            primary.push(*route);
                        }
                    }
                }
                (node, primary)
            })
            .collect()
    }

    /// The number of changes so far.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|g| *g += 1);
    }
}
