//! Reliability of the router under faults, load and attack, end to end on the lab's
//! namespaces (issue 10): a crash or clean restart during a transfer, random underlay loss,
//! a relay that reorders and duplicates datagrams, garbage and handshake floods at the
//! listen port, MTU edges and a smaller underlay MTU, secrets on disk and in the log, bad
//! key files at start, and a soak.
//!
//! The quick tests run with the suite. The long ones and the measurements are `#[ignore]`d
//! and run one at a time by `scripts/reliability` (`cargo test -p tailsk8s-e2e --test
//! reliability -- --ignored --test-threads=1`), which `scripts/test` runs with a shorter
//! soak; the soak lasts `TAILSK8S_SOAK_SECONDS` (default 600). Measurements print their
//! figures (`--nocapture` shows them) and never assert on throughput: the CPU is shared.
//! RELIABILITY.md records the figures.
//!
//! Drops are seen from outside — a sequence stream counted at the receiving pod, the TUN's
//! counters, the kernel's UDP socket and TUN queue drops, and TCP's view at the pods
//! (retransmissions, D-SACKs, out-of-order segments) — and, for the replay drops under full
//! load, from the routers' own counters by reason on `/metrics`.
//!
//! Peer churn beside a running transfer is in `churn.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tailsk8s_e2e::config_router::{
    rules_for_table, table_routes, wait_until_serving, Exited, ROUTE_TABLE,
};
use tailsk8s_e2e::counters::{self, KernelDrops, TcpView};
use tailsk8s_e2e::flood::{self, FloodReport, Flooder};
use tailsk8s_e2e::iperf;
use tailsk8s_e2e::relay::{self, Faults, RelayReport};
use tailsk8s_e2e::scrape;
use tailsk8s_e2e::sequence::{self, StreamCount};
use tailsk8s_e2e::{
    ping, require_netns, tailsk8s_binary, tcp_transfer, wait, ConfigMesh, ConfigRouter, Daemon,
    KeyPair, MeshOptions, Netns, Node, PeerSpec, Pod, ShowDump, Topology, TopologyBuilder,
};

const MB: u64 = 1 << 20;
const LISTEN_PORT: u16 = 51820;
/// Issue 10: pod traffic resumes within this long after the router is started again.
const RESUME_WITHIN: Duration = Duration::from_secs(3);
/// Long enough to still run when the router is restarted once 1 MiB has crossed.
const RESTART_TRANSFER: u64 = 256 * MB;
/// The soak's length unless `TAILSK8S_SOAK_SECONDS` says otherwise (issue 10: 10 minutes).
const SOAK_SECONDS_ENV: &str = "TAILSK8S_SOAK_SECONDS";
const SOAK_SECONDS: u64 = 600;
/// The common rate of the paced floods: one flooder thread reaches it with either kind on
/// the shared 2-vCPU machine.
const FLOOD_PACED_RATE: u64 = 50_000;

fn two_nodes() -> Topology {
    TopologyBuilder::new(2).build().unwrap()
}

fn nodes(topo: &Topology) -> (&Node, &Node) {
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    (a, b)
}

/// The first pod of each node: traffic goes from the first to the second.
fn pods(topo: &Topology) -> (&Pod, &Pod) {
    let (a, b) = nodes(topo);
    (&a.pods()[0], &b.pods()[0])
}

/// One echo request with a 1 s timeout: did the reply come?
fn ping_once(ns: &Netns, addr: IpAddr) -> anyhow::Result<bool> {
    let addr = addr.to_string();
    let out = ns
        .command("ping")?
        .args(["-n", "-q", "-c", "1", "-W", "1", &addr])
        .output()?;
    Ok(out.status.success())
}

/// Bytes `router` has received from the peer with `public_key` (0 when it has none).
fn rx_from(router: &ConfigRouter<'_>, public_key: &str) -> anyhow::Result<u64> {
    Ok(router
        .dump()?
        .peer(public_key)
        .map_or(0, |peer| peer.rx_bytes))
}

fn router_pid(router: &mut ConfigRouter<'_>) -> u32 {
    router.daemon_mut().and_then(|d| d.pid()).expect("running")
}

/// The lines of `ip -o link show` in `ns`.
fn links(ns: &Netns) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits for a first pod-to-pod reply, so that a session exists before a measurement.
fn wait_for_session(from: &Pod, to: &Pod) {
    ping(from.netns(), to.ipv4().into(), 1).unwrap();
}

/// The config-file routers of `topo` with `options`, once the first pods of node 1 and
/// node 2 have a session.
fn mesh_with_session<'t>(topo: &'t Topology, options: &MeshOptions) -> ConfigMesh<'t> {
    let mesh = ConfigMesh::start(topo, options).unwrap();
    let (from, to) = pods(topo);
    wait_for_session(from, to);
    mesh
}

/// Runs `background` (which must return once its flag is set) beside `body`; sets the flag
/// when `body` is done and returns both results.
fn beside<T: Send, R: Send>(
    background: impl FnOnce(&AtomicBool) -> anyhow::Result<R> + Send,
    body: impl FnOnce() -> T + Send,
) -> (T, R) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| background(&stop));
        let result = body();
        stop.store(true, Ordering::Relaxed);
        (result, running.join().unwrap().unwrap())
    })
}

