//! End-to-end tests of the `tailsk8s` binary: pod traffic between two tailsk8s routers, and
//! interoperability with wireguard-go in both directions. The topology and checks are the
//! ones tests/harness.rs proves with wireguard-go on both sides.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::net::IpAddr;

use tailsk8s_e2e::traffic::tcp_transfer_with_mss;
use tailsk8s_e2e::{
    ping, require_netns, tcp_transfer, EndpointFamily, Impl, Mesh, MeshOptions, Pod, Topology,
    TopologyBuilder,
};

const MB: u64 = 1024 * 1024;

/// Sends `bytes` from pod `from` to pod `to` over `v6` or IPv4 and checks content and
/// source address.
fn transfer(from: &Pod, to: &Pod, v6: bool, bytes: u64, what: &str) {
    let report = tcp_transfer(from.netns(), to.netns(), to.ip(v6), bytes)
        .unwrap_or_else(|e| panic!("{what}: transfer failed: {e:#}"));
    report
        .verify(from.ip(v6))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    eprintln!(
        "{what}: {} MB at {:.0} Mbit/s",
        bytes / MB,
        report.mbit_per_second()
    );
}

/// Fails if any daemon of the mesh has exited (a crash that traffic did not reveal).
fn assert_all_running(mesh: &mut Mesh) {
    for device in mesh.devices_mut() {
        let daemon = device.daemon_mut();
        let exited = daemon.exited().unwrap();
        assert!(
            exited.is_none(),
            "{} exited ({exited:?}):\n{}",
            daemon.label(),
            daemon.log()
        );
    }
}

fn two_nodes() -> Topology {
    TopologyBuilder::new(2).build().unwrap()
}

#[test]
fn tailsk8s_pair_carries_pod_traffic_intact_and_unnatted() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mut mesh = Mesh::start(&topo, &[Impl::Tailsk8s, Impl::Tailsk8s]).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, a1, b0, b1) = (&a.pods()[0], &a.pods()[1], &b.pods()[0], &b.pods()[1]);

    for v6 in [false, true] {
        ping(a0.netns(), b0.ip(v6), 3).unwrap();
        ping(b1.netns(), a1.ip(v6), 3).unwrap();
    }
    transfer(a0, b0, false, 100 * MB, "tailsk8s → tailsk8s IPv4");
    transfer(b1, a1, true, 10 * MB, "tailsk8s → tailsk8s IPv6");

    let dump = mesh.devices()[0].dump().unwrap();
    let peer = dump
        .peer(mesh.devices()[1].public_key())
        .expect("node 2 is a peer of node 1");
    assert!(peer.latest_handshake.is_some(), "{peer:?}");
    assert!(
        peer.tx_bytes > 100 * MB && peer.rx_bytes > 10 * MB,
        "{peer:?}"
    );
    assert_all_running(&mut mesh);
}

#[test]
fn tailsk8s_reports_its_configuration_over_uapi() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mut mesh = Mesh::start(&topo, &[Impl::Tailsk8s, Impl::WireguardGo]).unwrap();
    let remote = &topo.nodes()[1];
    let (ours, theirs) = (&mesh.devices()[0], &mesh.devices()[1]);

    let dump = ours.dump().unwrap();
    assert_eq!(
        dump.interface.public_key.as_deref(),
        Some(ours.public_key())
    );
    assert_eq!(
        dump.interface.listen_port,
        MeshOptions::default().listen_port
    );
    assert_eq!(dump.peers.len(), 1);
    let peer = &dump.peers[0];
    assert_eq!(peer.public_key, theirs.public_key());
    assert_eq!(
        peer.endpoint.map(|e| e.ip()),
        Some(IpAddr::from(remote.underlay_v4()))
    );
    assert_eq!(peer.allowed_ips, remote.pod_cidrs());
    assert_eq!(
        peer.latest_handshake, None,
        "no traffic yet, so no handshake"
    );
    // wireguard-go reads back the same picture of its side: both implementations agree.
    let reference = theirs.dump().unwrap();
    assert_eq!(reference.peers[0].public_key, ours.public_key());
    assert_all_running(&mut mesh);
}

