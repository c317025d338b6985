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
//!
//! The first input byte picks the TUN mode (see [`run`]):
//! - plain (even): the rest is one packet, handed over twice: in a buffer of exactly its
//!   length, then with spare room for padding;
//! - with offloads (odd): the rest is one read with a virtio-net header in front. It is split
//!   in place as the TUN worker does (`offload::InPlace`), every packet routed from where the
//!   split left it before the next is made, and the packets are checked to be exactly those
//!   of the copying `offload::Split` (a batch of reused buffers at a time).
//!
//! Invariants per routed packet, checked against the harness's own header reading and a naive
//! longest-prefix table:
//! - a datagram goes only to the peer whose allowed IPs hold the packet's destination by
//!   longest match — never to another peer, never for a packet without a destination or
//!   larger than the MTU, never to a low-order or endpoint-less peer, at most one per packet;
//! - what goes to the established peer decrypts there to exactly the packet (up to the length
//!   its header claims); what goes to the handshaking peer is an initiation that peer accepts;
//! - whatever is written back to the TUN (ICMP errors) is a parseable IP packet addressed to
//!   the packet's source, within the RFC size bounds, and only when nothing was sent.
//!
//! Invariants of the split (see [`check_split`]); `split` never panics on any header:
//! - GSO_NONE: one packet, the read's own bytes; with NEEDS_CSUM only the checksum field may
//!   differ, and when the field held the pseudo-header sum of a well-formed TCP/UDP packet
//!   (what the kernel leaves there) the completed checksum verifies, never 0 for UDP;
//! - a superpacket: segments that are IP packets of the superpacket's version and addresses
//!   with a length field equal to their size, each carrying at most `gso_size` bytes (all but
//!   the last exactly that) whose concatenation is the superpacket's payload; TCP sequence
//!   numbers advance by the bytes before, FIN/PSH only on the last; when the superpacket's
//!   headers are well-formed, every segment's IPv4 header and transport checksums verify;
//! - every packet leaves its buffer at least [`PAD_ROOM`] spare bytes for WireGuard's padding.

use std::net::IpAddr;

use ipnet::IpNet;
use tailsk8s_dataplane::allowed_ips::NaiveAllowedIps;
use tailsk8s_dataplane::engine::DEFAULT_MTU;
use tailsk8s_dataplane::key::Key;
use tailsk8s_dataplane::packet::{ICMPV4_ERROR_MAX_LEN, ICMPV6_ERROR_MAX_LEN};

use tailsk8s_dataplane::offload::{self, PAD_ROOM};
use tailsk8s_dataplane::vnet::VNET_HDR_LEN;
use tun_rs::VirtioNetHdr;

use crate::headers::{self, Segment, Transport, FIN, GSO_NONE, PSH, TCP, UDP};
use crate::input::Choices;
use crate::support::{establish, ip, local, net, Local, Remote};

/// Peer indexes (the engine's slots follow the order they are added).
const ESTABLISHED: usize = 0;
const HANDSHAKING: usize = 1;
const NO_ENDPOINT: usize = 2;
const LOW_ORDER: usize = 3;

