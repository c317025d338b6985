//! `/metrics`, `/healthz`, `/readyz` and `tailsk8s status` of config-file routers in
//! namespaces (root): the counters the router exports are the ones `wg show` reports and
//! account for iperf3's datagrams both ways, drops are counted under their reason and their
//! peer, and `tailsk8s status --json` lists the peers it runs.

use std::collections::BTreeMap;
use std::time::Duration;

use tailsk8s_e2e::counters::KernelDrops;
use tailsk8s_e2e::wait;
use tailsk8s_e2e::{
    iperf, ping, require_netns, tailsk8s_binary, ConfigMesh, MeshOptions, Netns, Pod, ShowDump,
    TopologyBuilder,
};

const METRICS: &str = "127.0.0.1:9586";

/// GET `path` on the node's metrics server: (HTTP status, body).
fn http_get(node: &Netns, path: &str) -> (u16, String) {
    let url = format!("http://{METRICS}{path}");
    let out = node
        .output(
            "curl",
            &["-s", "-w", "\n%{http_code}", "--max-time", "5", &url],
        )
        .unwrap();
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    (code.parse().unwrap_or(0), body.to_string())
}

/// The samples of one metric, by their `public_key` label.
fn by_public_key(text: &str, name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        let key = labels
            .split(',')
            .find_map(|l| l.strip_prefix("public_key=\""))
            .map(|k| k.trim_end_matches('"').to_string())
            .unwrap();
        out.insert(key, value.parse::<f64>().unwrap() as u64);
    }
    out
}

/// The value of `name{public_key="KEY",…}` (0 when the series is absent).
fn peer_value(text: &str, name: &str, key: &str) -> u64 {
    by_public_key(text, name).get(key).copied().unwrap_or(0)
}

/// The value of `tailsk8s_peer_dropped_packets_total{public_key="KEY",…,reason="REASON"}`;
/// 0 while the peer has had no such drop (the series appears with the first).
fn peer_drops(text: &str, key: &str, reason: &str) -> u64 {
    let key_label = format!("public_key=\"{key}\"");
    let reason_label = format!("reason=\"{reason}\"");
    text.lines()
        .filter_map(|l| l.strip_prefix("tailsk8s_peer_dropped_packets_total{"))
        .filter_map(|rest| rest.rsplit_once("} "))
        .find(|(labels, _)| {
            let labels: Vec<&str> = labels.split(',').collect();
            labels.contains(&key_label.as_str()) && labels.contains(&reason_label.as_str())
        })
        .map_or(0, |(_, v)| v.parse::<f64>().unwrap() as u64)
}

/// The reasons of every per-peer drop series of peer `key`.
fn peer_drop_reasons(text: &str, key: &str) -> Vec<String> {
    let key_label = format!("public_key=\"{key}\"");
    text.lines()
        .filter_map(|l| l.strip_prefix("tailsk8s_peer_dropped_packets_total{"))
        .filter_map(|rest| rest.rsplit_once("} ").map(|(labels, _)| labels))
        .filter(|labels| labels.split(',').any(|l| l == key_label))
        .filter_map(|labels| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix("reason=\""))
                .map(|r| r.trim_end_matches('"').to_string())
        })
        .collect()
}

/// Datagram length of the UDP runs below, and their rate: low enough that a loaded
/// 2-vCPU machine carries it without loss most of the time (what is lost is counted).
const UDP_LEN: u64 = 1200;
const UDP_RATE: &str = "10M";
const UDP_SECONDS: &str = "3";

/// What one iperf3 UDP run says about its datagrams.
#[derive(Debug)]
struct UdpRun {
    /// Datagrams the sender sent.
    sent: u64,
    /// Datagrams the receiver got while it counted (the highest sequence number it saw less
    /// the gaps it counted as lost; a tail still on its way when the test ended is neither).
    received: u64,
}

