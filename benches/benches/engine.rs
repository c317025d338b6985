//! Criterion microbenchmarks of the packet path, without sockets or a TUN:
//!
//! - `engine_roundtrip`: one IP packet of 64, 512 or 1420 bytes encapsulated by one
//!   engine and decapsulated by another (session established in memory by the data plane's
//!   fixture, `tailsk8s_dataplane::testing`, as in the engine's own tests), in bytes/s and
//!   packets/s.
//! - `superpacket_64k`: what the router does with one 64 KiB TCP superpacket read from an
//!   offloading TUN: split it into 47 segments of 1420 bytes ([`offload::split`]: header
//!   checks, then each segment's headers, payload copy and checksums), and
//!   GRO-coalesce the decrypted segments again ([`gro::Coalescer`], what the router's outbox
//!   runs before its TUN writes); and the whole pipeline split → encapsulate → decapsulate →
//!   coalesce, with the copying split (`pipeline_*`) and split in place as the TUN worker
//!   does ([`offload::InPlace`], `pipeline_in_place_bytes`, which also copies the read in).
//! - `allowed_ips_10k`: longest-prefix lookups in an [`AllowedIps`] of 10,000 prefixes.
//!
//! Every setup checks that the path it measures does the work (the packet arrives, the
//! segments coalesce), so a broken path fails loudly instead of measuring a shortcut.
//! Short by design (3 s per benchmark, 20 samples): `cargo bench -p tailsk8s-benches`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tailsk8s_dataplane::allowed_ips::AllowedIps;
use tailsk8s_dataplane::engine::DEFAULT_MTU;
use tailsk8s_dataplane::gro::Coalescer;
use tailsk8s_dataplane::offload;
use tailsk8s_dataplane::testing::{self, Capture, Node};
use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_LEN};

/// Pod addresses on the two nodes, as in benches/iperf3.
const POD_A: [u8; 4] = [198, 19, 1, 2];
const POD_B: [u8; 4] = [198, 19, 2, 2];
/// IPv4 + TCP headers without options.
const TCP_HEADERS: usize = 40;
/// The TCP segment size that fills the default tunnel MTU.
const MSS: usize = DEFAULT_MTU - TCP_HEADERS;
/// Segments in the largest superpacket the kernel hands a TUN with this MTU (64 KiB GSO limit).
const SUPERPACKET_SEGMENTS: usize = (65536 - TCP_HEADERS) / MSS;
/// Room per packet buffer: a full-size packet, WireGuard's padding, and headroom.
const PACKET_BUF: usize = 2048;
/// The virtio-net header flag "complete the checksum from csum_start".
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

// ------------------------------------------------------------------ packets

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 20-byte IPv4 header (DF set) with a correct header checksum.
fn ipv4_header(total_len: usize, protocol: u8, id: u16) -> [u8; 20] {
    let total = u16::try_from(total_len).expect("an IPv4 packet fits 64 KiB");
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&POD_A);
    h[16..20].copy_from_slice(&POD_B);
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

/// A UDP datagram from pod A to pod B, `len` bytes in all (UDP checksum 0: legal in IPv4).
fn udp_packet(len: usize) -> Vec<u8> {
    let mut p = ipv4_header(len, 17, 1).to_vec();
    let udp_len = u16::try_from(len - 20).expect("fits");
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&5201u16.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.resize(len, 0xab);
    p
}

/// A TCP read as an offloading TUN delivers it: the virtio-net header, then `segments` × MSS
/// of payload behind one IPv4 + TCP header (ACK).
fn tcp_superpacket(segments: usize) -> Vec<u8> {
    let len = TCP_HEADERS + segments * MSS;
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: TCP_HEADERS as u16,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut read = vec![0u8; VIRTIO_NET_HDR_LEN];
    hdr.encode(&mut read)
        .expect("a virtio-net header fits 10 bytes");
    read.extend_from_slice(&ipv4_header(len, 6, 1000));
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x2000_0000u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    read.extend_from_slice(&tcp);
    read.extend((0..segments * MSS).map(|i| i as u8));
    read
}

