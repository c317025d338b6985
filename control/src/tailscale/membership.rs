//! Cluster membership from the tailnet: which peers are cluster nodes (they carry the cluster
//! tag) and which pod CIDRs each may carry (its approved primary routes inside the cluster
//! CIDRs). This is where Tailscale's decisions become ours: nothing else widens them.

use ipnet::IpNet;

use super::{TailnetNode, TailnetView};

/// A tailnet peer that is a cluster node, with the pod CIDRs Tailscale approved for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub node: TailnetNode,
    /// Its primary routes that lie inside a cluster CIDR, in the order tailscaled listed them.
    /// Empty when none is approved (yet, or any more): the node is in the cluster but may
    /// carry no pod traffic.
    pub pod_cidrs: Vec<IpNet>,
}

/// The cluster nodes of a view: the peers tagged `tag` (whether online or not: `Online` is
/// about the control server, not our data plane), each with its `PrimaryRoutes` inside
/// `cluster_cidrs`. Only primary routes count: a route that is merely advertised, not
/// approved, never reaches the status document's `PrimaryRoutes`, and the advertised list is
/// not read at all. This node itself is not among them.
pub fn cluster_nodes(view: &TailnetView, tag: &str, cluster_cidrs: &[IpNet]) -> Vec<ClusterNode> {
    view.peers
        .iter()
        .filter(|peer| peer.has_tag(tag))
        .map(|peer| ClusterNode {
            node: peer.clone(),
            pod_cidrs: pod_cidrs(peer, cluster_cidrs),
        })
        .collect()
}

/// The node's primary routes that a cluster CIDR contains (wholly: a route that only
/// overlaps, like a /8 around a /16 cluster, is refused).
pub fn pod_cidrs(node: &TailnetNode, cluster_cidrs: &[IpNet]) -> Vec<IpNet> {
    node.primary_routes
        .iter()
        .filter(|route| cluster_cidrs.iter().any(|cidr| cidr.contains(*route)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailscale::documents::parse_status;

    const FIXTURE: &str = include_str!("fixtures/localapi-status-v1.102.json");

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn node(id: &str, tags: &[&str], routes: &[&str]) -> TailnetNode {
        TailnetNode {
            stable_id: id.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            primary_routes: routes.iter().map(|r| net(r)).collect(),
            ..TailnetNode::default()
        }
    }

    fn view(peers: Vec<TailnetNode>) -> TailnetView {
        TailnetView {
            backend_state: "Running".into(),
            self_node: node("self", &["tag:k8s-node"], &["10.100.0.0/24"]),
            peers,
        }
    }

    #[test]
    fn the_fixture_has_two_cluster_nodes_with_their_pod_cidrs() {
        let view = parse_status(FIXTURE.as_bytes()).unwrap();
        let nodes = cluster_nodes(&view, "tag:k8s-node", &[net("10.100.0.0/16")]);
        let got: Vec<(&str, Vec<IpNet>, bool)> = nodes
            .iter()
            .map(|n| {
                (
                    n.node.host_name.as_str(),
                    n.pod_cidrs.clone(),
                    n.node.online,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("k8s-node-1", vec![net("10.100.1.0/24")], true),
                // Offline (to the control server) is still a cluster node.
                ("k8s-node-2", vec![net("10.100.2.0/24")], false),
            ]
        );
    }

    #[test]
    fn only_peers_with_the_tag_are_cluster_nodes() {
        let v = view(vec![
            node("a", &["tag:k8s-node"], &["10.100.1.0/24"]),
            node("b", &["tag:other"], &["10.100.2.0/24"]),
            node("c", &[], &["10.100.3.0/24"]),
            node("d", &["tag:k8s-node-x", "tag:k8s"], &["10.100.4.0/24"]),
            node("e", &["tag:other", "tag:k8s-node"], &["10.100.5.0/24"]),
        ]);
        let ids: Vec<String> = cluster_nodes(&v, "tag:k8s-node", &[net("10.100.0.0/16")])
            .into_iter()
            .map(|n| n.node.stable_id)
            .collect();
        assert_eq!(ids, ["a", "e"]);
        assert!(cluster_nodes(&v, "", &[net("10.100.0.0/16")]).is_empty());
    }

    #[test]
    fn pod_cidrs_are_primary_routes_inside_the_cluster_cidrs() {
        let v = view(vec![node(
            "a",
            &["tag:k8s-node"],
            &[
                "10.100.1.0/24",
                "10.0.0.0/8",    // wider than the cluster: refused
                "10.101.0.0/24", // outside
                "0.0.0.0/0",     // an exit route
                "fd00:100:0:1::/64",
                "fd00:200::/64",
                "10.100.0.0/16", // the whole cluster CIDR is inside it
            ],
        )]);
        let cluster = [net("10.100.0.0/16"), net("fd00:100::/48")];
        let nodes = cluster_nodes(&v, "tag:k8s-node", &cluster);
        assert_eq!(
            nodes[0].pod_cidrs,
            [
                net("10.100.1.0/24"),
                net("fd00:100:0:1::/64"),
                net("10.100.0.0/16")
            ]
        );
        // No cluster CIDRs: no pod CIDRs at all.
        assert!(cluster_nodes(&v, "tag:k8s-node", &[])[0]
            .pod_cidrs
            .is_empty());
    }

    #[test]
    fn a_tagged_peer_without_approved_routes_has_no_pod_cidrs() {
        let v = view(vec![node("a", &["tag:k8s-node"], &[])]);
        let nodes = cluster_nodes(&v, "tag:k8s-node", &[net("10.100.0.0/16")]);
        assert_eq!(nodes.len(), 1);
        assert!(nodes[0].pod_cidrs.is_empty());
    }

    #[test]
    fn advertised_but_unapproved_routes_never_count() {
        // A whois Node carries advertised routes in Hostinfo.RoutableIPs; only PrimaryRoutes
        // reach the TailnetNode.
        let whois = br#"{"Node":{"StableID":"nX","Tags":["tag:k8s-node"],
            "PrimaryRoutes":["10.100.1.0/24"],
            "Hostinfo":{"RoutableIPs":["10.100.1.0/24","10.100.9.0/24"]}}}"#;
        let n = crate::tailscale::documents::parse_whois(whois)
            .unwrap()
            .unwrap();
        let v = view(vec![n]);
        let nodes = cluster_nodes(&v, "tag:k8s-node", &[net("10.100.0.0/16")]);
        assert_eq!(nodes[0].pod_cidrs, [net("10.100.1.0/24")]);
    }
}
