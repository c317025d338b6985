//! Hand-built IPv4/IPv6 TCP/UDP packets with every header field chosen by the caller and
//! correct lengths and checksums ([`Segment`]), kernel-style superpackets behind a
//! virtio-net header ([`superpacket`]), and the checksum arithmetic the offload oracles check
//! against ([`transport_checksum_ok`], [`ipv4_header_checksum_ok`]).
//!
//! etherparse (see `packets`) cannot set the IPv4 ID, the IPv6 flow label or arbitrary TCP
//! flags together, and GRO decisions hinge on exactly those fields; and the oracles must not
//! share code with tun-rs, whose output they judge. Hence this small independent writer.

use std::net::IpAddr;

use tun_rs::VirtioNetHdr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const CWR: u8 = 0x80;

/// virtio-net header values (linux/virtio_net.h).
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Ones' complement sum of `bytes` (big-endian words, an odd last byte padded with zero) on
/// top of `initial`, folded to 16 bits, not inverted.
pub fn sum(bytes: &[u8], initial: u32) -> u16 {
    let mut total = u64::from(initial);
    for word in bytes.chunks(2) {
        let hi = u64::from(word[0]) << 8;
        let lo = word.get(1).copied().map_or(0, u64::from);
        total += hi | lo;
    }
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The folded (not inverted) pseudo-header sum: what the kernel leaves in the checksum field
/// of a CHECKSUM_PARTIAL packet.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, protocol: u8, transport_len: usize) -> u16 {
    let mut words = octets(src);
    words.extend(octets(dst));
    let len = transport_len as u32;
    sum(&words, u32::from(protocol) + (len >> 16) + (len & 0xffff))
}

/// The IP part of a [`Segment`]. Source and destination must be of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 ToS / IPv6 traffic class.
    pub tos: u8,
    /// IPv4 only.
    pub id: u16,
    /// IPv4 only: don't fragment.
    pub df: bool,
    /// IPv4 only: more-fragments flag and fragment offset (in 8-byte units).
    pub more_fragments: bool,
    pub fragment_offset: u16,
    /// IPv4 only: option bytes (padded to a multiple of 4 with end-of-options).
    pub options: Vec<u8>,
    /// IPv6 only (20 bits).
    pub flow_label: u32,
}

impl Ip {
    pub fn new(src: IpAddr, dst: IpAddr) -> Ip {
        Ip {
            src,
            dst,
            ttl: 64,
            tos: 0,
            id: 0,
            df: true,
            more_fragments: false,
            fragment_offset: 0,
            options: Vec::new(),
            flow_label: 0,
        }
    }

    pub fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    fn header_len(&self) -> usize {
        if self.is_v6() {
            40
        } else {
            20 + self.options.len().div_ceil(4) * 4
        }
    }

