//! The stand-ins answer as the real services do, checked with raw HTTP/1.1 (no client of ours
//! in between).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use tailsk8s_tailnet_sim::{CloudApiServer, Credentials, LocalApiServer, SimNode, Tailnet};

fn raw(mut stream: impl Read + Write, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn get(path: &str, host: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
}

fn tailnet() -> Tailnet {
    let tailnet = Tailnet::new();
    tailnet.add(SimNode::numbered(0).with_approved_routes(&["10.100.0.0/24".parse().unwrap()]));
    tailnet.add(SimNode::numbered(1).with_approved_routes(&["10.100.1.0/24".parse().unwrap()]));
    tailnet
}

#[test]
fn localapi_refuses_a_foreign_host_or_an_origin_like_tailscaled() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ts.sock");
    let tailnet = tailnet();
    let _server =
        LocalApiServer::start(&tailnet, &SimNode::numbered(0).stable_id, &socket).unwrap();
    let connect = || UnixStream::connect(&socket).unwrap();
    let (status, body) = raw(
        connect(),
        &get("/localapi/v0/status", "local-tailscaled.sock", ""),
    );
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["Self"]["HostName"], "k8s-node-0");
    assert_eq!(doc["Peer"].as_object().unwrap().len(), 1);
    let peer = doc["Peer"][SimNode::numbered(1).public_key.as_str()].clone();
    assert_eq!(peer["PrimaryRoutes"], serde_json::json!(["10.100.1.0/24"]));

    for (host, extra) in [
        ("localhost", ""),
        ("evil.example", ""),
        ("local-tailscaled.sock", "Origin: http://evil.example\r\n"),
        ("local-tailscaled.sock", "Referer: http://evil.example/\r\n"),
    ] {
        let (status, _) = raw(connect(), &get("/localapi/v0/status", host, extra));
        assert_eq!(status, 403, "{host} {extra}");
    }
}

#[test]
fn primary_routes_need_advertising_and_approval_and_go_to_one_node() {
    let tailnet = tailnet();
    let id1 = SimNode::numbered(1).stable_id;
    // Advertised only: not primary.
    tailnet.update(&id1, |n| {
        n.advertised_routes.push("10.100.9.0/24".parse().unwrap())
    });
    // Approved only: not primary either.
    tailnet.update(&id1, |n| {
        n.enabled_routes.push("10.100.8.0/24".parse().unwrap())
    });
    // Node 2 advertises node 1's prefix too: node 1 stays primary.
    tailnet.add(SimNode::numbered(2).with_approved_routes(&["10.100.1.0/24".parse().unwrap()]));
    let primary: Vec<Vec<String>> = tailnet
        .with_primary_routes()
        .into_iter()
        .map(|(_, p)| p.iter().map(ToString::to_string).collect())
        .collect();
    assert_eq!(
        primary,
        vec![
            vec!["10.100.0.0/24"],
            vec!["10.100.1.0/24"],
            Vec::<&str>::new()
        ]
    );
}

#[test]
fn cloud_api_needs_a_key_and_serves_devices_and_routes() {
    let tailnet = tailnet();
    let server = CloudApiServer::start(
        &tailnet,
        Credentials {
            api_keys: vec!["tskey-api-good".into()],
            ..Credentials::default()
        },
    )
    .unwrap();
    let addr = server
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches("/api/v2")
        .to_string();
    let connect = || TcpStream::connect(&addr).unwrap();
    let devices = "/api/v2/tailnet/-/devices?fields=all";
    let (status, _) = raw(connect(), &get(devices, &addr, ""));
    assert_eq!(status, 401);
    let (status, _) = raw(
        connect(),
        &get(devices, &addr, "Authorization: Bearer tskey-api-bad\r\n"),
    );
    assert_eq!(status, 401);
    let (status, body) = raw(
        connect(),
        &get(devices, &addr, "Authorization: Bearer tskey-api-good\r\n"),
    );
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["devices"][1]["nodeId"], SimNode::numbered(1).stable_id);
    assert_eq!(
        doc["devices"][1]["enabledRoutes"],
        serde_json::json!(["10.100.1.0/24"])
    );
    // Basic auth with the key as user name works too; without fields=all, no routes.
    let (status, body) = raw(
        connect(),
        &get(
            "/api/v2/tailnet/-/devices",
            &addr,
            "Authorization: Basic dHNrZXktYXBpLWdvb2Q6\r\n",
        ),
    );
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(doc["devices"][0].get("enabledRoutes").is_none());
    assert_eq!(server.requests().len(), 4);
}

#[test]
fn each_node_sees_itself_as_self_and_the_others_as_peers() {
    let dir = tempfile::tempdir().unwrap();
    let tailnet = tailnet();
    let servers: Vec<LocalApiServer> = (0..2)
        .map(|i| {
            let socket = dir.path().join(format!("ts{i}.sock"));
            LocalApiServer::start(&tailnet, &SimNode::numbered(i).stable_id, socket).unwrap()
        })
        .collect();
    let status = |i: usize| -> serde_json::Value {
        let stream = UnixStream::connect(servers[i].socket()).unwrap();
        let (code, body) = raw(
            stream,
            &get("/localapi/v0/status", "local-tailscaled.sock", ""),
        );
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    };
    for (me, other) in [(0u8, 1u8), (1, 0)] {
        let doc = status(usize::from(me));
        assert_eq!(doc["Self"]["ID"], SimNode::numbered(me).stable_id);
        let peers = doc["Peer"].as_object().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[SimNode::numbered(other).public_key.as_str()]["ID"],
            SimNode::numbered(other).stable_id
        );
    }
    // A change shows in both views; a removed node leaves the other's peers.
    tailnet.update(&SimNode::numbered(1).stable_id, |n| n.tags.clear());
    assert_eq!(
        status(0)["Peer"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()["Tags"],
        serde_json::Value::Null
    );
    tailnet.remove(&SimNode::numbered(0).stable_id);
    assert!(status(1)["Peer"].as_object().unwrap().is_empty());
    assert_eq!(status(0)["BackendState"], "NeedsLogin");
}
