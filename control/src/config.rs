//! The router's TOML config file (`tailsk8s router --config FILE`): reading it, checking every
//! value, and turning it into a [`DeviceUpdate`] for the data plane.
//!
//! ```toml
//! interface = "tsk0"                                  # optional; must agree with the CLI IFNAME
//! private_key_file = "/var/lib/tailsk8s/private.key"  # required; created (0600) on first start
//! listen_port = 51820                                 # optional; default 51820, 0 = random
//! mtu = 1420                                          # optional; default 1420, 1280..=65455
//! fwmark = 0x10000000                                 # optional; default DEFAULT_FWMARK, 0 = none
//! workers = 0                                         # optional; packet workers, 0 = one per core
//! offload = true                                      # optional; TUN TSO/GRO + UDP GSO/GRO
//! worker_affinity = "adaptive"                        # optional; adaptive | pinned | off
//!
//! [[peer]]
//! public_key = "base64"
//! endpoint = "198.18.0.2:51820"                       # optional; IP:port or [IPv6]:port
//! allowed_ips = ["198.19.2.0/24", "fd00:19:2::/64"]
//! persistent_keepalive = 25                           # optional; seconds, 0 = off
//! preshared_key_file = "/path"                        # optional
//!
//! # Peers from Tailscale (optional)
//! pod_cidrs = ["198.19.1.0/24", "fd00:19:1::/64"]     # this node's pod CIDRs
//! cluster_cidrs = ["198.19.0.0/16", "fd00:19::/32"]   # peers' pod CIDRs only inside these
//! endpoints = ["198.18.0.1:51820"]                    # optional; announced direct endpoints
//!
//! [tailscale]
//! socket = "/var/run/tailscale/tailscaled.sock"       # optional; the LocalAPI socket
//! tag = "tag:k8s-node"                                # optional; cluster nodes carry this tag
//! announce_port = 51821                               # optional; TCP, tailnet addresses only
//! resync = "30s"                                      # optional; re-read the LocalAPI this often
//!
//! [metrics]                                           # optional
//! listen = "0.0.0.0:9586"                             # /metrics, /healthz, /readyz over HTTP
//! ```
//!
//! Decisions, so the file means the same thing to every reader:
//! - Every table rejects unknown keys (`deny_unknown_fields`), so a typo is an error rather
//!   than a silently ignored setting. Each section is its own struct: later sections
//!   (`[tailscale]`, `[metrics]`, …) are added as one more `Option<RawSection>` field in
//!   [`RawFile`] plus its validated twin, without touching the others.
//! - Every error names the file, the line and column, and the problem. Syntax and type errors
//!   come from the TOML parser's byte span; semantic errors (bad key, bad CIDR, …) are found
//!   after deserialising, from `toml::Spanned` fields.
//! - Allowed IPs with host bits set (`198.19.2.1/24`) are accepted and normalised to the network
//!   (`198.19.2.0/24`), as `wg setconf` and the kernel do; a warning names the line. A bare
//!   address means a single host (/32 or /128), as in `wg`. The same prefix twice (in one peer
//!   or across peers) is an error: WireGuard would silently give it to the last peer.
//! - Endpoints are IP addresses only: hostnames are not resolved (a node agent must not depend
//!   on DNS to bring its tunnel up).
//! - The MTU range is 1280 (the IPv6 minimum; below it the kernel drops IPv6 from the TUN)
//!   to 65455 (65535 minus WireGuard's worst-case 80 bytes of IPv6 + UDP + WireGuard overhead).
//! - Relative paths (`private_key_file`, `preshared_key_file`, `[tailscale] socket`) are
//!   relative to the directory of the config file, not to the working directory of the process.
//! - `pod_cidrs` and `cluster_cidrs` must be networks (no host bits: a typo in a node's own pod
//!   CIDR is refused rather than guessed at), each given once; every pod CIDR must lie inside
//!   one of the cluster CIDRs, so `pod_cidrs` needs `cluster_cidrs`, and so does `[tailscale]`
//!   (peers' pod CIDRs are accepted only inside them). `endpoints` are IP:port like a peer's.
//! - `tag` is `tag:` plus a letter and then letters, digits or dashes, as Tailscale's ACL tags.
//!   `resync` is a whole number with a unit (`ms`, `s`, `m`, `h`), from 1 s to 24 h.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use tailsk8s_dataplane::affinity::WorkerAffinity;
use tailsk8s_dataplane::config::{AllowedIpChange, DeviceUpdate, PeerUpdate};
use tailsk8s_dataplane::key::{Key, KeyError};
use thiserror::Error;
use toml::Spanned;

use crate::key_file::{self, KeyFileError};
use crate::routes::DEFAULT_FWMARK;

/// The interface name when neither the command line nor the config file gives one.
pub const DEFAULT_IFNAME: &str = "tsk0";
/// WireGuard's customary UDP port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// The tunnel MTU when the file names none: the engine's default (its one home), as this
/// file's integer type.
pub const DEFAULT_MTU: u32 = tailsk8s_dataplane::engine::DEFAULT_MTU as u32;
/// Smallest MTU that keeps IPv6 on the TUN.
pub const MIN_MTU: u32 = 1280;
/// Largest MTU whose encrypted packets (+80 bytes) still fit a 65535-byte datagram.
pub const MAX_MTU: u32 = 65535 - 80;
/// Most packet workers (TUN queues) a device may have; the kernel allows 256 queues.
pub const MAX_WORKERS: usize = 256;
/// Where tailscaled serves its LocalAPI on Linux.
pub const DEFAULT_TAILSCALE_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";
/// The tag that marks a tailnet node as a cluster node, unless the file names another.
pub const DEFAULT_TAG: &str = "tag:k8s-node";
/// The TCP port of the announcement server (beside WireGuard's customary 51820).
pub const DEFAULT_ANNOUNCE_PORT: u16 = 51821;
/// How often the peer source re-reads the LocalAPI even when it signalled no change.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);
/// The shortest and longest `resync` accepted.
pub const MIN_RESYNC: Duration = Duration::from_secs(1);
pub const MAX_RESYNC: Duration = Duration::from_secs(24 * 3600);
/// A config file larger than this is certainly not a router config; refuse to read it all.
const MAX_FILE_LEN: u64 = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Errors

/// Where in the file a problem is: 1-based line and column (column counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The line and column of byte `offset` in `text` (clamped to the text, and to a character
    /// boundary, so a bad span from the parser can never panic here).
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a config file was refused. Causes are part of the message rather than `source()`, so
/// both `{}` and anyhow's `{:#}` show them exactly once, on one line.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}{}: {problem}", path.display(), fmt_location(location))]
    Invalid {
        path: PathBuf,
        /// `None` only when the parser could not say where (rare).
        location: Option<Location>,
        problem: ConfigProblem,
    },
}

