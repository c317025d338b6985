use super::*;
use serde_json::{json, Value};
use tailsk8s_tailnet_sim::{localapi, SimNode};

const STATUS: &str = include_str!("../fixtures/localapi-status-v1.102.json");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn fixture() -> Value {
    serde_json::from_str(STATUS).unwrap()
}

fn view_of(doc: &Value) -> TailnetView {
    parse_status(&serde_json::to_vec(doc).unwrap()).unwrap()
}

/// The first peer of a status document (k8s-node-1 in the fixture), to edit.
fn first_peer(doc: &mut Value) -> &mut Value {
    doc["Peer"]
        .as_object_mut()
        .unwrap()
        .values_mut()
        .next()
        .unwrap()
}

/// Applies `edit` to Self and every peer of the fixture.
fn edit_nodes(doc: &mut Value, edit: impl Fn(&mut serde_json::Map<String, Value>)) {
    edit(doc["Self"].as_object_mut().unwrap());
    for peer in doc["Peer"].as_object_mut().unwrap().values_mut() {
        edit(peer.as_object_mut().unwrap());
    }
}

#[test]
fn the_reference_status_parses_whole() {
    let view = parse_status(STATUS.as_bytes()).unwrap();
    assert_eq!(view.backend_state, "Running");
    assert!(view.is_running());
    assert_eq!(
        view.self_node,
        tagged_node(
            "nAb3kQ2CNTRL",
            "k8s-node-0",
            ["100.101.0.10", "fd7a:115c:a1e0::6f01:a0a"],
            "10.100.0.0/24"
        )
    );
    let peers: Vec<(&str, &str, bool, Vec<IpNet>)> = view
        .peers
        .iter()
        .map(|p| {
            (
                p.stable_id.as_str(),
                p.host_name.as_str(),
                p.online,
                p.primary_routes.clone(),
            )
        })
        .collect();
    assert_eq!(
        peers,
        vec![
            (
                "nQx7pL9CNTRL",
                "k8s-node-1",
                true,
                vec![net("10.100.1.0/24")]
            ),
            (
                "nZr4tW6CNTRL",
                "k8s-node-2",
                false,
                vec![net("10.100.2.0/24")]
            ),
        ]
    );
    assert_eq!(
        view.peers[1].tailnet_ips,
        [ip("100.101.2.12"), ip("fd7a:115c:a1e0::6f01:c0c")]
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let mut doc = fixture();
    doc["SomethingNew"] = json!({"deep": [1, 2, {"x": null}]});
    edit_nodes(&mut doc, |n| {
        n.insert("FutureField".into(), json!([{"a": 1}]));
        n.insert("ID2".into(), json!(7));
    });
    assert_eq!(view_of(&doc), parse_status(STATUS.as_bytes()).unwrap());
}

#[test]
fn missing_fields_default() {
    // An old daemon: no NodeID, AllowedIPs, PrimaryRoutes (before v1.22), PeerAPIURL,
    // CurrentTailnet, User, Health.
    let mut doc = fixture();
    for key in [
        "CurrentTailnet",
        "User",
        "Health",
        "Version",
        "MagicDNSSuffix",
    ] {
        doc.as_object_mut().unwrap().remove(key);
    }
    edit_nodes(&mut doc, |n| {
        for key in [
            "NodeID",
            "AllowedIPs",
            "PrimaryRoutes",
            "PeerAPIURL",
            "Online",
            "DNSName",
        ] {
            n.remove(key);
        }
    });
    let view = view_of(&doc);
    assert_eq!(view.peers.len(), 2);
    for node in view.peers.iter().chain([&view.self_node]) {
        assert!(node.primary_routes.is_empty());
        assert!(!node.online);
        assert_eq!(node.dns_name, "");
        assert_eq!(node.tailnet_ips.len(), 2);
    }

    // The least a document can be: an object.
    assert_eq!(parse_status(b"{}").unwrap(), TailnetView::default());
}

#[test]
fn old_daemon_fields_are_understood_or_ignored() {
    // Before TailscaleIPs, a node had one TailAddr; KeepAlive is long gone.
    let mut doc = fixture();
    edit_nodes(&mut doc, |n| {
        n.remove("TailscaleIPs");
        n.insert("KeepAlive".into(), json!(true));
    });
    let peer = first_peer(&mut doc);
    peer["TailAddr"] = json!("100.101.1.11");
    let view = view_of(&doc);
    assert_eq!(view.peers[0].tailnet_ips, [ip("100.101.1.11")]);
    assert!(view.peers[1].tailnet_ips.is_empty());
    assert!(view.self_node.tailnet_ips.is_empty());

    // With both, TailscaleIPs wins.
    let mut doc = fixture();
    edit_nodes(&mut doc, |n| {
        n.insert("TailAddr".into(), json!("100.64.9.9"));
    });
    assert_eq!(view_of(&doc), parse_status(STATUS.as_bytes()).unwrap());
}

#[test]
fn null_lists_and_maps_read_as_empty() {
    let mut doc = fixture();
    doc["Health"] = Value::Null;
    doc["User"] = Value::Null;
    edit_nodes(&mut doc, |n| {
        for key in [
            "TailscaleIPs",
            "Tags",
            "PrimaryRoutes",
            "AllowedIPs",
            "Addrs",
            "HostName",
        ] {
            n.insert(key.into(), Value::Null);
        }
    });
    let view = view_of(&doc);
    for node in view.peers.iter().chain([&view.self_node]) {
        assert!(node.tailnet_ips.is_empty() && node.tags.is_empty());
        assert!(node.primary_routes.is_empty());
        assert_eq!(node.host_name, "");
    }
    // No peers at all, as Go writes an empty map, as null, or not at all; Self null before login.
    for peers in [json!({}), Value::Null] {
        let doc = json!({"BackendState": "NeedsLogin", "Self": null, "Peer": peers});
        let view = view_of(&doc);
        assert!(view.peers.is_empty());
        assert_eq!(view.self_node, TailnetNode::default());
        assert!(!view.is_running());
    }
}

#[test]
fn peers_without_routes_and_ipv6_routes() {
    let mut doc = fixture();
    let peers = doc["Peer"].as_object_mut().unwrap();
    let mut it = peers.values_mut();
    let first = it.next().unwrap();
    first["PrimaryRoutes"] = json!(["10.100.1.0/24", "fd00:100:1::/64"]);
    let second = it.next().unwrap();
    second.as_object_mut().unwrap().remove("PrimaryRoutes");
    let view = view_of(&doc);
    assert_eq!(
        view.peers[0].primary_routes,
        [net("10.100.1.0/24"), net("fd00:100:1::/64")]
    );
    assert!(view.peers[1].primary_routes.is_empty());
}

#[test]
fn unreadable_entries_are_left_out_not_fatal() {
    let mut doc = fixture();
    let peer = first_peer(&mut doc);
    peer["PrimaryRoutes"] = json!([
        "10.100.1.0/24",
        "banana",
        "10.100.1.0/33",
        "10.100.7.9/24",
        "10.100.1.0/24"
    ]);
    peer["TailscaleIPs"] = json!(["100.101.1.11", "not-an-ip", "100.101.1.11/32"]);
    let view = view_of(&doc);
    // Host bits are cleared; duplicates dropped.
    assert_eq!(
        view.peers[0].primary_routes,
        [net("10.100.1.0/24"), net("10.100.7.0/24")]
    );
    assert_eq!(view.peers[0].tailnet_ips, [ip("100.101.1.11")]);
}

#[test]
fn garbage_is_a_clear_error() {
    for bad in [
        &b""[..],
        b"not json",
        b"[]",
        b" [{}]",
        b"null",
        b"{\"Peer\": []}",
        b"{\"Peer\": {\"nodekey:1\": 5}}",
        b"{\"Self\": {\"Tags\": \"tag:k8s-node\"}}",
        b"{\"Self\": {\"Online\": \"yes\"}}",
        b"{\"BackendState\": ",
        &[0xff, 0xfe, 0x00],
    ] {
        let err = parse_status(bad).unwrap_err();
        assert!(
            err.to_string().starts_with("not a valid status document: "),
            "{err}"
        );
    }
}

#[test]
fn peers_come_ordered_by_stable_id() {
    let doc = json!({"Peer": {
        "nodekey:01": {"ID": "nZ"},
        "nodekey:02": {"ID": "nA"},
        "nodekey:03": {"ID": "nM"}
    }});
    let ids: Vec<String> = view_of(&doc)
        .peers
        .into_iter()
        .map(|p| p.stable_id)
        .collect();
    assert_eq!(ids, ["nA", "nM", "nZ"]);
}

/// The fixture's tagged peer k8s-node-1, as the LocalAPI stand-in's node.
fn reference_peer() -> SimNode {
    let mut node = SimNode::numbered(1).with_approved_routes(&[net("10.100.1.0/24")]);
    node.stable_id = "nQx7pL9CNTRL".into();
    node.tailnet_ips = vec![ip("100.101.1.11"), ip("fd7a:115c:a1e0::6f01:b0b")];
    node
}

/// A whois reply as tailscaled sends it for a tagged peer (the stand-in renders it).
pub(crate) fn whois_reply() -> Value {
    localapi::whois_reply(&reference_peer(), &[net("10.100.1.0/24")])
}

/// `node` as the parser should read it: tagged, online, its DNS name in the fixture's tailnet.
fn tagged_node(stable_id: &str, host_name: &str, ips: [&str; 2], route: &str) -> TailnetNode {
    TailnetNode {
        stable_id: stable_id.into(),
        host_name: host_name.into(),
        dns_name: format!("{host_name}.tail3f9c2.ts.net."),
        tailnet_ips: ips.iter().map(|i| ip(i)).collect(),
        tags: vec!["tag:k8s-node".into()],
        primary_routes: vec![net(route)],
        online: true,
    }
}

#[test]
fn whois_reply_parses() {
    let bytes = serde_json::to_vec(&whois_reply()).unwrap();
    let node = parse_whois(&bytes).unwrap().unwrap();
    assert_eq!(
        node,
        tagged_node(
            "nQx7pL9CNTRL",
            "k8s-node-1",
            ["100.101.1.11", "fd7a:115c:a1e0::6f01:b0b"],
            "10.100.1.0/24"
        )
    );
}

#[test]
fn whois_reply_variants() {
    // Without Hostinfo the host name comes from the FQDN; Online absent is offline; subnet
    // prefixes among Addresses are not the node's own addresses.
    let mut doc = whois_reply();
    let n = doc["Node"].as_object_mut().unwrap();
    n.remove("Hostinfo");
    n.remove("Online");
    n.insert("Tags".into(), Value::Null);
    n.insert(
        "Addresses".into(),
        json!(["100.101.1.11/32", "10.100.1.0/24", "x"]),
    );
    let node = parse_whois(&serde_json::to_vec(&doc).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(node.host_name, "k8s-node-1");
    assert!(!node.online && node.tags.is_empty());
    assert_eq!(node.tailnet_ips, [ip("100.101.1.11")]);

    assert_eq!(parse_whois(b"{}").unwrap(), None);
    assert_eq!(parse_whois(b"{\"Node\": null}").unwrap(), None);
    let err = parse_whois(b"{\"Node\": 5}").unwrap_err();
    assert!(
        err.to_string().starts_with("not a valid whois document"),
        "{err}"
    );
}

/// A prefs document as `GET /localapi/v0/prefs` returns it (keys stripped), of a node that
/// advertises its pod CIDR and exit routes and accepts routes.
pub(crate) fn prefs_reply() -> Value {
    let mut node = reference_peer();
    node.advertised_routes = vec![net("10.100.0.0/24"), net("0.0.0.0/0"), net("::/0")];
    node.route_all = true;
    let mut doc = localapi::prefs(&node);
    // A daemon that still shows the (stripped) key material: not ours to read.
    doc["Config"] = json!({"PrivateNodeKey": format!("privkey:{}", "0".repeat(64))});
    doc
}

#[test]
fn prefs_parse() {
    let prefs = parse_prefs(&serde_json::to_vec(&prefs_reply()).unwrap()).unwrap();
    assert_eq!(
        prefs,
        Prefs {
            advertise_routes: vec!["10.100.0.0/24".into(), "0.0.0.0/0".into(), "::/0".into()],
            advertise_tags: vec!["tag:k8s-node".into()],
            route_all: true,
            want_running: true,
            no_snat: false,
        }
    );
    let mut doc = prefs_reply();
    doc["AdvertiseRoutes"] = Value::Null;
    let prefs = parse_prefs(&serde_json::to_vec(&doc).unwrap()).unwrap();
    assert!(prefs.advertise_routes.is_empty());
    assert!(parse_prefs(b"{\"AdvertiseRoutes\": {}}").is_err());
}

#[test]
fn masked_prefs_name_only_what_changes() {
    let change = MaskedPrefs::advertise_routes(vec!["10.100.0.0/24".into()]);
    assert_eq!(
        serde_json::to_value(&change).unwrap(),
        json!({"AdvertiseRoutes": ["10.100.0.0/24"], "AdvertiseRoutesSet": true})
    );
    // Withdrawing the last route sends an empty list.
    assert_eq!(
        serde_json::to_value(MaskedPrefs::advertise_routes(vec![])).unwrap(),
        json!({"AdvertiseRoutes": [], "AdvertiseRoutesSet": true})
    );
    assert_eq!(
        serde_json::to_value(MaskedPrefs::default()).unwrap(),
        json!({})
    );
}

#[test]
fn notify_messages_parse() {
    let n = parse_notify(br#"{"Version":"1.102.3-t53a0d659a-g3b9f0e8c1","State":6}"#).unwrap();
    assert_eq!(n.version, "1.102.3-t53a0d659a-g3b9f0e8c1");
    assert_eq!(n.state, Some(6));
    let n = parse_notify(
        br#"{"NetMap":{"SelfNode":{"ID":1},"Peers":[{"ID":2}]},"Health":{"Warnings":null}}"#,
    )
    .unwrap();
    assert_eq!(n, Notify::default());
    let n = parse_notify(br#"{"ErrMessage":"backend error: x"}"#).unwrap();
    assert_eq!(n.err_message.as_deref(), Some("backend error: x"));
    for bad in [&b"[1]"[..], b"{", b"\"x\"", b"{\"State\":\"Running\"}"] {
        let err = parse_notify(bad).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("not a valid watch-ipn-bus message"),
            "{err}"
        );
    }
}
