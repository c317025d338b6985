//! Criterion benchmarks of the Tailscale peer source at tailnet scale, without IO: a LocalAPI
//! status document of 1,000 tagged peers (each with an IPv4 and an IPv6 pod CIDR approved),
//! and every peer's announcement already fetched (as after the first sync).
//!
//! - `resync_unchanged_1000`: what every resync does when nothing changed — parse the status,
//!   find the cluster nodes and their approved pod CIDRs, build the desired peer set, diff it
//!   against the applied one. The diff is checked to be empty: nothing would reach the data
//!   plane or the kernel (the applier calls neither for an empty diff).
//! - `resync_one_added_1000`: the same with one more peer in the status: the diff is checked to
//!   be exactly that peer.
//!
//! The goal: ≤ 50 ms for an unchanged resync of 1,000 peers.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ipnet::IpNet;
use serde_json::{json, Map, Value};
use tailsk8s::announcement::Announcement;
use tailsk8s::config::TailscaleConfig;
use tailsk8s::peer_source::{cluster_nodes_with_pods, desired_from_nodes, SourceSettings};
use tailsk8s::reconcile::{diff, StaticPeers};
use tailsk8s::tailscale::documents::parse_status;
use tailsk8s_dataplane::key::Key;

const PEERS: usize = 1000;

fn peer_json(i: usize) -> Value {
    json!({
        "ID": format!("n{i:05}CNTRL"),
        "PublicKey": format!("nodekey:{:064x}", 0xb000 + i),
        "HostName": format!("k8s-node-{i}"),
        "DNSName": format!("k8s-node-{i}.tail3f9c2.ts.net."),
        "OS": "linux",
        "TailscaleIPs": [format!("100.101.{}.{}", i / 250, i % 250 + 1), format!("fd7a:115c:a1e0::6f01:{i:x}")],
        "AllowedIPs": [format!("100.101.{}.{}/32", i / 250, i % 250 + 1)],
        "Tags": ["tag:k8s-node"],
        "PrimaryRoutes": [pod_v4(i).to_string(), pod_v6(i).to_string()],
        "Addrs": null,
        "CurAddr": "",
        "Relay": "fra",
        "Online": true,
        "LastSeen": "0001-01-01T00:00:00Z",
        "Active": false,
        "InNetworkMap": true,
        "InMagicSock": true,
        "InEngine": false,
        "KeyExpiry": "2027-05-01T00:00:00Z",
    })
}

fn pod_v4(i: usize) -> IpNet {
    format!("198.19.{}.{}/28", i / 16, i % 16 * 16)
        .parse()
        .unwrap()
}

fn pod_v6(i: usize) -> IpNet {
    format!("fd00:19:{i:x}::/64").parse().unwrap()
}

fn status(peers: usize) -> Vec<u8> {
    let mut map = Map::new();
    for i in 1..=peers {
        map.insert(format!("nodekey:{:064x}", 0xb000 + i), peer_json(i));
    }
    let mut me = peer_json(0);
    me["ID"] = json!("nSELFCNTRL");
    serde_json::to_vec(&json!({
        "Version": "1.102.3",
        "BackendState": "Running",
        "TailscaleIPs": ["100.101.0.1"],
        "Self": me,
        "Health": [],
        "CurrentTailnet": {"Name": "example.org", "MagicDNSSuffix": "tail3f9c2.ts.net", "MagicDNSEnabled": true},
        "Peer": map,
    }))
    .unwrap()
}

fn settings() -> SourceSettings {
    SourceSettings {
        tailscale: TailscaleConfig {
            socket: "/nonexistent".into(),
            tag: "tag:k8s-node".into(),
            announce_port: 51821,
            resync: Duration::from_secs(30),
        },
        cluster_cidrs: vec![
            "198.19.0.0/16".parse().unwrap(),
            "fd00:19::/32".parse().unwrap(),
        ],
    }
}

/// This node's own pod CIDRs and no static peer.
fn statics() -> StaticPeers {
    StaticPeers {
        own_pod_cidrs: vec![pod_v4(0), pod_v6(0)],
        ..StaticPeers::default()
    }
}

fn announcements(peers: usize) -> BTreeMap<String, Announcement> {
    (1..=peers)
        .map(|i| {
            let mut private = [7u8; 32];
            private[1..9].copy_from_slice(&(i as u64).to_le_bytes());
            (
                format!("n{i:05}CNTRL"),
                Announcement {
                    public_key: Key(private).clamped().public_key(),
                    listen_port: 51820,
                    endpoints: vec![format!("198.18.{}.{}:51820", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap()],
                    pod_cidrs: vec![pod_v4(i), pod_v6(i)],
                },
            )
        })
        .collect()
}

fn resync(c: &mut Criterion) {
    let settings = settings();
    let statics = statics();
    let announcements = announcements(PEERS + 1);
    let before = status(PEERS);
    let after = status(PEERS + 1);
    let plan = |bytes: &[u8]| {
        let view = parse_status(bytes).unwrap();
        let nodes = cluster_nodes_with_pods(&view, &settings);
        desired_from_nodes(&nodes, &statics, |id| announcements.get(id))
    };
    let applied = plan(&before).peers;
    assert_eq!(applied.len(), PEERS);
    assert!(diff(&applied, &plan(&before).peers).is_empty());
    assert_eq!(diff(&applied, &plan(&after).peers).len(), 1);

    let mut group = c.benchmark_group("peer_source");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("resync_unchanged_1000", |b| {
        b.iter(|| {
            let desired = plan(black_box(&before));
            let updates = diff(&applied, &desired.peers);
            assert!(updates.is_empty());
        })
    });
    group.bench_function("resync_one_added_1000", |b| {
        b.iter(|| {
            let desired = plan(black_box(&after));
            let updates = diff(&applied, &desired.peers);
            assert_eq!(updates.len(), 1);
        })
    });
    group.finish();
}

criterion_group!(benches, resync);
criterion_main!(benches);
