//! WireGuard devices in node namespaces: either implementation, started as a UAPI daemon
//! and configured only through the real `wg`, exactly as users drive them.
//!
//! [`WgDevice::start`] runs `tailsk8s router IFNAME` or `wireguard-go -f IFNAME` inside a
//! node, waits until `wg show IFNAME` answers, and gives it a fresh private key. [`Mesh`]
//! does that for every node of a [`Topology`] and wires them into a full mesh: each device
//! lists every other node as a peer (endpoint = its underlay address, allowed IPs = its pod
//! CIDRs), the link goes up with MTU 1420, and the node routes remote pod CIDRs into it.
//!
//! The UAPI socket directory `/var/run/wireguard` is shared by all namespaces, so interface
//! names come from [`names::ifname`]. A device borrows its namespace: it cannot outlive it.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;

pub use tailsk8s_lab::binary::{router_flags, tailsk8s_binary, ROUTER_FLAGS_ENV, TAILSK8S_BIN_ENV};
pub use tailsk8s_lab::mesh::{EndpointFamily, MeshOptions};
use tailsk8s_lab::names;
use tailsk8s_lab::netns::Netns;
use tailsk8s_lab::process::{self, Daemon};
pub use tailsk8s_lab::router::{PeerSpec, READY_TIMEOUT, UAPI_DIR};
use tailsk8s_lab::tools;
use tailsk8s_lab::topology::Topology;

use crate::dump::WgDump;

/// Which WireGuard implementation runs on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// The system under test: `tailsk8s router IFNAME`.
    Tailsk8s,
    /// `tailsk8s router FLAGS… IFNAME`.
    Tailsk8sWith(&'static [&'static str]),
    /// The reference peer: `wireguard-go -f IFNAME` (Debian's package).
    WireguardGo,
}

impl Impl {
    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Tailsk8s | Impl::Tailsk8sWith(_) => "tailsk8s",
            Impl::WireguardGo => "wireguard-go",
        }
    }

    /// The foreground command that creates `ifname` inside `ns` and serves its UAPI socket.
    fn command(self, ns: &Netns, ifname: &str) -> anyhow::Result<Command> {
        let mut cmd = match self {
            Impl::Tailsk8s => {
                let mut cmd = ns.command_at(&tailsk8s_binary()?)?;
                cmd.arg("router").args(router_flags());
                cmd
            }
            Impl::Tailsk8sWith(flags) => {
                let mut cmd = ns.command_at(&tailsk8s_binary()?)?;
                cmd.arg("router").args(router_flags()).args(flags);
                cmd
            }
            Impl::WireguardGo => {
                let mut cmd = ns.command("wireguard-go")?;
                cmd.arg("-f");
                cmd
            }
        };
        cmd.arg(ifname);
        Ok(cmd)
    }
}

/// The arguments after `wg set IFNAME` that configure `peer`.
fn wg_args(peer: &PeerSpec) -> Vec<String> {
    let mut args = vec!["peer".to_string(), peer.public_key.clone()];
    if let Some(endpoint) = peer.endpoint {
        args.extend(["endpoint".to_string(), endpoint.to_string()]);
    }
    if let Some(seconds) = peer.persistent_keepalive {
        args.extend(["persistent-keepalive".to_string(), seconds.to_string()]);
    }
    let allowed: Vec<String> = peer.allowed_ips.iter().map(IpNet::to_string).collect();
    args.extend(["allowed-ips".to_string(), allowed.join(",")]);
    args
}

/// A running WireGuard daemon with its interface in a node namespace. Dropping it stops
/// the daemon and removes its socket (if the daemon left one) and key file.
#[derive(Debug)]
pub struct WgDevice<'a> {
    ns: &'a Netns,
    implementation: Impl,
    ifname: String,
    public_key: String,
    key_file: PathBuf,
    daemon: Daemon,
}

