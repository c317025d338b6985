//! Two engines wired back to back in memory: every behaviour of the packet path without a
//! socket or a TUN in sight.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use etherparse::PacketBuilder;
use ipnet::IpNet;

use super::*;
use crate::config::{DeviceUpdate, PeerUpdate};
use crate::stats::DropReason;
use crate::testing::{pump, Capture, Node};

mod peer_drops;
mod timer_rules;

/// A node with a fresh key whose time 0 is now.
fn node(addr: &str) -> Node {
    Node::new(Key::generate_private(), addr, Instant::now())
}

fn pair() -> (Node, Node) {
    crate::testing::pair(Instant::now())
}

fn ping_v4(src: &str, dst: &str, seq: u16, payload: usize) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let builder = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).icmpv4_echo_request(7, seq);
    let body = vec![0xab; payload];
    let mut out = Vec::new();
    builder.write(&mut out, &body).unwrap();
    out
}

fn ping_v6(src: &str, dst: &str, seq: u16) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let builder = PacketBuilder::ipv6(src.octets(), dst.octets(), 64).icmpv6_echo_request(7, seq);
    let mut out = Vec::new();
    builder.write(&mut out, &[0x5a; 56]).unwrap();
    out
}

#[test]
fn first_packet_handshakes_then_arrives_intact() {
    let (mut a, mut b) = pair();
    let packet = ping_v4("198.19.1.2", "198.19.2.2", 1, 56);
    let out = a.tun_in(&packet);
    assert_eq!(out.sent.len(), 1, "a handshake initiation goes out");
    assert_eq!(out.sent[0].1.len(), 148);
    assert_eq!(out.sent[0].0.addr, b.addr);
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert_eq!(b_tun, vec![packet], "the queued packet arrives unpadded");

    let v6 = ping_v6("fd00:19:1::2", "fd00:19:2::2", 2);
    let out = a.tun_in(&v6);
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert_eq!(b_tun, vec![v6]);
    assert!(a.peer(&b.public).last_handshake.is_some());
    assert!(b.peer(&a.public).last_handshake.is_some());
}

#[test]
fn transfer_counters_are_wire_exact() {
    // The selftest's numbers: after a handshake and 10 pings of 84 bytes, the initiator has
    // received 92 + 10 × 128 and sent 148 + 10 × 128.
    let (mut a, mut b) = pair();
    for seq in 0..10 {
        let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", seq, 56));
        let (_, b_tun) = pump(&mut a, &mut b, out, true);
        assert_eq!(b_tun.len(), 1);
        let request = &b_tun[0];
        assert_eq!(request.len(), 84);
        let reply = ping_v4("198.19.2.2", "198.19.1.2", seq, 56);
        let out = b.tun_in(&reply);
        let (a_tun, _) = pump(&mut a, &mut b, out, false);
        assert_eq!(a_tun.len(), 1);
    }
    let seen_by_a = a.peer(&b.public);
    assert_eq!(seen_by_a.rx_bytes, 1372);
    assert_eq!(seen_by_a.tx_bytes, 1428);
    let seen_by_b = b.peer(&a.public);
    assert_eq!(seen_by_b.rx_bytes, 1428);
    assert_eq!(seen_by_b.tx_bytes, 1372);
    // Messages: a sent one initiation and 10 requests, and received one response and 10
    // replies; b the mirror image, and b never initiated.
    assert_eq!((seen_by_a.tx_packets, seen_by_a.rx_packets), (11, 11));
    assert_eq!((seen_by_b.tx_packets, seen_by_b.rx_packets), (11, 11));
    assert_eq!(seen_by_a.handshake_initiations, 1);
    assert_eq!(seen_by_b.handshake_initiations, 0);
}

#[test]
fn padding_rounds_plaintext_to_16_but_not_past_the_mtu() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    // 20 + 8 + 13 = 41 bytes → padded to 48 → 80 on the wire.
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 1, 13));
    assert_eq!(out.sent[0].1.len(), 48 + 32);
    // Exactly the MTU: no padding beyond it.
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 2, DEFAULT_MTU - 28));
    assert_eq!(out.sent[0].1.len(), DEFAULT_MTU + 32);
    // 1410 bytes → 1424 would pass the MTU: capped at 1420.
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 3, 1410 - 28));
    assert_eq!(out.sent[0].1.len(), DEFAULT_MTU + 32);
}