    /// The header for a packet of `total_len` bytes carrying `protocol`.
    fn write(&self, total_len: usize, protocol: u8) -> Vec<u8> {
        let mut h = vec![0u8; self.header_len()];
        if self.is_v6() {
            let first = (6u32 << 28) | (u32::from(self.tos) << 20) | (self.flow_label & 0xf_ffff);
            h[0..4].copy_from_slice(&first.to_be_bytes());
            h[4..6].copy_from_slice(&((total_len - 40) as u16).to_be_bytes());
            h[6] = protocol;
            h[7] = self.ttl;
        } else {
            h[0] = 0x40 | (self.header_len() / 4) as u8;
            h[1] = self.tos;
            h[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
            h[4..6].copy_from_slice(&self.id.to_be_bytes());
            let flags = (u16::from(self.df) << 14)
                | (u16::from(self.more_fragments) << 13)
                | (self.fragment_offset & 0x1fff);
            h[6..8].copy_from_slice(&flags.to_be_bytes());
            h[8] = self.ttl;
            h[9] = protocol;
            h[20..20 + self.options.len()].copy_from_slice(&self.options);
        }
        let (src, dst) = (octets(self.src), octets(self.dst));
        let at = if self.is_v6() { 8 } else { 12 };
        h[at..at + src.len()].copy_from_slice(&src);
        h[at + src.len()..at + 2 * src.len()].copy_from_slice(&dst);
        if !self.is_v6() {
            let checksum = !sum(&h, 0);
            h[10..12].copy_from_slice(&checksum.to_be_bytes());
        }
        h
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        src_port: u16,
        dst_port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        /// Option bytes (padded to a multiple of 4 with end-of-options).
        options: Vec<u8>,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
}

impl Transport {
    fn protocol(&self) -> u8 {
        match self {
            Transport::Tcp { .. } => TCP,
            Transport::Udp { .. } => UDP,
        }
    }

    fn header_len(&self) -> usize {
        match self {
            Transport::Tcp { options, .. } => 20 + options.len().div_ceil(4) * 4,
            Transport::Udp { .. } => 8,
        }
    }

    /// The header with a zero checksum, for a transport length of `len`.
    fn write(&self, len: usize) -> Vec<u8> {
        let mut h = vec![0u8; self.header_len()];
        match self {
            Transport::Tcp {
                src_port,
                dst_port,
                seq,
                ack,
                flags,
                window,
                options,
            } => {
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..8].copy_from_slice(&seq.to_be_bytes());
                h[8..12].copy_from_slice(&ack.to_be_bytes());
                h[12] = ((self.header_len() / 4) as u8) << 4;
                h[13] = *flags;
                h[14..16].copy_from_slice(&window.to_be_bytes());
                h[20..20 + options.len()].copy_from_slice(options);
            }
            Transport::Udp { src_port, dst_port } => {
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&(len as u16).to_be_bytes());
            }
        }
        h
    }

    /// Where the checksum field sits in the transport header.
    pub fn checksum_offset(&self) -> usize {
        match self {
            Transport::Tcp { .. } => 16,
            Transport::Udp { .. } => 6,
        }
    }
}

/// One TCP or UDP packet, every field the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub ip: Ip,
    pub transport: Transport,
    pub payload: Vec<u8>,
}

impl Segment {
    pub fn ip_header_len(&self) -> usize {
        self.ip.header_len()
    }

    pub fn headers_len(&self) -> usize {
        self.ip.header_len() + self.transport.header_len()
    }

    /// Where the transport checksum field is, from the start of the packet.
    pub fn checksum_at(&self) -> usize {
        self.ip.header_len() + self.transport.checksum_offset()
    }