/// One iperf3 UDP run of fixed-length datagrams at a fixed rate between two pods, from
/// `from` to `to` (or, `reverse`, from `to` to `from`, still started by `from`).
fn udp_run(from: &Pod, to: &Pod, reverse: bool) -> UdpRun {
    let _server = iperf::server(to).unwrap();
    let mut args = vec![
        "-c".to_string(),
        to.ipv4().to_string(),
        "-p".to_string(),
        iperf::PORT.to_string(),
        "-u".to_string(),
        "-b".to_string(),
        UDP_RATE.to_string(),
        "-l".to_string(),
        UDP_LEN.to_string(),
        "-t".to_string(),
        UDP_SECONDS.to_string(),
        "--json".to_string(),
    ];
    if reverse {
        args.push("-R".to_string());
    }
    let out = from.netns().output("iperf3", &args).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let count = |section: &str, field: &str| {
        json["end"][section][field]
            .as_u64()
            .unwrap_or_else(|| panic!("no end.{section}.{field} in iperf3's report:\n{out}"))
    };
    let run = UdpRun {
        sent: count("sum_sent", "packets"),
        received: count("sum_received", "packets") - count("sum_received", "lost_packets"),
    };
    assert_eq!(
        count("sum_sent", "bytes"),
        run.sent * UDP_LEN,
        "every datagram is {UDP_LEN} bytes:\n{out}"
    );
    assert!(run.received >= 1000, "too few datagrams crossed: {run:?}");
    run
}

/// A peer's counters as one router's `/metrics` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Traffic {
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
}

fn traffic(node: &Netns, peer: &str) -> Traffic {
    let (code, text) = http_get(node, "/metrics");
    assert_eq!(code, 200);
    Traffic {
        rx_bytes: peer_value(&text, "tailsk8s_peer_receive_bytes_total", peer),
        tx_bytes: peer_value(&text, "tailsk8s_peer_transmit_bytes_total", peer),
        rx_packets: peer_value(&text, "tailsk8s_peer_receive_packets_total", peer),
        tx_packets: peer_value(&text, "tailsk8s_peer_transmit_packets_total", peer),
    }
}

/// Reads `peer`'s counters on `node` until two reads 500 ms apart agree (a loaded router
/// may still be working through the end of a run when iperf3 has finished).
fn settled_traffic(node: &Netns, peer: &str) -> Traffic {
    let mut last = traffic(node, peer);
    wait::until("the counters settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = traffic(node, peer);
        let settled = now == last;
        last = now;
        Ok(settled.then_some(()))
    })
    .unwrap();
    last
}

/// Checks that `counted` lies in `low..=high`.
fn assert_between(counted: u64, low: u64, high: u64, what: &str) {
    assert!(
        (low..=high).contains(&counted),
        "{what}: {counted} outside {low}..={high}"
    );
}

