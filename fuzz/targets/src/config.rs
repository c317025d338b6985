//! `config`: the router's TOML config file.
//!
//! Every input is used twice:
//! 1. as text (when it is UTF-8), given to [`RouterConfig::parse`] as the file
//!    `/etc/tailsk8s/router.toml`: never a panic; an error points inside the text; an accepted
//!    file satisfies every documented rule (MTU range, normalised and unique allowed IPs,
//!    unique non-low-order peer keys, no port-0 endpoint, absolute resolved paths) and
//!    survives a round trip (written back as TOML, it parses to the same configuration);
//! 2. as choices for a structure-aware generator of VALID files ([`generate`]): field order,
//!    optional fields, hex or decimal integers, comments, inline or `[[peer]]` tables, bare
//!    addresses, host bits, spaces around values, pod and cluster CIDRs, announced endpoints,
//!    a `[tailscale]` table. Each generated file must parse to exactly the configuration the
//!    generator meant.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use tailsk8s::config::{
    check_ifname, is_valid_tag, Location, PeerConfig, RouterConfig, TailscaleConfig,
    DEFAULT_ANNOUNCE_PORT, DEFAULT_LISTEN_PORT, DEFAULT_MTU, DEFAULT_RESYNC, DEFAULT_TAG,
    DEFAULT_TAILSCALE_SOCKET, MAX_MTU, MAX_RESYNC, MAX_WORKERS, MIN_MTU, MIN_RESYNC,
};
use tailsk8s::routes::DEFAULT_FWMARK;
use tailsk8s_dataplane::affinity::WorkerAffinity;
use tailsk8s_dataplane::key::Key;

use crate::input::Choices;

const FILE: &str = "/etc/tailsk8s/router.toml";
const DIR: &str = "/etc/tailsk8s";

/// The target body.
pub fn run(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_text(text);
    }
    let (text, expected) = generate(&mut Choices::new(data));
    match RouterConfig::parse(Path::new(FILE), &text) {
        Ok(cfg) => assert_eq!(
            without_lines(cfg),
            without_lines(expected),
            "generated file parsed differently:\n{text}"
        ),
        Err(e) => panic!("generated file refused: {e}\n{text}"),
    }
}

fn check_text(text: &str) {
    let cfg = match RouterConfig::parse(Path::new(FILE), text) {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = e.to_string();
            if let Some(at) = e.location() {
                let lines = text.split('\n').count();
                assert!(
                    at.line >= 1 && at.line <= lines,
                    "error at line {} of {lines}",
                    at.line
                );
            }
            return;
        }
    };
    check_rules(&cfg);
    let written = render(&cfg);
    match RouterConfig::parse(Path::new(FILE), &written) {
        Ok(again) => assert_eq!(
            without_lines(again),
            without_lines(cfg),
            "round trip changed the config:\n{written}"
        ),
        Err(e) => panic!("an accepted config, written back, is refused: {e}\n{written}"),
    }
}

