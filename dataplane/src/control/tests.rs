//! The update semantics of a device, as `wg` relies on them: keys, the peer set, allowed IPs
//! and the listen port, run through the device's own get/set on the real engine and real
//! listen sockets ([`SocketDevice`]). Sets are written as UAPI text and parsed by the real
//! parser, so each test reads like what `wg` sends.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};

use ipnet::IpNet;

use super::SocketDevice;
use crate::config::{DeviceControl, DeviceSnapshot, PeerSnapshot, SetError};
use crate::key::Key;
use crate::uapi::parse_set;

/// Applies one set body (the lines after `set=1`).
fn set(device: &SocketDevice, body: &str) -> Result<(), SetError> {
    let update = parse_set(body).unwrap_or_else(|e| panic!("{body:?} does not parse: {e}"));
    device.set(update)
}

fn set_ok(device: &SocketDevice, body: &str) {
    set(device, body).unwrap_or_else(|e| panic!("{body:?} failed: {e}"));
}

fn public() -> Key {
    Key::generate_private().public_key()
}

fn peer<'s>(state: &'s DeviceSnapshot, key: &Key) -> &'s PeerSnapshot {
    state
        .peers
        .iter()
        .find(|p| p.public_key == *key)
        .unwrap_or_else(|| panic!("peer {} missing from {state:#?}", key.to_hex()))
}