#[test]
fn metrics_match_wg_show_and_iperf3_and_status_lists_the_peers() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let options = MeshOptions::with_metrics(METRICS.parse().unwrap());
    let mesh = ConfigMesh::start(&topo, &options).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (pa, pb) = (&a.pods()[0], &b.pods()[0]);
    ping(pa.netns(), pb.ip(false), 2).unwrap();
    let key_a = mesh.routers()[0].public_key().unwrap().to_string();
    let key_b = mesh.routers()[1].public_key().unwrap().to_string();

    // What one datagram of iperf3's is on the wire, as the counters count it: the WireGuard
    // data message (16-byte header, the inner IPv4 packet padded to 16 bytes, 16-byte tag),
    // without the outer IP and UDP headers.
    let inner = UDP_LEN + 8 + 20;
    let wire = 32 + inner.next_multiple_of(16).min(options.mtu.into());
    for reverse in [false, true] {
        let (sender, receiver) = if reverse { (b, a) } else { (a, b) };
        let (sender_peer, receiver_peer) = if reverse {
            (&key_a, &key_b)
        } else {
            (&key_b, &key_a)
        };
        let sent_before = settled_traffic(sender.netns(), sender_peer);
        let received_before = settled_traffic(receiver.netns(), receiver_peer);
        let kernel_before = KernelDrops::read(&topo, &mesh).unwrap();
        let run = udp_run(pa, pb, reverse);
        let sent = settled_traffic(sender.netns(), sender_peer);
        let received = settled_traffic(receiver.netns(), receiver_peer);
        let kernel = KernelDrops::read(&topo, &mesh)
            .unwrap()
            .since(kernel_before);
        let direction = if reverse { "b to a" } else { "a to b" };
        let tx_packets = sent.tx_packets - sent_before.tx_packets;
        let tx_bytes = sent.tx_bytes - sent_before.tx_bytes;
        let rx_packets = received.rx_packets - received_before.rx_packets;
        let rx_bytes = received.rx_bytes - received_before.rx_bytes;
        eprintln!(
            "{direction}: iperf3 {run:?}, kernel drops {kernel:?}; sender's router sent \
             {tx_packets} messages / {tx_bytes} bytes, receiver's router received \
             {rx_packets} / {rx_bytes} ({wire} bytes per datagram)"
        );
        // Each datagram iperf3 saw arrive went through both routers; no router sent more
        // than iperf3 sent plus 1% (the iperf3 control connection, its UDP connect exchange,
        // keepalives). With nothing lost the two bounds are 1% apart; what iperf3 says was
        // lost on a loaded machine (before, between or after the routers) widens them by
        // exactly that.
        let (low, high) = (run.received, run.sent + run.sent / 100);
        let what = |counter: &str| format!("{direction}: {counter} vs iperf3's {run:?}");
        assert_between(tx_packets, low, high, &what("sender's tx packets"));
        assert_between(
            tx_bytes,
            low * wire,
            high * wire,
            &what("sender's tx bytes"),
        );
        // The receiving router got no more than the sending one sent, and lost on the way
        // no more than the kernel and iperf3 account for.
        assert_between(rx_packets, low, tx_packets, &what("receiver's rx packets"));
        assert_between(rx_bytes, low * wire, tx_bytes, &what("receiver's rx bytes"));
        assert!(
            tx_packets - rx_packets <= kernel.udp_rcvbuf_errors + run.sent - run.received,
            "{direction}: the underlay lost more than iperf3 and the kernel say: {kernel:?}"
        );
    }

    assert_eq!(http_get(a.netns(), "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(a.netns(), "/readyz"), (200, "ok\n".to_string()));

    // No keepalives run, so the counters only move if something sends: read wg show on both
    // sides of the scrape and require the scrape to lie between.
    for (router, peer_key) in [(&mesh.routers()[0], &key_b), (&mesh.routers()[1], &key_a)] {
        let before = router.dump().unwrap();
        let (code, text) = http_get(router.netns(), "/metrics");
        let after = router.dump().unwrap();
        assert_eq!(code, 200);
        let (p0, p1) = (
            before.peer(peer_key).unwrap(),
            after.peer(peer_key).unwrap(),
        );
        let tx = peer_value(&text, "tailsk8s_peer_transmit_bytes_total", peer_key);
        let rx = peer_value(&text, "tailsk8s_peer_receive_bytes_total", peer_key);
        assert!(
            (p0.tx_bytes..=p1.tx_bytes).contains(&tx),
            "{tx} vs {p0:?} {p1:?}"
        );
        assert!(
            (p0.rx_bytes..=p1.rx_bytes).contains(&rx),
            "{rx} vs {p0:?} {p1:?}"
        );
        let attempts = by_public_key(&text, "tailsk8s_peer_handshake_attempts_total");
        assert!(attempts.values().sum::<u64>() <= 2, "{attempts:?}");
        let handshake = peer_value(&text, "tailsk8s_peer_last_handshake_seconds", peer_key);
        assert_eq!(Some(handshake), p1.latest_handshake);
    }

    let router = &mesh.routers()[0];
    let status = tailsk8s_e2e::config_router::status_json(router.ifname()).unwrap();
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{status}");
    assert_eq!(peers[0]["public_key"], key_b.as_str());
    assert_eq!(peers[0]["path"], "direct");
    assert_eq!(peers[0]["state"], "connected");
    assert!(peers[0]["drops"].is_array(), "{status}");
    let (_, text) = http_get(a.netns(), "/metrics");
    assert!(
        peers[0]["tx_bytes"].as_u64().unwrap()
            >= peer_value(&text, "tailsk8s_peer_transmit_bytes_total", &key_b)
    );
    assert_eq!(status["key_loaded"], true);
}

/// The value of `tailsk8s_drops_total{reason="REASON"}`.
fn drops(text: &str, reason: &str) -> u64 {
    let prefix = format!("tailsk8s_drops_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}")) as u64
}

