//! `localapi`: the JSON documents of tailscaled's LocalAPI (status, whois, watch-ipn-bus
//! messages, prefs), as `tailsk8s::tailscale::documents` reads them.
//!
//! Every input is used twice:
//! 1. as bytes, given to every parser: never a panic; an accepted status gives a view whose
//!    peers are ordered by stable ID, whose routes are networks (no host bits) without
//!    duplicates, and whose cluster nodes' pod CIDRs are their primary routes inside the
//!    cluster CIDRs; an accepted whois reply gives a node whose addresses are its own;
//! 2. as choices for a generator of status documents in the shapes daemons old and new send
//!    (fields missing, `null`, unknown, the old `TailAddr`, IPv4 and IPv6 routes, entries that
//!    do not parse, host bits): each must parse to exactly the view the generator meant.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};
use tailsk8s::tailscale::documents::{parse_notify, parse_prefs, parse_status, parse_whois};
use tailsk8s::tailscale::{cluster_nodes, TailnetNode, TailnetView};

use crate::input::Choices;

const TAG: &str = "tag:k8s-node";

/// The target body.
pub fn run(data: &[u8]) {
    check_bytes(data);
    let (doc, expected) = generate(&mut Choices::new(data));
    let text = serde_json::to_vec(&doc).expect("a JSON value serializes");
    match parse_status(&text) {
        Ok(view) => assert_eq!(
            view, expected,
            "generated status parsed differently:\n{doc}"
        ),
        Err(e) => panic!("generated status refused: {e}\n{doc}"),
    }
}

fn check_bytes(data: &[u8]) {
    if let Ok(view) = parse_status(data) {
        check_view(&view);
    }
    if let Ok(Some(node)) = parse_whois(data) {
        check_node(&node);
    }
    let _ = parse_notify(data).map(|n| n.version.len());
    let _ = parse_prefs(data).map(|p| p.advertise_routes.len());
}

fn check_node(node: &TailnetNode) {
    for route in &node.primary_routes {
        assert_eq!(route.trunc(), *route, "a route with host bits: {route}");
    }
    for (i, route) in node.primary_routes.iter().enumerate() {
        assert!(
            !node.primary_routes[..i].contains(route),
            "duplicate {route}"
        );
    }
    for (i, ip) in node.tailnet_ips.iter().enumerate() {
        assert!(!node.tailnet_ips[..i].contains(ip), "duplicate {ip}");
    }
}

fn check_view(view: &TailnetView) {
    check_node(&view.self_node);
    for peer in &view.peers {
        check_node(peer);
    }
    for pair in view.peers.windows(2) {
        assert!(pair[0].stable_id <= pair[1].stable_id, "peers out of order");
    }
    let cluster: [IpNet; 2] = [
        "10.100.0.0/16".parse().unwrap(),
        "fd00:100::/48".parse().unwrap(),
    ];
    let nodes = cluster_nodes(view, TAG, &cluster);
    assert_eq!(
        nodes.len(),
        view.peers
            .iter()
            .filter(|p| p.tags.iter().any(|t| t == TAG))
            .count()
    );
    for n in &nodes {
        for cidr in &n.pod_cidrs {
            assert!(n.node.primary_routes.contains(cidr));
            assert!(cluster.iter().any(|c| c.contains(cidr)), "{cidr} outside");
        }
    }
}

/// Routes a peer may list, as text, with what they parse to.
const ROUTES: &[(&str, Option<&str>)] = &[
    ("10.100.1.0/24", Some("10.100.1.0/24")),
    ("10.100.2.0/24", Some("10.100.2.0/24")),
    ("10.100.3.9/24", Some("10.100.3.0/24")),
    ("fd00:100:0:1::/64", Some("fd00:100:0:1::/64")),
    ("fd00:100:0:2::5/64", Some("fd00:100:0:2::/64")),
    ("0.0.0.0/0", Some("0.0.0.0/0")),
    ("10.0.0.0/8", Some("10.0.0.0/8")),
    ("banana", None),
    ("10.100.4.0/33", None),
    ("", None),
];

