//! The JSON documents of tailscaled's LocalAPI that tailsk8s reads or writes: the status
//! (`ipnstate.Status` with its `PeerStatus`es), whois (`apitype.WhoIsResponse` around a
//! `tailcfg.Node`), prefs (`ipn.Prefs`, and `ipn.MaskedPrefs` to change them) and the
//! watch-ipn-bus messages (`ipn.Notify`).
//!
//! Daemons differ by version: fields come and go (`TailAddr` and `KeepAlive` were removed,
//! `NodeID` and `AllowedIPs` were added), Go writes empty lists as `null`. So every type here
//! ignores unknown fields, defaults missing ones, and reads `null` as empty. An address or
//! prefix that does not parse is left out of the result rather than failing the whole
//! document: a route we cannot read is a route we do not carry. A document that is not JSON
//! of the right shape is an error.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use super::{TailnetNode, TailnetView};

/// A document that is not what the LocalAPI endpoint should return.
#[derive(Debug, Error)]
#[error("not a valid {document} document: {source}")]
pub struct DocumentError {
    pub document: &'static str,
    #[source]
    pub source: serde_json::Error,
}

fn parse<'a, T: Deserialize<'a>>(
    document: &'static str,
    bytes: &'a [u8],
) -> Result<T, DocumentError> {
    let error = |source| DocumentError { document, source };
    // serde reads a struct from an array too: every document is an object, so say so.
    if bytes.trim_ascii_start().first() == Some(&b'[') {
        return Err(error(serde::de::Error::custom(
            "a JSON array, not an object",
        )));
    }
    serde_json::from_slice(bytes).map_err(error)
}

/// `null` (Go's nil slice or map) reads as the default, like a missing field.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// `GET /localapi/v0/status`.
#[derive(Debug, Default, Deserialize)]
pub struct Status {
    #[serde(rename = "Version", default, deserialize_with = "nullable")]
    pub version: String,
    #[serde(rename = "BackendState", default, deserialize_with = "nullable")]
    pub backend_state: String,
    /// Null before login.
    #[serde(rename = "Self", default)]
    pub self_status: Option<PeerStatus>,
    /// Keyed by `nodekey:…`.
    #[serde(rename = "Peer", default, deserialize_with = "nullable")]
    pub peer: BTreeMap<String, PeerStatus>,
}

/// One node in the status document (`ipnstate.PeerStatus`).
#[derive(Debug, Default, Deserialize)]
pub struct PeerStatus {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(rename = "PublicKey", default, deserialize_with = "nullable")]
    pub public_key: String,
    #[serde(rename = "HostName", default, deserialize_with = "nullable")]
    pub host_name: String,
    #[serde(rename = "DNSName", default, deserialize_with = "nullable")]
    pub dns_name: String,
    #[serde(rename = "OS", default, deserialize_with = "nullable")]
    pub os: String,
    #[serde(rename = "TailscaleIPs", default, deserialize_with = "nullable")]
    pub tailscale_ips: Vec<String>,
    /// Before `TailscaleIPs` (daemons before v1.8): the single IPv4 address.
    #[serde(rename = "TailAddr", default, deserialize_with = "nullable")]
    pub tail_addr: String,
    #[serde(rename = "Tags", default, deserialize_with = "nullable")]
    pub tags: Vec<String>,
    #[serde(rename = "PrimaryRoutes", default, deserialize_with = "nullable")]
    pub primary_routes: Vec<String>,
    #[serde(rename = "CurAddr", default, deserialize_with = "nullable")]
    pub cur_addr: String,
    #[serde(rename = "Relay", default, deserialize_with = "nullable")]
    pub relay: String,
    #[serde(rename = "Online", default, deserialize_with = "nullable")]
    pub online: bool,
}

/// `GET /localapi/v0/whois?addr=IP:PORT` (`apitype.WhoIsResponse`).
#[derive(Debug, Default, Deserialize)]
pub struct WhoIs {
    #[serde(rename = "Node", default)]
    pub node: Option<Node>,
}

/// The `tailcfg.Node` inside a whois reply (only what tailsk8s reads).
#[derive(Debug, Default, Deserialize)]
pub struct Node {
    #[serde(rename = "StableID", default, deserialize_with = "nullable")]
    pub stable_id: String,
    /// The FQDN with its trailing dot.
    #[serde(rename = "Name", default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(rename = "Key", default, deserialize_with = "nullable")]
    pub key: String,
    /// Single-address prefixes: `100.101.1.11/32`.
    #[serde(rename = "Addresses", default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    #[serde(rename = "PrimaryRoutes", default, deserialize_with = "nullable")]
    pub primary_routes: Vec<String>,
    #[serde(rename = "Tags", default, deserialize_with = "nullable")]
    pub tags: Vec<String>,
    /// `*bool` in Go: absent or null when the control server did not say.
    #[serde(rename = "Online", default)]
    pub online: Option<bool>,
    #[serde(rename = "Hostinfo", default, deserialize_with = "nullable")]
    pub hostinfo: Hostinfo,
}

/// `tailcfg.Hostinfo`, the part tailsk8s reads.
#[derive(Debug, Default, Deserialize)]
pub struct Hostinfo {
    #[serde(rename = "Hostname", default, deserialize_with = "nullable")]
    pub hostname: String,
    /// Advertised routes (approved or not).
    #[serde(rename = "RoutableIPs", default, deserialize_with = "nullable")]
    pub routable_ips: Vec<String>,
}