fn fmt_location(location: &Option<Location>) -> String {
    location.map_or_else(String::new, |l| format!(":{l}"))
}

impl ConfigError {
    /// The problem, when the file was read but its content refused.
    pub fn problem(&self) -> Option<&ConfigProblem> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { problem, .. } => Some(problem),
        }
    }

    /// The location of the problem, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { location, .. } => *location,
        }
    }
}

/// What is wrong with the content of a config file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigProblem {
    #[error("unknown key `{key}` (expected one of: {expected})")]
    UnknownKey { key: String, expected: String },
    /// Any other syntax or type error, in the TOML parser's words.
    #[error("{0}")]
    Toml(String),
    #[error("bad {field}: {error}")]
    BadKey {
        field: &'static str,
        error: KeyError,
    },
    #[error("public_key is a low-order point, which no real peer can have")]
    LowOrderKey,
    #[error("duplicate peer: public key {key} was already given at line {first_line}")]
    DuplicatePeer { key: String, first_line: usize },
    #[error("bad allowed IP `{value}`: expected an address or ADDRESS/PREFIX-LENGTH")]
    BadCidr { value: String },
    #[error("allowed IP {prefix} was already given at line {first_line}")]
    DuplicateAllowedIp { prefix: IpNet, first_line: usize },
    #[error(
        "bad endpoint `{value}`: expected IPv4:PORT or [IPv6]:PORT \
         (hostnames are not resolved)"
    )]
    BadEndpoint { value: String },
    #[error("endpoint port must not be 0")]
    EndpointPortZero,
    #[error("mtu {value} is out of range {MIN_MTU}..={MAX_MTU}")]
    MtuOutOfRange { value: u32 },
    #[error("workers = {value} is too many (at most 256: one TUN queue each)")]
    TooManyWorkers { value: usize },
    #[error("{0}")]
    BadWorkerAffinity(String),
    #[error("bad interface name `{value}`: {reason}")]
    BadInterface { value: String, reason: &'static str },
    #[error("{field} must not be empty")]
    EmptyPath { field: &'static str },
    #[error("bad {field} entry `{value}`: expected a network ADDRESS/PREFIX-LENGTH")]
    BadNetwork { field: &'static str, value: String },
    #[error("{field} entry {value} has host bits set (the network is {network})")]
    HostBitsSet {
        field: &'static str,
        value: IpNet,
        network: IpNet,
    },
    #[error("{field} entry {prefix} was already given at line {first_line}")]
    DuplicateNetwork {
        field: &'static str,
        prefix: IpNet,
        first_line: usize,
    },
    #[error("pod CIDR {prefix} is outside the cluster CIDRs ({cluster})")]
    PodCidrOutsideCluster { prefix: IpNet, cluster: String },
    #[error("{what} needs cluster_cidrs (peers' pod CIDRs are only accepted inside them)")]
    MissingClusterCidrs { what: &'static str },
    #[error("endpoint {value} was already given at line {first_line}")]
    DuplicateEndpoint {
        value: SocketAddr,
        first_line: usize,
    },
    #[error("bad tag `{value}`: expected `tag:` and a name of letters, digits and dashes starting with a letter")]
    BadTag { value: String },
    #[error(
        "bad duration `{value}`: expected a whole number and a unit (ms, s, m, h), e.g. \"30s\""
    )]
    BadDuration { value: String },
    #[error("{field} = {value:?} is out of range 1s..=24h")]
    DurationOutOfRange {
        field: &'static str,
        value: Duration,
    },
    #[error("{field} must not be 0")]
    PortZero { field: &'static str },
    #[error("bad listen address `{value}`: expected IPv4:PORT or [IPv6]:PORT")]
    BadListen { value: String },
}

// ---------------------------------------------------------------------------------------------
// The file as written (raw, spanned)

/// The top level of the file: the router's own settings and the list of static peers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    interface: Option<Spanned<String>>,
    private_key_file: Spanned<PathBuf>,
    listen_port: Option<u16>,
    mtu: Option<Spanned<u32>>,
    fwmark: Option<u32>,
    workers: Option<Spanned<usize>>,
    offload: Option<bool>,
    worker_affinity: Option<Spanned<String>>,
    #[serde(default)]
    pod_cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    cluster_cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    endpoints: Vec<Spanned<String>>,
    tailscale: Option<Spanned<RawTailscale>>,
    metrics: Option<RawMetrics>,
    #[serde(default, rename = "peer")]
    peers: Vec<RawPeer>,
}

/// The `[tailscale]` table: where the LocalAPI is and how the peer source uses it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTailscale {
    socket: Option<Spanned<PathBuf>>,
    tag: Option<Spanned<String>>,
    announce_port: Option<Spanned<u16>>,
    resync: Option<Spanned<String>>,
}

/// The `[metrics]` table: where the HTTP server for metrics and health checks listens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

/// One `[[peer]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    public_key: Spanned<String>,
    endpoint: Option<Spanned<String>>,
    #[serde(default)]
    allowed_ips: Vec<Spanned<String>>,
    persistent_keepalive: Option<u16>,
    preshared_key_file: Option<Spanned<PathBuf>>,
}

// ---------------------------------------------------------------------------------------------
// The file as understood (validated)

/// A config file whose every value has been parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// The file this came from (for messages).
    pub path: PathBuf,
    /// The interface named in the file, if any (see [`crate::router::RouterArgs::interface`]).
    pub interface: Option<String>,
    /// Resolved against the config file's directory.
    pub private_key_file: PathBuf,
    /// Where `private_key_file` is set, so a problem with the key file itself (permissions,
    /// content) can still point at the config line.
    pub private_key_file_at: Location,
    pub listen_port: u16,
    pub mtu: u32,
    /// The mark of the router's UDP socket; 0 = none. Also keeps the router's own encrypted
    /// traffic out of the routing table for the peers' allowed IPs (see [`crate::routes`]).
    pub fwmark: u32,
    /// Packet workers (one TUN queue + one UDP socket pair each); 0 = one per core.
    pub workers: usize,
    /// TUN offloads and UDP GSO/GRO; `false` for kernels and drivers where they misbehave.
    pub offload: bool,
    /// Whether workers are pinned to CPUs, each serving the packets of its CPU: `adaptive`
    /// (default: pinned while quiet, spread while busy), `pinned` or `off`.
    pub worker_affinity: WorkerAffinity,
    pub peers: Vec<PeerConfig>,
    /// This node's pod CIDRs (normalised, unique, each inside a cluster CIDR): what the
    /// announcement offers; Tailscale's approval decides what peers accept.
    pub pod_cidrs: Vec<IpNet>,
    /// Peers' pod CIDRs are accepted only inside these.
    pub cluster_cidrs: Vec<IpNet>,
    /// Direct endpoints to announce; empty = this node's global addresses + `listen_port`.
    pub endpoints: Vec<SocketAddr>,
    /// Peers from Tailscale, when the file has a `[tailscale]` table.
    pub tailscale: Option<TailscaleConfig>,
    /// `[metrics] listen`: where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// The `[tailscale]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailscaleConfig {
    /// tailscaled's LocalAPI socket (resolved against the config file's directory).
    pub socket: PathBuf,
    /// Tailnet nodes with this tag are cluster nodes.
    pub tag: String,
    /// TCP port of the announcement server, on this node's tailnet addresses only.
    pub announce_port: u16,
    /// How often the LocalAPI is re-read even without a change signal.
    pub resync: Duration,
}

