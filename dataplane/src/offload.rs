//! Reads from a TUN with offloads: every read starts with a virtio-net header and may carry a
//! superpacket (TSO/USO) standing for many packets, or one packet whose transport checksum
//! the kernel left for us to complete. [`split`] turns one such read into plain IP packets,
//! sans-IO, so the packet path, its fuzz target and its benchmark share one function.
//!
//! The per-segment header work (lengths, IDs, sequence numbers, checksums) is tun-rs's
//! `gso_split`, the port of wireguard-go's; here are the checks before it (never trust the
//! header: a forwarded superpacket's `hdr_len` may be the whole first packet, so it is
//! recomputed from the transport header) and buffer management: output buffers grow to what a
//! read needs (only when the MTU grows; never in steady state) instead of being sized for the
//! worst case up front.

use thiserror::Error;
use tun_rs::{gso_split, VirtioNetHdr, VIRTIO_NET_HDR_LEN};

/// Bytes of virtio-net header in front of every TUN read and write with offloads.
pub const VNET_HDR_LEN: usize = VIRTIO_NET_HDR_LEN;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;
/// Where UDP keeps its checksum (TCP: 16).
const UDP_CHECKSUM_OFFSET: u16 = 6;
/// Room after each packet for WireGuard's padding to 16 bytes.
const PAD_ROOM: usize = 16;

/// Why a TUN read could not be split (the read is dropped and counted).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("read shorter than the virtio-net header")]
    TooShort,
    #[error("unknown GSO type {0:#x}")]
    GsoType(u8),
    #[error("GSO type does not match the IP version")]
    VersionMismatch,
    #[error("transport header does not fit the packet")]
    TransportHeader,
    #[error("checksum field outside the packet")]
    ChecksumOffset,
    #[error("GSO segment size is zero")]
    ZeroSegmentSize,
    #[error("superpacket has {0} segments, more than the batch holds")]
    TooManySegments(usize),
    #[error("segmentation failed: {0}")]
    Segmentation(String),
}

/// Splits one TUN read (`read` = virtio-net header + packet) into IP packets, written to
/// `bufs[i][..sizes[i]]` from index 0. Returns how many. Buffers grow as needed and keep
/// [`PAD_ROOM`] spare bytes after each packet.
pub fn split(
    read: &mut [u8],
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
) -> Result<usize, SplitError> {
    let header = read.get(..VNET_HDR_LEN).ok_or(SplitError::TooShort)?;
    let mut hdr = VirtioNetHdr::decode(header).map_err(|_| SplitError::TooShort)?;
    let packet = &mut read[VNET_HDR_LEN..];
    if bufs.is_empty() || sizes.len() < bufs.len() {
        return Err(SplitError::TooManySegments(1));
    }
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(packet, hdr.csum_start, hdr.csum_offset)?;
        }
        copy_into(&mut bufs[0], packet);
        sizes[0] = packet.len();
        return Ok(1);
    }
    if hdr.gso_size == 0 {
        return Err(SplitError::ZeroSegmentSize);
    }
    let is_v6 = match packet.first().map(|b| b >> 4) {
        Some(4) => false,
        Some(6) => true,
        _ => return Err(SplitError::VersionMismatch),
    };
    let tcp = match (hdr.gso_type & !GSO_ECN, is_v6) {
        (GSO_TCPV4, false) | (GSO_TCPV6, true) => true,
        (GSO_UDP_L4, _) if hdr.gso_type & GSO_ECN == 0 => false,
        (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, _) => return Err(SplitError::VersionMismatch),
        (other, _) => return Err(SplitError::GsoType(other)),
    };
    // The kernel may set hdr_len to the whole first packet on the forwarding path.
    let csum_start = usize::from(hdr.csum_start);
    let transport_len = if tcp {
        let data_offset = packet
            .get(csum_start + 12)
            .ok_or(SplitError::TransportHeader)?;
        usize::from(data_offset >> 4) * 4
    } else {
        8
    };
    if tcp && !(20..=60).contains(&transport_len) {
        return Err(SplitError::TransportHeader);
    }
    let hdr_len = csum_start + transport_len;
    if hdr_len > packet.len() {
        return Err(SplitError::TransportHeader);
    }
    hdr.hdr_len = u16::try_from(hdr_len).map_err(|_| SplitError::TransportHeader)?;
    let payload = packet.len() - hdr_len;
    let segment = usize::from(hdr.gso_size);
    let segments = payload.div_ceil(segment).max(1);
    if segments > bufs.len() {
        return Err(SplitError::TooManySegments(segments));
    }
    // gso_split writes each segment at the front of its buffer: the buffer's length is its
    // usable room (only ever grown).
    let room = hdr_len + segment.min(payload.max(1)) + PAD_ROOM;
    for buf in &mut bufs[..segments] {
        if buf.len() < room {
            buf.resize(room, 0);
        }
    }
    gso_split(packet, hdr, bufs, sizes, 0, is_v6)
        .map_err(|e| SplitError::Segmentation(e.to_string()))
}

