//! End-to-end tests of the `tailsk8s` binary: pod traffic between two tailsk8s routers, and
//! interoperability with wireguard-go in both directions. The topology and checks are the
//! ones tests/harness.rs proves with wireguard-go on both sides.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::net::IpAddr;

use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::threads::{thread, worker_threads};
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

/// Where the two workers of router `pid` run: `Ok([cpu of worker 0, cpu of worker 1])` when
/// both are pinned — each worker's TUN and UDP thread on one and the same CPU, the two
/// workers on different CPUs — else `Err` saying what is not so.
fn pinned_workers(pid: u32) -> Result<[u32; 2], String> {
    let mut cpus = [0u32; 2];
    for (worker, cpu) in cpus.iter_mut().enumerate() {
        let (tun, udp) = (
            thread(pid, &format!("tsk-tun{worker}")),
            thread(pid, &format!("tsk-udp{worker}")),
        );
        *cpu = match (tun.cpus.parse::<u32>(), tun.cpus == udp.cpus) {
            (Ok(cpu), true) => cpu,
            _ => return Err(format!("worker {worker} not on one CPU: {tun:?} {udp:?}")),
        };
    }
    if cpus[0] == cpus[1] {
        return Err(format!("both workers on CPU {}", cpus[0]));
    }
    Ok(cpus)
}

/// Whether router `pid`'s workers are spread: their threads may run on more than one CPU.
fn workers_spread(pid: u32) -> bool {
    let workers = worker_threads(pid);
    !workers.is_empty() && workers.iter().all(|t| !t.on_one_cpu())
}

/// Checks that the kernel hands each packet to the worker of the CPU it is on — the TUN
/// steering program on the sending node, the reuseport program on the receiving one — by
/// pinging from `from` to `to` with the ping process pinned to each worker's CPU in turn:
/// the ping's packets enter the sending router's TUN on that CPU and its datagrams reach
/// the other router on that CPU, so that worker's TUN thread wakes once per packet on both
/// nodes (pinned, a worker's TUN thread serves its UDP sockets too; its UDP thread steps
/// aside), and the other worker's does not.
/// With the kernel's flow hash instead, one flow lands on one worker whatever the CPU, so
/// at least one of the rounds fails. `routers` are the sending and the receiving router.
fn assert_steered_by_cpu(from: &Pod, to: &Pod, routers: [u32; 2]) {
    const PINGS: u64 = 50;
    let [sending, receiving] = routers;
    let cpus = pinned_workers(sending).unwrap();
    assert_eq!(pinned_workers(receiving).unwrap(), cpus);
    // Two rounds per CPU, each a new ping process (a new ICMP id, so a new flow hash).
    for worker in [0, 1, 0, 1] {
        let other = 1 - worker;
        let watched = [
            (
                sending,
                format!("tsk-tun{worker}"),
                format!("tsk-tun{other}"),
            ),
            (
                receiving,
                format!("tsk-tun{worker}"),
                format!("tsk-tun{other}"),
            ),
        ];
        let before: Vec<(u64, u64)> = watched
            .iter()
            .map(|(pid, on, off)| (thread(*pid, on).wakeups, thread(*pid, off).wakeups))
            .collect();
        let udp_thread = format!("tsk-udp{worker}");
        let udp_before = routers.map(|pid| thread(pid, &udp_thread).wakeups);
        let cpu = cpus[worker].to_string();
        let count = PINGS.to_string();
        let target = to.ipv4().to_string();
        from.netns()
            .exec(
                "taskset",
                &[
                    "-c", &cpu, "ping", "-n", "-q", "-c", &count, "-i", "0.01", "-w", "20", &target,
                ],
            )
            .unwrap_or_else(|e| panic!("ping from CPU {cpu}: {e:#}"));
        let mut tun_wakeups = [0u64; 2];
        for (((pid, on, off), (on_before, off_before)), seen) in
            watched.iter().zip(before).zip(tun_wakeups.iter_mut())
        {
            let on_wakeups = thread(*pid, on).wakeups - on_before;
            *seen = on_wakeups;
            let off_wakeups = thread(*pid, off).wakeups - off_before;
            // One wake-up per packet, or fewer if a busy CPU delays the thread past the
            // next packet; the other worker still wakes every poll interval (100 ms) to
            // check for shutdown, a few times during the pings. Measured: 50 against 7
            // steered, and the reverse under the kernel's hash.
            assert!(
                on_wakeups >= PINGS / 2 && off_wakeups * 2 < on_wakeups,
                "{PINGS} pings sent from CPU {cpu} (worker {worker}'s): {on} of router {pid} \
                 woke {on_wakeups} times, {off} {off_wakeups} times"
            );
        }
        // The worker's UDP thread stepped aside: it only wakes every poll interval, like
        // the other worker's threads, far less often than the TUN thread serving for it.
        for ((pid, before), tun) in routers.iter().zip(udp_before).zip(tun_wakeups) {
            let wakeups = thread(*pid, &udp_thread).wakeups - before;
            assert!(
                wakeups * 2 < tun,
                "{PINGS} pings from CPU {cpu}: pinned, {udp_thread} of router {pid} should \
                 leave its sockets to tsk-tun{worker} (woke {tun} times), yet woke {wakeups} \
                 times"
            );
        }
    }
}