impl<'a> WgDevice<'a> {
    /// Starts `implementation` inside `ns`, waits until it answers over UAPI, and sets a
    /// fresh private key. No listen port, peers, link state or routes yet.
    pub fn start(implementation: Impl, ns: &'a Netns) -> anyhow::Result<WgDevice<'a>> {
        let ifname = names::ifname()?;
        let cmd = implementation.command(ns, &ifname)?;
        let daemon = Daemon::spawn(
            &format!("{} {ifname} in {}", implementation.name(), ns.name()),
            cmd,
        )?;
        let key_file = names::scratch_file(&ifname, "key")?;
        let mut device = WgDevice {
            ns,
            implementation,
            ifname,
            public_key: String::new(),
            key_file,
            daemon,
        };
        device.wait_ready()?;
        let private = process::run(Command::new(tools::require("wg")?).arg("genkey"))?;
        device.public_key = process::run_with_input(
            Command::new(tools::require("wg")?).arg("pubkey"),
            private.as_bytes(),
        )?
        .trim()
        .to_string();
        write_secret(&device.key_file, private.trim())?;
        let key_file = device.key_file.to_string_lossy().into_owned();
        device.set(&["private-key", &key_file])?;
        Ok(device)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let socket = self.socket_path();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.daemon.exited()? {
                anyhow::bail!(
                    "{} exited ({status}) before serving UAPI:\n{}",
                    self.daemon.label(),
                    self.daemon.log()
                );
            }
            if socket.exists() && self.wg(&["show", &self.ifname]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not answer `wg show` within {READY_TIMEOUT:?}:\n{}",
                    self.daemon.label(),
                    self.daemon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The interface (and UAPI socket) name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The device's public key, base64.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Which implementation this is.
    pub fn implementation(&self) -> Impl {
        self.implementation
    }

    /// The namespace the device lives in.
    pub fn netns(&self) -> &'a Netns {
        self.ns
    }

    /// The daemon (its log, whether it still runs).
    pub fn daemon_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    /// The UAPI socket path.
    pub fn socket_path(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.ifname))
    }

    /// Runs `wg args…` inside the device's namespace and returns its stdout.
    pub fn wg(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ns.output("wg", args)
    }

    /// `wg set IFNAME args…`.
    pub fn set<S: AsRef<str>>(&self, args: &[S]) -> anyhow::Result<()> {
        let mut full = vec!["set", self.ifname.as_str()];
        full.extend(args.iter().map(AsRef::as_ref));
        self.wg(&full).map(drop)
    }

    /// `wg set IFNAME listen-port PORT`.
    pub fn set_listen_port(&self, port: u16) -> anyhow::Result<()> {
        self.set(&["listen-port", &port.to_string()])
    }

    /// Adds or updates one peer (its allowed IPs are replaced by `peer.allowed_ips`).
    pub fn set_peer(&self, peer: &PeerSpec) -> anyhow::Result<()> {
        self.set(&wg_args(peer))
    }

    /// Sets the MTU and brings the interface up.
    pub fn link_up(&self, mtu: u32) -> anyhow::Result<()> {
        self.ns
            .ip(&["link", "set", &self.ifname, "mtu", &mtu.to_string(), "up"])
            .map(drop)
    }

    /// Routes `cidr` into the tunnel, in the device's namespace.
    pub fn route(&self, cidr: &IpNet) -> anyhow::Result<()> {
        self.ns
            .ip(&["route", "add", &cidr.to_string(), "dev", &self.ifname])
            .map(drop)
    }

    /// What `wg show IFNAME dump` reports.
    pub fn dump(&self) -> anyhow::Result<WgDump> {
        let text = self.wg(&["show", &self.ifname, "dump"])?;
        text.parse()
            .with_context(|| format!("parsing `wg show {} dump`:\n{text}", self.ifname))
    }
}