/// Copies one packet into a buffer, growing it (with padding room) if the packet is larger.
pub fn copy_into(buf: &mut Vec<u8>, packet: &[u8]) {
    if buf.len() < packet.len() + PAD_ROOM {
        buf.resize(packet.len() + PAD_ROOM, 0);
    }
    buf[..packet.len()].copy_from_slice(packet);
}

/// Finishes a transport checksum the kernel left partial (CHECKSUM_PARTIAL): the field holds
/// the pseudo-header sum; the sum over the transport header and payload completes it.
fn complete_checksum(
    packet: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
) -> Result<(), SplitError> {
    let start = usize::from(csum_start);
    let at = start + usize::from(csum_offset);
    if at + 2 > packet.len() || start > packet.len() {
        return Err(SplitError::ChecksumOffset);
    }
    let initial = u16::from_be_bytes([packet[at], packet[at + 1]]);
    packet[at] = 0;
    packet[at + 1] = 0;
    let sum = tun_rs::checksum(&packet[start..], u64::from(initial));
    // UDP (checksum at offset 6) sends a computed zero as 0xffff (RFC 768): zero means "no
    // checksum" over IPv4 and is invalid over IPv6.
    let checksum = match !sum {
        0 if csum_offset == UDP_CHECKSUM_OFFSET => 0xffff,
        other => other,
    };
    packet[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn header(
        flags: u8,
        gso_type: u8,
        gso_size: u16,
        csum_start: u16,
        csum_offset: u16,
    ) -> [u8; VNET_HDR_LEN] {
        let hdr = VirtioNetHdr {
            flags,
            gso_type,
            hdr_len: 0,
            gso_size,
            csum_start,
            csum_offset,
        };
        let mut out = [0u8; VNET_HDR_LEN];
        hdr.encode(&mut out).unwrap();
        out
    }

    fn buffers(n: usize) -> (Vec<Vec<u8>>, Vec<usize>) {
        (vec![Vec::new(); n], vec![0; n])
    }

    /// A TCP superpacket as the kernel hands it over: one IP+TCP header, `segments` × `mss`
    /// bytes of payload, the TCP checksum field holding only the pseudo-header sum.
    fn tcp_superpacket(mss: u16, segments: usize) -> (Vec<u8>, Vec<u8>) {
        let payload: Vec<u8> = (0..usize::from(mss) * segments).map(|i| i as u8).collect();
        let builder = PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64)
            .tcp(40000, 5201, 1000, 65535)
            .ack(7);
        let mut packet = Vec::new();
        builder.write(&mut packet, &payload).unwrap();
        let mut read = header(F_NEEDS_CSUM, GSO_TCPV4, mss, 20, 16).to_vec();
        read.extend_from_slice(&packet);
        (read, payload)
    }

    #[test]
    fn a_tcp_superpacket_splits_into_valid_segments_carrying_the_payload() {
        let (mut read, payload) = tcp_superpacket(1380, 5);
        let (mut bufs, mut sizes) = buffers(8);
        let n = split(&mut read, &mut bufs, &mut sizes).unwrap();
        assert_eq!(n, 5);
        let mut joined = Vec::new();
        for (i, (buf, size)) in bufs.iter().zip(&sizes).take(n).enumerate() {
            let sliced = SlicedPacket::from_ip(&buf[..*size]).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
                panic!("segment {i} is not TCP")
            };
            assert_eq!(tcp.sequence_number(), 1000 + 1380 * i as u32);
            joined.extend_from_slice(tcp.payload());
            assert!(buf.len() >= size + PAD_ROOM, "padding room");
        }
        assert_eq!(joined, payload);
        // Every segment's TCP checksum verifies (etherparse recomputes it).
        for (buf, size) in bufs.iter().zip(&sizes).take(n) {
            let sliced = SlicedPacket::from_ip(&buf[..*size]).unwrap();
            let (Some(etherparse::NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                (sliced.net, sliced.transport)
            else {
                panic!("not IPv4/TCP")
            };
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected);
        }
    }

    #[test]
    fn a_plain_packet_gets_its_checksum_completed() {
        let builder = PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64).udp(1000, 2000);
        let mut packet = Vec::new();
        builder.write(&mut packet, b"hello").unwrap();
        let good = packet.clone();
        // What the kernel hands over with CHECKSUM_PARTIAL: the pseudo-header sum only.
        let pseudo = {
            let src = [198u16 << 8 | 19, 1 << 8 | 2, 198 << 8 | 19, 2 << 8 | 2];
            let mut sum: u32 = src.iter().map(|&w| u32::from(w)).sum::<u32>() + 17 + 13;
            while sum > 0xffff {
                sum = (sum >> 16) + (sum & 0xffff);
            }
            sum as u16
        };
        packet[26..28].copy_from_slice(&pseudo.to_be_bytes());
        let mut read = header(F_NEEDS_CSUM, GSO_NONE, 0, 20, 6).to_vec();
        read.extend_from_slice(&packet);
        let (mut bufs, mut sizes) = buffers(1);
        assert_eq!(split(&mut read, &mut bufs, &mut sizes), Ok(1));
        assert_eq!(&bufs[0][..sizes[0]], &good[..]);
    }

    #[test]
    fn lying_headers_are_refused_without_panicking() {
        let (read, _) = tcp_superpacket(1380, 3);
        let (mut bufs, mut sizes) = buffers(2);
        assert_eq!(
            split(&mut read.clone(), &mut bufs, &mut sizes),
            Err(SplitError::TooManySegments(3))
        );
        let (mut bufs, mut sizes) = buffers(4);
        let mut wrong_version = read.clone();
        wrong_version[1] = GSO_TCPV6;
        assert_eq!(
            split(&mut wrong_version, &mut bufs, &mut sizes),
            Err(SplitError::VersionMismatch)
        );
        let mut zero = read.clone();
        zero[4..6].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(
            split(&mut zero, &mut bufs, &mut sizes),
            Err(SplitError::ZeroSegmentSize)
        );
        assert_eq!(
            split(&mut [0u8; 3], &mut bufs, &mut sizes),
            Err(SplitError::TooShort)
        );
        let mut far_checksum = header(F_NEEDS_CSUM, GSO_NONE, 0, 20, 60000).to_vec();
        far_checksum.extend_from_slice(&read[VNET_HDR_LEN..]);
        assert_eq!(
            split(&mut far_checksum, &mut bufs, &mut sizes),
            Err(SplitError::ChecksumOffset)
        );
        // Random headers over a real packet: errors or packets, never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut fuzzed = read.clone();
            for (i, byte) in fuzzed[..VNET_HDR_LEN].iter_mut().enumerate() {
                *byte = (seed >> ((i % 8) * 8)) as u8;
            }
            let cut = (seed >> 32) as usize % fuzzed.len();
            fuzzed.truncate(cut.max(VNET_HDR_LEN));
            let _ = split(&mut fuzzed, &mut bufs, &mut sizes);
        }
    }
}