/// `node` as a peer with `public_key`, reached at `endpoint`, carrying its pod CIDRs.
fn peer_of(node: &Node, public_key: &str, endpoint: SocketAddr) -> PeerSpec {
    PeerSpec {
        public_key: public_key.to_string(),
        endpoint: Some(endpoint),
        allowed_ips: node.pod_cidrs(),
        persistent_keepalive: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Restart

/// Restarts node 1's router (crash or clean) while a TCP transfer from a pod on node 1 to a
/// pod on node 2 runs; node 2's router is never touched.
fn restart_during_a_transfer(crash: bool) {
    let topo = two_nodes();
    let mut mesh = mesh_with_session(&topo, &MeshOptions::default());
    let (from, to) = pods(&topo);
    let key = mesh.routers()[0].public_key().unwrap().to_string();
    let reported = mesh.routers()[0].dump().unwrap().interface.public_key;
    assert_eq!(reported.as_deref(), Some(key.as_str()));
    let remote_peer = mesh.routers()[1].dump().unwrap().peer(&key).cloned();
    let remote_pid = router_pid(&mut mesh.routers_mut()[1]);
    let what = if crash { "kill -9" } else { "SIGTERM" };

    std::thread::scope(|scope| {
        let transfer = scope
            .spawn(|| tcp_transfer(from.netns(), to.netns(), to.ipv4().into(), RESTART_TRANSFER));
        wait::until(
            "1 MiB of the transfer has crossed",
            Duration::from_secs(30),
            || Ok((rx_from(&mesh.routers()[1], &key)? > MB).then_some(())),
        )
        .unwrap();
        assert!(
            !transfer.is_finished(),
            "the transfer ended before the restart: make RESTART_TRANSFER larger"
        );
        let router = &mut mesh.routers_mut()[0];
        let down = Instant::now();
        if crash {
            router.kill().unwrap();
        } else {
            let status = router.stop().unwrap();
            assert_eq!(status.code(), Some(0), "{what}: {status}");
        }
        let started = Instant::now();
        router.start().unwrap();
        let serving = started.elapsed();
        let resumed = wait::until("pod traffic resumes", RESUME_WITHIN, || {
            Ok(ping_once(from.netns(), to.ipv4().into())?.then(|| started.elapsed()))
        })
        .unwrap();
        let report = transfer.join().unwrap().unwrap();
        report.verify(from.ipv4().into()).unwrap();
        eprintln!(
            "{what} during a {} MiB transfer: stopped in {:?}, serving {serving:?} after \
             start, pings cross again {resumed:?} after start; transfer intact in {:?} \
             ({:.0} Mbit/s overall)",
            RESTART_TRANSFER / MB,
            started - down,
            report.elapsed,
            report.mbit_per_second()
        );
    });
    let router = &mesh.routers()[0];
    assert_eq!(router.dump().unwrap().interface.public_key, reported);
    // The peer was never reconfigured or restarted: same process, same view of us.
    let remote = &mut mesh.routers_mut()[1];
    assert_eq!(router_pid(remote), remote_pid);
    let remote_after = remote.dump().unwrap();
    let remote_after = remote_after.peer(&key).unwrap();
    let remote_peer = remote_peer.unwrap();
    assert_eq!(
        (&remote_after.endpoint, &remote_after.allowed_ips),
        (&remote_peer.endpoint, &remote_peer.allowed_ips)
    );
}

#[test]
fn kill_9_during_a_transfer_resumes_within_3_s_with_the_same_key_and_the_transfer_completes() {
    if !require_netns() {
        return;
    }
    restart_during_a_transfer(true);
}

#[test]
fn sigterm_and_start_during_a_transfer_lose_only_in_flight_packets() {
    if !require_netns() {
        return;
    }
    restart_during_a_transfer(false);
}

// ---------------------------------------------------------------------------------------------
// Loss

/// Makes every node's underlay link carry single datagrams: the routers send UDP GSO
/// superpackets, which a veth passes whole, so a rule dropping "a packet" would drop
/// dozens of datagrams at once. With `gso_max_segs 1` the kernel segments them before the
/// link, as a real NIC puts single datagrams on the wire.
fn single_datagrams_on_the_underlay(topo: &Topology) {
    for node in topo.nodes() {
        node.netns()
            .ip(&["link", "set", "ul0", "gso_max_segs", "1"])
            .unwrap();
    }
}

/// Counts the UDP datagrams arriving on each node's underlay link and drops `percent`% of
/// them at random (nftables `numgen random`).
fn add_underlay_loss(topo: &Topology, percent: u32) {
    for node in topo.nodes() {
        let ns = node.netns();
        for rule in [
            "add table inet tsk_loss".to_string(),
            "add chain inet tsk_loss input { type filter hook input priority 0 ; policy accept ; }"
                .into(),
            "add rule inet tsk_loss input iifname \"ul0\" meta l4proto udp counter".into(),
            format!(
                "add rule inet tsk_loss input iifname \"ul0\" meta l4proto udp \
                 numgen random mod 100 < {percent} counter drop"
            ),
        ] {
            ns.exec("nft", &[rule]).unwrap();
        }
    }
}

/// (datagrams that arrived, datagrams the loss rule dropped) on `node`.
fn underlay_counts(node: &Node) -> (u64, u64) {
    let text = node
        .netns()
        .output("nft", &["list", "chain", "inet", "tsk_loss", "input"])
        .unwrap();
    let counts: Vec<u64> = text
        .split("counter packets ")
        .skip(1)
        .map(|after| after.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    (counts[0], counts[1])
}

/// Issue 10: 5% random underlay loss, a 100 MB pod-to-pod transfer completes intact;
/// goodput against no loss. Without loss, TCP retransmissions at the sender count what
/// the tunnel dropped under full load (replay, queues): the router exports no drop counter.
#[test]
#[ignore = "long: 2 × 100 MB, run by scripts/reliability"]
fn five_percent_underlay_loss_a_100_mb_transfer_completes_intact() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mesh = mesh_with_session(&topo, &MeshOptions::default());
    let (from, to) = pods(&topo);
    single_datagrams_on_the_underlay(&topo);
    let bytes = 100 * 1000 * 1000;
    let mut goodput = Vec::new();
    for loss in [0, 5] {
        if loss > 0 {
            add_underlay_loss(&topo, loss);
        }
        let tcp_before = TcpView::read(from.netns(), to.netns()).unwrap();
        let drops_before = KernelDrops::read(&topo, &mesh).unwrap();
        let report = tcp_transfer(from.netns(), to.netns(), to.ipv4().into(), bytes).unwrap();
        let drops = KernelDrops::read(&topo, &mesh).unwrap().since(drops_before);
        report.verify(from.ipv4().into()).unwrap();
        let tcp = TcpView::read(from.netns(), to.netns())
            .unwrap()
            .since(tcp_before);
        let (arrived, dropped) = if loss > 0 {
            topo.nodes()
                .iter()
                .map(underlay_counts)
                .fold((0, 0), |(a, d), (na, nd)| (a + na, d + nd))
        } else {
            (0, 0)
        };
        eprintln!(
            "{loss}% underlay loss: 100 MB intact in {:?}, {:.0} Mbit/s goodput, {tcp:?}, \
             underlay dropped {dropped} of {arrived} datagrams, {drops:?}",
            report.elapsed,
            report.mbit_per_second()
        );
        if loss > 0 {
            // The fault is what it claims: about `loss`% of single datagrams.
            let share = dropped as f64 / arrived.max(1) as f64;
            assert!(
                arrived > 50_000 && (0.03..0.07).contains(&share),
                "{dropped} of {arrived} dropped"
            );
        }
        goodput.push(report.mbit_per_second());
    }
    eprintln!(
        "goodput under 5% loss: {:.0}% of the lossless figure",
        100.0 * goodput[1] / goodput[0]
    );
}

// ---------------------------------------------------------------------------------------------
// Reordering and duplication

/// Two routers whose peers reach each other through `relay` (an address in node 1), on
/// [`LISTEN_PORT`].
fn pair_through<'t>(topo: &'t Topology, relay: SocketAddr) -> Vec<ConfigRouter<'t>> {
    let binary = tailsk8s_binary().unwrap();
    let nodes = topo.nodes();
    let mut routers: Vec<ConfigRouter<'t>> = nodes
        .iter()
        .map(|node| {
            let mut router = ConfigRouter::new(node.netns()).unwrap();
            router
                .write_private_key(&KeyPair::generate(&binary).unwrap())
                .unwrap();
            router
        })
        .collect();
    for (k, router) in routers.iter().enumerate() {
        let other = 1 - k;
        let mut config = router.config();
        config.listen_port = Some(LISTEN_PORT);
        config.metrics_listen = Some(METRICS.parse().unwrap());
        config.peers.push(peer_of(
            &nodes[other],
            routers[other].public_key().unwrap(),
            relay,
        ));
        router.write_config(&config).unwrap();
    }
    for router in &mut routers {
        router.start().unwrap();
    }
    routers
}