    /// The packet, with correct lengths and checksums (a UDP checksum that computes to zero
    /// is sent as 0xffff, RFC 768).
    pub fn build(&self) -> Vec<u8> {
        let transport_len = self.transport.header_len() + self.payload.len();
        let total = self.ip.header_len() + transport_len;
        let protocol = self.transport.protocol();
        let mut p = self.ip.write(total, protocol);
        p.extend(self.transport.write(transport_len));
        p.extend_from_slice(&self.payload);
        let pseudo = pseudo_sum(self.ip.src, self.ip.dst, protocol, transport_len);
        let mut checksum = !sum(&p[self.ip.header_len()..], u32::from(pseudo));
        if protocol == UDP && checksum == 0 {
            checksum = 0xffff;
        }
        let at = self.checksum_at();
        p[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
        p
    }
}

/// A virtio-net header as bytes (native endian, as on a TUN).
pub fn vnet_header(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> Vec<u8> {
    let hdr = VirtioNetHdr {
        flags,
        gso_type,
        hdr_len,
        gso_size,
        csum_start,
        csum_offset,
    };
    let mut out = vec![0u8; tailsk8s_dataplane::vnet::VNET_HDR_LEN];
    if let Err(e) = hdr.encode(&mut out) {
        panic!("virtio-net header does not encode: {e}");
    }
    out
}

/// A TUN read as the kernel hands it over for `first` (whose payload is the whole
/// superpacket's): NEEDS_CSUM, the GSO type of its family and protocol, `gso_size`, and the
/// checksum field holding only the pseudo-header sum (CHECKSUM_PARTIAL). `gso_type` 0 picks
/// the natural one.
pub fn superpacket(first: &Segment, gso_type: u8, gso_size: u16) -> Vec<u8> {
    let natural = match (&first.transport, first.ip.is_v6()) {
        (Transport::Udp { .. }, _) => GSO_UDP_L4,
        (Transport::Tcp { .. }, false) => GSO_TCPV4,
        (Transport::Tcp { .. }, true) => GSO_TCPV6,
    };
    let gso_type = if gso_type == GSO_NONE {
        natural
    } else {
        gso_type
    };
    partial(first, gso_type, gso_size)
}

/// One packet whose transport checksum the kernel left for the reader to complete
/// (GSO_NONE + NEEDS_CSUM).
pub fn needs_checksum(packet: &Segment) -> Vec<u8> {
    partial(packet, GSO_NONE, 0)
}

fn partial(segment: &Segment, gso_type: u8, gso_size: u16) -> Vec<u8> {
    let mut packet = segment.build();
    let transport_len = packet.len() - segment.ip_header_len();
    let pseudo = pseudo_sum(
        segment.ip.src,
        segment.ip.dst,
        segment.transport.protocol(),
        transport_len,
    );
    let at = segment.checksum_at();
    packet[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    let mut read = vnet_header(
        F_NEEDS_CSUM,
        gso_type,
        segment.headers_len() as u16,
        gso_size,
        segment.ip_header_len() as u16,
        segment.transport.checksum_offset() as u16,
    );
    read.extend(packet);
    read
}

/// The parts of a packet the oracles read, for a packet whose IP header is complete and whose
/// length field is honest; `None` otherwise. IPv6 extension headers are not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub v6: bool,
    /// IP header length (IHL × 4, or 40).
    pub ip_len: usize,
    /// IPv4 protocol / IPv6 next header.
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
}

pub fn parse(p: &[u8]) -> Option<Parsed> {
    let src = crate::support::ip::source(p)?;
    let dst = crate::support::ip::destination(p)?;
    let v6 = src.is_ipv6();
    let (ip_len, protocol) = if v6 {
        (40, p[6])
    } else {
        (usize::from(p[0] & 0x0f) * 4, p[9])
    };
    let honest = crate::support::ip::claimed_len(p) == Some(p.len());
    (honest && ip_len >= 20 && ip_len <= p.len()).then_some(Parsed {
        v6,
        ip_len,
        protocol,
        src,
        dst,
    })
}

/// Whether an IPv4 header's checksum verifies (`None` for anything but a parsed IPv4 packet).
pub fn ipv4_header_checksum_ok(p: &[u8]) -> Option<bool> {
    let parsed = parse(p)?;
    (!parsed.v6).then(|| sum(&p[..parsed.ip_len], 0) == 0xffff)
}

/// Whether the TCP/UDP checksum of a parsed packet verifies over everything after the IP
/// header (`None` when it is not TCP or UDP). A UDP checksum of zero ("none") does not count
/// as verified: nothing here ever produces one on purpose.
pub fn transport_checksum_ok(p: &[u8]) -> Option<bool> {
    let parsed = parse(p)?;
    let zero_udp =
        parsed.protocol == UDP && p.get(parsed.ip_len + 6..parsed.ip_len + 8) == Some(&[0, 0]);
    Some(transport_sum_verifies(p)? && !zero_udp)
}

/// Whether the ones' complement sum over pseudo-header, transport header and payload comes to
/// 0xffff, whatever the field holds (`None` when it is not TCP or UDP).
pub fn transport_sum_verifies(p: &[u8]) -> Option<bool> {
    let parsed = parse(p)?;
    let offset = match parsed.protocol {
        TCP => 16,
        UDP => 6,
        _ => return None,
    };
    let transport = &p[parsed.ip_len..];
    if transport.len() < offset + 2 {
        return Some(false);
    }
    let pseudo = pseudo_sum(parsed.src, parsed.dst, parsed.protocol, transport.len());
    Some(sum(transport, u32::from(pseudo)) == 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn tcp(src: &str, dst: &str, payload: &[u8]) -> Segment {
        Segment {
            ip: Ip::new(src.parse().unwrap(), dst.parse().unwrap()),
            transport: Transport::Tcp {
                src_port: 40000,
                dst_port: 443,
                seq: 0xfff0_0000,
                ack: 77,
                flags: ACK | PSH,
                window: 512,
                options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
            },
            payload: payload.to_vec(),
        }
    }

    /// etherparse, an independent implementation, agrees with our checksums and fields.
    #[test]
    fn built_packets_parse_and_verify_elsewhere() {
        for (src, dst) in [
            ("198.19.1.2", "198.19.2.2"),
            ("fd00:19:1::2", "fd00:19:2::2"),
        ] {
            let mut segment = tcp(src, dst, b"hello, world");
            segment.ip.id = 0x1234;
            segment.ip.flow_label = 0xabcde;
            let packet = segment.build();
            let sliced = SlicedPacket::from_ip(&packet).unwrap();
            let Some(TransportSlice::Tcp(t)) = &sliced.transport else {
                panic!("not TCP")
            };
            let expected = match &sliced.net {
                Some(NetSlice::Ipv4(ip)) => {
                    assert_eq!(ip.header().identification(), 0x1234);
                    assert!(ip.header().dont_fragment());
                    t.to_header()
                        .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                        .unwrap()
                }
                Some(NetSlice::Ipv6(ip)) => {
                    assert_eq!(ip.header().flow_label().value(), 0xabcde);
                    t.to_header()
                        .calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                        .unwrap()
                }
                _ => panic!("not IP"),
            };
            assert_eq!(t.checksum(), expected);
            assert_eq!(t.payload(), b"hello, world");
            assert_eq!(t.options().len(), 12);
            assert!(t.psh() && t.ack() && !t.syn());
            assert_eq!(transport_checksum_ok(&packet), Some(true));
            if src.contains('.') {
                assert_eq!(ipv4_header_checksum_ok(&packet), Some(true));
            }
            let mut broken = packet.clone();
            *broken.last_mut().unwrap() ^= 1;
            assert_eq!(transport_checksum_ok(&broken), Some(false));
        }
    }

    #[test]
    fn udp_checksums_never_go_out_as_zero() {
        let mut segment = Segment {
            ip: Ip::new("198.19.1.2".parse().unwrap(), "198.19.2.2".parse().unwrap()),
            transport: Transport::Udp {
                src_port: 1,
                dst_port: 2,
            },
            payload: vec![0, 0],
        };
        // With a zero payload word the checksum is !S for the sum S of everything else; a
        // payload word of !S brings the sum to 0xffff, whose complement is zero.
        let checksum = u16::from_be_bytes(segment.build()[26..28].try_into().unwrap());
        segment.payload = checksum.to_be_bytes().to_vec();
        let packet = segment.build();
        assert_eq!(&packet[26..28], &[0xff, 0xff]);
        assert_eq!(transport_checksum_ok(&packet), Some(true));
        let sliced = SlicedPacket::from_ip(&packet).unwrap();
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) =
            (&sliced.net, &sliced.transport)
        else {
            panic!("not IPv4/UDP")
        };
        let expected = u
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
            .unwrap();
        assert_eq!(expected, 0xffff);
    }

    #[test]
    fn a_superpacket_carries_the_pseudo_header_sum() {
        let segment = tcp("198.19.1.2", "198.19.2.2", &[7; 3000]);
        let read = superpacket(&segment, GSO_NONE, 1000);
        let hdr = VirtioNetHdr::decode(&read[..10]).unwrap();
        assert_eq!(
            (
                hdr.flags,
                hdr.gso_type,
                hdr.gso_size,
                hdr.csum_start,
                hdr.csum_offset
            ),
            (F_NEEDS_CSUM, GSO_TCPV4, 1000, 20, 16)
        );
        assert_eq!(usize::from(hdr.hdr_len), 20 + 32);
        let packet = &read[10..];
        let field = u16::from_be_bytes([packet[36], packet[37]]);
        let src = "198.19.1.2".parse().unwrap();
        let dst = "198.19.2.2".parse().unwrap();
        assert_eq!(field, pseudo_sum(src, dst, TCP, packet.len() - 20));
        assert_eq!(transport_checksum_ok(packet), Some(false));
    }
}
