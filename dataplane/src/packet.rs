//! Facts about raw IP packets the engine needs, and the ICMP errors it sends back.
//!
//! Everything here reads or writes caller-owned buffers and allocates nothing, so it can run
//! on the packet path. A packet counts as IP only if its header is well-formed enough to trust
//! its addresses and length: IPv4 with IHL ≥ 5 and header ≤ total length ≤ buffer, or IPv6
//! with a full fixed header and payload length ≤ buffer. Anything else is `None`, never a
//! panic.
//!
//! ICMP errors follow RFC 792/1122/1812 for IPv4 and RFC 4443 for IPv6: they quote as much of
//! the offending packet as fits in 576 (IPv4, as Linux does) or 1280 (IPv6) bytes, and are
//! never sent in the cases those RFCs forbid (see [`icmp_unreachable`]). Header and checksum
//! encoding uses `etherparse`; the rules about when to answer are ours.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    icmpv4::DestUnreachableHeader, icmpv6::DestUnreachableCode, Icmpv4Header, Icmpv4Type,
    Icmpv6Header, Icmpv6Type, IpDscp, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header,
};

/// Length of an IPv4 header without options.
const IPV4_MIN_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
const IPV6_HEADER_LEN: usize = 40;
/// Length of the ICMP header of the error messages built here (type, code, checksum, 4 bytes).
const ICMP_HEADER_LEN: usize = 8;
/// Largest ICMPv4 error we send, IP header included: the size every IPv4 host must accept
/// (RFC 1812 §4.3.2.3 says to quote as much as fits in it; Linux uses the same bound).
pub const ICMPV4_ERROR_MAX_LEN: usize = 576;
/// Largest ICMPv6 error we send: the IPv6 minimum MTU (RFC 4443 §2.4(c)).
pub const ICMPV6_ERROR_MAX_LEN: usize = 1280;
/// TTL / hop limit of the errors we originate.
const ERROR_TTL: u8 = 64;

const PROTO_ICMPV4: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// What the header says about a packet that passed the well-formedness checks.
#[derive(Clone, Copy, Debug)]
enum Ip {
    V4 { header_len: usize, total_len: usize },
    V6 { total_len: usize },
}

impl Ip {
    fn total_len(self) -> usize {
        match self {
            Ip::V4 { total_len, .. } | Ip::V6 { total_len } => total_len,
        }
    }
}

fn be16(pkt: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(array(pkt, at)?))
}

