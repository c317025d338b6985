//! End-to-end tests of tailsk8s, on the clusters of the lab (`tailsk8s-lab`: namespaces,
//! pod bridges, pods, config-file routers, ping, checksummed transfers), with what only the
//! tests need.
//!
//! A test asks [`require_netns`] whether this machine can build namespaces (root,
//! `/dev/net/tun`, the commands), builds a kubenet-style [`Topology`], starts one WireGuard
//! implementation per node with [`Mesh::start`] (the `tailsk8s` binary or wireguard-go, both
//! driven over UAPI by the real `wg`) or config-file routers with [`ConfigMesh::start`], and
//! checks reachability with [`ping`] and data integrity with [`tcp_transfer`].
//!
//! The lab's modules are re-exported under their names (`tailsk8s_e2e::topology`, …), so a
//! test sees one crate. Module map of what is the tests' own, one concern each:
//! - [`gate`]: may this test run here (root, TUN, commands) or must it skip / fail.
//! - [`inherited_fds`]: waiting out sockets inherited by children of other test threads
//!   (with the lab's process module: [`process`]).
//! - [`wg`]: WireGuard devices ([`Impl`], [`WgDevice`], [`Mesh`]) configured with `wg`.
//! - [`router_checks`]: the routes and rules a config-file router installs as the kernel
//!   reports them, and its `wg show dump` (with the lab's router and mesh:
//!   [`config_router`]).
//! - [`dump`]: parsing `wg show IFNAME dump`.
//! - [`threads`]: a process's threads as /proc shows them (CPU affinity, wake-ups).
//! - [`relay`]: a UDP relay between two routers that reorders and duplicates data packets.
//! - [`sequence`]: a numbered UDP stream between pods, counted at the receiver.
//! - [`counters`]: a router's process, a namespace's network statistics, link counters.
//! - [`iperf`]: iperf3 between pods, for measurements.
//! - [`flood`]: a flooder namespace sending garbage or valid-MAC1 handshake initiations.
//! - [`stall`]: a TCP stream between pods whose receiver measures its longest stall.
//! - [`churn`]: many made-up peers added and removed with `wg`; a peer's last handshake.
//! - [`scrape`]: a router's `/metrics` and its drop counters by reason.
//! - [`tailnet_link`]: an emulated tailnet link, a Tailscale-sourced router's config, and a
//!   fleet of made-up tailnet nodes serving their announcements.

pub mod churn;
pub mod counters;
pub mod dump;
pub mod flood;
pub mod gate;
pub mod inherited_fds;
pub mod iperf;
pub mod relay;
pub mod router_checks;
pub mod scrape;
pub mod sequence;
pub mod stall;
pub mod tailnet_link;
pub mod threads;
pub mod wg;

/// The lab's config-file router and mesh, with the tests' checks around them
/// ([`router_checks`]).
pub mod config_router {
    pub use crate::router_checks::*;
    pub use tailsk8s_lab::mesh::ConfigMesh;
    pub use tailsk8s_lab::process::{run_to_exit, Exited};
    pub use tailsk8s_lab::router::{
        send_signal, socket_path, toml_string, uapi_get, wait_for_exit, wait_until_serving,
        ConfigFile, ConfigRouter, KeyPair, PeerSpec, EXIT_TIMEOUT, READY_TIMEOUT, UAPI_DIR,
    };
}

/// The lab's process module, and waiting out inherited sockets ([`inherited_fds`]).
pub mod process {
    pub use crate::inherited_fds::*;
    pub use tailsk8s_lab::process::*;
}

pub use tailsk8s_lab::{names, netns, tools, topology, traffic, wait};

pub use config_router::{ConfigFile, ConfigMesh, ConfigRouter, KeyPair, ShowDump};
pub use dump::{DumpError, InterfaceDump, PeerDump, WgDump};
pub use gate::{require_netns, REQUIRE_NETNS_ENV};
pub use netns::Netns;
pub use process::Daemon;
pub use topology::{Node, Pod, Topology, TopologyBuilder};
pub use traffic::{ping, ping_with_deadline, tcp_transfer, TransferReport};
pub use wg::{tailsk8s_binary, EndpointFamily, Impl, Mesh, MeshOptions, PeerSpec, WgDevice};
