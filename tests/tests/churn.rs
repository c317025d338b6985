//! Churn (issue 10): 1,000 peers added and removed, round after round, while a TCP stream
//! runs between pods of two nodes whose peering never changes. The stream's receiver times
//! every read ([`stall`]): its longest gap must stay under 1 s. Neither router may
//! re-handshake the unchanged peer: its last handshake, read over UAPI to the nanosecond,
//! is the same after the churn as before.
//!
//! Two sources of churn: UAPI (`wg addconf` of 1,000 peers with allowed IPs, then `wg set …
//! remove`, on both routers) and Tailscale (1,000 tagged tailnet nodes with approved pod
//! CIDRs appear in and vanish from the LocalAPI stand-in across resyncs; each serves its
//! announcement from its own tailnet address, so the routers fetch, add, route and remove
//! them as they would real nodes).
//!
//! Both are `#[ignore]`d (a minute or so each) and run by `scripts/reliability`; they print
//! their figures (`--nocapture`). RELIABILITY.md records them.

use std::time::{Duration, Instant};

use tailsk8s_e2e::churn::{self, FakePeer};
use tailsk8s_e2e::config_router::{table_routes, ROUTE_TABLE};
use tailsk8s_e2e::stall::{self, StallReport};
use tailsk8s_e2e::tailnet_link::{self, fleet_ip, Announced, Fleet};
use tailsk8s_e2e::{
    ping_with_deadline, require_netns, tailsk8s_binary, wait, ConfigMesh, ConfigRouter, KeyPair,
    MeshOptions, ShowDump, Topology, TopologyBuilder,
};
use tailsk8s_tailnet_sim::{LocalApiServer, SimNode, Tailnet};

/// Issue 10: the churn is 1,000 peers.
const PEERS: usize = 1000;
/// Issue 10: the unchanged peer's transfer never stalls this long.
const MAX_STALL: Duration = Duration::from_secs(1);
/// A last handshake read twice moves by the rounding of its age (milliseconds), never more;
/// a new handshake during the churn would move it by at least the churn's first round.
const SAME_HANDSHAKE: Duration = Duration::from_millis(50);
/// WireGuard rekeys a session after 120 s: the churn must end well before, or a new
/// handshake would be the protocol's, not the churn's.
const REKEY_AFTER: Duration = Duration::from_secs(120);
const TAG: &str = "tag:k8s-node";
/// The Tailscale-sourced routers re-read the LocalAPI this often.
const RESYNC: Duration = Duration::from_secs(2);

