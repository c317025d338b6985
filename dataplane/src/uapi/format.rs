//! Formatting a [`DeviceSnapshot`] as the reply to a UAPI `get=1`, in wireguard-go's order,
//! ending with `errno=0` and the blank line `wg` waits for.
//!
//! Device: `private_key` (only when set), `listen_port` (omitted when 0), `fwmark` (omitted
//! when 0). Per peer: `public_key`, `preshared_key` (zeros when none), `protocol_version=1`,
//! `endpoint` (when known), `last_handshake_time_sec`/`_nsec` (ABSOLUTE Unix time, 0/0 when
//! never: `wg` subtracts it from the clock itself), `tx_bytes`, `rx_bytes`,
//! `persistent_keepalive_interval`, then one `allowed_ip` per prefix.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{DeviceSnapshot, PeerSnapshot};
use crate::key::Key;

/// Appends the complete get reply for `snapshot` to `out` (the caller clears and reuses it).
/// Nothing is truncated: the reply grows with the allowed IPs.
pub fn format_get(snapshot: &DeviceSnapshot, out: &mut String) {
    // Writing into a String cannot fail; the fmt::Result is ignored for that reason only.
    let _ = write_get(snapshot, out);
}

fn write_get(snapshot: &DeviceSnapshot, out: &mut String) -> fmt::Result {
    if let Some(private_key) = &snapshot.private_key {
        writeln!(out, "private_key={}", Hex(private_key))?;
    }
    if snapshot.listen_port != 0 {
        writeln!(out, "listen_port={}", snapshot.listen_port)?;
    }
    if snapshot.fwmark != 0 {
        writeln!(out, "fwmark={}", snapshot.fwmark)?;
    }
    for peer in &snapshot.peers {
        write_peer(peer, out)?;
    }
    out.push_str("errno=0\n\n");
    Ok(())
}

fn write_peer(peer: &PeerSnapshot, out: &mut String) -> fmt::Result {
    writeln!(out, "public_key={}", Hex(&peer.public_key))?;
    let psk = peer.preshared_key.unwrap_or(Key::ZERO);
    writeln!(out, "preshared_key={}", Hex(&psk))?;
    out.push_str("protocol_version=1\n");
    if let Some(endpoint) = &peer.endpoint {
        // SocketAddr's Display already brackets IPv6 and appends a non-zero scope as `%id`.
        writeln!(out, "endpoint={endpoint}")?;
    }
    let (sec, nsec) = unix_time(peer.last_handshake);
    writeln!(out, "last_handshake_time_sec={sec}")?;
    writeln!(out, "last_handshake_time_nsec={nsec}")?;
    writeln!(out, "tx_bytes={}", peer.tx_bytes)?;
    writeln!(out, "rx_bytes={}", peer.rx_bytes)?;
    writeln!(
        out,
        "persistent_keepalive_interval={}",
        peer.persistent_keepalive
    )?;
    for net in &peer.allowed_ips {
        writeln!(out, "allowed_ip={net}")?;
    }
    Ok(())
}

/// Seconds and nanoseconds since the Unix epoch; 0/0 for "never" (and for a clock set before
/// 1970, which `wg` could not show sensibly either).
fn unix_time(t: Option<SystemTime>) -> (u64, u32) {
    match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
        Some(d) => (d.as_secs(), d.subsec_nanos()),
        None => (0, 0),
    }
}

