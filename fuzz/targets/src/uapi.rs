//! `uapi`: arbitrary bytes as what a UAPI client writes on one connection.
//!
//! The bytes are cut into operations with the server's line discipline (`\n`-terminated
//! lines, lines over [`MAX_LINE_LEN`] reported as too long, a set body ending at a blank line
//! or at EOF) and run against an [`Engine`] standing in for the device: `get=1` formats the
//! current state, `set=1` feeds every body line to the server's incremental [`SetParser`] and
//! applies the result. The connection-level loop of `uapi/server.rs` is private to that file,
//! so the framing is restated here; the parser, formatter and engine are the real ones.
//!
//! Invariants:
//! - no panic; the incremental parser and [`parse_set`] agree on every body they both accept;
//!   an error names a line of the body and never quotes a key value;
//! - a refused set changes nothing;
//! - an accepted set leaves the engine exactly as a naive model of the UAPI semantics says
//!   (own key ignored, `replace_peers`, `remove`, `update_only`, `replace_allowed_ips`,
//!   prefixes moving to the last peer that claims them, removals only of one's own prefixes);
//! - round trip: the `get` text of the state, fed back as a set to a fresh engine, yields the
//!   same state.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use ipnet::IpNet;
use tailsk8s_dataplane::config::{AllowedIpChange, DeviceSnapshot, DeviceUpdate, PeerSnapshot};
use tailsk8s_dataplane::engine::{Engine, DEFAULT_MTU};
use tailsk8s_dataplane::key::Key;
use tailsk8s_dataplane::uapi::{format_get, parse_set, ParseError, SetParser, MAX_LINE_LEN};

/// One line as the server's reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line<'a> {
    Text(&'a [u8]),
    TooLong,
}

/// Splits like the server's line reader: `\n` ends a line, a last line without `\n` counts,
/// a line longer than [`MAX_LINE_LEN`] is reported as too long.
fn lines(data: &[u8]) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        out.push(if line.len() > MAX_LINE_LEN {
            Line::TooLong
        } else {
            Line::Text(line)
        });
        rest = next;
    }
    out
}

/// The device: the engine plus the two settings that live in the socket driver.
struct Device {
    engine: Engine,
    listen_port: u16,
    fwmark: u32,
    model: Model,
}

impl Device {
    fn new() -> Device {
        Device {
            engine: Engine::new(DEFAULT_MTU, Instant::now()),
            listen_port: 0,
            fwmark: 0,
            model: Model::default(),
        }
    }

    fn snapshot(&self) -> DeviceSnapshot {
        let (private_key, peers) = self
            .engine
            .peer_snapshots(SystemTime::now(), std::time::Instant::now());
        DeviceSnapshot {
            private_key,
            listen_port: self.listen_port,
            fwmark: self.fwmark,
            peers,
        }
    }

    fn set(&mut self, update: &DeviceUpdate) {
        if let Err(e) = self.engine.apply(update) {
            panic!("the engine refused a set the parser accepted: {e}");
        }
        if let Some(port) = update.listen_port {
            self.listen_port = port;
        }
        if let Some(mark) = update.fwmark {
            self.fwmark = mark;
        }
        self.model.apply(update);
        let got = sorted(self.snapshot());
        let want = self.model.snapshot(self.listen_port, self.fwmark);
        assert!(
            got == want,
            "engine state {got:#?}\ndiffers from the model {want:#?}"
        );
    }
}

/// Peers ordered by key, so states compare regardless of slot order.
fn sorted(mut s: DeviceSnapshot) -> DeviceSnapshot {
    s.peers.sort_by_key(|p| p.public_key);
    s
}

/// The UAPI semantics, written the obvious way.
#[derive(Debug, Default)]
struct Model {
    private_key: Option<Key>,
    peers: BTreeMap<Key, ModelPeer>,
    owners: BTreeMap<IpNet, Key>,
}

#[derive(Debug, Default, Clone)]
struct ModelPeer {
    preshared_key: Option<Key>,
    endpoint: Option<SocketAddr>,
    persistent_keepalive: u16,
}

impl Model {
    fn remove_peer(&mut self, key: &Key) {
        self.peers.remove(key);
        self.owners.retain(|_, owner| owner != key);
    }

