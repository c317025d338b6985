//! Tailscale as seen from this node: tailscaled's LocalAPI ([`localapi`]), the JSON documents
//! it speaks ([`documents`]), which tailnet peers are cluster nodes and which pod CIDRs they
//! may carry ([`membership`]), and the tailnet admin side ([`cloud`], the cloud API; [`admin`],
//! the `advertise` / `withdraw` / `authorize` commands).
//!
//! The rest of the control plane sees Tailscale only through [`TailnetView`] and
//! [`TailnetNode`]: plain values, parsed once, with nothing of the wire format left in them.
//!
//! Why not the `tailscale-localapi` crate (0.6.0)? Tried against the reference fixtures: it
//! parses the v1.102 status document, but fails on documents of older daemons (`missing field
//! PeerAPIURL`) and on a status without `User` (a daemon that is not logged in), has no
//! request timeouts, no prefs and no watch-ipn-bus. The documents need only a few fields, so
//! [`documents`] holds our own tolerant serde types.

use std::net::IpAddr;

use ipnet::IpNet;

pub mod admin;
pub mod cloud;
pub mod documents;
pub mod localapi;
pub mod membership;

pub use localapi::{LocalApi, LocalApiError, Watch};
pub use membership::{cluster_nodes, ClusterNode};

/// Where tailscaled listens on Linux (systemd's `/run/…` is the same file).
pub const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

/// One node of the tailnet (this node or a peer), as the control plane needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailnetNode {
    /// The stable node ID (`nAb3kQ2CNTRL`): the same as the cloud API's `nodeId`.
    pub stable_id: String,
    pub host_name: String,
    /// The MagicDNS name, with its trailing dot as tailscaled writes it (may be empty).
    pub dns_name: String,
    /// The node's tailnet addresses (100.64.0.0/10, fd7a:115c:a1e0::/48).
    pub tailnet_ips: Vec<IpAddr>,
    pub tags: Vec<String>,
    /// The subnet routes the control server approved and made this node primary for:
    /// never routes that are only advertised.
    pub primary_routes: Vec<IpNet>,
    /// Connected to the control server (not a statement about our data plane's path).
    pub online: bool,
}

impl TailnetNode {
    /// Whether the node carries `tag` (exactly: `tag:k8s` is not `tag:k8s-node`).
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// The tailnet as one LocalAPI status document shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TailnetView {
    /// `NoState`, `NeedsLogin`, `NeedsMachineAuth`, `Stopped`, `Starting` or `Running`.
    pub backend_state: String,
    /// This node (all fields empty when tailscaled has no node yet, e.g. before login).
    pub self_node: TailnetNode,
    /// The other nodes, ordered by stable ID.
    pub peers: Vec<TailnetNode>,
}

impl TailnetView {
    /// Whether tailscaled is up and connected: only then is the peer list meaningful.
    pub fn is_running(&self) -> bool {
        self.backend_state == "Running"
    }
}