/// One static peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    /// Normalised (host bits cleared), in file order, without duplicates.
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Resolved against the config file's directory.
    pub preshared_key_file: Option<PathBuf>,
    /// The line of the peer's `public_key`, for messages.
    pub line: usize,
}

impl RouterConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<RouterConfig, ConfigError> {
        let text = read_limited(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        RouterConfig::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (used for messages and relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<RouterConfig, ConfigError> {
        let ctx = Context {
            path,
            text,
            newlines: text.match_indices('\n').map(|(i, _)| i).collect(),
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
        ctx.validate(raw)
    }

    /// Reads every peer's preshared key file, keyed by the peer's public key.
    pub fn load_preshared_keys(&self) -> Result<BTreeMap<Key, Key>, KeyFileError> {
        let mut keys = BTreeMap::new();
        for peer in &self.peers {
            if let Some(file) = &peer.preshared_key_file {
                keys.insert(peer.public_key, key_file::load_key(file)?);
            }
        }
        Ok(keys)
    }

    /// The whole config as one change that makes the device exactly this file, like
    /// `wg setconf`: peers not in the file are removed, each peer's allowed IPs replaced, a
    /// preshared key or keepalive absent from the file is removed. `preshared` maps a peer's
    /// public key to its preshared key (see [`RouterConfig::load_preshared_keys`]).
    pub fn to_device_update(
        &self,
        private_key: Key,
        preshared: &BTreeMap<Key, Key>,
    ) -> DeviceUpdate {
        let peers = self
            .peers
            .iter()
            .map(|peer| PeerUpdate {
                preshared_key: Some(preshared.get(&peer.public_key).copied()),
                endpoint: peer.endpoint,
                persistent_keepalive: Some(peer.persistent_keepalive.unwrap_or(0)),
                replace_allowed_ips: true,
                allowed_ips: peer
                    .allowed_ips
                    .iter()
                    .copied()
                    .map(AllowedIpChange::Add)
                    .collect(),
                ..PeerUpdate::new(peer.public_key)
            })
            .collect();
        DeviceUpdate {
            private_key: Some(Some(private_key)),
            listen_port: Some(self.listen_port),
            fwmark: Some(self.fwmark),
            replace_peers: true,
            peers,
        }
    }

    /// Every peer's allowed IPs, for the kernel routes to the TUN.
    pub fn all_allowed_ips(&self) -> Vec<IpNet> {
        self.peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect()
    }
}

/// Checks an interface name as Linux does (IFNAMSIZ, no '/', no whitespace, not "." or "..").
pub fn check_ifname(name: &str) -> Result<(), &'static str> {
    match tailsk8s_dataplane::tun::ifname_problem(name) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_FILE_LEN).read_to_string(&mut text)?;
    Ok(text)
}

/// The file being validated: turns spans into located errors.
struct Context<'a> {
    path: &'a Path,
    text: &'a str,
    /// Byte offsets of the text's newlines, found once: a file of 5,000 peers asks for
    /// 10,000 lines, and counting from the start each time made loading it quadratic.
    newlines: Vec<usize>,
}

