//! A kubenet-style cluster in namespaces: nodes, each with a pod bridge and pods, joined by
//! an underlay.
//!
//! ```text
//!   pod n1p0 (eth0 198.19.1.2)   pod n1p1 (198.19.1.3)          pod n2p0 (198.19.2.2) …
//!        └── vp0 ─┐   ┌── vp1 ───┘                                    │
//!           cnio0 198.19.1.1 (bridge)                           cnio0 198.19.2.1
//!           node n1 ── ul0 198.18.0.1 ════ underlay ════ ul0 198.18.0.2 ── node n2
//! ```
//! Node `i` (1-based) owns the pod CIDRs 198.19.i.0/24 and fd00:19:i::/64: the bridge has
//! `.1`/`::1`, pod `j` (0-based) has `.(j+2)`/`::(j+2)` and a default route via the bridge,
//! as the CNI bridge plugin sets up. The underlay is 198.18.0.i/24 and fd00:18::i/64 on
//! `ul0`: a veth pair for two nodes, a bridge in an extra namespace for more. Nodes
//! forward IPv4 and IPv6. Interface names are per namespace, so every node has `cnio0`.
//!
//! Nothing routes between nodes' pod CIDRs until routers run on the nodes
//! ([`crate::ConfigMesh`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::netns::Netns;

/// The pod bridge in every node.
pub const BRIDGE: &str = "cnio0";
/// The underlay interface in every node.
pub const UNDERLAY_IF: &str = "ul0";
/// The interface inside every pod.
pub const POD_IF: &str = "eth0";

/// Node `node`'s underlay IPv4 address, 198.18.0.`node`.
pub fn underlay_v4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, node)
}

/// Node `node`'s underlay IPv6 address, fd00:18::`node`.
pub fn underlay_v6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, node.into())
}

/// Node `node`'s IPv4 pod CIDR, 198.19.`node`.0/24.
pub fn pod_cidr_v4(node: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(198, 19, node, 0), 24)
}

/// Node `node`'s IPv6 pod CIDR, fd00:19:`node`::/64.
pub fn pod_cidr_v6(node: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0x19, node.into(), 0, 0, 0, 0, 0), 64)
}

/// Host number `host` in node `node`'s IPv4 pod CIDR (1 = bridge, 2.. = pods).
pub fn pod_v4(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node, host)
}

/// Host number `host` in node `node`'s IPv6 pod CIDR.
pub fn pod_v6(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x19, node.into(), 0, 0, 0, 0, host.into())
}

/// Describes a topology to build.
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    nodes: u8,
    pods_per_node: u8,
    pod_mtu: Option<u32>,
}

impl TopologyBuilder {
    /// `nodes` nodes with two pods each.
    pub fn new(nodes: u8) -> TopologyBuilder {
        TopologyBuilder {
            nodes,
            pods_per_node: 2,
            pod_mtu: None,
        }
    }

    /// Sets how many pods each node gets.
    pub fn pods_per_node(mut self, pods: u8) -> TopologyBuilder {
        self.pods_per_node = pods;
        self
    }

    /// Sets the MTU of every pod's link (both ends of its veth), as a CNI sets it below the
    /// tunnel's for an overlay; the kernel's default (1500) otherwise.
    pub fn pod_mtu(mut self, mtu: u32) -> TopologyBuilder {
        self.pod_mtu = Some(mtu);
        self
    }

    /// Creates every namespace, link, address and route.
    pub fn build(self) -> anyhow::Result<Topology> {
        if !(1..=254).contains(&self.nodes) {
            anyhow::bail!("a topology has 1 to 254 nodes, not {}", self.nodes);
        }
        if !(1..=253).contains(&self.pods_per_node) {
            anyhow::bail!("a node has 1 to 253 pods, not {}", self.pods_per_node);
        }
        if let Some(mtu) = self.pod_mtu.filter(|mtu| !(1280..=65535).contains(mtu)) {
            // Below 1280 the pods' links would lose their IPv6 addresses.
            anyhow::bail!("a pod MTU is 1280 to 65535, not {mtu}");
        }
        let underlay = if self.nodes > 2 {
            Some(Netns::new("ul")?)
        } else {
            None
        };
        let nodes = (1..=self.nodes)
            .map(|index| Node::build(index, self.pods_per_node, self.pod_mtu))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let topology = Topology { nodes, underlay };
        topology
            .connect_underlay()
            .context("building the underlay")?;
        Ok(topology)
    }
}

