//! ChaCha20-Poly1305 at WireGuard packet sizes on this machine, per implementation, and
//! boringtun's whole data path for comparison:
//!
//! - `seal/IMPL/SIZE`: seal one packet in place (counter nonce, tag after it);
//! - `seal_open/IMPL/SIZE`: seal, then open the same buffer (one packet each way: what the two
//!   routers of a tunnel do per packet, on one core);
//! - `owned_data_message/IMPL/SIZE`: the prototype of owning transport data (header written and
//!   plaintext sealed where it lies, no copy);
//! - `boringtun/encapsulate/SIZE`, `boringtun/encapsulate_decapsulate/SIZE`: `Tunn` as the
//!   engine calls it (copy into the datagram, ring's seal, counters, replay window).
//!
//! Throughput is in plaintext bytes. Each setup checks its path works before timing it.

use std::hint::black_box;
use std::time::Duration;

use boringtun::noise::TunnResult;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tailsk8s_aead_bench::{
    all, ipv4_packet, seal_data_message, tunn_pair, DATA_HEADER_LEN, TAG_LEN,
};

const SIZES: [usize; 2] = [64, 1420];

fn aead(c: &mut Criterion) {
    #[cfg(feature = "openssl")]
    eprintln!("openssl: {}", tailsk8s_aead_bench::OpenSsl::version());
    let key = [0x5au8; 32];
    for size in SIZES {
        let mut group = c.benchmark_group("seal");
        group.throughput(Throughput::Bytes(size as u64));
        for (name, mut a) in all(&key) {
            let mut buf = vec![0x11u8; size + TAG_LEN];
            let mut counter = 0u64;
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    counter += 1;
                    a.seal(counter, black_box(&mut buf), size);
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group("seal_open");
        group.throughput(Throughput::Bytes(size as u64));
        for (name, mut a) in all(&key) {
            let mut buf = vec![0x11u8; size + TAG_LEN];
            let mut counter = 0u64;
            a.seal(0, &mut buf, size);
            assert!(
                a.open(0, &mut buf, size),
                "{name}: open failed in the setup"
            );
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    counter += 1;
                    a.seal(counter, black_box(&mut buf), size);
                    assert!(a.open(counter, black_box(&mut buf), size));
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group("owned_data_message");
        group.throughput(Throughput::Bytes(size as u64));
        for (name, mut a) in all(&key) {
            let mut buf = vec![0x11u8; DATA_HEADER_LEN + size + TAG_LEN];
            let mut counter = 0u64;
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    counter += 1;
                    seal_data_message(&mut *a, 7, counter, black_box(&mut buf), size)
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group("boringtun");
        group.throughput(Throughput::Bytes(size as u64));
        let packet = ipv4_packet(size);
        let mut wire = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let (mut a, _) = tunn_pair();
        group.bench_function(BenchmarkId::new("encapsulate", size), |bench| {
            bench.iter(|| match a.encapsulate(black_box(&packet), &mut wire) {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => panic!("no data message"),
            })
        });
        // A fresh pair: the one above has sent counters the receiver never saw.
        let (mut a, mut b) = tunn_pair();
        group.bench_function(BenchmarkId::new("encapsulate_decapsulate", size), |bench| {
            bench.iter(|| {
                let d = match a.encapsulate(black_box(&packet), &mut wire) {
                    TunnResult::WriteToNetwork(d) => d,
                    _ => panic!("no data message"),
                };
                match b.decapsulate(None, d, &mut out) {
                    TunnResult::WriteToTunnelV4(p, _) => p.len(),
                    _ => panic!("not delivered"),
                }
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = aead
}
criterion_main!(benches);