impl Context<'_> {
    fn error(&self, span: Range<usize>, problem: ConfigProblem) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            location: Some(Location::of_offset(self.text, span.start)),
            problem,
        }
    }

    /// The line of `span`'s start, as [`Location::of_offset`] counts it.
    fn line(&self, span: &Range<usize>) -> usize {
        let offset = span.start.min(self.text.len());
        self.newlines.partition_point(|&n| n < offset) + 1
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            location: e.span().map(|s| Location::of_offset(self.text, s.start)),
            problem: classify_toml_message(e.message()),
        }
    }

    /// Relative paths are relative to the config file's directory.
    fn resolve(&self, field: &'static str, p: &Spanned<PathBuf>) -> Result<PathBuf, ConfigError> {
        if p.get_ref().as_os_str().is_empty() {
            return Err(self.error(p.span(), ConfigProblem::EmptyPath { field }));
        }
        Ok(match self.path.parent() {
            Some(dir) if p.get_ref().is_relative() => dir.join(p.get_ref()),
            _ => p.get_ref().clone(),
        })
    }

    fn validate(&self, raw: RawFile) -> Result<RouterConfig, ConfigError> {
        let interface = match raw.interface {
            Some(name) => {
                check_ifname(name.get_ref()).map_err(|reason| {
                    self.error(
                        name.span(),
                        ConfigProblem::BadInterface {
                            value: name.get_ref().clone(),
                            reason,
                        },
                    )
                })?;
                Some(name.into_inner())
            }
            None => None,
        };
        let mtu = match raw.mtu {
            Some(mtu) if !(MIN_MTU..=MAX_MTU).contains(mtu.get_ref()) => {
                return Err(self.error(
                    mtu.span(),
                    ConfigProblem::MtuOutOfRange {
                        value: *mtu.get_ref(),
                    },
                ));
            }
            Some(mtu) => mtu.into_inner(),
            None => DEFAULT_MTU,
        };
        let private_key_file = self.resolve("private_key_file", &raw.private_key_file)?;
        let private_key_file_at = Location::of_offset(self.text, raw.private_key_file.span().start);
        let workers = match raw.workers {
            Some(w) if *w.get_ref() > MAX_WORKERS => {
                return Err(self.error(
                    w.span(),
                    ConfigProblem::TooManyWorkers {
                        value: *w.get_ref(),
                    },
                ));
            }
            Some(w) => w.into_inner(),
            None => 0,
        };
        let worker_affinity = match raw.worker_affinity {
            Some(a) => a
                .get_ref()
                .parse::<WorkerAffinity>()
                .map_err(|e| self.error(a.span(), ConfigProblem::BadWorkerAffinity(e)))?,
            None => WorkerAffinity::default(),
        };

        let pod_cidrs = self.validate_networks("pod_cidrs", &raw.pod_cidrs)?;
        let cluster_cidrs = self.validate_networks("cluster_cidrs", &raw.cluster_cidrs)?;
        if cluster_cidrs.is_empty() {
            if let Some(first) = raw.pod_cidrs.first() {
                return Err(self.error(
                    first.span(),
                    ConfigProblem::MissingClusterCidrs { what: "pod_cidrs" },
                ));
            }
            if let Some(table) = &raw.tailscale {
                return Err(self.error(
                    table.span(),
                    ConfigProblem::MissingClusterCidrs {
                        what: "[tailscale]",
                    },
                ));
            }
        }
        for (prefix, value) in pod_cidrs.iter().zip(&raw.pod_cidrs) {
            if !cluster_cidrs.iter().any(|c| c.contains(prefix)) {
                let cluster: Vec<String> = cluster_cidrs.iter().map(IpNet::to_string).collect();
                return Err(self.error(
                    value.span(),
                    ConfigProblem::PodCidrOutsideCluster {
                        prefix: *prefix,
                        cluster: cluster.join(", "),
                    },
                ));
            }
        }
        let endpoints = self.validate_endpoints(&raw.endpoints)?;
        let tailscale = match &raw.tailscale {
            Some(table) => Some(self.validate_tailscale(table.get_ref())?),
            None => None,
        };
        let metrics_listen = match &raw.metrics {
            Some(table) => Some(self.parse_listen(&table.listen)?),
            None => None,
        };

        let mut peers = Vec::with_capacity(raw.peers.len());
        let mut peer_lines: BTreeMap<Key, usize> = BTreeMap::new();
        let mut prefix_lines: BTreeMap<IpNet, usize> = BTreeMap::new();
        for raw_peer in raw.peers {
            peers.push(self.validate_peer(raw_peer, &mut peer_lines, &mut prefix_lines)?);
        }

        Ok(RouterConfig {
            path: self.path.to_path_buf(),
            interface,
            private_key_file,
            private_key_file_at,
            listen_port: raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
            mtu,
            fwmark: raw.fwmark.unwrap_or(DEFAULT_FWMARK),
            workers,
            offload: raw.offload.unwrap_or(true),
            worker_affinity,
            peers,
            pod_cidrs,
            cluster_cidrs,
            endpoints,
            tailscale,
            metrics_listen,
        })
    }

    /// `[metrics] listen`: an IP:port (no hostnames, port not 0).
    fn parse_listen(&self, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let addr: SocketAddr = value.get_ref().trim().parse().map_err(|_| {
            self.error(
                value.span(),
                ConfigProblem::BadListen {
                    value: value.get_ref().clone(),
                },
            )
        })?;
        if addr.port() == 0 {
            return Err(self.error(
                value.span(),
                ConfigProblem::PortZero {
                    field: "[metrics] listen",
                },
            ));
        }
        Ok(addr)
    }

    /// A list of networks (`pod_cidrs`, `cluster_cidrs`): each a network without host bits,
    /// each given once.
    fn validate_networks(
        &self,
        field: &'static str,
        values: &[Spanned<String>],
    ) -> Result<Vec<IpNet>, ConfigError> {
        let mut lines: BTreeMap<IpNet, usize> = BTreeMap::new();
        let mut out = Vec::with_capacity(values.len());
        for value in values {
            let prefix: IpNet = value.get_ref().trim().parse().map_err(|_| {
                self.error(
                    value.span(),
                    ConfigProblem::BadNetwork {
                        field,
                        value: value.get_ref().clone(),
                    },
                )
            })?;
            if prefix.trunc() != prefix {
                return Err(self.error(
                    value.span(),
                    ConfigProblem::HostBitsSet {
                        field,
                        value: prefix,
                        network: prefix.trunc(),
                    },
                ));
            }
            if let Some(&first_line) = lines.get(&prefix) {
                return Err(self.error(
                    value.span(),
                    ConfigProblem::DuplicateNetwork {
                        field,
                        prefix,
                        first_line,
                    },
                ));
            }
            lines.insert(prefix, self.line(&value.span()));
            out.push(prefix);
        }
        Ok(out)
    }

    fn validate_endpoints(
        &self,
        values: &[Spanned<String>],
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut lines: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        let mut out = Vec::with_capacity(values.len());
        for value in values {
            let addr = self.parse_endpoint(value)?;
            if let Some(&first_line) = lines.get(&addr) {
                return Err(self.error(
                    value.span(),
                    ConfigProblem::DuplicateEndpoint {
                        value: addr,
                        first_line,
                    },
                ));
            }
            lines.insert(addr, self.line(&value.span()));
            out.push(addr);
        }
        Ok(out)
    }

    fn validate_tailscale(&self, raw: &RawTailscale) -> Result<TailscaleConfig, ConfigError> {
        let socket = match &raw.socket {
            Some(p) => self.resolve("socket", p)?,
            None => PathBuf::from(DEFAULT_TAILSCALE_SOCKET),
        };
        let tag = match &raw.tag {
            Some(tag) if !is_valid_tag(tag.get_ref()) => {
                return Err(self.error(
                    tag.span(),
                    ConfigProblem::BadTag {
                        value: tag.get_ref().clone(),
                    },
                ));
            }
            Some(tag) => tag.get_ref().clone(),
            None => DEFAULT_TAG.to_string(),
        };
        let announce_port = match &raw.announce_port {
            Some(port) if *port.get_ref() == 0 => {
                return Err(self.error(
                    port.span(),
                    ConfigProblem::PortZero {
                        field: "announce_port",
                    },
                ));
            }
            Some(port) => *port.get_ref(),
            None => DEFAULT_ANNOUNCE_PORT,
        };
        let resync = match &raw.resync {
            Some(text) => {
                let value = parse_duration(text.get_ref()).ok_or_else(|| {
                    self.error(
                        text.span(),
                        ConfigProblem::BadDuration {
                            value: text.get_ref().clone(),
                        },
                    )
                })?;
                if !(MIN_RESYNC..=MAX_RESYNC).contains(&value) {
                    return Err(self.error(
                        text.span(),
                        ConfigProblem::DurationOutOfRange {
                            field: "resync",
                            value,
                        },
                    ));
                }
                value
            }
            None => DEFAULT_RESYNC,
        };
        Ok(TailscaleConfig {
            socket,
            tag,
            announce_port,
            resync,
        })
    }

    fn validate_peer(
        &self,
        raw: RawPeer,
        peer_lines: &mut BTreeMap<Key, usize>,
        prefix_lines: &mut BTreeMap<IpNet, usize>,
    ) -> Result<PeerConfig, ConfigError> {
        let key_span = raw.public_key.span();
        let public_key = Key::from_base64(raw.public_key.get_ref()).map_err(|error| {
            self.error(
                key_span.clone(),
                ConfigProblem::BadKey {
                    field: "public_key",
                    error,
                },
            )
        })?;
        if public_key.is_low_order_public() {
            return Err(self.error(key_span, ConfigProblem::LowOrderKey));
        }
        let line = self.line(&key_span);
        if let Some(&first_line) = peer_lines.get(&public_key) {
            return Err(self.error(
                key_span,
                ConfigProblem::DuplicatePeer {
                    key: public_key.to_base64(),
                    first_line,
                },
            ));
        }
        peer_lines.insert(public_key, line);
        let endpoint = match raw.endpoint {
            Some(e) => Some(self.parse_endpoint(&e)?),
            None => None,
        };
        let mut allowed_ips = Vec::with_capacity(raw.allowed_ips.len());
        for value in &raw.allowed_ips {
            let prefix = self.parse_allowed_ip(value)?;
            let line = self.line(&value.span());
            if let Some(&first_line) = prefix_lines.get(&prefix) {
                return Err(self.error(
                    value.span(),
                    ConfigProblem::DuplicateAllowedIp { prefix, first_line },
                ));
            }
            prefix_lines.insert(prefix, line);
            allowed_ips.push(prefix);
        }
        let preshared_key_file = match &raw.preshared_key_file {
            Some(p) => Some(self.resolve("preshared_key_file", p)?),
            None => None,
        };
        Ok(PeerConfig {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive: raw.persistent_keepalive,
            preshared_key_file,
            line,
        })
    }

    fn parse_endpoint(&self, value: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let addr: SocketAddr = value.get_ref().trim().parse().map_err(|_| {
            self.error(
                value.span(),
                ConfigProblem::BadEndpoint {
                    value: value.get_ref().clone(),
                },
            )
        })?;
        if addr.port() == 0 {
            return Err(self.error(value.span(), ConfigProblem::EndpointPortZero));
        }
        Ok(addr)
    }

    /// `ADDR/LEN` or a bare `ADDR` (a host route), normalised to the network.
    fn parse_allowed_ip(&self, value: &Spanned<String>) -> Result<IpNet, ConfigError> {
        let text = value.get_ref().trim();
        let parsed = if text.contains('/') {
            text.parse::<IpNet>().ok()
        } else {
            text.parse::<IpAddr>().ok().map(IpNet::from)
        };
        let prefix = parsed.ok_or_else(|| {
            self.error(
                value.span(),
                ConfigProblem::BadCidr {
                    value: value.get_ref().clone(),
                },
            )
        })?;
        let network = prefix.trunc();
        if network != prefix {
            tracing::warn!(
                "{}:{}: allowed IP {prefix} has host bits set; using {network}",
                self.path.display(),
                Location::of_offset(self.text, value.span().start),
            );
        }
        Ok(network)
    }
}

