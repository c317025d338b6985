//! Parsing a UAPI `set=1` operation into one [`DeviceUpdate`], without any IO.
//!
//! The body of a set is `key=value` lines. Device keys (`private_key`, `listen_port`,
//! `fwmark`, `replace_peers`) come first; each `public_key` opens a peer block and every later
//! key applies to that peer. [`SetParser`] takes the lines one at a time (so the server never
//! has to hold the raw text of a 30,000-prefix set), keeps the first error, and hands back
//! either the complete update or that error: nothing is applied from a malformed set.
//!
//! Error messages name the line and the key but never echo a value: values may be keys.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;

use ipnet::IpNet;
use thiserror::Error;

use crate::config::{AllowedIpChange, DeviceUpdate, PeerUpdate};
use crate::key::Key;

/// The longest line (without its `\n`) a set may contain. The longest legitimate line is an
/// endpoint with an interface scope, well under 100 bytes; 4 KiB leaves room without letting
/// a client make us buffer unbounded text.
pub const MAX_LINE_LEN: usize = 4096;

/// How much of an unknown key is quoted back in an error.
const QUOTED_KEY_MAX: usize = 64;

/// Why a set operation was refused. Every variant maps to EINVAL on the wire. `line` counts
/// the lines of the body from 1 (the line after `set=1`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: longer than {MAX_LINE_LEN} bytes")]
    LineTooLong { line: usize },
    #[error("line {line}: not UTF-8 text")]
    NotUtf8 { line: usize },
    #[error("line {line}: expected key=value")]
    NoEquals { line: usize },
    #[error("line {line}: unknown key {key:?}")]
    UnknownKey { line: usize, key: String },
    #[error("line {line}: device key {key} after the first public_key")]
    DeviceKeyInPeer { line: usize, key: &'static str },
    #[error("line {line}: peer key {key} before any public_key")]
    PeerKeyOutsidePeer { line: usize, key: &'static str },
    #[error("line {line}: {key}: {reason}")]
    BadValue {
        line: usize,
        key: &'static str,
        reason: String,
    },
}

impl ParseError {
    /// The positive errno a set reports for this error (negated on the wire).
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }

    /// The body line the error is about.
    pub fn line(&self) -> usize {
        match self {
            ParseError::LineTooLong { line }
            | ParseError::NotUtf8 { line }
            | ParseError::NoEquals { line }
            | ParseError::UnknownKey { line, .. }
            | ParseError::DeviceKeyInPeer { line, .. }
            | ParseError::PeerKeyOutsidePeer { line, .. }
            | ParseError::BadValue { line, .. } => *line,
        }
    }
}

/// Parses the whole body of a set (the text after `set=1\n`, up to but not including the
/// terminating blank line). A final line without `\n` is accepted, as `wg` may end a set
/// with EOF. Convenient for tests and fuzzing; the server feeds [`SetParser`] directly.
pub fn parse_set(body: &str) -> Result<DeviceUpdate, ParseError> {
    let mut parser = SetParser::new();
    let body = body.strip_suffix('\n').unwrap_or(body);
    if !body.is_empty() {
        for line in body.split('\n') {
            if line.len() > MAX_LINE_LEN {
                parser.line_too_long();
            } else {
                parser.feed(line.as_bytes());
            }
        }
    }
    parser.finish()
}

/// Incremental parser of one set operation: feed each body line (without `\n`), then
/// [`SetParser::finish`]. After the first error the remaining lines are only counted, so the
/// caller can drain the operation without buffering it.
#[derive(Debug, Default)]
pub struct SetParser {
    update: DeviceUpdate,
    lines: usize,
    error: Option<ParseError>,
}

/// The keys of the device section.
const DEVICE_KEYS: [&str; 4] = ["private_key", "listen_port", "fwmark", "replace_peers"];
/// The keys of a peer block (besides `public_key`, which opens one).
const PEER_KEYS: [&str; 8] = [
    "remove",
    "update_only",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
];