/// Runs a relay in node 1 at `relay_addr` with `faults`, and through it, once a session
/// exists, a numbered stream of `count` datagrams from the first pod of node 1 to the first
/// of node 2; returns what the receiving pod counted and what the relay did.
fn stream_through_relay(
    topo: &Topology,
    relay_addr: SocketAddr,
    faults: Faults,
    count: u32,
) -> (StreamCount, RelayReport) {
    let (a, b) = nodes(topo);
    let (from, to) = pods(topo);
    let relaying = |stop: &AtomicBool| {
        relay::run(
            a.netns(),
            relay_addr,
            SocketAddr::new(a.underlay_v4().into(), LISTEN_PORT),
            SocketAddr::new(b.underlay_v4().into(), LISTEN_PORT),
            faults,
            stop,
        )
    };
    beside(relaying, || {
        wait::until(
            "a session through the relay",
            Duration::from_secs(15),
            || Ok(ping_once(from.netns(), to.ipv4().into())?.then_some(())),
        )
        .unwrap();
        sequence::stream(from, to, count).unwrap()
    })
}

fn relay_addr(topo: &Topology) -> SocketAddr {
    SocketAddr::new(nodes(topo).0.underlay_v4().into(), 40000)
}

/// Issue 10: a relay that reorders (within the replay window) and duplicates datagrams;
/// every inner packet reaches the pod exactly once.
#[test]
fn reordered_and_duplicated_datagrams_deliver_every_inner_packet_once() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let relay = relay_addr(&topo);
    let _routers = pair_through(&topo, relay);
    let faults = Faults {
        hold_every: 10,
        displacement: 64,
        duplicate_every: 7,
    };
    let (count, relayed) = stream_through_relay(&topo, relay, faults, 5000);
    // Where a missing datagram went, should one be: the routers' drops by reason.
    let drops: Vec<BTreeMap<String, u64>> = drops_of(&topo)
        .into_iter()
        .map(|d| d.into_iter().filter(|&(_, n)| n > 0).collect())
        .collect();
    eprintln!("relay: {relayed:?}; receiving pod: {count:?}; routers' drops {drops:?}");
    assert!(
        relayed.held > 100 && relayed.duplicated > 100,
        "the relay did not reorder and duplicate: {relayed:?}"
    );
    assert_eq!(count.duplicates, 0, "{count:?}; routers' drops {drops:?}");
    assert_eq!(count.missing, 0, "{count:?}; routers' drops {drops:?}");
}