fn array<const N: usize>(pkt: &[u8], at: usize) -> Option<[u8; N]> {
    pkt.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn parse(pkt: &[u8]) -> Option<Ip> {
    match pkt.first()? >> 4 {
        4 => {
            let header_len = usize::from(pkt.first()? & 0x0f) * 4;
            let total_len = usize::from(be16(pkt, 2)?);
            let well_formed = header_len >= IPV4_MIN_HEADER_LEN
                && header_len <= total_len
                && total_len <= pkt.len();
            well_formed.then_some(Ip::V4 {
                header_len,
                total_len,
            })
        }
        6 => {
            // A jumbogram (payload length 0 plus a hop-by-hop option) reads as a bare header;
            // they cannot occur on a TUN with a 16-bit MTU.
            let total_len = IPV6_HEADER_LEN + usize::from(be16(pkt, 4)?);
            (total_len <= pkt.len()).then_some(Ip::V6 { total_len })
        }
        _ => None,
    }
}

/// The source address of an IPv4 or IPv6 packet, if its header is well-formed.
pub fn source(pkt: &[u8]) -> Option<IpAddr> {
    match parse(pkt)? {
        Ip::V4 { .. } => Some(IpAddr::V4(Ipv4Addr::from(array::<4>(pkt, 12)?))),
        Ip::V6 { .. } => Some(IpAddr::V6(Ipv6Addr::from(array::<16>(pkt, 8)?))),
    }
}

/// The destination address of an IPv4 or IPv6 packet, if its header is well-formed.
pub fn destination(pkt: &[u8]) -> Option<IpAddr> {
    match parse(pkt)? {
        Ip::V4 { .. } => Some(IpAddr::V4(Ipv4Addr::from(array::<4>(pkt, 16)?))),
        Ip::V6 { .. } => Some(IpAddr::V6(Ipv6Addr::from(array::<16>(pkt, 24)?))),
    }
}

/// The packet length its header claims (IPv4 total length, IPv6 40 + payload length), which
/// is at most `pkt.len()`; `pkt[..len]` drops any padding after the packet.
pub fn ip_len(pkt: &[u8]) -> Option<usize> {
    parse(pkt).map(Ip::total_len)
}

/// True if routers must not fragment the packet: the IPv4 DF bit, always for IPv6 (only
/// sources fragment there). False for anything that is not a well-formed IP packet.
pub fn dont_fragment(pkt: &[u8]) -> bool {
    match parse(pkt) {
        Some(Ip::V4 { .. }) => pkt.get(6).is_some_and(|b| b & 0x40 != 0),
        Some(Ip::V6 { .. }) => true,
        None => false,
    }
}

/// Which ICMP error to build.
#[derive(Clone, Copy, Debug)]
enum Error {
    /// IPv4 host unreachable (3/1), IPv6 address unreachable (1/3).
    Unreachable,
    /// IPv4 fragmentation needed (3/4), IPv6 packet too big (2/0), with the next-hop MTU.
    TooBig(u16),
}

/// Writes into `out` an ICMP "destination unreachable" error for `orig`, addressed to `orig`'s
/// source and sent from `from`; returns its length.
///
/// IPv4: type 3 code 1 (host unreachable). IPv6: type 1 code 3 (address unreachable).
///
/// Returns `None`, and the caller sends nothing, when:
/// - `orig` is not a well-formed IP packet, or `from` is of the other family, unspecified,
///   multicast or (IPv4) broadcast;
/// - RFC 1122 §3.2.2 / RFC 4443 §2.4(e) forbid an error: `orig` is itself an ICMP error
///   (IPv4 types 3, 4, 5, 11, 12; IPv6 types below 128), a fragment other than the first,
///   has a source that is not one host (unspecified, `0.0.0.0/8`, loopback, multicast,
///   `240.0.0.0/4` including broadcast), or goes to a multicast or broadcast destination;
/// - `out` cannot hold the error with at least `orig`'s IP header and 8 more bytes quoted
///   (IPv6: the first 48 bytes). With a larger `out`, up to [`ICMPV4_ERROR_MAX_LEN`] or
///   [`ICMPV6_ERROR_MAX_LEN`] bytes are written; padding after `orig`'s claimed length is
///   never quoted.
pub fn icmp_unreachable(orig: &[u8], from: IpAddr, out: &mut [u8]) -> Option<usize> {
    icmp_error(orig, Error::Unreachable, from, out)
}

/// Writes into `out` an ICMP "packet too big" error for `orig` announcing `mtu`, addressed to
/// `orig`'s source and sent from `from`; returns its length.
///
/// IPv4: type 3 code 4 (fragmentation needed) with the next-hop MTU; the caller decides
/// whether it applies (see [`dont_fragment`]). IPv6: type 2 (packet too big).
///
/// Sends nothing in the same cases as [`icmp_unreachable`], with one exception from
/// RFC 4443 §2.4(e.3): an IPv6 packet too big is answered even for a multicast destination,
/// so multicast path MTU discovery works.
pub fn icmp_too_big(orig: &[u8], mtu: u16, from: IpAddr, out: &mut [u8]) -> Option<usize> {
    icmp_error(orig, Error::TooBig(mtu), from, out)
}

fn icmp_error(orig: &[u8], kind: Error, from: IpAddr, out: &mut [u8]) -> Option<usize> {
    let ip = parse(orig)?;
    // Link-layer padding after the packet is not part of it.
    let orig = orig.get(..ip.total_len())?;
    match (ip, from) {
        (Ip::V4 { header_len, .. }, IpAddr::V4(from)) => {
            icmpv4_error(orig, header_len, kind, from, out)
        }
        (Ip::V6 { .. }, IpAddr::V6(from)) => icmpv6_error(orig, kind, from, out),
        _ => None,
    }
}

/// True if `addr` names one IPv4 host (RFC 1122 §3.2.1.3, §3.2.2).
fn is_v4_single_host(addr: Ipv4Addr) -> bool {
    let first = addr.octets()[0];
    // 0/8 is "this network", 240/4 is reserved and holds the limited broadcast address.
    !(first == 0 || addr.is_loopback() || addr.is_multicast() || first >= 240)
}

/// True for the ICMPv4 types that report errors (RFC 1122 §3.2.2), as opposed to queries.
fn is_icmpv4_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

fn icmpv4_error(
    orig: &[u8],
    header_len: usize,
    kind: Error,
    from: Ipv4Addr,
    out: &mut [u8],
) -> Option<usize> {
    let src = Ipv4Addr::from(array::<4>(orig, 12)?);
    let dst = Ipv4Addr::from(array::<4>(orig, 16)?);
    if !is_v4_single_host(src)
        || dst.is_multicast()
        || dst.is_broadcast()
        || !is_v4_single_host(from)
    {
        return None;
    }
    let fragment_offset = be16(orig, 6)? & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    if *orig.get(9)? == PROTO_ICMPV4 {
        // An ICMP packet too short to have a type is malformed: do not guess.
        if is_icmpv4_error(*orig.get(header_len)?) {
            return None;
        }
    }

    let outer_len = IPV4_MIN_HEADER_LEN + ICMP_HEADER_LEN;
    let quoted = quote(
        orig,
        header_len + 8,
        ICMPV4_ERROR_MAX_LEN - outer_len,
        out.len(),
        outer_len,
    )?;
    let icmp_type = Icmpv4Type::DestinationUnreachable(match kind {
        Error::Unreachable => DestUnreachableHeader::Host,
        Error::TooBig(next_hop_mtu) => DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
    });
    let icmp = Icmpv4Header::with_checksum(icmp_type, quoted);
    let payload_len = u16::try_from(ICMP_HEADER_LEN + quoted.len()).ok()?;
    let mut header = Ipv4Header::new(
        payload_len,
        ERROR_TTL,
        IpNumber::ICMP,
        from.octets(),
        src.octets(),
    )
    .ok()?;
    // Like Linux: precedence "internetwork control", and fragmentable (errors are small).
    header.dscp = IpDscp::CS6;
    header.dont_fragment = false;
    header.header_checksum = header.calc_header_checksum();

    let at = put(out, 0, &header.to_bytes())?;
    let at = put(out, at, &icmp.to_bytes())?;
    put(out, at, quoted)
}

fn icmpv6_error(orig: &[u8], kind: Error, from: Ipv6Addr, out: &mut [u8]) -> Option<usize> {
    let src = Ipv6Addr::from(array::<16>(orig, 8)?);
    let dst = Ipv6Addr::from(array::<16>(orig, 24)?);
    let not_one_host = |a: Ipv6Addr| a.is_unspecified() || a.is_loopback() || a.is_multicast();
    if not_one_host(src) || not_one_host(from) {
        return None;
    }
    if dst.is_multicast() && !matches!(kind, Error::TooBig(_)) {
        return None;
    }
    match upper_layer_v6(orig)? {
        UpperLayer::NonFirstFragment => return None,
        UpperLayer::Icmp(icmp_type) if icmp_type < 128 => return None,
        UpperLayer::Icmp(_) | UpperLayer::Other => {}
    }

    let outer_len = IPV6_HEADER_LEN + ICMP_HEADER_LEN;
    let quoted = quote(
        orig,
        IPV6_HEADER_LEN + 8,
        ICMPV6_ERROR_MAX_LEN - outer_len,
        out.len(),
        outer_len,
    )?;
    let icmp_type = match kind {
        Error::Unreachable => Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address),
        Error::TooBig(mtu) => Icmpv6Type::PacketTooBig {
            mtu: u32::from(mtu),
        },
    };
    let icmp = Icmpv6Header::with_checksum(icmp_type, from.octets(), src.octets(), quoted).ok()?;
    let header = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: u16::try_from(ICMP_HEADER_LEN + quoted.len()).ok()?,
        next_header: IpNumber::IPV6_ICMP,
        hop_limit: ERROR_TTL,
        source: from.octets(),
        destination: src.octets(),
    };

    let at = put(out, 0, &header.to_bytes())?;
    let at = put(out, at, &icmp.to_bytes())?;
    put(out, at, quoted)
}

