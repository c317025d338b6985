//! Peers to churn: many made-up peers (random keys, one IPv4 /32 and one IPv6 /128 inside
//! the cluster's pod ranges, an endpoint nobody answers at), written as `wg addconf` text and
//! removed with `wg set … remove`; and a peer's last handshake read over UAPI to the
//! nanosecond, to show that churn around a peer never touched its session.

use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use ipnet::IpNet;

use crate::netns::Netns;

/// Where made-up peer `i`'s IPv4 /32 lies: 198.19.128.0/17, away from the lab's pod CIDRs.
pub fn pod_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 128 + (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Made-up peer `i`'s IPv6 /128, inside fd00:19::/32.
pub fn pod_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x19, 0xff, 0, 0, 0, (i >> 16) as u16, i as u16)
}

/// Where made-up peers' endpoints lie (198.18.250.0 – 198.18.253.255, inside the lab's
/// underlay range, held by no namespace).
pub const ENDPOINTS: &str = "198.18.248.0/21";

/// One made-up peer.
#[derive(Debug, Clone)]
pub struct FakePeer {
    /// Base64.
    pub public_key: String,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: SocketAddr,
}

/// `count` made-up peers with fresh random keys (random bytes are a public key; a low-order
/// one, 7 in 2^255, never comes up).
pub fn fake_peers(count: usize) -> anyhow::Result<Vec<FakePeer>> {
    let mut random = vec![0u8; 32 * count];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom")?;
    Ok(random
        .chunks(32)
        .enumerate()
        .map(|(i, key)| FakePeer {
            public_key: base64::engine::general_purpose::STANDARD.encode(key),
            allowed_ips: vec![
                IpNet::from(IpAddr::V4(pod_v4(i))),
                IpNet::from(IpAddr::V6(pod_v6(i))),
            ],
            // TEST-NET-like space inside the lab's underlay range that no namespace holds.
            endpoint: SocketAddr::new(
                Ipv4Addr::new(198, 18, 250 + (i / 250) as u8, (i % 250 + 1) as u8).into(),
                51820,
            ),
        })
        .collect())
}

/// The `wg addconf` text that adds `peers`.
pub fn addconf_text(peers: &[FakePeer]) -> String {
    let mut text = String::new();
    for peer in peers {
        let ips: Vec<String> = peer.allowed_ips.iter().map(IpNet::to_string).collect();
        let _ = writeln!(
            text,
            "[Peer]\nPublicKey = {}\nAllowedIPs = {}\nEndpoint = {}\n",
            peer.public_key,
            ips.join(", "),
            peer.endpoint
        );
    }
    text
}

/// `wg addconf IFNAME FILE` in `ns`, with `peers` written to `file` first.
pub fn add(ns: &Netns, ifname: &str, file: &Path, peers: &[FakePeer]) -> anyhow::Result<()> {
    std::fs::write(file, addconf_text(peers))
        .with_context(|| format!("writing {}", file.display()))?;
    let path = file.display().to_string();
    ns.exec("wg", &["addconf", ifname, path.as_str()])
}

/// `wg set IFNAME peer K remove …` in `ns`, one call for all of `peers`.
pub fn remove(ns: &Netns, ifname: &str, peers: &[FakePeer]) -> anyhow::Result<()> {
    let mut args = vec!["set".to_string(), ifname.to_string()];
    for peer in peers {
        args.extend([
            "peer".to_string(),
            peer.public_key.clone(),
            "remove".to_string(),
        ]);
    }
    ns.exec("wg", &args)
}

/// The last handshake of the peer with base64 `public_key`, as the router with UAPI
/// socket name `ifname` reports it (seconds and nanoseconds since the epoch); `None` when it
/// has none or no such peer.
pub fn last_handshake(ifname: &str, public_key: &str) -> anyhow::Result<Option<Duration>> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(public_key)
        .context("a base64 key")?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let text = crate::config_router::uapi_get(ifname)?;
    let mut in_peer = false;
    let (mut sec, mut nsec) = (None, None);
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        match name {
            "public_key" => in_peer = value == hex,
            "last_handshake_time_sec" if in_peer => sec = Some(value.parse::<u64>()?),
            "last_handshake_time_nsec" if in_peer => nsec = Some(value.parse::<u32>()?),
            _ => {}
        }
    }
    Ok(match (sec, nsec) {
        (Some(0), Some(0)) | (None, _) => None,
        (Some(sec), nsec) => Some(Duration::new(sec, nsec.unwrap_or(0))),
    })
}