/// Splits one TUN read into `bufs` ([`offload::split`], the copying split).
/// Returns the number of segments; their lengths are in `sizes`.
fn split(read: &mut [u8], bufs: &mut [Vec<u8>], sizes: &mut [usize]) -> usize {
    offload::split(read, bufs, sizes).expect("a well-formed superpacket")
}

// ------------------------------------------------------------------ two engines in memory

/// One of the two engines (the data plane's fixture node) and the capture its output goes
/// to, whose buffers are reused from one iteration to the next (as the router's `Outbox`
/// reuses its own).
struct Side {
    node: Node,
    out: Capture,
}

impl Side {
    /// One packet from the TUN: `buf[..len]`, the rest of `buf` is padding room.
    fn tun_in(&mut self, buf: &mut [u8], len: usize) {
        self.out.clear();
        self.node.tun_packet(buf, len, &mut self.out);
    }
}

/// Node A (pod 198.19.1.0/24) and node B (pod 198.19.2.0/24), peered, with a session that
/// carried a first packet (the fixture checks it arrived intact).
fn established_pair() -> (Side, Side) {
    let (a, b) = testing::established_pair(Instant::now(), &udp_packet(64));
    let side = |node| Side {
        node,
        out: Capture::default(),
    };
    (side(a), side(b))
}

/// One packet A → B; returns how many packets reached B's TUN.
fn roundtrip(a: &mut Side, b: &mut Side, buf: &mut [u8], len: usize) -> usize {
    a.tun_in(buf, len);
    b.out.clear();
    let (from, local) = (a.node.addr, Some(b.node.addr.ip()));
    let mut batch = b.node.engine.batch();
    for (_, datagram) in &mut a.out.sent {
        batch.handle_datagram(from, local, datagram, &mut b.node.scratch, &mut b.out);
    }
    b.out.tun.len()
}

fn engine_roundtrip(c: &mut Criterion) {
    let (mut a, mut b) = established_pair();
    let mut group = c.benchmark_group("engine_roundtrip");
    for size in [64usize, 512, DEFAULT_MTU] {
        let packet = udp_packet(size);
        let mut buf = packet.clone();
        buf.resize(PACKET_BUF, 0);
        assert_eq!(roundtrip(&mut a, &mut b, &mut buf, size), 1);
        assert_eq!(
            &b.out.tun[0][..],
            &packet[..],
            "{size}-byte packet arrives intact"
        );
        for (unit, throughput) in [
            ("bytes", Throughput::Bytes(size as u64)),
            ("packets", Throughput::Elements(1)),
        ] {
            group.throughput(throughput);
            group.bench_function(format!("{unit}/{size}"), |bench| {
                bench.iter(|| black_box(roundtrip(&mut a, &mut b, &mut buf, size)))
            });
        }
    }
    group.finish();
}

// ------------------------------------------------------------------ superpackets

/// Split → encapsulate each segment (one batch) → decapsulate each (one batch) → GRO.
/// Returns the coalesced packets' total length (headroom excluded).
fn superpacket_pipeline(
    a: &mut Side,
    b: &mut Side,
    read: &mut [u8],
    segments: &mut [Vec<u8>],
    sizes: &mut [usize],
    gro: &mut Coalescer,
) -> usize {
    let count = split(read, segments, sizes);
    a.out.clear();
    {
        let mut batch = a.node.engine.batch();
        for (buf, &len) in segments.iter_mut().zip(sizes.iter()).take(count) {
            batch.handle_tun_packet(buf, len, &mut a.node.scratch, &mut a.out);
        }
    }
    receive_and_coalesce(a, b, gro)
}

/// [`superpacket_pipeline`] as the TUN worker splits: in place ([`offload::InPlace`]), each
/// segment encapsulated from where it lies. The split writes over the read, so each round
/// first copies `original` into `read` (64 KiB: what the kernel's TUN read does anyway; here
/// it is counted against the in-place split).
fn superpacket_pipeline_in_place(
    a: &mut Side,
    b: &mut Side,
    original: &[u8],
    read: &mut [u8],
    gro: &mut Coalescer,
) -> usize {
    read[..original.len()].copy_from_slice(original);
    let mut split = offload::InPlace::new(read, original.len()).expect("a superpacket");
    a.out.clear();
    {
        let mut batch = a.node.engine.batch();
        while let Some((buf, len)) = split.next_packet() {
            batch.handle_tun_packet(buf, len, &mut a.node.scratch, &mut a.out);
        }
    }
    receive_and_coalesce(a, b, gro)
}

