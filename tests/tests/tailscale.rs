//! End-to-end: peers from Tailscale. Three nodes, each with dual-stack pods on a bridge, an
//! underlay through a switch namespace, and an emulated tailnet — `tailscale0` in every node
//! with its 100.64.0.0/10 and fd7a:115c:a1e0::/48 addresses, on a separate link through a
//! second switch namespace — and per node a test LocalAPI server (tailnet-sim, real document
//! shapes) over one simulated tailnet. Each router has no static peer: it learns its peers
//! from the LocalAPI (tag, approved routes) and their keys from their announcements, fetched
//! over the emulated tailnet.
//!
//! Checked: discovery → every pod pings every other pod across nodes (IPv4 and IPv6);
//! withdrawing one node's route makes its pods unreachable within `resync` + 5 s while the
//! other nodes keep their session (no new handshake); approving it again restores it;
//! removing the tag removes the peer; stopping a LocalAPI server leaves traffic flowing.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tailsk8s_e2e::{
    ping, ping_with_deadline, require_netns, tailsk8s_binary, ConfigRouter, KeyPair, Netns,
    ShowDump, Topology, TopologyBuilder, WgDump,
};
use tailsk8s_tailnet_sim::{LocalApiServer, SimNode, Tailnet};

/// The routers re-read the LocalAPI this often.
const RESYNC: Duration = Duration::from_secs(2);
/// How long discovery may take: routers start one after another and fetch with backoff.
const DISCOVERY: Duration = Duration::from_secs(30);
/// The emulated tailscale0 in every node.
const TAILNET_IF: &str = "tailscale0";
const TAG: &str = "tag:k8s-node";

/// Node `i`'s simulated tailnet identity (addresses 100.101.i.(10+i), fd7a:115c:a1e0::6f01:i).
fn sim_node(topology: &Topology, i: usize) -> SimNode {
    let node = &topology.nodes()[i];
    SimNode::numbered(node.index()).with_approved_routes(&node.pod_cidrs())
}

/// The emulated tailnet: a bridge in its own namespace, `tailscale0` in every node with the
/// node's tailnet addresses. Returned namespace owns the bridge (deleted on drop).
fn build_tailnet_link(topology: &Topology, sims: &[SimNode]) -> anyhow::Result<Netns> {
    let switch = Netns::new("ts")?;
    let mut lines = vec![
        "link add br0 type bridge mcast_snooping 0".to_string(),
        "link set br0 up".into(),
    ];
    for node in topology.nodes() {
        let port = format!("t{}", node.index());
        lines.push(format!(
            "link add {port} type veth peer name {TAILNET_IF} netns {}",
            node.netns().name()
        ));
        lines.push(format!("link set {port} master br0"));
        lines.push(format!("link set {port} up"));
    }
    switch.ip_batch(&lines)?;
    for (node, sim) in topology.nodes().iter().zip(sims) {
        let mut lines = vec![format!("link set {TAILNET_IF} mtu 1280 up")];
        for ip in &sim.tailnet_ips {
            lines.push(match ip {
                IpAddr::V4(_) => format!("addr add {ip}/10 dev {TAILNET_IF}"),
                IpAddr::V6(_) => format!("addr add {ip}/48 dev {TAILNET_IF} nodad"),
            });
        }
        node.netns().ip_batch(&lines)?;
    }
    Ok(switch)
}

fn config_text(router: &ConfigRouter<'_>, topology: &Topology, i: usize, socket: &Path) -> String {
    let pods: Vec<String> = topology.nodes()[i]
        .pod_cidrs()
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    format!(
        "interface = \"{ifname}\"\n\
         private_key_file = \"{key}\"\n\
         listen_port = 51820\n\
         pod_cidrs = [{pods}]\n\
         cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/32\"]\n\
         \n\
         [tailscale]\n\
         socket = \"{socket}\"\n\
         tag = \"{TAG}\"\n\
         announce_port = 51821\n\
         resync = \"{resync}s\"\n",
        ifname = router.ifname(),
        key = router.key_path().display(),
        pods = pods.join(", "),
        socket = socket.display(),
        resync = RESYNC.as_secs(),
    )
}