/// What follows an IPv6 packet's extension headers, as far as the ICMP rules care.
enum UpperLayer {
    /// An ICMPv6 message of this type.
    Icmp(u8),
    /// A fragment with a non-zero offset: its upper-layer header is elsewhere.
    NonFirstFragment,
    /// Anything else (including protocols whose headers we cannot see past, such as ESP).
    Other,
}

/// Walks the extension header chain of a well-formed IPv6 packet; `None` if it is truncated.
fn upper_layer_v6(pkt: &[u8]) -> Option<UpperLayer> {
    let mut next = *pkt.get(6)?;
    let mut at = IPV6_HEADER_LEN;
    // Each step moves `at` forward by at least 8 bytes and every read is checked, so the
    // loop ends at the latest when the packet does.
    loop {
        // An extension header that runs past the packet makes it malformed.
        if at > pkt.len() {
            return None;
        }
        match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6: the length byte
            // counts 8-octet units after the first.
            0 | 43 | 60 | 135 | 139 | 140 => {
                let len = (usize::from(*pkt.get(at + 1)?) + 1) * 8;
                next = *pkt.get(at)?;
                at += len;
            }
            // Authentication header: its length byte counts 4-octet units, minus 2.
            51 => {
                let len = (usize::from(*pkt.get(at + 1)?) + 2) * 4;
                next = *pkt.get(at)?;
                at += len;
            }
            // Fragment header: fixed 8 bytes; offset in the top 13 bits of bytes 2-3.
            44 => {
                if be16(pkt, at + 2)? & 0xfff8 != 0 {
                    return Some(UpperLayer::NonFirstFragment);
                }
                next = *pkt.get(at)?;
                at += 8;
            }
            PROTO_ICMPV6 => return Some(UpperLayer::Icmp(*pkt.get(at)?)),
            _ => return Some(UpperLayer::Other),
        }
    }
}