/// Buffers one split batch may fill: a TUN read finds at least 64 free in the worker's batch,
/// and a superpacket with more segments goes on batch after batch.
const SPLIT_BUFFERS: usize = 64;

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
        let mut local = local(1, "198.18.0.1:51820");
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

    /// Routes `packet` from a buffer of its own with `spare` bytes behind it.
    fn route(&mut self, packet: &[u8], spare: usize) {
        let mut buf = packet.to_vec();
        buf.resize(packet.len() + spare, 0);
        self.route_in(&mut buf, packet.len());
    }

    /// A read with a virtio-net header: split in place as the TUN worker does
    /// ([`offload::InPlace`]), each packet routed from where the split left it (the engine
    /// pads over the bytes behind it, the next segment's) before the next is split. The
    /// packets must be exactly those of the copying split ([`offload::Split`], a batch of
    /// [`SPLIT_BUFFERS`] reused buffers at a time), which must refuse the same reads. Returns
    /// the datagrams sent to the established peer.
    fn route_read(&mut self, read: &[u8]) -> usize {
        let copied = split_in_batches(read);
        let mut buffer = read.to_vec();
        // The worker's read buffer is reused from read to read: the room behind starts dirty.
        buffer.resize(read.len() + PAD_ROOM, 0xee);
        let mut split = match offload::InPlace::new(&mut buffer, read.len()) {
            Ok(split) => split,
            Err(e) => {
                assert_eq!(copied.err(), Some(e), "the splits refuse different reads");
                return 0;
            }
        };
        let Ok(copied) = copied else {
            panic!("the in-place split took a read the copying split refused");
        };
        let mut packets = Vec::new();
        let mut delivered = 0;
        while let Some((buf, size)) = split.next_packet() {
            assert!(
                size <= buf.len() && buf.len() - size >= PAD_ROOM,
                "a {size}-byte packet in a {}-byte buffer: no room to pad",
                buf.len()
            );
            packets.push(buf[..size].to_vec());
            delivered += self.route_in(buf, size);
        }
        assert!(
            packets == copied,
            "in place: {} packets, not those of the copying split ({})",
            packets.len(),
            copied.len()
        );
        check_split(read, &packets);
        delivered
    }

    /// Routes `buf[..len]`; the rest of `buf` is spare room. Returns the datagrams sent to
    /// the established peer (each checked to decrypt to the packet).
    fn route_in(&mut self, buf: &mut [u8], len: usize) -> usize {
        let packet = buf[..len].to_vec();
        let packet = packet.as_slice();
        let out = self.local.tun_buf_in(buf, len);
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
        out.sent
            .iter()
            .filter(|(to, _)| Some(to.addr) == self.endpoints[ESTABLISHED])
            .count()
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

/// The packets of `read` by the copying split, [`SPLIT_BUFFERS`] reused (dirty) buffers at a
/// time, each batch checked to leave every packet room to pad.
fn split_in_batches(read: &[u8]) -> Result<Vec<Vec<u8>>, offload::SplitError> {
    let mut buffer = read.to_vec();
    let mut bufs = vec![vec![0xee; 100]; SPLIT_BUFFERS];
    let mut sizes = vec![usize::MAX; SPLIT_BUFFERS];
    let mut split = offload::Split::new(&mut buffer)?;
    let mut packets = Vec::new();
    while split.remaining() > 0 {
        let before = split.remaining();
        let count = split.next_into(&mut bufs, &mut sizes)?;
        assert_eq!(
            count,
            before.min(SPLIT_BUFFERS),
            "split gave {count} packets with {before} due"
        );
        for (buf, &size) in bufs.iter().zip(&sizes).take(count) {
            assert!(
                size <= buf.len() && buf.len() - size >= PAD_ROOM,
                "a {size}-byte packet in a {}-byte buffer: no room to pad",
                buf.len()
            );
            packets.push(buf[..size].to_vec());
        }
    }
    Ok(packets)
}

/// What `split` did with one read, checked against the read itself.
pub fn check_split(read: &[u8], packets: &[Vec<u8>]) {
    let Ok(hdr) = VirtioNetHdr::decode(read) else {
        panic!("split accepted a read without a virtio-net header");
    };
    let original = &read[VNET_HDR_LEN..];
    if hdr.gso_type == GSO_NONE {
        check_single(&hdr, original, packets);
    } else {
        check_segments(&hdr, original, packets);
    }
}

fn check_single(hdr: &VirtioNetHdr, original: &[u8], packets: &[Vec<u8>]) {
    let [packet] = packets else {
        panic!("GSO_NONE read split into {} packets", packets.len());
    };
    assert_eq!(
        packet.len(),
        original.len(),
        "GSO_NONE packet changed length"
    );
    let field = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
    let needs_csum = hdr.flags & headers::F_NEEDS_CSUM != 0;
    for (i, (a, b)) in packet.iter().zip(original).enumerate() {
        let in_field = needs_csum && (field..field + 2).contains(&i);
        assert!(
            a == b || in_field,
            "byte {i} changed ({b:#x} -> {a:#x}) outside the checksum field"
        );
    }
    // The kernel leaves the pseudo-header sum in the field; from there, completion must give
    // a verifying checksum.
    let Some(parsed) = headers::parse(original) else {
        return;
    };
    let expected_offset = match parsed.protocol {
        TCP => 16,
        UDP => 6,
        _ => return,
    };
    let as_kernel_leaves_it = needs_csum
        && usize::from(hdr.csum_start) == parsed.ip_len
        && usize::from(hdr.csum_offset) == expected_offset
        && original.len() >= field + 2
        && u16::from_be_bytes([original[field], original[field + 1]])
            == headers::pseudo_sum(
                parsed.src,
                parsed.dst,
                parsed.protocol,
                original.len() - parsed.ip_len,
            );
    if as_kernel_leaves_it {
        assert_eq!(
            headers::transport_checksum_ok(packet),
            Some(true),
            "completed checksum {:#06x} does not verify (a UDP checksum of 0 means none; RFC \
             768 sends 0xffff)",
            u16::from_be_bytes([packet[field], packet[field + 1]])
        );
    }
}

fn check_segments(hdr: &VirtioNetHdr, original: &[u8], packets: &[Vec<u8>]) {
    let (Some(src), Some(dst)) = (ip::source(original), ip::destination(original)) else {
        panic!("split a superpacket without whole IP addresses");
    };
    let gso_size = usize::from(hdr.gso_size);
    let start = usize::from(hdr.csum_start);
    let tcp = hdr.gso_type & !headers::GSO_ECN != headers::GSO_UDP_L4;
    // The headers every segment repeats: IP up to csum_start, then the transport header as
    // the packet itself sizes it (the header's hdr_len is not to be trusted).
    let transport_len = if tcp {
        usize::from(original.get(start + 12).copied().unwrap_or(0) >> 4) * 4
    } else {
        8
    };
    let headers_len = start + transport_len;
    let Some(payload) = original.get(headers_len..) else {
        panic!("split a superpacket whose headers ({headers_len} bytes) do not fit it");
    };
    // The superpacket's own IP header, when it is well-formed: then so must every segment's
    // checksums be.
    let protocol = if tcp { TCP } else { UDP };
    let well_formed = match ip::version(original) {
        Some(6) => start == 40 && original[6] == protocol,
        _ => usize::from(original[0] & 0x0f) * 4 == start && original[9] == protocol,
    };
    let mut joined = Vec::with_capacity(payload.len());
    for (i, packet) in packets.iter().enumerate() {
        let last = i + 1 == packets.len();
        assert_eq!(
            ip::version(packet),
            ip::version(original),
            "segment {i} changed IP version"
        );
        assert_eq!(
            ip::claimed_len(packet),
            Some(packet.len()),
            "segment {i}: length field differs from its size"
        );
        assert_eq!(
            (ip::source(packet), ip::destination(packet)),
            (Some(src), Some(dst)),
            "segment {i} changed addresses"
        );
        let Some(chunk) = packet.get(headers_len..) else {
            panic!("segment {i} is shorter than the headers");
        };
        assert!(
            !chunk.is_empty() && chunk.len() <= gso_size && (last || chunk.len() == gso_size),
            "segment {i} of {} carries {} bytes with gso_size {gso_size}",
            packets.len(),
            chunk.len()
        );
        if tcp {
            let seq = |p: &[u8]| {
                u32::from_be_bytes([p[start + 4], p[start + 5], p[start + 6], p[start + 7]])
            };
            assert_eq!(
                seq(packet),
                seq(original).wrapping_add(joined.len() as u32),
                "segment {i}: sequence number does not follow the bytes before it"
            );
            let flags = packet[start + 13];
            assert!(
                last || flags & (FIN | PSH) == 0,
                "segment {i} of {} has FIN or PSH",
                packets.len()
            );
        }
        if well_formed {
            assert_ne!(
                headers::ipv4_header_checksum_ok(packet),
                Some(false),
                "segment {i}: IPv4 header checksum"
            );
            assert_eq!(
                headers::transport_checksum_ok(packet),
                Some(true),
                "segment {i}: transport checksum"
            );
        }
        joined.extend_from_slice(chunk);
    }
    assert!(
        joined == payload,
        "the segments' payloads ({} bytes) are not the superpacket's ({} bytes)",
        joined.len(),
        payload.len()
    );
}

/// The target body: the first byte picks the mode (odd: a read with a virtio-net header, for
/// a TUN with offloads; even: a plain packet), the rest is the read.
pub fn run(data: &[u8]) {
    let mut c = Choices::new(data);
    let with_header = c.bool();
    let read = c.rest();
    let mut world = World::new();
    if with_header {
        let _ = world.route_read(read);
    } else {
        world.route(read, 0);
        world.route(read, 64);
    }
}

/// Seeds: one packet per routing outcome and family, plus edge shapes, as plain reads; and
/// reads with a virtio-net header as an offloading kernel writes them: TCP and UDP
/// superpackets over both families, packets whose checksum is left to complete, a superpacket
/// whose `hdr_len` spans the whole first packet (the forwarding path does that).
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
    let plain = [
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
    ];
    let mut forwarded =
        headers::superpacket(&tcp("198.19.1.2", "198.19.2.2", 1380 * 2), GSO_NONE, 1380);
    // hdr_len = the whole first packet, as the kernel's forwarding path may set it.
    forwarded[2..4].copy_from_slice(&(40u16 + 1380).to_ne_bytes());
    let mut ecn = tcp("198.19.1.2", "198.19.2.2", 1380 * 3);
    if let Transport::Tcp { flags, .. } = &mut ecn.transport {
        *flags |= headers::CWR;
    }
    let mut options = tcp("fd00:19:1::2", "fd00:19:2::2", 1348 * 2 + 100);
    if let Transport::Tcp { options, .. } = &mut options.transport {
        // NOP, NOP, timestamps.
        *options = vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7];
    }
    // MSS 48 (the kernel's smallest): 150 segments, more than one split batch holds.
    let mut small_mss = tcp("198.19.1.2", "198.19.2.2", 48 * 150);
    if let Transport::Tcp { flags, .. } = &mut small_mss.transport {
        *flags |= headers::CWR;
    }
    let with_header = [
        (
            "offload-v4-tcp-small-mss",
            headers::superpacket(&small_mss, headers::GSO_TCPV4 | headers::GSO_ECN, 48),
        ),
        (
            "offload-v4-tcp-superpacket",
            headers::superpacket(
                &tcp("198.19.1.2", "198.19.2.2", 1380 * 3 + 500),
                GSO_NONE,
                1380,
            ),
        ),
        (
            "offload-v6-tcp-superpacket",
            headers::superpacket(
                &tcp("fd00:19:1::2", "fd00:19:2::2", 1360 * 3),
                GSO_NONE,
                1360,
            ),
        ),
        (
            "offload-v4-udp-superpacket",
            headers::superpacket(
                &udp("198.19.1.2", "198.19.2.2", 1392 * 2 + 7),
                GSO_NONE,
                1392,
            ),
        ),
        (
            "offload-v6-udp-superpacket",
            headers::superpacket(
                &udp("fd00:19:1::2", "fd00:19:2::2", 1372 * 3),
                GSO_NONE,
                1372,
            ),
        ),
        (
            "offload-v4-tcp-ecn",
            headers::superpacket(&ecn, headers::GSO_TCPV4 | headers::GSO_ECN, 1380),
        ),
        (
            "offload-v6-tcp-options",
            headers::superpacket(&options, GSO_NONE, 1348),
        ),
        ("offload-v4-forwarded-hdr-len", forwarded),
        (
            "offload-v4-superpacket-to-handshake",
            headers::superpacket(&tcp("198.19.1.2", "198.19.7.7", 2000), GSO_NONE, 1000),
        ),
        (
            "offload-v4-segments-too-big",
            headers::superpacket(&tcp("198.19.1.2", "198.19.2.2", 1460 * 2), GSO_NONE, 1460),
        ),
        (
            "offload-v4-udp-needs-csum",
            headers::needs_checksum(&udp("198.19.1.2", "198.19.2.2", 99)),
        ),
        (
            "offload-v6-tcp-needs-csum",
            headers::needs_checksum(&tcp("fd00:19:1::2", "fd00:19:2::2", 1000)),
        ),
        ("offload-none", {
            let mut read = headers::vnet_header(0, GSO_NONE, 0, 0, 0, 0);
            read.extend(icmp_v4("198.19.1.2", "198.19.2.2", 56));
            read
        }),
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> = plain
        .into_iter()
        .map(|(name, packet)| (name, mode(false, &packet)))
        .collect();
    seeds.extend(
        with_header
            .into_iter()
            .map(|(name, read)| (name, mode(true, &read))),
    );
    seeds
}