#[test]
fn no_route_drops_and_answers_host_unreachable() {
    let (mut a, _b) = pair();
    let packet = ping_v4("198.19.1.2", "198.19.77.1", 1, 56);
    let out = a.tun_in(&packet);
    assert!(out.sent.is_empty(), "nothing leaves without a route");
    assert_eq!(a.drops(DropReason::NoRoute), 1);
    assert_eq!(out.tun.len(), 1, "ICMP host unreachable goes back");
    let icmp = &out.tun[0];
    assert_eq!(
        crate::packet::destination(icmp),
        Some("198.19.1.2".parse().unwrap())
    );
    assert_eq!(icmp[20], 3, "ICMP destination unreachable");
    assert_eq!(icmp[21], 1, "code: host unreachable");
}

#[test]
fn too_big_with_df_answers_fragmentation_needed() {
    let (mut a, _b) = pair();
    let mut packet = ping_v4("198.19.1.2", "198.19.2.2", 1, 1500);
    packet[6] |= 0x40; // DF
                       // Header checksum is stale after setting DF; the engine does not validate it.
    let out = a.tun_in(&packet);
    assert!(out.sent.is_empty());
    assert_eq!(a.drops(DropReason::TooBig), 1);
    assert_eq!(out.tun.len(), 1);
    let icmp = &out.tun[0];
    assert_eq!((icmp[20], icmp[21]), (3, 4));
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), DEFAULT_MTU as u16);

    let v6 = {
        let builder = PacketBuilder::ipv6(
            "fd00:19:1::2".parse::<Ipv6Addr>().unwrap().octets(),
            "fd00:19:2::2".parse::<Ipv6Addr>().unwrap().octets(),
            64,
        )
        .icmpv6_echo_request(1, 1);
        let mut out = Vec::new();
        builder.write(&mut out, &[0u8; 2000]).unwrap();
        out
    };
    let out = a.tun_in(&v6);
    assert_eq!(out.tun.len(), 1, "IPv6 always gets packet too big");
    assert_eq!(out.tun[0][40], 2);
}

#[test]
fn inner_source_must_belong_to_the_sending_peer() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    // b sends a packet claiming a source that a gave to nobody / to another peer.
    let c = node("198.18.0.3:51820");
    a.add_node(&c, &["198.19.3.0/24"]);
    let spoofed = ping_v4("198.19.3.9", "198.19.1.2", 1, 56);
    // b routes 198.19.1.0/24 to a, so it encrypts this for a.
    let out = b.tun_in(&spoofed);
    assert_eq!(out.sent.len(), 1);
    let roamed_from: SocketAddr = "198.18.0.22:4000".parse().unwrap();
    let delivered = a.net_in(roamed_from, &out.sent[0].1);
    assert!(delivered.tun.is_empty(), "spoofed inner source is dropped");
    assert_eq!(a.drops(DropReason::NotAllowed), 1);
    assert_eq!(
        a.peer(&b.public).endpoint,
        Some(roamed_from),
        "an authenticated packet still roams the endpoint"
    );
}

#[test]
fn endpoint_roams_and_replies_leave_from_the_address_used() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    let out = b.tun_in(&ping_v4("198.19.2.2", "198.19.1.2", 1, 56));
    let new_addr: SocketAddr = "[fd00:18::2]:9999".parse().unwrap();
    let mut got = Capture::default();
    a.engine.batch().handle_datagram(
        new_addr,
        Some("fd00:18::1".parse().unwrap()),
        &mut out.sent[0].1.clone(),
        &mut a.scratch,
        &mut got,
    );
    assert_eq!(got.tun.len(), 1);
    assert_eq!(a.peer(&b.public).endpoint, Some(new_addr));
    let reply = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 2, 56));
    assert_eq!(reply.sent[0].0.addr, new_addr);
    assert_eq!(
        reply.sent[0].0.local_ip,
        Some("fd00:18::1".parse().unwrap())
    );
}

#[test]
fn replayed_data_is_delivered_once() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 1, 56));
    let datagram = out.sent[0].1.clone();
    assert_eq!(b.net_in(a.addr, &datagram).tun.len(), 1);
    assert_eq!(b.net_in(a.addr, &datagram).tun.len(), 0);
    assert_eq!(b.drops(DropReason::Replay), 1);
}

