//! The client against the stand-in LocalAPI server (tailnet-sim), which checks the `Host`
//! header as tailscaled does.

use super::*;
use ipnet::IpNet;
use tailsk8s_tailnet_sim::{Behaviour, LocalApiServer, SimNode, Tailnet};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    tailnet: Tailnet,
    server: LocalApiServer,
    client: LocalApi,
}

/// Three nodes; node 0's LocalAPI; node 1 and 2 with approved pod CIDRs.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tailnet = Tailnet::new();
    tailnet.add(SimNode::numbered(0).with_approved_routes(&[net("10.100.0.0/24")]));
    tailnet.add(
        SimNode::numbered(1)
            .with_approved_routes(&[net("10.100.1.0/24"), net("fd00:100:0:1::/64")]),
    );
    tailnet.add(SimNode::numbered(2).with_approved_routes(&[net("10.100.2.0/24")]));
    let socket = dir.path().join("tailscaled.sock");
    let server = LocalApiServer::start(&tailnet, &SimNode::numbered(0).stable_id, &socket).unwrap();
    let client = LocalApi::new(socket).with_timeout(Duration::from_secs(5));
    Setup {
        _dir: dir,
        tailnet,
        server,
        client,
    }
}

#[tokio::test]
async fn status_reads_the_tailnet_view() {
    let s = setup();
    let view = s.client.status().await.unwrap();
    assert_eq!(view.backend_state, "Running");
    assert_eq!(view.self_node.host_name, "k8s-node-0");
    assert_eq!(view.self_node.stable_id, SimNode::numbered(0).stable_id);
    let peers: Vec<(&str, &[IpNet])> = view
        .peers
        .iter()
        .map(|p| (p.host_name.as_str(), p.primary_routes.as_slice()))
        .collect();
    assert_eq!(
        peers,
        vec![
            (
                "k8s-node-1",
                &[net("10.100.1.0/24"), net("fd00:100:0:1::/64")][..]
            ),
            ("k8s-node-2", &[net("10.100.2.0/24")][..]),
        ]
    );
    assert_eq!(view.peers[0].tailnet_ips, SimNode::numbered(1).tailnet_ips);
    let requests = s.server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].line(), "GET /localapi/v0/status");
    assert_eq!(requests[0].header("host"), Some(HOST));
}

#[tokio::test]
async fn withdrawn_approval_leaves_primary_routes() {
    let s = setup();
    let id1 = SimNode::numbered(1).stable_id;
    s.tailnet
        .update(&id1, |n| n.enabled_routes.retain(|r| r.addr().is_ipv6()));
    let view = s.client.status().await.unwrap();
    assert_eq!(view.peers[0].primary_routes, [net("fd00:100:0:1::/64")]);
}

#[tokio::test]
async fn whois_finds_the_owner_of_a_tailnet_address() {
    let s = setup();
    let node1 = SimNode::numbered(1);
    for ip in &node1.tailnet_ips {
        let who = s
            .client
            .whois(SocketAddr::new(*ip, 40123))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(who.stable_id, node1.stable_id);
        assert_eq!(who.tags, ["tag:k8s-node"]);
        assert_eq!(who.tailnet_ips, node1.tailnet_ips);
    }
    let stranger = "100.64.77.77:1234".parse().unwrap();
    assert_eq!(s.client.whois(stranger).await.unwrap(), None);
    let targets: Vec<String> = s
        .server
        .requests()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(
        targets,
        [
            "/localapi/v0/whois?addr=100.101.1.11:40123",
            "/localapi/v0/whois?addr=%5Bfd7a:115c:a1e0::6f01:1%5D:40123",
            "/localapi/v0/whois?addr=100.64.77.77:1234",
        ]
    );
}