/// The documented rules every accepted file satisfies.
fn check_rules(cfg: &RouterConfig) {
    assert!((MIN_MTU..=MAX_MTU).contains(&cfg.mtu), "mtu {}", cfg.mtu);
    assert!(cfg.workers <= MAX_WORKERS, "workers {}", cfg.workers);
    if let Some(name) = &cfg.interface {
        assert!(
            check_ifname(name).is_ok(),
            "bad interface {name:?} accepted"
        );
    }
    assert!(cfg.private_key_file.is_absolute());
    let mut keys = BTreeSet::new();
    let mut prefixes = BTreeSet::new();
    for peer in &cfg.peers {
        assert!(keys.insert(peer.public_key), "duplicate peer accepted");
        assert!(
            !peer.public_key.is_low_order_public(),
            "low-order key accepted"
        );
        if let Some(e) = peer.endpoint {
            assert_ne!(e.port(), 0, "port 0 endpoint accepted");
        }
        for p in &peer.allowed_ips {
            assert_eq!(*p, p.trunc(), "allowed IP {p} not normalised");
            assert!(prefixes.insert(*p), "duplicate allowed IP {p} accepted");
        }
        if let Some(f) = &peer.preshared_key_file {
            assert!(f.is_absolute());
        }
    }
    let mut pods = BTreeSet::new();
    for p in &cfg.pod_cidrs {
        assert_eq!(*p, p.trunc(), "pod CIDR {p} not a network");
        assert!(pods.insert(*p), "duplicate pod CIDR {p} accepted");
        assert!(
            cfg.cluster_cidrs.iter().any(|c| c.contains(p)),
            "pod CIDR {p} outside the cluster CIDRs accepted"
        );
    }
    let clusters: BTreeSet<_> = cfg.cluster_cidrs.iter().collect();
    assert_eq!(
        clusters.len(),
        cfg.cluster_cidrs.len(),
        "duplicate cluster CIDR"
    );
    assert!(cfg.cluster_cidrs.iter().all(|c| *c == c.trunc()));
    let endpoints: BTreeSet<_> = cfg.endpoints.iter().collect();
    assert_eq!(endpoints.len(), cfg.endpoints.len(), "duplicate endpoint");
    assert!(cfg.endpoints.iter().all(|e| e.port() != 0));
    if let Some(ts) = &cfg.tailscale {
        assert!(
            !cfg.cluster_cidrs.is_empty(),
            "[tailscale] without cluster CIDRs"
        );
        assert!(is_valid_tag(&ts.tag), "bad tag {:?} accepted", ts.tag);
        assert_ne!(ts.announce_port, 0);
        assert!((MIN_RESYNC..=MAX_RESYNC).contains(&ts.resync));
        assert!(ts.socket.is_absolute());
    }
    let update = cfg.to_device_update(Key([9; 32]), &BTreeMap::new());
    assert!(update.replace_peers);
    assert_eq!(update.peers.len(), cfg.peers.len());
    assert!(update.peers.iter().all(|p| p.replace_allowed_ips));
}

/// Line numbers say where a peer was written, which a rewrite changes on purpose.
fn without_lines(mut cfg: RouterConfig) -> RouterConfig {
    for p in &mut cfg.peers {
        p.line = 0;
    }
    cfg.private_key_file_at = NOWHERE;
    cfg
}

/// The location [`without_lines`] puts everywhere.
const NOWHERE: Location = Location { line: 0, column: 0 };

/// A TOML string, quoted and escaped by the `toml` crate (the parser's own rules).
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn path_str(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

/// Writes a config as a plain TOML file.
fn render(cfg: &RouterConfig) -> String {
    let mut out = String::new();
    if let Some(name) = &cfg.interface {
        let _ = writeln!(out, "interface = {}", quote(name));
    }
    let _ = writeln!(
        out,
        "private_key_file = {}",
        path_str(&cfg.private_key_file)
    );
    let _ = writeln!(out, "listen_port = {}", cfg.listen_port);
    let _ = writeln!(out, "mtu = {}", cfg.mtu);
    let _ = writeln!(out, "fwmark = {}", cfg.fwmark);
    let _ = writeln!(out, "workers = {}", cfg.workers);
    let _ = writeln!(out, "offload = {}", cfg.offload);
    let _ = writeln!(
        out,
        "worker_affinity = {}",
        quote(cfg.worker_affinity.name())
    );
    let list = |v: Vec<String>| v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
    let _ = writeln!(
        out,
        "pod_cidrs = [{}]",
        list(cfg.pod_cidrs.iter().map(IpNet::to_string).collect())
    );
    let _ = writeln!(
        out,
        "cluster_cidrs = [{}]",
        list(cfg.cluster_cidrs.iter().map(IpNet::to_string).collect())
    );
    let _ = writeln!(
        out,
        "endpoints = [{}]",
        list(cfg.endpoints.iter().map(SocketAddr::to_string).collect())
    );
    if let Some(ts) = &cfg.tailscale {
        out.push_str("\n[tailscale]\n");
        let _ = writeln!(out, "socket = {}", path_str(&ts.socket));
        let _ = writeln!(out, "tag = {}", quote(&ts.tag));
        let _ = writeln!(out, "announce_port = {}", ts.announce_port);
        let _ = writeln!(out, "resync = \"{}ms\"", ts.resync.as_millis());
    }
    for p in &cfg.peers {
        out.push_str("\n[[peer]]\n");
        let _ = writeln!(out, "public_key = {}", quote(&p.public_key.to_base64()));
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint = {}", quote(&e.to_string()));
        }
        let list: Vec<String> = p
            .allowed_ips
            .iter()
            .map(|n| quote(&n.to_string()))
            .collect();
        let _ = writeln!(out, "allowed_ips = [{}]", list.join(", "));
        if let Some(k) = p.persistent_keepalive {
            let _ = writeln!(out, "persistent_keepalive = {k}");
        }
        if let Some(f) = &p.preshared_key_file {
            let _ = writeln!(out, "preshared_key_file = {}", path_str(f));
        }
    }
    out
}