/// The last handshake each router reports for the other (router `k`'s view of its one
/// unchanged peer).
fn handshakes(routers: &[ConfigRouter<'_>]) -> Vec<Duration> {
    routers
        .iter()
        .enumerate()
        .map(|(k, router)| {
            let other = routers[1 - k].public_key().unwrap();
            churn::last_handshake(router.ifname(), other)
                .unwrap()
                .unwrap_or_else(|| panic!("router {} has no session with the other", k + 1))
        })
        .collect()
}

/// Runs `churn` while a stream flows from the first pod of node 1 to the first pod of
/// node 2; checks neither router re-handshaked the other and the stream never stalled
/// [`MAX_STALL`]; returns `churn`'s result.
fn churn_beside_a_stream<T: Send>(
    topo: &Topology,
    routers: &[ConfigRouter<'_>],
    what: &str,
    churn: impl FnOnce() -> T + Send,
) -> T {
    let (from, to) = (&topo.nodes()[0].pods()[0], &topo.nodes()[1].pods()[0]);
    // A Tailscale-sourced router routes a new peer's pod CIDRs just after adding the peer.
    wait::until("a pod ping across", Duration::from_secs(20), || {
        Ok(
            ping_with_deadline(from.netns(), to.ipv4().into(), 1, Duration::from_secs(1))
                .is_ok()
                .then_some(()),
        )
    })
    .unwrap();
    let session_from = Instant::now();
    let ((result, before, after), report) = stall::while_streaming(from, to, || {
        let before = handshakes(routers);
        let result = churn();
        (result, before, handshakes(routers))
    })
    .unwrap();
    print_report(what, &report);
    assert!(
        session_from.elapsed() < REKEY_AFTER - Duration::from_secs(10),
        "the churn ran into WireGuard's own rekey time: shorten it"
    );
    for (k, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(
            a.abs_diff(*b) < SAME_HANDSHAKE,
            "router {}: the unchanged peer's last handshake moved from {b:?} to {a:?}: \
             its session was re-handshaked during the churn",
            k + 1
        );
    }
    assert!(
        report.longest_gap < MAX_STALL,
        "{what}: the stream stalled {:?} ({report:?})",
        report.longest_gap
    );
    result
}

fn print_report(what: &str, report: &StallReport) {
    eprintln!(
        "{what}: stream {:.0} Mbit/s over {:?}, longest gap {:?} (ending {:?} in), {} gaps \
         ≥ 100 ms",
        report.mbit_per_second(),
        report.elapsed,
        report.longest_gap,
        report.longest_gap_at,
        report.gaps_over_100ms
    );
}

/// Waits until `router` has `count` peers; how long that took.
fn wait_for_peer_count(router: &ConfigRouter<'_>, count: usize, within: Duration) -> Duration {
    let started = Instant::now();
    wait::until(&format!("{count} peers"), within, || {
        Ok((router.dump()?.peers.len() == count).then_some(()))
    })
    .unwrap();
    started.elapsed()
}

/// Rounds of UAPI churn.
const UAPI_ROUNDS: usize = 5;
/// Peers removed per `wg set … remove` call.
const REMOVE_PER_CALL: usize = 100;

#[test]
#[ignore = "long: 1,000-peer churn rounds during a transfer, run by scripts/reliability"]
fn churn_of_1000_peers_through_uapi_neither_stalls_nor_rehandshakes_a_transfer() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let mesh = ConfigMesh::start(&topo, &MeshOptions::default()).unwrap();
    let routers = mesh.routers();
    let fake: Vec<FakePeer> = churn::fake_peers(PEERS).unwrap();
    let rounds = churn_beside_a_stream(&topo, routers, "UAPI churn", || {
        let mut rounds = Vec::new();
        for _ in 0..UAPI_ROUNDS {
            for (router, node) in routers.iter().zip(topo.nodes()) {
                let ns = node.netns();
                let file = router.dir().join("churn.conf");
                let started = Instant::now();
                churn::add(ns, router.ifname(), &file, &fake).unwrap();
                let added = started.elapsed();
                assert_eq!(router.dump().unwrap().peers.len(), PEERS + 1);
                let started = Instant::now();
                for chunk in fake.chunks(REMOVE_PER_CALL) {
                    churn::remove(ns, router.ifname(), chunk).unwrap();
                }
                let removed = started.elapsed();
                assert_eq!(router.dump().unwrap().peers.len(), 1);
                rounds.push((added, removed));
            }
        }
        rounds
    });
    eprintln!(
        "UAPI churn: {UAPI_ROUNDS} rounds × 2 routers of `wg addconf` of {PEERS} peers, then \
         `wg set … remove` in calls of {REMOVE_PER_CALL}: (add, remove) took {rounds:?}"
    );
}

/// Rounds of Tailscale churn.
const TAILSCALE_ROUNDS: usize = 3;
/// How long the routers may take to learn or forget the fleet (resync, debounce, 1,000
/// announcement fetches 16 at a time, routes).
const CONVERGE: Duration = Duration::from_secs(60);

/// The made-up tailnet node for made-up peer `i`: tagged, its tailnet address
/// [`fleet_ip`]`(i)`, the peer's allowed IPs advertised and approved.
fn fleet_node(i: usize, peer: &FakePeer) -> SimNode {
    SimNode {
        stable_id: format!("f{i:04}SIMFLEET"),
        node_id: 6_410_286_723_000 + i as u64,
        public_key: format!("nodekey:{:064x}", 0xf_0000 + i),
        host_name: format!("k8s-fleet-{i}"),
        tailnet_ips: vec![fleet_ip(i).into()],
        tags: vec![TAG.to_string()],
        advertised_routes: peer.allowed_ips.clone(),
        enabled_routes: peer.allowed_ips.clone(),
        online: true,
        authorized: true,
        route_all: false,
    }
}

#[test]
#[ignore = "long: 1,000 tailnet nodes come and go during a transfer, run by scripts/reliability"]
fn churn_of_1000_tailnet_nodes_neither_stalls_nor_rehandshakes_a_transfer() {
    if !require_netns() {
        return;
    }
    let binary = tailsk8s_binary().unwrap();
    let topo = TopologyBuilder::new(2).build().unwrap();
    let sims: Vec<SimNode> = topo
        .nodes()
        .iter()
        .map(|node| SimNode::numbered(node.index()).with_approved_routes(&node.pod_cidrs()))
        .collect();
    let ips: Vec<_> = sims.iter().map(|s| s.tailnet_ips.clone()).collect();
    let switch = tailnet_link::build(&topo, &ips).unwrap();
    let tailnet = Tailnet::new();
    for sim in &sims {
        tailnet.add(sim.clone());
    }
    let fake = churn::fake_peers(PEERS).unwrap();
    let announced: Vec<Announced> = fake
        .iter()
        .map(|peer| Announced {
            public_key: peer.public_key.clone(),
            endpoints: vec![peer.endpoint],
            pod_cidrs: peer.allowed_ips.clone(),
        })
        .collect();
    let fleet_link = Fleet::start(&switch, &announced).unwrap();
    for node in topo.nodes() {
        fleet_link
            .route_from(node.netns(), &churn::ENDPOINTS.parse().unwrap())
            .unwrap();
    }
    let fleet: Vec<SimNode> = fake
        .iter()
        .enumerate()
        .map(|(i, p)| fleet_node(i, p))
        .collect();

    let mut routers = Vec::new();
    let mut localapis = Vec::new();
    for (node, sim) in topo.nodes().iter().zip(&sims) {
        let mut router = ConfigRouter::new(node.netns()).unwrap();
        router
            .write_private_key(&KeyPair::generate(&binary).unwrap())
            .unwrap();
        let socket = router.dir().join("tailscaled.sock");
        localapis.push(LocalApiServer::start(&tailnet, &sim.stable_id, &socket).unwrap());
        router
            .write_config_text(&tailnet_link::router_config(
                &router,
                &node.pod_cidrs(),
                &socket,
                TAG,
                RESYNC,
            ))
            .unwrap();
        routers.push(router);
    }
    for router in &mut routers {
        router.start().unwrap();
    }
    for router in &routers {
        wait_for_peer_count(router, 1, CONVERGE);
    }
    // The count to come back to is taken once each node routes the other's pod CIDRs: the
    // routes follow the device's peers, and a count read in between would never recur.
    let nodes = topo.nodes();
    for (i, node) in nodes.iter().enumerate() {
        let other = nodes[1 - i].pod_cidrs();
        wait::until("the other node's pod CIDRs routed", CONVERGE, || {
            let routes = table_routes(node.netns(), ROUTE_TABLE)?;
            Ok(other
                .iter()
                .all(|c| routes.iter().any(|r| r.prefix == *c))
                .then_some(()))
        })
        .unwrap();
    }
    let routes_before: Vec<usize> = nodes
        .iter()
        .map(|n| table_routes(n.netns(), ROUTE_TABLE).unwrap().len())
        .collect();
    let rounds = churn_beside_a_stream(&topo, &routers, "Tailscale churn", || {
        let mut rounds = Vec::new();
        for _ in 0..TAILSCALE_ROUNDS {
            let started = Instant::now();
            for node in &fleet {
                tailnet.add(node.clone());
            }
            let learned: Vec<Duration> = routers
                .iter()
                .map(|r| wait_for_peer_count(r, PEERS + 1, CONVERGE))
                .collect();
            let all_learned = started.elapsed();
            let started = Instant::now();
            for node in &fleet {
                tailnet.remove(&node.stable_id);
            }
            for router in &routers {
                wait_for_peer_count(router, 1, CONVERGE);
            }
            rounds.push((learned, all_learned, started.elapsed()));
        }
        rounds
    });
    // The fleet's routes went as they came.
    for (node, before) in topo.nodes().iter().zip(&routes_before) {
        wait::until("the fleet's routes removed", CONVERGE, || {
            Ok((table_routes(node.netns(), ROUTE_TABLE)?.len() == *before).then_some(()))
        })
        .unwrap();
    }
    eprintln!(
        "Tailscale churn: {TAILSCALE_ROUNDS} rounds of {PEERS} tagged nodes added, then removed \
         (resync {RESYNC:?}): (routers learned all after, both after, both forgot all after) \
         {rounds:?}"
    );
}
