//! `gro_coalesce`: a batch of decrypted packets through the TUN writer's GRO coalescer
//! (`tailsk8s_dataplane::gro::Coalescer`).
//!
//! The input describes up to [`MAX_FLOWS`] flows (TCP or UDP, IPv4 or IPv6, addresses and
//! ports from small sets so flows collide, TTL, ToS, DF, flow label, sequence and ACK numbers,
//! window, MSS, TCP timestamps) and then up to [`MAX_PACKETS`] packets (see [`Packet`]):
//! mostly the next segment of a flow (contiguous, retransmitted, after a gap or anywhere; full
//! or short; PSH; ACK, window, TTL, ToS, flow label or IPv4 ID changed), some of them broken
//! (bad checksum, cut short, other TCP flags, no payload, a fragment, IP options, a byte
//! overwritten, bytes appended), and raw bytes. Segments carry correct checksums and a
//! payload stamped with their index, so every packet of a batch is distinct.
//!
//! The packets are pushed into a coalescer (a fresh one, and one that has just coalesced
//! another batch, as the outbox's has: both must write the same), and every buffer it would
//! write is split again by `offload::split`, header at offset 0 — what the kernel does with a
//! superpacket written to the TUN, and what our reader does with one read from it.
//! Invariants:
//! - every written buffer splits; a buffer written without GSO has a zero header; every
//!   segment of a superpacket has valid checksums;
//! - the split packets are exactly the batch, byte for byte, as a multiset (nothing blanked:
//!   the IPv4 ID, the window, the flow label and PSH all come back as they went in);
//! - a superpacket only holds packets the harness finds mergeable (see [`mergeable`]), of one
//!   connection;
//! - order: the written buffers, each named by its earliest packet, are in batch order, and
//!   the packets of one connection (any packet whose ports can be read, mergeable or not) are
//!   written in batch order.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use tailsk8s_dataplane::gro::Coalescer;
use tailsk8s_dataplane::offload;
use tailsk8s_dataplane::vnet::VNET_HDR_LEN;
use tun_rs::VirtioNetHdr;

use crate::headers::{self, Ip, Segment, Transport, ACK, GSO_NONE, PSH, TCP, UDP};
use crate::input::{Choices, Writer};

/// The outbox flushes after at most one UDP batch of 128 datagrams.
pub const MAX_PACKETS: usize = 128;
pub const MAX_FLOWS: usize = 4;
/// Largest payload a generated segment carries (the MSS of a 1500-byte MTU and some).
const MAX_PAYLOAD: u16 = 1500;

/// One flow. Encoding: a shape byte (bit 0 IPv6, bit 1 UDP, bit 2 DF clear, bit 3 TCP
/// timestamps), the host and port picks (bytes), TTL, ToS, flow label (u32), initial sequence
/// and ACK numbers (u32), window and MSS (u16; MSS 0 means 1380).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    pub shape: u8,
    pub hosts: u8,
    pub ports: u8,
    pub ttl: u8,
    pub tos: u8,
    pub flow_label: u32,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub mss: u16,
}

pub const V6: u8 = 1;
pub const DATAGRAMS: u8 = 2;
pub const NO_DF: u8 = 4;
pub const TIMESTAMPS: u8 = 8;

impl Flow {
    fn decode(c: &mut Choices<'_>) -> Flow {
        Flow {
            shape: c.byte(),
            hosts: c.byte(),
            ports: c.byte(),
            ttl: c.byte(),
            tos: c.byte(),
            flow_label: c.u32(),
            seq: c.u32(),
            ack: c.u32(),
            window: c.u16(),
            mss: c.u16(),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.byte(self.shape)
            .byte(self.hosts)
            .byte(self.ports)
            .byte(self.ttl)
            .byte(self.tos)
            .u32(self.flow_label)
            .u32(self.seq)
            .u32(self.ack)
            .u16(self.window)
            .u16(self.mss);
    }
}

/// One packet of the batch. Encoding: `kind`, `flow`, `len` (u16), `seq`, `arg` (u32),
/// `tweaks`, `how`, `at` (u16), `value`, and for kind 7 a length-prefixed payload.
///
/// - `kind % 8` 0–5: the next segment of flow `flow % flows`; 6: such a segment, broken;
///   7: the raw bytes (one zero byte if empty: the engine never writes an empty packet).
/// - `len`: 0 = the flow's MSS, else `len % 1501` payload bytes.
/// - `seq % 8` 0–4: right after the flow's last segment; 5: the last segment's sequence
///   again (a retransmission); 6: a gap of `arg % 4096 + 1` bytes; 7: `arg`.
/// - `tweaks` bits: 0 PSH; 1 the ACK number advances by `arg % 65536` (for the rest of the
///   flow); 2 the window becomes `arg` (for the rest of the flow); 3 this packet's TTL
///   differs; 4 this packet's ToS / traffic class differs; 5 this packet's IPv4 ID is `arg`
///   instead of the next one; 6 this packet's IPv6 flow label differs.
/// - `how % 8` for kind 6: 0 checksum byte flipped; 1 cut to `at % len + 1` bytes; 2 TCP flags
///   `value` (UDP: the length field leaves
///   out the last byte), checksum as a sender computes it; 3 no payload; 4 an IPv4
///   fragment (IPv6: as 0); 5 an IPv4 option word (IPv6: as 0); 6 byte `at % len` set to
///   `value`; 7 `at % 64 + 1` bytes `value` appended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    pub kind: u8,
    pub flow: u8,
    pub len: u16,
    pub seq: u8,
    pub arg: u32,
    pub tweaks: u8,
    pub how: u8,
    pub at: u16,
    pub value: u8,
    pub raw: Vec<u8>,
}