const IFNAMES: [&str; 4] = ["tsk0", "wg-pods", "a", "x12345678901234"];
const KEY_FILES: [&str; 4] = [
    "/var/lib/tailsk8s/private.key",
    "private.key",
    "keys/node key",
    "./k\u{e9}y",
];

fn resolve(p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_relative() {
        Path::new(DIR).join(path)
    } else {
        path
    }
}

/// An integer as TOML allows it: decimal, or hex / octal / binary when non-negative.
fn integer(c: &mut Choices<'_>, v: u64) -> String {
    match c.below(5) {
        1 => format!("0x{v:x}"),
        2 => format!("0o{v:o}"),
        3 => format!("0b{v:b}"),
        4 if v >= 1000 => {
            // Underscores between digits.
            let s = v.to_string();
            let (a, b) = s.split_at(s.len() - 3);
            format!("{a}_{b}")
        }
        _ => v.to_string(),
    }
}

/// Spaces around a string value that the parser trims (endpoints and allowed IPs).
fn padded(c: &mut Choices<'_>, s: &str) -> String {
    match c.below(4) {
        1 => format!(" {s}"),
        2 => format!("{s}  "),
        _ => s.to_string(),
    }
}

fn gen_endpoint(c: &mut Choices<'_>) -> SocketAddr {
    let port = c.u16().max(1);
    if c.bool() {
        let [x, y] = c.array();
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, x, y)), port)
    } else {
        let tail = c.u16();
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, tail)),
            port,
        )
    }
}

/// An allowed IP as written (maybe bare, maybe with host bits) and the prefix it means.
fn gen_prefix(c: &mut Choices<'_>) -> (String, IpNet) {
    let (addr, max): (IpAddr, u8) = if c.bool() {
        let [x, y] = c.array();
        (Ipv4Addr::new(198, 19, x, y).into(), 32)
    } else {
        let [x, y] = [c.u16(), c.u16()];
        (Ipv6Addr::new(0xfd00, 0x19, x, 0, 0, 0, 0, y).into(), 128)
    };
    if c.below(4) == 0 {
        return (addr.to_string(), IpNet::from(addr));
    }
    let len = (c.byte() % (max + 1)).max(if max == 32 { 16 } else { 32 });
    let written = format!("{addr}/{len}");
    let net = IpNet::new(addr, len).map(|n| n.trunc());
    match net {
        Ok(net) => (written, net),
        // Unreachable: len ≤ max by construction.
        Err(_) => (addr.to_string(), IpNet::from(addr)),
    }
}

/// Cluster CIDRs the generator picks from, each with pod CIDRs inside it.
const CLUSTERS: [(&str, [&str; 3]); 3] = [
    (
        "198.19.0.0/16",
        ["198.19.1.0/24", "198.19.2.0/24", "198.19.128.0/17"],
    ),
    (
        "fd00:19::/32",
        ["fd00:19:1::/64", "fd00:19:2::/64", "fd00:19::/32"],
    ),
    (
        "100.100.0.0/16",
        ["100.100.0.0/24", "100.100.7.0/26", "100.100.8.0/21"],
    ),
];
const TAGS: [&str; 3] = ["tag:k8s-node", "tag:a", "tag:Node-7-x"];
const SOCKETS: [&str; 3] = [
    "/run/tailscale/tailscaled.sock",
    "ts.sock",
    "/tmp/tailscaled.sock",
];

/// The Tailscale keys: cluster and pod CIDRs, endpoints, the `[tailscale]` table (its lines
/// returned apart: a table must follow every top-level key).
struct TailscalePart {
    top: Vec<String>,
    table: Vec<String>,
    pod_cidrs: Vec<IpNet>,
    cluster_cidrs: Vec<IpNet>,
    endpoints: Vec<SocketAddr>,
    tailscale: Option<TailscaleConfig>,
}

