//! Reads from a TUN with offloads: every read starts with a virtio-net header and may carry a
//! superpacket (TSO/USO) standing for many packets, or one packet whose transport checksum
//! the kernel left for us to complete. The TUN worker splits each read where it lies
//! ([`InPlace`]): a packet at a time, each segment's headers written in front of its own
//! payload, so no payload is copied before the AEAD reads it (the copy was ~half of the split's
//! time). [`Split`] writes the packets into the caller's buffers instead, as many at a time as
//! it has (a superpacket at a small MSS has hundreds of segments, more than a batch), and
//! [`split`] does that at once: the reference the in-place split is held to, byte for byte, by
//! the tests and the `tun_read` fuzz target. Sans-IO, so the packet path, its fuzz target and
//! its benchmark share the code.
//!
//! Each segment gets the superpacket's headers with its own lengths, IPv4 ID, TCP sequence
//! number and flags, and checksums; its payload is summed where it lies, or copied and summed
//! in one pass ([`checksum::copy_sum`]) — tun-rs's `gso_split`, which the tests hold this to
//! byte for byte, copies and then sums. Here too are the checks (never trust the header: a
//! forwarded superpacket's `hdr_len` may be the whole first packet, so it is recomputed from
//! the transport header), the resumption between batches, and buffer management: output
//! buffers grow to what a read needs (only when the MTU grows; never in steady state) instead
//! of being sized for the worst case up front.

use thiserror::Error;
use tun_rs::VirtioNetHdr;

use crate::checksum::{self, TCP_CHECKSUM_OFFSET, UDP_CHECKSUM_OFFSET};
use crate::vnet::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN,
};
/// Room after each packet for WireGuard's padding to 16 bytes.
pub const PAD_ROOM: usize = 16;

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
    #[error("a segment would be longer than IP allows")]
    SegmentTooLong,
    #[error("no room behind the read for padding")]
    NoRoom,
}

/// Splits one TUN read (`read` = virtio-net header + packet) into IP packets, written to
/// `bufs[i][..sizes[i]]` from index 0. Returns how many. Buffers grow as needed and keep
/// [`PAD_ROOM`] spare bytes after each packet. All the packets must fit `bufs`; to split a
/// superpacket over several batches, use [`Split`].
pub fn split(
    read: &mut [u8],
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
) -> Result<usize, SplitError> {
    let mut split = Split::new(read)?;
    if split.remaining() > bufs.len() {
        return Err(SplitError::TooManySegments(split.remaining()));
    }
    split.next_into(bufs, sizes)
}

/// One TUN read being split into IP packets, as many at a time as the caller has buffers
/// for: a superpacket may stand for up to 65,535 segments (the kernel's `GSO_MAX_SEGS`;
/// at TCP's smallest MSS a 64 KB superpacket has over 700), far more than a batch holds, so
/// the caller takes a batch's worth, hands it on, and comes back for the rest.
///
/// The read is consumed as it goes: each later run of segments is split from a copy of the
/// headers written just in front of its payload, over payload bytes already split, with
/// the IPv4 ID, TCP sequence number and flags (CWR only on the first segment, PSH and FIN
/// only on the last) of its first segment — so the packets are exactly those of one split.
pub struct Split<'a> {
    /// The IP packet (the read after its virtio-net header), `packet[..len]`; what follows
    /// is room an [`InPlace`] split lends behind each packet.
    packet: &'a mut [u8],
    len: usize,
    kind: Kind,
}

enum Kind {
    /// One packet, its checksum completed; `taken` once written out.
    Plain {
        taken: bool,
    },
    Segmented(Segmented),
}

/// What a superpacket's split needs between runs.
struct Segmented {
    /// Where the transport header starts (the IP header's length).
    csum_start: usize,
    is_v6: bool,
    tcp: bool,
    /// IP + transport header bytes, in front of the payload.
    hdr_len: usize,
    payload: usize,
    segment: usize,
    /// Segments split so far.
    done: usize,
    /// Where the headers of the last run were written (0: the read's own).
    headers_at: usize,
    /// The first segment's IPv4 ID, TCP sequence number and TCP flags.
    ip_id: u16,
    seq: u32,
    flags: u8,
}