    fn apply(&mut self, update: &DeviceUpdate) {
        if let Some(key) = update.private_key {
            let key = key.map(Key::clamped);
            if key != self.private_key {
                self.private_key = key;
                if let Some(own) = key.map(|k| k.public_key()) {
                    self.remove_peer(&own);
                }
            }
        }
        if update.replace_peers {
            self.peers.clear();
            self.owners.clear();
        }
        let own = self.private_key.map(|k| k.public_key());
        for p in &update.peers {
            if Some(p.public_key) == own {
                continue;
            }
            if p.remove {
                self.remove_peer(&p.public_key);
                continue;
            }
            let peer = match self.peers.entry(p.public_key) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(_) if p.update_only => continue,
                Entry::Vacant(e) => e.insert(ModelPeer::default()),
            };
            if let Some(psk) = p.preshared_key {
                peer.preshared_key = psk;
            }
            if let Some(e) = p.endpoint {
                peer.endpoint = Some(e);
            }
            if let Some(k) = p.persistent_keepalive {
                peer.persistent_keepalive = k;
            }
            if p.replace_allowed_ips {
                self.owners.retain(|_, owner| *owner != p.public_key);
            }
            for change in &p.allowed_ips {
                match *change {
                    AllowedIpChange::Add(net) => {
                        self.owners.insert(net.trunc(), p.public_key);
                    }
                    AllowedIpChange::Remove(net) => {
                        if self.owners.get(&net.trunc()) == Some(&p.public_key) {
                            self.owners.remove(&net.trunc());
                        }
                    }
                }
            }
        }
    }

    fn snapshot(&self, listen_port: u16, fwmark: u32) -> DeviceSnapshot {
        let peers = self
            .peers
            .iter()
            .map(|(key, p)| PeerSnapshot {
                public_key: *key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                rx_packets: 0,
                tx_packets: 0,
                handshake_initiations: 0,
                drops: Default::default(),
                persistent_keepalive: p.persistent_keepalive,
                // BTreeMap order is IpNet's order, which is the engine's documented order.
                allowed_ips: self
                    .owners
                    .iter()
                    .filter(|(_, owner)| *owner == key)
                    .map(|(net, _)| *net)
                    .collect(),
            })
            .collect();
        DeviceSnapshot {
            private_key: self.private_key,
            listen_port,
            fwmark,
            peers,
        }
    }
}