/// An input for [`run`].
pub fn mode(with_header: bool, read: &[u8]) -> Vec<u8> {
    let mut input = vec![u8::from(with_header)];
    input.extend_from_slice(read);
    input
}

/// A TCP segment (ACK|PSH) carrying `payload` counting bytes.
fn tcp(src: &str, dst: &str, payload: usize) -> Segment {
    Segment {
        ip: headers::Ip::new(crate::support::ip_addr(src), crate::support::ip_addr(dst)),
        transport: Transport::Tcp {
            src_port: 40000,
            dst_port: 5201,
            seq: 0x1000_0000,
            ack: 0x2000_0000,
            flags: headers::ACK | PSH,
            window: 1024,
            options: Vec::new(),
        },
        payload: (0..payload).map(|i| i as u8).collect(),
    }
}

fn udp(src: &str, dst: &str, payload: usize) -> Segment {
    Segment {
        ip: headers::Ip::new(crate::support::ip_addr(src), crate::support::ip_addr(dst)),
        transport: Transport::Udp {
            src_port: 40000,
            dst_port: 5201,
        },
        payload: (0..payload).map(|i| (i * 7) as u8).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        match seeds().into_iter().find(|(n, _)| *n == name) {
            Some((_, input)) => input[1..].to_vec(),
            None => panic!("no seed {name}"),
        }
    }

    /// Each segment of a superpacket is routed, encrypted and decrypts at the peer.
    #[test]
    fn every_segment_of_a_superpacket_reaches_the_established_peer() {
        for (name, segments) in [
            ("offload-v4-tcp-small-mss", 150),
            ("offload-v4-tcp-superpacket", 4),
            ("offload-v6-tcp-superpacket", 3),
            ("offload-v4-udp-superpacket", 3),
            ("offload-v6-udp-superpacket", 3),
            ("offload-v4-tcp-ecn", 3),
            ("offload-v6-tcp-options", 3),
            ("offload-v4-forwarded-hdr-len", 2),
            ("offload-v4-udp-needs-csum", 1),
            ("offload-v6-tcp-needs-csum", 1),
            ("offload-none", 1),
            ("offload-v4-segments-too-big", 0),
        ] {
            let mut world = World::new();
            assert_eq!(world.route_read(&seed(name)), segments, "{name}");
        }
    }

    fn split_all(read: &[u8]) -> Vec<Vec<u8>> {
        let mut bufs = vec![Vec::new(); SPLIT_BUFFERS];
        let mut sizes = vec![0; SPLIT_BUFFERS];
        let count = offload::split(&mut read.to_vec(), &mut bufs, &mut sizes).unwrap();
        bufs.iter()
            .zip(&sizes)
            .take(count)
            .map(|(b, &s)| b[..s].to_vec())
            .collect()
    }

    #[test]
    fn the_split_oracle_catches_wrong_segments() {
        let read = seed("offload-v4-tcp-superpacket");
        let good = split_all(&read);
        check_split(&read, &good);
        let fails = |packets: Vec<Vec<u8>>| {
            std::panic::catch_unwind(|| check_split(&read, &packets)).is_err()
        };
        assert!(fails(good[1..].to_vec()), "a segment lost");
        let mut changed = good.clone();
        changed[1][100] ^= 1;
        assert!(fails(changed), "payload changed");
        let mut length = good.clone();
        length[0][3] ^= 1;
        assert!(fails(length), "length field");
        let mut moved = good.clone();
        moved[2][19] ^= 1;
        assert!(fails(moved), "destination changed");
        let mut psh = good.clone();
        psh[0][33] |= PSH;
        assert!(fails(psh), "PSH before the last segment");

        let read = seed("offload-v4-udp-needs-csum");
        let good = split_all(&read);
        check_split(&read, &good);
        let mut wrong = good.clone();
        wrong[0][27] ^= 1;
        assert!(
            std::panic::catch_unwind(|| check_split(&read, &wrong)).is_err(),
            "checksum not completed"
        );
    }

    /// A UDP checksum that completes to zero must go out as 0xffff (RFC 768; for IPv6 a zero
    /// checksum is invalid and the receiver drops the datagram).
    #[test]
    fn a_udp_checksum_completing_to_zero_goes_out_as_ffff() {
        for (src, dst) in [
            ("198.19.1.2", "198.19.2.2"),
            ("fd00:19:1::2", "fd00:19:2::2"),
        ] {
            let mut datagram = udp(src, dst, 2);
            datagram.payload = vec![0, 0];
            let at = datagram.checksum_at();
            let zero_payload_checksum = datagram.build()[at..at + 2].to_vec();
            // With the payload word equal to the checksum over a zero word, the sum comes to
            // 0xffff and the checksum to zero.
            datagram.payload = zero_payload_checksum;
            run(&mode(true, &headers::needs_checksum(&datagram)));
        }
    }
}
