//! Drops per peer: a drop that concerns a peer counts against it as well as device-wide; one
//! that concerns none (no route, a sender not yet known) counts device-wide only. The
//! device's totals stay the sum over every drop.

use super::{handshake_in, initiation, initiator, node, pair, ping_v4};
use crate::engine::messages;
use crate::engine::Transmit;
use crate::key::Key;
use crate::peer::Endpoint;
use crate::stats::{DropReason, DropTotals};
use crate::testing::{pump, Node};

fn drops_of(node: &Node, peer: &Key) -> DropTotals {
    node.peer(peer).drops
}

/// The device's drops for `reason` that no peer's counters hold.
fn unattributed(node: &Node, reason: DropReason) -> u64 {
    let peers: u64 = node.peers().iter().map(|p| p.drops.get(reason)).sum();
    node.drops(reason)
        .checked_sub(peers)
        .expect("the peers never hold more than the device counted")
}

fn established() -> (Node, Node) {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    (a, b)
}

#[test]
fn a_spoofed_inner_source_counts_against_the_peer_that_sent_it() {
    let (mut a, mut b) = established();
    let c = node("198.18.0.3:51820");
    a.add_node(&c, &["198.19.3.0/24"]);
    // b encrypts for a a packet claiming one of c's addresses.
    let out = b.tun_in(&ping_v4("198.19.3.9", "198.19.1.2", 1, 56));
    assert!(a.net_in(b.addr, &out.sent[0].1).tun.is_empty());
    assert_eq!(a.drops(DropReason::NotAllowed), 1);
    assert_eq!(drops_of(&a, &b.public).get(DropReason::NotAllowed), 1);
    assert_eq!(
        drops_of(&a, &c.public).sum(),
        0,
        "not the claimed address's peer"
    );
    assert_eq!(unattributed(&a, DropReason::NotAllowed), 0);
}

#[test]
fn too_big_counts_against_the_peer_the_packet_was_routed_to() {
    let (mut a, b) = pair();
    let c = node("198.18.0.3:51820");
    a.add_node(&c, &["198.19.3.0/24"]);
    let mut packet = ping_v4("198.19.1.2", "198.19.2.2", 1, 1500);
    packet[6] |= 0x40; // DF
    let out = a.tun_in(&packet);
    assert_eq!(out.tun.len(), 1, "fragmentation needed goes back");
    assert_eq!(a.drops(DropReason::TooBig), 1);
    assert_eq!(drops_of(&a, &b.public).get(DropReason::TooBig), 1);
    assert_eq!(drops_of(&a, &c.public).sum(), 0);
}

#[test]
fn no_route_counts_device_wide_only() {
    let (mut a, b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.77.1", 1, 56));
    assert_eq!(out.tun.len(), 1, "host unreachable goes back");
    assert_eq!(a.drops(DropReason::NoRoute), 1);
    assert_eq!(unattributed(&a, DropReason::NoRoute), 1);
    assert_eq!(drops_of(&a, &b.public).sum(), 0);
}

#[test]
fn a_peer_without_an_endpoint_counts_its_own_drops() {
    let (mut a, b) = pair();
    let d = node("198.18.0.4:51820");
    a.add_peer(d.public, None, &["198.19.4.0/24".parse().unwrap()]);
    assert!(a
        .tun_in(&ping_v4("198.19.1.2", "198.19.4.2", 1, 56))
        .sent
        .is_empty());
    assert_eq!(drops_of(&a, &d.public).get(DropReason::NoEndpoint), 1);
    assert_eq!(drops_of(&a, &b.public).sum(), 0);
    assert_eq!(unattributed(&a, DropReason::NoEndpoint), 0);
}

#[test]
fn data_drops_count_against_the_peer_its_receiver_index_names() {
    let (mut a, mut b) = established();
    let datagram = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 1, 56)).sent[0]
        .1
        .clone();
    assert_eq!(b.net_in(a.addr, &datagram).tun.len(), 1);
    assert!(b.net_in(a.addr, &datagram).tun.is_empty(), "replayed");
    let mut forged = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 2, 56)).sent[0]
        .1
        .clone();
    *forged.last_mut().unwrap() ^= 1; // the AEAD tag
    assert!(b.net_in(a.addr, &forged).tun.is_empty());
    let at_b = drops_of(&b, &a.public);
    assert_eq!(at_b.get(DropReason::Replay), 1);
    assert_eq!(at_b.get(DropReason::DecryptFailed), 1);
    for reason in [DropReason::Replay, DropReason::DecryptFailed] {
        assert_eq!(b.drops(reason), 1);
        assert_eq!(unattributed(&b, reason), 0);
    }
}

