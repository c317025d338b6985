//! An emulated tailnet for routers that learn their peers from Tailscale: a bridge in a
//! switch namespace with `tailscale0` in every node carrying the node's tailnet addresses
//! (MTU 1280, as tailscaled's), a config file for such a router, and a [`Fleet`] — many
//! made-up tailnet nodes at once, their addresses in one namespace on the same bridge, each
//! answering the announcement request with its own document — to give routers a thousand
//! peers without a thousand routers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;

use crate::config_router::ConfigRouter;
use crate::netns::Netns;
use crate::topology::Topology;

/// The emulated tailscale0 in every node.
pub const TAILNET_IF: &str = "tailscale0";
/// The port routers serve and fetch announcements on (the configs below set it).
pub const ANNOUNCE_PORT: u16 = 51821;
/// The announcement's path (the router's `ANNOUNCEMENT_PATH`).
const ANNOUNCEMENT_PATH: &str = "/tailsk8s/v1/announcement";
/// Where [`fleet_ip`]s lie.
const FLEET_NET: &str = "100.102.0.0/16";
/// The fleet namespace's own address (its on-link route to the nodes' tailnet addresses).
const FLEET_OWN: Ipv4Addr = Ipv4Addr::new(100, 102, 255, 254);

/// The bridge, with `tailscale0` in every node holding `tailnet_ips[k]` (node `k`'s).
/// The returned namespace owns the bridge (deleted on drop).
pub fn build(topology: &Topology, tailnet_ips: &[Vec<IpAddr>]) -> anyhow::Result<Netns> {
    let switch = Netns::new("ts")?;
    let mut lines = vec![
        "link add br0 type bridge mcast_snooping 0".to_string(),
        "link set br0 up".into(),
    ];
    for node in topology.nodes() {
        let port = format!("t{}", node.index());
        lines.push(format!(
            "link add {port} type veth peer name {TAILNET_IF} netns {}",
            node.netns().name()
        ));
        lines.push(format!("link set {port} master br0"));
        lines.push(format!("link set {port} up"));
    }
    switch.ip_batch(&lines)?;
    for (node, ips) in topology.nodes().iter().zip(tailnet_ips) {
        let mut lines = vec![format!("link set {TAILNET_IF} mtu 1280 up")];
        for ip in ips {
            lines.push(match ip {
                IpAddr::V4(_) => format!("addr add {ip}/10 dev {TAILNET_IF}"),
                IpAddr::V6(_) => format!("addr add {ip}/48 dev {TAILNET_IF} nodad"),
            });
        }
        node.netns().ip_batch(&lines)?;
    }
    Ok(switch)
}

/// A config file for `router` with pod CIDRs `pod_cidrs`, learning its peers from the
/// LocalAPI at `socket` (nodes tagged `tag`), re-read every `resync`.
pub fn router_config(
    router: &ConfigRouter<'_>,
    pod_cidrs: &[IpNet],
    socket: &Path,
    tag: &str,
    resync: Duration,
) -> String {
    let pods: Vec<String> = pod_cidrs.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "interface = \"{ifname}\"\n\
         private_key_file = \"{key}\"\n\
         listen_port = 51820\n\
         pod_cidrs = [{pods}]\n\
         cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/32\"]\n\
         \n\
         [tailscale]\n\
         socket = \"{socket}\"\n\
         tag = \"{tag}\"\n\
         announce_port = {ANNOUNCE_PORT}\n\
         resync = \"{resync}s\"\n",
        ifname = router.ifname(),
        key = router.key_path().display(),
        pods = pods.join(", "),
        socket = socket.display(),
        resync = resync.as_secs(),
    )
}

/// Made-up node `i`'s tailnet address: 100.102.(i / 250).(i % 250 + 1).
pub fn fleet_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 102, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// What one made-up node announces.
#[derive(Debug, Clone)]
pub struct Announced {
    pub public_key: String,
    pub endpoints: Vec<SocketAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

impl Announced {
    /// The announcement document (the router's version 1 format).
    fn to_json(&self) -> String {
        let quoted = |items: Vec<String>| -> String {
            items
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{{\"version\":1,\"public_key\":\"{}\",\"listen_port\":51820,\"endpoints\":[{}],\"pod_cidrs\":[{}]}}",
            self.public_key,
            quoted(self.endpoints.iter().map(ToString::to_string).collect()),
            quoted(self.pod_cidrs.iter().map(ToString::to_string).collect()),
        )
    }
}

/// Made-up tailnet nodes: [`fleet_ip`]`(i)` for each, in a namespace on the tailnet bridge,
/// and one server answering the announcement request on every one of them with that node's
/// document. Stops and removes its namespace on drop.
pub struct Fleet {
    ns: Netns,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Attaches a namespace to `switch`'s bridge holding one address per entry of
    /// `announced`, and serves their documents.
    pub fn start(switch: &Netns, announced: &[Announced]) -> anyhow::Result<Fleet> {
        let ns = Netns::new("fleet")?;
        switch.ip_batch(&[
            format!(
                "link add fl0 type veth peer name {TAILNET_IF} netns {}",
                ns.name()
            ),
            "link set fl0 master br0".to_string(),
            "link set fl0 up".to_string(),
        ])?;
        let mut lines = vec![
            format!("link set {TAILNET_IF} mtu 1280 up"),
            // The on-link route to the nodes' tailnet addresses.
            format!("addr add {FLEET_OWN}/10 dev {TAILNET_IF}"),
        ];
        lines.extend(
            (0..announced.len()).map(|i| format!("addr add {}/32 dev {TAILNET_IF}", fleet_ip(i))),
        );
        ns.ip_batch(&lines)?;
        let documents: HashMap<IpAddr, String> = announced
            .iter()
            .enumerate()
            .map(|(i, a)| (IpAddr::V4(fleet_ip(i)), a.to_json()))
            .collect();
        let listener = ns
            .enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, ANNOUNCE_PORT)))?
            .context("binding the fleet's announcement server")?;
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || serve(&listener, &documents, &stop))
        };
        Ok(Fleet {
            ns,
            stop,
            server: Some(server),
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Routes the fleet's tailnet addresses and `endpoints` (the made-up nodes' direct
    /// endpoints, where nothing answers) from `node` through the fleet's own address: one
    /// neighbour entry for the lot, as behind a real gateway (a thousand on-link addresses
    /// would overflow the node's neighbour table).
    pub fn route_from(&self, node: &Netns, endpoints: &IpNet) -> anyhow::Result<()> {
        node.ip_batch(&[
            format!("route add {FLEET_NET} via {FLEET_OWN} dev {TAILNET_IF} onlink"),
            format!("route add {endpoints} via {FLEET_OWN} dev {TAILNET_IF} onlink"),
        ])
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept.
        let _ = self
            .ns
            .enter(|| TcpStream::connect((FLEET_OWN, ANNOUNCE_PORT)));
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

fn serve(listener: &TcpListener, documents: &HashMap<IpAddr, String>, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = answer(&mut conn, documents);
    }
}

/// Reads one request and answers it with the document of the address it was sent to.
fn answer(conn: &mut TcpStream, documents: &HashMap<IpAddr, String>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 << 10 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&request);
    let wanted = head
        .lines()
        .next()
        .is_some_and(|line| line.starts_with(&format!("GET {ANNOUNCEMENT_PATH} ")));
    let document = conn.local_addr().ok().and_then(|a| documents.get(&a.ip()));
    let response = match (wanted, document) {
        (true, Some(body)) => format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
        _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
    };
    conn.write_all(response.as_bytes())
}