/// The replay window is the kernel's: a message up to 8,128 behind the newest is delivered
/// once (boringtun's 1,024 would have dropped those beyond it), one further behind is
/// `replay_too_old`, a second copy is `replay`.
#[test]
fn late_data_inside_the_kernels_window_is_delivered_once() {
    const WINDOW: usize = tailsk8s_noise::replay::WINDOW as usize;
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    let datagrams: Vec<Vec<u8>> = (0..9_200u32)
        .map(|seq| {
            let mut out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", seq as u16, 16));
            out.sent.remove(0).1
        })
        .collect();
    let last = datagrams.len() - 1;
    assert_eq!(b.net_in(a.addr, &datagrams[last]).tun.len(), 1);
    for behind in [1, 1_000, 1_100, WINDOW] {
        assert_eq!(
            b.net_in(a.addr, &datagrams[last - behind]).tun.len(),
            1,
            "{behind} behind: delivered"
        );
    }
    for (behind, reason) in [
        (WINDOW + 1, DropReason::ReplayTooOld),
        (1_100, DropReason::Replay),
        (0, DropReason::Replay),
    ] {
        let before = b.drops(reason);
        assert_eq!(b.net_in(a.addr, &datagrams[last - behind]).tun.len(), 0);
        assert_eq!(b.drops(reason), before + 1, "{behind} behind: {reason:?}");
    }
}

#[test]
fn garbage_datagrams_are_counted_and_change_nothing() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    let before = b.peer(&a.public);
    for junk in [
        &[][..],
        &[1, 0, 0, 0][..],
        &[4, 0, 0, 0, 0, 0, 0, 0][..],
        &[0xff; 148][..],
    ] {
        let out = b.net_in(a.addr, junk);
        assert!(out.sent.is_empty() && out.tun.is_empty());
    }
    let mut forged = vec![0u8; 148];
    forged[0] = 1;
    assert!(b.net_in(a.addr, &forged).sent.is_empty());
    let mut data = vec![0u8; 64];
    data[0] = 4;
    assert!(b
        .net_in("198.18.0.66:1".parse().unwrap(), &data)
        .tun
        .is_empty());
    // The data message names a's receiver index: its drop counts against a, and nothing
    // else about a changed.
    let mut after = b.peer(&a.public);
    assert!(after.drops.sum() > before.drops.sum(), "{after:?}");
    after.drops = before.drops;
    assert_eq!(after, before, "no other state changed");
    assert!(b.drops(DropReason::MalformedDatagram) >= 3);
}

#[test]
fn handshake_from_an_unknown_key_gets_no_answer() {
    let (mut a, _b) = pair();
    let mut stranger = node("198.18.0.9:51820");
    stranger.add_node(&a, &["198.19.1.0/24"]);
    let out = stranger.tun_in(&ping_v4("198.19.9.2", "198.19.1.2", 0, 56));
    let reply = a.net_in(stranger.addr, &out.sent[0].1);
    assert!(reply.sent.is_empty());
    assert_eq!(a.drops(DropReason::UnknownPeer), 1);
}

#[test]
fn low_order_peer_keys_are_accepted_but_never_sent_to() {
    let a = node("198.18.0.1:51820");
    let mut a = a;
    let mut low = PeerUpdate::new(Key::ZERO);
    low.endpoint = Some("198.18.0.5:51820".parse().unwrap());
    low.allowed_ips = vec![AllowedIpChange::Add("198.19.5.0/24".parse().unwrap())];
    low.persistent_keepalive = Some(1);
    a.engine
        .apply(&DeviceUpdate {
            peers: vec![low],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.engine.peer_count(), 1);
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.5.2", 0, 56));
    assert!(out.sent.is_empty());
    assert_eq!(a.drops(DropReason::LowOrderKey), 1);
    let mut timers = Capture::default();
    a.engine.tick(Instant::now(), &mut a.scratch, &mut timers);
    assert!(timers.sent.is_empty(), "no keepalive or handshake either");
}

#[test]
fn own_public_key_as_peer_is_ignored() {
    let a = node("198.18.0.1:51820");
    let mut me = PeerUpdate::new(a.public);
    me.allowed_ips = vec![AllowedIpChange::Add("198.19.1.0/24".parse().unwrap())];
    a.engine
        .apply(&DeviceUpdate {
            peers: vec![me],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.engine.peer_count(), 0);
    // And setting a private key whose public key is a peer's removes that peer.
    let b = node("198.18.0.2:51820");
    a.add_node(&b, &["198.19.2.0/24"]);
    assert_eq!(a.engine.peer_count(), 1);
    a.engine
        .apply(&DeviceUpdate {
            private_key: Some(Some(b.private)),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.engine.peer_count(), 0);
}

#[test]
fn private_key_change_allows_an_immediate_new_handshake() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    let new_key = Key::generate_private();
    a.engine
        .apply(&DeviceUpdate {
            private_key: Some(Some(new_key)),
            ..Default::default()
        })
        .unwrap();
    a.public = new_key.public_key();
    // b learns a's new key (as an operator would with `wg set`).
    b.engine
        .apply(&DeviceUpdate {
            replace_peers: true,
            ..Default::default()
        })
        .unwrap();
    b.add_node(&a, &["198.19.1.0/24"]);
    let packet = ping_v4("198.19.1.2", "198.19.2.2", 1, 56);
    let out = a.tun_in(&packet);
    assert_eq!(out.sent[0].1.len(), 148, "a new handshake starts at once");
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert_eq!(b_tun, vec![packet]);
}

#[test]
fn unchanged_private_key_keeps_sessions() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    a.engine
        .apply(&DeviceUpdate {
            private_key: Some(Some(a.private)),
            ..Default::default()
        })
        .unwrap();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 1, 56));
    assert_eq!(
        out.sent[0].1[0], 4,
        "still a data message, no new handshake"
    );
}