/// `cmd` in `ns` whatever its exit status: its stdout and stderr.
fn any_output(ns: &Netns, program: &str, args: &[&str]) -> String {
    let out = ns.command(program).unwrap().args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn drops_are_counted_under_their_reason_and_their_peer() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(3).build().unwrap();
    let options = MeshOptions::with_metrics(METRICS.parse().unwrap());
    let mesh = ConfigMesh::start(&topo, &options).unwrap();
    let [a, b, c] = topo.nodes() else {
        panic!("three nodes")
    };
    let pa = &a.pods()[0];
    let (pb, pc) = (&b.pods()[0], &c.pods()[0]);
    // Sessions first, so the spoofed packets below are encrypted and delivered.
    ping(pa.netns(), pb.ip(false), 2).unwrap();
    ping(pa.netns(), pc.ip(false), 2).unwrap();
    let key_b = mesh.routers()[1].public_key().unwrap().to_string();
    let key_c = mesh.routers()[2].public_key().unwrap().to_string();
    let (_, start) = http_get(a.netns(), "/metrics");

    // No route: a destination routed to the TUN that is in no peer's allowed IPs. It
    // concerns no peer.
    let tun_a = mesh.routers()[0].ifname();
    a.netns()
        .exec("ip", &["route", "add", "198.19.250.0/24", "dev", tun_a])
        .unwrap();
    let _ = any_output(
        a.netns(),
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", "198.19.250.1"],
    );
    // Not allowed: node b's own address as the inner source (not one of b's allowed IPs on
    // a), sent into the tunnel from b's node namespace: b's drop.
    let spoofed = b.underlay(false).to_string();
    let _ = any_output(
        b.netns(),
        "ping",
        &[
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            &spoofed,
            &pa.ip(false).to_string(),
        ],
    );
    // Too big: the TUN's MTU raised behind the router's back, as an operator or another
    // agent might. The kernel now hands the router packets above the tunnel MTU; the
    // router must drop them as b's and tell the pod the tunnel MTU.
    a.netns()
        .exec("ip", &["link", "set", tun_a, "mtu", "1500"])
        .unwrap();
    let mtu = options.mtu;
    for v6 in [false, true] {
        let to = pb.ip(v6).to_string();
        // A 1500-byte packet: IP and ICMP headers plus the payload.
        let payload = if v6 { 1500 - 48 } else { 1500 - 28 };
        let ping_text = any_output(
            pa.netns(),
            "ping",
            &[
                "-n",
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                &payload.to_string(),
                &to,
            ],
        );
        let lower = ping_text.to_lowercase();
        assert!(
            lower.contains(&format!("mtu = {mtu}")) || lower.contains(&format!("mtu={mtu}")),
            "v6={v6}: ping -M do -s {payload} {to} did not learn mtu {mtu}:\n{ping_text}"
        );
        // The pod's kernel took the router's ICMP error: its route cache has the tunnel MTU.
        let family = if v6 { "-6" } else { "-4" };
        let route = pa.netns().ip(&[family, "route", "get", &to]).unwrap();
        assert!(
            route.contains(&format!("mtu {mtu}")),
            "v6={v6}: the route cache of {to} has no mtu {mtu}:\n{route}"
        );
    }

    let (_, end) = http_get(a.netns(), "/metrics");
    let grew = |reason: &str| drops(&end, reason) - drops(&start, reason);
    let grew_for =
        |key: &str, reason: &str| peer_drops(&end, key, reason) - peer_drops(&start, key, reason);
    assert!(grew("no_route") >= 3, "{end}");
    assert!(grew("not_allowed") >= 3, "{end}");
    assert!(grew("too_big") >= 2, "{end}");
    assert!(grew_for(&key_b, "not_allowed") >= 3, "{end}");
    assert!(grew_for(&key_b, "too_big") >= 2, "{end}");
    for key in [&key_b, &key_c] {
        assert_eq!(grew_for(key, "no_route"), 0, "no route is no peer's drop");
    }
    assert!(
        peer_drop_reasons(&end, &key_c).is_empty(),
        "c dropped nothing: {end}"
    );
    // The peers hold no more than the device counted.
    for reason in ["not_allowed", "too_big"] {
        let peers = peer_drops(&end, &key_b, reason) + peer_drops(&end, &key_c, reason);
        assert!(peers <= drops(&end, reason), "{reason}: {end}");
    }

    // `tailsk8s status --json` has the same per-peer drops.
    let status = tailsk8s_e2e::config_router::status_json(mesh.routers()[0].ifname()).unwrap();
    let peer = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["public_key"] == key_b.as_str())
        .unwrap()
        .clone();
    let count = |reason: &str| {
        peer["drops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["reason"] == reason)
            .and_then(|d| d["count"].as_u64())
            .unwrap_or(0)
    };
    assert!(count("not_allowed") >= peer_drops(&end, &key_b, "not_allowed"));
    assert!(count("too_big") >= peer_drops(&end, &key_b, "too_big"));
}