impl Packet {
    fn decode(c: &mut Choices<'_>) -> Packet {
        let mut p = Packet {
            kind: c.byte(),
            flow: c.byte(),
            len: c.u16(),
            seq: c.byte(),
            arg: c.u32(),
            tweaks: c.byte(),
            how: c.byte(),
            at: c.u16(),
            value: c.byte(),
            raw: Vec::new(),
        };
        if p.kind % 8 == 7 {
            p.raw = c.bytes().to_vec();
        }
        p
    }

    fn encode(&self, w: &mut Writer) {
        w.byte(self.kind)
            .byte(self.flow)
            .u16(self.len)
            .byte(self.seq)
            .u32(self.arg)
            .byte(self.tweaks)
            .byte(self.how)
            .u16(self.at)
            .byte(self.value);
        if self.kind % 8 == 7 {
            w.bytes(&self.raw);
        }
    }
}

/// A whole input: whether the TUN has UDP GRO (USO), the flows, the packets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Input {
    pub can_udp_gro: bool,
    pub flows: Vec<Flow>,
    pub packets: Vec<Packet>,
}

impl Input {
    pub fn decode(data: &[u8]) -> Input {
        let mut c = Choices::new(data);
        let can_udp_gro = c.bool();
        let flows = (0..=c.below(MAX_FLOWS))
            .map(|_| Flow::decode(&mut c))
            .collect();
        let mut packets = Vec::new();
        while !c.is_empty() && packets.len() < MAX_PACKETS {
            packets.push(Packet::decode(&mut c));
        }
        Input {
            can_udp_gro,
            flows,
            packets,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.byte(u8::from(self.can_udp_gro));
        w.byte((self.flows.len().clamp(1, MAX_FLOWS) - 1) as u8);
        for flow in &self.flows {
            flow.encode(&mut w);
        }
        for packet in &self.packets {
            packet.encode(&mut w);
        }
        w.finish()
    }
}

/// A flow while its packets are generated.
struct FlowState {
    spec: Flow,
    next_seq: u32,
    last_seq: u32,
    ack: u32,
    window: u16,
    next_id: u16,
}

impl FlowState {
    fn new(spec: &Flow) -> FlowState {
        FlowState {
            spec: spec.clone(),
            next_seq: spec.seq,
            last_seq: spec.seq,
            ack: spec.ack,
            window: spec.window,
            next_id: spec.seq as u16,
        }
    }

    fn mss(&self) -> usize {
        match self.spec.mss {
            0 => 1380,
            mss => usize::from(mss % MAX_PAYLOAD + 1),
        }
    }

    fn addresses(&self) -> (IpAddr, IpAddr) {
        let (a, b) = (self.spec.hosts & 1, (self.spec.hosts >> 1) & 1);
        let text = if self.spec.shape & V6 != 0 {
            (
                format!("fd00:19:1::{}", a + 2),
                format!("fd00:19:2::{}", b + 2),
            )
        } else {
            (format!("198.19.1.{}", a + 2), format!("198.19.2.{}", b + 2))
        };
        (
            crate::support::ip_addr(&text.0),
            crate::support::ip_addr(&text.1),
        )
    }