/// Measurement: how far back a datagram may arrive and still be delivered (the replay
/// window). The router's window is the kernel's, 8,128 packets (boringtun's was 1,024):
/// nothing displaced by up to 8,000 is lost; beyond, every datagram lost is counted at the
/// receiving router as `replay_too_old`, none as a duplicate.
#[test]
#[ignore = "measurement: the replay window's reach, run by scripts/reliability"]
fn replay_window_reach() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let relay = relay_addr(&topo);
    let _routers = pair_through(&topo, relay);
    let mut reach = BTreeMap::new();
    for displacement in [500, 1000, 1100, 2000, 4000, 8000, 9000] {
        let faults = Faults {
            hold_every: 500,
            displacement,
            duplicate_every: 0,
        };
        let before = drops_of(&topo);
        let (count, relayed) =
            stream_through_relay(&topo, relay, faults, displacement as u32 + 10_000);
        let counted = scrape::grown(&before[1], &drops_of(&topo)[1]);
        eprintln!(
            "displacement {displacement}: held {} of {} data packets, receiving pod \
             missing {} of {}, duplicates {}; receiving router's drops {counted:?}",
            relayed.held, relayed.forwarded, count.missing, count.sent, count.duplicates
        );
        assert_eq!(count.duplicates, 0, "{count:?}");
        let replay_drops: u64 = ["replay", "replay_too_old"]
            .iter()
            .map(|r| counted.get(*r).copied().unwrap_or(0))
            .sum();
        let of = |reason: &str| counted.get(reason).copied().unwrap_or(0);
        assert_eq!(
            (replay_drops, of("replay")),
            (u64::from(count.missing), 0),
            "every datagram the pod missed is a too-old drop: {counted:?}"
        );
        // The relay releases what it still holds when the stream ends (or pauses 50 ms), so
        // a held datagram is displaced by at most `displacement`: beyond the kernel's window
        // only when that is.
        if displacement <= 8128 {
            assert_eq!(count.missing, 0, "inside the window: {counted:?}");
        } else {
            assert!(of("replay_too_old") > 0, "{counted:?}");
        }
        reach.insert(displacement, (relayed.held, count.missing));
    }
    eprintln!("replay window reach (displacement → (held, missing)): {reach:?}");
}

/// Where each router serves `/metrics` in its node's namespace.
const METRICS: &str = "127.0.0.1:9586";
/// Seconds of each full-load run.
const FULL_LOAD_SECONDS: u64 = 10;

/// The mesh's defaults, with every router serving `/metrics` on [`METRICS`].
fn with_metrics() -> MeshOptions {
    MeshOptions::with_metrics(METRICS.parse().unwrap())
}

/// Every router's drop counters by reason.
fn drops_of(topo: &Topology) -> Vec<BTreeMap<String, u64>> {
    let listen: SocketAddr = METRICS.parse().unwrap();
    topo.nodes()
        .iter()
        .map(|node| scrape::drops_by_reason(&scrape::metrics(node.netns(), listen).unwrap()))
        .collect()
}

/// Measurement (issue 10): replay drops by kind at both routers under full load through
/// every worker — one TCP stream and four (iperf3) — with the router's defaults (one worker
/// per core). Several workers encrypt and decrypt for the one peer, so its packets may be
/// reordered on the way; none may fall out of the 8,128-message window (`replay_too_old`)
/// or be taken for a duplicate (`replay`).
#[test]
#[ignore = "measurement: replay drops under full load, run by scripts/reliability"]
fn replay_drops_under_multi_worker_full_load() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let options = with_metrics();
    let mesh = mesh_with_session(&topo, &options);
    let (from, to) = pods(&topo);
    let mut replay_drops = 0;
    for streams in [1, 4, 1, 4] {
        let before = drops_of(&topo);
        let tcp_before = TcpView::read(from.netns(), to.netns()).unwrap();
        let kernel_before = KernelDrops::read(&topo, &mesh).unwrap();
        let mbit = iperf::mbit_parallel(from, to, FULL_LOAD_SECONDS, streams).unwrap();
        let tcp = TcpView::read(from.netns(), to.netns())
            .unwrap()
            .since(tcp_before);
        let kernel = KernelDrops::read(&topo, &mesh)
            .unwrap()
            .since(kernel_before);
        let grown: Vec<_> = before
            .iter()
            .zip(drops_of(&topo))
            .map(|(b, a)| scrape::grown(b, &a))
            .collect();
        eprintln!(
            "{streams} stream(s), {FULL_LOAD_SECONDS} s: {mbit:.0} Mbit/s; {tcp:?}; {kernel:?}; \
             drops grown at router 1 {:?}, router 2 {:?}",
            grown[0], grown[1]
        );
        replay_drops += grown
            .iter()
            .flat_map(|g| ["replay", "replay_too_old"].map(|r| g.get(r).copied().unwrap_or(0)))
            .sum::<u64>();
    }
    assert_eq!(replay_drops, 0, "replay drops under full load");
}

// ---------------------------------------------------------------------------------------------
// Floods

/// Garbage for a flood: half random bytes, half with a transport data header (type 4)
/// and random receiver index, counter and "ciphertext" of varied length.
fn garbage_payloads() -> Vec<Vec<u8>> {
    let mut payloads = flood::garbage(1024, 148).unwrap();
    for (i, datagram) in payloads.iter_mut().enumerate() {
        if i % 2 == 1 {
            datagram[..4].copy_from_slice(&[4, 0, 0, 0]);
            datagram.truncate(32 + (i % 116));
        }
    }
    payloads
}

fn listen_addr(node: &Node) -> SocketAddr {
    SocketAddr::new(node.underlay_v4().into(), LISTEN_PORT)
}

