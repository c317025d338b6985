//! End-to-end harness for tailsk8s: real topologies in network namespaces, driven by real
//! tools.
//!
//! A test asks [`require_netns`] whether this machine can build namespaces (root,
//! `/dev/net/tun`, the commands), builds a kubenet-style [`Topology`] (nodes with a pod
//! bridge, an underlay between them), starts one WireGuard implementation per node with
//! [`Mesh::start`] (the `tailsk8s` binary or wireguard-go, both driven over UAPI by the real
//! `wg`), and checks reachability with [`ping`] and data integrity with [`tcp_transfer`].
//!
//! Every namespace, process and file is owned by a guard that removes it on `Drop`, also when
//! the test panics; names carry the process id so parallel tests and parallel runs by other
//! users of the machine never collide.
//!
//! Module map, one concern each:
//! - [`gate`]: may this test run here (root, TUN, commands) or must it skip / fail.
//! - [`tools`]: where the external commands are.
//! - [`names`]: host-wide unique names and scratch files.
//! - [`process`]: running commands, and the [`Daemon`] guard for long-running ones.
//! - [`netns`]: the [`Netns`] guard and running things inside a namespace.
//! - [`topology`]: nodes, pod bridges, pods and the underlay, with their addresses.
//! - [`wg`]: WireGuard devices ([`Impl`], [`WgDevice`], [`Mesh`]) configured with `wg`.
//! - [`config_router`]: the router configured by its own config file ([`ConfigRouter`],
//!   [`ConfigMesh`]), its process lifecycle, and the routes and rules it installs.
//! - [`dump`]: parsing `wg show IFNAME dump`.
//! - [`traffic`]: ping and checksummed TCP transfers between namespaces.

pub mod config_router;
pub mod dump;
pub mod gate;
pub mod names;
pub mod netns;
pub mod process;
pub mod tools;
pub mod topology;
pub mod traffic;
pub mod wg;

pub use config_router::{ConfigFile, ConfigMesh, ConfigRouter, KeyPair};
pub use dump::{DumpError, InterfaceDump, PeerDump, WgDump};
pub use gate::{require_netns, REQUIRE_NETNS_ENV};
pub use netns::Netns;
pub use process::Daemon;
pub use topology::{Node, Pod, Topology, TopologyBuilder};
pub use traffic::{ping, ping_with_deadline, tcp_transfer, TransferReport};
pub use wg::{tailsk8s_binary, EndpointFamily, Impl, Mesh, MeshOptions, PeerSpec, WgDevice};
