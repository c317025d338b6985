//! The device configuration as data: [`DeviceUpdate`] is a change (what a UAPI `set`, a config
//! file or a peer source asks for), [`DeviceSnapshot`] is the state read back (what a UAPI
//! `get` reports). Both the UAPI server and the control plane speak only these types, so the
//! engine has one way in and one way out.

use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::key::Key;
use crate::stats::DropTotals;

/// One change to the device. A running device applies it in this order: fwmark, listen port,
/// private key, `replace_peers`, then each peer block in sequence (see [`crate::control`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// `Some(None)` removes the private key (UAPI: all zeros).
    pub private_key: Option<Option<Key>>,
    /// `Some(0)` picks a random port.
    pub listen_port: Option<u16>,
    /// `Some(0)` removes the mark.
    pub fwmark: Option<u32>,
    /// Remove all peers before applying the peer blocks (UAPI `replace_peers=true`).
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

/// One peer block of an update. A block whose key equals the device's own public key is
/// ignored, as the kernel does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    /// Remove this peer (other fields are ignored).
    pub remove: bool,
    /// Only change the peer if it exists; never create it.
    pub update_only: bool,
    /// `Some(None)` removes the preshared key.
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; `Some(0)` disables.
    pub persistent_keepalive: Option<u16>,
    /// Clear the peer's allowed IPs before applying `allowed_ips`.
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<AllowedIpChange>,
}

impl PeerUpdate {
    /// A block that names the peer and changes nothing yet.
    pub fn new(public_key: Key) -> PeerUpdate {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// Adding or removing one prefix of a peer's allowed IPs (UAPI `allowed_ip=` / `allowed_ip=-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedIpChange {
    Add(IpNet),
    Remove(IpNet),
}

/// The device as a UAPI `get` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub private_key: Option<Key>,
    /// The port actually bound (0 when no socket is bound).
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerSnapshot>,
}

/// One peer as a UAPI `get` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last completed handshake (absolute, as `wg` expects): the
    /// wall clock given to the snapshot minus the handshake's age in engine time.
    pub last_handshake: Option<SystemTime>,
    /// Wire bytes of WireGuard messages received from / sent to this peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Authenticated WireGuard messages received from / sent to this peer (not in UAPI).
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Handshake initiations sent to this peer, retries included (not in UAPI).
    pub handshake_initiations: u64,
    /// Drops that concern this peer, by reason (not in UAPI).
    pub drops: DropTotals,
    /// Seconds; 0 when disabled.
    pub persistent_keepalive: u16,
    /// Sorted (IPv4 before IPv6, then by address, then by prefix length: `IpNet`'s order),
    /// normalised (host bits cleared).
    pub allowed_ips: Vec<IpNet>,
}

/// Why a change was refused; maps onto the errno a UAPI `set` reports (negated on the wire).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("address in use: {0}")]
    AddressInUse(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        /// The positive errno the OS reported.
        #[source]
        source: ErrnoError,
    },
}

/// A raw OS errno carried as an error source.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error("os error {0}")]
pub struct ErrnoError(pub i32);

impl SetError {
    /// The positive errno for this failure (EINVAL, EADDRINUSE, or what the OS said).
    pub fn errno(&self) -> i32 {
        match self {
            SetError::Invalid(_) => libc::EINVAL,
            SetError::AddressInUse(_) => libc::EADDRINUSE,
            SetError::Io { source, .. } => source.0,
        }
    }
}

/// What the UAPI server (and the control plane) needs from a running device: read it whole,
/// or apply one change to it.
pub trait DeviceControl: Send + Sync {
    fn get(&self) -> DeviceSnapshot;
    fn set(&self, update: DeviceUpdate) -> Result<(), SetError>;
}

impl PeerSnapshot {
    /// A peer that has only its key: no endpoint, no handshake, no traffic, no allowed IPs.
    pub fn new(public_key: Key) -> PeerSnapshot {
        PeerSnapshot {
            public_key,
            preshared_key: None,
            endpoint: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            rx_packets: 0,
            tx_packets: 0,
            handshake_initiations: 0,
            drops: DropTotals::default(),
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }
}