#[test]
fn data_before_any_session_counts_as_no_session_against_the_named_peer() {
    let (mut a, b) = pair();
    // a's only peer sits in slot 0: receiver indices 0..=255 name it.
    let mut data = vec![0u8; 64];
    data[0] = messages::MESSAGE_DATA;
    assert!(a.net_in(b.addr, &data).tun.is_empty());
    assert_eq!(drops_of(&a, &b.public).get(DropReason::NoSession), 1);
    assert_eq!(a.drops(DropReason::NoSession), 1);
    // An index naming no peer: device-wide, as unknown_peer.
    data[4..8].copy_from_slice(&(7u32 << 8).to_le_bytes());
    assert!(a.net_in(b.addr, &data).tun.is_empty());
    assert_eq!(unattributed(&a, DropReason::UnknownPeer), 1);
}

#[test]
fn under_load_a_response_counts_against_its_peer_an_initiation_device_wide() {
    let (mut a, mut b) = pair();
    let init = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    let response = b.net_in(a.addr, &init.sent[0].1);
    assert_eq!(response.sent[0].1.len(), messages::RESPONSE_LEN);
    let out = handshake_in(&mut a, b.addr, &response.sent[0].1, true);
    assert_eq!(out.sent[0].1.len(), messages::COOKIE_REPLY_LEN);
    assert_eq!(drops_of(&a, &b.public).get(DropReason::UnderLoad), 1);
    // An initiation names its sender only after the Diffie-Hellman the cookie spares.
    let mut tunn = initiator(&a, &b);
    let out = handshake_in(&mut a, b.addr, &initiation(&mut tunn), true);
    assert_eq!(out.sent[0].1.len(), messages::COOKIE_REPLY_LEN);
    assert_eq!(a.drops(DropReason::UnderLoad), 2);
    assert_eq!(unattributed(&a, DropReason::UnderLoad), 1);
}

/// A sink that keeps, per datagram, the peer it was sent for.
#[derive(Default)]
struct PeerSink(Vec<Option<Key>>);

impl Transmit for PeerSink {
    fn send(&mut self, _: &Endpoint, _: &[u8]) {
        self.0.push(None);
    }

    fn send_for_peer(&mut self, peer: &Key, _: &Endpoint, _: &[u8]) {
        self.0.push(Some(*peer));
    }

    fn write_tun(&mut self, _: &[u8]) {}
}

#[test]
fn the_sink_learns_the_peer_of_every_session_datagram_and_failed_sends_count_against_it() {
    let (mut a, b) = pair();
    let mut sink = PeerSink::default();
    let packet = ping_v4("198.19.1.2", "198.19.2.2", 0, 56);
    let mut buf = packet.clone();
    buf.resize(packet.len() + 16, 0);
    a.tun_packet(&mut buf, packet.len(), &mut sink);
    assert_eq!(sink.0, vec![Some(b.public)], "the initiation is b's");

    // What a driver does when that send fails.
    a.engine
        .count_send_drop(Some(&b.public), DropReason::QueueFull);
    a.engine.count_send_drop(None, DropReason::QueueFull);
    let gone = Key::generate_private().public_key();
    a.engine
        .count_send_drop(Some(&gone), DropReason::SendFailed);
    assert_eq!(a.drops(DropReason::QueueFull), 2);
    assert_eq!(drops_of(&a, &b.public).get(DropReason::QueueFull), 1);
    assert_eq!(unattributed(&a, DropReason::QueueFull), 1);
    assert_eq!(unattributed(&a, DropReason::SendFailed), 1);
}