#[test]
fn pinned_workers_carry_pod_traffic_each_on_its_own_cpu() {
    if !require_netns_with(&[("taskset", "util-linux")]) {
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

    let [a, b] = router_pids(&mut mesh);
    if cpus >= 2 {
        // As root the steering programs load and every placement step succeeds: threads on
        // their CPUs, packets steered to them.
        for pid in [a, b] {
            pinned_workers(pid).unwrap_or_else(|e| panic!("router {pid}: {e}"));
        }
        assert_steered_by_cpu(a0, b0, [a, b]);
        assert_steered_by_cpu(b0, a0, [b, a]);
    }
    // With one CPU there is nothing to pin to, and nothing to observe: every thread runs
    // on that CPU whatever the router decides; it must only carry the traffic above.
    assert_all_running(&mut mesh);
}

/// The router processes of a two-node mesh.
fn router_pids(mesh: &mut Mesh) -> [u32; 2] {
    let [a, b] = mesh.devices_mut() else {
        panic!("two routers")
    };
    [a, b].map(|device| device.daemon_mut().pid().expect("running"))
}

#[test]
fn adaptive_workers_spread_under_load_and_pin_again_when_quiet() {
    if !require_netns_with(&[("taskset", "util-linux")]) {
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
    let pids = router_pids(&mut mesh);
    for pid in pids {
        pinned_workers(pid).unwrap_or_else(|e| panic!("router {pid} not pinned while idle: {e}"));
    }
    // Far above the spreading threshold (1,000 packets per 100 ms) for several ticks, even
    // from debug builds on a loaded machine (~30,000 packets per second at 350 Mbit/s).
    // Meanwhile, watch each router's threads leave their single CPUs.
    let done = std::sync::atomic::AtomicBool::new(false);
    let seen_spread = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = [false; 2];
            while !done.load(std::sync::atomic::Ordering::Relaxed) && seen != [true; 2] {
                for (seen, pid) in seen.iter_mut().zip(pids) {
                    *seen |= workers_spread(pid);
                }
                std::thread::sleep(tailsk8s_e2e::wait::POLL_INTERVAL);
            }
            seen
        });
        transfer(a0, b0, false, 200 * MB, "adaptive workers under load");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert_eq!(seen_spread, [true; 2], "routers {pids:?} spread under load");
    // Once quiet for a second, both routers pin their workers again…
    for pid in pids {
        tailsk8s_e2e::wait::until(
            &format!("router {pid} pins its workers again"),
            std::time::Duration::from_secs(10),
            || Ok(pinned_workers(pid).ok()),
        )
        .unwrap();
    }
    // …and steer packets to them again, and the tunnel still works after the moves.
    let [a, b] = pids;
    assert_steered_by_cpu(a0, b0, [a, b]);
    ping(b0.netns(), a0.ip(true), 3).unwrap();
    assert_all_running(&mut mesh);
}