    /// The segment `p` describes (index `index` in the batch); advances the flow.
    fn segment(&mut self, p: &Packet, index: usize) -> Segment {
        let payload_len = match p.len {
            0 => self.mss(),
            len => usize::from(len % (MAX_PAYLOAD + 1)),
        };
        let seq = match p.seq % 8 {
            5 => self.last_seq,
            6 => self.next_seq.wrapping_add(p.arg % 4096 + 1),
            7 => p.arg,
            _ => self.next_seq,
        };
        let tweak = |bit: u8| p.tweaks & (1 << bit) != 0;
        if tweak(1) {
            self.ack = self.ack.wrapping_add(p.arg % 65536);
        }
        if tweak(2) {
            self.window = p.arg as u16;
        }
        let (src, dst) = self.addresses();
        let mut ip = Ip::new(src, dst);
        ip.ttl = self.spec.ttl ^ u8::from(tweak(3));
        ip.tos = self.spec.tos ^ if tweak(4) { 1 } else { 0 };
        ip.df = self.spec.shape & NO_DF == 0;
        ip.flow_label = (self.spec.flow_label ^ u32::from(tweak(6))) & 0xf_ffff;
        ip.id = if tweak(5) { p.arg as u16 } else { self.next_id };
        self.next_id = self.next_id.wrapping_add(1);
        let ports = (
            40000 + u16::from(self.spec.ports & 3),
            443 + u16::from((self.spec.ports >> 2) & 1),
        );
        let transport = if self.spec.shape & DATAGRAMS != 0 {
            Transport::Udp {
                src_port: ports.0,
                dst_port: ports.1,
            }
        } else {
            Transport::Tcp {
                src_port: ports.0,
                dst_port: ports.1,
                seq,
                ack: self.ack,
                flags: if tweak(0) { ACK | PSH } else { ACK },
                window: self.window,
                options: if self.spec.shape & TIMESTAMPS != 0 {
                    vec![1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 2, 0]
                } else {
                    Vec::new()
                },
            }
        };
        self.last_seq = seq;
        self.next_seq = seq.wrapping_add(payload_len as u32);
        Segment {
            ip,
            transport,
            payload: stamped(index, payload_len),
        }
    }
}

/// A payload that names its packet: the index in its first bytes.
fn stamped(index: usize, len: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..len).map(|k| (index + k) as u8 ^ 0x5a).collect();
    let stamp = (index as u16).to_be_bytes();
    match len {
        0 => {}
        1 => payload[0] = stamp[1],
        _ => payload[..2].copy_from_slice(&stamp),
    }
    payload
}

/// A segment made invalid in the way `p.how` says.
fn broken(mut segment: Segment, p: &Packet) -> Vec<u8> {
    let v4 = !segment.ip.is_v6();
    let (src, dst) = (segment.ip.src, segment.ip.dst);
    match p.how % 8 {
        2 => match &mut segment.transport {
            Transport::Tcp { flags, .. } => {
                *flags = p.value;
                return segment.build();
            }
            Transport::Udp { .. } => {
                let mut packet = segment.build();
                let at = segment.ip_header_len() + 4;
                let len = u16::from_be_bytes([packet[at], packet[at + 1]]).wrapping_sub(1);
                packet[at..at + 2].copy_from_slice(&len.to_be_bytes());
                // One trailing byte beyond the datagram, checksummed as a sender does: over
                // the datagram the length field describes.
                let field = segment.checksum_at();
                packet[field..field + 2].fill(0);
                let (start, end) = (segment.ip_header_len(), packet.len() - 1);
                let pseudo = headers::pseudo_sum(src, dst, UDP, end - start);
                let checksum = match !headers::sum(&packet[start..end], u32::from(pseudo)) {
                    0 => 0xffff,
                    c => c,
                };
                packet[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
                return packet;
            }
        },
        3 => {
            segment.payload.clear();
            return segment.build();
        }
        4 if v4 => {
            segment.ip.more_fragments = true;
            segment.ip.fragment_offset = p.at & 0x1fff;
            return segment.build();
        }
        5 if v4 => {
            segment.ip.options = vec![1, 1, 1, 1];
            return segment.build();
        }
        _ => {}
    }
    let mut packet = segment.build();
    let len = packet.len();
    match p.how % 8 {
        1 => packet.truncate(usize::from(p.at) % len + 1),
        6 => packet[usize::from(p.at) % len] = p.value,
        7 => packet.extend(std::iter::repeat_n(p.value, usize::from(p.at % 64) + 1)),
        _ => {
            let at = segment.checksum_at();
            packet[at] ^= 0x40;
        }
    }
    packet
}

/// The batch an input describes.
pub fn packets(input: &Input) -> Vec<Vec<u8>> {
    let mut flows: Vec<FlowState> = input.flows.iter().map(FlowState::new).collect();
    if flows.is_empty() {
        flows.push(FlowState::new(&Flow::default()));
    }
    let count = flows.len();
    input
        .packets
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let flow = &mut flows[usize::from(p.flow) % count];
            match p.kind % 8 {
                7 if p.raw.is_empty() => vec![0],
                7 => p.raw.clone(),
                6 => {
                    // A broken segment takes no sequence space from its flow.
                    let (next, last) = (flow.next_seq, flow.last_seq);
                    let segment = flow.segment(p, index);
                    (flow.next_seq, flow.last_seq) = (next, last);
                    broken(segment, p)
                }
                _ => flow.segment(p, index).build(),
            }
        })
        .collect()
}

