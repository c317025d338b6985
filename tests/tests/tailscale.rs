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
//! removing the tag removes the peer; stopping a LocalAPI server leaves traffic flowing; a
//! config reload beside a running source adds and removes static peers without a new
//! handshake of the Tailscale peers; SIGTERM, with the LocalAPI answering or hung mid-request,
//! exits within 2 s and leaves no route, rule, NAT table or TUN behind. Bad input: a
//! LocalAPI answering garbage or an error keeps peers, routes and sessions and shows the source
//! stale until it answers again; pod CIDRs Tailscale did not approve are not routed; a tailnet
//! node announcing another node's key changes nothing; the announcement port refuses the
//! underlay and answers 403 to tailnet addresses that are not tagged cluster nodes.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tailsk8s_e2e::config_router::{
    link_exists, nat_table, rules_for_table, table_routes, PeerSpec, ROUTE_TABLE,
};
use tailsk8s_e2e::process::Daemon;
use tailsk8s_e2e::tailnet_link::{self, fleet_ip, Announced, Fleet, TAILNET_IF};
use tailsk8s_e2e::{
    ping, ping_with_deadline, require_netns, tailsk8s_binary, tcp_transfer, ConfigRouter, KeyPair,
    Netns, ShowDump, Topology, TopologyBuilder, WgDump,
};
use tailsk8s_tailnet_sim::{Behaviour, LocalApiServer, SimNode, Tailnet};

/// The routers re-read the LocalAPI this often.
const RESYNC: Duration = Duration::from_secs(2);
/// How long discovery may take: routers start one after another and fetch with backoff.
const DISCOVERY: Duration = Duration::from_secs(30);
const TAG: &str = "tag:k8s-node";
/// What the issue allows a router told to stop.
const EXIT_BUDGET: Duration = Duration::from_secs(2);

/// Node `i`'s simulated tailnet identity (addresses 100.101.i.(10+i), fd7a:115c:a1e0::6f01:i).
fn sim_node(topology: &Topology, i: usize) -> SimNode {
    let node = &topology.nodes()[i];
    SimNode::numbered(node.index()).with_approved_routes(&node.pod_cidrs())
}

/// Router `i`'s config file: its pod CIDRs, the cluster, `[tailscale]` on `socket`, and then
/// `statics` as `[[peer]]`s.
fn config_text(
    router: &ConfigRouter<'_>,
    topology: &Topology,
    i: usize,
    socket: &Path,
    statics: &[PeerSpec],
) -> String {
    let mut text = tailnet_link::router_config(
        router,
        &topology.nodes()[i].pod_cidrs(),
        socket,
        TAG,
        RESYNC,
    );
    text.extend(statics.iter().map(PeerSpec::to_toml));
    text
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
        // The routes follow the device's peers (the applier updates the device, then the
        // node's table): until they are in, a pod's packet gets "no route" from its node.
        let mut routes: Vec<IpNet> = expected.iter().flat_map(|(_, ips)| ips.clone()).collect();
        routes.sort();
        wait_for_routes(topology, &routers[i], i, &routes, deadline);
    }
}

/// Waits for router `i`'s node to route exactly `routes` (sorted) to its TUN. The routes
/// follow the device's peers, so a dump that shows a peer does not yet mean its routes are in.
fn wait_for_routes(
    topology: &Topology,
    router: &ConfigRouter<'_>,
    i: usize,
    routes: &[IpNet],
    deadline: Duration,
) {
    wait_for(
        &format!("router {}'s node to route {routes:?}", i + 1),
        deadline,
        || (routed(topology, router, i) == routes).then_some(()),
    );
}

/// The prefixes router `i`'s node routes to its TUN from the router's table.
fn routed(topology: &Topology, router: &ConfigRouter<'_>, i: usize) -> Vec<IpNet> {
    let mut prefixes: Vec<IpNet> = table_routes(topology.nodes()[i].netns(), ROUTE_TABLE)
        .unwrap()
        .into_iter()
        .filter(|r| r.device.as_deref() == Some(router.ifname()))
        .map(|r| r.prefix)
        .collect();
    prefixes.sort();
    prefixes
}