fn peer_keys(state: &DeviceSnapshot) -> BTreeSet<Key> {
    state.peers.iter().map(|p| p.public_key).collect()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

/// A device with one peer per `(key, allowed IPs)`.
fn with_peers(peers: &[(Key, &[&str])]) -> SocketDevice {
    let device = SocketDevice::new();
    set_ok(
        &device,
        &format!("private_key={}\n", Key::generate_private().to_hex()),
    );
    for (key, ips) in peers {
        let mut body = format!("public_key={}\n", key.to_hex());
        for ip in *ips {
            body.push_str(&format!("allowed_ip={ip}\n"));
        }
        set_ok(&device, &body);
    }
    device
}

// ---- keys ----

#[test]
fn private_keys_are_stored_clamped() {
    let device = SocketDevice::new();
    // `/AAA…A=` in base64: the low three bits set, bit 254 clear.
    let mut unclamped = Key::ZERO;
    unclamped.0[0] = 0xfc;
    set_ok(&device, &format!("private_key={}\n", unclamped.to_hex()));
    let clamped = "f800000000000000000000000000000000000000000000000000000000000040";
    let state = device.get();
    assert_eq!(
        state.private_key.map(|k| k.to_hex()).as_deref(),
        Some(clamped)
    );
    assert_eq!(
        device.engine.public_key(),
        Some(Key::from_hex(clamped).unwrap().public_key())
    );
}

#[test]
fn a_zero_private_key_removes_it_and_keeps_the_peers() {
    let p1 = public();
    let device = with_peers(&[(p1, &["198.19.2.0/24"])]);
    assert!(device.get().private_key.is_some());
    // What `wg set IFNAME private-key /dev/null` sends.
    set_ok(&device, &format!("private_key={}\n", Key::ZERO.to_hex()));
    let state = device.get();
    assert_eq!(state.private_key, None);
    assert_eq!(device.engine.public_key(), None);
    // The kernel keeps peers without a private key; so does wireguard-go.
    assert_eq!(peer_keys(&state), BTreeSet::from([p1]));
}

#[test]
fn taking_a_peers_private_key_removes_that_peer() {
    let k2 = Key::generate_private();
    let p3 = public();
    let device = with_peers(&[
        (k2.public_key(), &["198.19.2.0/24"]),
        (p3, &["198.19.3.0/24"]),
    ]);
    set_ok(&device, &format!("private_key={}\n", k2.to_hex()));
    let state = device.get();
    assert_eq!(state.private_key, Some(k2.clamped()));
    assert_eq!(peer_keys(&state), BTreeSet::from([p3]));
}

#[test]
fn our_own_public_key_as_a_peer_is_ignored_with_its_lines() {
    let private = Key::generate_private();
    let own = private.public_key();
    let device = SocketDevice::new();
    set_ok(&device, &format!("private_key={}\n", private.to_hex()));
    set_ok(
        &device,
        &format!("public_key={}\nallowed_ip=198.19.2.0/24\n", own.to_hex()),
    );
    assert!(device.get().peers.is_empty(), "{:#?}", device.get());
    // The ignored block's lines are ignored with it, not given to the next peer.
    let p2 = public();
    set_ok(
        &device,
        &format!(
            "public_key={}\nallowed_ip=198.19.2.0/24\npublic_key={}\nallowed_ip=198.19.3.0/24\n",
            own.to_hex(),
            p2.to_hex()
        ),
    );
    let state = device.get();
    assert_eq!(peer_keys(&state), BTreeSet::from([p2]));
    assert_eq!(peer(&state, &p2).allowed_ips, nets(&["198.19.3.0/24"]));
}

// ---- the peer set ----

#[test]
fn replace_peers_removes_every_peer_first_and_without_it_peers_are_added() {
    let (p1, p2, p3, p4) = (public(), public(), public(), public());
    let device = with_peers(&[(p1, &["198.19.1.0/24"]), (p2, &["198.19.2.0/24"])]);
    // What `wg setconf` sends.
    set_ok(
        &device,
        &format!(
            "replace_peers=true\npublic_key={}\nreplace_allowed_ips=true\nallowed_ip=198.19.3.0/24\n",
            p3.to_hex()
        ),
    );
    let state = device.get();
    assert_eq!(peer_keys(&state), BTreeSet::from([p3]));
    assert_eq!(peer(&state, &p3).allowed_ips, nets(&["198.19.3.0/24"]));
    // A prefix of a removed peer no longer routes anywhere: it went with its peer.
    assert!(state
        .peers
        .iter()
        .all(|p| !p.allowed_ips.contains(&"198.19.1.0/24".parse().unwrap())));
    // What `wg addconf` sends: no replace_peers.
    set_ok(
        &device,
        &format!("public_key={}\nallowed_ip=198.19.4.0/24\n", p4.to_hex()),
    );
    assert_eq!(peer_keys(&device.get()), BTreeSet::from([p3, p4]));
}

#[test]
fn replace_allowed_ips_replaces_the_list_and_alone_clears_it() {
    let p1 = public();
    let device = with_peers(&[(p1, &["198.19.2.0/24", "fd00:19:2::/64"])]);
    // `wg set … allowed-ips 198.19.5.0/24`
    set_ok(
        &device,
        &format!(
            "public_key={}\nreplace_allowed_ips=true\nallowed_ip=198.19.5.0/24\n",
            p1.to_hex()
        ),
    );
    assert_eq!(
        peer(&device.get(), &p1).allowed_ips,
        nets(&["198.19.5.0/24"])
    );
    // `wg set … allowed-ips ""`
    set_ok(
        &device,
        &format!("public_key={}\nreplace_allowed_ips=true\n", p1.to_hex()),
    );
    assert!(peer(&device.get(), &p1).allowed_ips.is_empty());
}

#[test]
fn update_only_changes_existing_peers_and_creates_none() {
    let (p1, p2, p3) = (public(), public(), public());
    let device = with_peers(&[(p1, &["198.19.2.0/24"])]);
    set_ok(
        &device,
        &format!(
            "public_key={}\nupdate_only=true\nendpoint=198.18.0.2:51820\nreplace_allowed_ips=true\nallowed_ip=198.19.5.0/24\n\
             public_key={}\nupdate_only=true\nallowed_ip=198.19.6.0/24\n\
             public_key={}\nallowed_ip=198.19.7.0/24\n",
            p1.to_hex(),
            p2.to_hex(),
            p3.to_hex()
        ),
    );
    let state = device.get();
    // p2 did not exist: untouched means not created; p3 had no update_only.
    assert_eq!(peer_keys(&state), BTreeSet::from([p1, p3]));
    let updated = peer(&state, &p1);
    assert_eq!(updated.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
    assert_eq!(updated.allowed_ips, nets(&["198.19.5.0/24"]));
    assert_eq!(peer(&state, &p3).allowed_ips, nets(&["198.19.7.0/24"]));
}

#[test]
fn remove_deletes_only_that_peer() {
    let (p1, p2) = (public(), public());
    let device = with_peers(&[(p1, &["198.19.1.0/24"]), (p2, &["198.19.2.0/24"])]);
    for (key, endpoint) in [(p1, "198.18.0.2:51820"), (p2, "198.18.0.3:51820")] {
        set_ok(
            &device,
            &format!("public_key={}\nendpoint={endpoint}\n", key.to_hex()),
        );
    }
    let kept = peer(&device.get(), &p2).clone();
    set_ok(
        &device,
        &format!("public_key={}\nremove=true\n", p1.to_hex()),
    );
    assert_eq!(device.get().peers, vec![kept]);
}

// ---- allowed IPs ----

#[test]
fn a_minus_allowed_ip_removes_only_that_entry_of_that_peer() {
    let (p1, p2) = (public(), public());
    let device = with_peers(&[
        (p1, &["198.19.2.0/24", "198.19.3.0/24", "fd00:19:2::/64"]),
        (p2, &["198.19.9.0/24"]),
    ]);
    set_ok(
        &device,
        &format!(
            "public_key={}\nallowed_ip=-198.19.2.0/24\nallowed_ip=-fd00:19:2::/64\nallowed_ip=-198.19.9.0/24\n",
            p1.to_hex()
        ),
    );
    let state = device.get();
    assert_eq!(peer(&state, &p1).allowed_ips, nets(&["198.19.3.0/24"]));
    // Removing through p1 an entry that belongs to p2 does not take it from p2.
    assert_eq!(peer(&state, &p2).allowed_ips, nets(&["198.19.9.0/24"]));
}

#[test]
fn an_allowed_ip_given_to_another_peer_moves_to_it() {
    let (p1, p2) = (public(), public());
    let device = with_peers(&[
        (p1, &["198.19.2.0/24", "198.19.3.0/24"]),
        (p2, &["198.19.2.0/24"]),
    ]);
    let state = device.get();
    assert_eq!(peer(&state, &p1).allowed_ips, nets(&["198.19.3.0/24"]));
    assert_eq!(peer(&state, &p2).allowed_ips, nets(&["198.19.2.0/24"]));
}

#[test]
fn allowed_ips_come_back_sorted_and_normalised() {
    let p1 = public();
    let device = with_peers(&[(
        p1,
        &[
            "fd00:19:2::/64",
            "198.19.3.7/24",
            "198.19.2.0/25",
            "198.19.2.0/24",
        ],
    )]);
    assert_eq!(
        peer(&device.get(), &p1).allowed_ips,
        nets(&[
            "198.19.2.0/24",
            "198.19.2.0/25",
            "198.19.3.0/24",
            "fd00:19:2::/64"
        ])
    );
}

// ---- the listen port ----

/// A UDP port nobody holds right now (IPv4, all addresses), and the socket holding it.
fn held_port() -> (u16, UdpSocket) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    (socket.local_addr().unwrap().port(), socket)
}

/// True when someone holds `port` (IPv4, all addresses).
fn port_taken(port: u16) -> bool {
    match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => true,
        Err(e) => panic!("probing port {port}: {e}"),
    }
}