/// Floods `target` from `flooder` with `payloads` (at most `rate` per second) while
/// `body` runs.
fn while_flooding<T: Send>(
    flooder: &Flooder,
    target: SocketAddr,
    payloads: &[Vec<u8>],
    rate: Option<u64>,
    body: impl FnOnce() -> T + Send,
) -> (T, FloodReport) {
    beside(|stop| flooder.flood(target, payloads, rate, stop), body)
}

/// Waits until the router's sockets have taken every queued datagram.
fn wait_for_empty_socket_queues(ns: &Netns) {
    wait::until(
        "the router's UDP receive queues drain",
        Duration::from_secs(10),
        || Ok((counters::udp_sockets_on(ns, LISTEN_PORT)?.0 == 0).then_some(())),
    )
    .unwrap();
}

/// Drops of datagrams: every reason but `no_route`, the TUN's side (the kernel's own IPv6
/// router solicitations into the TUN).
fn datagram_drops(counted: &BTreeMap<String, u64>) -> u64 {
    counted
        .iter()
        .filter(|(reason, _)| *reason != "no_route")
        .map(|(_, n)| n)
        .sum()
}

/// Issue 10: random datagrams at full rate at a router's listen port: no crash, nothing
/// written to the TUN, the router answers UAPI, and a transfer through it completes.
#[test]
fn a_garbage_flood_writes_nothing_to_the_tun_and_a_transfer_still_completes() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let options = with_metrics();
    let mut mesh = mesh_with_session(&topo, &options);
    let (from, to) = pods(&topo);
    let (_, b) = nodes(&topo);
    let flooder = Flooder::attach(b).unwrap();
    let payloads = garbage_payloads();
    let ifname = mesh.routers()[1].ifname().to_string();
    let router_ns = b.netns();
    let (socket_drops_before, tun_before) = (
        counters::udp_sockets_on(router_ns, LISTEN_PORT).unwrap().1,
        counters::tun_rx_packets(router_ns, &ifname).unwrap(),
    );
    let (drops_before, delivered_before) = (
        drops_of(&topo)[1].clone(),
        counters::snmp(router_ns, "Udp", "InDatagrams").unwrap(),
    );
    // Nothing but the flood reaches the router here: its TUN must stay silent.
    let ((), garbage_only) = while_flooding(&flooder, listen_addr(b), &payloads, None, || {
        wait::until("200,000 flood datagrams", Duration::from_secs(60), || {
            Ok((counters::snmp(flooder.netns(), "Udp", "OutDatagrams")? > 200_000).then_some(()))
        })
        .unwrap();
    });
    wait_for_empty_socket_queues(router_ns);
    assert_eq!(
        counters::tun_rx_packets(router_ns, &ifname).unwrap(),
        tun_before,
        "the router wrote flood packets to its TUN"
    );
    // Every flood datagram its sockets took is a drop counted by reason: random bytes as
    // malformed (or a handshake message failing its MAC), a data header naming no session
    // as an unknown peer. (With UDP GRO the kernel may count a run of equal-sized datagrams
    // as one delivery, so the deliveries are a floor.)
    let delivered = counters::snmp(router_ns, "Udp", "InDatagrams").unwrap() - delivered_before;
    // The last batch read may still be on its way through a worker.
    let _ = wait::until("the flood's drops counted", Duration::from_secs(5), || {
        let counted = scrape::grown(&drops_before, &drops_of(&topo)[1]);
        Ok((datagram_drops(&counted) * 10 >= delivered * 9).then_some(()))
    });
    let counted = scrape::grown(&drops_before, &drops_of(&topo)[1]);
    let total = datagram_drops(&counted);
    eprintln!(
        "garbage flood: {delivered} datagrams delivered to the router's sockets; drops {counted:?}"
    );
    for reason in ["malformed_datagram", "unknown_peer"] {
        assert!(
            counted.get(reason).copied().unwrap_or(0) > 0,
            "no {reason} drop: {counted:?}"
        );
    }
    assert!(
        total * 10 >= delivered * 9 && total <= garbage_only.sent,
        "{total} drops counted for {delivered} datagrams delivered, {} sent: {counted:?}",
        garbage_only.sent
    );
    tailsk8s_e2e::config_router::uapi_get(&ifname).unwrap();
    // The counter does see what the router writes: one echo request crosses.
    assert!(ping_once(from.netns(), to.ipv4().into()).unwrap());
    assert!(counters::tun_rx_packets(router_ns, &ifname).unwrap() > tun_before);

    let (report, with_transfer) = while_flooding(&flooder, listen_addr(b), &payloads, None, || {
        // The router's own tools keep answering while the flood runs.
        mesh.routers()[1].dump().unwrap();
        tcp_transfer(from.netns(), to.netns(), to.ipv4().into(), 16 * MB)
    });
    report.unwrap().verify(from.ipv4().into()).unwrap();
    let router = mesh.routers_mut()[1].daemon_mut().unwrap();
    assert_eq!(router.exited().unwrap(), None, "{}", router.log());
    eprintln!(
        "garbage flood alone: {garbage_only:?} ({:.0}/s); with a 16 MiB transfer: \
         {with_transfer:?} ({:.0}/s); kernel socket drops at the router: {}",
        garbage_only.rate(),
        with_transfer.rate(),
        counters::udp_sockets_on(router_ns, LISTEN_PORT).unwrap().1 - socket_drops_before
    );
}