/// The pod CIDRs of nodes `of`, sorted.
fn pod_cidrs_of(topology: &Topology, of: &[usize]) -> Vec<IpNet> {
    let mut prefixes: Vec<IpNet> = of
        .iter()
        .flat_map(|&j| topology.nodes()[j].pod_cidrs())
        .collect();
    prefixes.sort();
    prefixes
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

/// A cluster on the emulated tailnet: the topology, its tailnet link, the simulated tailnet
/// with every node a member (tagged, its pod CIDRs approved), and a key per node.
struct TailnetCluster {
    /// First, so it goes before the nodes (fields drop in order).
    link: Netns,
    topology: Topology,
    sims: Vec<SimNode>,
    tailnet: Tailnet,
    keys: Vec<KeyPair>,
}

impl TailnetCluster {
    /// The cluster of a test, or `None` when this machine cannot build namespaces (the test
    /// skips, see [`require_netns`]).
    fn for_test(nodes: u8) -> Option<TailnetCluster> {
        require_netns().then(|| TailnetCluster::new(nodes))
    }

    /// The namespace holding the tailnet link's bridge.
    fn link(&self) -> &Netns {
        &self.link
    }

    /// The topology, the simulated nodes, the tailnet and the keys.
    fn parts(&self) -> (&Topology, &[SimNode], &Tailnet, &[KeyPair]) {
        (&self.topology, &self.sims, &self.tailnet, &self.keys)
    }

    fn new(nodes: u8) -> TailnetCluster {
        let binary = tailsk8s_binary().unwrap();
        let topology = TopologyBuilder::new(nodes).build().unwrap();
        let sims: Vec<SimNode> = (0..topology.nodes().len())
            .map(|i| sim_node(&topology, i))
            .collect();
        let ips: Vec<_> = sims.iter().map(|s| s.tailnet_ips.clone()).collect();
        let link = tailnet_link::build(&topology, &ips).unwrap();
        let tailnet = Tailnet::new();
        for sim in &sims {
            tailnet.add(sim.clone());
        }
        let keys = (0..nodes)
            .map(|_| KeyPair::generate(&binary).unwrap())
            .collect();
        TailnetCluster {
            link,
            topology,
            sims,
            tailnet,
            keys,
        }
    }

    /// Node `i`'s router (not started) with its key and its config file (`[tailscale]` and
    /// `statics`), and its LocalAPI stand-in, serving.
    fn tailscale_router(
        &self,
        i: usize,
        statics: &[PeerSpec],
    ) -> (ConfigRouter<'_>, LocalApiServer) {
        let mut router = ConfigRouter::new(self.topology.nodes()[i].netns()).unwrap();
        router.write_private_key(&self.keys[i]).unwrap();
        let socket = router.dir().join("tailscaled.sock");
        let localapi =
            LocalApiServer::start(&self.tailnet, &self.sims[i].stable_id, &socket).unwrap();
        router
            .write_config_text(&config_text(&router, &self.topology, i, &socket, statics))
            .unwrap();
        (router, localapi)
    }

    /// A router per node, each with its LocalAPI stand-in and no static peer, started in
    /// order.
    fn start_routers(&self) -> (Vec<ConfigRouter<'_>>, Vec<LocalApiServer>) {
        let (mut routers, localapis): (Vec<_>, Vec<_>) = (0..self.topology.nodes().len())
            .map(|i| self.tailscale_router(i, &[]))
            .unzip();
        for router in &mut routers {
            router.start().unwrap();
        }
        (routers, localapis)
    }

    /// Node `i` as a static peer: its key, its underlay endpoint, its pod CIDRs.
    fn static_peer(&self, i: usize) -> PeerSpec {
        let node = &self.topology.nodes()[i];
        PeerSpec {
            public_key: self.keys[i].public().to_string(),
            endpoint: Some(SocketAddr::new(node.underlay_v4().into(), 51820)),
            allowed_ips: node.pod_cidrs(),
            persistent_keepalive: None,
        }
    }
}

/// Drops everything between underlay ports `a` and `b` in the underlay switch, silently
/// (nftables bridge family on the switch: the nodes see no error, as in a real outage).
fn partition(topology: &Topology, a: u8, b: u8) {
    let switch = topology.underlay().expect("an underlay switch");
    let script = format!(
        "add table bridge partition\n\
         add chain bridge partition forward {{ type filter hook forward priority 0; }}\n\
         add rule bridge partition forward iifname \"n{a}\" oifname \"n{b}\" drop\n\
         add rule bridge partition forward iifname \"n{b}\" oifname \"n{a}\" drop\n"
    );
    let path = tailsk8s_e2e::names::scratch_file("partition", "nft").unwrap();
    std::fs::write(&path, script).unwrap();
    let result = switch.exec("nft", &[std::ffi::OsStr::new("-f"), path.as_os_str()]);
    let _ = std::fs::remove_file(&path);
    result.unwrap();
}

/// Removes the partition.
fn heal(topology: &Topology) {
    let switch = topology.underlay().expect("an underlay switch");
    switch
        .exec("nft", &["delete", "table", "bridge", "partition"])
        .unwrap();
}

fn endpoint_of(router: &ConfigRouter<'_>, key: &str) -> Option<SocketAddr> {
    router.dump().ok()?.peer(key)?.endpoint
}

/// How often the router probes the direct path of a peer on the tailnet path (its
/// `path::PROBE_EVERY`).
const PATH_PROBE: Duration = Duration::from_secs(20);

#[test]
fn a_silent_underlay_partition_moves_the_pair_to_the_tailnet_path_and_back() {
    let Some(cluster) = TailnetCluster::for_test(3) else {
        return;
    };
    let (topology, sims, _, keys) = cluster.parts();
    let (routers, _localapis) = cluster.start_routers();
    let all = [0, 1, 2];
    wait_for_peers(&routers, topology, keys, &all, &all, DISCOVERY);
    all_pods_ping(topology, &[0], &[1, 2]);
    let direct2 = SocketAddr::new(topology.nodes()[1].underlay_v4().into(), 51820);
    let tailnet2 = SocketAddr::new(sims[1].tailnet_ips[0], 51820);
    let tailnet1 = SocketAddr::new(sims[0].tailnet_ips[0], 51820);
    assert_eq!(endpoint_of(&routers[0], keys[1].public()), Some(direct2));

    // Cut the underlay between nodes 1 and 2: both move to the tailnet path within 15 s.
    let cut = Instant::now();
    partition(topology, 1, 2);
    let pod1 = &topology.nodes()[0].pods()[0];
    let pod2 = &topology.nodes()[1].pods()[0];
    wait_for(
        "pod traffic between nodes 1 and 2 again",
        Duration::from_secs(25),
        || ping_with_deadline(pod1.netns(), pod2.ip(false), 1, Duration::from_secs(1)).ok(),
    );
    let moved = cut.elapsed();
    eprintln!("pod traffic flows again {moved:?} after the cut");
    assert_eq!(endpoint_of(&routers[0], keys[1].public()), Some(tailnet2));
    assert_eq!(endpoint_of(&routers[1], keys[0].public()), Some(tailnet1));
    assert!(moved <= Duration::from_secs(15), "the move took {moved:?}");
    all_pods_ping(topology, &[0, 1], &[0, 1]);
    // Full-size packets over tailscale0's 1280-byte MTU: outer datagrams are fragmented.
    let report = tcp_transfer(pod1.netns(), pod2.netns(), pod2.ip(false), 4 << 20).unwrap();
    report.verify(pod1.ip(false)).unwrap();
    let report = tcp_transfer(pod2.netns(), pod1.netns(), pod1.ip(true), 4 << 20).unwrap();
    report.verify(pod2.ip(true)).unwrap();
    // Node 3 is still reached directly.
    let direct3 = SocketAddr::new(topology.nodes()[2].underlay_v4().into(), 51820);
    assert_eq!(endpoint_of(&routers[0], keys[2].public()), Some(direct3));

    // Heal: back on the direct path at the next probe.
    heal(topology);
    wait_for(
        "node 1 to use node 2's direct endpoint again",
        PATH_PROBE + Duration::from_secs(10),
        || (endpoint_of(&routers[0], keys[1].public()) == Some(direct2)).then_some(()),
    );
    all_pods_ping(topology, &[0, 1], &[0, 1]);
}

#[test]
fn peers_come_and_go_with_tailscale_membership_and_approval() {
    let Some(cluster) = TailnetCluster::for_test(3) else {
        return;
    };
    let (topology, sims, tailnet, keys) = cluster.parts();
    let (mut routers, mut localapis) = cluster.start_routers();

    // Discovery: every router has the two others, with exactly their approved pod CIDRs.
    let all = [0, 1, 2];
    wait_for_peers(&routers, topology, keys, &all, &all, DISCOVERY);
    all_pods_ping(topology, &all, &all);
    assert_eq!(
        routed(topology, &routers[0], 0),
        pod_cidrs_of(topology, &[1, 2])
    );
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
        topology,
        keys,
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
    all_pods_ping(topology, &[0, 1], &[0, 1]);
    // Its routes went with it; the others' stayed.
    assert_eq!(
        routed(topology, &routers[0], 0),
        pod_cidrs_of(topology, &[1])
    );
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
        topology,
        keys,
        &all,
        &all,
        RESYNC + Duration::from_secs(5),
    );
    all_pods_ping(topology, &all, &[2]);

    // Remove node 2's tag: it is no cluster node any more, the others drop it.
    tailnet
        .update(&sims[1].stable_id, |n| n.tags.clear())
        .unwrap();
    wait_for_peers(
        &routers,
        topology,
        keys,
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
    all_pods_ping(topology, &[0, 2], &[0, 2]);
    assert_eq!(handshake_of(&routers[0], keys[2].public()), hs_13);
    let log = routers[0].daemon_mut().map(|d| d.log()).unwrap_or_default();
    assert_eq!(
        log.matches("peer source stale").count(),
        1,
        "one line per state change, not per retry:\n{log}"
    );

    // On exit every route and rule of the router is gone.
    routers[0].stop();
    assert!(routed(topology, &routers[0], 0).is_empty());
    assert!(rules_for_table(topology.nodes()[0].netns(), ROUTE_TABLE)
        .unwrap()
        .is_empty());
}

/// `peers`, each with its allowed IPs sorted, sorted (as [`peer_set`] reads them back).
fn sorted(mut peers: Vec<(String, Vec<IpNet>)>) -> Vec<(String, Vec<IpNet>)> {
    for (_, ips) in &mut peers {
        ips.sort();
    }
    peers.sort();
    peers
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// How many `/status` reads `localapi` has had.
fn status_reads(localapi: &LocalApiServer) -> usize {
    localapi
        .requests()
        .iter()
        .filter(|r| r.target.starts_with("/localapi/v0/status"))
        .count()
}

#[test]
fn a_reload_beside_a_tailscale_source_changes_the_static_peers_only() {
    let Some(cluster) = TailnetCluster::for_test(3) else {
        return;
    };
    let (topology, sims, tailnet, keys) = cluster.parts();
    // Node 3 is no tailnet node: it can only be a static peer of node 1.
    assert!(tailnet.remove(&sims[2].stable_id));
    // A static peer that goes with the reload (nothing answers for it).
    let gone = PeerSpec {
        public_key: KeyPair::generate(&tailsk8s_binary().unwrap())
            .unwrap()
            .public()
            .to_string(),
        endpoint: Some("198.18.0.250:51820".parse().unwrap()),
        allowed_ips: vec![
            "198.19.250.0/24".parse().unwrap(),
            "fd00:19:fa::/64".parse().unwrap(),
        ],
        persistent_keepalive: None,
    };
    let (mut router1, localapi1) = cluster.tailscale_router(0, std::slice::from_ref(&gone));
    let (mut router2, _localapi2) = cluster.tailscale_router(1, &[]);
    // Node 3's router: static, with node 1 as its one peer.
    let mut router3 = ConfigRouter::new(topology.nodes()[2].netns()).unwrap();
    router3.write_private_key(&keys[2]).unwrap();
    let mut config3 = router3.config();
    config3.peers.push(cluster.static_peer(0));
    router3.write_config(&config3).unwrap();
    for router in [&mut router1, &mut router2, &mut router3] {
        router.start().unwrap();
    }

    let tailscale_peer = expected_peers(topology, keys, 0, &[1]);
    let mut before = tailscale_peer.clone();
    before.push((gone.public_key.clone(), gone.allowed_ips.clone()));
    let before = sorted(before);
    wait_for("node 1's Tailscale and static peers", DISCOVERY, || {
        (peer_set(&router1.dump().ok()?) == before).then_some(())
    });
    wait_for("node 2's Tailscale peer", DISCOVERY, || {
        (peer_set(&router2.dump().ok()?) == expected_peers(topology, keys, 1, &[0])).then_some(())
    });
    all_pods_ping(topology, &[0, 1], &[0, 1]);
    let mut gone_routes = gone.allowed_ips.clone();
    gone_routes.extend(pod_cidrs_of(topology, &[1]));
    gone_routes.sort();
    wait_for_routes(topology, &router1, 0, &gone_routes, DISCOVERY);
    let hs_12 = handshake_of(&router1, keys[1].public()).expect("1↔2 handshake");
    let hs_21 = handshake_of(&router2, keys[0].public()).expect("2↔1 handshake");
    let tx_12 = router1
        .dump()
        .unwrap()
        .peer(keys[1].public())
        .unwrap()
        .tx_bytes;
    // Handshake times have a resolution of a second: let one pass so a new one would show.
    wait_for("a second", Duration::from_secs(3), || {
        (unix_now() > hs_12.max(hs_21)).then_some(())
    });

    // The reload: `gone` goes, node 3 comes; the source runs on.
    router1
        .write_config_text(&config_text(
            &router1,
            topology,
            0,
            localapi1.socket(),
            &[cluster.static_peer(2)],
        ))
        .unwrap();
    router1.signal(libc::SIGHUP).unwrap();
    let mut after = tailscale_peer.clone();
    after.push((
        keys[2].public().to_string(),
        topology.nodes()[2].pod_cidrs(),
    ));
    let after = sorted(after);
    wait_for(
        "the reload's peers on node 1",
        Duration::from_secs(10),
        || (peer_set(&router1.dump().ok()?) == after).then_some(()),
    );
    // The removed static peer's routes went with it, the new one's came.
    wait_for_routes(
        topology,
        &router1,
        0,
        &pod_cidrs_of(topology, &[1, 2]),
        Duration::from_secs(10),
    );
    all_pods_ping(topology, &[0], &[2]);
    all_pods_ping(topology, &[2], &[0]);
    all_pods_ping(topology, &[0, 1], &[0, 1]);
    // The Tailscale peer kept its session on both sides: no new handshake, no reset counter.
    assert_eq!(handshake_of(&router1, keys[1].public()), Some(hs_12));
    assert_eq!(handshake_of(&router2, keys[0].public()), Some(hs_21));
    let peer2 = router1.dump().unwrap();
    assert!(peer2.peer(keys[1].public()).unwrap().tx_bytes > tx_12);

    // Two more syncs of the source (the second starts after the first has applied): the
    // reloaded static peers stay.
    let reads = status_reads(&localapi1);
    wait_for("two more syncs", RESYNC * 3, || {
        (status_reads(&localapi1) >= reads + 2).then_some(())
    });
    assert_eq!(peer_set(&router1.dump().unwrap()), after);
    assert_eq!(handshake_of(&router1, keys[1].public()), Some(hs_12));
    let log = router1.daemon_mut().map(|d| d.log()).unwrap_or_default();
    assert!(log.contains("reloaded"), "{log}");
    assert!(!log.contains("refused the new"), "{log}");
}

/// SIGTERM to `router` on node `i`: exit 0 within [`EXIT_BUDGET`], and nothing of it left
/// on the node: no route in its table, no rule, no masquerade table, no TUN. Returns the
/// time from the signal to the exit.
fn stop_and_check_nothing_left(
    topology: &Topology,
    router: &mut ConfigRouter<'_>,
    i: usize,
    what: &str,
) -> Duration {
    let ns = topology.nodes()[i].netns();
    assert!(nat_table(ns).unwrap().is_some(), "{what}: no NAT table");
    let signalled = Instant::now();
    router.signal(libc::SIGTERM).unwrap();
    let status = router.wait_exit(Duration::from_secs(10)).unwrap();
    let took = signalled.elapsed();
    let log = router.daemon_mut().map(|d| d.log()).unwrap_or_default();
    eprintln!("{what}: exited {took:?} after SIGTERM");
    assert!(status.success(), "{what}: {status}\n{log}");
    assert!(took < EXIT_BUDGET, "{what}: exit took {took:?}\n{log}");
    let routes = table_routes(ns, ROUTE_TABLE).unwrap();
    assert!(routes.is_empty(), "{what}: routes left: {routes:?}");
    let rules = rules_for_table(ns, ROUTE_TABLE).unwrap();
    assert!(rules.is_empty(), "{what}: rules left: {rules:?}");
    assert_eq!(nat_table(ns).unwrap(), None, "{what}");
    assert!(
        !link_exists(ns, router.ifname()).unwrap(),
        "{what}: TUN left"
    );
    took
}

/// Where router 2 of the SIGTERM test serves `/metrics` (inside its node's namespace).
const METRICS_PORT: u16 = 9586;

#[test]
fn sigterm_with_a_tailscale_source_exits_in_time_even_while_tailscaled_hangs() {
    let Some(cluster) = TailnetCluster::for_test(2) else {
        return;
    };
    let (topology, _, _, keys) = cluster.parts();
    let (router1, _localapi1) = cluster.tailscale_router(0, &[]);
    let (router2, mut localapi) = cluster.tailscale_router(1, &[]);
    // Router 2 also serves /metrics, to a client that never finishes its request.
    let text = std::fs::read_to_string(router2.config_path()).unwrap();
    router2
        .write_config_text(&format!(
            "{text}\n[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n"
        ))
        .unwrap();
    let mut routers = vec![router1, router2];
    for router in &mut routers {
        router.start().unwrap();
    }
    let all = [0, 1];
    wait_for_peers(&routers, topology, keys, &all, &all, DISCOVERY);
    all_pods_ping(topology, &all, &all);

    // With the LocalAPI answering (and its watch-ipn-bus stream open, as always).
    stop_and_check_nothing_left(topology, &mut routers[0], 0, "LocalAPI answering");

    // With the LocalAPI hung: it takes requests and never answers. Restarting it closes the
    // open watch stream, so the router is left with a pending watch-ipn-bus call beside its
    // pending status reads.
    localapi.set_behaviour(Behaviour::Silent);
    localapi.stop();
    localapi.clear_requests();
    localapi.restart().unwrap();
    let mut half_request = topology.nodes()[1].netns().command("bash").unwrap();
    half_request.args([
        "-c",
        &format!(
            "exec 3<>/dev/tcp/127.0.0.1/{METRICS_PORT} && printf 'GET /metrics HTTP/1.1\\r\\n' >&3 \
             && echo sent && exec sleep 60"
        ),
    ]);
    let mut client =
        Daemon::spawn("a client that never finishes its request", half_request).unwrap();
    wait_for(
        "a pending watch-ipn-bus and status call, and the half request",
        RESYNC * 3,
        || {
            let requests = localapi.requests();
            let pending = |path: &str| requests.iter().any(|r| r.target.starts_with(path));
            (pending("/localapi/v0/watch-ipn-bus")
                && pending("/localapi/v0/status")
                && client.log().contains("sent"))
            .then_some(())
        },
    );
    stop_and_check_nothing_left(topology, &mut routers[1], 1, "LocalAPI hung");
    client.stop();
}

/// `tailsk8s status --json` of `router`: the peer source's part (`state`, `reason`, …).
fn source_status(router: &ConfigRouter<'_>) -> serde_json::Value {
    tailsk8s_e2e::config_router::status_json(router.ifname()).unwrap()["source"].clone()
}

/// Peers' keys with their allowed IPs, as [`peer_set`] gives them.
type PeerSet = Vec<(String, Vec<IpNet>)>;

/// Every peer's key, allowed IPs and last handshake as `wg show dump` gives them.
fn peers_and_handshakes(router: &ConfigRouter<'_>) -> (PeerSet, Vec<Option<u64>>) {
    let dump = router.dump().unwrap();
    let peers = peer_set(&dump);
    let handshakes = peers
        .iter()
        .map(|(key, _)| dump.peer(key).and_then(|p| p.latest_handshake))
        .collect();
    (peers, handshakes)
}

#[test]
fn tailscaled_answering_garbage_or_an_error_changes_nothing_and_shows_the_source_stale() {
    let Some(cluster) = TailnetCluster::for_test(2) else {
        return;
    };
    let (topology, _, _, keys) = cluster.parts();
    let (routers, localapis) = cluster.start_routers();
    let all = [0, 1];
    wait_for_peers(&routers, topology, keys, &all, &all, DISCOVERY);
    all_pods_ping(topology, &all, &all);
    wait_for("node 1's source fresh", RESYNC * 3, || {
        (source_status(&routers[0])["state"] == "fresh").then_some(())
    });
    let before = peers_and_handshakes(&routers[0]);
    assert!(before.1.iter().all(Option::is_some), "{before:?}");
    let routes = routed(topology, &routers[0], 0);
    assert_eq!(routes, pod_cidrs_of(topology, &[1]));

    for (what, behaviour) in [
        ("garbage", Behaviour::Garbage),
        ("an error status", Behaviour::Error(500)),
    ] {
        localapis[0].set_behaviour(behaviour);
        localapis[0].clear_requests();
        wait_for(
            &format!("node 1's source stale on {what}"),
            RESYNC * 3,
            || (source_status(&routers[0])["state"] == "stale").then_some(()),
        );
        // Two more resyncs meet the bad answers: the router keeps what it had.
        wait_for(&format!("two resyncs on {what}"), RESYNC * 4, || {
            (status_reads(&localapis[0]) >= 2).then_some(())
        });
        let source = source_status(&routers[0]);
        assert_eq!(source["state"], "stale", "{what}: {source}");
        assert!(source["reason"].is_string(), "{what}: {source}");
        assert_eq!(peers_and_handshakes(&routers[0]), before, "{what}");
        assert_eq!(routed(topology, &routers[0], 0), routes, "{what}");
        all_pods_ping(topology, &all, &all);
        let pod1 = &topology.nodes()[0].pods()[0];
        let pod2 = &topology.nodes()[1].pods()[0];
        tcp_transfer(pod1.netns(), pod2.netns(), pod2.ip(false), 1 << 20)
            .unwrap()
            .verify(pod1.ip(false))
            .unwrap();
        // Sessions kept: the same last handshakes, on both sides.
        assert_eq!(peers_and_handshakes(&routers[0]).1, before.1, "{what}");
    }

    // tailscaled answers properly again: fresh again, the same peers and sessions.
    localapis[0].set_behaviour(Behaviour::Normal);
    wait_for("node 1's source fresh again", RESYNC * 3, || {
        (source_status(&routers[0])["state"] == "fresh").then_some(())
    });
    assert_eq!(peers_and_handshakes(&routers[0]), before);
    all_pods_ping(topology, &all, &all);
}

/// Where routers serve their announcements (the configs above set it).
const ANNOUNCE_PORT: u16 = 51821;

/// The HTTP status of a GET of the announcement at `to` from `from`'s namespace, from the
/// source address `source` when given.
fn announcement_status(from: &Netns, to: IpAddr, source: Option<IpAddr>) -> String {
    let mut curl = from.command("curl").unwrap();
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ]);
    if let Some(source) = source {
        curl.args(["--interface", &source.to_string()]);
    }
    curl.arg(format!(
        "http://{}/tailsk8s/v1/announcement",
        SocketAddr::new(to, ANNOUNCE_PORT)
    ));
    let out = curl.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn unapproved_pod_cidrs_are_not_routed_and_announcements_answer_only_tagged_tailnet_nodes() {
    let Some(cluster) = TailnetCluster::for_test(3) else {
        return;
    };
    let (topology, sims, tailnet, keys) = cluster.parts();
    // Tailscale approves only node 3's IPv4 pod CIDR; its announcement claims both (its
    // config's pod CIDRs).
    let node3_v4: Vec<IpNet> = topology.nodes()[2]
        .pod_cidrs()
        .into_iter()
        .filter(|p| matches!(p, IpNet::V4(_)))
        .collect();
    assert_eq!(node3_v4.len(), 1);
    tailnet
        .update(&sims[2].stable_id, |n| n.enabled_routes = node3_v4.clone())
        .unwrap();
    let (routers, _localapis) = cluster.start_routers();

    // Nodes 1 and 2 have node 3 with its approved pod CIDR only, and route only that.
    for i in [0, 1] {
        let other = 1 - i;
        let expected = sorted(vec![
            (
                keys[other].public().to_string(),
                topology.nodes()[other].pod_cidrs(),
            ),
            (keys[2].public().to_string(), node3_v4.clone()),
        ]);
        wait_for(
            &format!(
                "router {} to have node 3 with its IPv4 pod CIDR only",
                i + 1
            ),
            DISCOVERY,
            || (peer_set(&routers[i].dump().ok()?) == expected).then_some(()),
        );
        let mut routes = topology.nodes()[other].pod_cidrs();
        routes.extend(node3_v4.iter().copied());
        routes.sort();
        wait_for_routes(topology, &routers[i], i, &routes, DISCOVERY);
    }
    wait_for_peers(&routers, topology, keys, &[0, 1, 2], &[2], DISCOVERY);
    let pod1 = &topology.nodes()[0].pods()[0];
    let pod3 = &topology.nodes()[2].pods()[0];
    ping(pod1.netns(), pod3.ip(false), 1).unwrap();
    assert!(
        ping_with_deadline(pod1.netns(), pod3.ip(true), 1, Duration::from_secs(2)).is_err(),
        "node 3's unapproved IPv6 pod CIDR is reachable"
    );
    all_pods_ping(topology, &[0, 1], &[0, 1]);

    // The announcement endpoint. A tagged cluster node, from its tailnet address: the
    // document (the control that the requests below can succeed).
    let node1_tailnet = sims[0].tailnet_ips[0];
    let node2 = topology.nodes()[1].netns();
    assert_eq!(announcement_status(node2, node1_tailnet, None), "200");
    // Node 1's underlay address: nothing listens there (the server binds tailnet addresses
    // only), the connection is refused.
    let underlay = topology.nodes()[0].underlay_v4();
    let out = node2
        .command("bash")
        .unwrap()
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/{underlay}/{ANNOUNCE_PORT}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert_eq!(
        announcement_status(node2, underlay.into(), None),
        "000",
        "an HTTP answer on the underlay address"
    );
    // A tailnet node without the cluster tag, and an address tailscaled does not know,
    // both on node 2's tailscale0: refused with 403, no document.
    let mut untagged = SimNode::numbered(200);
    untagged.tags.clear();
    let untagged_ip = untagged.tailnet_ips[0];
    tailnet.add(untagged);
    let unknown: IpAddr = "100.101.201.1".parse().unwrap();
    node2
        .ip_batch(&[
            format!("addr add {untagged_ip}/32 dev {TAILNET_IF}"),
            format!("addr add {unknown}/32 dev {TAILNET_IF}"),
        ])
        .unwrap();
    assert_eq!(
        announcement_status(node2, node1_tailnet, Some(untagged_ip)),
        "403"
    );
    assert_eq!(
        announcement_status(node2, node1_tailnet, Some(unknown)),
        "403"
    );
}

#[test]
fn a_tailnet_node_announcing_another_nodes_key_changes_nothing() {
    let Some(cluster) = TailnetCluster::for_test(2) else {
        return;
    };
    let (topology, _, tailnet, keys) = cluster.parts();
    let (mut routers, localapis) = cluster.start_routers();
    let all = [0, 1];
    wait_for_peers(&routers, topology, keys, &all, &all, DISCOVERY);
    all_pods_ping(topology, &all, &all);
    let before = peers_and_handshakes(&routers[0]);
    let endpoint = endpoint_of(&routers[0], keys[1].public());
    let routes = routed(topology, &routers[0], 0);

    // A tagged tailnet node, its pod CIDR approved, whose announcement (served from its own
    // tailnet address) names node 2's public key. Its stable ID sorts after node 2's, so
    // by the conflict rule node 2 keeps the key.
    let claimed: IpNet = "198.19.99.0/24".parse().unwrap();
    let announced = Announced {
        public_key: keys[1].public().to_string(),
        endpoints: vec!["198.18.250.1:51820".parse().unwrap()],
        pod_cidrs: vec![claimed],
    };
    let fleet = Fleet::start(cluster.link(), &[announced]).unwrap();
    fleet
        .route_from(
            topology.nodes()[0].netns(),
            &"198.18.250.0/24".parse().unwrap(),
        )
        .unwrap();
    let mut impostor = SimNode::numbered(99).with_approved_routes(&[claimed]);
    impostor.stable_id = "z99SIMIMPOSTOR".into();
    impostor.tailnet_ips = vec![fleet_ip(0).into()];
    tailnet.add(impostor);

    wait_for("router 1 to log the key conflict", RESYNC * 4, || {
        let log = routers[0].daemon_mut().map(|d| d.log()).unwrap_or_default();
        log.contains("announces public key").then_some(())
    });
    // Through two more syncs: node 2 keeps its allowed IPs, endpoint and session; the
    // impostor's pod CIDR is neither allowed nor routed.
    let reads = status_reads(&localapis[0]);
    wait_for("two more syncs", RESYNC * 4, || {
        (status_reads(&localapis[0]) >= reads + 2).then_some(())
    });
    assert_eq!(peers_and_handshakes(&routers[0]), before);
    assert_eq!(endpoint_of(&routers[0], keys[1].public()), endpoint);
    assert_eq!(routed(topology, &routers[0], 0), routes);
    all_pods_ping(topology, &all, &all);
    assert_eq!(peers_and_handshakes(&routers[0]).1, before.1);
}