fn gen_tailscale(c: &mut Choices<'_>) -> TailscalePart {
    let mut part = TailscalePart {
        top: Vec::new(),
        table: Vec::new(),
        pod_cidrs: Vec::new(),
        cluster_cidrs: Vec::new(),
        endpoints: Vec::new(),
        tailscale: None,
    };
    let mut pods_written = Vec::new();
    for (cluster, pods) in CLUSTERS {
        if !c.bool() {
            continue;
        }
        part.cluster_cidrs
            .push(cluster.parse().unwrap_or_else(|_| unreachable!()));
        for pod in pods {
            if c.bool() {
                part.pod_cidrs
                    .push(pod.parse().unwrap_or_else(|_| unreachable!()));
                pods_written.push(quote(&padded(c, pod)));
            }
        }
    }
    if !part.cluster_cidrs.is_empty() || c.bool() {
        let written: Vec<String> = part
            .cluster_cidrs
            .iter()
            .map(|n| quote(&n.to_string()))
            .collect();
        part.top
            .push(format!("cluster_cidrs = [{}]", written.join(", ")));
    }
    if !pods_written.is_empty() {
        part.top
            .push(format!("pod_cidrs = [{}]", pods_written.join(", ")));
    }
    let mut written = Vec::new();
    for _ in 0..c.below(3) {
        let e = gen_endpoint(c);
        if !part.endpoints.contains(&e) {
            written.push(quote(&padded(c, &e.to_string())));
            part.endpoints.push(e);
        }
    }
    if !written.is_empty() {
        part.top
            .push(format!("endpoints = [{}]", written.join(", ")));
    }
    if part.cluster_cidrs.is_empty() || !c.bool() {
        return part;
    }
    let mut ts = TailscaleConfig {
        socket: PathBuf::from(DEFAULT_TAILSCALE_SOCKET),
        tag: DEFAULT_TAG.to_string(),
        announce_port: DEFAULT_ANNOUNCE_PORT,
        resync: DEFAULT_RESYNC,
    };
    part.table.push(String::new());
    part.table.push("[tailscale]".to_string());
    if c.bool() {
        let socket = SOCKETS[c.below(SOCKETS.len())];
        ts.socket = resolve(socket);
        part.table.push(format!("socket = {}", quote(socket)));
    }
    if c.bool() {
        let tag = TAGS[c.below(TAGS.len())];
        ts.tag = tag.to_string();
        part.table.push(format!("tag = {}", quote(tag)));
    }
    if c.bool() {
        ts.announce_port = c.u16().max(1);
        part.table.push(format!(
            "announce_port = {}",
            integer(c, u64::from(ts.announce_port))
        ));
    }
    if c.bool() {
        let (text, value) = match c.below(4) {
            0 => {
                let n = 1000 + u64::from(c.u16());
                (format!("{n}ms"), Duration::from_millis(n))
            }
            1 => {
                let n = 1 + u64::from(c.u16()) % 3600;
                (format!("{n}s"), Duration::from_secs(n))
            }
            2 => {
                let n = 1 + u64::from(c.byte()) % 60;
                (format!("{n}m"), Duration::from_secs(n * 60))
            }
            _ => {
                let n = 1 + u64::from(c.byte()) % 24;
                (format!("{n}h"), Duration::from_secs(n * 3600))
            }
        };
        ts.resync = value;
        part.table.push(format!("resync = {}", quote(&text)));
    }
    part.tailscale = Some(ts);
    part
}