/// The receiving half of the pipelines: decapsulate `a`'s datagrams at `b`, then coalesce.
fn receive_and_coalesce(a: &mut Side, b: &mut Side, gro: &mut Coalescer) -> usize {
    b.out.clear();
    {
        let (from, local) = (a.node.addr, Some(b.node.addr.ip()));
        let mut batch = b.node.engine.batch();
        for (_, datagram) in &mut a.out.sent {
            batch.handle_datagram(from, local, datagram, &mut b.node.scratch, &mut b.out);
        }
    }
    gro.clear();
    for packet in &b.out.tun {
        gro.push(packet);
    }
    gro.written().map(|p| p.len() - VIRTIO_NET_HDR_LEN).sum()
}

fn superpacket_64k(c: &mut Criterion) {
    let mut original = tcp_superpacket(SUPERPACKET_SEGMENTS);
    let payload = SUPERPACKET_SEGMENTS * MSS;
    let mut segments = vec![vec![0u8; PACKET_BUF]; SUPERPACKET_SEGMENTS];
    let mut sizes = vec![0usize; SUPERPACKET_SEGMENTS];
    let mut group = c.benchmark_group("superpacket_64k");

    // Split.
    let count = split(&mut original, &mut segments, &mut sizes);
    assert_eq!(count, SUPERPACKET_SEGMENTS);
    assert!(sizes.iter().all(|&s| s == DEFAULT_MTU), "full-MTU segments");
    let ip_bytes = (original.len() - VIRTIO_NET_HDR_LEN) as u64;
    group.throughput(Throughput::Bytes(ip_bytes));
    group.bench_function("split", |bench| {
        bench.iter(|| black_box(split(&mut original, &mut segments, &mut sizes)))
    });

    // GRO coalesce of the split segments.
    let mut gro = Coalescer::new();
    for (seg, &len) in segments.iter().zip(&sizes) {
        gro.push(&seg[..len]);
    }
    assert_eq!(gro.len(), 1, "all segments coalesce into one superpacket");
    assert_eq!(
        gro.written().next().map(<[u8]>::len),
        Some(VIRTIO_NET_HDR_LEN + TCP_HEADERS + payload)
    );
    let segment_bytes: usize = sizes.iter().sum();
    group.throughput(Throughput::Bytes(segment_bytes as u64));
    group.bench_function("gro_coalesce", |bench| {
        bench.iter(|| {
            gro.clear();
            for (seg, &len) in segments.iter().zip(&sizes) {
                gro.push(&seg[..len]);
            }
            black_box(gro.len())
        })
    });

    // The whole router path minus syscalls.
    let (mut a, mut b) = established_pair();
    let coalesced = superpacket_pipeline(
        &mut a,
        &mut b,
        &mut original,
        &mut segments,
        &mut sizes,
        &mut gro,
    );
    assert_eq!(
        b.out.tun.len(),
        SUPERPACKET_SEGMENTS,
        "every segment decrypts"
    );
    assert_eq!(
        gro.written().next().map(<[u8]>::len),
        Some(VIRTIO_NET_HDR_LEN + TCP_HEADERS + payload),
        "the decrypted segments coalesce into one superpacket"
    );
    assert!(coalesced >= TCP_HEADERS + payload);
    // The same in place, checked to deliver the same.
    let mut read = vec![0u8; original.len() + offload::PAD_ROOM];
    let pristine = tcp_superpacket(SUPERPACKET_SEGMENTS);
    let in_place = superpacket_pipeline_in_place(&mut a, &mut b, &pristine, &mut read, &mut gro);
    assert_eq!(in_place, coalesced, "the in-place split delivers the same");
    assert_eq!(b.out.tun.len(), SUPERPACKET_SEGMENTS);
    group.throughput(Throughput::Bytes(ip_bytes));
    group.bench_function("pipeline_in_place_bytes", |bench| {
        bench.iter(|| {
            black_box(superpacket_pipeline_in_place(
                &mut a, &mut b, &pristine, &mut read, &mut gro,
            ))
        })
    });
    for (unit, throughput) in [
        ("bytes", Throughput::Bytes(ip_bytes)),
        ("packets", Throughput::Elements(SUPERPACKET_SEGMENTS as u64)),
    ] {
        group.throughput(throughput);
        group.bench_function(format!("pipeline_{unit}"), |bench| {
            bench.iter(|| {
                black_box(superpacket_pipeline(
                    &mut a,
                    &mut b,
                    &mut original,
                    &mut segments,
                    &mut sizes,
                    &mut gro,
                ))
            })
        });
    }
    group.finish();
}