/// A key in lowercase hex without allocating a String per key.
struct Hex<'a>(&'a Key);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One write of 64 digits: a `write!` per byte was a visible share of a large get.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 64];
        for (pair, b) in text.chunks_exact_mut(2).zip(self.0 .0) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0x0f)];
        }
        // Hex digits are ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ipnet::IpNet;

    use super::*;
    use crate::config::{AllowedIpChange, DeviceUpdate};
    use crate::uapi::parse::parse_set;

    fn key(byte: u8) -> Key {
        Key([byte; 32])
    }

    fn peer(byte: u8) -> PeerSnapshot {
        PeerSnapshot::new(key(byte))
    }

    fn get(snapshot: &DeviceSnapshot) -> String {
        let mut out = String::new();
        format_get(snapshot, &mut out);
        out
    }

    #[test]
    fn empty_device() {
        assert_eq!(get(&DeviceSnapshot::default()), "errno=0\n\n");
    }

    #[test]
    fn full_order_and_values() {
        let handshake = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let mut p1 = peer(1);
        p1.preshared_key = Some(key(2));
        p1.endpoint = Some("198.18.0.2:51820".parse().unwrap());
        p1.last_handshake = Some(handshake);
        p1.rx_bytes = 1372;
        p1.tx_bytes = 1428;
        p1.persistent_keepalive = 25;
        p1.allowed_ips = vec![
            "198.19.1.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap(),
        ];
        let mut p2 = peer(3);
        p2.endpoint = Some("[fd00::2]:51821".parse().unwrap());
        let snapshot = DeviceSnapshot {
            private_key: Some(key(0xab)),
            listen_port: 51820,
            fwmark: 32,
            peers: vec![p1, p2],
        };
        let want = format!(
            "private_key={ab}\nlisten_port=51820\nfwmark=32\n\
             public_key={k1}\npreshared_key={k2}\nprotocol_version=1\n\
             endpoint=198.18.0.2:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=123456789\ntx_bytes=1428\nrx_bytes=1372\n\
             persistent_keepalive_interval=25\nallowed_ip=198.19.1.0/24\nallowed_ip=fd00:1::/64\n\
             public_key={k3}\npreshared_key={z}\nprotocol_version=1\n\
             endpoint=[fd00::2]:51821\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n\
             errno=0\n\n",
            ab = "ab".repeat(32),
            k1 = "01".repeat(32),
            k2 = "02".repeat(32),
            k3 = "03".repeat(32),
            z = "00".repeat(32),
        );
        assert_eq!(get(&snapshot), want);
    }

    #[test]
    fn unset_device_fields_are_omitted() {
        let out = get(&DeviceSnapshot {
            peers: vec![peer(1)],
            ..DeviceSnapshot::default()
        });
        assert!(out.starts_with("public_key="), "{out}");
        for absent in ["private_key", "listen_port", "fwmark", "endpoint"] {
            assert!(!out.contains(absent), "{absent} in {out}");
        }
    }

    #[test]
    fn handshake_time_is_absolute() {
        // A handshake "5 seconds ago" must read back as now - 5 s, not as 5.
        let now = SystemTime::now();
        let mut p = peer(1);
        p.last_handshake = Some(now - Duration::from_secs(5));
        let out = get(&DeviceSnapshot {
            peers: vec![p],
            ..DeviceSnapshot::default()
        });
        let sec: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("last_handshake_time_sec="))
            .unwrap()
            .parse()
            .unwrap();
        let now_sec = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(
            sec >= now_sec - 6 && sec <= now_sec - 4,
            "{sec} vs {now_sec}"
        );
    }

    #[test]
    fn handshake_before_epoch_reads_as_never() {
        assert_eq!(unix_time(Some(UNIX_EPOCH - Duration::from_secs(1))), (0, 0));
        assert_eq!(unix_time(None), (0, 0));
    }

    #[test]
    fn scoped_ipv6_endpoint() {
        let mut p = peer(1);
        p.endpoint = Some("[fe80::1%3]:5".parse().unwrap());
        let out = get(&DeviceSnapshot {
            peers: vec![p],
            ..DeviceSnapshot::default()
        });
        assert!(out.contains("\nendpoint=[fe80::1%3]:5\n"), "{out}");
    }

    #[test]
    fn appends_to_the_reused_buffer() {
        let mut out = String::from("x");
        format_get(&DeviceSnapshot::default(), &mut out);
        assert_eq!(out, "xerrno=0\n\n");
    }

    /// Turns a get reply into the set a `wg syncconf`/`showconf | setconf` would send: the
    /// read-only counters are dropped, the rest are valid set keys as they are.
    fn reply_to_set(reply: &str) -> String {
        let body = reply
            .strip_suffix("errno=0\n\n")
            .expect("reply ends with errno=0");
        let mut set = String::from("replace_peers=true\n");
        for line in body.lines() {
            let key = line.split('=').next().unwrap();
            match key {
                "last_handshake_time_sec"
                | "last_handshake_time_nsec"
                | "tx_bytes"
                | "rx_bytes" => {}
                _ => {
                    set.push_str(line);
                    set.push('\n');
                }
            }
        }
        set
    }

    fn big_snapshot() -> DeviceSnapshot {
        let mut peers = Vec::new();
        for p in 1..=40u8 {
            let mut s = peer(p);
            s.preshared_key = (p % 2 == 0).then(|| key(p + 100));
            s.endpoint = Some(if p % 3 == 0 {
                format!("[fd00::{p:x}]:{}", 50000 + u16::from(p))
            } else {
                format!("198.18.0.{p}:{}", 50000 + u16::from(p))
            })
            .map(|e| e.parse().unwrap());
            s.persistent_keepalive = u16::from(p);
            s.last_handshake = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
            s.allowed_ips = vec![format!("198.19.{p}.0/24").parse().unwrap()];
            peers.push(s);
        }
        // One peer with 30,000 prefixes, half IPv4 and half IPv6.
        peers[0].allowed_ips = (0..30_000u32)
            .map(|i| -> IpNet {
                if i % 2 == 0 {
                    format!("198.18.{}.{}/32", (i >> 8) & 0xff, i & 0xff)
                } else {
                    format!("fd00:{:x}::/64", i)
                }
                .parse()
                .unwrap()
            })
            .collect();
        DeviceSnapshot {
            private_key: Some(key(0xee)),
            listen_port: 51820,
            fwmark: 7,
            peers,
        }
    }

    #[test]
    fn round_trip_through_set() {
        let snapshot = big_snapshot();
        let reply = get(&snapshot);
        assert_eq!(
            reply.matches("\nallowed_ip=").count(),
            30_000 + 39,
            "nothing truncated"
        );
        let update = parse_set(&reply_to_set(&reply)).unwrap();
        assert_eq!(update.private_key, Some(snapshot.private_key));
        assert_eq!(update.listen_port, Some(snapshot.listen_port));
        assert_eq!(update.fwmark, Some(snapshot.fwmark));
        assert_eq!(update.peers.len(), snapshot.peers.len());
        for (u, s) in update.peers.iter().zip(&snapshot.peers) {
            assert_eq!(u.public_key, s.public_key);
            assert_eq!(u.preshared_key, Some(s.preshared_key));
            assert_eq!(u.endpoint, s.endpoint);
            assert_eq!(u.persistent_keepalive, Some(s.persistent_keepalive));
            let added: Vec<IpNet> = u
                .allowed_ips
                .iter()
                .map(|c| match c {
                    AllowedIpChange::Add(n) => *n,
                    AllowedIpChange::Remove(n) => panic!("unexpected removal of {n}"),
                })
                .collect();
            assert_eq!(added, s.allowed_ips);
        }
    }

    #[test]
    fn round_trip_of_empty_device_is_empty() {
        let update = parse_set(&reply_to_set(&get(&DeviceSnapshot::default()))).unwrap();
        assert_eq!(
            update,
            DeviceUpdate {
                replace_peers: true,
                ..DeviceUpdate::default()
            }
        );
    }
}