/// The prefix of `orig` to quote: as much as `max` and the room left in an `out_len` buffer
/// after `outer_len` header bytes allow, but never less than `min` (or all of a shorter
/// `orig`) — below that the error is useless and is not sent.
fn quote(orig: &[u8], min: usize, max: usize, out_len: usize, outer_len: usize) -> Option<&[u8]> {
    let room = out_len.checked_sub(outer_len)?;
    let len = orig.len().min(max).min(room);
    if len < orig.len().min(min) {
        return None;
    }
    orig.get(..len)
}

/// Copies `bytes` into `out` at `at`; returns the offset after them, or `None` if they do not
/// fit.
fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> Option<usize> {
    let end = at.checked_add(bytes.len())?;
    out.get_mut(at..end)?.copy_from_slice(bytes);
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;
    use etherparse::{Icmpv4Slice, Icmpv6Slice, Ipv4HeaderSlice, Ipv6HeaderSlice};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const POD_A: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
    const POD_B: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 20);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
    const POD6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10);
    const POD6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 0x20);
    const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);

    /// An IPv4 packet built field by field (independently of the code under test).
    fn v4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            0x40,
            0,
            63,
            proto,
            0,
            0,
        ];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        let sum = internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn v6_packet(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut p = vec![0x60, 0, 0, 0, (len >> 8) as u8, len as u8, next, 63];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    /// A UDP-ish payload with recognisable bytes.
    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// RFC 1071 checksum by the tests' own reference, so they do not trust etherparse's.
    fn internet_checksum(data: &[u8]) -> u16 {
        checksum::reference(data, 0)
    }

    /// The folded sum of `data` on top of `sum`, by the same reference.
    fn ones_sum(sum: u32, data: &[u8]) -> u32 {
        u32::from(!checksum::reference(data, sum))
    }

    /// Checks IPv4 + ICMPv4 framing and checksums; returns (ip header, icmp slice).
    fn parse_v4_error(bytes: &[u8]) -> (Ipv4HeaderSlice<'_>, Icmpv4Slice<'_>) {
        let ip = Ipv4HeaderSlice::from_slice(bytes).unwrap();
        assert_eq!(usize::from(ip.total_len()), bytes.len());
        assert_eq!(internet_checksum(&bytes[..20]), 0, "IPv4 header checksum");
        assert_eq!(ip.protocol(), IpNumber::ICMP);
        assert_eq!(ip.ttl(), 64);
        assert_eq!(internet_checksum(&bytes[20..]), 0, "ICMPv4 checksum");
        (ip, Icmpv4Slice::from_slice(&bytes[20..]).unwrap())
    }

    fn parse_v6_error(bytes: &[u8]) -> (Ipv6HeaderSlice<'_>, Icmpv6Slice<'_>) {
        let ip = Ipv6HeaderSlice::from_slice(bytes).unwrap();
        assert_eq!(usize::from(ip.payload_length()) + 40, bytes.len());
        assert_eq!(ip.next_header(), IpNumber::IPV6_ICMP);
        assert_eq!(ip.hop_limit(), 64);
        // Pseudo-header: source, destination, upper-layer length, next header.
        let mut sum = ones_sum(0, &bytes[8..40]);
        sum = ones_sum(sum, &((bytes.len() - 40) as u32).to_be_bytes());
        sum = ones_sum(sum, &[0, 0, 0, 58]);
        sum = ones_sum(sum, &bytes[40..]);
        assert_eq!(!(sum as u16), 0, "ICMPv6 checksum");
        let icmp = Icmpv6Slice::from_slice(&bytes[40..]).unwrap();
        assert!(icmp.is_checksum_valid(ip.source(), ip.destination()));
        (ip, icmp)
    }

    #[test]
    fn addresses_and_length_of_ipv4() {
        let mut p = v4_packet(POD_A, POD_B, 17, &payload(30));
        assert_eq!(source(&p), Some(IpAddr::V4(POD_A)));
        assert_eq!(destination(&p), Some(IpAddr::V4(POD_B)));
        assert_eq!(ip_len(&p), Some(50));
        p.extend_from_slice(&[0; 14]); // link padding
        assert_eq!(ip_len(&p), Some(50));
        assert_eq!(source(&p), Some(IpAddr::V4(POD_A)));
    }

    #[test]
    fn addresses_and_length_of_ipv6() {
        let mut p = v6_packet(POD6_A, POD6_B, 17, &payload(30));
        assert_eq!(source(&p), Some(IpAddr::V6(POD6_A)));
        assert_eq!(destination(&p), Some(IpAddr::V6(POD6_B)));
        assert_eq!(ip_len(&p), Some(70));
        p.push(0);
        assert_eq!(ip_len(&p), Some(70));
    }

    #[test]
    fn malformed_headers_are_not_ip() {
        let good4 = v4_packet(POD_A, POD_B, 17, &payload(8));
        let good6 = v6_packet(POD6_A, POD6_B, 17, &payload(8));
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("one byte", vec![0x45]),
            ("version 5", {
                let mut p = good4.clone();
                p[0] = 0x55;
                p
            }),
            ("IHL 4", {
                let mut p = good4.clone();
                p[0] = 0x44;
                p
            }),
            ("IHL beyond total length", {
                let mut p = good4.clone();
                p[0] = 0x4f; // 60-byte header, 28-byte packet
                p
            }),
            ("total length beyond buffer", {
                let mut p = good4.clone();
                p[3] += 1;
                p
            }),
            ("total length below header", {
                let mut p = good4.clone();
                p[2] = 0;
                p[3] = 19;
                p
            }),
            ("truncated IPv4 header", good4[..19].to_vec()),
            ("truncated IPv6 header", good6[..39].to_vec()),
            (
                "IPv6 payload beyond buffer",
                good6[..good6.len() - 1].to_vec(),
            ),
        ];
        cases.push(("IPv6 with version 4 nibble", {
            let mut p = good6.clone();
            p[0] = 0x40;
            p
        }));
        for (what, p) in cases {
            assert_eq!(source(&p), None, "{what}");
            assert_eq!(destination(&p), None, "{what}");
            assert_eq!(ip_len(&p), None, "{what}");
            assert!(!dont_fragment(&p), "{what}");
            let mut out = [0u8; 1500];
            assert_eq!(
                icmp_unreachable(&p, IpAddr::V4(ROUTER), &mut out),
                None,
                "{what}"
            );
            assert_eq!(
                icmp_unreachable(&p, IpAddr::V6(ROUTER6), &mut out),
                None,
                "{what}"
            );
        }
    }

    #[test]
    fn dont_fragment_reads_the_df_bit() {
        let mut p = v4_packet(POD_A, POD_B, 17, &payload(8));
        assert!(dont_fragment(&p));
        p[6] &= !0x40;
        assert!(!dont_fragment(&p));
        assert!(dont_fragment(&v6_packet(POD6_A, POD6_B, 17, &payload(8))));
    }

    #[test]
    fn ipv4_unreachable_quotes_the_packet() {
        let orig = v4_packet(POD_A, POD_B, 17, &payload(100));
        let mut out = [0u8; 1500];
        let n = icmp_unreachable(&orig, IpAddr::V4(ROUTER), &mut out).unwrap();
        assert_eq!(n, 28 + orig.len());
        let (ip, icmp) = parse_v4_error(&out[..n]);
        assert_eq!(ip.source_addr(), ROUTER);
        assert_eq!(ip.destination_addr(), POD_A);
        assert_eq!(icmp.type_u8(), 3);
        assert_eq!(icmp.code_u8(), 1);
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host)
        );
        assert_eq!(&out[28..n], &orig[..]);
    }

    #[test]
    fn ipv4_too_big_carries_the_mtu_and_is_capped_at_576_bytes() {
        let mut orig = v4_packet(POD_A, POD_B, 6, &payload(1400));
        orig.extend_from_slice(&[0xee; 10]); // padding must not matter
        let mut out = [0u8; 2000];
        let n = icmp_too_big(&orig, 1380, IpAddr::V4(ROUTER), &mut out).unwrap();
        assert_eq!(n, ICMPV4_ERROR_MAX_LEN);
        let (ip, icmp) = parse_v4_error(&out[..n]);
        assert_eq!(ip.destination_addr(), POD_A);
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 4));
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1380
            })
        );
        assert_eq!(&out[6 + 20..8 + 20], &1380u16.to_be_bytes());
        assert_eq!(&out[28..n], &orig[..n - 28]);
    }

    #[test]
    fn ipv4_error_shrinks_to_the_buffer_but_not_below_header_plus_8() {
        let orig = v4_packet(POD_A, POD_B, 17, &payload(200));
        let mut out = [0u8; 100];
        let n = icmp_unreachable(&orig, IpAddr::V4(ROUTER), &mut out).unwrap();
        assert_eq!(n, 100);
        parse_v4_error(&out[..n]);
        assert_eq!(&out[28..100], &orig[..72]);
        let mut small = [0u8; 28 + 28];
        assert_eq!(
            icmp_unreachable(&orig, IpAddr::V4(ROUTER), &mut small),
            Some(56)
        );
        let mut too_small = [0u8; 28 + 27];
        assert_eq!(
            icmp_unreachable(&orig, IpAddr::V4(ROUTER), &mut too_small),
            None
        );
        // A packet shorter than header + 8 is quoted whole.
        let tiny = v4_packet(POD_A, POD_B, 17, &payload(3));
        let mut out = [0u8; 51];
        assert_eq!(
            icmp_unreachable(&tiny, IpAddr::V4(ROUTER), &mut out),
            Some(51)
        );
    }

    #[test]
    fn ipv4_header_options_are_quoted_with_8_more_bytes() {
        let mut orig = v4_packet(POD_A, POD_B, 17, &payload(40));
        // Turn the first 8 payload bytes into options (IHL 7).
        orig[0] = 0x47;
        let mut out = [0u8; 28 + 28 + 8];
        assert_eq!(
            icmp_unreachable(&orig, IpAddr::V4(ROUTER), &mut out),
            Some(64)
        );
        let mut out = [0u8; 28 + 28 + 7];
        assert_eq!(icmp_unreachable(&orig, IpAddr::V4(ROUTER), &mut out), None);
    }

    #[test]
    fn ipv4_never_answered() {
        let udp = payload(20);
        let mut icmp_echo = vec![8, 0, 0, 0, 0, 1, 0, 1];
        icmp_echo.extend_from_slice(&payload(12));
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        for t in [3u8, 4, 5, 11, 12] {
            let mut msg = vec![t, 0, 0, 0, 0, 0, 0, 0];
            msg.extend_from_slice(&payload(28));
            cases.push(("ICMP error", v4_packet(POD_A, POD_B, 1, &msg)));
        }
        cases.push(("ICMP without a type", v4_packet(POD_A, POD_B, 1, &[])));
        let mut frag = v4_packet(POD_A, POD_B, 17, &udp);
        frag[6] = 0x00;
        frag[7] = 0xb9; // offset 185 * 8
        cases.push(("non-first fragment", frag));
        for src in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(224, 0, 0, 5),
            Ipv4Addr::new(240, 0, 0, 1),
            Ipv4Addr::BROADCAST,
        ] {
            cases.push(("bad source", v4_packet(src, POD_B, 17, &udp)));
        }
        for dst in [Ipv4Addr::new(239, 1, 2, 3), Ipv4Addr::BROADCAST] {
            cases.push((
                "multicast/broadcast destination",
                v4_packet(POD_A, dst, 17, &udp),
            ));
        }
        let mut out = [0u8; 1500];
        for (what, p) in &cases {
            assert_eq!(
                icmp_unreachable(p, IpAddr::V4(ROUTER), &mut out),
                None,
                "{what}"
            );
            assert_eq!(
                icmp_too_big(p, 1280, IpAddr::V4(ROUTER), &mut out),
                None,
                "{what}"
            );
        }
        // Controls: the same shapes that are allowed do get an answer.
        let ok = [
            v4_packet(POD_A, POD_B, 1, &icmp_echo),
            v4_packet(POD_A, POD_B, 17, &udp),
        ];
        for p in &ok {
            assert!(icmp_unreachable(p, IpAddr::V4(ROUTER), &mut out).is_some());
        }
        let mut first_frag = v4_packet(POD_A, POD_B, 17, &udp);
        first_frag[6] = 0x20; // more fragments, offset 0
        assert!(icmp_unreachable(&first_frag, IpAddr::V4(ROUTER), &mut out).is_some());
    }

    #[test]
    fn wrong_or_bad_sender_address_sends_nothing() {
        let p4 = v4_packet(POD_A, POD_B, 17, &payload(20));
        let p6 = v6_packet(POD6_A, POD6_B, 17, &payload(20));
        let mut out = [0u8; 1500];
        assert_eq!(icmp_unreachable(&p4, IpAddr::V6(ROUTER6), &mut out), None);
        assert_eq!(icmp_too_big(&p6, 1280, IpAddr::V4(ROUTER), &mut out), None);
        assert_eq!(
            icmp_unreachable(&p4, IpAddr::V4(Ipv4Addr::BROADCAST), &mut out),
            None
        );
        assert_eq!(
            icmp_unreachable(&p4, IpAddr::V4(Ipv4Addr::UNSPECIFIED), &mut out),
            None
        );
        let mcast6: Ipv6Addr = "ff02::1".parse().unwrap();
        assert_eq!(icmp_unreachable(&p6, IpAddr::V6(mcast6), &mut out), None);
        assert_eq!(
            icmp_unreachable(&p6, IpAddr::V6(Ipv6Addr::UNSPECIFIED), &mut out),
            None
        );
    }

    #[test]
    fn ipv6_unreachable_quotes_the_packet() {
        let orig = v6_packet(POD6_A, POD6_B, 17, &payload(100));
        let mut out = [0u8; 1500];
        let n = icmp_unreachable(&orig, IpAddr::V6(ROUTER6), &mut out).unwrap();
        assert_eq!(n, 48 + orig.len());
        let (ip, icmp) = parse_v6_error(&out[..n]);
        assert_eq!(ip.source_addr(), ROUTER6);
        assert_eq!(ip.destination_addr(), POD6_A);
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 3));
        assert_eq!(
            icmp.icmp_type(),
            Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Address)
        );
        assert_eq!(&out[48..n], &orig[..]);
    }

    #[test]
    fn ipv6_too_big_carries_the_mtu_and_is_capped_at_1280_bytes() {
        let orig = v6_packet(POD6_A, POD6_B, 6, &payload(1400));
        let mut out = [0u8; 2000];
        let n = icmp_too_big(&orig, 1420, IpAddr::V6(ROUTER6), &mut out).unwrap();
        assert_eq!(n, ICMPV6_ERROR_MAX_LEN);
        let (_, icmp) = parse_v6_error(&out[..n]);
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (2, 0));
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1420 });
        assert_eq!(&out[48..n], &orig[..n - 48]);
    }

    #[test]
    fn ipv6_error_needs_room_for_48_quoted_bytes() {
        let orig = v6_packet(POD6_A, POD6_B, 17, &payload(100));
        let mut out = [0u8; 96];
        assert_eq!(
            icmp_unreachable(&orig, IpAddr::V6(ROUTER6), &mut out),
            Some(96)
        );
        parse_v6_error(&out);
        let mut out = [0u8; 95];
        assert_eq!(icmp_unreachable(&orig, IpAddr::V6(ROUTER6), &mut out), None);
    }

    /// An extension header of the generic shape with 8 bytes.
    fn ext(next: u8) -> [u8; 8] {
        [next, 0, 1, 4, 0, 0, 0, 0]
    }

    fn frag_header(next: u8, offset_units: u16, more: bool) -> [u8; 8] {
        let word = (offset_units << 3) | u16::from(more);
        let [a, b] = word.to_be_bytes();
        [next, 0, a, b, 0, 0, 0, 9]
    }

    #[test]
    fn ipv6_never_answered() {
        let udp = payload(24);
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        for t in [1u8, 2, 3, 4, 127] {
            let mut msg = vec![t, 0, 0, 0, 0, 0, 0, 0];
            msg.extend_from_slice(&payload(40));
            cases.push(("ICMPv6 error", v6_packet(POD6_A, POD6_B, 58, &msg)));
            // The same behind hop-by-hop and destination options headers.
            let mut chained = ext(60).to_vec();
            chained.extend_from_slice(&ext(58));
            chained.extend_from_slice(&msg);
            cases.push((
                "ICMPv6 error behind extensions",
                v6_packet(POD6_A, POD6_B, 0, &chained),
            ));
        }
        let mut frag = frag_header(17, 100, true).to_vec();
        frag.extend_from_slice(&udp);
        cases.push(("non-first fragment", v6_packet(POD6_A, POD6_B, 44, &frag)));
        cases.push((
            "truncated extension",
            v6_packet(POD6_A, POD6_B, 0, &[17, 3, 0, 0]),
        ));
        cases.push(("ICMPv6 without a type", v6_packet(POD6_A, POD6_B, 58, &[])));
        for src in ["::", "::1", "ff02::1"] {
            let src: Ipv6Addr = src.parse().unwrap();
            cases.push(("bad source", v6_packet(src, POD6_B, 17, &udp)));
        }
        let mut out = [0u8; 1500];
        for (what, p) in &cases {
            assert_eq!(
                icmp_unreachable(p, IpAddr::V6(ROUTER6), &mut out),
                None,
                "{what}"
            );
            assert_eq!(
                icmp_too_big(p, 1280, IpAddr::V6(ROUTER6), &mut out),
                None,
                "{what}"
            );
        }
        // Multicast destination: no unreachable, but packet too big is allowed (RFC 4443).
        let mcast = v6_packet(POD6_A, "ff0e::1".parse().unwrap(), 17, &udp);
        assert_eq!(
            icmp_unreachable(&mcast, IpAddr::V6(ROUTER6), &mut out),
            None
        );
        let n = icmp_too_big(&mcast, 1280, IpAddr::V6(ROUTER6), &mut out).unwrap();
        parse_v6_error(&out[..n]);
    }

    #[test]
    fn ipv6_allowed_shapes_are_answered() {
        let mut out = [0u8; 1500];
        let mut echo = vec![128, 0, 0, 0, 0, 1, 0, 1];
        echo.extend_from_slice(&payload(16));
        let mut first = frag_header(17, 0, true).to_vec();
        first.extend_from_slice(&payload(24));
        let mut behind_ext = ext(58).to_vec();
        behind_ext.extend_from_slice(&echo);
        for (what, p) in [
            ("echo request", v6_packet(POD6_A, POD6_B, 58, &echo)),
            ("first fragment", v6_packet(POD6_A, POD6_B, 44, &first)),
            (
                "echo behind hop-by-hop",
                v6_packet(POD6_A, POD6_B, 0, &behind_ext),
            ),
            ("ESP (opaque)", v6_packet(POD6_A, POD6_B, 50, &payload(40))),
        ] {
            let n = icmp_unreachable(&p, IpAddr::V6(ROUTER6), &mut out);
            assert_eq!(n, Some(48 + p.len()), "{what}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x1c3b);
        let mut out = [0u8; 1500];
        let mut answered = 0;
        for i in 0..20_000 {
            // Start from valid packets and damage them, so parsing gets past the first checks.
            let mut p = match i % 3 {
                0 => v4_packet(
                    POD_A,
                    POD_B,
                    rng.gen_range(0..3),
                    &payload(rng.gen_range(0..80)),
                ),
                1 => v6_packet(
                    POD6_A,
                    POD6_B,
                    [0, 44, 58, 60, 51][rng.gen_range(0..5)],
                    &payload(rng.gen_range(0..80)),
                ),
                _ => (0..rng.gen_range(0..80)).map(|_| rng.gen()).collect(),
            };
            for _ in 0..rng.gen_range(0..3) {
                if !p.is_empty() {
                    let at = rng.gen_range(0..p.len());
                    p[at] = rng.gen();
                }
            }
            if rng.gen_bool(0.2) {
                p.truncate(rng.gen_range(0..=p.len()));
            }
            let _ = (source(&p), destination(&p), ip_len(&p), dont_fragment(&p));
            let out_len = if rng.gen_bool(0.5) {
                out.len()
            } else {
                rng.gen_range(0..out.len())
            };
            for from in [IpAddr::V4(ROUTER), IpAddr::V6(ROUTER6)] {
                let unreachable = icmp_unreachable(&p, from, &mut out[..out_len]);
                let too_big = icmp_too_big(&p, rng.gen(), from, &mut out[..out_len]);
                // Whatever is written must be a well-formed error with valid checksums
                // (the last one written is still in `out`).
                for n in [unreachable, too_big].into_iter().flatten() {
                    assert!(n <= out_len);
                    answered += 1;
                }
                if let Some(n) = too_big {
                    match from {
                        IpAddr::V4(_) => drop(parse_v4_error(&out[..n])),
                        IpAddr::V6(_) => drop(parse_v6_error(&out[..n])),
                    }
                }
            }
        }
        assert!(
            answered > 2_000,
            "the generator must reach the writing code ({answered})"
        );
    }
}