/// Runs one set body (the lines after `set=1`), as the server does.
fn set(device: &mut Device, body: &[Line<'_>]) {
    let mut parser = SetParser::new();
    for line in body {
        match line {
            Line::Text(raw) => parser.feed(raw),
            Line::TooLong => parser.line_too_long(),
        }
    }
    let result = parser.finish();
    check_against_parse_set(body, &result);
    match result {
        Ok(update) => {
            device.set(&update);
            round_trip(device);
        }
        Err(e) => {
            check_error(body, &e);
            // Refused: nothing applied, so the engine still matches the unchanged model.
            let got = sorted(device.snapshot());
            let want = device.model.snapshot(device.listen_port, device.fwmark);
            assert!(got == want, "a refused set changed the device");
        }
    }
}

/// The whole-body parser must agree with the incremental one whenever it can see the same
/// text (UTF-8, no overlong line).
fn check_against_parse_set(body: &[Line<'_>], incremental: &Result<DeviceUpdate, ParseError>) {
    let mut text = String::new();
    for line in body {
        let Line::Text(raw) = line else { return };
        let Ok(s) = std::str::from_utf8(raw) else {
            return;
        };
        text.push_str(s);
        text.push('\n');
    }
    let whole = parse_set(&text);
    assert_eq!(&whole, incremental, "parse_set and SetParser disagree");
}

fn check_error(body: &[Line<'_>], e: &ParseError) {
    assert!(
        (1..=body.len()).contains(&e.line()),
        "error on line {} of a {}-line body",
        e.line(),
        body.len()
    );
    // The line the error is about must not have its key material quoted: no run of 16 or
    // more hex digits from a private or preshared key value may appear in the message.
    let message = e.to_string();
    let Some(Line::Text(raw)) = body.get(e.line() - 1) else {
        return;
    };
    let Some((key, value)) = std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.split_once('='))
    else {
        return;
    };
    if key == "private_key" || key == "preshared_key" {
        for run in value.split(|c: char| !c.is_ascii_hexdigit()) {
            assert!(
                run.len() < 16 || !message.contains(run),
                "an error message quotes {key} material"
            );
        }
    }
}

/// `get`, turned back into a `set` for a fresh device, must reproduce the state.
fn round_trip(device: &Device) {
    let before = device.snapshot();
    let mut text = String::new();
    format_get(&before, &mut text);
    let Some(body) = text.strip_suffix("errno=0\n\n") else {
        panic!("get reply does not end with errno=0 and a blank line: {text:?}");
    };
    let mut set_text = String::from("replace_peers=true\n");
    for line in body.lines() {
        let Some((key, _)) = line.split_once('=') else {
            panic!("get reply line without '=': {line:?}");
        };
        match key {
            // Read-only counters and times: a set does not take them.
            "last_handshake_time_sec" | "last_handshake_time_nsec" | "tx_bytes" | "rx_bytes" => {}
            "public_key" => {
                set_text.push_str(line);
                set_text.push_str("\nreplace_allowed_ips=true\n");
            }
            _ => {
                set_text.push_str(line);
                set_text.push('\n');
            }
        }
    }
    let update = match parse_set(&set_text) {
        Ok(update) => update,
        Err(e) => panic!("the get reply does not parse back as a set: {e}\n{set_text}"),
    };
    let mut fresh = Device::new();
    fresh.set(&update);
    assert!(
        sorted(fresh.snapshot()) == sorted(before),
        "get → set round trip changed the configuration"
    );
}

/// The target body.
pub fn run(data: &[u8]) {
    let lines = lines(data);
    let mut device = Device::new();
    let mut rest = lines.as_slice();
    while let Some((op, tail)) = rest.split_first() {
        rest = tail;
        match op {
            Line::Text(b"get=1") => {
                let mut reply = String::new();
                format_get(&device.snapshot(), &mut reply);
                assert!(reply.ends_with("errno=0\n\n"));
                // The server wants the blank line after get=1; anything else ends the
                // connection.
                match rest.split_first() {
                    Some((Line::Text(b""), tail)) => rest = tail,
                    _ => return,
                }
            }
            Line::Text(b"set=1") => {
                let end = rest
                    .iter()
                    .position(|l| *l == Line::Text(b""))
                    .unwrap_or(rest.len());
                set(&mut device, &rest[..end]);
                rest = rest.get(end + 1..).unwrap_or_default();
            }
            // Unknown operation: the server closes the connection.
            _ => return,
        }
    }
}

/// Seeds: the sets `wg` sends, the gets it asks, and a few refusals.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let private = crate::support::fixed_private_key(1).to_hex();
    let peer_a = crate::support::fixed_private_key(2).public_key().to_hex();
    let peer_b = crate::support::fixed_private_key(3).public_key().to_hex();
    let psk = Key([7; 32]).to_hex();
    let zero = Key::ZERO.to_hex();
    let setconf = format!(
        "set=1\nprivate_key={private}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
         public_key={peer_a}\npreshared_key={psk}\nprotocol_version=1\nreplace_allowed_ips=true\n\
         endpoint=198.18.0.2:51820\npersistent_keepalive_interval=25\n\
         allowed_ip=198.19.2.0/24\nallowed_ip=fd00:19:2::/64\n\
         public_key={peer_b}\nendpoint=[fd00:18::3%1]:51820\nallowed_ip=198.19.2.128/25\n\
         allowed_ip=198.19.3.1/24\n\nget=1\n\n"
    );
    let edit = format!(
        "set=1\npublic_key={peer_a}\nallowed_ip=198.19.2.0/24\n\n\
         set=1\npublic_key={peer_b}\nallowed_ip=-198.19.2.0/24\npreshared_key={zero}\n\
         public_key={peer_a}\nupdate_only=true\nendpoint=198.18.0.9:1\n\
         public_key={peer_b}\nremove=true\n\nget=1\n\n"
    );
    let own_key = {
        let own = crate::support::fixed_private_key(1).public_key().to_hex();
        format!("set=1\nprivate_key={private}\npublic_key={own}\nallowed_ip=0.0.0.0/0\n\nget=1\n\n")
    };
    let refused = format!(
        "set=1\npublic_key={peer_a}\nallowed_ip=198.19.2.0/33\n\n\
         set=1\nlisten_port=+1\n\nset=1\nprivate_key={}\n\n\
         set=1\npublic_key={peer_a}\nlisten_port=1\n\nget=1\n\n",
        &private[..63]
    );
    vec![
        ("setconf", setconf.into_bytes()),
        ("edit", edit.into_bytes()),
        ("own-key", own_key.into_bytes()),
        ("refused", refused.into_bytes()),
        ("get", b"get=1\n\n".to_vec()),
        ("not-utf8", b"set=1\npublic_key=\xff\xfe\n\n".to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_the_server_reader() {
        let long = vec![b'a'; MAX_LINE_LEN + 1];
        let mut data = b"a\n\nb".to_vec();
        data.push(b'\n');
        data.extend_from_slice(&long);
        assert_eq!(
            lines(&data),
            vec![
                Line::Text(b"a"),
                Line::Text(b""),
                Line::Text(b"b"),
                Line::TooLong
            ]
        );
    }

    #[test]
    fn the_setconf_seed_configures_two_peers() {
        let seed = seeds()
            .into_iter()
            .find(|(n, _)| *n == "setconf")
            .map(|(_, s)| s)
            .unwrap_or_default();
        let lines = lines(&seed);
        let end = lines
            .iter()
            .skip(1)
            .position(|l| *l == Line::Text(b""))
            .unwrap_or(0)
            + 1;
        let mut device = Device::new();
        set(&mut device, &lines[1..end]);
        let snapshot = device.snapshot();
        assert_eq!(snapshot.peers.len(), 2);
        assert_eq!(snapshot.listen_port, 51820);
        let prefixes: usize = snapshot.peers.iter().map(|p| p.allowed_ips.len()).sum();
        assert_eq!(prefixes, 4);
    }

    #[test]
    #[should_panic(expected = "differs from the model")]
    fn the_model_catches_a_prefix_that_did_not_move() {
        let mut device = Device::new();
        let peer = crate::support::fixed_private_key(2).public_key();
        let update = parse_set(&format!(
            "public_key={}\nallowed_ip=198.19.2.0/24\n",
            peer.to_hex()
        ))
        .unwrap_or_default();
        device.set(&update);
        // Tamper with the model: it now believes the prefix belongs to nobody.
        device.model.owners.clear();
        device.set(&DeviceUpdate::default());
    }
}
