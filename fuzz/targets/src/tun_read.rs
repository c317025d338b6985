//! `tun_read`: the input is one packet as read from the TUN; the engine routes it.
//!
//! The engine has four peers, so every routing outcome is reachable:
//!
//! | peer | state | allowed IPs |
//! |---|---|---|
//! | 0 | established session | 198.19.2.0/24, fd00:19:2::/64 |
//! | 1 | endpoint, no session (a packet starts a handshake) | 198.19.0.0/16, fd00::/8 |
//! | 2 | no endpoint | 198.19.3.0/24, 128.0.0.0/1 |
//! | 3 | low-order public key | 198.19.5.0/24, fd00:19:5::/64 |
//!
//! Anything else (0.0.0.0/1 outside 198.19/16, IPv6 outside fd00::/8) has no route.
//! The packet is handed over twice: in a buffer of exactly its length, then with spare room
//! for padding. Invariants, checked against the harness's own header reading and a naive
//! longest-prefix table:
//! - a datagram goes only to the peer whose allowed IPs hold the packet's destination by
//!   longest match — never to another peer, never for a packet without a destination or
//!   larger than the MTU, never to a low-order or endpoint-less peer, at most one per packet;
//! - what goes to the established peer decrypts there to exactly the packet (up to the length
//!   its header claims); what goes to the handshaking peer is an initiation that peer accepts;
//! - whatever is written back to the TUN (ICMP errors) is a parseable IP packet addressed to
//!   the packet's source, within the RFC size bounds, and only when nothing was sent.

use std::net::IpAddr;

use ipnet::IpNet;
use tailsk8s_dataplane::allowed_ips::NaiveAllowedIps;
use tailsk8s_dataplane::engine::DEFAULT_MTU;
use tailsk8s_dataplane::key::Key;
use tailsk8s_dataplane::packet::{ICMPV4_ERROR_MAX_LEN, ICMPV6_ERROR_MAX_LEN};

use crate::support::{establish, ip, net, Local, Remote};

/// Peer indexes (the engine's slots follow the order they are added).
const ESTABLISHED: usize = 0;
const HANDSHAKING: usize = 1;
const NO_ENDPOINT: usize = 2;
const LOW_ORDER: usize = 3;

struct World {
    local: Local,
    established: Remote,
    handshaking: Remote,
    /// Endpoint addresses by peer index (`None` for the peer without one).
    endpoints: Vec<Option<std::net::SocketAddr>>,
    routes: NaiveAllowedIps<usize>,
    /// Whether the handshaking peer has already been sent its initiation.
    initiated: bool,
}

impl World {
    fn new() -> World {
        let mut local = Local::new(1, "198.18.0.1:51820");
        let mut established = Remote::new(2, local.public, "198.18.0.2:51820", 1);
        let handshaking = Remote::new(3, local.public, "[fd00:18::3]:51820", 1);
        let no_endpoint = crate::support::fixed_private_key(4).public_key();
        // The identity point: the simplest low-order public key.
        let low_order = Key::ZERO;
        let low_order_endpoint = crate::support::addr("198.18.0.5:51820");

        let peers: [(Key, Option<std::net::SocketAddr>, Vec<IpNet>); 4] = [
            (
                established.public,
                Some(established.addr),
                vec![net("198.19.2.0/24"), net("fd00:19:2::/64")],
            ),
            (
                handshaking.public,
                Some(handshaking.addr),
                vec![net("198.19.0.0/16"), net("fd00::/8")],
            ),
            (
                no_endpoint,
                None,
                vec![net("198.19.3.0/24"), net("128.0.0.0/1")],
            ),
            (
                low_order,
                Some(low_order_endpoint),
                vec![net("198.19.5.0/24"), net("fd00:19:5::/64")],
            ),
        ];
        let mut routes = NaiveAllowedIps::new();
        let mut endpoints = Vec::new();
        for (index, (key, endpoint, allowed)) in peers.iter().enumerate() {
            local.add_peer(*key, *endpoint, allowed);
            for prefix in allowed {
                routes.insert(*prefix, index);
            }
            endpoints.push(*endpoint);
        }
        establish(&mut local, &mut established);
        // Nothing can match the endpoint-less peer's endpoint, so nothing may be sent to it.
        assert!(endpoints[NO_ENDPOINT].is_none());
        World {
            local,
            established,
            handshaking,
            endpoints,
            routes,
            initiated: false,
        }
    }