impl SetParser {
    pub fn new() -> SetParser {
        SetParser::default()
    }

    /// Takes one body line, without its `\n`.
    pub fn feed(&mut self, raw: &[u8]) {
        self.lines += 1;
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.apply_line(raw) {
            self.fail(e);
        }
    }

    /// Records that the next line was longer than [`MAX_LINE_LEN`] (the caller discarded it).
    pub fn line_too_long(&mut self) {
        self.lines += 1;
        if self.error.is_none() {
            self.fail(ParseError::LineTooLong { line: self.lines });
        }
    }

    /// The complete update, or the first error.
    pub fn finish(self) -> Result<DeviceUpdate, ParseError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.update),
        }
    }

    fn fail(&mut self, e: ParseError) {
        self.error = Some(e);
        // A refused set is discarded whole; free what it built so far.
        self.update = DeviceUpdate::default();
    }

    fn apply_line(&mut self, raw: &[u8]) -> Result<(), ParseError> {
        let line = self.lines;
        let text = std::str::from_utf8(raw).map_err(|_| ParseError::NotUtf8 { line })?;
        let (key, value) = text.split_once('=').ok_or(ParseError::NoEquals { line })?;

        if key == "public_key" {
            let public_key = parse_key(line, "public_key", value)?;
            self.update.peers.push(PeerUpdate::new(public_key));
            return Ok(());
        }
        match self.update.peers.last_mut() {
            None => self.apply_device_key(line, key, value),
            Some(peer) => {
                if let Some(&known) = DEVICE_KEYS.iter().find(|k| **k == key) {
                    return Err(ParseError::DeviceKeyInPeer { line, key: known });
                }
                apply_peer_key(peer, line, key, value)
            }
        }
    }

    fn apply_device_key(&mut self, line: usize, key: &str, value: &str) -> Result<(), ParseError> {
        let update = &mut self.update;
        match key {
            "private_key" => {
                let k = parse_key(line, "private_key", value)?;
                update.private_key = Some(non_zero(k));
            }
            "listen_port" => update.listen_port = Some(parse_decimal(line, "listen_port", value)?),
            "fwmark" => update.fwmark = Some(parse_decimal(line, "fwmark", value)?),
            "replace_peers" => update.replace_peers = parse_true(line, "replace_peers", value)?,
            _ => {
                if let Some(&known) = PEER_KEYS.iter().find(|k| **k == key) {
                    return Err(ParseError::PeerKeyOutsidePeer { line, key: known });
                }
                return Err(unknown_key(line, key));
            }
        }
        Ok(())
    }
}

fn apply_peer_key(
    peer: &mut PeerUpdate,
    line: usize,
    key: &str,
    value: &str,
) -> Result<(), ParseError> {
    match key {
        "remove" => peer.remove = parse_true(line, "remove", value)?,
        "update_only" => peer.update_only = parse_true(line, "update_only", value)?,
        "preshared_key" => {
            let k = parse_key(line, "preshared_key", value)?;
            peer.preshared_key = Some(non_zero(k));
        }
        "endpoint" => {
            let endpoint = parse_endpoint(value).map_err(|reason| ParseError::BadValue {
                line,
                key: "endpoint",
                reason,
            })?;
            peer.endpoint = Some(endpoint);
        }
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive =
                Some(parse_decimal(line, "persistent_keepalive_interval", value)?);
        }
        "replace_allowed_ips" => {
            peer.replace_allowed_ips = parse_true(line, "replace_allowed_ips", value)?;
        }
        "allowed_ip" => {
            let bad = |reason| ParseError::BadValue {
                line,
                key: "allowed_ip",
                reason,
            };
            let change = match value.strip_prefix('-') {
                Some(rest) => AllowedIpChange::Remove(parse_prefix(rest).map_err(bad)?),
                None => AllowedIpChange::Add(parse_prefix(value).map_err(bad)?),
            };
            peer.allowed_ips.push(change);
        }
        "protocol_version" => {
            if value != "1" {
                return Err(ParseError::BadValue {
                    line,
                    key: "protocol_version",
                    reason: "only protocol version 1 exists".into(),
                });
            }
        }
        _ => return Err(unknown_key(line, key)),
    }
    Ok(())
}