/// Nodes and pods in namespaces; all of it is deleted on drop.
#[derive(Debug)]
pub struct Topology {
    nodes: Vec<Node>,
    /// The namespace holding the underlay bridge, when there are more than two nodes.
    underlay: Option<Netns>,
}

impl Topology {
    /// The nodes; `nodes()[k]` has index `k + 1`.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The underlay namespace (only with more than two nodes).
    pub fn underlay(&self) -> Option<&Netns> {
        self.underlay.as_ref()
    }

    fn connect_underlay(&self) -> anyhow::Result<()> {
        match (&self.underlay, self.nodes.as_slice()) {
            (_, [] | [_]) => return Ok(()),
            (None, [a, b]) => a.ns.ip_batch(&[format!(
                "link add {UNDERLAY_IF} type veth peer name {UNDERLAY_IF} netns {}",
                b.ns.name()
            )])?,
            (Some(underlay), nodes) => {
                let mut lines = vec![
                    "link add br0 type bridge mcast_snooping 0".to_string(),
                    "link set br0 up".into(),
                ];
                for node in nodes {
                    let port = format!("n{}", node.index);
                    lines.push(format!(
                        "link add {port} type veth peer name {UNDERLAY_IF} netns {}",
                        node.ns.name()
                    ));
                    lines.push(format!("link set {port} master br0"));
                    lines.push(format!("link set {port} up"));
                }
                underlay.ip_batch(&lines)?;
            }
            (None, _) => anyhow::bail!("more than two nodes need an underlay namespace"),
        }
        for node in &self.nodes {
            node.ns.ip_batch(&[
                format!("addr add {}/24 dev {UNDERLAY_IF}", node.underlay_v4()),
                format!("addr add {}/64 dev {UNDERLAY_IF} nodad", node.underlay_v6()),
                format!("link set {UNDERLAY_IF} up"),
            ])?;
        }
        Ok(())
    }
}

/// A node: its namespace (bridge, underlay link, later the router) and its pods.
#[derive(Debug)]
pub struct Node {
    index: u8,
    pods: Vec<Pod>,
    ns: Netns,
}