/// A small MSS (MSS clamping, IPv6 minimum-MTU paths, some stacks): a 64 KB superpacket from
/// the TUN then has hundreds of segments, more than a worker's batch holds (740 at MSS 88).
/// Every transfer completes intact, whatever the MSS, and the routers lose no superpacket:
/// when they dropped those with more segments than their batch had room for, the sender
/// retransmitted over 90 % of its segments at MSS 88; a lossless path retransmits almost
/// none (a few per cent seen on a loaded machine without offloads), so half is the bound.
#[test]
fn tailsk8s_pair_carries_transfers_at_a_small_mss_intact() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mut mesh = Mesh::start(&topo, &[Impl::Tailsk8s, Impl::Tailsk8s]).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, b0) = (&a.pods()[0], &b.pods()[0]);
    ping(a0.netns(), b0.ip(false), 1).unwrap();
    for (mss, v6) in [(536, false), (88, false), (536, true), (88, true)] {
        let what = format!("MSS {mss} over IPv{}", if v6 { 6 } else { 4 });
        let report = tcp_transfer_with_mss(a0.netns(), b0.netns(), b0.ip(v6), 20 * MB, Some(mss))
            .unwrap_or_else(|e| panic!("{what}: transfer failed: {e:#}"));
        report
            .verify(a0.ip(v6))
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        eprintln!(
            "{what}: 20 MB at {:.0} Mbit/s, {} segments retransmitted",
            report.mbit_per_second(),
            report.sender_retransmits
        );
        assert!(
            report.retransmitted_share() < 0.5,
            "{what}: {} segments of {} bytes retransmitted for 20 MB: the routers drop",
            report.sender_retransmits,
            report.sender_mss
        );
    }
    assert_all_running(&mut mesh);
}

/// Interop: `first` is the node whose pod sends first, so its router initiates the
/// handshake.
fn interop(first: usize) {
    let topo = two_nodes();
    let mut mesh = Mesh::start(&topo, &[Impl::Tailsk8s, Impl::WireguardGo]).unwrap();
    let nodes = topo.nodes();
    let (initiator, responder) = (&nodes[first], &nodes[1 - first]);
    let names = [
        mesh.devices()[first].implementation().name(),
        mesh.devices()[1 - first].implementation().name(),
    ];

    // Nothing has been sent yet: the first ping makes `initiator`'s router start the
    // handshake. Then traffic flows both ways, over both families.
    for (from, to, v6) in [
        (initiator, responder, false),
        (responder, initiator, false),
        (responder, initiator, true),
        (initiator, responder, true),
    ] {
        ping(from.pods()[0].netns(), to.pods()[1].ip(v6), 3).unwrap();
    }
    transfer(
        &initiator.pods()[0],
        &responder.pods()[0],
        false,
        20 * MB,
        &format!("{} → {} IPv4", names[0], names[1]),
    );
    transfer(
        &responder.pods()[1],
        &initiator.pods()[1],
        true,
        20 * MB,
        &format!("{} → {} IPv6", names[1], names[0]),
    );
    assert_all_running(&mut mesh);
}

#[test]
fn interop_tailsk8s_initiates_to_wireguard_go() {
    if !require_netns() {
        return;
    }
    interop(0);
}

#[test]
fn interop_wireguard_go_initiates_to_tailsk8s() {
    if !require_netns() {
        return;
    }
    interop(1);
}

#[test]
fn tailsk8s_pair_over_an_ipv6_underlay() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let options = MeshOptions {
        endpoints: EndpointFamily::V6,
        ..Default::default()
    };
    let mut mesh = Mesh::start_with(&topo, &[Impl::Tailsk8s, Impl::Tailsk8s], &options).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    for v6 in [false, true] {
        ping(a.pods()[0].netns(), b.pods()[1].ip(v6), 3).unwrap();
    }
    let dump = mesh.devices()[1].dump().unwrap();
    assert_eq!(
        dump.peers[0].endpoint.map(|e| e.ip()),
        Some(IpAddr::from(a.underlay_v6()))
    );
    assert_all_running(&mut mesh);
}

/// How many CPUs the routers may use (pinning needs two).
fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Both nodes run `tailsk8s router FLAGS… IFNAME`.
fn routers_with<'t>(topo: &'t Topology, flags: &'static [&'static str]) -> Mesh<'t> {
    let router = Impl::Tailsk8sWith(flags);
    Mesh::start(topo, &[router, router]).unwrap()
}

/// The first pod of each of the two nodes.
fn first_pods(topo: &Topology) -> (&Pod, &Pod) {
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    (&a.pods()[0], &b.pods()[0])
}

/// The CPU list (`Cpus_allowed_list`) of each thread of `pid`, by thread name.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(Result::ok)
        .map(|task| {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or_default();
            (comm.trim().to_string(), cpus.trim().to_string())
        })
        .collect()
}