/// Runs the coalescer over `packets` as the outbox does; returns the buffers to write, in
/// write order. A coalescer that has just coalesced another batch (the reversed one) must
/// write exactly what a fresh one writes.
pub fn coalesce(packets: &[Vec<u8>], can_udp_gro: bool) -> Vec<Vec<u8>> {
    let run = |c: &mut Coalescer| -> Vec<Vec<u8>> {
        c.clear();
        for p in packets {
            c.push(p);
        }
        c.written().map(<[u8]>::to_vec).collect()
    };
    let mut fresh = Coalescer::new();
    fresh.set_udp_gso(can_udp_gro);
    let written = run(&mut fresh);
    let mut reused = Coalescer::new();
    reused.set_udp_gso(can_udp_gro);
    for p in packets.iter().rev() {
        reused.push(p);
    }
    assert!(
        run(&mut reused) == written,
        "a reused coalescer writes differently from a fresh one"
    );
    written
}

/// A TCP/UDP connection: protocol, addresses, ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Connection {
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ports: (u16, u16),
}

/// A packet GRO may merge, by the harness's own (looser) reading of the rules: honest lengths, IPv4 without options and not a
/// fragment, IPv6 without extension headers; TCP with flags ACK or ACK|PSH, or UDP (only when
/// the TUN has UDP GRO) with an honest length field; a payload; a transport checksum that
/// verifies. Returns its connection, and for TCP its sequence range (seq, payload length).
pub fn mergeable(p: &[u8], can_udp_gro: bool) -> Option<(Connection, Option<(u32, usize)>)> {
    let parsed = headers::parse(p)?;
    if !parsed.v6 && (parsed.ip_len != 20 || p[6] & 0x20 != 0 || (p[6] & 0x1f, p[7]) != (0, 0)) {
        return None;
    }
    let transport = &p[parsed.ip_len..];
    if transport.len() < 8 || headers::transport_sum_verifies(p) != Some(true) {
        return None;
    }
    let ports = (
        u16::from_be_bytes([transport[0], transport[1]]),
        u16::from_be_bytes([transport[2], transport[3]]),
    );
    let connection = Connection {
        protocol: parsed.protocol,
        src: parsed.src,
        dst: parsed.dst,
        ports,
    };
    match parsed.protocol {
        TCP => {
            let header_len = usize::from(*transport.get(12)? >> 4) * 4;
            let flags = *transport.get(13)?;
            let payload = transport.len().checked_sub(header_len)?;
            let shaped = header_len >= 20 && (flags == ACK || flags == ACK | PSH);
            let seq = u32::from_be_bytes([transport[4], transport[5], transport[6], transport[7]]);
            (shaped && payload > 0).then_some((connection, Some((seq, payload))))
        }
        UDP => {
            let length = usize::from(u16::from_be_bytes([transport[4], transport[5]]));
            (can_udp_gro && length == transport.len() && transport.len() > 8)
                .then_some((connection, None))
        }
        _ => None,
    }
}

/// The target body.
pub fn run(data: &[u8]) {
    let input = Input::decode(data);
    let batch = packets(&input);
    if batch.is_empty() {
        return;
    }
    let bufs = coalesce(&batch, input.can_udp_gro);
    let written = resplit(&bufs);
    let groups = match_inputs(&batch, &written);
    check_groups(&batch, &groups, input.can_udp_gro);
    check_order(&batch, &groups);
}