/// The peer a destination routes to.
fn routes_to(node: &Node, addr: &str) -> Option<Key> {
    let config = node.engine.config.read();
    let slot = config.allowed_ips.lookup(addr.parse().unwrap())?;
    config.peer(slot).map(|p| p.public_key)
}

#[test]
fn overlapping_allowed_ips_move_to_the_last_peer_that_claims_them() {
    let (mut a, b) = pair();
    let c = node("198.18.0.3:51820");
    a.add_node(&c, &["198.19.2.128/25"]);
    // The more specific prefix wins for its half.
    assert_eq!(routes_to(&a, "198.19.2.200"), Some(c.public));
    assert_eq!(routes_to(&a, "198.19.2.5"), Some(b.public));
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.200", 0, 56));
    assert_eq!(out.sent[0].0.addr, c.addr);
    // Claiming b's exact prefix moves it to c.
    a.add_node(&c, &["198.19.2.0/24"]);
    assert_eq!(routes_to(&a, "198.19.2.5"), Some(c.public));
    let b_prefixes: Vec<IpNet> = a.peer(&b.public).allowed_ips;
    assert_eq!(b_prefixes, vec!["fd00:19:2::/64".parse::<IpNet>().unwrap()]);
    // Removing a prefix that belongs to someone else leaves it alone.
    let mut not_yours = PeerUpdate::new(b.public);
    not_yours.allowed_ips = vec![AllowedIpChange::Remove("198.19.2.0/24".parse().unwrap())];
    a.engine
        .apply(&DeviceUpdate {
            peers: vec![not_yours],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.peer(&c.public).allowed_ips.len(), 2);
}

#[test]
fn update_only_and_remove() {
    let a = node("198.18.0.1:51820");
    let b = node("198.18.0.2:51820");
    let mut only = PeerUpdate::new(b.public);
    only.update_only = true;
    a.engine
        .apply(&DeviceUpdate {
            peers: vec![only],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.engine.peer_count(), 0, "update_only never creates");
    a.add_node(&b, &["198.19.2.0/24"]);
    let mut remove = PeerUpdate::new(b.public);
    remove.remove = true;
    a.engine
        .apply(&DeviceUpdate {
            peers: vec![remove],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.engine.peer_count(), 0);
    assert_eq!(
        a.engine
            .config
            .read()
            .allowed_ips
            .lookup("198.19.2.1".parse().unwrap()),
        None
    );
}

#[test]
fn persistent_keepalive_switched_on_sends_at_once_and_then_periodically() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    pump(&mut a, &mut b, out, true);
    let mut keepalive = PeerUpdate::new(b.public);
    keepalive.persistent_keepalive = Some(25);
    let send_now = a
        .engine
        .apply(&DeviceUpdate {
            peers: vec![keepalive],
            ..Default::default()
        })
        .unwrap();
    assert!(send_now);
    let start = Instant::now();
    let mut out = Capture::default();
    a.engine.tick(start, &mut a.scratch, &mut out);
    assert_eq!(out.sent.len(), 1);
    assert_eq!(
        out.sent[0].1.len(),
        32,
        "a keepalive is an empty data message"
    );
    let mut out = Capture::default();
    a.engine
        .tick(start + Duration::from_secs(5), &mut a.scratch, &mut out);
    assert!(out.sent.iter().all(|(_, d)| d.len() != 32 || d[0] != 4) || out.sent.is_empty());
    // b answers a's data with its passive keepalive (else a would take the session for
    // dead and handshake again at 15 s).
    let from_b = b.tick(Duration::from_secs(10));
    pump(&mut a, &mut b, from_b, false);
    let mut out = Capture::default();
    a.engine
        .tick(start + Duration::from_secs(26), &mut a.scratch, &mut out);
    assert!(
        out.sent.iter().any(|(_, d)| d.len() == 32),
        "periodic keepalive"
    );
}

/// A handshake message handed to `node` the way the handshake thread does.
fn handshake_in(node: &mut Node, from: SocketAddr, datagram: &[u8], under_load: bool) -> Capture {
    let mut out = Capture::default();
    node.engine.batch().handle_handshake(
        from,
        Some(node.addr.ip()),
        datagram,
        under_load,
        &mut node.scratch,
        &mut out,
    );
    out
}

/// An initiator for `b`'s key towards `a`, outside any engine: makes initiations and takes
/// cookie replies (so its next initiations carry MAC2).
fn initiator(a: &Node, b: &Node) -> Tunn {
    Tunn::new(
        x25519_dalek::StaticSecret::from(b.private.0),
        x25519_dalek::PublicKey::from(a.public.0),
        None,
        None,
        1,
        None,
    )
}

fn initiation(tunn: &mut Tunn) -> Vec<u8> {
    let mut buf = [0u8; 256];
    match tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    }
}

#[test]
fn initiations_under_load_get_cookie_replies_and_no_handshake() {
    let (mut a, b) = pair();
    let mut tunn = initiator(&a, &b);
    // Not loaded: a response to each, at the most a peer gets (one per 20 ms).
    for n in 1..=50 {
        a.tick(Duration::from_millis(20 * n));
        let out = handshake_in(&mut a, b.addr, &initiation(&mut tunn), false);
        assert_eq!(out.sent.len(), 1);
        assert_eq!(out.sent[0].1.len(), messages::RESPONSE_LEN);
    }
    assert_eq!(a.engine.stats().cookie_replies_sent.load(Relaxed), 0);
    // Loaded: every initiation without a cookie gets a cookie reply, and no response.
    for n in 1..=50 {
        let out = handshake_in(&mut a, b.addr, &initiation(&mut tunn), true);
        assert_eq!(out.sent.len(), 1);
        assert_eq!(out.sent[0].1.len(), messages::COOKIE_REPLY_LEN);
        assert_eq!(out.sent[0].0.addr, b.addr);
        assert_eq!(a.drops(DropReason::UnderLoad), n);
    }
    assert_eq!(a.engine.stats().cookie_replies_sent.load(Relaxed), 50);
    // The datagram path never is: it answers with a response.
    a.tick(Duration::from_millis(20 * 51));
    let out = a.net_in(b.addr, &initiation(&mut tunn));
    assert_eq!(out.sent[0].1.len(), messages::RESPONSE_LEN);
}

#[test]
fn under_load_a_cookie_lets_a_source_through_at_its_rate() {
    let (mut a, b) = pair();
    let mut tunn = initiator(&a, &b);
    let init = initiation(&mut tunn);
    let out = handshake_in(&mut a, b.addr, &init, true);
    let mut buf = [0u8; 256];
    // The initiator takes the cookie: its next initiation carries MAC2.
    assert!(matches!(
        tunn.decapsulate(Some(a.addr.ip()), &out.sent[0].1, &mut buf),
        TunnResult::Done
    ));
    let mut responses = 0;
    for n in 1..=20 {
        // As often as a peer may start a handshake (one per 20 ms): faster than its source's
        // rate.
        a.tick(Duration::from_millis(20 * n));
        let init = initiation(&mut tunn);
        let out = handshake_in(&mut a, b.addr, &init, true);
        responses += out
            .sent
            .iter()
            .filter(|(_, d)| d.len() == messages::RESPONSE_LEN)
            .count();
    }
    // A burst, then the source's rate: fewer than every one, more than the burst.
    let responses = responses as u64;
    assert!(
        responses > source_limit::BURST && responses < 20,
        "{responses} responses"
    );
    assert_eq!(a.drops(DropReason::RateLimited), 20 - responses);
    // The cookie is bound to the address it was sent to: from elsewhere, another cookie.
    let elsewhere: SocketAddr = "198.18.0.77:51820".parse().unwrap();
    let out = handshake_in(&mut a, elsewhere, &initiation(&mut tunn), true);
    assert_eq!(out.sent[0].1.len(), messages::COOKIE_REPLY_LEN);
    // Time refills the bucket.
    let mut ticked = Capture::default();
    a.engine.tick(
        a.start + Duration::from_secs(3),
        &mut a.scratch,
        &mut ticked,
    );
    let out = handshake_in(&mut a, b.addr, &initiation(&mut tunn), true);
    assert_eq!(out.sent[0].1.len(), messages::RESPONSE_LEN);
}

#[test]
fn handshake_messages_are_told_apart_from_data_by_type() {
    let (mut a, mut b) = pair();
    let out = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    assert!(messages::is_handshake(&out.sent[0].1), "an initiation");
    let (_, _) = pump(&mut a, &mut b, out, true);
    let data = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 1, 56));
    assert!(!messages::is_handshake(&data.sent[0].1), "data");
    for type_ in [1u8, 2, 3] {
        assert!(messages::is_handshake(&[type_, 0, 0, 0, 9]));
        assert!(
            !messages::is_handshake(&[type_, 0, 0, 1, 9]),
            "reserved bytes"
        );
    }
    assert!(!messages::is_handshake(&[1, 0, 0]));
    assert!(!messages::is_handshake(&[0, 0, 0, 0]));
}