/// A valid config file chosen by `c`, and the configuration it must parse to.
pub fn generate(c: &mut Choices<'_>) -> (String, RouterConfig) {
    let mut lines: Vec<String> = Vec::new();
    let interface = c
        .bool()
        .then(|| IFNAMES[c.below(IFNAMES.len())].to_string());
    let key_file = KEY_FILES[c.below(KEY_FILES.len())];
    let listen_port = c.bool().then(|| c.u16());
    let mtu = c
        .bool()
        .then(|| MIN_MTU + u32::from(c.u16()) % (MAX_MTU - MIN_MTU + 1));
    let fwmark = c.bool().then(|| c.u32());
    let workers = c.bool().then(|| usize::from(c.u16()) % (MAX_WORKERS + 1));
    let offload = c.bool().then(|| c.bool());
    let worker_affinity = c
        .bool()
        .then(|| WorkerAffinity::NAMES[c.below(WorkerAffinity::NAMES.len())]);

    let mut top: Vec<String> = Vec::new();
    if let Some(name) = &interface {
        top.push(format!("interface = {}", quote(name)));
    }
    top.push(format!("private_key_file = {}", quote(key_file)));
    if let Some(port) = listen_port {
        top.push(format!("listen_port = {}", integer(c, u64::from(port))));
    }
    if let Some(mtu) = mtu {
        top.push(format!("mtu = {}", integer(c, u64::from(mtu))));
    }
    if let Some(mark) = fwmark {
        top.push(format!("fwmark = {}", integer(c, u64::from(mark))));
    }
    if let Some(w) = workers {
        top.push(format!("workers = {}", integer(c, w as u64)));
    }
    if let Some(o) = offload {
        top.push(format!("offload = {o}"));
    }
    if let Some(a) = worker_affinity {
        top.push(format!("worker_affinity = {}", quote(a)));
    }
    let tailscale = gen_tailscale(c);
    top.extend(tailscale.top.iter().cloned());
    // Top-level keys in any order (a rotation chosen by the input), maybe with comments.
    let rotate = c.below(top.len());
    top.rotate_left(rotate);
    for line in top {
        if c.below(4) == 0 {
            lines.push("# a comment".to_string());
        }
        lines.push(line);
    }

    let inline = c.below(4) == 0;
    let mut peers = Vec::new();
    let mut peer_tables: Vec<Vec<String>> = Vec::new();
    let mut used_keys = BTreeSet::new();
    let mut used_prefixes = BTreeSet::new();
    for _ in 0..c.below(5) {
        let public_key = crate::support::fixed_private_key(c.byte()).public_key();
        if !used_keys.insert(public_key) {
            continue;
        }
        let mut fields = vec![format!("public_key = {}", quote(&public_key.to_base64()))];
        let endpoint = c.bool().then(|| gen_endpoint(c));
        if let Some(e) = endpoint {
            fields.push(format!("endpoint = {}", quote(&padded(c, &e.to_string()))));
        }
        let mut allowed_ips = Vec::new();
        let mut written = Vec::new();
        for _ in 0..c.below(4) {
            let (text, net) = gen_prefix(c);
            if used_prefixes.insert(net) {
                written.push(quote(&padded(c, &text)));
                allowed_ips.push(net);
            }
        }
        if !written.is_empty() || c.bool() {
            fields.push(format!("allowed_ips = [{}]", written.join(", ")));
        }
        let persistent_keepalive = c.bool().then(|| c.u16());
        if let Some(k) = persistent_keepalive {
            fields.push(format!("persistent_keepalive = {k}"));
        }
        let psk = c.bool().then(|| KEY_FILES[c.below(KEY_FILES.len())]);
        if let Some(f) = psk {
            fields.push(format!("preshared_key_file = {}", quote(f)));
        }
        let rotate = c.below(fields.len());
        fields.rotate_left(rotate);
        peers.push(PeerConfig {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
            preshared_key_file: psk.map(resolve),
            line: 0,
        });
        peer_tables.push(fields);
    }
    if inline && !peer_tables.is_empty() {
        let tables: Vec<String> = peer_tables
            .iter()
            .map(|f| format!("{{ {} }}", f.join(", ")))
            .collect();
        lines.push(format!("peer = [{}]", tables.join(", ")));
        // An inline `peer = [...]` is a top-level key: it goes before any table.
        lines.extend(tailscale.table.iter().cloned());
    } else {
        lines.extend(tailscale.table.iter().cloned());
        for fields in peer_tables {
            lines.push(String::new());
            lines.push("[[peer]]".to_string());
            lines.extend(fields);
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    let expected = RouterConfig {
        path: PathBuf::from(FILE),
        interface,
        private_key_file: resolve(key_file),
        private_key_file_at: NOWHERE,
        listen_port: listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
        mtu: mtu.unwrap_or(DEFAULT_MTU),
        fwmark: fwmark.unwrap_or(DEFAULT_FWMARK),
        workers: workers.unwrap_or(0),
        offload: offload.unwrap_or(true),
        worker_affinity: worker_affinity
            .and_then(|a| a.parse().ok())
            .unwrap_or_default(),
        peers,
        pod_cidrs: tailscale.pod_cidrs,
        cluster_cidrs: tailscale.cluster_cidrs,
        endpoints: tailscale.endpoints,
        tailscale: tailscale.tailscale,
        // The generator writes no `[metrics]` table.
        metrics_listen: None,
    };
    (text, expected)
}

/// Seeds: the documented example, a minimal file, and a few refusals.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let key_a = crate::support::fixed_private_key(2)
        .public_key()
        .to_base64();
    let key_b = crate::support::fixed_private_key(3)
        .public_key()
        .to_base64();
    let example = format!(
        "interface = \"tsk0\"\n\
         private_key_file = \"/var/lib/tailsk8s/private.key\"\n\
         listen_port = 51820\nmtu = 1420\nfwmark = 0x10000000\n\n\
         [[peer]]\npublic_key = \"{key_a}\"\nendpoint = \"198.18.0.2:51820\"\n\
         allowed_ips = [\"198.19.2.0/24\", \"fd00:19:2::/64\"]\npersistent_keepalive = 25\n\
         preshared_key_file = \"psk/a\"\n\n\
         [[peer]]\npublic_key = \"{key_b}\"\nendpoint = \"[fd00:18::3]:51820\"\n\
         allowed_ips = [\"198.19.3.7/24\", \"fd00:19:3::1\"]\n"
    );
    let inline = format!(
        "private_key_file = \"k\"\npeer = [{{ public_key = \"{key_a}\", allowed_ips = [] }}]\n"
    );
    let refused = format!(
        "private_key_file = \"k\"\nmtu = 70000\n[[peer]]\npublic_key = \"{key_a}\"\n\
         allowed_ips = [\"198.19.2.0/24\", \"198.19.2.9/24\"]\ncolour = \"blue\"\n"
    );
    let low_order = format!(
        "private_key_file = \"k\"\n[[peer]]\npublic_key = \"{}\"\n",
        Key::ZERO.to_base64()
    );
    vec![
        ("example", example.into_bytes()),
        ("minimal", b"private_key_file = \"/k\"\n".to_vec()),
        ("inline-peers", inline.into_bytes()),
        ("refused", refused.into_bytes()),
        ("low-order", low_order.into_bytes()),
        ("bad-toml", b"private_key_file = \"k\nmtu = [1,\n".to_vec()),
        (
            "tailscale",
            b"private_key_file = \"k\"\npod_cidrs = [\"198.19.1.0/24\", \"fd00:19:1::/64\"]\n\
              cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/32\"]\n\
              endpoints = [\"198.18.0.1:51820\"]\n\n[tailscale]\n\
              socket = \"/var/run/tailscale/tailscaled.sock\"\ntag = \"tag:k8s-node\"\n\
              announce_port = 51821\nresync = \"30s\"\n"
                .to_vec(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_covers_peers_and_options() {
        // A byte string that asks for everything: every "maybe" answered yes.
        let data = [1u8; 200];
        let (text, cfg) = generate(&mut Choices::new(&data));
        assert!(
            text.contains("[[peer]]") || text.contains("peer = ["),
            "{text}"
        );
        assert!(cfg.interface.is_some());
        assert_eq!(
            without_lines(RouterConfig::parse(Path::new(FILE), &text).unwrap()),
            without_lines(cfg)
        );
    }

    #[test]
    fn render_round_trips_the_example() {
        let example = seeds().remove(0).1;
        let text = String::from_utf8(example).unwrap_or_default();
        let cfg = RouterConfig::parse(Path::new(FILE), &text).unwrap();
        assert_eq!(cfg.peers.len(), 2);
        let again = RouterConfig::parse(Path::new(FILE), &render(&cfg)).unwrap();
        assert_eq!(without_lines(again), without_lines(cfg));
    }

    #[test]
    fn quoting_survives_awkward_strings() {
        for s in ["a\"b", "back\\slash", "tab\tnew\nline", "\u{7f}del", "é"] {
            let text = format!("private_key_file = {}\n", quote(s));
            let cfg = RouterConfig::parse(Path::new(FILE), &text).unwrap();
            assert_eq!(cfg.private_key_file, resolve(s), "{s:?}");
        }
    }

    #[test]
    fn generated_files_with_tailscale_keys_parse_as_meant() {
        // A simple deterministic byte stream per case: many shapes of the new keys.
        let mut seen_table = false;
        for case in 0u32..3000 {
            let mut x = case.wrapping_mul(2_654_435_761).wrapping_add(1);
            let data: Vec<u8> = (0..300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            run(&data);
            let (text, _) = generate(&mut Choices::new(&data));
            seen_table |= text.contains("[tailscale]");
        }
        assert!(seen_table, "no generated file had a [tailscale] table");
    }
}
