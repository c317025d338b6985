//! Proves the harness itself with wireguard-go on every node: the baseline that the
//! router tests (tests/router.rs) repeat with tailsk8s on one or both sides.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use tailsk8s_e2e::{
    ping, ping_with_deadline, require_netns, tcp_transfer, Impl, Mesh, Netns, TopologyBuilder,
};

const MB: u64 = 1024 * 1024;

#[test]
fn netns_guard_removes_the_namespace_and_runs_commands_inside() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("guard").unwrap();
    let path = ns.path();
    assert!(path.exists());
    // Only `lo` exists in a fresh namespace, and it is up.
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains("UP"), "{links}");
    // enter() runs the closure in this namespace, not in the test process's.
    let inside = ns
        .enter(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    let outside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_ne!(inside, outside);
    drop(ns);
    assert!(
        !Path::new(&path).exists(),
        "{} still exists",
        path.display()
    );
}

#[test]
fn netns_guard_cleans_up_on_panic() {
    if !require_netns() {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let ns = Netns::new("panic").unwrap();
        let path = ns.path();
        std::panic::panic_any(path);
    });
    let payload = result.unwrap_err();
    let path = payload.downcast_ref::<std::path::PathBuf>().unwrap();
    assert!(!path.exists(), "{} survived a panic", path.display());
}

#[test]
fn daemon_in_namespace_stops_and_its_socket_goes_away() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(1).pods_per_node(1).build().unwrap();
    let device = tailsk8s_e2e::WgDevice::start(Impl::WireguardGo, topo.nodes()[0].netns()).unwrap();
    let socket = device.socket_path();
    assert!(socket.exists());
    let dump = device.dump().unwrap();
    assert_eq!(
        dump.interface.public_key.as_deref(),
        Some(device.public_key())
    );
    assert!(dump.peers.is_empty());
    drop(device);
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[test]
fn pods_reach_each_other_over_the_bridge_but_not_across_nodes_without_a_tunnel() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, a1, b0) = (&a.pods()[0], &a.pods()[1], &b.pods()[0]);
    for v6 in [false, true] {
        ping(a0.netns(), a1.ip(v6), 2).unwrap();
        ping(a0.netns(), a.underlay(v6), 1).unwrap();
        ping(a.netns(), b.underlay(v6), 1).unwrap();
        // Without a tunnel the nodes have no route to each other's pod CIDRs.
        let unreachable = ping_with_deadline(a0.netns(), b0.ip(v6), 1, Duration::from_secs(1));
        assert!(
            unreachable.is_err(),
            "{} reached {} without a tunnel",
            a0.netns().name(),
            b0.ip(v6)
        );
    }
}

#[test]
fn a_ping_waits_for_a_route_that_appears_within_its_deadline() {
    if !require_netns() {
        return;
    }
    // Until the routes below exist, node a answers pod a0's pings with "net unreachable",
    // which makes `ping -w` give up at once: the helper must keep trying until its deadline.
    let topo = TopologyBuilder::new(2).pods_per_node(1).build().unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, b0) = (&a.pods()[0], &b.pods()[0]);
    let delay = Duration::from_millis(1500);
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(delay);
            for (from, to) in [(a, b), (b, a)] {
                for cidr in to.pod_cidrs().iter().filter(|c| matches!(c, IpNet::V4(_))) {
                    let (cidr, via) = (cidr.to_string(), to.underlay_v4().to_string());
                    from.netns()
                        .ip(&["route", "add", &cidr, "via", &via])
                        .unwrap();
                }
            }
        });
        ping(a0.netns(), b0.ip(false), 1).unwrap();
    });
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
}

#[test]
fn wireguard_go_on_both_nodes_carries_pod_traffic() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let mesh = Mesh::start(&topo, &[Impl::WireguardGo, Impl::WireguardGo]).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, a1, b0, b1) = (&a.pods()[0], &a.pods()[1], &b.pods()[0], &b.pods()[1]);

    for v6 in [false, true] {
        ping(a0.netns(), b0.ip(v6), 3).unwrap();
        ping(b1.netns(), a1.ip(v6), 3).unwrap();
        ping(b0.netns(), b1.ip(v6), 2).unwrap();
    }

    let report = tcp_transfer(a0.netns(), b0.netns(), b0.ip(false), 10 * MB).unwrap();
    report.verify(IpAddr::from(a0.ipv4())).unwrap();
    eprintln!(
        "10 MB wireguard-go → wireguard-go: {:.0} Mbit/s",
        report.mbit_per_second()
    );

    // What `wg` reads back matches the mesh: a handshake happened and traffic was counted,
    // with the peer's underlay address as endpoint.
    let dump = mesh.devices()[0].dump().unwrap();
    let peer = dump
        .peer(mesh.devices()[1].public_key())
        .expect("node 2 is a peer of node 1");
    assert_eq!(
        peer.endpoint.map(|e| e.ip()),
        Some(IpAddr::from(b.underlay_v4()))
    );
    assert_eq!(peer.allowed_ips, b.pod_cidrs());
    assert!(peer.latest_handshake.is_some());
    assert!(peer.tx_bytes > 10 * MB && peer.rx_bytes > 0, "{peer:?}");
}

#[test]
fn three_nodes_over_an_underlay_bridge_with_ipv6_endpoints() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(3).build().unwrap();
    assert!(topo.underlay().is_some());
    let options = tailsk8s_e2e::MeshOptions {
        endpoints: tailsk8s_e2e::EndpointFamily::V6,
        ..Default::default()
    };
    let mesh = Mesh::start_with(&topo, &[Impl::WireguardGo; 3], &options).unwrap();
    let nodes = topo.nodes();
    for (from, to) in [(0, 2), (2, 1), (1, 0)] {
        for v6 in [false, true] {
            ping(nodes[from].pods()[0].netns(), nodes[to].pods()[1].ip(v6), 2).unwrap();
        }
    }
    let dump = mesh.devices()[2].dump().unwrap();
    assert_eq!(dump.peers.len(), 2);
    for peer in &dump.peers {
        assert!(peer.endpoint.is_some_and(|e| e.is_ipv6()), "{peer:?}");
    }
}
