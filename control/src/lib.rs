//! tailsk8s control plane: the `tailsk8s` binary's logic, kept in a library so it can be
//! tested. The command line ([`cli`]) reads the router's config file ([`config`]) and key
//! files ([`key_file`]), installs the kernel routes to the TUN ([`routes`]), and hands the
//! rest to the router runtime ([`router`]) or the demo ([`demo`]). Invoked as `tailsk8s-wg`,
//! the binary is instead the wireguard-go-compatible entry point `wg-quick` runs
//! ([`userspace`]). Tailscale's side (LocalAPI, membership, the tailnet admin commands) is in
//! [`tailscale`]; the admin commands' command lines in [`tailnet_admin`].

pub mod announcement;
pub mod cli;
pub mod cni;
pub mod config;
pub mod demo;
pub mod endpoints;
pub mod key_commands;
pub mod key_file;
pub mod logging;
pub mod masquerade;
pub mod metrics;
pub mod observe;
pub mod path;
pub mod peer_source;
pub mod pod_cidr;
pub mod reconcile;
pub mod reload;
pub mod router;
pub mod routes;
pub mod status;
pub mod tailnet_admin;
pub mod tailscale;
pub mod userspace;