    fn route(&mut self, packet: &[u8], spare: usize) {
        let mut buf = packet.to_vec();
        buf.resize(packet.len() + spare, 0);
        let out = self.local.from_tun(&mut buf, packet.len());
        let destination = ip::destination(packet);

        assert!(
            out.sent.len() <= 1,
            "one packet sent {} datagrams",
            out.sent.len()
        );
        for (to, datagram) in &out.sent {
            let Some(peer) = self.endpoints.iter().position(|e| *e == Some(to.addr)) else {
                panic!("sent to {}, which is no peer's endpoint", to.addr);
            };
            let Some(destination) = destination else {
                panic!("sent a packet that has no destination address to peer {peer}");
            };
            let owner = self.routes.lookup(destination);
            assert_eq!(
                owner,
                Some(peer),
                "packet for {destination} sent to peer {peer}; its allowed IPs say {owner:?}"
            );
            assert!(
                packet.len() <= DEFAULT_MTU,
                "a {}-byte packet went out over a {DEFAULT_MTU}-byte MTU",
                packet.len()
            );
            assert!(peer != LOW_ORDER, "sent to the low-order peer");
            match peer {
                ESTABLISHED => self.check_data(packet, datagram),
                HANDSHAKING => self.check_initiation(datagram),
                _ => panic!("sent to peer {peer}, which has no session or endpoint"),
            }
        }
        for reply in &out.tun {
            assert!(
                out.sent.is_empty(),
                "both sent the packet and answered it with an error"
            );
            check_icmp_error(packet, destination, reply);
        }
    }

    fn check_data(&mut self, packet: &[u8], datagram: &[u8]) {
        let got = self.established.receive(self.local.addr.ip(), datagram);
        let [inner] = got.packets.as_slice() else {
            panic!(
                "the established peer could not decrypt what it was sent ({} packets)",
                got.packets.len()
            );
        };
        let claimed = ip::claimed_len(packet);
        assert_eq!(
            Some(inner.len()),
            claimed,
            "decrypted length differs from the header's"
        );
        assert_eq!(
            Some(inner.as_slice()),
            packet.get(..inner.len()),
            "decrypted bytes differ"
        );
    }

    fn check_initiation(&mut self, datagram: &[u8]) {
        assert!(
            !self.initiated,
            "a second initiation while one is under way"
        );
        self.initiated = true;
        assert_eq!(
            (datagram.first(), datagram.len()),
            (Some(&1), 148),
            "expected a handshake initiation"
        );
        let got = self.handshaking.receive(self.local.addr.ip(), datagram);
        assert_eq!(
            got.replies.first().map(Vec::len),
            Some(92),
            "the peer did not accept the initiation meant for it"
        );
    }
}

fn check_icmp_error(packet: &[u8], destination: Option<IpAddr>, reply: &[u8]) {
    let Some(source) = ip::source(packet) else {
        panic!("answered a packet without a source address");
    };
    assert!(destination.is_some());
    assert_eq!(
        ip::destination(reply),
        Some(source),
        "ICMP error not addressed to the sender"
    );
    let limit = match source {
        IpAddr::V4(_) => ICMPV4_ERROR_MAX_LEN,
        IpAddr::V6(_) => ICMPV6_ERROR_MAX_LEN,
    };
    assert!(
        reply.len() <= limit,
        "{}-byte ICMP error over {limit}",
        reply.len()
    );
    assert_eq!(
        ip::claimed_len(reply),
        Some(reply.len()),
        "ICMP error length field wrong"
    );
    if let Err(e) = etherparse::SlicedPacket::from_ip(reply) {
        panic!("ICMP error does not parse: {e}");
    }
}

/// The target body.
pub fn run(data: &[u8]) {
    let mut world = World::new();
    world.route(data, 0);
    world.route(data, 64);
}

/// Seeds: one packet per routing outcome and family, plus edge shapes.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::packets::*;
    let mut truncated = icmp_v4("198.19.1.2", "198.19.2.2", 20);
    truncated.truncate(30);
    let mut options = tcp_syn_v4("198.19.1.2", "198.19.2.2");
    // IHL 6 with a NOP option word, total length adjusted.
    options.splice(20..20, [1, 1, 1, 1]);
    options[0] = 0x46;
    let total = options.len() as u16;
    options[2..4].copy_from_slice(&total.to_be_bytes());
    vec![
        ("v4-established", icmp_v4("198.19.1.2", "198.19.2.2", 56)),
        (
            "v6-established",
            icmp_v6("fd00:19:1::2", "fd00:19:2::2", 56),
        ),
        ("v4-handshake", udp_v4("198.19.1.2", "198.19.7.7", 12)),
        ("v6-handshake", tcp_syn_v6("fd00:19:1::2", "fd00:19:7::7")),
        ("v4-no-endpoint", tcp_syn_v4("198.19.1.2", "198.19.3.3")),
        ("v4-low-order", icmp_v4("198.19.1.2", "198.19.5.5", 8)),
        ("v6-low-order", udp_v6("fd00:19:1::2", "fd00:19:5::5", 8)),
        ("v4-no-route", icmp_v4("198.19.1.2", "100.64.0.1", 56)),
        ("v6-no-route", icmp_v6("fd00:19:1::2", "2001:db8::1", 56)),
        (
            "v4-too-big-df",
            with_df(icmp_v4("198.19.1.2", "198.19.2.2", 1500)),
        ),
        ("v6-too-big", icmp_v6("fd00:19:1::2", "fd00:19:2::2", 1500)),
        ("v4-truncated", truncated),
        ("v4-options", options),
        ("not-ip", vec![0x00, 0x01, 0x02]),
    ]
}