impl Drop for WgDevice<'_> {
    fn drop(&mut self) {
        self.daemon.stop();
        // A daemon that had to be killed leaves its socket behind; `wg show` would then
        // try it on every run until someone removes it.
        let _ = std::fs::remove_file(self.socket_path());
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// Writes a private key readable by root only (wg refuses nothing, but keys stay secret).
fn write_secret(path: &Path, key: &str) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{key}")?;
    Ok(())
}

/// One WireGuard device per node, all peered with each other; stopped on drop.
#[derive(Debug)]
pub struct Mesh<'a> {
    devices: Vec<WgDevice<'a>>,
}

impl<'a> Mesh<'a> {
    /// Starts `implementations[k]` on node `k` with [`MeshOptions::default`].
    pub fn start(topology: &'a Topology, implementations: &[Impl]) -> anyhow::Result<Mesh<'a>> {
        Mesh::start_with(topology, implementations, &MeshOptions::default())
    }

    /// Starts `implementations[k]` on node `k`, then peers every device with every other,
    /// brings links up and routes remote pod CIDRs into the tunnel.
    pub fn start_with(
        topology: &'a Topology,
        implementations: &[Impl],
        options: &MeshOptions,
    ) -> anyhow::Result<Mesh<'a>> {
        let nodes = topology.nodes();
        if implementations.len() != nodes.len() {
            anyhow::bail!(
                "{} implementations given for {} nodes",
                implementations.len(),
                nodes.len()
            );
        }
        let devices = nodes
            .iter()
            .zip(implementations)
            .map(|(node, &implementation)| WgDevice::start(implementation, node.netns()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (node, device) in nodes.iter().zip(&devices) {
            let context = || {
                format!(
                    "configuring {} on node {}",
                    device.implementation().name(),
                    node.index()
                )
            };
            device
                .set_listen_port(options.listen_port)
                .with_context(context)?;
            for (remote, remote_device) in nodes.iter().zip(&devices) {
                if remote.index() == node.index() {
                    continue;
                }
                let endpoint = SocketAddr::new(
                    remote.underlay(options.endpoints == EndpointFamily::V6),
                    options.listen_port,
                );
                let peer = PeerSpec {
                    public_key: remote_device.public_key().to_string(),
                    endpoint: Some(endpoint),
                    allowed_ips: remote.pod_cidrs(),
                    persistent_keepalive: options.persistent_keepalive,
                };
                device.set_peer(&peer).with_context(context)?;
            }
            device.link_up(options.mtu).with_context(context)?;
            for remote in nodes.iter().filter(|r| r.index() != node.index()) {
                for cidr in remote.pod_cidrs() {
                    device.route(&cidr).with_context(context)?;
                }
            }
        }
        Ok(Mesh { devices })
    }

    /// The devices; `devices()[k]` runs on node `k`.
    pub fn devices(&self) -> &[WgDevice<'a>] {
        &self.devices
    }

    /// Mutable access, e.g. to check whether a daemon is still running.
    pub fn devices_mut(&mut self) -> &mut [WgDevice<'a>] {
        &mut self.devices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_spec_becomes_wg_set_arguments() {
        let peer = PeerSpec {
            public_key: "K".into(),
            endpoint: Some("[fd00:18::2]:51820".parse().unwrap()),
            allowed_ips: vec![
                "198.19.2.0/24".parse().unwrap(),
                "fd00:19:2::/64".parse().unwrap(),
            ],
            persistent_keepalive: Some(25),
        };
        assert_eq!(
            wg_args(&peer),
            [
                "peer",
                "K",
                "endpoint",
                "[fd00:18::2]:51820",
                "persistent-keepalive",
                "25",
                "allowed-ips",
                "198.19.2.0/24,fd00:19:2::/64"
            ]
        );
    }

    #[test]
    fn peer_without_endpoint_or_allowed_ips_clears_them() {
        let peer = PeerSpec {
            public_key: "K".into(),
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
        };
        assert_eq!(wg_args(&peer), ["peer", "K", "allowed-ips", ""]);
    }
}
