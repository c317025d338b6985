//! Criterion microbenchmarks of transport data per packet (seal, then open: both routers'
//! crypto work for one packet): boringtun 0.7.1's `Tunn` (what the router ran until session 6: the packet
//! copied into the datagram buffer, sealed with ring, timers ticked; decapsulation copies the
//! ciphertext out, opens it and checks the replay window under a mutex) against
//! `tailsk8s-noise`'s `Transport` (sealed where the packet lies, opened in place, the same
//! window check) with ring's AEAD — what owning transport data saves by itself — and with the
//! AEAD it picks for this CPU (`avx512` where it runs: what the router runs now). `cargo bench -p tailsk8s-benches
//! --bench transport`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tailsk8s_noise::aead::Aead;
use tailsk8s_noise::primitives::tai64n;
use tailsk8s_noise::transport::{Transport, HEADER_LEN};
use tailsk8s_noise::{consume_initiation, consume_response, initiate, respond, Identity, Peer};
use x25519_dalek::{PublicKey, StaticSecret};

/// A minimal IPv4 packet of `len` bytes (boringtun reads its version, length and source).
fn packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[198, 19, 1, 2]);
    p[16..20].copy_from_slice(&[198, 19, 2, 2]);
    p
}

/// Two boringtun tunnels with a confirmed session: `a` encapsulates, `b` decapsulates.
fn tunn_pair() -> (Tunn, Tunn) {
    let (sa, sb) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let (mut m1, mut m2) = (vec![0u8; 2048], vec![0u8; 2048]);
    let init = match a.format_handshake_initiation(&mut m1, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    };
    let response = match b.decapsulate(None, &init, &mut m2) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no response"),
    };
    if let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, &response, &mut m1) {
        let keepalive = keepalive.to_vec();
        assert!(matches!(
            b.decapsulate(None, &keepalive, &mut m2),
            TunnResult::Done
        ));
    }
    (a, b)
}

/// Two transports of one session made by `tailsk8s-noise`'s handshake, with the AEAD `aead`
/// makes: `a` seals, `b` opens.
fn transport_pair(aead: fn(&[u8; 32]) -> Aead) -> (Transport, Transport) {
    let (i, r) = (
        Identity::new(StaticSecret::from([1u8; 32])),
        Identity::new(StaticSecret::from([2u8; 32])),
    );
    let (r_peer, i_peer) = (
        Peer::new(&i, *r.public(), None),
        Peer::new(&r, *i.public(), None),
    );
    let now = tai64n(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970"),
    );
    let (init, initiated) =
        initiate(&i, &r_peer, 1, StaticSecret::from([3u8; 32]), now, None).expect("valid");
    let (seen, p) = consume_initiation(&r, &init, |_| Some(&i_peer)).expect("genuine");
    let (response, rs) = respond(p, &seen, 2, StaticSecret::from([4u8; 32]), None).expect("valid");
    let is = consume_response(&i, &r_peer, &initiated, &response).expect("genuine");
    let t = Instant::now();
    (Transport::with(&is, t, aead), Transport::with(&rs, t, aead))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport_roundtrip");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for size in [64usize, 1420] {
        g.throughput(Throughput::Bytes(size as u64));
        let (mut a, mut b) = tunn_pair();
        let p = packet(size);
        let (mut wire, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
        g.bench_function(format!("boringtun/{size}"), |bench| {
            bench.iter(|| {
                let datagram = match a.encapsulate(&p, &mut wire) {
                    TunnResult::WriteToNetwork(d) => d,
                    _ => panic!("no data message"),
                };
                match b.decapsulate(None, datagram, &mut out) {
                    TunnResult::WriteToTunnelV4(got, _) => assert_eq!(got.len(), size),
                    _ => panic!("not delivered"),
                }
            })
        });
        // The time is the caller's: the engine reads it once per batch of packets, where
        // boringtun reads its clock per packet. One reading here, well inside the session's
        // 180 s.
        let now = Instant::now();
        // ring's, and the AEAD picked for this CPU when that is another.
        let mut aeads: Vec<fn(&[u8; 32]) -> Aead> = vec![Aead::ring];
        if Aead::new(&[0; 32]).implementation() != "ring" {
            aeads.push(Aead::new);
        }
        for aead in aeads {
            let (sealer, opener) = transport_pair(aead);
            let label = sealer.aead();
            let mut buf = vec![0u8; HEADER_LEN + size + 16];
            buf[HEADER_LEN..HEADER_LEN + size].copy_from_slice(&p);
            g.bench_function(format!("tailsk8s-noise-{label}/{size}"), |bench| {
                bench.iter(|| {
                    // Opening leaves the plaintext where sealing expects it: no copy either way.
                    let n = sealer.seal(now, &mut buf, size).expect("fresh session");
                    let (_, plain) = opener.open(now, &mut buf[..n]).expect("genuine");
                    assert_eq!(plain.len(), size);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