/// Polls `check` until it returns `Some` or `deadline` passes.
fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The peer keys a router has, with their allowed IPs.
fn peer_set(dump: &WgDump) -> Vec<(String, Vec<IpNet>)> {
    let mut peers: Vec<(String, Vec<IpNet>)> = dump
        .peers
        .iter()
        .map(|p| {
            let mut ips = p.allowed_ips.clone();
            ips.sort();
            (p.public_key.clone(), ips)
        })
        .collect();
    peers.sort();
    peers
}

/// What router `i` should have: every other listed node, with its pod CIDRs.
fn expected_peers(
    topology: &Topology,
    keys: &[KeyPair],
    of: usize,
    others: &[usize],
) -> Vec<(String, Vec<IpNet>)> {
    let mut peers: Vec<(String, Vec<IpNet>)> = others
        .iter()
        .filter(|&&j| j != of)
        .map(|&j| {
            let mut ips = topology.nodes()[j].pod_cidrs();
            ips.sort();
            (keys[j].public().to_string(), ips)
        })
        .collect();
    peers.sort();
    peers
}

fn wait_for_peers(
    routers: &[ConfigRouter<'_>],
    topology: &Topology,
    keys: &[KeyPair],
    members: &[usize],
    of: &[usize],
    deadline: Duration,
) {
    for &i in of {
        let expected = expected_peers(topology, keys, i, members);
        wait_for(
            &format!("router {} to have peers {members:?}", i + 1),
            deadline,
            || {
                let dump = routers[i].dump().ok()?;
                (peer_set(&dump) == expected).then_some(())
            },
        );
    }
}

/// Every pod of nodes `from` pings every pod of the other nodes in `to` (IPv4 and IPv6).
fn all_pods_ping(topology: &Topology, from: &[usize], to: &[usize]) {
    for &a in from {
        for &b in to.iter().filter(|&&b| b != a) {
            for src in topology.nodes()[a].pods() {
                for dst in topology.nodes()[b].pods() {
                    for v6 in [false, true] {
                        ping(src.netns(), dst.ip(v6), 1).unwrap();
                    }
                }
            }
        }
    }
}

fn handshake_of(router: &ConfigRouter<'_>, key: &str) -> Option<u64> {
    router.dump().ok()?.peer(key)?.latest_handshake
}

#[test]
fn peers_come_and_go_with_tailscale_membership_and_approval() {
    if !require_netns() {
        return;
    }
    let binary = tailsk8s_binary().unwrap();
    let topology = TopologyBuilder::new(3).build().unwrap();
    let sims: Vec<SimNode> = (0..3).map(|i| sim_node(&topology, i)).collect();
    let _tailnet_link = build_tailnet_link(&topology, &sims).unwrap();
    let tailnet = Tailnet::new();
    for sim in &sims {
        tailnet.add(sim.clone());
    }

    let keys: Vec<KeyPair> = (0..3)
        .map(|_| KeyPair::generate(&binary).unwrap())
        .collect();
    let mut routers = Vec::new();
    let mut localapis = Vec::new();
    for (i, node) in topology.nodes().iter().enumerate() {
        let mut router = ConfigRouter::new(node.netns()).unwrap();
        router.write_private_key(&keys[i]).unwrap();
        let socket = router.dir().join("tailscaled.sock");
        localapis.push(LocalApiServer::start(&tailnet, &sims[i].stable_id, &socket).unwrap());
        router
            .write_config_text(&config_text(&router, &topology, i, &socket))
            .unwrap();
        routers.push(router);
    }
    for router in &mut routers {
        router.start().unwrap();
    }

    // Discovery: every router has the two others, with exactly their approved pod CIDRs.
    let all = [0, 1, 2];
    wait_for_peers(&routers, &topology, &keys, &all, &all, DISCOVERY);
    all_pods_ping(&topology, &all, &all);
    // The direct endpoint is the announced underlay address.
    let dump = routers[0].dump().unwrap();
    let endpoint = dump.peer(keys[1].public()).unwrap().endpoint.unwrap();
    assert_eq!(
        endpoint.ip(),
        IpAddr::from(topology.nodes()[1].underlay_v4())
    );

    // Withdraw node 3's routes: its pods become unreachable within resync + 5 s, while
    // nodes 1 and 2 keep their session (no new handshake).
    let hs_12 = handshake_of(&routers[0], keys[1].public()).expect("1↔2 handshake");
    let hs_21 = handshake_of(&routers[1], keys[0].public()).expect("2↔1 handshake");
    let withdrawn = Instant::now();
    tailnet
        .update(&sims[2].stable_id, |n| n.enabled_routes.clear())
        .unwrap();
    wait_for_peers(
        &routers,
        &topology,
        &keys,
        &[0, 1],
        &[0, 1],
        RESYNC + Duration::from_secs(5),
    );
    let took = withdrawn.elapsed();
    assert!(
        took <= RESYNC + Duration::from_secs(5),
        "withdrawal took {took:?}"
    );
    let pod3 = topology.nodes()[2].pods()[0].ip(false);
    assert!(
        ping_with_deadline(
            topology.nodes()[0].pods()[0].netns(),
            pod3,
            1,
            Duration::from_secs(2)
        )
        .is_err(),
        "node 3's pod is still reachable after its route was withdrawn"
    );
    all_pods_ping(&topology, &[0, 1], &[0, 1]);
    assert_eq!(handshake_of(&routers[0], keys[1].public()), Some(hs_12));
    assert_eq!(handshake_of(&routers[1], keys[0].public()), Some(hs_21));

    // Approve it again: back within resync + 5 s.
    let node3_routes = topology.nodes()[2].pod_cidrs();
    tailnet
        .update(&sims[2].stable_id, |n| {
            n.enabled_routes = node3_routes.clone()
        })
        .unwrap();
    wait_for_peers(
        &routers,
        &topology,
        &keys,
        &all,
        &all,
        RESYNC + Duration::from_secs(5),
    );
    all_pods_ping(&topology, &all, &[2]);

    // Remove node 2's tag: it is no cluster node any more, the others drop it.
    tailnet
        .update(&sims[1].stable_id, |n| n.tags.clear())
        .unwrap();
    wait_for_peers(
        &routers,
        &topology,
        &keys,
        &[0, 2],
        &[0, 2],
        RESYNC + Duration::from_secs(5),
    );
    let pod2 = topology.nodes()[1].pods()[0].ip(true);
    assert!(ping_with_deadline(
        topology.nodes()[0].pods()[0].netns(),
        pod2,
        1,
        Duration::from_secs(2)
    )
    .is_err());

    // Stop node 1's LocalAPI: it keeps its peers and traffic flows through resyncs.
    localapis[0].stop();
    let before = peer_set(&routers[0].dump().unwrap());
    let hs_13 = handshake_of(&routers[0], keys[2].public());
    // Long enough for two resyncs to find the LocalAPI gone.
    std::thread::sleep(RESYNC * 2 + Duration::from_millis(500));
    assert_eq!(peer_set(&routers[0].dump().unwrap()), before);
    all_pods_ping(&topology, &[0, 2], &[0, 2]);
    assert_eq!(handshake_of(&routers[0], keys[2].public()), hs_13);
    let log = routers[0].daemon_mut().map(|d| d.log()).unwrap_or_default();
    assert_eq!(
        log.matches("peer source stale").count(),
        1,
        "one line per state change, not per retry:\n{log}"
    );
}