#[test]
fn no_private_key_means_nothing_is_sent() {
    let engine = Engine::new(DEFAULT_MTU, Instant::now());
    let b = node("198.18.0.2:51820");
    let mut peer = PeerUpdate::new(b.public);
    peer.endpoint = Some(b.addr);
    peer.allowed_ips = vec![AllowedIpChange::Add("198.19.2.0/24".parse().unwrap())];
    engine
        .apply(&DeviceUpdate {
            peers: vec![peer],
            ..Default::default()
        })
        .unwrap();
    let packet = ping_v4("198.19.1.2", "198.19.2.2", 0, 56);
    let mut buf = packet.clone();
    buf.resize(packet.len() + 16, 0);
    let mut out = Capture::default();
    let mut scratch = new_scratch();
    engine
        .batch()
        .handle_tun_packet(&mut buf, packet.len(), &mut scratch, &mut out);
    assert!(out.sent.is_empty());
    assert_eq!(engine.stats().dropped(DropReason::NoPrivateKey), 1);
    let _ = IpAddr::from(Ipv4Addr::LOCALHOST);
}

/// The keys of `node`'s peers whose Noise state is built.
fn built_noise_states(node: &Node) -> Vec<Key> {
    let config = node.engine.config.read();
    config
        .peers
        .iter()
        .flatten()
        .filter(|peer| peer.state.lock().noise.is_built())
        .map(|peer| peer.public_key)
        .collect()
}