const TCP_SEQ_OFFSET: usize = 4;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// Where IPv4 keeps its ID.
const IPV4_ID_OFFSET: usize = 4;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

impl<'a> Split<'a> {
    /// Checks the virtio-net header against the packet (never trust it) and completes a
    /// checksum the kernel left partial.
    pub fn new(read: &'a mut [u8]) -> Result<Split<'a>, SplitError> {
        let len = read.len();
        Split::within(read, len)
    }

    /// [`Split::new`] of the read `buf[..read_len]`, keeping the rest of `buf` in reach.
    fn within(buf: &'a mut [u8], read_len: usize) -> Result<Split<'a>, SplitError> {
        let header = buf
            .get(..VNET_HDR_LEN)
            .filter(|_| read_len >= VNET_HDR_LEN && read_len <= buf.len())
            .ok_or(SplitError::TooShort)?;
        let hdr = VirtioNetHdr::decode(header).map_err(|_| SplitError::TooShort)?;
        let len = read_len - VNET_HDR_LEN;
        let packet = &mut buf[VNET_HDR_LEN..];
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE {
            if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                complete_checksum(&mut packet[..len], hdr.csum_start, hdr.csum_offset)?;
            }
            return Ok(Split {
                packet,
                len,
                kind: Kind::Plain { taken: false },
            });
        }
        if hdr.gso_size == 0 {
            return Err(SplitError::ZeroSegmentSize);
        }
        let is_v6 = match packet.first().map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return Err(SplitError::VersionMismatch),
        };
        let ecn = hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let tcp = match (hdr.gso_type & !VIRTIO_NET_HDR_GSO_ECN, is_v6) {
            (VIRTIO_NET_HDR_GSO_TCPV4, false) | (VIRTIO_NET_HDR_GSO_TCPV6, true) => true,
            (VIRTIO_NET_HDR_GSO_UDP_L4, _) if !ecn => false,
            (
                VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_UDP_L4,
                _,
            ) => return Err(SplitError::VersionMismatch),
            (other, _) => return Err(SplitError::GsoType(other)),
        };
        let expected_offset = if tcp {
            TCP_CHECKSUM_OFFSET
        } else {
            UDP_CHECKSUM_OFFSET
        };
        if usize::from(hdr.csum_offset) != expected_offset {
            return Err(SplitError::ChecksumOffset);
        }
        // The kernel may set hdr_len to the whole first packet on the forwarding path.
        let csum_start = usize::from(hdr.csum_start);
        let ip_header_len = if is_v6 {
            IPV6_HEADER_LEN
        } else {
            IPV4_HEADER_LEN
        };
        if csum_start < ip_header_len {
            return Err(SplitError::TransportHeader);
        }
        let transport_len = if tcp {
            let data_offset = packet[..len]
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
        if hdr_len > len {
            return Err(SplitError::TransportHeader);
        }
        // Every segment's lengths fit their 16-bit fields (IPv6's payload length excludes
        // its fixed header).
        let longest = hdr_len + (len - hdr_len).min(usize::from(hdr.gso_size));
        let ip_len = if is_v6 {
            longest - IPV6_HEADER_LEN
        } else {
            longest
        };
        if ip_len > usize::from(u16::MAX) {
            return Err(SplitError::SegmentTooLong);
        }
        if hdr_len > usize::from(u16::MAX) {
            return Err(SplitError::TransportHeader);
        }
        let ip_id = if is_v6 {
            0
        } else {
            u16::from_be_bytes([packet[IPV4_ID_OFFSET], packet[IPV4_ID_OFFSET + 1]])
        };
        let (seq, flags) = if tcp {
            let t = &packet[csum_start..];
            let seq = &t[TCP_SEQ_OFFSET..TCP_SEQ_OFFSET + 4];
            (
                u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]),
                t[TCP_FLAGS_OFFSET],
            )
        } else {
            (0, 0)
        };
        let payload = len - hdr_len;
        Ok(Split {
            packet,
            len,
            kind: Kind::Segmented(Segmented {
                csum_start,
                is_v6,
                tcp,
                hdr_len,
                payload,
                segment: usize::from(hdr.gso_size),
                done: 0,
                headers_at: 0,
                ip_id,
                seq,
                flags,
            }),
        })
    }

    /// Packets still to come.
    pub fn remaining(&self) -> usize {
        match &self.kind {
            Kind::Plain { taken } => usize::from(!taken),
            Kind::Segmented(s) => s.payload.div_ceil(s.segment) - s.done,
        }
    }

    /// Writes the next packets to `bufs[i][..sizes[i]]` from index 0, as many as `bufs`
    /// holds, and returns how many (0 once none remain). Buffers grow as needed and keep
    /// [`PAD_ROOM`] spare bytes after each packet.
    pub fn next_into(
        &mut self,
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> Result<usize, SplitError> {
        if bufs.is_empty() || sizes.len() < bufs.len() {
            return Err(SplitError::TooManySegments(self.remaining().max(1)));
        }
        let s = match &mut self.kind {
            Kind::Plain { taken } => {
                if std::mem::replace(taken, true) {
                    return Ok(0);
                }
                copy_into(&mut bufs[0], &self.packet[..self.len]);
                sizes[0] = self.len;
                return Ok(1);
            }
            Kind::Segmented(s) => s,
        };
        let count = (s.payload.div_ceil(s.segment) - s.done).min(bufs.len());
        if count == 0 {
            return Ok(0);
        }
        // The run's payload, as offsets into the superpacket's payload.
        let start = s.done * s.segment;
        let end = (start + count * s.segment).min(s.payload);
        // The run's headers go right in front of its payload (for the first run they are
        // there already); the bytes they overwrite belong to segments already split.
        if start > 0 {
            self.packet
                .copy_within(s.headers_at..s.headers_at + s.hdr_len, start);
            s.headers_at = start;
        }
        // Each segment goes at the front of its buffer: the buffer's length is its usable
        // room (only ever grown).
        let room = s.hdr_len + s.segment.min(s.payload) + PAD_ROOM;
        let run = &self.packet[start..s.hdr_len + end];
        for (i, (buf, size)) in bufs[..count].iter_mut().zip(sizes.iter_mut()).enumerate() {
            if buf.len() < room {
                buf.resize(room, 0);
            }
            *size = s.write_segment(run, i, buf);
        }
        s.done += count;
        Ok(count)
    }
}