/// `tag:` and a name: a letter, then letters, digits or dashes (Tailscale's ACL tag syntax).
pub fn is_valid_tag(tag: &str) -> bool {
    let Some(name) = tag.strip_prefix("tag:") else {
        return false;
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// A whole number and a unit: `500ms`, `30s`, `5m`, `1h`. None for anything else.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.len() > 12 {
        return None;
    }
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Serde reports an unknown key as "unknown field `x`, expected one of `a`, `b`"; give it its
/// own kind (the most common mistake in a hand-written file) and the rest verbatim.
fn classify_toml_message(message: &str) -> ConfigProblem {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((key, tail)) = rest.split_once('`') {
            let expected = tail
                .trim_start_matches(',')
                .trim()
                .trim_start_matches("expected one of")
                .trim_start_matches("expected")
                .trim()
                .replace('`', "");
            return ConfigProblem::UnknownKey {
                key: key.to_string(),
                expected,
            };
        }
    }
    // One line only: the message ends up in a single-line error.
    ConfigProblem::Toml(message.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn parse(text: &str) -> Result<RouterConfig, ConfigError> {
        RouterConfig::parse(Path::new("/etc/tailsk8s/router.toml"), text)
    }

    /// Asserts the error's problem matches and that it is reported at `line`.
    fn assert_err_at(text: &str, line: usize, check: impl Fn(&ConfigProblem) -> bool) {
        let err = parse(text).expect_err("config should be refused");
        let problem = err.problem().expect("a content problem");
        assert!(check(problem), "unexpected problem: {problem:?}");
        assert_eq!(err.location().map(|l| l.line), Some(line), "error: {err}");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("/etc/tailsk8s/router.toml:{line}:")),
            "{shown}"
        );
        assert!(!shown.contains('\n'), "one line: {shown}");
    }

    #[test]
    fn location_counts_lines_and_characters() {
        let text = "ab\nçd\nef";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 3),
            Location { line: 2, column: 1 }
        );
        // 'ç' is two bytes: offset 5 is 'd', the second character.
        assert_eq!(
            Location::of_offset(text, 5),
            Location { line: 2, column: 2 }
        );
        // Mid-character and past-the-end offsets are clamped, not a panic.
        assert_eq!(
            Location::of_offset(text, 4),
            Location { line: 2, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 99),
            Location { line: 3, column: 3 }
        );
    }

    #[test]
    fn context_lines_agree_with_locations() {
        let text = "ab\nçd\n\nef\n";
        let ctx = Context {
            path: Path::new("x.toml"),
            text,
            newlines: text.match_indices('\n').map(|(i, _)| i).collect(),
        };
        for offset in 0..text.len() + 3 {
            let span = offset..offset + 1;
            assert_eq!(
                ctx.line(&span),
                Location::of_offset(text, offset).line,
                "offset {offset}"
            );
        }
    }

    fn full_config() -> String {
        format!(
            r#"
interface = "tsk1"
private_key_file = "keys/private.key"
listen_port = 51821
mtu = 1380
fwmark = 0x1234
worker_affinity = "pinned"

[[peer]]
public_key = "{KEY_A}"
endpoint = "198.18.0.2:51820"
allowed_ips = ["198.19.2.0/24", "fd00:19:2::/64"]
persistent_keepalive = 25
preshared_key_file = "/etc/tailsk8s/a.psk"

[[peer]]
public_key = "{KEY_B}"
endpoint = "[fd00::3]:51820"
allowed_ips = ["198.19.3.7", "198.19.4.9/24"]
"#
        )
    }

    #[test]
    fn valid_file_is_understood() {
        let cfg = parse(&full_config()).unwrap();
        assert_eq!(cfg.interface.as_deref(), Some("tsk1"));
        assert_eq!(
            cfg.private_key_file,
            Path::new("/etc/tailsk8s/keys/private.key")
        );
        assert_eq!(cfg.listen_port, 51821);
        assert_eq!(cfg.mtu, 1380);
        assert_eq!(cfg.fwmark, 0x1234);
        assert_eq!(cfg.worker_affinity, WorkerAffinity::Pinned);
        assert_eq!(cfg.peers.len(), 2);
        let a = &cfg.peers[0];
        assert_eq!(a.public_key, Key::from_base64(KEY_A).unwrap());
        assert_eq!(a.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        assert_eq!(a.persistent_keepalive, Some(25));
        assert_eq!(
            a.preshared_key_file.as_deref(),
            Some(Path::new("/etc/tailsk8s/a.psk"))
        );
        assert_eq!(a.line, 10);
        let b = &cfg.peers[1];
        assert_eq!(b.endpoint, Some("[fd00::3]:51820".parse().unwrap()));
        // A bare address is a host route; host bits are cleared.
        assert_eq!(
            b.allowed_ips,
            vec![
                "198.19.3.7/32".parse::<IpNet>().unwrap(),
                "198.19.4.0/24".parse().unwrap()
            ]
        );
        assert_eq!(b.persistent_keepalive, None);
        assert_eq!(cfg.all_allowed_ips().len(), 4);
    }

    #[test]
    fn an_unknown_worker_affinity_is_refused_at_its_line() {
        assert_err_at(
            "private_key_file = \"/k\"\nworker_affinity = \"sometimes\"\n",
            2,
            |p| matches!(p, ConfigProblem::BadWorkerAffinity(e) if e.contains("adaptive, pinned, off")),
        );
    }

    #[test]
    fn defaults_apply() {
        let cfg = parse("private_key_file = \"/k\"\n").unwrap();
        assert_eq!(cfg.interface, None);
        assert_eq!(cfg.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(cfg.mtu, DEFAULT_MTU);
        assert_eq!(cfg.fwmark, DEFAULT_FWMARK);
        assert!(cfg.offload);
        assert_eq!(cfg.worker_affinity, WorkerAffinity::Adaptive);
        assert!(cfg.peers.is_empty());
    }

    #[test]
    fn valid_file_becomes_the_expected_device_update() {
        let cfg = parse(&full_config()).unwrap();
        let private = Key::generate_private();
        let psk = Key::generate_private();
        let key_a = Key::from_base64(KEY_A).unwrap();
        let key_b = Key::from_base64(KEY_B).unwrap();
        let update = cfg.to_device_update(private, &BTreeMap::from([(key_a, psk)]));

        let net = |s: &str| AllowedIpChange::Add(s.parse().unwrap());
        let expected = DeviceUpdate {
            private_key: Some(Some(private)),
            listen_port: Some(51821),
            fwmark: Some(0x1234),
            replace_peers: true,
            peers: vec![
                PeerUpdate {
                    preshared_key: Some(Some(psk)),
                    endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                    persistent_keepalive: Some(25),
                    replace_allowed_ips: true,
                    allowed_ips: vec![net("198.19.2.0/24"), net("fd00:19:2::/64")],
                    ..PeerUpdate::new(key_a)
                },
                PeerUpdate {
                    // Absent from the file = removed from the device (a reload drops them).
                    preshared_key: Some(None),
                    endpoint: Some("[fd00::3]:51820".parse().unwrap()),
                    persistent_keepalive: Some(0),
                    replace_allowed_ips: true,
                    allowed_ips: vec![net("198.19.3.7/32"), net("198.19.4.0/24")],
                    ..PeerUpdate::new(key_b)
                },
            ],
        };
        assert_eq!(update, expected);
    }

    #[test]
    fn unknown_keys_are_refused_at_their_line() {
        assert_err_at("private_key_file = \"/k\"\nlisten_prot = 1\n", 2, |p| {
            matches!(p, ConfigProblem::UnknownKey { key, expected }
                if key == "listen_prot" && expected.contains("listen_port"))
        });
        let text = format!(
            "private_key_file = \"/k\"\n[[peer]]\npublic_key = \"{KEY_A}\"\nendpiont = \"x\"\n"
        );
        assert_err_at(
            &text,
            4,
            |p| matches!(p, ConfigProblem::UnknownKey { key, .. } if key == "endpiont"),
        );
        assert_err_at(
            "private_key_file = \"/k\"\n\n[metrix]\nport = 1\n",
            3,
            |p| matches!(p, ConfigProblem::UnknownKey { key, .. } if key == "metrix"),
        );
    }

    #[test]
    fn syntax_and_type_errors_are_located() {
        assert_err_at("private_key_file = \"/k\"\nmtu = = 3\n", 2, |p| {
            matches!(p, ConfigProblem::Toml(_))
        });
        assert_err_at(
            "private_key_file = \"/k\"\n\nlisten_port = 70000\n",
            3,
            |p| matches!(p, ConfigProblem::Toml(m) if m.contains("70000")),
        );
        assert_err_at("private_key_file = \"/k\"\nmtu = \"big\"\n", 2, |p| {
            matches!(p, ConfigProblem::Toml(_))
        });
    }

    #[test]
    fn missing_private_key_file_is_refused() {
        let err = parse("listen_port = 1\n").unwrap_err();
        assert!(
            matches!(err.problem(), Some(ConfigProblem::Toml(m)) if m.contains("private_key_file")),
            "{err}"
        );
        assert_err_at("private_key_file = \"\"\n", 1, |p| {
            matches!(
                p,
                ConfigProblem::EmptyPath {
                    field: "private_key_file"
                }
            )
        });
    }

    #[test]
    fn bad_keys_are_refused_at_their_line() {
        let text = "private_key_file = \"/k\"\n[[peer]]\npublic_key = \"abc\"\n";
        assert_err_at(text, 3, |p| {
            matches!(
                p,
                ConfigProblem::BadKey {
                    field: "public_key",
                    error: KeyError::Base64Length(3)
                }
            )
        });
        let zero = Key::ZERO.to_base64();
        let text = format!("private_key_file = \"/k\"\n\n[[peer]]\npublic_key = \"{zero}\"\n");
        assert_err_at(&text, 4, |p| matches!(p, ConfigProblem::LowOrderKey));
    }

    #[test]
    fn duplicate_peers_are_refused() {
        let text = format!(
            "private_key_file = \"/k\"\n[[peer]]\npublic_key = \"{KEY_A}\"\n\
             [[peer]]\npublic_key = \"{KEY_B}\"\n[[peer]]\npublic_key = \"{KEY_A}\"\n"
        );
        assert_err_at(
            &text,
            7,
            |p| matches!(p, ConfigProblem::DuplicatePeer { first_line: 3, key } if key == KEY_A),
        );
    }

    #[test]
    fn bad_and_duplicate_cidrs_are_refused() {
        let peer = |ips: &str| {
            format!("private_key_file = \"/k\"\n[[peer]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\n  \"198.19.2.0/24\",\n  {ips}\n]\n")
        };
        for bad in [
            "198.19.2.0/33",
            "198.19.2/24",
            "fd00::/129",
            "pods",
            "198.19.2.0/",
        ] {
            assert_err_at(
                &peer(&format!("\"{bad}\"")),
                6,
                |p| matches!(p, ConfigProblem::BadCidr { value } if value == bad),
            );
        }
        // Host bits are normalised first, so this is the same prefix as line 5.
        assert_err_at(&peer("\"198.19.2.1/24\""), 6, |p| {
            matches!(p, ConfigProblem::DuplicateAllowedIp { first_line: 5, .. })
        });
        let two_peers = format!(
            "private_key_file = \"/k\"\n[[peer]]\npublic_key = \"{KEY_A}\"\nallowed_ips = [\"fd00:19::/64\"]\n\
             [[peer]]\npublic_key = \"{KEY_B}\"\nallowed_ips = [\"fd00:19::/64\"]\n"
        );
        assert_err_at(&two_peers, 7, |p| {
            matches!(p, ConfigProblem::DuplicateAllowedIp { first_line: 4, .. })
        });
    }

    #[test]
    fn bad_endpoints_are_refused() {
        let peer = |ep: &str| {
            format!("private_key_file = \"/k\"\n[[peer]]\npublic_key = \"{KEY_A}\"\n\nendpoint = \"{ep}\"\n")
        };
        for bad in [
            "node-b.example:51820",
            "198.18.0.2",
            "fd00::2:51820",
            "198.18.0.2:99999",
            "",
        ] {
            assert_err_at(
                &peer(bad),
                5,
                |p| matches!(p, ConfigProblem::BadEndpoint { value } if value == bad),
            );
        }
        assert_err_at(&peer("198.18.0.2:0"), 5, |p| {
            matches!(p, ConfigProblem::EndpointPortZero)
        });
    }

    #[test]
    fn mtu_out_of_range_is_refused() {
        for (mtu, ok) in [
            (1279, false),
            (1280, true),
            (MAX_MTU, true),
            (MAX_MTU + 1, false),
        ] {
            let text = format!("private_key_file = \"/k\"\n\nmtu = {mtu}\n");
            if ok {
                assert_eq!(parse(&text).unwrap().mtu, mtu);
            } else {
                assert_err_at(
                    &text,
                    3,
                    |p| matches!(p, ConfigProblem::MtuOutOfRange { value } if *value == mtu),
                );
            }
        }
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for bad in ["", "a/b", "sixteen-chars-xx", "..", "a b"] {
            let text = format!("private_key_file = \"/k\"\ninterface = \"{bad}\"\n");
            assert_err_at(&text, 2, |p| {
                matches!(p, ConfigProblem::BadInterface { .. })
            });
        }
        assert!(check_ifname("fifteen-chars-x").is_ok());
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let text = format!(
            "private_key_file = \"private.key\"\n[[peer]]\npublic_key = \"{KEY_A}\"\npreshared_key_file = \"../psk/a\"\n"
        );
        let cfg = RouterConfig::parse(Path::new("/srv/cfg/router.toml"), &text).unwrap();
        assert_eq!(cfg.private_key_file, Path::new("/srv/cfg/private.key"));
        assert_eq!(
            cfg.peers[0].preshared_key_file.as_deref(),
            Some(Path::new("/srv/cfg/../psk/a"))
        );
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = RouterConfig::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        let shown = err.to_string();
        assert!(shown.contains("nope.toml"), "{shown}");
        // The cause is shown once, however the error is printed.
        assert_eq!(format!("{:#}", anyhow::Error::from(err)), shown);
        // A directory cannot be read as a file either.
        assert!(matches!(
            RouterConfig::load(dir.path()),
            Err(ConfigError::Read { .. })
        ));
        // Nor can a file that is not UTF-8.
        let binary = dir.path().join("bin.toml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            RouterConfig::load(&binary),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn load_reads_the_file_and_preshared_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let psk = Key::generate_private();
        let psk_path = dir.path().join("a.psk");
        std::fs::write(&psk_path, format!("{psk}\n")).unwrap();
        std::fs::set_permissions(&psk_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg_path = dir.path().join("router.toml");
        std::fs::write(
            &cfg_path,
            format!(
                "private_key_file = \"p.key\"\n[[peer]]\npublic_key = \"{KEY_A}\"\npreshared_key_file = \"a.psk\"\n\
                 [[peer]]\npublic_key = \"{KEY_B}\"\n"
            ),
        )
        .unwrap();
        let cfg = RouterConfig::load(&cfg_path).unwrap();
        assert_eq!(cfg.private_key_file, dir.path().join("p.key"));
        let keys = cfg.load_preshared_keys().unwrap();
        assert_eq!(
            keys,
            BTreeMap::from([(Key::from_base64(KEY_A).unwrap(), psk)])
        );
    }

    const TS_BASE: &str = "private_key_file = \"/k\"\n";

    #[test]
    fn tailscale_keys_are_understood() {
        let text = format!(
            "{TS_BASE}pod_cidrs = [\"198.19.1.0/24\", \"fd00:19:1::/64\"]\n\
             cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/32\"]\n\
             endpoints = [\"198.18.0.1:51820\", \"[fd00:18::1]:51820\"]\n\
             [tailscale]\nsocket = \"ts/tailscaled.sock\"\ntag = \"tag:k8s-node-2\"\n\
             announce_port = 4000\nresync = \"2s\"\n"
        );
        let cfg = parse(&text).unwrap();
        let nets = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse::<IpNet>().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(cfg.pod_cidrs, nets(&["198.19.1.0/24", "fd00:19:1::/64"]));
        assert_eq!(cfg.cluster_cidrs, nets(&["198.19.0.0/16", "fd00:19::/32"]));
        assert_eq!(
            cfg.endpoints,
            vec![
                "198.18.0.1:51820".parse::<SocketAddr>().unwrap(),
                "[fd00:18::1]:51820".parse().unwrap()
            ]
        );
        assert_eq!(
            cfg.tailscale,
            Some(TailscaleConfig {
                socket: PathBuf::from("/etc/tailsk8s/ts/tailscaled.sock"),
                tag: "tag:k8s-node-2".into(),
                announce_port: 4000,
                resync: Duration::from_secs(2),
            })
        );
    }

    #[test]
    fn tailscale_defaults_apply() {
        let cfg = parse(&format!(
            "{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\"]\n[tailscale]\n"
        ))
        .unwrap();
        let ts = cfg.tailscale.unwrap();
        assert_eq!(ts.socket, Path::new(DEFAULT_TAILSCALE_SOCKET));
        assert_eq!(ts.tag, DEFAULT_TAG);
        assert_eq!(ts.announce_port, DEFAULT_ANNOUNCE_PORT);
        assert_eq!(ts.resync, DEFAULT_RESYNC);
        assert!(cfg.pod_cidrs.is_empty() && cfg.endpoints.is_empty());
        let plain = parse(TS_BASE).unwrap();
        assert_eq!(plain.tailscale, None);
        assert!(plain.cluster_cidrs.is_empty());
    }

    #[test]
    fn a_pod_cidr_outside_the_cluster_cidrs_is_refused_at_its_line() {
        let text = format!(
            "{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\"]\npod_cidrs = [\n  \"198.19.1.0/24\",\n  \"198.20.1.0/24\",\n]\n"
        );
        assert_err_at(&text, 5, |p| {
            matches!(p, ConfigProblem::PodCidrOutsideCluster { prefix, cluster }
                if prefix.to_string() == "198.20.1.0/24" && cluster == "198.19.0.0/16")
        });
        // Wider than the cluster CIDR is outside too; another family is outside.
        assert_err_at(
            &format!(
                "{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\"]\npod_cidrs = [\"198.18.0.0/15\"]\n"
            ),
            3,
            |p| matches!(p, ConfigProblem::PodCidrOutsideCluster { .. }),
        );
        assert_err_at(
            &format!(
                "{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\"]\npod_cidrs = [\"fd00:19:1::/64\"]\n"
            ),
            3,
            |p| matches!(p, ConfigProblem::PodCidrOutsideCluster { .. }),
        );
    }

    #[test]
    fn pod_cidrs_and_tailscale_need_cluster_cidrs() {
        assert_err_at(
            &format!("{TS_BASE}\npod_cidrs = [\"198.19.1.0/24\"]\n"),
            3,
            |p| matches!(p, ConfigProblem::MissingClusterCidrs { what: "pod_cidrs" }),
        );
        assert_err_at(
            &format!("{TS_BASE}[tailscale]\ntag = \"tag:a\"\n"),
            2,
            |p| {
                matches!(
                    p,
                    ConfigProblem::MissingClusterCidrs {
                        what: "[tailscale]"
                    }
                )
            },
        );
    }

    #[test]
    fn bad_networks_are_refused_at_their_line() {
        for (value, check) in [
            ("198.19.1.0", "bad"),
            ("pods", "bad"),
            ("198.19.1.0/33", "bad"),
            ("198.19.1.1/24", "host"),
        ] {
            let text = format!(
                "{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\"]\npod_cidrs = [\"{value}\"]\n"
            );
            assert_err_at(&text, 3, |p| match check {
                "bad" => matches!(
                    p,
                    ConfigProblem::BadNetwork {
                        field: "pod_cidrs",
                        ..
                    }
                ),
                _ => matches!(p, ConfigProblem::HostBitsSet { .. }),
            });
        }
        assert_err_at(
            &format!("{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\",\n\"198.19.0.0/16\"]\n"),
            3,
            |p| {
                matches!(
                    p,
                    ConfigProblem::DuplicateNetwork {
                        field: "cluster_cidrs",
                        first_line: 2,
                        ..
                    }
                )
            },
        );
    }

    #[test]
    fn bad_announced_endpoints_are_refused() {
        assert_err_at(
            &format!("{TS_BASE}endpoints = [\"node-a:51820\"]\n"),
            2,
            |p| matches!(p, ConfigProblem::BadEndpoint { .. }),
        );
        assert_err_at(
            &format!("{TS_BASE}endpoints = [\"198.18.0.1:0\"]\n"),
            2,
            |p| matches!(p, ConfigProblem::EndpointPortZero),
        );
        assert_err_at(
            &format!("{TS_BASE}endpoints = [\"198.18.0.1:1\",\n \"198.18.0.1:1\"]\n"),
            3,
            |p| matches!(p, ConfigProblem::DuplicateEndpoint { first_line: 2, .. }),
        );
    }

    #[test]
    fn bad_tailscale_values_are_refused_at_their_line() {
        let ts = |line: &str| {
            format!("{TS_BASE}cluster_cidrs = [\"198.19.0.0/16\"]\n[tailscale]\n{line}\n")
        };
        for bad in ["k8s-node", "tag:", "tag:1node", "tag:a b", "tag:ü"] {
            assert_err_at(
                &ts(&format!("tag = \"{bad}\"")),
                4,
                |p| matches!(p, ConfigProblem::BadTag { value } if value == bad),
            );
        }
        for bad in ["30", "s", "30 sec", "-1s", "1.5s", "99999999999999s"] {
            assert_err_at(&ts(&format!("resync = \"{bad}\"")), 4, |p| {
                matches!(p, ConfigProblem::BadDuration { .. })
            });
        }
        for bad in ["999ms", "0s", "25h"] {
            assert_err_at(&ts(&format!("resync = \"{bad}\"")), 4, |p| {
                matches!(p, ConfigProblem::DurationOutOfRange { .. })
            });
        }
        assert_err_at(&ts("announce_port = 0"), 4, |p| {
            matches!(
                p,
                ConfigProblem::PortZero {
                    field: "announce_port"
                }
            )
        });
        assert_err_at(&ts("socket = \"\""), 4, |p| {
            matches!(p, ConfigProblem::EmptyPath { field: "socket" })
        });
        assert_err_at(
            &ts("sokcet = \"/x\""),
            4,
            |p| matches!(p, ConfigProblem::UnknownKey { key, .. } if key == "sokcet"),
        );
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn metrics_listen_is_an_address_with_a_port() {
        let base = "private_key_file = \"/k\"\n";
        let ok = parse(&format!("{base}[metrics]\nlisten = \"0.0.0.0:9586\"\n")).unwrap();
        assert_eq!(ok.metrics_listen, Some("0.0.0.0:9586".parse().unwrap()));
        assert_eq!(parse(base).unwrap().metrics_listen, None);
        assert_err_at(
            &format!("{base}[metrics]\nlisten = \"localhost:9586\"\n"),
            3,
            |p| matches!(p, ConfigProblem::BadListen { .. }),
        );
        assert_err_at(
            &format!("{base}[metrics]\nlisten = \"[::1]:0\"\n"),
            3,
            |p| matches!(p, ConfigProblem::PortZero { .. }),
        );
        assert_err_at(&format!("{base}[metrics]\nlisen = \"[::1]:1\"\n"), 3, |p| {
            matches!(p, ConfigProblem::UnknownKey { .. })
        });
    }
}