// ------------------------------------------------------------------ allowed IPs

const PREFIXES: usize = 10_000;
const LOOKUPS: usize = 1024;

/// Benchmarks looking up every address of `addrs`, after checking that some hit (all of
/// them when `all_hit`), so the table measured is the one meant.
fn bench_lookups(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    table: &AllowedIps<u32>,
    addrs: &[IpAddr],
    all_hit: bool,
) {
    let hits = addrs.iter().filter(|a| table.lookup(**a).is_some()).count();
    assert!(hits > 0, "{name}: some lookups hit");
    if all_hit {
        assert_eq!(hits, addrs.len(), "{name}: every lookup hits");
    }
    group.bench_function(name, |bench| {
        bench.iter(|| {
            addrs
                .iter()
                .filter_map(|a| table.lookup(black_box(*a)))
                .fold(0u32, u32::wrapping_add)
        })
    });
}

fn allowed_ips_10k(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0x7a11_5c85);
    let mut group = c.benchmark_group("allowed_ips_10k");
    group.throughput(Throughput::Elements(LOOKUPS as u64));

    // Pod CIDRs: 10,000 /24s of 100.64.0.0/10 (a /24 per node), addresses inside them.
    let mut pods = AllowedIps::new();
    for i in 0..PREFIXES as u32 {
        let net = Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + (i << 8)), 24).expect("valid /24");
        pods.insert(IpNet::V4(net), i);
    }
    assert_eq!(pods.len(), PREFIXES);
    let addrs: Vec<IpAddr> = (0..LOOKUPS)
        .map(|_| {
            let node = rng.gen_range(0..PREFIXES as u32);
            IpAddr::V4(Ipv4Addr::from(
                0x6440_0000 + (node << 8) + rng.gen_range(1..255),
            ))
        })
        .collect();
    bench_lookups(&mut group, "v4_pod_cidrs_24", &pods, &addrs, true);

    // 10,000 random IPv4 prefixes of random length /8–/32, uniformly random addresses.
    let mut mixed = AllowedIps::new();
    let mut i = 0u32;
    while mixed.len() < PREFIXES {
        let len = rng.gen_range(8..=32);
        let net = Ipv4Net::new(Ipv4Addr::from(rng.gen::<u32>()), len).expect("valid length");
        mixed.insert(IpNet::V4(net.trunc()), i);
        i += 1;
    }
    let addrs: Vec<IpAddr> = (0..LOOKUPS)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.gen::<u32>())))
        .collect();
    bench_lookups(&mut group, "v4_random_prefixes", &mixed, &addrs, false);

    // 10,000 IPv6 /64s under fd00::/8, addresses inside them.
    let mut v6 = AllowedIps::new();
    let mut nets = Vec::with_capacity(PREFIXES);
    while v6.len() < PREFIXES {
        let high = (0xfdu128 << 120) | (u128::from(rng.gen::<u64>() >> 8) << 64);
        let net = Ipv6Net::new(Ipv6Addr::from(high), 64).expect("valid /64");
        if v6.insert(IpNet::V6(net), v6.len() as u32).is_none() {
            nets.push(high);
        }
    }
    let addrs: Vec<IpAddr> = (0..LOOKUPS)
        .map(|_| {
            let high = nets[rng.gen_range(0..nets.len())];
            IpAddr::V6(Ipv6Addr::from(high | u128::from(rng.gen::<u64>())))
        })
        .collect();
    bench_lookups(&mut group, "v6_64", &v6, &addrs, true);
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = engine_roundtrip, superpacket_64k, allowed_ips_10k
}
criterion_main!(benches);