/// One TUN read split where it lies, a packet at a time: each segment's headers are written
/// just in front of its payload, over the end of the payload before it — so that one must be
/// done with (sealed) before the next is asked for. No payload is copied; the transport
/// checksum sums it where it is. The packets are exactly those of [`split`].
///
/// Each packet is lent with [`PAD_ROOM`] bytes behind it for the caller's padding: there the
/// next segment's payload begins, so those bytes are kept aside and put back before the next
/// packet is made.
pub struct InPlace<'a> {
    split: Split<'a>,
    /// The bytes behind the packet last lent, and where they go back.
    kept: [u8; PAD_ROOM],
    kept_at: Option<usize>,
}

impl<'a> InPlace<'a> {
    /// Splits the read `buf[..len]`; `buf` must have [`PAD_ROOM`] bytes more.
    pub fn new(buf: &'a mut [u8], len: usize) -> Result<InPlace<'a>, SplitError> {
        if len.checked_add(PAD_ROOM).is_none_or(|end| end > buf.len()) {
            return Err(SplitError::NoRoom);
        }
        Ok(InPlace {
            split: Split::within(buf, len)?,
            kept: [0; PAD_ROOM],
            kept_at: None,
        })
    }

    /// Packets still to come.
    pub fn remaining(&self) -> usize {
        self.split.remaining()
    }

    /// The next packet: `(buf, len)` with the packet at `buf[..len]` and `buf[len..]` room the
    /// caller may write over until it asks for the next; `None` once none remain.
    pub fn next_packet(&mut self) -> Option<(&mut [u8], usize)> {
        let packet = &mut *self.split.packet;
        if let Some(at) = self.kept_at.take() {
            packet[at..at + PAD_ROOM].copy_from_slice(&self.kept);
        }
        let s = match &mut self.split.kind {
            Kind::Plain { taken } => {
                if std::mem::replace(taken, true) {
                    return None;
                }
                let len = self.split.len;
                return Some((&mut packet[..len + PAD_ROOM], len));
            }
            Kind::Segmented(s) => s,
        };
        let (i, hdr_len) = (s.done, s.hdr_len);
        let from = i * s.segment;
        if from >= s.payload {
            return None;
        }
        // Segment i's payload starts `hdr_len + from` into the packet: its headers go in
        // front of it, copied from the segment before (the read's own for the first).
        if i > 0 {
            let before = from - s.segment;
            packet.copy_within(before..before + hdr_len, from);
        }
        let end = hdr_len + (from + s.segment).min(s.payload);
        let data_sum = checksum::sum(&packet[from + hdr_len..end], 0);
        s.finish_headers(&mut packet[from..end], i, data_sum);
        s.done += 1;
        // `Self::new` checked the room behind the read's last byte, where the last ends.
        self.kept.copy_from_slice(&packet[end..end + PAD_ROOM]);
        self.kept_at = Some(end);
        Some((&mut packet[from..end + PAD_ROOM], end - from))
    }
}

impl Segmented {
    /// Writes segment `i` of `run` (the run's headers, then its payload) to the front of
    /// `out`, which has room for it; returns its length.
    fn write_segment(&self, run: &[u8], i: usize, out: &mut [u8]) -> usize {
        let hdr_len = self.hdr_len;
        let payload = &run[hdr_len..];
        let from = i * self.segment;
        let data = &payload[from..(from + self.segment).min(payload.len())];
        let total = hdr_len + data.len();
        out[..hdr_len].copy_from_slice(&run[..hdr_len]);
        let data_sum = checksum::copy_sum(&mut out[hdr_len..total], data);
        self.finish_headers(&mut out[..total], self.done + i, data_sum);
        total
    }