const IPS: &[(&str, Option<&str>)] = &[
    ("100.101.1.11", Some("100.101.1.11")),
    ("fd7a:115c:a1e0::6f01:b0b", Some("fd7a:115c:a1e0::6f01:b0b")),
    ("100.101.2.12", Some("100.101.2.12")),
    ("100.101.1.11/32", None),
    ("not-an-ip", None),
];

const TAGS: &[&str] = &[TAG, "tag:other", "tag:k8s", ""];

/// How a list field is written.
fn list_field(c: &mut Choices, obj: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    match c.below(4) {
        0 => {}
        1 => {
            obj.insert(key.into(), Value::Null);
        }
        _ => {
            obj.insert(key.into(), Value::Array(items));
        }
    }
}

/// Picks up to 4 entries of `table`; returns the texts and the distinct parsed values, in order.
fn pick<T: PartialEq>(
    c: &mut Choices,
    table: &[(&str, Option<&str>)],
    parse: impl Fn(&str) -> T,
) -> (Vec<Value>, Vec<T>) {
    let mut texts = Vec::new();
    let mut parsed = Vec::new();
    for _ in 0..c.below(5) {
        let (text, value) = table[c.below(table.len())];
        texts.push(json!(text));
        if let Some(v) = value.map(&parse) {
            if !parsed.contains(&v) {
                parsed.push(v);
            }
        }
    }
    (texts, parsed)
}

/// One PeerStatus and the node it means.
fn peer(c: &mut Choices, index: usize) -> (Value, TailnetNode) {
    let mut obj = Map::new();
    let mut node = TailnetNode::default();
    if c.bool() {
        node.stable_id = format!("n{}{index}CNTRL", (b'A' + c.below(26) as u8) as char);
        obj.insert("ID".into(), json!(node.stable_id));
    }
    if c.bool() {
        node.host_name = format!("k8s-node-{index}");
        obj.insert("HostName".into(), json!(node.host_name));
        node.dns_name = format!("k8s-node-{index}.tail3f9c2.ts.net.");
        obj.insert("DNSName".into(), json!(node.dns_name));
    }
    let (ip_texts, ips) = pick(c, IPS, |s| s.parse::<IpAddr>().unwrap());
    let ips_written = c.below(4);
    match ips_written {
        0 => {}
        1 => {
            obj.insert("TailscaleIPs".into(), Value::Null);
        }
        _ => {
            obj.insert("TailscaleIPs".into(), Value::Array(ip_texts));
            node.tailnet_ips = ips;
        }
    }
    if c.bool() {
        // The address field of daemons before TailscaleIPs: used only when that gives none.
        obj.insert("TailAddr".into(), json!("100.101.9.9"));
        if node.tailnet_ips.is_empty() {
            node.tailnet_ips.push("100.101.9.9".parse().unwrap());
        }
    }
    let tags: Vec<String> = (0..c.below(3))
        .map(|_| TAGS[c.below(TAGS.len())].to_string())
        .collect();
    let tag_values = tags.iter().map(|t| json!(t)).collect();
    if c.below(4) >= 2 {
        obj.insert("Tags".into(), Value::Array(tag_values));
        node.tags = tags;
    } else if c.bool() {
        obj.insert("Tags".into(), Value::Null);
    }
    let (route_texts, routes) = pick(c, ROUTES, |s| s.parse::<IpNet>().unwrap());
    list_field(c, &mut obj, "PrimaryRoutes", route_texts);
    if obj.get("PrimaryRoutes").is_some_and(Value::is_array) {
        node.primary_routes = routes;
    }
    match c.below(4) {
        0 => {}
        1 => {
            obj.insert("Online".into(), Value::Null);
        }
        2 => {
            obj.insert("Online".into(), json!(false));
        }
        _ => {
            obj.insert("Online".into(), json!(true));
            node.online = true;
        }
    }
    if c.bool() {
        // Fields tailsk8s does not read, old and new.
        obj.insert("KeepAlive".into(), json!(true));
        obj.insert("Addrs".into(), Value::Null);
        obj.insert("AllowedIPs".into(), json!(["100.101.1.11/32"]));
        obj.insert("CapMap".into(), json!({"x": [true, null]}));
        obj.insert("LastHandshake".into(), json!("0001-01-01T00:00:00Z"));
    }
    (Value::Object(obj), node)
}

