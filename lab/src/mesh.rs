//! A mesh of config-file routers: one [`ConfigRouter`] per node of a [`Topology`], each
//! listing every other node as a peer — no `wg` call configures them — and [`MeshOptions`],
//! how the peers reach each other.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;

use crate::binary::tailsk8s_binary;
use crate::router::{ConfigRouter, KeyPair, PeerSpec};
use crate::topology::Topology;

/// Which underlay address family peers use as endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointFamily {
    V4,
    V6,
}

/// How a mesh peers its nodes.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub listen_port: u16,
    pub endpoints: EndpointFamily,
    pub persistent_keepalive: Option<u16>,
    pub mtu: u32,
    /// Each router serves `[metrics]` on this address (in its node's namespace).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            listen_port: 51820,
            endpoints: EndpointFamily::V4,
            persistent_keepalive: None,
            mtu: 1420,
            metrics_listen: None,
        }
    }
}

impl MeshOptions {
    /// The defaults, with every router serving `[metrics]` on `listen`.
    pub fn with_metrics(listen: SocketAddr) -> Self {
        MeshOptions {
            metrics_listen: Some(listen),
            ..MeshOptions::default()
        }
    }
}

/// One [`ConfigRouter`] per node of a [`Topology`], configured by files alone: each lists
/// every other node as a peer (endpoint = its underlay address, allowed IPs = its pod CIDRs)
/// and installs its own routes. Stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct ConfigMesh<'a> {
    routers: Vec<ConfigRouter<'a>>,
}

impl<'a> ConfigMesh<'a> {
    /// Starts [`tailsk8s_binary`] on every node with `options` (listen port, endpoint
    /// family, keepalive, MTU).
    pub fn start(topology: &'a Topology, options: &MeshOptions) -> anyhow::Result<ConfigMesh<'a>> {
        ConfigMesh::start_with_binary(&tailsk8s_binary()?, topology, options)
    }

    /// Like [`ConfigMesh::start`], running `binary`.
    pub fn start_with_binary(
        binary: &Path,
        topology: &'a Topology,
        options: &MeshOptions,
    ) -> anyhow::Result<ConfigMesh<'a>> {
        let nodes = topology.nodes();
        let mut routers = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut router = ConfigRouter::with_binary(binary, node.netns())?;
            router.write_private_key(&KeyPair::generate(binary)?)?;
            routers.push(router);
        }
        for (node, router) in nodes.iter().zip(&routers) {
            let mut config = router.config();
            config.listen_port = Some(options.listen_port);
            config.mtu = Some(options.mtu);
            config.metrics_listen = options.metrics_listen;
            for (remote, remote_router) in nodes.iter().zip(&routers) {
                if remote.index() == node.index() {
                    continue;
                }
                let public_key = remote_router
                    .public_key()
                    .ok_or_else(|| anyhow::anyhow!("node {} has no key", remote.index()))?;
                config.peers.push(PeerSpec {
                    public_key: public_key.to_string(),
                    endpoint: Some(SocketAddr::new(
                        remote.underlay(options.endpoints == EndpointFamily::V6),
                        options.listen_port,
                    )),
                    allowed_ips: remote.pod_cidrs(),
                    persistent_keepalive: options.persistent_keepalive,
                });
            }
            router.write_config(&config)?;
        }
        for (node, router) in nodes.iter().zip(&mut routers) {
            router
                .start()
                .with_context(|| format!("starting the router of node {}", node.index()))?;
        }
        Ok(ConfigMesh { routers })
    }

    /// The routers; `routers()[k]` runs on node `k + 1`.
    pub fn routers(&self) -> &[ConfigRouter<'a>] {
        &self.routers
    }

    /// Mutable access: kill, restart, stop single routers.
    pub fn routers_mut(&mut self) -> &mut [ConfigRouter<'a>] {
        &mut self.routers
    }
}