fn unknown_key(line: usize, key: &str) -> ParseError {
    // Quote a bounded, char-aligned prefix: the key is attacker text of up to 4 KiB.
    let mut end = key.len().min(QUOTED_KEY_MAX);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    ParseError::UnknownKey {
        line,
        key: key[..end].to_string(),
    }
}

/// All zeros means "remove" for private and preshared keys.
fn non_zero(k: Key) -> Option<Key> {
    if k.is_zero() {
        None
    } else {
        Some(k)
    }
}

fn parse_key(line: usize, key: &'static str, value: &str) -> Result<Key, ParseError> {
    Key::from_hex(value).map_err(|e| ParseError::BadValue {
        line,
        key,
        reason: e.to_string(),
    })
}

/// Booleans are exactly `true`: `false` or anything else is refused, as wireguard-go does.
fn parse_true(line: usize, key: &'static str, value: &str) -> Result<bool, ParseError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(ParseError::BadValue {
            line,
            key,
            reason: "the only accepted value is \"true\"".into(),
        })
    }
}

/// Plain decimal digits only: Rust's integer parsing would also take a leading `+`.
fn decimal<T: FromStr>(text: &str) -> Result<T, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a decimal number".into());
    }
    text.parse::<T>().map_err(|_| "number out of range".into())
}

fn parse_decimal<T: FromStr>(line: usize, key: &'static str, value: &str) -> Result<T, ParseError> {
    decimal(value).map_err(|reason| ParseError::BadValue { line, key, reason })
}

/// `IPv4:port`, `[IPv6]:port` or `[IPv6%scope]:port`, where the scope is an interface index
/// or name (`wg` formats link-local endpoints with `getnameinfo`, which writes the name).
/// Host names are refused: `wg` resolves them before sending.
pub(crate) fn parse_endpoint(value: &str) -> Result<SocketAddr, String> {
    if let Some(rest) = value.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| "expected [IPv6]:port".to_string())?;
        let (addr, scope) = match host.split_once('%') {
            Some((addr, scope)) => (addr, Some(scope)),
            None => (host, None),
        };
        let ip = Ipv6Addr::from_str(addr).map_err(|_| "not an IPv6 address".to_string())?;
        let port = decimal::<u16>(port)?;
        let scope_id = match scope {
            None => 0,
            Some(scope) => scope_id(scope)?,
        };
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope_id)))
    } else {
        let (host, port) = value
            .rsplit_once(':')
            .ok_or_else(|| "expected IPv4:port or [IPv6]:port".to_string())?;
        let ip = Ipv4Addr::from_str(host)
            .map_err(|_| "not an IPv4 address (IPv6 goes in brackets)".to_string())?;
        let port = decimal::<u16>(port)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
    }
}

fn scope_id(scope: &str) -> Result<u32, String> {
    if scope.is_empty() {
        return Err("empty IPv6 scope".into());
    }
    if scope.bytes().all(|b| b.is_ascii_digit()) {
        return decimal::<u32>(scope);
    }
    let name = CString::new(scope).map_err(|_| "bad IPv6 scope".to_string())?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err("IPv6 scope names no interface".into());
    }
    Ok(index)
}