/// Measurement (issue 10): one TCP stream's throughput unflooded, under a flood of garbage
/// and under a flood of handshake initiations with a valid MAC1 for the receiving router's
/// key, from one flooder thread at the receiving router's listen port. Reports flood rate,
/// cookie replies and the router's CPU. The target (≥ 80% of the garbage-flood figure
/// under the handshake flood) needs data-plane work: this only measures.
#[test]
#[ignore = "measurement: throughput under floods, run by scripts/reliability"]
fn handshake_flood_against_garbage_flood_throughput() {
    if !require_netns() {
        return;
    }
    let seconds = 5;
    let topo = two_nodes();
    let mut mesh = mesh_with_session(&topo, &MeshOptions::default());
    let (from, to) = pods(&topo);
    let (_, b) = nodes(&topo);
    let flooder = Flooder::attach(b).unwrap();
    let public: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(mesh.routers()[1].public_key().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let pid = router_pid(&mut mesh.routers_mut()[1]);

    let unflooded = iperf::mbit(from, to, seconds).unwrap();
    eprintln!("unflooded: {unflooded:.0} Mbit/s");
    let kinds = [
        ("garbage", garbage_payloads()),
        (
            "valid-MAC1 initiations",
            flood::initiations(&public, 1024).unwrap(),
        ),
    ];
    // As fast as the flooder can, then both kinds at the same paced rate: the rates one
    // thread reaches differ by kind and by how much CPU the other jobs leave it.
    for rate in [None, Some(FLOOD_PACED_RATE)] {
        let mut results = Vec::new();
        for (name, payloads) in &kinds {
            let cpu_before = counters::cpu_time(pid).unwrap();
            let started = Instant::now();
            let sent_before = counters::snmp(flooder.netns(), "Udp", "OutDatagrams").unwrap();
            let ((mbit, uapi_latency), report) =
                while_flooding(&flooder, listen_addr(b), payloads, rate, || {
                    wait::until("the flood under way", Duration::from_secs(10), || {
                        let sent = counters::snmp(flooder.netns(), "Udp", "OutDatagrams")?;
                        Ok((sent > sent_before + 10_000).then_some(()))
                    })
                    .unwrap();
                    // The router's control side stays responsive under the flood.
                    let asked = Instant::now();
                    tailsk8s_e2e::config_router::uapi_get(mesh.routers()[1].ifname()).unwrap();
                    let uapi_latency = asked.elapsed();
                    (iperf::mbit(from, to, seconds).unwrap(), uapi_latency)
                });
            let cpu = counters::cpu_time(pid).unwrap() - cpu_before;
            let router = mesh.routers_mut()[1].daemon_mut().unwrap();
            assert_eq!(router.exited().unwrap(), None, "{}", router.log());
            tailsk8s_e2e::config_router::uapi_get(mesh.routers()[1].ifname()).unwrap();
            eprintln!(
                "{name} flood ({}): {:.0} datagrams/s ({} sent, {} answers, {} cookie \
                 replies); transfer {mbit:.0} Mbit/s = {:.0}% of unflooded; router CPU \
                 {:.0}%; a UAPI get took {uapi_latency:?}",
                rate.map_or("as fast as it can".to_string(), |r| format!(
                    "paced at {r}/s"
                )),
                report.rate(),
                report.sent,
                report.received,
                report.cookie_replies,
                100.0 * mbit / unflooded,
                100.0 * cpu.as_secs_f64() / started.elapsed().as_secs_f64()
            );
            results.push((mbit, report));
        }
        let (garbage, handshake) = (results[0].0, results[1].0);
        eprintln!(
            "under the handshake flood: {:.0}% of the garbage-flood figure (target ≥ 80%)",
            100.0 * handshake / garbage
        );
        // The flood must be what it claims: the router recognised the MAC1 (cookie replies
        // are only sent for initiations whose MAC1 is valid).
        assert!(
            results[1].1.cookie_replies > 0,
            "no cookie reply: the MAC1 was not accepted? {:?}",
            results[1].1
        );
    }
    eprintln!(
        "unflooded again: {:.0} Mbit/s",
        iperf::mbit(from, to, seconds).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// MTU

/// A DF ping of `payload` bytes: `Ok(true)` on a reply, `Ok(false)` on "fragmentation
/// needed" / "packet too big" naming `mtu`, an error on anything else.
fn df_ping(from: &Pod, to: IpAddr, payload: u32, mtu: u32) -> anyhow::Result<bool> {
    let out = from
        .netns()
        .command("ping")?
        .args(["-n", "-c", "1", "-W", "2", "-M", "do", "-s"])
        .arg(payload.to_string())
        .arg(to.to_string())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        return Ok(true);
    }
    let lower = text.to_lowercase();
    let says_too_big = lower.contains("frag needed")
        || lower.contains("message too long")
        || lower.contains("packet too big");
    let names_mtu =
        lower.contains(&format!("mtu = {mtu}")) || lower.contains(&format!("mtu={mtu}"));
    anyhow::ensure!(
        says_too_big && names_mtu,
        "ping -M do -s {payload} {to}: neither a reply nor \"fragmentation needed\" with mtu \
         {mtu}:\n{text}"
    );
    Ok(false)
}

/// Issue 10: DF pings at the tunnel MTU and ±1 byte: at and below it they cross, above it
/// the sender learns the MTU ("fragmentation needed" / "packet too big"), both families.
#[test]
fn df_pings_at_the_tunnel_mtu_plus_minus_one() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mtu = MeshOptions::default().mtu;
    let _mesh = mesh_with_session(&topo, &MeshOptions::default());
    let (from, to) = pods(&topo);
    for v6 in [false, true] {
        // IP and ICMP headers.
        let headers = if v6 { 40 + 8 } else { 20 + 8 };
        let at_mtu = mtu - headers;
        for payload in [at_mtu - 1, at_mtu] {
            assert!(
                df_ping(from, to.ip(v6), payload, mtu).unwrap(),
                "v6={v6}: a {} byte packet did not cross",
                payload + headers
            );
        }
        assert!(
            !df_ping(from, to.ip(v6), at_mtu + 1, mtu).unwrap(),
            "v6={v6}: a packet one byte over the tunnel MTU crossed"
        );
    }
}

/// Issue 10: an underlay whose MTU is smaller than the tunnel's needs (1420 + 80 bytes of
/// outer headers over a 1280 byte link): TCP transfers still complete, both families.
#[test]
fn a_transfer_completes_over_an_underlay_with_a_smaller_mtu_than_configured() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    for node in topo.nodes() {
        node.netns()
            .ip(&["link", "set", "ul0", "mtu", "1280"])
            .unwrap();
    }
    let _mesh = ConfigMesh::start(&topo, &MeshOptions::default()).unwrap();
    let (from, to) = pods(&topo);
    for v6 in [false, true] {
        let report = tcp_transfer(from.netns(), to.netns(), to.ip(v6), 8 * MB).unwrap();
        report.verify(from.ip(v6)).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// The base64 key of a key file, and the same key in hex (the UAPI spelling).
fn key_spellings(key_file: &Path) -> [String; 2] {
    let base64_key = fs::read_to_string(key_file).unwrap().trim().to_string();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&base64_key)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    [base64_key, hex]
}

/// Issue 10: the key file the router creates is 0600, its UAPI socket is 0600, and the
/// private key never appears in its log — at trace level, through a handshake, traffic and
/// a UAPI get (which returns the key to the caller, as it must).
#[test]
fn the_private_key_is_never_logged_and_key_file_and_socket_are_0600() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let (a, b) = nodes(&topo);
    let binary = tailsk8s_binary().unwrap();
    let traced = ConfigRouter::new(a.netns()).unwrap();
    let mut other = ConfigRouter::new(b.netns()).unwrap();
    other
        .write_private_key(&KeyPair::generate(&binary).unwrap())
        .unwrap();
    // Node 1's router creates its own key on its first start.
    let mut config = traced.config();
    config.listen_port = Some(LISTEN_PORT);
    config
        .peers
        .push(peer_of(b, other.public_key().unwrap(), listen_addr(b)));
    traced.write_config(&config).unwrap();
    let mut cmd = traced.command().unwrap();
    cmd.env("RUST_LOG", "trace");
    let mut daemon = Daemon::spawn("traced router", cmd).unwrap();
    wait_until_serving(&mut daemon, traced.ifname()).unwrap();

    let key_mode = fs::metadata(traced.key_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "key file mode {key_mode:o}");
    let socket_mode = fs::metadata(traced.socket_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(socket_mode, 0o600, "UAPI socket mode {socket_mode:o}");

    let public = traced.dump().unwrap().interface.public_key.unwrap();
    let mut config = other.config();
    config.listen_port = Some(LISTEN_PORT);
    config.peers.push(peer_of(a, &public, listen_addr(a)));
    other.write_config(&config).unwrap();
    other.start().unwrap();
    let (from, to) = pods(&topo);
    ping(from.netns(), to.ipv4().into(), 2).unwrap();
    tcp_transfer(from.netns(), to.netns(), to.ipv4().into(), MB)
        .unwrap()
        .verify(from.ipv4().into())
        .unwrap();
    let got = tailsk8s_e2e::config_router::uapi_get(traced.ifname()).unwrap();
    let [base64_key, hex_key] = key_spellings(&traced.key_path());
    assert!(got.contains(&format!("private_key={hex_key}")), "{got}");
    assert_eq!(daemon.stop().and_then(|s| s.code()), Some(0));

    let log = daemon.log();
    assert!(
        log.lines().count() > 5,
        "the trace log is nearly empty, so it shows nothing:\n{log}"
    );
    for (spelling, key) in [("base64", &base64_key), ("hex", &hex_key)] {
        assert!(
            !log.contains(key.as_str()),
            "the {spelling} private key is in the log"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bad key files at start (config_mode.rs covers bad configs, a missing or unreadable config
// file, loose key permissions and a key created on first start)

/// Runs a router whose key file `prepare` spoiled (without the read-any-file capabilities
/// when `drop_read_caps`); checks
/// it exits 1 with one error line naming the key file, and that nothing changed.
fn refuses_key_file(what: &str, prepare: impl Fn(&Path), drop_read_caps: bool) {
    let ns = Netns::new("badkey").unwrap();
    let router = ConfigRouter::new(&ns).unwrap();
    let key = router.key_path();
    prepare(&key);
    let before = fs::read(&key).ok();
    router.write_config(&router.config()).unwrap();
    let links_before = links(&ns);
    let run: Exited = if drop_read_caps {
        // Root reads any file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: drop both,
        // as a router in a restricted pod lacks them.
        let drop_caps = "-dac_override,-dac_read_search";
        let mut cmd = ns.command("setpriv").unwrap();
        cmd.arg(format!("--inh-caps={drop_caps}"))
            .arg(format!("--bounding-set={drop_caps}"))
            .arg(router.binary())
            .args(router.router_args());
        tailsk8s_e2e::config_router::run_to_exit(cmd, Duration::from_secs(10)).unwrap()
    } else {
        router.run_to_exit(Duration::from_secs(10)).unwrap()
    };
    assert_eq!(run.status.code(), Some(1), "{what}: {}", run.stderr);
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "{what}: not one line: {lines:?}");
    assert!(
        lines[0].starts_with("tailsk8s: error: "),
        "{what}: {}",
        lines[0]
    );
    let key_name = key.display().to_string();
    assert!(
        lines[0].contains(&key_name),
        "{what}: does not name the key file: {}",
        lines[0]
    );
    assert_eq!(links(&ns), links_before, "{what}: links changed");
    assert!(!router.socket_path().exists(), "{what}: a socket was left");
    assert!(
        table_routes(&ns, ROUTE_TABLE).unwrap().is_empty(),
        "{what}: routes"
    );
    assert!(
        rules_for_table(&ns, ROUTE_TABLE).unwrap().is_empty(),
        "{what}: rules"
    );
    assert_eq!(fs::read(&key).ok(), before, "{what}: the key file changed");
}

#[test]
fn a_key_file_that_is_not_a_key_is_refused_naming_it_and_changes_nothing() {
    if !require_netns() {
        return;
    }
    refuses_key_file(
        "key file with garbage",
        |key| {
            KeyPair::new("not a base64 key", "-")
                .write_private(key)
                .unwrap();
        },
        false,
    );
}

#[test]
fn an_unreadable_key_file_is_refused_naming_it_and_changes_nothing() {
    if !tailsk8s_e2e::gate::require_netns_with(&[("setpriv", "util-linux")]) {
        return;
    }
    refuses_key_file(
        "unreadable key file",
        |key| {
            KeyPair::generate(&tailsk8s_binary().unwrap())
                .unwrap()
                .write_private(key)
                .unwrap();
            fs::set_permissions(key, fs::Permissions::from_mode(0o000)).unwrap();
        },
        true,
    );
}

// ---------------------------------------------------------------------------------------------
// Soak

/// Issue 10: continuous iperf3 at full rate for `TAILSK8S_SOAK_SECONDS` (default 10
/// minutes): both routers' RSS grows less than 10% after the warm-up and their open file
/// descriptors stay the same.
#[test]
#[ignore = "long: TAILSK8S_SOAK_SECONDS (default 600), run by scripts/reliability"]
fn soak_under_full_rate_iperf3_keeps_rss_and_file_descriptors_flat() {
    if !require_netns() {
        return;
    }
    let seconds: u64 = std::env::var(SOAK_SECONDS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SOAK_SECONDS);
    let topo = two_nodes();
    let options = with_metrics();
    let mut mesh = mesh_with_session(&topo, &options);
    let (from, to) = pods(&topo);
    let pids: Vec<u32> = mesh.routers_mut().iter_mut().map(router_pid).collect();
    let router_drops_before = drops_of(&topo);
    let _server = iperf::server(to).unwrap();
    let mut client = from
        .netns()
        .spawn("iperf3", &iperf::client_args(to, seconds))
        .unwrap();
    let tcp_before = TcpView::read(from.netns(), to.netns()).unwrap();
    let drops_before = KernelDrops::read(&topo, &mesh).unwrap();
    let started = Instant::now();
    // Warm-up: buffers and the worker placement settle in the first tenth (at least 5 s).
    let warm_up = Duration::from_secs((seconds / 10).max(5));
    let mut baseline: Option<Vec<(u64, usize)>> = None;
    let mut peak = vec![0u64; pids.len()];
    let status = loop {
        if let Some(status) = client.exited().unwrap() {
            break status;
        }
        let sample: Vec<(u64, usize)> = pids
            .iter()
            .map(|&pid| {
                (
                    counters::status_kb(pid, "VmRSS").unwrap(),
                    counters::fd_count(pid).unwrap(),
                )
            })
            .collect();
        if started.elapsed() >= warm_up {
            let base = baseline.get_or_insert_with(|| sample.clone());
            for (k, ((rss, fds), (base_rss, base_fds))) in
                sample.iter().zip(base.iter()).enumerate()
            {
                peak[k] = peak[k].max(*rss);
                assert_eq!(fds, base_fds, "router {}: fd count changed", k + 1);
                assert!(
                    *rss * 10 < *base_rss * 11,
                    "router {}: RSS {rss} kB is 10% over {base_rss} kB after {:?}",
                    k + 1,
                    started.elapsed()
                );
            }
        }
        // A sample a second: the soak measures, it does not wait for anything.
        std::thread::sleep(Duration::from_secs(1));
    };
    let out = client.log();
    assert!(status.success(), "iperf3 client: {status}\n{out}");
    let base = baseline.expect("the soak is longer than its warm-up");
    // No drop counter grows but the expected one: `no_route` for what the kernel itself
    // sends into the TUN (IPv6 router solicitations, MLD reports) to no peer.
    let router_drops: Vec<_> = router_drops_before
        .iter()
        .zip(drops_of(&topo))
        .map(|(before, after)| scrape::grown(before, &after))
        .collect();
    for (k, grown) in router_drops.iter().enumerate() {
        let unexpected: Vec<_> = grown.keys().filter(|r| *r != "no_route").collect();
        assert!(
            unexpected.is_empty(),
            "router {}: drop counters grew during the soak: {grown:?}",
            k + 1
        );
    }
    eprintln!(
        "soak {seconds} s: {} Mbit/s, {:?}, {:?}; RSS (kB) after warm-up {:?}, peak \
         {peak:?}; fds {:?}; router drops {router_drops:?}",
        iperf::receiver_mbit(&out).map_or("?".into(), |m| format!("{m:.0}")),
        TcpView::read(from.netns(), to.netns())
            .unwrap()
            .since(tcp_before),
        KernelDrops::read(&topo, &mesh).unwrap().since(drops_before),
        base.iter().map(|(rss, _)| rss).collect::<Vec<_>>(),
        base.iter().map(|(_, fds)| fds).collect::<Vec<_>>(),
    );
}