/// Splits every buffer the writer would write, as the kernel would; returns their packets.
fn resplit(bufs: &[Vec<u8>]) -> Vec<Vec<Vec<u8>>> {
    let mut out = vec![Vec::new(); MAX_PACKETS];
    let mut sizes = vec![0usize; MAX_PACKETS];
    bufs.iter()
        .enumerate()
        .map(|(i, buf)| {
            let mut read = buf.clone();
            let hdr = VirtioNetHdr::decode(&read).unwrap_or_else(|e| panic!("buffer {i}: {e}"));
            let count = match offload::split(&mut read[..], &mut out, &mut sizes) {
                Ok(count) => count,
                Err(e) => panic!("written buffer {i} ({hdr:?}) does not split: {e}"),
            };
            let segments: Vec<Vec<u8>> = out
                .iter()
                .zip(&sizes)
                .take(count)
                .map(|(buf, &size)| buf[..size].to_vec())
                .collect();
            if hdr.gso_type == GSO_NONE {
                assert!(
                    hdr.flags == 0 && buf[..VNET_HDR_LEN] == [0; VNET_HDR_LEN],
                    "buffer {i} is written without GSO but its header is not zero: {hdr:?}"
                );
            } else {
                assert_eq!(hdr.flags, headers::F_NEEDS_CSUM, "superpacket {i}: {hdr:?}");
                assert!(count > 1, "superpacket {i} of one segment: {hdr:?}");
                for (k, segment) in segments.iter().enumerate() {
                    assert!(
                        headers::ipv4_header_checksum_ok(segment) != Some(false)
                            && headers::transport_checksum_ok(segment) == Some(true),
                        "segment {k} of superpacket {i} ({hdr:?}) has a bad checksum"
                    );
                }
            }
            segments
        })
        .collect()
}

/// Names every written packet by its input index; panics unless the written packets are the
/// batch, byte for byte, as a multiset. Returns the index groups in write order.
fn match_inputs(batch: &[Vec<u8>], written: &[Vec<Vec<u8>>]) -> Vec<Vec<usize>> {
    let mut unmatched: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    for (i, p) in batch.iter().enumerate().rev() {
        unmatched.entry(p.clone()).or_default().push(i);
    }
    let groups: Vec<Vec<usize>> = written
        .iter()
        .enumerate()
        .map(|(n, segments)| {
            segments
                .iter()
                .enumerate()
                .map(|(k, segment)| {
                    let candidates = unmatched.get_mut(segment);
                    match candidates.and_then(Vec::pop) {
                        Some(i) => i,
                        None => panic!(
                            "written buffer {n}, packet {k} is no packet of the batch (or one \
                             written twice): {segment:02x?}"
                        ),
                    }
                })
                .collect()
        })
        .collect();
    let mut lost: Vec<usize> = unmatched.into_values().flatten().collect();
    lost.sort_unstable();
    assert!(lost.is_empty(), "packets {lost:?} were never written");
    groups
}

/// Superpackets hold only mergeable packets of one connection.
fn check_groups(batch: &[Vec<u8>], groups: &[Vec<usize>], can_udp_gro: bool) {
    for group in groups.iter().filter(|g| g.len() > 1) {
        let mut connections = group
            .iter()
            .map(|&i| match mergeable(&batch[i], can_udp_gro) {
                Some((connection, _)) => connection,
                None => panic!("packet {i} was merged ({group:?}) but is not mergeable"),
            });
        let first = connections.next();
        assert!(
            connections.all(|c| Some(c) == first),
            "superpacket {group:?} mixes connections"
        );
    }
}

/// Any TCP/UDP packet whose IP header parses and whose ports are there, mergeable or not.
fn connection(p: &[u8]) -> Option<Connection> {
    let parsed = headers::parse(p)?;
    let ports = p.get(parsed.ip_len..parsed.ip_len + 4)?;
    (parsed.protocol == TCP || parsed.protocol == UDP).then(|| Connection {
        protocol: parsed.protocol,
        src: parsed.src,
        dst: parsed.dst,
        ports: (
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        ),
    })
}

/// Order, per the module documentation: nothing is ever pulled forward past a packet of its
/// connection, whether that one was merged or not.
fn check_order(batch: &[Vec<u8>], groups: &[Vec<usize>]) {
    let earliest: Vec<usize> = groups
        .iter()
        .filter_map(|g| g.iter().min().copied())
        .collect();
    assert!(
        earliest.windows(2).all(|w| w[0] < w[1]),
        "written buffers are not in the order of their earliest packets: {groups:?}"
    );
    let mut connections: BTreeMap<Connection, Vec<usize>> = BTreeMap::new();
    for i in groups.iter().flatten().copied() {
        if let Some(connection) = connection(&batch[i]) {
            connections.entry(connection).or_default().push(i);
        }
    }
    for (connection, order) in connections {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{connection:?}: packets written in the order {order:?}"
        );
    }
}

