//! Criterion microbenchmarks of WireGuard's handshake: boringtun 0.7.1's (what the router ran
//! until session 6) against `tailsk8s-noise`'s (what it runs now), for each role on the same
//! messages:
//!
//! - `initiate`: build an initiation (fresh ephemeral key from the OS, two DH, sealing);
//! - `respond`: take an initiation from boringtun's initiator and answer it (MAC1, three DH
//!   for the initiation's decryption and the response, sealing).
//!
//! A handshake flood is paid in these: the responder's figure is what one initiation costs
//! when it carries a valid MAC1. `cargo bench -p tailsk8s-benches --bench handshake`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::noise::{Tunn, TunnResult};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rand_core::OsRng;
use tailsk8s_noise::primitives::tai64n;
use tailsk8s_noise::{consume_initiation, initiate, respond, Identity, Peer};
use x25519_dalek::{PublicKey, StaticSecret};

const INITIATOR: [u8; 32] = [0x11; 32];
const RESPONDER: [u8; 32] = [0x22; 32];

fn public(secret: [u8; 32]) -> PublicKey {
    PublicKey::from(&StaticSecret::from(secret))
}

/// An initiation from a boringtun initiator.
fn initiation(initiator: &mut Tunn) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    match initiator.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => panic!("boringtun made no initiation"),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);

    let mut tunn = Tunn::new(
        StaticSecret::from(INITIATOR),
        public(RESPONDER),
        None,
        None,
        1,
        None,
    );
    g.bench_function("initiate/boringtun", |b| {
        let mut buf = vec![0u8; 256];
        b.iter(|| {
            assert!(matches!(
                tunn.format_handshake_initiation(&mut buf, true),
                TunnResult::WriteToNetwork(_)
            ))
        })
    });
    let us = Identity::new(StaticSecret::from(INITIATOR));
    let peer = Peer::new(&us, public(RESPONDER), None);
    g.bench_function("initiate/tailsk8s-noise", |b| {
        b.iter(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("after 1970");
            let e = StaticSecret::random_from_rng(OsRng);
            initiate(&us, &peer, 1, e, tai64n(now), None).expect("valid keys")
        })
    });

    // One initiation answered again and again: boringtun refuses a timestamp it has seen, so
    // each iteration gets a fresh responder (made outside the timing); ours keeps no state.
    let mut initiator = Tunn::new(
        StaticSecret::from(INITIATOR),
        public(RESPONDER),
        None,
        None,
        1,
        None,
    );
    let init = initiation(&mut initiator);
    g.bench_function("respond/boringtun", |b| {
        let mut buf = vec![0u8; 256];
        b.iter_batched(
            || {
                Tunn::new(
                    StaticSecret::from(RESPONDER),
                    public(INITIATOR),
                    None,
                    None,
                    2,
                    None,
                )
            },
            |mut responder| {
                assert!(matches!(
                    responder.decapsulate(None, &init, &mut buf),
                    TunnResult::WriteToNetwork(_)
                ))
            },
            BatchSize::SmallInput,
        )
    });
    let them = Identity::new(StaticSecret::from(RESPONDER));
    let initiator_peer = Peer::new(&them, public(INITIATOR), None);
    g.bench_function("respond/tailsk8s-noise", |b| {
        b.iter(|| {
            let (seen, p) =
                consume_initiation(&them, &init, |_| Some(&initiator_peer)).expect("genuine");
            respond(p, &seen, 2, StaticSecret::random_from_rng(OsRng), None).expect("valid keys")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