#[tokio::test]
async fn prefs_read_and_patch() {
    let s = setup();
    let prefs = s.client.prefs().await.unwrap();
    assert_eq!(prefs.advertise_routes, ["10.100.0.0/24"]);
    let after = s
        .client
        .patch_prefs(&MaskedPrefs::advertise_routes(vec![
            "10.100.0.0/24".into(),
            "fd00:100::/64".into(),
        ]))
        .await
        .unwrap();
    assert_eq!(after.advertise_routes, ["10.100.0.0/24", "fd00:100::/64"]);
    let node0 = s.tailnet.node(&SimNode::numbered(0).stable_id).unwrap();
    assert_eq!(
        node0.advertised_routes,
        [net("10.100.0.0/24"), net("fd00:100::/64")]
    );
    let patch = s.server.requests().pop().unwrap();
    assert_eq!(patch.line(), "PATCH /localapi/v0/prefs");
    assert_eq!(
        patch.body_json(),
        serde_json::json!({"AdvertiseRoutes": ["10.100.0.0/24", "fd00:100::/64"], "AdvertiseRoutesSet": true})
    );

    s.server.set_writable(false);
    let err = s
        .client
        .patch_prefs(&MaskedPrefs::advertise_routes(vec![]))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "LocalAPI PATCH /localapi/v0/prefs: answered 403 Forbidden: prefs write access denied"
    );
}

#[tokio::test]
async fn watch_signals_changes_and_ends_with_the_server() {
    let mut s = setup();
    let mut watch = s.client.watch().await.unwrap();
    s.tailnet.remove(&SimNode::numbered(2).stable_id);
    let message = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a message for the change")
        .unwrap();
    assert!(message.is_some());
    assert!(s.server.requests()[0]
        .target
        .starts_with("/localapi/v0/watch-ipn-bus?mask="));

    s.server.stop();
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the stream ends when the server stops");
    assert!(
        matches!(end, Ok(None) | Err(LocalApiError::Http { .. })),
        "{end:?}"
    );
}

#[tokio::test]
async fn garbage_is_a_document_error() {
    let s = setup();
    s.server.set_behaviour(Behaviour::Garbage);
    let err = s.client.status().await.unwrap_err();
    assert!(matches!(err, LocalApiError::Document { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("LocalAPI GET /localapi/v0/status: not a valid status document: "),
        "{err}"
    );
    let err = s
        .client
        .whois("100.101.1.11:1".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, LocalApiError::Document { .. }), "{err:?}");

    let mut watch = s.client.watch().await.unwrap();
    let err = watch.next().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("not a valid watch-ipn-bus message"),
        "{err}"
    );
}

#[tokio::test]
async fn error_statuses_carry_the_daemons_message() {
    let s = setup();
    s.server.set_behaviour(Behaviour::Error(500));
    let err = s.client.status().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "LocalAPI GET /localapi/v0/status: answered 500 Internal Server Error: tailnet-sim: failing on purpose"
    );
    // A 404 from whois is "unknown address"; from anything else an error.
    s.server.set_behaviour(Behaviour::Error(404));
    assert!(s.client.status().await.is_err());
    assert!(s.client.watch().await.is_err());
}

#[tokio::test]
async fn a_silent_daemon_times_out() {
    let s = setup();
    s.server.set_behaviour(Behaviour::Silent);
    let client = s.client.clone().with_timeout(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = client.status().await.unwrap_err();
    assert!(matches!(err, LocalApiError::Timeout { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "LocalAPI GET /localapi/v0/status: no complete answer within 200ms"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        client.watch().await.unwrap_err(),
        LocalApiError::Timeout { .. }
    ));
}

#[tokio::test]
async fn no_daemon_is_a_connect_error_and_a_restart_heals() {
    let mut s = setup();
    s.server.stop();
    let err = s.client.status().await.unwrap_err();
    assert!(matches!(err, LocalApiError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("cannot connect to tailscaled's LocalAPI at /"),
        "{err}"
    );
    s.server.restart().unwrap();
    assert_eq!(s.client.status().await.unwrap().peers.len(), 2);
}

#[tokio::test]
async fn a_node_awaiting_approval_sees_no_peers() {
    let s = setup();
    s.tailnet
        .update(&SimNode::numbered(0).stable_id, |n| n.authorized = false);
    let view = s.client.status().await.unwrap();
    assert_eq!(view.backend_state, "NeedsMachineAuth");
    assert!(!view.is_running());
    assert!(view.peers.is_empty());
}