/// Seeds: bulk TCP over both families (one superpacket, and more than 64 KiB), UDP with and
/// without UDP GRO, interleaved flows, out-of-order and retransmitted segments, PSH in the
/// middle or before an earlier segment, changing ACK numbers, windows and IP fields, every
/// kind of broken segment and raw bytes.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let tcp4 = Flow {
        ttl: 64,
        seq: 1_000_000,
        ack: 77,
        window: 502,
        ..Flow::default()
    };
    let tcp6 = Flow {
        shape: V6 | TIMESTAMPS,
        hosts: 1,
        flow_label: 0x12345,
        mss: 1348,
        ..tcp4.clone()
    };
    let udp4 = Flow {
        shape: DATAGRAMS,
        ports: 1,
        mss: 1392,
        ..tcp4.clone()
    };
    let udp6 = Flow {
        shape: DATAGRAMS | V6,
        ports: 2,
        mss: 1372,
        ..tcp4.clone()
    };
    let next = |flow: u8| Packet {
        flow,
        ..Packet::default()
    };
    let short = |flow: u8, len: u16| Packet { len, ..next(flow) };
    let tweaked = |flow: u8, tweaks: u8, arg: u32| Packet {
        tweaks,
        arg,
        ..next(flow)
    };
    let seq = |flow: u8, seq: u8, arg: u32| Packet {
        seq,
        arg,
        ..next(flow)
    };
    let broken = |flow: u8, how: u8, at: u16, value: u8| Packet {
        kind: 6,
        how,
        at,
        value,
        ..next(flow)
    };
    let raw = |bytes: &[u8]| Packet {
        kind: 7,
        raw: bytes.to_vec(),
        ..Packet::default()
    };
    let bulk = |flow: u8, n: usize| -> Vec<Packet> {
        let mut packets = vec![next(flow); n];
        if let Some(last) = packets.last_mut() {
            last.tweaks = 1; // PSH
        }
        packets
    };
    let input = |can_udp_gro: bool, flows: &[&Flow], packets: Vec<Packet>| {
        Input {
            can_udp_gro,
            flows: flows.iter().map(|f| (*f).clone()).collect(),
            packets,
        }
        .encode()
    };
    let mut interleaved = Vec::new();
    for _ in 0..6 {
        interleaved.extend([next(0), next(1), next(2), next(3)]);
    }
    let same_hosts_other_port = Flow {
        ports: 3,
        ..tcp4.clone()
    };
    vec![
        ("tcp4-bulk", input(false, &[&tcp4], bulk(0, 16))),
        ("tcp6-bulk-timestamps", input(false, &[&tcp6], bulk(0, 12))),
        ("tcp4-over-64k", input(false, &[&tcp4], bulk(0, 60))),
        (
            "udp4-uso",
            input(true, &[&udp4], [bulk(0, 8), vec![short(0, 100)]].concat()),
        ),
        ("udp6-without-udp-gro", input(false, &[&udp6], bulk(0, 6))),
        ("udp6-uso", input(true, &[&udp6], bulk(0, 6))),
        (
            "interleaved-flows",
            input(
                true,
                &[&tcp4, &udp6, &tcp6, &same_hosts_other_port],
                interleaved,
            ),
        ),
        (
            "tcp-out-of-order",
            input(
                false,
                &[&tcp4],
                vec![
                    next(0),
                    seq(0, 6, 1379), // a gap of one segment
                    next(0),
                    seq(0, 7, 1_001_380), // the missing segment
                    seq(0, 5, 0),         // retransmitted
                    next(0),
                    short(0, 10),
                    next(0),
                ],
            ),
        ),
        (
            "tcp-psh-middle",
            input(
                false,
                &[&tcp4],
                vec![
                    next(0),
                    tweaked(0, 1, 0),
                    next(0),
                    next(0),
                    short(0, 200),
                    next(0),
                ],
            ),
        ),
        (
            "tcp-changing-fields",
            input(
                false,
                &[&tcp4, &tcp6],
                vec![
                    next(0),
                    next(0),
                    tweaked(0, 2, 1380), // ACK advances
                    next(0),
                    tweaked(0, 8, 0), // TTL differs
                    next(0),
                    tweaked(0, 16, 0), // ToS differs
                    tweaked(0, 32, 9), // IPv4 ID jumps
                    next(0),
                    next(1),
                    tweaked(1, 16, 0), // traffic class differs
                    next(1),
                ],
            ),
        ),
        (
            "tcp-window-and-flow-label-change",
            input(
                false,
                &[&tcp4, &tcp6],
                vec![
                    next(0),
                    tweaked(0, 4, 600), // window changes (for the rest of the flow)
                    next(0),
                    next(1),
                    tweaked(1, 64, 0), // flow label differs
                    next(1),
                ],
            ),
        ),
        (
            "tcp-psh-then-earlier",
            input(
                false,
                &[&tcp4],
                vec![
                    Packet {
                        tweaks: 1, // PSH
                        ..seq(0, 6, 1379)
                    },
                    seq(0, 7, 1_000_000),
                    next(0),
                ],
            ),
        ),
        (
            "broken-segments",
            input(
                true,
                &[&tcp4, &udp4],
                vec![
                    next(0),
                    broken(0, 0, 0, 0),
                    next(0),
                    broken(0, 1, 30, 0),
                    next(0),
                    broken(0, 2, 0, 0x12), // SYN|ACK
                    broken(0, 2, 0, 0x11), // FIN|ACK
                    next(0),
                    broken(0, 3, 0, 0),
                    next(0),
                    broken(0, 4, 0, 0),
                    broken(0, 5, 0, 0),
                    next(0),
                    broken(0, 6, 45, 1),
                    broken(0, 7, 3, 0),
                    next(0),
                    next(1),
                    broken(1, 2, 0, 0),
                    next(1),
                    broken(1, 3, 0, 0),
                    next(1),
                    raw(&[0x45, 0, 0, 20]),
                    raw(&[]),
                    next(1),
                ],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_round_trip_through_their_encoding() {
        for (name, bytes) in seeds() {
            let decoded = Input::decode(&bytes);
            assert_eq!(decoded.encode(), bytes, "{name}");
        }
    }

    #[test]
    fn generated_segments_are_mergeable_and_distinct() {
        let input = Input::decode(&seeds()[0].1);
        let batch = packets(&input);
        assert_eq!(batch.len(), 16);
        let mut seqs = Vec::new();
        for p in &batch {
            let Some((_, Some((seq, len)))) = mergeable(p, false) else {
                panic!("bulk segment not mergeable: {p:02x?}");
            };
            assert_eq!(len, 1380);
            seqs.push(seq);
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1380), "{seqs:?}");
        let distinct: std::collections::HashSet<_> = batch.iter().collect();
        assert_eq!(distinct.len(), batch.len());
    }

    #[test]
    fn bulk_segments_coalesce_into_one_superpacket_that_splits_back() {
        let input = Input::decode(&seeds()[0].1);
        let batch = packets(&input);
        let bufs = coalesce(&batch, false);
        assert_eq!(bufs.len(), 1, "one superpacket");
        let written = resplit(&bufs);
        assert_eq!(
            match_inputs(&batch, &written),
            vec![(0..16).collect::<Vec<_>>()]
        );
    }

    /// The seeds reach the coalescer's interesting paths: whole superpackets, the 64 KiB
    /// limit, UDP with and without UDP GRO, one superpacket per interleaved flow.
    #[test]
    fn seeds_coalesce_as_designed() {
        let expected = [
            ("tcp4-bulk", 1),
            ("tcp6-bulk-timestamps", 1),
            ("tcp4-over-64k", 2),
            ("udp4-uso", 1),
            ("udp6-without-udp-gro", 6),
            ("udp6-uso", 1),
            ("interleaved-flows", 4),
            // Window change: [0] [1 2]; flow label: [3] [4] [5].
            ("tcp-window-and-flow-label-change", 5),
            // [PSH segment] [the one before it, the one after that].
            ("tcp-psh-then-earlier", 2),
        ];
        let seeds = seeds();
        for (name, buffers) in expected {
            let Some((_, bytes)) = seeds.iter().find(|(n, _)| *n == name) else {
                panic!("no seed {name}");
            };
            let input = Input::decode(bytes);
            let bufs = coalesce(&packets(&input), input.can_udp_gro);
            assert_eq!(bufs.len(), buffers, "{name}");
        }
    }

    /// What tun-rs got wrong (and the target tolerated until it had its own coalescer):
    /// segments whose window or flow label differ are not merged, and so come back with
    /// their own.
    #[test]
    fn different_windows_and_flow_labels_are_not_merged() {
        let tcp4 = Flow {
            mss: 1000,
            window: 502,
            ..Flow::default()
        };
        let tcp6 = Flow {
            shape: V6,
            ..tcp4.clone()
        };
        // The IPv4 TCP window; the IPv6 flow label.
        for (flow, tweaks, field) in [(tcp4, 1 << 2, 34..36), (tcp6, 1 << 6, 1..4)] {
            let changed = Packet {
                tweaks,
                arg: 9000,
                ..Packet::default()
            };
            let input = Input {
                can_udp_gro: false,
                flows: vec![flow],
                packets: vec![Packet::default(), changed.clone(), changed],
            };
            let batch = packets(&input);
            assert_ne!(batch[0][field.clone()], batch[1][field.clone()]);
            assert_eq!(batch[1][field.clone()], batch[2][field.clone()]);
            let bufs = coalesce(&batch, false);
            let written = resplit(&bufs);
            assert_eq!(match_inputs(&batch, &written), vec![vec![0], vec![1, 2]]);
        }
    }

    /// The other one: a segment with PSH, then the one before it. Not contiguous in arrival
    /// order, so not merged, and the PSH stays where it was.
    #[test]
    fn psh_is_kept_when_segments_arrive_out_of_order() {
        let flow = Flow {
            mss: 999, // 1000 bytes
            ..Flow::default()
        };
        let input = Input {
            can_udp_gro: false,
            flows: vec![flow],
            packets: vec![
                Packet {
                    seq: 6, // a gap of 1000: the second segment
                    arg: 999,
                    tweaks: 1, // PSH
                    ..Packet::default()
                },
                Packet {
                    seq: 7, // the first segment
                    arg: 0,
                    ..Packet::default()
                },
            ],
        };
        let batch = packets(&input);
        let psh = |p: &[u8]| p[33] & PSH != 0;
        assert!(psh(&batch[0]) && !psh(&batch[1]));
        let bufs = coalesce(&batch, false);
        let written = resplit(&bufs);
        assert_eq!(match_inputs(&batch, &written), vec![vec![0], vec![1]]);
        assert!(psh(&written[0][0]));
    }

    #[test]
    fn every_broken_kind_is_not_mergeable() {
        let input = Input::decode(
            &seeds()
                .into_iter()
                .find(|(n, _)| *n == "broken-segments")
                .unwrap()
                .1,
        );
        let batch = packets(&input);
        for (p, bytes) in input.packets.iter().zip(&batch) {
            let is_segment = p.kind % 8 < 6;
            assert_eq!(
                mergeable(bytes, true).is_some(),
                is_segment,
                "{p:?} -> {bytes:02x?}"
            );
        }
    }

    #[test]
    fn the_oracles_catch_a_lost_a_changed_and_a_reordered_packet() {
        let input = Input::decode(&seeds()[3].1); // udp4-uso
        let batch = packets(&input);
        let single = |i: usize| vec![batch[i].clone()];
        let all: Vec<Vec<Vec<u8>>> = (0..batch.len()).map(single).collect();
        let groups = match_inputs(&batch, &all);
        check_order(&batch, &groups);

        let lost = &all[1..];
        assert!(std::panic::catch_unwind(|| match_inputs(&batch, lost)).is_err());
        let mut changed = all.clone();
        *changed[2][0].last_mut().unwrap() ^= 1;
        assert!(std::panic::catch_unwind(|| match_inputs(&batch, &changed)).is_err());
        let mut swapped = all.clone();
        swapped.swap(1, 2);
        let groups = match_inputs(&batch, &swapped);
        assert!(std::panic::catch_unwind(|| check_order(&batch, &groups)).is_err());
        // The same swap inside one superpacket is caught by the per-flow order.
        let mut merged = vec![vec![batch[0].clone(), batch[2].clone(), batch[1].clone()]];
        merged.extend((3..batch.len()).map(single));
        let groups = match_inputs(&batch, &merged);
        assert!(std::panic::catch_unwind(|| check_order(&batch, &groups)).is_err());
        // A packet pulled forward past one of its connection that was not merged.
        let mut broken = batch.clone();
        *broken[1].last_mut().unwrap() ^= 1; // bad checksum
        let pulled = vec![
            vec![broken[0].clone(), broken[2].clone()],
            vec![broken[1].clone()],
        ];
        let groups = match_inputs(&broken[..3], &pulled);
        assert_eq!(groups, vec![vec![0, 2], vec![1]]);
        assert!(std::panic::catch_unwind(|| check_order(&broken[..3], &groups)).is_err());
    }
}