#[test]
fn pinned_workers_carry_pod_traffic_each_on_its_own_cpu() {
    if !require_netns() {
        return;
    }
    let cpus = usable_cpus();
    let topo = two_nodes();
    let mut mesh = routers_with(&topo, &["--worker-affinity", "pinned", "--workers", "2"]);
    let (a0, b0) = first_pods(&topo);
    for v6 in [false, true] {
        ping(a0.netns(), b0.ip(v6), 3).unwrap();
        ping(b0.netns(), a0.ip(v6), 3).unwrap();
    }
    transfer(a0, b0, false, 20 * MB, "pinned workers IPv4");
    transfer(b0, a0, true, 5 * MB, "pinned workers IPv6");

    for device in mesh.devices_mut() {
        let daemon = device.daemon_mut();
        let log = daemon.log();
        let pid = daemon.pid().expect("running");
        let threads = thread_cpus(pid);
        let cpu_of = |name: &str| {
            threads
                .iter()
                .find(|(comm, _)| comm == name)
                .map(|(_, cpus)| cpus.clone())
                .unwrap_or_else(|| panic!("no thread {name}: {threads:?}"))
        };
        if cpus < 2 {
            // One CPU: nothing to pin to; the router says so and runs unpinned.
            assert!(log.contains("pinned_workers=false"), "{log}");
            continue;
        }
        assert!(log.contains("pinned_workers=true"), "{log}");
        // As root the steering programs load; a fallback would be a warning.
        assert!(!log.contains("stay spread"), "steering fell back:\n{log}");
        assert!(
            !log.contains("could not"),
            "a placement step failed:\n{log}"
        );
        let (tun0, udp0, tun1, udp1) = (
            cpu_of("tsk-tun0"),
            cpu_of("tsk-udp0"),
            cpu_of("tsk-tun1"),
            cpu_of("tsk-udp1"),
        );
        assert_eq!(tun0, udp0, "worker 0's threads share a CPU: {threads:?}");
        assert_eq!(tun1, udp1, "worker 1's threads share a CPU: {threads:?}");
        assert_ne!(tun0, tun1, "the workers are on different CPUs: {threads:?}");
        for cpu in [&tun0, &tun1] {
            assert!(cpu.parse::<u32>().is_ok(), "pinned to one CPU: {threads:?}");
        }
    }
    assert_all_running(&mut mesh);
}

#[test]
fn adaptive_workers_spread_under_load_and_pin_again_when_quiet() {
    if !require_netns() {
        return;
    }
    let cpus = usable_cpus();
    let topo = two_nodes();
    let mut mesh = routers_with(&topo, &["--worker-affinity", "adaptive", "--workers", "2"]);
    let (a0, b0) = first_pods(&topo);
    ping(a0.netns(), b0.ip(false), 3).unwrap();
    if cpus < 2 {
        transfer(a0, b0, false, 20 * MB, "adaptive workers, one CPU");
        assert_all_running(&mut mesh);
        return;
    }
    for device in mesh.devices_mut() {
        let log = device.daemon_mut().log();
        assert!(log.contains("pinned_workers=true"), "{log}");
        assert!(!log.contains("workers spread"), "spread while idle:\n{log}");
    }
    // Far above the spreading threshold (1,000 packets per 100 ms) for several ticks, even
    // from debug builds on a loaded machine (~30,000 packets per second at 350 Mbit/s).
    transfer(a0, b0, false, 200 * MB, "adaptive workers under load");
    // Once quiet for a second, both routers pin their workers again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for device in mesh.devices_mut() {
        let daemon = device.daemon_mut();
        loop {
            let log = daemon.log();
            let spread = log.find("workers spread");
            let pinned = log.rfind("workers pinned");
            assert!(spread.is_some(), "never spread under load:\n{log}");
            if pinned > spread {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not pinned again after the load:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let log = daemon.log();
        assert!(
            !log.contains("could not"),
            "a placement change failed:\n{log}"
        );
        let threads = thread_cpus(daemon.pid().expect("running"));
        for (comm, cpus) in &threads {
            if comm.starts_with("tsk-tun") || comm.starts_with("tsk-udp") {
                assert!(
                    cpus.parse::<u32>().is_ok(),
                    "{comm} not pinned: {threads:?}"
                );
            }
        }
    }
    // And the tunnel still works after the moves.
    ping(b0.netns(), a0.ip(true), 3).unwrap();
    assert_all_running(&mut mesh);
}
