//! The tailsk8s lab: a cluster of tailsk8s nodes in network namespaces on this machine.
//!
//! [`TopologyBuilder`] builds a kubenet-style [`Topology`] — nodes, each with a pod bridge
//! `cnio0` and pods, joined by an underlay — and [`ConfigMesh`] runs one
//! `tailsk8s router --config FILE` per node, each listing every other node as a peer.
//! [`ping`] shows reachability and [`tcp_transfer`] moves checksummed bytes between pods.
//! `tailsk8s demo` shows a cluster to a user, the end-to-end tests (`tailsk8s-e2e`) check the
//! router against it, and `tailsk8s-lab up` (src/main.rs) keeps a topology up for
//! benches/iperf3, which runs its own data planes on it.
//!
//! Every namespace, process and file is owned by a guard that removes it on `Drop`, also
//! when the caller panics; names carry the process id so parallel runs never collide.
//! Needs root, `/dev/net/tun`, iproute2 and ping.
//!
//! Module map, one concern each:
//! - [`tools`]: where the external commands are.
//! - [`names`]: host-wide unique names and scratch files.
//! - [`process`]: running commands, and the [`Daemon`] guard for long-running ones.
//! - [`netns`]: the [`Netns`] guard and running things inside a namespace.
//! - [`topology`]: nodes, pod bridges, pods and the underlay, with their addresses.
//! - [`binary`]: which `tailsk8s` binary runs, and extra router flags.
//! - [`router`]: one router configured by its own file ([`ConfigRouter`]), its process
//!   lifecycle and UAPI readiness.
//! - [`mesh`]: a router per node, peered with every other ([`ConfigMesh`]).
//! - [`traffic`]: ping and checksummed TCP transfers between namespaces.
//! - [`wait`]: waiting for a condition with a deadline.

pub mod binary;
pub mod mesh;
pub mod names;
pub mod netns;
pub mod process;
pub mod router;
pub mod tools;
pub mod topology;
pub mod traffic;
pub mod wait;

pub use binary::tailsk8s_binary;
pub use mesh::{ConfigMesh, EndpointFamily, MeshOptions};
pub use netns::Netns;
pub use process::Daemon;
pub use router::{ConfigFile, ConfigRouter, KeyPair, PeerSpec};
pub use topology::{Node, Pod, Topology, TopologyBuilder};
pub use traffic::{ping, ping_with_deadline, tcp_transfer, TransferReport};
