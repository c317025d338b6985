//! `tailsk8s demo`: a two-node cluster on this machine, in network namespaces. Each node has
//! a kubenet-style pod bridge (`cnio0`) with two pods and runs `tailsk8s router --config`
//! (this very binary) with a generated key; the nodes share an underlay. The demo shows pods
//! pinging across nodes (IPv4 and IPv6) and on the same node, a 5-second TCP transfer with
//! its throughput, and each router's peers as `wg show` would, then removes everything — also
//! on Ctrl-C. The cluster is built with the same harness the end-to-end tests use.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use tailsk8s_dataplane::key::Key;
use tailsk8s_dataplane::uapi::client;
use tailsk8s_e2e::topology::{Node, Topology, TopologyBuilder};
use tailsk8s_e2e::{names, ping, tools, Daemon};

use crate::cli::DemoArgs;

/// Seconds of the throughput run.
const TRANSFER_SECONDS: u32 = 5;
/// UDP port of every demo router (each node is its own namespace).
const LISTEN_PORT: u16 = 51820;

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
    let work = Workdir::new()?;
    let routers = start_routers(&cluster, &binary, &work)?;
    for router in &routers {
        println!(
            "  node {}  underlay {}  pods {}  router {} (key {})",
            router.node.index(),
            router.node.underlay_v4(),
            router
                .node
                .pod_cidrs()
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            router.ifname,
            router.public_key
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
        println!("  {:<22} -> {:<22} 3/3 replies", from.ip(v6), to.ip(v6));
    }

    check()?;
    step(&format!(
        "{TRANSFER_SECONDS}-second TCP transfer, pod {} -> pod {}",
        n1.pods()[0].ipv4(),
        n2.pods()[0].ipv4()
    ));
    let gbits = transfer(&n1.pods()[0], &n2.pods()[0])?;
    println!("  {gbits:.2} Gbit/s (both routers and iperf3 share this machine's CPUs)");

    check()?;
    step("Peers as each router reports them over its UAPI socket (what `wg show` prints)");
    for router in &routers {
        print!("{}", show(&router.ifname)?);
    }
    step("Removing the cluster");
    drop(routers);
    drop(cluster);
    println!("  done: namespaces, routers, sockets and routes are gone");
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

/// A private directory for keys and config files, removed on drop.
struct Workdir(PathBuf);

impl Workdir {
    fn new() -> anyhow::Result<Workdir> {
        let path = names::scratch_file("demo", "d")?;
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
        Ok(Workdir(path))
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One node's router process (stopped with SIGTERM on drop, which removes its routes).
struct Router<'a> {
    node: &'a Node,
    ifname: String,
    public_key: Key,
    _daemon: Daemon,
}

fn start_routers<'a>(
    cluster: &'a Topology,
    binary: &Path,
    work: &Workdir,
) -> anyhow::Result<Vec<Router<'a>>> {
    let keys: Vec<Key> = cluster
        .nodes()
        .iter()
        .map(|_| Key::generate_private())
        .collect();
    let mut routers = Vec::new();
    for (node, private) in cluster.nodes().iter().zip(&keys) {
        let ifname = names::ifname()?;
        let key_file = work.0.join(format!("{ifname}.key"));
        fs::write(&key_file, format!("{private}\n"))?;
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600))?;
        let mut config = format!(
            "interface = \"{ifname}\"\nprivate_key_file = \"{}\"\nlisten_port = {LISTEN_PORT}\n",
            key_file.display()
        );
        for (other, other_key) in cluster.nodes().iter().zip(&keys) {
            if other.index() == node.index() {
                continue;
            }
            let cidrs: Vec<String> = other
                .pod_cidrs()
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect();
            let _ = write!(
                config,
                "\n[[peer]]\npublic_key = \"{}\"\nendpoint = \"{}:{LISTEN_PORT}\"\nallowed_ips = [{}]\n",
                other_key.public_key(),
                other.underlay_v4(),
                cidrs.join(", ")
            );
        }
        let config_file = work.0.join(format!("{ifname}.toml"));
        fs::write(&config_file, config)?;
        let mut command = node.netns().command_at(binary)?;
        command.arg("router").arg("--config").arg(&config_file);
        let daemon = Daemon::spawn(
            &format!("tailsk8s router on node {}", node.index()),
            command,
        )?;
        routers.push(Router {
            node,
            ifname,
            public_key: private.public_key(),
            _daemon: daemon,
        });
    }
    for router in &routers {
        wait_for_socket(&router.ifname)?;
    }
    Ok(routers)
}

fn socket_path(ifname: &str) -> PathBuf {
    Path::new(tailsk8s_dataplane::uapi::DEFAULT_SOCKET_DIR).join(format!("{ifname}.sock"))
}

fn wait_for_socket(ifname: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if client::get(&socket_path(ifname)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("router {ifname} did not come up within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs iperf3 between two pods and returns the receiver's Gbit/s.
fn transfer(
    from: &tailsk8s_e2e::topology::Pod,
    to: &tailsk8s_e2e::topology::Pod,
) -> anyhow::Result<f64> {
    let server = to
        .netns()
        .spawn("iperf3", &["-s", "-1", "-B", &to.ipv4().to_string()])?;
    let target = to.ipv4().to_string();
    let seconds = TRANSFER_SECONDS.to_string();
    let mut output = String::new();
    for _ in 0..50 {
        match from
            .netns()
            .output("iperf3", &["-c", &target, "-t", &seconds, "-f", "g"])
        {
            Ok(out) => {
                output = out;
                break;
            }
            // The server may not listen yet.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
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