/// `GET /localapi/v0/prefs` and the reply to `PATCH` (`ipn.Prefs`, keys stripped).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct Prefs {
    /// Kept as text: a route this version cannot parse must survive a read-modify-write.
    #[serde(rename = "AdvertiseRoutes", default, deserialize_with = "nullable")]
    pub advertise_routes: Vec<String>,
    #[serde(rename = "AdvertiseTags", default, deserialize_with = "nullable")]
    pub advertise_tags: Vec<String>,
    /// `--accept-routes`.
    #[serde(rename = "RouteAll", default, deserialize_with = "nullable")]
    pub route_all: bool,
    #[serde(rename = "WantRunning", default, deserialize_with = "nullable")]
    pub want_running: bool,
    #[serde(rename = "NoSNAT", default, deserialize_with = "nullable")]
    pub no_snat: bool,
}

/// The body of `PATCH /localapi/v0/prefs` (`ipn.MaskedPrefs`): only the fields whose
/// `…Set` flag is true change; the lists given replace the daemon's whole list.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct MaskedPrefs {
    #[serde(rename = "AdvertiseRoutes", skip_serializing_if = "Option::is_none")]
    pub advertise_routes: Option<Vec<String>>,
    #[serde(
        rename = "AdvertiseRoutesSet",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub advertise_routes_set: bool,
}

impl MaskedPrefs {
    /// A change of the advertised routes to exactly `routes`.
    pub fn advertise_routes(routes: Vec<String>) -> Self {
        MaskedPrefs {
            advertise_routes: Some(routes),
            advertise_routes_set: true,
        }
    }
}

/// One message of `watch-ipn-bus` (`ipn.Notify`). tailsk8s treats any message as "something
/// changed"; these fields only make logs and errors clearer.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
pub struct Notify {
    #[serde(rename = "Version", default, deserialize_with = "nullable")]
    pub version: String,
    /// An error of the backend (the bus itself still works).
    #[serde(rename = "ErrMessage", default)]
    pub err_message: Option<String>,
    /// `ipn.State` as a number (6 = Running).
    #[serde(rename = "State", default)]
    pub state: Option<i64>,
}

/// Parses a status document into a [`TailnetView`].
pub fn parse_status(bytes: &[u8]) -> Result<TailnetView, DocumentError> {
    let status: Status = parse("status", bytes)?;
    Ok(status.into_view())
}

/// Parses a whois reply; `None` when it names no node.
pub fn parse_whois(bytes: &[u8]) -> Result<Option<TailnetNode>, DocumentError> {
    let whois: WhoIs = parse("whois", bytes)?;
    Ok(whois.node.map(Node::into_tailnet_node))
}

/// Parses a prefs document.
pub fn parse_prefs(bytes: &[u8]) -> Result<Prefs, DocumentError> {
    parse("prefs", bytes)
}

/// Parses one line of the watch-ipn-bus stream.
pub fn parse_notify(bytes: &[u8]) -> Result<Notify, DocumentError> {
    parse("watch-ipn-bus message", bytes)
}

impl Status {
    pub fn into_view(self) -> TailnetView {
        let mut peers: Vec<TailnetNode> = self
            .peer
            .into_values()
            .map(PeerStatus::into_tailnet_node)
            .collect();
        peers.sort_by(|a, b| a.stable_id.cmp(&b.stable_id));
        TailnetView {
            backend_state: self.backend_state,
            self_node: self
                .self_status
                .map(PeerStatus::into_tailnet_node)
                .unwrap_or_default(),
            peers,
        }
    }
}

impl PeerStatus {
    pub fn into_tailnet_node(self) -> TailnetNode {
        let mut tailnet_ips: Vec<IpAddr> = parse_all(&self.tailscale_ips, |s| s.parse().ok());
        if tailnet_ips.is_empty() {
            tailnet_ips.extend(self.tail_addr.parse::<IpAddr>().ok());
        }
        TailnetNode {
            stable_id: self.id,
            host_name: self.host_name,
            dns_name: self.dns_name,
            tailnet_ips,
            tags: self.tags,
            primary_routes: parse_all(&self.primary_routes, parse_prefix),
            online: self.online,
        }
    }
}

impl Node {
    pub fn into_tailnet_node(self) -> TailnetNode {
        // Addresses are prefixes; a node's own addresses are the single-address ones.
        let tailnet_ips = parse_all(&self.addresses, |s| {
            let net: IpNet = s.parse().ok()?;
            (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
        });
        let host_name = if self.hostinfo.hostname.is_empty() {
            self.name.split('.').next().unwrap_or_default().to_string()
        } else {
            self.hostinfo.hostname
        };
        TailnetNode {
            stable_id: self.stable_id,
            host_name,
            dns_name: self.name,
            tailnet_ips,
            tags: self.tags,
            primary_routes: parse_all(&self.primary_routes, parse_prefix),
            online: self.online.unwrap_or(false),
        }
    }
}

/// A route prefix, with any host bits cleared (tailscaled sends masked prefixes; a peer's
/// route must never claim more than its network).
pub fn parse_prefix(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>().ok().map(|net| net.trunc())
}

fn parse_all<T: PartialEq>(items: &[String], parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        if let Some(value) = parse(item) {
            if !out.contains(&value) {
                out.push(value);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