/// `IP/length`, the length required (as `wg` always sends it). Host bits are cleared so a
/// later `allowed_ip=-…` matches what was added.
fn parse_prefix(value: &str) -> Result<IpNet, String> {
    let (addr, len) = value
        .split_once('/')
        .ok_or_else(|| "expected IP/prefix-length".to_string())?;
    let ip = IpAddr::from_str(addr).map_err(|_| "not an IP address".to_string())?;
    let len = decimal::<u8>(len)?;
    let net = IpNet::new(ip, len).map_err(|_| "prefix length too long".to_string())?;
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key([byte; 32])
    }

    fn hex(byte: u8) -> String {
        key(byte).to_hex()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn err(body: &str) -> ParseError {
        parse_set(body).unwrap_err()
    }

    #[test]
    fn empty_set_changes_nothing() {
        assert_eq!(parse_set("").unwrap(), DeviceUpdate::default());
    }

    #[test]
    fn device_keys() {
        let u = parse_set(&format!(
            "private_key={}\nlisten_port=51820\nfwmark=4294967295\nreplace_peers=true\n",
            hex(7)
        ))
        .unwrap();
        assert_eq!(u.private_key, Some(Some(key(7))));
        assert_eq!(u.listen_port, Some(51820));
        assert_eq!(u.fwmark, Some(u32::MAX));
        assert!(u.replace_peers);
        assert!(u.peers.is_empty());
    }

    #[test]
    fn zero_keys_remove() {
        let u = parse_set(&format!(
            "private_key={z}\npublic_key={}\npreshared_key={z}\n",
            hex(1),
            z = hex(0)
        ))
        .unwrap();
        assert_eq!(u.private_key, Some(None));
        assert_eq!(u.peers[0].preshared_key, Some(None));
    }

    #[test]
    fn zero_port_and_mark_are_values() {
        let u = parse_set("listen_port=0\nfwmark=0").unwrap();
        assert_eq!(u.listen_port, Some(0));
        assert_eq!(u.fwmark, Some(0));
    }

    #[test]
    fn uppercase_hex_keys_are_accepted() {
        let u = parse_set(&format!("private_key={}", hex(0xab).to_uppercase())).unwrap();
        assert_eq!(u.private_key, Some(Some(key(0xab))));
    }

    #[test]
    fn every_peer_key() {
        let body = format!(
            "public_key={}\nupdate_only=true\nremove=true\npreshared_key={}\n\
             endpoint=198.18.0.2:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=198.18.1.0/24\nallowed_ip=-fd00::/64\n\
             protocol_version=1\n",
            hex(1),
            hex(2)
        );
        let u = parse_set(&body).unwrap();
        assert_eq!(u.peers.len(), 1);
        let p = &u.peers[0];
        assert_eq!(p.public_key, key(1));
        assert!(p.update_only);
        assert!(p.remove);
        assert_eq!(p.preshared_key, Some(Some(key(2))));
        assert_eq!(p.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(
            p.allowed_ips,
            vec![
                AllowedIpChange::Add(net("198.18.1.0/24")),
                AllowedIpChange::Remove(net("fd00::/64"))
            ]
        );
    }

    #[test]
    fn peer_keys_apply_to_the_latest_peer() {
        let body = format!(
            "public_key={}\nallowed_ip=198.18.1.0/24\npublic_key={}\nallowed_ip=198.18.2.0/24\n",
            hex(1),
            hex(2)
        );
        let u = parse_set(&body).unwrap();
        assert_eq!(u.peers.len(), 2);
        assert_eq!(u.peers[0].public_key, key(1));
        assert_eq!(
            u.peers[0].allowed_ips,
            vec![AllowedIpChange::Add(net("198.18.1.0/24"))]
        );
        assert_eq!(u.peers[1].public_key, key(2));
        assert_eq!(
            u.peers[1].allowed_ips,
            vec![AllowedIpChange::Add(net("198.18.2.0/24"))]
        );
        // A bare public_key names the peer and changes nothing.
        assert_eq!(u.peers[1].endpoint, None);
        assert!(!u.peers[1].replace_allowed_ips);
    }

    #[test]
    fn allowed_ip_host_bits_are_cleared() {
        let u = parse_set(&format!(
            "public_key={}\nallowed_ip=198.18.1.77/24\nallowed_ip=fd00::1/128\nallowed_ip=0.0.0.0/0",
            hex(1)
        ))
        .unwrap();
        assert_eq!(
            u.peers[0].allowed_ips,
            vec![
                AllowedIpChange::Add(net("198.18.1.0/24")),
                AllowedIpChange::Add(net("fd00::1/128")),
                AllowedIpChange::Add(net("0.0.0.0/0")),
            ]
        );
    }

    #[test]
    fn endpoints() {
        let ok = [
            ("198.18.0.1:1", "198.18.0.1:1"),
            ("[fd00::1]:51820", "[fd00::1]:51820"),
            ("[fe80::1%7]:51820", "[fe80::1%7]:51820"),
            ("[::ffff:198.18.0.1]:9", "[::ffff:198.18.0.1]:9"),
            ("198.18.0.1:0", "198.18.0.1:0"),
        ];
        for (text, want) in ok {
            let got = parse_endpoint(text).unwrap();
            assert_eq!(got, want.parse::<SocketAddr>().unwrap(), "{text}");
        }
        // The loopback interface exists in every namespace; getnameinfo writes its name.
        let lo = parse_endpoint("[fe80::1%lo]:5").unwrap();
        match lo {
            SocketAddr::V6(v6) => assert_ne!(v6.scope_id(), 0),
            SocketAddr::V4(_) => panic!("expected IPv6"),
        }
        let bad = [
            "",
            "198.18.0.1",
            "198.18.0.1:",
            "198.18.0.1:+5",
            "198.18.0.1:65536",
            "fd00::1:51820",
            "[fd00::1]51820",
            "[fd00::1:51820",
            "[198.18.0.1]:5",
            "[fe80::1%]:5",
            "[fe80::1%no-such-if0]:5",
            "[fe80::1%4294967296]:5",
            "example.com:51820",
            " 198.18.0.1:5",
        ];
        for text in bad {
            assert!(parse_endpoint(text).is_err(), "{text:?} should be refused");
        }
    }

    #[test]
    fn bad_prefixes() {
        for text in [
            "198.18.0.0",
            "198.18.0.0/33",
            "fd00::/129",
            "198.18.0.0/",
            "198.18.0.0/+8",
            "/8",
            "198.18.0.0/8/8",
            "fe80::%1/64",
            "--198.18.0.0/8",
        ] {
            let body = format!("public_key={}\nallowed_ip={text}", hex(1));
            match err(&body) {
                ParseError::BadValue {
                    line: 2,
                    key: "allowed_ip",
                    ..
                } => {}
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn numbers_are_plain_decimal_in_range() {
        for (body, key) in [
            ("listen_port=65536", "listen_port"),
            ("listen_port=-1", "listen_port"),
            ("listen_port=+1", "listen_port"),
            ("listen_port=", "listen_port"),
            ("listen_port=0x10", "listen_port"),
            ("fwmark=4294967296", "fwmark"),
            ("fwmark= 1", "fwmark"),
        ] {
            match err(body) {
                ParseError::BadValue {
                    line: 1, key: k, ..
                } => assert_eq!(k, key, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let body = format!("public_key={}\npersistent_keepalive_interval=65536", hex(1));
        assert!(matches!(
            err(&body),
            ParseError::BadValue {
                line: 2,
                key: "persistent_keepalive_interval",
                ..
            }
        ));
    }

    #[test]
    fn booleans_are_exactly_true() {
        for value in ["false", "True", "1", "", "true "] {
            assert!(matches!(
                err(&format!("replace_peers={value}")),
                ParseError::BadValue {
                    key: "replace_peers",
                    ..
                }
            ));
            for key in ["remove", "update_only", "replace_allowed_ips"] {
                let body = format!("public_key={}\n{key}={value}", hex(1));
                match err(&body) {
                    ParseError::BadValue {
                        line: 2, key: k, ..
                    } => assert_eq!(k, key),
                    other => panic!("{key}={value}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn protocol_version_must_be_one() {
        for value in ["0", "2", "", "01"] {
            let body = format!("public_key={}\nprotocol_version={value}", hex(1));
            assert!(matches!(
                err(&body),
                ParseError::BadValue {
                    key: "protocol_version",
                    ..
                }
            ));
        }
    }

    #[test]
    fn bad_keys() {
        for value in ["", "00", &"g".repeat(64), &"0".repeat(63), &"0".repeat(65)] {
            for key in ["private_key", "public_key"] {
                match err(&format!("{key}={value}")) {
                    ParseError::BadValue {
                        line: 1, key: k, ..
                    } => assert_eq!(k, key),
                    other => panic!("{other:?}"),
                }
            }
        }
        let body = format!("public_key={}\npreshared_key=xyz", hex(1));
        assert!(matches!(
            err(&body),
            ParseError::BadValue {
                line: 2,
                key: "preshared_key",
                ..
            }
        ));
    }

    #[test]
    fn device_key_after_peer_is_an_error() {
        for key in DEVICE_KEYS {
            let body = format!("public_key={}\n{key}=1", hex(1));
            assert_eq!(
                err(&body),
                ParseError::DeviceKeyInPeer {
                    line: 2,
                    key: DEVICE_KEYS.iter().copied().find(|k| *k == key).unwrap()
                }
            );
        }
    }

    #[test]
    fn peer_key_before_peer_is_an_error() {
        for key in PEER_KEYS {
            assert!(
                matches!(err(&format!("{key}=true")), ParseError::PeerKeyOutsidePeer { line: 1, key: k } if k == key),
                "{key}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_shapes() {
        assert_eq!(
            err("listen_port=1\nfoo=bar"),
            ParseError::UnknownKey {
                line: 2,
                key: "foo".into()
            }
        );
        let body = format!("public_key={}\nlast_handshake_time_sec=0", hex(1));
        assert_eq!(
            err(&body),
            ParseError::UnknownKey {
                line: 2,
                key: "last_handshake_time_sec".into()
            }
        );
        assert_eq!(err("listen_port"), ParseError::NoEquals { line: 1 });
        // A blank line inside a body is not key=value (the server ends a body there).
        assert_eq!(err("listen_port=1\n\n"), ParseError::NoEquals { line: 2 });
        // Keys are case sensitive and have no surrounding spaces.
        assert!(matches!(
            err("Listen_port=1"),
            ParseError::UnknownKey { .. }
        ));
        assert!(matches!(
            err("listen_port =1"),
            ParseError::UnknownKey { .. }
        ));
        // Long unknown keys are quoted only in part.
        match err(&format!("{}=1", "é".repeat(1000))) {
            ParseError::UnknownKey { key, .. } => assert!(key.len() <= QUOTED_KEY_MAX),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_utf8_is_an_error() {
        let mut p = SetParser::new();
        p.feed(b"listen_port=1");
        p.feed(b"fwmark=\xff");
        assert_eq!(p.finish(), Err(ParseError::NotUtf8 { line: 2 }));
    }

    #[test]
    fn too_long_line_is_an_error() {
        let body = format!("listen_port=1\nfwmark={}", "1".repeat(MAX_LINE_LEN));
        assert_eq!(err(&body), ParseError::LineTooLong { line: 2 });
        // Exactly the limit is still a line (here: a number out of range, not "too long").
        let body = format!("fwmark={}", "1".repeat(MAX_LINE_LEN - "fwmark=".len()));
        assert!(matches!(err(&body), ParseError::BadValue { .. }));
    }

    #[test]
    fn first_error_wins_and_later_lines_are_counted() {
        let mut p = SetParser::new();
        p.feed(b"listen_port=1");
        p.feed(b"bogus=1");
        p.feed(b"also_bogus");
        p.line_too_long();
        let e = p.finish().unwrap_err();
        assert_eq!(e.line(), 2);
        assert_eq!(e.errno(), libc::EINVAL);
    }

    #[test]
    fn a_bad_line_after_good_ones_is_refused_at_that_line() {
        let p = hex(1);
        let cases = [
            (
                "listen_port=4000\nno_such_key=1".to_string(),
                2,
                "no_such_key",
            ),
            (
                format!("public_key={p}\nallowed_ip=198.19.3.0/24\nbogus=true"),
                3,
                "bogus",
            ),
            (
                format!("private_key={}\nreplace_peers=true\nfwmark=nope", hex(2)),
                3,
                "fwmark",
            ),
            ("listen_port=70000".to_string(), 1, "listen_port"),
            ("public_key=not-a-key".to_string(), 1, "public_key"),
            (
                format!("public_key={p}\nreplace_allowed_ips=true\nallowed_ip=198.19.9.0/33"),
                3,
                "allowed_ip",
            ),
            (
                format!("public_key={p}\nendpoint=198.18.0.2"),
                2,
                "endpoint",
            ),
            (
                format!("public_key={p}\npersistent_keepalive_interval=-1"),
                2,
                "persistent_keepalive_interval",
            ),
            ("replace_peers=yes".to_string(), 1, "replace_peers"),
            ("allowed_ip=198.19.2.0/24".to_string(), 1, "allowed_ip"),
        ];
        for (body, line, key) in cases {
            let e = err(&body);
            let named = match &e {
                ParseError::UnknownKey { key, .. } => key.as_str(),
                ParseError::BadValue { key, .. } | ParseError::PeerKeyOutsidePeer { key, .. } => {
                    key
                }
                other => panic!("{body:?}: {other:?}"),
            };
            assert_eq!((e.line(), named), (line, key), "{body:?}: {e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }

    #[test]
    fn errors_never_echo_values() {
        let secret = "ab".repeat(31) + "zz";
        let msg = err(&format!("private_key={secret}")).to_string();
        assert!(!msg.contains("abab"), "{msg}");
        assert!(
            msg.contains("line 1") && msg.contains("private_key"),
            "{msg}"
        );
    }

    #[test]
    fn what_wg_set_listen_port_sends() {
        // `wg set IF listen-port 1234`
        let u = parse_set("listen_port=1234\n").unwrap();
        assert_eq!(
            u,
            DeviceUpdate {
                listen_port: Some(1234),
                ..DeviceUpdate::default()
            }
        );
    }

    #[test]
    fn what_wg_set_private_key_dev_null_sends() {
        // `wg set IF private-key /dev/null`
        let u = parse_set(&format!("private_key={}\n", hex(0))).unwrap();
        assert_eq!(u.private_key, Some(None));
    }

    /// The body of a request captured from `wg` (wireguard-tools 1.0.20210914): the text
    /// between `set=1\n` and the final blank line.
    fn captured_body(request: &str) -> &str {
        request
            .strip_prefix("set=1\n")
            .and_then(|r| r.strip_suffix("\n\n"))
            .unwrap()
    }

    /// `wg setconf` of a config with a clamped private key, one peer with a preshared key,
    /// a link-local endpoint (`getnameinfo` writes the scope as the interface name), a
    /// keepalive, and an allowed IP with host bits set.
    const WG_SETCONF: &str = "set=1\nprivate_key=f800000000000000000000000000000000000000000000000000000000000040\nlisten_port=51820\nfwmark=0\nreplace_peers=true\npublic_key=0101010101010101010101010101010101010101010101010101010101010101\npreshared_key=0202020202020202020202020202020202020202020202020202020202020202\nendpoint=[fe80::1%lo]:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=198.19.1.5/24\nallowed_ip=fd00::/64\n\n";
    /// `wg addconf` of the same file: no fwmark, no replace_peers.
    const WG_ADDCONF: &str = "set=1\nprivate_key=f800000000000000000000000000000000000000000000000000000000000040\nlisten_port=51820\npublic_key=0101010101010101010101010101010101010101010101010101010101010101\npreshared_key=0202020202020202020202020202020202020202020202020202020202020202\nendpoint=[fe80::1%lo]:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=198.19.1.5/24\nallowed_ip=fd00::/64\n\n";
    /// `wg set IF peer P allowed-ips '' remove`.
    const WG_SET_REMOVE: &str =
        "set=1\npublic_key=0101010101010101010101010101010101010101010101010101010101010101\nremove=true\n\n";

    fn captured_peer() -> PeerUpdate {
        let mut p = PeerUpdate::new(key(1));
        p.preshared_key = Some(Some(key(2)));
        p.endpoint = Some(parse_endpoint("[fe80::1%lo]:51820").unwrap());
        p.persistent_keepalive = Some(25);
        p.replace_allowed_ips = true;
        p.allowed_ips = vec![
            AllowedIpChange::Add(net("198.19.1.0/24")),
            AllowedIpChange::Add(net("fd00::/64")),
        ];
        p
    }

    fn captured_private_key() -> Key {
        let mut k = [0u8; 32];
        k[0] = 0xf8;
        k[31] = 0x40;
        Key(k)
    }

    #[test]
    fn what_wg_setconf_sends() {
        let u = parse_set(captured_body(WG_SETCONF)).unwrap();
        assert_eq!(
            u,
            DeviceUpdate {
                private_key: Some(Some(captured_private_key())),
                listen_port: Some(51820),
                fwmark: Some(0),
                replace_peers: true,
                peers: vec![captured_peer()],
            }
        );
    }

    #[test]
    fn what_wg_addconf_sends() {
        let u = parse_set(captured_body(WG_ADDCONF)).unwrap();
        assert_eq!(
            u,
            DeviceUpdate {
                private_key: Some(Some(captured_private_key())),
                listen_port: Some(51820),
                fwmark: None,
                replace_peers: false,
                peers: vec![captured_peer()],
            }
        );
    }

    #[test]
    fn what_wg_set_remove_sends() {
        let u = parse_set(captured_body(WG_SET_REMOVE)).unwrap();
        let mut p = PeerUpdate::new(key(1));
        p.remove = true;
        assert_eq!(u.peers, vec![p]);
        assert_eq!(u.private_key, None);
    }

    #[test]
    fn what_wg_set_peer_sends() {
        // `wg set IF peer P allowed-ips ''` clears; `wg set IF peer P remove` removes.
        let u = parse_set(&format!(
            "public_key={}\nreplace_allowed_ips=true\n",
            hex(1)
        ))
        .unwrap();
        assert!(u.peers[0].replace_allowed_ips && u.peers[0].allowed_ips.is_empty());
        let u = parse_set(&format!("public_key={}\nremove=true\n", hex(1))).unwrap();
        assert!(u.peers[0].remove);
        // `wg set IF peer P allowed-ips -198.19.1.0/24` (newer tools).
        let u = parse_set(&format!(
            "public_key={}\nallowed_ip=-198.19.1.0/24\n",
            hex(1)
        ))
        .unwrap();
        assert_eq!(
            u.peers[0].allowed_ips,
            vec![AllowedIpChange::Remove(net("198.19.1.0/24"))]
        );
    }

    #[test]
    fn big_set_is_not_capped() {
        let mut body = format!("replace_peers=true\npublic_key={}\n", hex(1));
        for i in 0..30_000u32 {
            body.push_str(&format!(
                "allowed_ip=198.18.{}.{}/32\n",
                (i >> 8) & 0xff,
                i & 0xff
            ));
        }
        for p in 2..=40u8 {
            body.push_str(&format!(
                "public_key={}\nallowed_ip=fd00::{p:x}/128\n",
                hex(p)
            ));
        }
        let u = parse_set(&body).unwrap();
        assert_eq!(u.peers.len(), 40);
        assert_eq!(u.peers[0].allowed_ips.len(), 30_000);
        assert_eq!(
            u.peers[0].allowed_ips[29_999],
            AllowedIpChange::Add(net("198.18.117.47/32"))
        );
        assert_eq!(
            u.peers[39].allowed_ips,
            vec![AllowedIpChange::Add(net("fd00::28/128"))]
        );
    }
}