/// A message of `type_` naming receiver index `slot << 8` (as our initiations carry it),
/// `len` bytes, the rest zero: what anyone can send at a peer's slot without its keys.
fn naming_slot(type_: u8, slot: u32, len: usize) -> Vec<u8> {
    let mut message = vec![0u8; len];
    message[0] = type_;
    let receiver_at = if type_ == messages::MESSAGE_RESPONSE {
        8
    } else {
        4
    };
    message[receiver_at..receiver_at + 4].copy_from_slice(&(slot << 8).to_le_bytes());
    message
}

#[test]
fn a_peer_gets_its_noise_state_on_first_use_and_never_from_a_message_naming_its_slot() {
    let (mut a, mut b) = pair();
    for i in 0..1000u32 {
        let endpoint = SocketAddr::from(([198, 18, 1, (i % 250) as u8], 51820));
        let allowed: IpNet = format!("198.19.{}.{}/32", 100 + i / 250, i % 250)
            .parse()
            .unwrap();
        a.add_peer(
            Key::generate_private().public_key(),
            Some(endpoint),
            &[allowed],
        );
    }
    assert_eq!(a.engine.peer_count(), 1001);
    assert!(built_noise_states(&a).is_empty(), "configuring builds none");
    let mut timers = a.tick(Duration::from_secs(1));
    assert!(timers.sent.is_empty() && built_noise_states(&a).is_empty());

    // Messages that only name a slot are refused as a fresh state refuses them, and build
    // nothing (slot 5 is one of the thousand).
    let stranger: SocketAddr = "198.18.0.66:51820".parse().unwrap();
    let data = naming_slot(messages::MESSAGE_DATA, 5, 64);
    assert!(a.net_in(stranger, &data).tun.is_empty());
    assert_eq!(a.drops(DropReason::NoSession), 1);
    let cookie = naming_slot(
        messages::MESSAGE_COOKIE_REPLY,
        5,
        messages::COOKIE_REPLY_LEN,
    );
    assert!(a.net_in(stranger, &cookie).sent.is_empty());
    assert_eq!(a.drops(DropReason::HandshakeFailed), 1);
    let response = naming_slot(messages::MESSAGE_RESPONSE, 5, messages::RESPONSE_LEN);
    let out = handshake_in(&mut a, stranger, &response, false);
    assert!(out.sent.is_empty());
    assert_eq!(a.drops(DropReason::DecryptFailed), 1, "MAC1 checked first");
    assert!(built_noise_states(&a).is_empty());

    // A packet for b is b's first use on a; b's is a's initiation. No other peer's state.
    let packet = ping_v4("198.19.1.2", "198.19.2.2", 0, 56);
    let out = a.tun_in(&packet);
    assert_eq!(built_noise_states(&a), [b.public]);
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert_eq!(b_tun, vec![packet]);
    assert_eq!(built_noise_states(&b), [a.public]);
    assert_eq!(built_noise_states(&a), [b.public]);

    // A keepalive switched on is a first use: the state is built and a handshake starts.
    let third = Key::generate_private().public_key();
    let mut keepalive = PeerUpdate::new(third);
    keepalive.endpoint = Some("198.18.0.3:51820".parse().unwrap());
    keepalive.persistent_keepalive = Some(25);
    assert!(a.apply(&DeviceUpdate {
        peers: vec![keepalive],
        ..Default::default()
    }));
    timers = a.tick(Duration::from_secs(2));
    assert_eq!(timers.sent.len(), 1);
    assert_eq!(timers.sent[0].1.len(), messages::INITIATION_LEN);
    assert_eq!(built_noise_states(&a), [b.public, third]);

    // A new private key forgets every state (sessions end).
    assert!(!a.apply(&DeviceUpdate {
        private_key: Some(Some(Key::generate_private())),
        ..Default::default()
    }));
    assert!(built_noise_states(&a).is_empty());
}

