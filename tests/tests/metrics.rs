//! `/metrics`, `/healthz`, `/readyz` and `tailsk8s status` of config-file routers in
//! namespaces (root): the counters the router exports are the ones `wg show` reports, and
//! `tailsk8s status --json` lists the peers it runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

use tailsk8s_e2e::{
    ping, require_netns, tailsk8s_binary, tcp_transfer, ConfigMesh, MeshOptions, Netns, ShowDump,
    TopologyBuilder,
};

const KB: u64 = 1024;
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

#[test]
fn metrics_match_wg_show_and_status_lists_the_peers() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let options = MeshOptions {
        metrics_listen: Some(METRICS.parse::<SocketAddr>().unwrap()),
        ..MeshOptions::default()
    };
    let mesh = ConfigMesh::start(&topo, &options).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    ping(a.pods()[0].netns(), b.pods()[0].ip(false), 2).unwrap();
    let size = 2048 * KB;
    let report = tcp_transfer(
        a.pods()[0].netns(),
        b.pods()[0].netns(),
        b.pods()[0].ip(false),
        size,
    )
    .unwrap();
    report.verify(a.pods()[0].ip(false)).unwrap();

    let router = &mesh.routers()[0];
    let peer_key = mesh.routers()[1].public_key().unwrap().to_string();
    assert_eq!(http_get(a.netns(), "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(a.netns(), "/readyz"), (200, "ok\n".to_string()));

    // No keepalives run, so the counters only move if something sends: read wg show on both
    // sides of the scrape and require the scrape to lie between.
    let before = router.dump().unwrap();
    let (code, text) = http_get(a.netns(), "/metrics");
    let after = router.dump().unwrap();
    assert_eq!(code, 200);
    let (p0, p1) = (
        before.peer(&peer_key).unwrap(),
        after.peer(&peer_key).unwrap(),
    );
    let tx = by_public_key(&text, "tailsk8s_peer_transmit_bytes_total")[&peer_key];
    let rx = by_public_key(&text, "tailsk8s_peer_receive_bytes_total")[&peer_key];
    assert!(
        (p0.tx_bytes..=p1.tx_bytes).contains(&tx),
        "{tx} vs {p0:?} {p1:?}"
    );
    assert!(
        (p0.rx_bytes..=p1.rx_bytes).contains(&rx),
        "{rx} vs {p0:?} {p1:?}"
    );
    // Wire bytes carry the transfer plus headers: at least the payload. Above it, TCP/IP +
    // WireGuard overhead (about 6 % at full-size segments) and TCP's retransmissions (a few
    // percent on the path without offloads here): bounded loosely, as the exact check is the
    // one against `wg show` above.
    assert!(tx >= size && tx < size + size / 2, "tx {tx} for {size}");
    let packets = by_public_key(&text, "tailsk8s_peer_transmit_packets_total")[&peer_key];
    assert!(packets >= size / 1420, "{packets} packets for {size} bytes");
    let attempts = by_public_key(&text, "tailsk8s_peer_handshake_attempts_total");
    assert!(attempts.values().sum::<u64>() <= 2, "{attempts:?}");
    let handshake = by_public_key(&text, "tailsk8s_peer_last_handshake_seconds")[&peer_key];
    assert_eq!(Some(handshake), p1.latest_handshake);

    let out = Command::new(tailsk8s_binary().unwrap())
        .args(["status", "--json", router.ifname()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{status}");
    assert_eq!(peers[0]["public_key"], peer_key.as_str());
    assert_eq!(peers[0]["path"], "direct");
    assert_eq!(peers[0]["state"], "connected");
    assert!(peers[0]["tx_bytes"].as_u64().unwrap() >= tx);
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

#[test]
fn drops_are_counted_under_their_reason() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let options = MeshOptions {
        metrics_listen: Some(METRICS.parse::<SocketAddr>().unwrap()),
        ..MeshOptions::default()
    };
    let mesh = ConfigMesh::start(&topo, &options).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    // A session first, so the spoofed packets below are encrypted and delivered.
    ping(a.pods()[0].netns(), b.pods()[0].ip(false), 2).unwrap();
    let (_, start_a) = http_get(a.netns(), "/metrics");

    // No route: a destination routed to the TUN that is in no peer's allowed IPs.
    let tun_a = mesh.routers()[0].ifname();
    a.netns()
        .exec("ip", &["route", "add", "198.19.250.0/24", "dev", tun_a])
        .unwrap();
    let _ = a
        .netns()
        .output("ping", &["-c", "3", "-i", "0.2", "-W", "1", "198.19.250.1"]);
    // Not allowed: node b's own address as the inner source (not one of b's allowed IPs on
    // a), sent into the tunnel from b's node namespace.
    let spoofed = b.underlay(false).to_string();
    let _ = b.netns().output(
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
            &a.pods()[0].ip(false).to_string(),
        ],
    );

    let (_, end_a) = http_get(a.netns(), "/metrics");
    assert!(
        drops(&end_a, "no_route") >= drops(&start_a, "no_route") + 3,
        "{end_a}"
    );
    assert!(
        drops(&end_a, "not_allowed") >= drops(&start_a, "not_allowed") + 3,
        "{end_a}"
    );
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