impl Node {
    fn build(index: u8, pods: u8, pod_mtu: Option<u32>) -> anyhow::Result<Node> {
        let ns = Netns::new(&format!("n{index}"))?;
        ns.sysctl(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ])?;
        let pods = (0..pods)
            .map(|j| {
                Ok(Pod {
                    ns: Netns::new(&format!("n{index}p{j}"))?,
                    ipv4: pod_v4(index, j + 2),
                    ipv6: pod_v6(index, j + 2),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let node = Node { index, pods, ns };
        node.wire_pods(pod_mtu)
            .with_context(|| format!("building node {index}"))?;
        Ok(node)
    }

    fn wire_pods(&self, mtu: Option<u32>) -> anyhow::Result<()> {
        let mtu = mtu.map(|mtu| format!(" mtu {mtu}")).unwrap_or_default();
        let mut lines = vec![
            format!("link add {BRIDGE} type bridge mcast_snooping 0"),
            format!("addr add {}/24 dev {BRIDGE}", self.bridge_v4()),
            format!("addr add {}/64 dev {BRIDGE} nodad", self.bridge_v6()),
            format!("link set {BRIDGE} up"),
        ];
        for (j, pod) in self.pods.iter().enumerate() {
            let port = format!("vp{j}");
            lines.push(format!(
                "link add {port} type veth peer name {POD_IF} netns {}",
                pod.ns.name()
            ));
            lines.push(format!("link set {port} master {BRIDGE}"));
            lines.push(format!("link set {port}{mtu} up"));
        }
        self.ns.ip_batch(&lines)?;
        for pod in &self.pods {
            pod.ns.ip_batch(&[
                format!("addr add {}/24 dev {POD_IF}", pod.ipv4),
                format!("addr add {}/64 dev {POD_IF} nodad", pod.ipv6),
                format!("link set {POD_IF}{mtu} up"),
                format!("route add default via {}", self.bridge_v4()),
                format!("route add ::/0 via {}", self.bridge_v6()),
            ])?;
        }
        Ok(())
    }

    /// The node number used in its addresses (1-based).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The node's namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The node's pods.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node's underlay IPv4 address.
    pub fn underlay_v4(&self) -> Ipv4Addr {
        underlay_v4(self.index)
    }

    /// The node's underlay IPv6 address.
    pub fn underlay_v6(&self) -> Ipv6Addr {
        underlay_v6(self.index)
    }

    /// The node's underlay address of the given family.
    pub fn underlay(&self, v6: bool) -> IpAddr {
        if v6 {
            self.underlay_v6().into()
        } else {
            self.underlay_v4().into()
        }
    }

    /// The bridge's IPv4 address (the pods' gateway).
    pub fn bridge_v4(&self) -> Ipv4Addr {
        pod_v4(self.index, 1)
    }

    /// The bridge's IPv6 address.
    pub fn bridge_v6(&self) -> Ipv6Addr {
        pod_v6(self.index, 1)
    }

    /// The node's IPv4 pod CIDR.
    pub fn pod_cidr_v4(&self) -> Ipv4Net {
        pod_cidr_v4(self.index)
    }

    /// The node's IPv6 pod CIDR.
    pub fn pod_cidr_v6(&self) -> Ipv6Net {
        pod_cidr_v6(self.index)
    }

    /// Both pod CIDRs: what a peer router lists as this node's allowed IPs.
    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        vec![self.pod_cidr_v4().into(), self.pod_cidr_v6().into()]
    }
}

/// A pod: a namespace with one interface on its node's bridge.
#[derive(Debug)]
pub struct Pod {
    ns: Netns,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Pod {
    /// The pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The pod's IPv6 address.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The pod's address of the given family.
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(underlay_v4(3).to_string(), "198.18.0.3");
        assert_eq!(underlay_v6(3).to_string(), "fd00:18::3");
        assert_eq!(pod_cidr_v4(2).to_string(), "198.19.2.0/24");
        assert_eq!(pod_cidr_v6(2).to_string(), "fd00:19:2::/64");
        assert_eq!(pod_v4(2, 3).to_string(), "198.19.2.3");
        assert_eq!(pod_v6(2, 3).to_string(), "fd00:19:2::3");
    }

    #[test]
    fn pod_addresses_lie_in_their_node_cidr_and_no_other() {
        for node in [1u8, 2, 254] {
            for host in [1u8, 2, 254] {
                assert!(pod_cidr_v4(node).contains(&pod_v4(node, host)));
                assert!(pod_cidr_v6(node).contains(&pod_v6(node, host)));
                assert!(!pod_cidr_v4(node.wrapping_add(1)).contains(&pod_v4(node, host)));
                assert!(!pod_cidr_v6(node.wrapping_add(1)).contains(&pod_v6(node, host)));
            }
        }
    }

    #[test]
    fn addresses_stay_in_the_benchmarking_and_ula_ranges() {
        let bench: Ipv4Net = "198.18.0.0/15".parse().unwrap();
        let ula: Ipv6Net = "fd00::/8".parse().unwrap();
        assert!(bench.contains(&underlay_v4(254)) && bench.contains(&pod_cidr_v4(254)));
        assert!(ula.contains(&underlay_v6(254)) && ula.contains(&pod_cidr_v6(254)));
    }

    #[test]
    fn invalid_sizes_are_rejected_before_touching_the_system() {
        assert!(TopologyBuilder::new(0).build().is_err());
        assert!(TopologyBuilder::new(255).build().is_err());
        assert!(TopologyBuilder::new(2).pods_per_node(0).build().is_err());
        assert!(TopologyBuilder::new(2).pod_mtu(1279).build().is_err());
    }
}