#[test]
fn a_new_preshared_key_forgets_the_noise_state() {
    let packet = ping_v4("198.19.1.2", "198.19.2.2", 0, 56);
    let (a, b) = crate::testing::established_pair(Instant::now(), &packet);
    let mut unchanged = PeerUpdate::new(b.public);
    unchanged.preshared_key = Some(None);
    a.apply(&DeviceUpdate {
        peers: vec![unchanged],
        ..Default::default()
    });
    assert_eq!(
        built_noise_states(&a),
        [b.public],
        "the same (no) key keeps it"
    );
    let mut psk = PeerUpdate::new(b.public);
    psk.preshared_key = Some(Some(Key::generate_private()));
    a.apply(&DeviceUpdate {
        peers: vec![psk],
        ..Default::default()
    });
    assert!(built_noise_states(&a).is_empty());
}

/// A replayed initiation (the same timestamp) gets no second response, and changes nothing.
#[test]
fn a_replayed_initiation_is_refused() {
    let (mut a, mut b) = pair();
    let init = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    assert!(messages::is_handshake(&init.sent[0].1));
    let first = b.net_in(a.addr, &init.sent[0].1);
    assert_eq!(first.sent[0].1.len(), messages::RESPONSE_LEN);
    b.tick(Duration::from_secs(1));
    let again = b.net_in(a.addr, &init.sent[0].1);
    assert!(again.sent.is_empty(), "no second response");
    assert_eq!(b.drops(DropReason::HandshakeFailed), 1);
    // The session the first one began still completes.
    let (_, b_tun) = pump(&mut a, &mut b, first, false);
    assert_eq!(b_tun.len(), 1, "the queued ping arrives");
}

