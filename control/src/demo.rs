//! `tailsk8s demo`: a two-node cluster on this machine, in network namespaces. Each node has
//! a kubenet-style pod bridge (`cnio0`) with two pods and runs `tailsk8s router --config`
//! (this very binary) with a generated key; the nodes share an underlay. The demo shows pods
//! pinging across nodes (IPv4 and IPv6) and on the same node, a 5-second TCP transfer with
//! its throughput, and each router's peers as `wg show` would, then removes everything — also
//! on Ctrl-C. The cluster is the lab's (`tailsk8s-lab`), the one the end-to-end tests use.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tailsk8s_dataplane::uapi::client;
use tailsk8s_lab::topology::Pod;
use tailsk8s_lab::{ping, tools, wait, ConfigMesh, MeshOptions, TopologyBuilder};

/// `tailsk8s demo`
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DemoArgs {}

/// Prints a line, ignoring a closed stdout (`tailsk8s demo | head`): the demo must still
/// reach its cleanup rather than panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Seconds of the throughput run.
const TRANSFER_SECONDS: u32 = 5;
/// iperf3's default port.
const IPERF3_PORT: u16 = 5201;
/// How long a freshly started iperf3 server gets to listen.
const SERVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the demo; everything it created is gone when it returns.
pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`tailsk8s demo` needs root (it creates network namespaces, bridges and TUN devices): run it with sudo");
    }
    let missing: Vec<&str> = ["ip", "ping", "iperf3"]
        .into_iter()
        .filter(|tool| tools::find(tool).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "the demo needs {} (scripts/install-deps installs them)",
            missing.join(", ")
        );
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // With a handler installed, Ctrl-C no longer kills us outright: the guards below
        // get to remove every namespace and process.
        signal_hook::flag::register(signal, interrupted.clone())
            .context("installing signal handlers")?;
    }
    let check = || -> anyhow::Result<()> {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted; cleaning up");
        }
        Ok(())
    };
    let binary = std::env::current_exe().context("finding this program's path")?;

    step("Building a two-node cluster: per node a pod bridge cnio0 with 2 pods, an underlay between nodes");
    let cluster = TopologyBuilder::new(2).pods_per_node(2).build()?;
    check()?;
    // One `tailsk8s router --config` per node (this very binary), each with a generated
    // key and the other node as its peer; dropping the mesh stops them with SIGTERM.
    let routers = ConfigMesh::start_with_binary(&binary, &cluster, &MeshOptions::default())?;
    for (node, router) in cluster.nodes().iter().zip(routers.routers()) {
        say!(
            "  node {}  underlay {}  pods {}  router {} (key {})",
            node.index(),
            node.underlay_v4(),
            node.pod_cidrs()
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            router.ifname(),
            router.public_key().unwrap_or("?")
        );
    }
    check()?;

    let [n1, n2] = [&cluster.nodes()[0], &cluster.nodes()[1]];
    step("Pods ping across nodes through the tunnel, and on the same node over the bridge");
    for (from, to, v6) in [
        (&n1.pods()[0], &n2.pods()[0], false),
        (&n2.pods()[1], &n1.pods()[1], false),
        (&n1.pods()[0], &n2.pods()[1], true),
        (&n1.pods()[0], &n1.pods()[1], false),
    ] {
        check()?;
        ping(from.netns(), to.ip(v6), 3)?;
        say!("  {:<22} -> {:<22} 3/3 replies", from.ip(v6), to.ip(v6));
    }

    check()?;
    step(&format!(
        "{TRANSFER_SECONDS}-second TCP transfer, pod {} -> pod {}",
        n1.pods()[0].ipv4(),
        n2.pods()[0].ipv4()
    ));
    let gbits = transfer(&n1.pods()[0], &n2.pods()[0])?;
    say!("  {gbits:.2} Gbit/s (both routers and iperf3 share this machine's CPUs)");

    check()?;
    step("Peers as each router reports them over its UAPI socket (what `wg show` prints)");
    for router in routers.routers() {
        let text = show(router.ifname())?;
        let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    }
    step("Removing the cluster");
    drop(routers);
    drop(cluster);
    say!("  done: namespaces, routers, sockets and routes are gone");
    Ok(())
}

fn step(what: &str) {
    say!("\n== {what}");
}

fn socket_path(ifname: &str) -> PathBuf {
    Path::new(tailsk8s_dataplane::uapi::DEFAULT_SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// Runs iperf3 between two pods and returns the receiver's Gbit/s.
fn transfer(from: &Pod, to: &Pod) -> anyhow::Result<f64> {
    let mut server = to
        .netns()
        .spawn("iperf3", &["-s", "-1", "-B", &to.ipv4().to_string()])?;
    wait::until("the iperf3 server listens", SERVER_TIMEOUT, || {
        if let Some(status) = server.exited()? {
            bail!("the iperf3 server exited ({status}):\n{}", server.log());
        }
        Ok(to.netns().tcp_listening(IPERF3_PORT)?.then_some(()))
    })?;
    let target = to.ipv4().to_string();
    let seconds = TRANSFER_SECONDS.to_string();
    let output = from
        .netns()
        .output("iperf3", &["-c", &target, "-t", &seconds, "-f", "g"])?;
    drop(server);
    output
        .lines()
        .filter(|l| l.contains("receiver"))
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let unit = words.iter().position(|w| *w == "Gbits/sec")?;
            words.get(unit.checked_sub(1)?)?.parse::<f64>().ok()
        })
        .context("iperf3 reported no throughput")
}

/// The `wg show` view of one router, from a UAPI get.
fn show(ifname: &str) -> anyhow::Result<String> {
    let device = client::get(&socket_path(ifname))?;
    let now = SystemTime::now();
    let mut out = String::new();
    let _ = writeln!(out, "interface: {ifname}");
    if let Some(private) = device.private_key {
        let _ = writeln!(out, "  public key: {}", private.public_key());
    }
    let _ = writeln!(out, "  listening port: {}", device.listen_port);
    for peer in &device.peers {
        let _ = writeln!(out, "\n  peer: {}", peer.public_key);
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "    endpoint: {endpoint}");
        }
        let allowed: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(out, "    allowed ips: {}", allowed.join(", "));
        if let Some(when) = peer.last_handshake {
            let _ = writeln!(out, "    latest handshake: {}", client::ago(when, now));
        }
        let _ = writeln!(
            out,
            "    transfer: {} received, {} sent",
            bytes(peer.rx_bytes),
            bytes(peer.tx_bytes)
        );
    }
    out.push('\n');
    Ok(out)
}

/// Bytes the way `wg show` prints them.
fn bytes(n: u64) -> String {
    const UNITS: [(&str, f64); 4] = [
        ("TiB", 1099511627776.0),
        ("GiB", 1073741824.0),
        ("MiB", 1048576.0),
        ("KiB", 1024.0),
    ];
    for (unit, size) in UNITS {
        if n as f64 >= size {
            return format!("{:.2} {unit}", n as f64 / size);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_wg_show() {
        assert_eq!(bytes(532), "532 B");
        assert_eq!(bytes(2048), "2.00 KiB");
        assert_eq!(bytes(5 * 1048576 + 524288), "5.50 MiB");
    }
}
