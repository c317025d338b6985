//! The `[metrics] listen` HTTP server: `/metrics` (Prometheus text format, built per scrape
//! from one [`Status`]), `/healthz` and `/readyz` (200 `ok`, or 503 and the reason). Runs on
//! the control plane's tokio runtime.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use crate::observe::{RouterView, Status, PEER_STATES};

type Labels = Vec<(&'static str, String)>;
type F64Gauge = Gauge<f64, AtomicU64>;

/// The exposition of one status, in Prometheus text format.
pub fn exposition(status: &Status) -> String {
    let mut registry = Registry::with_prefix("tailsk8s");
    let counter = || Family::<Labels, Counter>::default();
    let (rx_bytes, tx_bytes, rx_packets, tx_packets, attempts) =
        (counter(), counter(), counter(), counter(), counter());
    let handshake = Family::<Labels, F64Gauge>::default();
    let path = Family::<Labels, Gauge>::default();
    let peer_drops = counter();
    for p in &status.peers {
        let labels: Labels = vec![
            ("public_key", p.public_key.clone()),
            ("node", p.node.clone()),
        ];
        rx_bytes.get_or_create(&labels).inc_by(p.rx_bytes);
        tx_bytes.get_or_create(&labels).inc_by(p.tx_bytes);
        rx_packets.get_or_create(&labels).inc_by(p.rx_packets);
        tx_packets.get_or_create(&labels).inc_by(p.tx_packets);
        attempts.get_or_create(&labels).inc_by(p.handshake_attempts);
        if let Some(at) = p.last_handshake {
            handshake.get_or_create(&labels).set(at as f64);
        }
        for d in &p.drops {
            let mut with_reason = labels.clone();
            with_reason.push(("reason", d.reason.clone()));
            peer_drops.get_or_create(&with_reason).inc_by(d.count);
        }
        for name in ["direct", "tailnet"] {
            let mut with_path = labels.clone();
            with_path.push(("path", name.to_string()));
            path.get_or_create(&with_path)
                .set(i64::from(p.path == name));
        }
    }
    registry.register_with_unit(
        "peer_receive",
        "Wire bytes of WireGuard messages received from the peer",
        Unit::Bytes,
        rx_bytes,
    );
    registry.register_with_unit(
        "peer_transmit",
        "Wire bytes of WireGuard messages sent to the peer",
        Unit::Bytes,
        tx_bytes,
    );
    registry.register(
        "peer_receive_packets",
        "Authenticated WireGuard messages received from the peer",
        rx_packets,
    );
    registry.register(
        "peer_transmit_packets",
        "WireGuard messages sent to the peer",
        tx_packets,
    );
    registry.register(
        "peer_handshake_attempts",
        "Handshake initiations sent to the peer, retries included",
        attempts,
    );
    registry.register_with_unit(
        "peer_last_handshake",
        "Unix time of the peer's last completed handshake",
        Unit::Seconds,
        handshake,
    );
    registry.register(
        "peer_dropped_packets",
        "Packets and datagrams dropped that concern the peer, by reason (a series appears \
         with the peer's first drop for that reason; also counted in tailsk8s_drops_total)",
        peer_drops,
    );
    registry.register(
        "peer_path",
        "1 for the path the peer's datagrams take now (direct or tailnet)",
        path,
    );

    let peers = Family::<Labels, Gauge>::default();
    for state in PEER_STATES {
        let n = status.peers.iter().filter(|p| p.state == state).count();
        peers
            .get_or_create(&vec![("state", state.to_string())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register("peers", "Peers by state", peers);

    let drops = Family::<Labels, Counter>::default();
    for d in &status.drops {
        drops
            .get_or_create(&vec![("reason", d.reason.clone())])
            .inc_by(d.count);
    }
    registry.register("drops", "Packets and datagrams dropped, by reason", drops);

    let workers = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    workers.set(i64::try_from(status.workers).unwrap_or(i64::MAX));
    registry.register("workers", "Packet workers", workers);
    let offload = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    offload.set(i64::from(status.offload));
    registry.register(
        "offload",
        "1 when the TUN runs with offloads (TSO/USO reads, GRO writes)",
        offload,
    );

    if let Some(source) = &status.source {
        let up = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        up.set(i64::from(source.state == "fresh"));
        registry.register(
            "source_fresh",
            "1 when the Tailscale peer source's last LocalAPI read succeeded",
            up,
        );
        let errors = Counter::<u64>::default();
        errors.inc_by(source.errors);
        registry.register(
            "source_errors",
            "Failed LocalAPI reads and failed peer applies",
            errors,
        );
        if let Some(age) = source.sync_age_seconds {
            let g = F64Gauge::default();
            g.set(age);
            registry.register_with_unit(
                "source_sync_age",
                "Time since the peer source's last good sync",
                Unit::Seconds,
                g,
            );
        }
        if let Some(took) = source.reconcile_seconds {
            let g = F64Gauge::default();
            g.set(took);
            registry.register_with_unit(
                "source_reconcile_duration",
                "How long the peer source's last good sync took",
                Unit::Seconds,
                g,
            );
        }
    }

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// The HTTP routes.
pub fn router(view: RouterView) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(view)
}

async fn metrics(State(view): State<RouterView>) -> impl IntoResponse {
    let status = tokio::task::spawn_blocking(move || view.status()).await;
    match status {
        Ok(status) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            exposition(&status),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn verdict(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(view): State<RouterView>) -> (StatusCode, String) {
    verdict(view.live())
}

async fn readyz(State(view): State<RouterView>) -> (StatusCode, String) {
    match tokio::task::spawn_blocking(move || view.ready()).await {
        Ok(result) => verdict(result),
        Err(e) => verdict(Err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::observe::{DropCount, PeerStatus, SourceStatus};

    /// One sample: family name, labels, value.
    type Sample = (String, BTreeMap<String, String>, f64);

    /// A strict reader of the text format as this exposition uses it: every sample belongs to
    /// a family with a `# TYPE` line before it, label values are quoted, the text ends with
    /// `# EOF`. Returns the types by family and the samples.
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
        for line in &lines[..lines.len() - 1] {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none());
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment {line}");
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().expect("numeric value");
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let mut labels = BTreeMap::new();
                    for pair in body.split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .expect("quoted label value");
                        labels.insert(k.to_string(), v.to_string());
                    }
                    (name, labels)
                }
            };
            let family = types
                .keys()
                .find(|f| name == f.as_str() || name.strip_prefix(f.as_str()) == Some("_total"))
                .unwrap_or_else(|| panic!("sample {name} has no # TYPE"));
            if types[family] == "counter" {
                assert!(name.ends_with("_total"), "{name}: counters end in _total");
            }
            assert!(name.starts_with("tailsk8s_"), "{name}");
            samples.push((name.to_string(), labels, value));
        }
        (types, samples)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }

    fn status() -> Status {
        let peer = |key: &str, node: &str, path: &str, state: &str| PeerStatus {
            public_key: key.to_string(),
            node: node.to_string(),
            pod_cidrs: vec!["198.19.2.0/24".into()],
            endpoint: Some("198.18.0.2:51820".into()),
            path: path.to_string(),
            state: state.to_string(),
            last_handshake: Some(1_700_000_000),
            rx_bytes: 1372,
            tx_bytes: 1428,
            rx_packets: 11,
            tx_packets: 12,
            handshake_attempts: 2,
            drops: Vec::new(),
        };
        Status {
            interface: "tsk0".into(),
            workers: 2,
            offload: true,
            key_loaded: true,
            source: Some(SourceStatus {
                state: "stale".into(),
                reason: Some("connection refused".into()),
                last_sync: Some(1_700_000_000.5),
                sync_age_seconds: Some(12.5),
                errors: 3,
                reconcile_seconds: Some(0.25),
            }),
            peers: vec![
                PeerStatus {
                    drops: vec![DropCount {
                        reason: "not_allowed".into(),
                        count: 3,
                    }],
                    ..peer("AAA=", "node-b", "tailnet", "connected")
                },
                peer("BBB=", "", "direct", "connecting"),
            ],
            drops: vec![
                DropCount {
                    reason: "no_route".into(),
                    count: 7,
                },
                DropCount {
                    reason: "too_big".into(),
                    count: 0,
                },
            ],
        }
    }

    #[test]
    fn exposition_names_labels_and_types_round_trip() {
        let text = exposition(&status());
        let (types, samples) = parse(&text);
        let expected_types = [
            ("tailsk8s_peer_receive_bytes", "counter"),
            ("tailsk8s_peer_transmit_bytes", "counter"),
            ("tailsk8s_peer_receive_packets", "counter"),
            ("tailsk8s_peer_transmit_packets", "counter"),
            ("tailsk8s_peer_handshake_attempts", "counter"),
            ("tailsk8s_peer_last_handshake_seconds", "gauge"),
            ("tailsk8s_peer_dropped_packets", "counter"),
            ("tailsk8s_peer_path", "gauge"),
            ("tailsk8s_peers", "gauge"),
            ("tailsk8s_drops", "counter"),
            ("tailsk8s_workers", "gauge"),
            ("tailsk8s_offload", "gauge"),
            ("tailsk8s_source_fresh", "gauge"),
            ("tailsk8s_source_errors", "counter"),
            ("tailsk8s_source_sync_age_seconds", "gauge"),
            ("tailsk8s_source_reconcile_duration_seconds", "gauge"),
        ];
        for (name, kind) in expected_types {
            assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        assert_eq!(types.len(), expected_types.len(), "{types:?}");

        let b = [("public_key", "AAA="), ("node", "node-b")];
        let s = [("public_key", "BBB="), ("node", "")];
        let v = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
        assert_eq!(v("tailsk8s_peer_receive_bytes_total", &b), Some(1372.0));
        assert_eq!(v("tailsk8s_peer_transmit_bytes_total", &s), Some(1428.0));
        assert_eq!(v("tailsk8s_peer_receive_packets_total", &b), Some(11.0));
        assert_eq!(v("tailsk8s_peer_transmit_packets_total", &b), Some(12.0));
        assert_eq!(v("tailsk8s_peer_handshake_attempts_total", &s), Some(2.0));
        assert_eq!(
            v("tailsk8s_peer_last_handshake_seconds", &b),
            Some(1_700_000_000.0)
        );
        let with_reason = |reason| [b[0], b[1], ("reason", reason)];
        assert_eq!(
            v(
                "tailsk8s_peer_dropped_packets_total",
                &with_reason("not_allowed")
            ),
            Some(3.0)
        );
        assert!(
            !samples
                .iter()
                .any(|(n, l, _)| n == "tailsk8s_peer_dropped_packets_total"
                    && l.get("public_key").map(String::as_str) == Some("BBB=")),
            "a peer without drops has no drop series"
        );
        let with_path = |path| [b[0], b[1], ("path", path)];
        assert_eq!(v("tailsk8s_peer_path", &with_path("tailnet")), Some(1.0));
        assert_eq!(v("tailsk8s_peer_path", &with_path("direct")), Some(0.0));
        assert_eq!(v("tailsk8s_peers", &[("state", "connected")]), Some(1.0));
        assert_eq!(v("tailsk8s_peers", &[("state", "connecting")]), Some(1.0));
        assert_eq!(v("tailsk8s_peers", &[("state", "no_endpoint")]), Some(0.0));
        assert_eq!(
            v("tailsk8s_drops_total", &[("reason", "no_route")]),
            Some(7.0)
        );
        assert_eq!(
            v("tailsk8s_drops_total", &[("reason", "too_big")]),
            Some(0.0)
        );
        assert_eq!(v("tailsk8s_workers", &[]), Some(2.0));
        assert_eq!(v("tailsk8s_offload", &[]), Some(1.0));
        assert_eq!(v("tailsk8s_source_fresh", &[]), Some(0.0));
        assert_eq!(v("tailsk8s_source_errors_total", &[]), Some(3.0));
        assert_eq!(v("tailsk8s_source_sync_age_seconds", &[]), Some(12.5));
        assert_eq!(
            v("tailsk8s_source_reconcile_duration_seconds", &[]),
            Some(0.25)
        );
    }

    #[test]
    fn without_a_source_there_are_no_source_metrics() {
        let mut status = status();
        status.source = None;
        let (types, _) = parse(&exposition(&status));
        assert!(types
            .keys()
            .all(|name| !name.starts_with("tailsk8s_source_")));
    }
}