/// A status document and the view it means.
pub fn generate(c: &mut Choices) -> (Value, TailnetView) {
    let mut doc = Map::new();
    let mut view = TailnetView::default();
    if c.bool() {
        view.backend_state = ["Running", "NeedsLogin", "Stopped"][c.below(3)].to_string();
        doc.insert("BackendState".into(), json!(view.backend_state));
    }
    match c.below(3) {
        0 => {}
        1 => {
            doc.insert("Self".into(), Value::Null);
        }
        _ => {
            let (value, node) = peer(c, 0);
            doc.insert("Self".into(), value);
            view.self_node = node;
        }
    }
    let mut peers = Map::new();
    for i in 1..=c.below(6) {
        let (value, node) = peer(c, i);
        peers.insert(format!("nodekey:{i:064x}"), value);
        view.peers.push(node);
    }
    match c.below(4) {
        0 if view.peers.is_empty() => {}
        1 if view.peers.is_empty() => {
            doc.insert("Peer".into(), Value::Null);
        }
        _ => {
            doc.insert("Peer".into(), Value::Object(peers));
        }
    }
    if c.bool() {
        doc.insert("Version".into(), json!("1.102.3"));
        doc.insert("Health".into(), Value::Null);
        doc.insert("User".into(), json!({}));
        doc.insert("CurrentTailnet".into(), json!({"Name": "example.com"}));
    }
    view.peers.sort_by(|a, b| a.stable_id.cmp(&b.stable_id));
    (Value::Object(doc), view)
}

/// The reference documents and small variants.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let status =
        include_bytes!("../../../control/src/tailscale/fixtures/localapi-status-v1.102.json");
    let whois = json!({"Node": {
        "ID": 5410286723095_u64, "StableID": "nQx7pL9CNTRL", "Name": "k8s-node-1.tail3f9c2.ts.net.",
        "Key": "nodekey:a44ef50efd35f00ab261d2fe4c48c72b0ccd6db281bd93aa5d601dd94b547c12",
        "Addresses": ["100.101.1.11/32", "fd7a:115c:a1e0::6f01:b0b/128"],
        "AllowedIPs": ["100.101.1.11/32", "fd7a:115c:a1e0::6f01:b0b/128", "10.100.1.0/24"],
        "Hostinfo": {"Hostname": "k8s-node-1", "RoutableIPs": ["10.100.1.0/24"]},
        "Tags": ["tag:k8s-node"], "PrimaryRoutes": ["10.100.1.0/24"], "Online": true},
        "UserProfile": {"ID": 1, "LoginName": "tagged-devices"}, "CapMap": null});
    let old = json!({"BackendState": "Running", "Self": {"ID": "nA", "TailAddr": "100.101.0.10"},
        "Peer": {"nodekey:01": {"ID": "nB", "TailAddr": "100.101.1.11", "KeepAlive": true,
            "Tags": ["tag:k8s-node"], "PrimaryRoutes": null}}});
    vec![
        ("status-v1.102", status.to_vec()),
        ("status-old-daemon", old.to_string().into_bytes()),
        ("whois", whois.to_string().into_bytes()),
        (
            "notify",
            br#"{"Version":"1.102.3-t53a0d659a-g3b9f0e8c1","State":6}"#.to_vec(),
        ),
        (
            "generated",
            vec![
                1, 2, 3, 1, 1, 0, 3, 2, 1, 0, 3, 3, 4, 2, 1, 3, 0, 5, 1, 2, 3,
            ],
        ),
    ]
}