/// At most one initiation per peer every 20 ms is answered (whitepaper: 50 a second).
#[test]
fn initiations_from_one_peer_are_answered_at_most_every_20_ms() {
    let (mut a, b) = pair();
    let mut tunn = initiator(&a, &b);
    a.tick(Duration::from_millis(100));
    let answered = |out: &Capture| out.sent.len();
    assert_eq!(answered(&a.net_in(b.addr, &initiation(&mut tunn))), 1);
    a.tick(Duration::from_millis(119));
    assert_eq!(answered(&a.net_in(b.addr, &initiation(&mut tunn))), 0);
    assert_eq!(a.drops(DropReason::RateLimited), 1);
    a.tick(Duration::from_millis(120));
    assert_eq!(answered(&a.net_in(b.addr, &initiation(&mut tunn))), 1);
}

/// Our side of cookies: a responder under load answers our initiation with a cookie reply;
/// the retry carries MAC2 under that cookie and gets through.
#[test]
fn a_cookie_reply_lets_our_retried_initiation_through_a_loaded_responder() {
    let (mut a, mut b) = pair();
    let init = a.tun_in(&ping_v4("198.19.1.2", "198.19.2.2", 0, 56));
    let cookie = handshake_in(&mut b, a.addr, &init.sent[0].1, true);
    assert_eq!(cookie.sent[0].1.len(), messages::COOKIE_REPLY_LEN);
    assert!(a.net_in(b.addr, &cookie.sent[0].1).sent.is_empty());
    // The retry, REKEY_TIMEOUT (plus jitter) later.
    let retry = a.tick(Duration::from_secs(6));
    let retry = &retry.sent[0].1;
    assert_eq!(retry.len(), messages::INITIATION_LEN);
    assert_ne!(&retry[retry.len() - 16..], &[0u8; 16], "MAC2 is set");
    b.tick(Duration::from_secs(6));
    let response = handshake_in(&mut b, a.addr, retry, true);
    assert_eq!(response.sent[0].1.len(), messages::RESPONSE_LEN);
    let (_, b_tun) = pump(&mut a, &mut b, response, false);
    assert_eq!(b_tun.len(), 1, "the queued ping arrives");
}

/// Packets of one batch are routed each by its own address (the batch remembers the last
/// lookup): to two peers and nowhere, in turn.
#[test]
fn one_batch_routes_every_packet_by_its_own_destination() {
    let (mut a, b) = pair();
    let c = node("198.18.0.3:51820");
    a.add_node(&c, &["198.19.3.0/24"]);
    let mut out = Capture::default();
    {
        let mut batch = a.engine.batch();
        for dst in [
            "198.19.2.2",
            "198.19.3.2",
            "198.19.2.7",
            "198.19.9.9",
            "198.19.3.2",
        ] {
            let packet = ping_v4("198.19.1.2", dst, 1, 56);
            let mut buf = packet.clone();
            buf.resize(packet.len() + 16, 0);
            batch.handle_tun_packet(&mut buf, packet.len(), &mut a.scratch, &mut out);
        }
    }
    // An initiation to each peer (their second packets wait for the handshake), and an ICMP
    // error for the address no peer carries.
    let to: Vec<_> = out.sent.iter().map(|(e, d)| (e.addr, d.len())).collect();
    assert_eq!(to, vec![(b.addr, 148), (c.addr, 148)]);
    assert_eq!(out.tun.len(), 1, "host unreachable for 198.19.9.9");
    assert_eq!(a.drops(DropReason::NoRoute), 1);
}

/// A datagram's inner source is checked against its own peer's allowed IPs even where the
/// packet before it, in the same batch, passed.
#[test]
fn one_batch_checks_every_inner_source() {
    let first = ping_v4("198.19.1.2", "198.19.2.2", 1, 56);
    let (mut a, mut b) = crate::testing::established_pair(Instant::now(), &first);
    let sources = ["198.19.1.2", "198.19.7.7", "198.19.1.3", "198.19.7.7"];
    let datagrams: Vec<Vec<u8>> = sources
        .iter()
        .map(|src| {
            let out = a.tun_in(&ping_v4(src, "198.19.2.2", 2, 56));
            assert_eq!(out.sent.len(), 1);
            out.sent[0].1.clone()
        })
        .collect();
    let mut out = Capture::default();
    {
        let mut batch = b.engine.batch();
        for d in &datagrams {
            let mut d = d.clone();
            batch.handle_datagram(a.addr, Some(b.addr.ip()), &mut d, &mut b.scratch, &mut out);
        }
    }
    let delivered: Vec<_> = out.tun.iter().map(|p| p[12..16].to_vec()).collect();
    assert_eq!(delivered, vec![vec![198, 19, 1, 2], vec![198, 19, 1, 3]]);
    assert_eq!(b.drops(DropReason::NotAllowed), 2);
}
