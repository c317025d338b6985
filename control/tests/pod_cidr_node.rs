//! The node's pod CIDRs from its Kubernetes Node object, read by the real client (kube-rs)
//! from a test API server that serves a recorded Node object of a kubeadm cluster the way the
//! API server does (`GET /api/v1/nodes/NAME`, a `Status` document for errors).

use std::path::Path;

use ipnet::IpNet;
use tailsk8s::pod_cidr::{self, PodCidrError, Source, Sources};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RECORDED_NODE: &str = include_str!("fixtures/node-kubeadm-dual-stack.json");

/// One API server answering every request with `routes(path) -> (status, body)`; returns the
/// client pointed at it.
async fn api_server(routes: fn(&str) -> (u16, String)) -> kube::Client {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body) = routes(&path);
                let reason = if status == 200 { "OK" } else { "Not Found" };
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    let config = kube::Config::new(url.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn not_found(name: &str) -> (u16, String) {
    (
        404,
        format!(
            r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"nodes \"{name}\" not found","reason":"NotFound","details":{{"name":"{name}","kind":"nodes"}},"code":404}}"#
        ),
    )
}

fn recorded(path: &str) -> (u16, String) {
    match path {
        "/api/v1/nodes/k8s-node-1" => (200, RECORDED_NODE.to_string()),
        "/api/v1/nodes/single-stack" => (
            200,
            RECORDED_NODE.replace(
                r#""podCIDRs": ["198.19.1.0/24", "fd00:19:1::/64"]"#,
                r#""podCIDRs": ["198.19.4.0/24"]"#,
            ),
        ),
        "/api/v1/nodes/old-cluster" => (
            200,
            RECORDED_NODE.replace(
                r#""podCIDRs": ["198.19.1.0/24", "fd00:19:1::/64"]"#,
                r#""unrelated": true"#,
            ),
        ),
        "/api/v1/nodes/unallocated" => (
            200,
            r#"{"kind":"Node","apiVersion":"v1","metadata":{"name":"unallocated"},"spec":{}}"#
                .into(),
        ),
        "/api/v1/nodes/bad-cidr" => (
            200,
            RECORDED_NODE.replace("fd00:19:1::/64", "fd00:19:1::/129"),
        ),
        "/api/v1/nodes/garbage" => (200, "{\"kind\": \"Node\", ".into()),
        other => not_found(other.rsplit('/').next().unwrap_or("")),
    }
}

fn cidrs(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

#[tokio::test]
async fn dual_stack_pod_cidrs_come_from_spec_pod_cidrs() {
    let client = api_server(recorded).await;
    let got = pod_cidr::node_pod_cidrs(client, "k8s-node-1")
        .await
        .unwrap();
    assert_eq!(got, cidrs(&["198.19.1.0/24", "fd00:19:1::/64"]));
}

#[tokio::test]
async fn single_stack_and_pre_dual_stack_nodes() {
    let client = api_server(recorded).await;
    let got = pod_cidr::node_pod_cidrs(client.clone(), "single-stack")
        .await
        .unwrap();
    assert_eq!(got, cidrs(&["198.19.4.0/24"]));
    // Only the old singular field: it is used.
    let got = pod_cidr::node_pod_cidrs(client.clone(), "old-cluster")
        .await
        .unwrap();
    assert_eq!(got, cidrs(&["198.19.1.0/24"]));
    // Not allocated yet: no CIDR, and not an error (the next source is asked).
    let got = pod_cidr::node_pod_cidrs(client, "unallocated")
        .await
        .unwrap();
    assert!(got.is_empty());
}

#[tokio::test]
async fn missing_nodes_bad_cidrs_and_garbage_are_clear_errors() {
    let client = api_server(recorded).await;
    let err = pod_cidr::node_pod_cidrs(client.clone(), "nowhere")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PodCidrError::Node { node, reason } if node == "nowhere" && reason.contains("not found")),
        "{err}"
    );
    let err = pod_cidr::node_pod_cidrs(client.clone(), "bad-cidr")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PodCidrError::BadNodeCidr { cidr, .. } if cidr == "fd00:19:1::/129"),
        "{err}"
    );
    let err = pod_cidr::node_pod_cidrs(client, "garbage")
        .await
        .unwrap_err();
    assert!(matches!(err, PodCidrError::Node { .. }), "{err}");
}

#[tokio::test]
async fn sources_are_asked_in_order() {
    let client = api_server(recorded).await;
    let dir = tempfile::tempdir().unwrap();
    let from_file = cidrs(&["198.19.9.0/24"]);
    let from_flag = cidrs(&["198.19.8.0/24"]);
    let resolve = |config_file: Vec<IpNet>,
                   command_line: Vec<IpNet>,
                   node: Option<&'static str>,
                   dir: &Path| {
        let client = client.clone();
        let dir = dir.to_path_buf();
        async move {
            pod_cidr::resolve(Sources {
                config_file: &config_file,
                command_line: &command_line,
                node: node.map(|n| (n, client)),
                cni_dir: &dir,
            })
            .await
        }
    };
    let (got, source) = resolve(
        from_file.clone(),
        from_flag.clone(),
        Some("k8s-node-1"),
        dir.path(),
    )
    .await
    .unwrap();
    assert_eq!((got, source), (from_file, Source::ConfigFile));
    let (got, source) = resolve(vec![], from_flag.clone(), Some("k8s-node-1"), dir.path())
        .await
        .unwrap();
    assert_eq!((got, source), (from_flag, Source::CommandLine));
    let (got, source) = resolve(vec![], vec![], Some("k8s-node-1"), dir.path())
        .await
        .unwrap();
    assert_eq!(got, cidrs(&["198.19.1.0/24", "fd00:19:1::/64"]));
    assert_eq!(
        source,
        Source::NodeObject {
            node: "k8s-node-1".into()
        }
    );
    // The Node has none yet: an existing CNI configuration is the last source.
    let err = resolve(vec![], vec![], Some("unallocated"), dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, PodCidrError::None { .. }), "{err}");
    let conf = dir.path().join("10-other.conflist");
    std::fs::write(
        &conf,
        r#"{"cniVersion":"1.0.0","name":"k","plugins":[{"type":"bridge","ipam":{"type":"host-local","ranges":[[{"subnet":"198.19.6.0/24"}]]}}]}"#,
    )
    .unwrap();
    let (got, source) = resolve(vec![], vec![], Some("unallocated"), dir.path())
        .await
        .unwrap();
    assert_eq!(got, cidrs(&["198.19.6.0/24"]));
    assert_eq!(source, Source::CniConfig { path: conf });
}