    /// Gives `segment` (headers holding those of another segment of this superpacket, then
    /// segment `index`'s payload, which sums to `data_sum`) segment `index`'s own header
    /// fields: its IPv4 ID and TCP sequence number counted from the first segment's, CWR only
    /// if first, FIN and PSH only if last; then its lengths and both checksums.
    fn finish_headers(&self, segment: &mut [u8], index: usize, data_sum: u64) {
        let (hdr_len, csum_start) = (self.hdr_len, self.csum_start);
        let total = segment.len();
        let from = index * self.segment;
        let last = from + (total - hdr_len) == self.payload;
        let out = segment;
        // The lengths fit 16 bits: checked for the longest segment in `Split::new`.
        if self.is_v6 {
            let payload_len = (total - IPV6_HEADER_LEN) as u16;
            out[4..6].copy_from_slice(&payload_len.to_be_bytes());
        } else {
            let id = self.ip_id.wrapping_add(index as u16);
            out[IPV4_ID_OFFSET..IPV4_ID_OFFSET + 2].copy_from_slice(&id.to_be_bytes());
            out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            out[10..12].fill(0);
            let sum = !checksum::fold(checksum::sum(&out[..csum_start], 0));
            out[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let transport_len = (total - csum_start) as u16;
        let (protocol, checksum_at) = if self.tcp {
            let t = &mut out[csum_start..hdr_len];
            let seq = self.seq.wrapping_add(from as u32);
            t[TCP_SEQ_OFFSET..TCP_SEQ_OFFSET + 4].copy_from_slice(&seq.to_be_bytes());
            let mut flags = self.flags;
            if index > 0 {
                flags &= !TCP_CWR;
            }
            if !last {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            t[TCP_FLAGS_OFFSET] = flags;
            (IPPROTO_TCP, csum_start + TCP_CHECKSUM_OFFSET)
        } else {
            out[csum_start + 4..csum_start + 6].copy_from_slice(&transport_len.to_be_bytes());
            (IPPROTO_UDP, csum_start + UDP_CHECKSUM_OFFSET)
        };
        out[checksum_at..checksum_at + 2].fill(0);
        let pseudo = checksum::pseudo_sum(out, self.is_v6, protocol, transport_len);
        let headers = checksum::sum(&out[csum_start..hdr_len], pseudo);
        let mut sum = !checksum::fold(headers + data_sum);
        // UDP sends a computed zero as 0xffff (RFC 768).
        if !self.tcp && sum == 0 {
            sum = 0xffff;
        }
        out[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
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
    let sum = checksum::fold(checksum::sum(&packet[start..], u64::from(initial)));
    // UDP sends a computed zero as 0xffff (RFC 768): zero means "no checksum" over IPv4 and
    // is invalid over IPv6.
    let checksum = match !sum {
        0 if usize::from(csum_offset) == UDP_CHECKSUM_OFFSET => 0xffff,
        other => other,
    };
    packet[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnet::VIRTIO_NET_HDR_F_NEEDS_CSUM as F_NEEDS_CSUM;
    use crate::vnet::VIRTIO_NET_HDR_GSO_NONE as GSO_NONE;
    use crate::vnet::VIRTIO_NET_HDR_GSO_TCPV4 as GSO_TCPV4;
    use crate::vnet::VIRTIO_NET_HDR_GSO_TCPV6 as GSO_TCPV6;
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

    /// A superpacket as the kernel hands it over, of `segments` × `mss` payload bytes (the
    /// last one short by `short`): TCP with CWR and PSH (both must end up on one segment
    /// only) or UDP (USO), over IPv4 or IPv6; the checksum field holds the pseudo-header sum.
    fn superpacket(v6: bool, tcp: bool, mss: u16, segments: usize, short: usize) -> Vec<u8> {
        let len = usize::from(mss) * segments - short;
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let ip = if v6 {
            PacketBuilder::ipv6(
                [0xfd, 0, 0, 0x19, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0xfd, 0, 0, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
        } else {
            PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64)
        };
        let mut packet = Vec::new();
        if tcp {
            let builder = ip.tcp(40000, 5201, 0xffff_ff00, 65535).ack(7).psh().cwr();
            builder.write(&mut packet, &payload).unwrap();
        } else {
            ip.udp(40000, 5201).write(&mut packet, &payload).unwrap();
        }
        let ip_len = if v6 { 40 } else { 20 };
        if !v6 {
            packet[4..6].copy_from_slice(&0xfff0u16.to_be_bytes()); // the IPv4 ID wraps too
        }
        let gso_type = match (tcp, v6) {
            (true, false) => GSO_TCPV4,
            (true, true) => GSO_TCPV6,
            (false, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
        };
        let csum_offset = if tcp {
            TCP_CHECKSUM_OFFSET
        } else {
            UDP_CHECKSUM_OFFSET
        };
        let mut read = header(F_NEEDS_CSUM, gso_type, mss, ip_len, csum_offset as u16).to_vec();
        read.extend_from_slice(&packet);
        read
    }

    /// Splits `read` with [`Split`] into batches of `batch` buffers, as the TUN worker does
    /// when a superpacket has more segments than its batch has room for.
    fn split_in_batches(read: &[u8], batch: usize) -> Vec<Vec<u8>> {
        let mut read = read.to_vec();
        let mut split = Split::new(&mut read).unwrap();
        let (mut bufs, mut sizes) = buffers(batch);
        let mut packets = Vec::new();
        while split.remaining() > 0 {
            let before = split.remaining();
            let n = split.next_into(&mut bufs, &mut sizes).unwrap();
            assert_eq!(
                n,
                before.min(batch),
                "a batch is filled while segments remain"
            );
            for (buf, size) in bufs.iter().zip(&sizes).take(n) {
                assert!(buf.len() >= size + PAD_ROOM, "padding room");
                packets.push(buf[..*size].to_vec());
            }
        }
        assert_eq!(split.next_into(&mut bufs, &mut sizes), Ok(0));
        packets
    }

    #[test]
    fn a_superpacket_of_more_segments_than_a_batch_is_split_whole_over_several_batches() {
        // MSS 88 (the smallest TCP lets a sender ask for): a 64 KB superpacket has 740
        // segments, six batches of 128.
        let read = superpacket(false, true, 88, 740, 0);
        let packets = split_in_batches(&read, 128);
        assert_eq!(packets.len(), 740, "every segment delivered, none dropped");
        let mut joined = Vec::new();
        for (i, packet) in packets.iter().enumerate() {
            let sliced = SlicedPacket::from_ip(packet).unwrap();
            let (Some(etherparse::NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                (sliced.net, sliced.transport)
            else {
                panic!("segment {i} is not IPv4/TCP")
            };
            assert_eq!(
                ip.header().identification(),
                0xfff0u16.wrapping_add(i as u16)
            );
            assert_eq!(
                tcp.sequence_number(),
                0xffff_ff00u32.wrapping_add(88 * i as u32)
            );
            assert_eq!(tcp.cwr(), i == 0, "CWR on the first segment only ({i})");
            assert_eq!(tcp.psh(), i == 739, "PSH on the last segment only ({i})");
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected, "segment {i}");
            assert_eq!(
                ip.header().header_checksum(),
                ip.header().to_header().calc_header_checksum()
            );
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, read[VNET_HDR_LEN + 40..], "the payload, in order");
    }

    #[test]
    fn split_over_batches_or_in_place_gives_exactly_the_packets_of_one_split() {
        for (v6, tcp, mss, segments, short) in [
            (false, true, 88, 740, 0),
            (true, true, 88, 743, 50),
            (false, true, 536, 122, 1),
            (true, true, 1380, 47, 700),
            (false, true, 1448, 45, 1447),
            (false, true, 100, 1, 37),
            // Segments shorter than the headers: in place, each header overlaps the last.
            (false, false, 8, 4000, 3),
            (false, false, 1, 300, 0),
            (true, false, 1200, 54, 0),
        ] {
            let read = superpacket(v6, tcp, mss, segments, short);
            let whole = split_whole(&read);
            assert_eq!(whole.len(), segments);
            assert!(
                split_in_place(&read) == whole,
                "in place: v6 {v6}, tcp {tcp}, MSS {mss}, {segments} segments"
            );
            for batch in [1, 7, 64, 128, segments] {
                assert!(
                    split_in_batches(&read, batch) == whole,
                    "v6 {v6}, tcp {tcp}, MSS {mss}, {segments} segments, batches of {batch}"
                );
            }
            // All at once still needs room for all.
            let (mut bufs, mut sizes) = buffers(segments - 1);
            assert_eq!(
                split(&mut read.clone(), &mut bufs, &mut sizes),
                Err(SplitError::TooManySegments(segments))
            );
        }
    }

    /// Every packet of `read` by one [`split`] (a buffer for each).
    fn split_whole(read: &[u8]) -> Vec<Vec<u8>> {
        let count = Split::new(&mut read.to_vec()).unwrap().remaining();
        let (mut bufs, mut sizes) = buffers(count);
        let n = split(&mut read.to_vec(), &mut bufs, &mut sizes).unwrap();
        assert_eq!(n, count);
        bufs.iter()
            .zip(&sizes)
            .map(|(b, s)| b[..*s].to_vec())
            .collect()
    }

    /// Splits `read` in place as the TUN worker does, writing over each packet's room as the
    /// engine's padding may (with garbage, not zeros, to catch a byte not put back).
    fn split_in_place(read: &[u8]) -> Vec<Vec<u8>> {
        let mut buf = read.to_vec();
        buf.extend_from_slice(&[0xa5; PAD_ROOM]);
        let total = Split::new(&mut read.to_vec()).unwrap().remaining();
        let mut split = InPlace::new(&mut buf, read.len()).unwrap();
        let mut packets = Vec::new();
        while let Some((packet, len)) = split.next_packet() {
            assert_eq!(packet.len(), len + PAD_ROOM, "padding room");
            packets.push(packet[..len].to_vec());
            packet[len..].fill(0xee);
            assert_eq!(split.remaining() + packets.len(), total);
        }
        assert!(split.next_packet().is_none());
        packets
    }

    #[test]
    fn in_place_lends_a_plain_packet_once_its_checksum_completed() {
        let (read, _) = tcp_superpacket(1380, 1);
        let mut plain = header(F_NEEDS_CSUM, GSO_NONE, 0, 20, 16).to_vec();
        plain.extend_from_slice(&read[VNET_HDR_LEN..]);
        let (mut bufs, mut sizes) = buffers(1);
        assert_eq!(split(&mut plain.clone(), &mut bufs, &mut sizes), Ok(1));
        assert_eq!(split_in_place(&plain), vec![bufs[0][..sizes[0]].to_vec()]);
    }

    #[test]
    fn in_place_needs_room_behind_the_read_and_refuses_lies_as_the_split_does() {
        let (read, _) = tcp_superpacket(1380, 3);
        let mut buf = read.clone();
        buf.extend_from_slice(&[0; PAD_ROOM - 1]);
        assert_eq!(
            InPlace::new(&mut buf, read.len()).err(),
            Some(SplitError::NoRoom)
        );
        assert_eq!(
            InPlace::new(&mut buf, usize::MAX).err(),
            Some(SplitError::NoRoom)
        );
        buf.push(0);
        let mut zero = buf.clone();
        zero[4..6].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(
            InPlace::new(&mut zero, read.len()).err(),
            Some(SplitError::ZeroSegmentSize)
        );
        // A read shorter than its header, with room behind it.
        assert_eq!(
            InPlace::new(&mut [0u8; 3 + PAD_ROOM], 3).err(),
            Some(SplitError::TooShort)
        );
        // The packet's own length comes from the read, not from the buffer behind it.
        let mut cut = buf.clone();
        cut.extend_from_slice(&[0x77; 100]);
        let mut split = InPlace::new(&mut cut, read.len() - 1000).unwrap();
        let mut total = 0;
        while let Some((_, len)) = split.next_packet() {
            total += len - 40;
        }
        assert_eq!(total, 3 * 1380 - 1000);
    }

    #[test]
    fn segments_are_byte_for_byte_those_of_tun_rs_gso_split() {
        for (v6, tcp, mss, segments, short) in [
            (false, true, 1380, 47, 0),
            (false, true, 1448, 45, 1447),
            (true, true, 1380, 47, 700),
            (true, true, 88, 743, 50),
            (false, true, 536, 122, 1),
            (false, false, 1200, 54, 3),
            (true, false, 8, 4000, 0),
            (false, true, 100, 1, 37),
        ] {
            let read = superpacket(v6, tcp, mss, segments, short);
            let (mut bufs, mut sizes) = buffers(segments);
            let n = split(&mut read.clone(), &mut bufs, &mut sizes).unwrap();
            let ours: Vec<&[u8]> = bufs.iter().zip(&sizes).map(|(b, s)| &b[..*s]).collect();

            let mut hdr = VirtioNetHdr::decode(&read[..VNET_HDR_LEN]).unwrap();
            let ip_len = usize::from(hdr.csum_start);
            hdr.hdr_len = (ip_len + if tcp { 20 } else { 8 }) as u16;
            let mut input = read[VNET_HDR_LEN..].to_vec();
            let mut theirs = vec![vec![0u8; usize::from(hdr.hdr_len + mss)]; segments];
            let mut their_sizes = vec![0; segments];
            let m =
                tun_rs::gso_split(&mut input, hdr, &mut theirs, &mut their_sizes, 0, v6).unwrap();
            assert_eq!((n, m), (segments, segments));
            for (i, (a, (b, size))) in ours.iter().zip(theirs.iter().zip(&their_sizes)).enumerate()
            {
                assert!(
                    *a == &b[..*size],
                    "v6 {v6}, tcp {tcp}, MSS {mss}: segment {i} differs"
                );
            }
        }
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
        let mut udp_offset = read.clone();
        udp_offset[8..10].copy_from_slice(&(UDP_CHECKSUM_OFFSET as u16).to_ne_bytes());
        assert_eq!(
            split(&mut udp_offset, &mut bufs, &mut sizes),
            Err(SplitError::ChecksumOffset)
        );
        let mut inside_ip = read.clone();
        inside_ip[6..8].copy_from_slice(&12u16.to_ne_bytes());
        assert_eq!(
            split(&mut inside_ip, &mut bufs, &mut sizes),
            Err(SplitError::TransportHeader)
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