#[test]
fn a_listen_port_in_use_is_refused_and_the_set_changes_nothing() {
    let p1 = public();
    let device = with_peers(&[(p1, &["198.19.1.0/24"])]);
    let old = device.get().listen_port;
    assert!(port_taken(old), "the device holds its port");
    let (taken, blocker) = held_port();
    let before = device.get();
    // The peer in the same set must not be added: the set failed.
    let err = set(
        &device,
        &format!(
            "listen_port={taken}\npublic_key={}\nallowed_ip=198.19.2.0/24\n",
            public().to_hex()
        ),
    )
    .expect_err("the port is taken");
    assert_eq!(err, SetError::AddressInUse(format!("UDP port {taken}")));
    assert_eq!(err.errno(), libc::EADDRINUSE);
    assert_eq!(device.get(), before, "a failed set changed the device");
    // Still bound to the old port, not merely reporting it.
    assert!(port_taken(old), "the device no longer holds port {old}");

    // Once the port is free the same request succeeds: the error was about the port.
    drop(blocker);
    set_ok(&device, &format!("listen_port={taken}\n"));
    assert_eq!(device.get().listen_port, taken);
    assert!(port_taken(taken));
    assert!(!port_taken(old), "the old port was not released");
}

#[test]
fn listen_port_zero_binds_a_fresh_random_port() {
    let device = SocketDevice::new();
    let first = device.get().listen_port;
    assert_ne!(first, 0);
    set_ok(&device, "listen_port=0\n");
    let second = device.get().listen_port;
    // The old sockets are held while the new ones bind, so the port cannot come back.
    assert_ne!(second, first);
    assert_ne!(second, 0);
    assert!(port_taken(second));
    // Asking for the port already bound keeps it.
    set_ok(&device, &format!("listen_port={second}\n"));
    assert_eq!(device.get().listen_port, second);
}