/// GET `/readyz` until its status is `code` (within `deadline`); returns the body.
fn wait_ready(node: &Netns, code: u16, deadline: std::time::Duration) -> String {
    let start = std::time::Instant::now();
    loop {
        let (got, body) = http_get(node, "/readyz");
        if got == code {
            return body;
        }
        assert!(
            start.elapsed() < deadline,
            "/readyz stayed {got} ({body}), wanted {code}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn readiness_follows_the_tailscale_source() {
    use tailsk8s_e2e::{ConfigRouter, KeyPair};
    use tailsk8s_tailnet_sim::{LocalApiServer, SimNode, Tailnet};

    if !require_netns() {
        return;
    }
    let binary = tailsk8s_binary().unwrap();
    let topology = TopologyBuilder::new(1).build().unwrap();
    let node = &topology.nodes()[0];
    let sim = SimNode::numbered(node.index()).with_approved_routes(&node.pod_cidrs());
    // The node's tailnet addresses on a tailscale0 (one end of a veth pair: dummy links need
    // a module this machine may not have), for the announcement server.
    let mut lines = vec![
        "link add tailscale0 type veth peer name tsk-tail".to_string(),
        "link set tsk-tail up".to_string(),
        "link set tailscale0 mtu 1280 up".to_string(),
    ];
    for ip in &sim.tailnet_ips {
        lines.push(match ip {
            std::net::IpAddr::V4(_) => format!("addr add {ip}/10 dev tailscale0"),
            std::net::IpAddr::V6(_) => format!("addr add {ip}/48 dev tailscale0 nodad"),
        });
    }
    node.netns().ip_batch(&lines).unwrap();
    let tailnet = Tailnet::new();
    tailnet.add(sim.clone());

    let mut router = ConfigRouter::new(node.netns()).unwrap();
    router
        .write_private_key(&KeyPair::generate(&binary).unwrap())
        .unwrap();
    let socket = router.dir().join("tailscaled.sock");
    let mut localapi = LocalApiServer::start(&tailnet, &sim.stable_id, &socket).unwrap();
    let pods: Vec<String> = node
        .pod_cidrs()
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    router
        .write_config_text(&format!(
            "interface = \"{ifname}\"\n\
             private_key_file = \"{key}\"\n\
             pod_cidrs = [{pods}]\n\
             cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/32\"]\n\
             \n\
             [tailscale]\n\
             socket = \"{socket}\"\n\
             resync = \"1s\"\n\
             \n\
             [metrics]\n\
             listen = \"{METRICS}\"\n",
            ifname = router.ifname(),
            key = router.key_path().display(),
            pods = pods.join(", "),
            socket = socket.display(),
        ))
        .unwrap();
    router.start().unwrap();
    let deadline = std::time::Duration::from_secs(15);
    wait_ready(node.netns(), 200, deadline);

    localapi.stop();
    let why = wait_ready(node.netns(), 503, deadline);
    assert!(why.contains("peer source stale"), "{why}");
    assert_eq!(
        http_get(node.netns(), "/healthz").0,
        200,
        "alive while not ready"
    );
    let (_, text) = http_get(node.netns(), "/metrics");
    assert!(text.contains("tailsk8s_source_fresh 0"), "{text}");

    let _localapi = LocalApiServer::start(&tailnet, &sim.stable_id, &socket).unwrap();
    wait_ready(node.netns(), 200, deadline);
    let (_, text) = http_get(node.netns(), "/metrics");
    assert!(text.contains("tailsk8s_source_fresh 1"), "{text}");
}
