//! `aead`: every implementation of `tailsk8s-noise`'s AEAD this CPU runs (AVX-512 with the MAC
//! in IFMA lanes, AVX-512 with the stitched scalar MAC, ring's) against ring's, on keys,
//! counters, lengths and contents the fuzzer picks.
//!
//! Invariants:
//! - both seal any plaintext to the same bytes, in place and read from elsewhere;
//! - both open the sealed message to the plaintext;
//! - on a mutated message (a bit flipped, a byte changed, truncated) or a wrong counter, both
//!   agree: both refuse (no forgery, no implementation more lenient than the other).

use tailsk8s_noise::aead::Aead;

use crate::input::{Choices, Writer};

pub fn run(data: &[u8]) {
    let mut c = Choices::new(data);
    let key: [u8; 32] = c.array();
    let counter = u64::from(c.u32()) << c.below(33) | u64::from(c.u16());
    let mutation = c.below(4);
    let at = usize::from(c.u16());
    let flip = c.byte() | 1;
    let plain = c.rest();
    let reference = Aead::ring(&key);
    for fast in Aead::every_one_here(&key) {
        check(&fast, &reference, counter, mutation, at, flip, plain);
    }
}

fn check(
    fast: &Aead,
    reference: &Aead,
    counter: u64,
    mutation: usize,
    at: usize,
    flip: u8,
    plain: &[u8],
) {
    let mut a = plain.to_vec();
    a.resize(plain.len() + 16, 0);
    let mut b = a.clone();
    fast.seal(counter, &mut a, plain.len());
    reference.seal(counter, &mut b, plain.len());
    assert_eq!(a, b, "{} seals unlike ring", fast.implementation());
    let mut c = vec![flip; a.len()];
    fast.seal_from(counter, plain, &mut c);
    assert_eq!(
        a,
        c,
        "{} seals from elsewhere unlike in place",
        fast.implementation()
    );
    assert_eq!(fast.open(counter, &mut a.clone()).as_deref(), Some(plain));
    let (mut m, open_counter) = match mutation {
        0 => (a.clone(), counter),
        1 => {
            let mut m = a.clone();
            let i = at % m.len();
            m[i] ^= flip;
            (m, counter)
        }
        2 => (a[..at % a.len()].to_vec(), counter),
        _ => (a.clone(), counter ^ u64::from(flip)),
    };
    let mut n = m.clone();
    let opened_fast = fast.open(open_counter, &mut m).map(|p| p.to_vec());
    let opened_ref = reference.open(open_counter, &mut n).map(|p| p.to_vec());
    assert_eq!(
        opened_fast,
        opened_ref,
        "{} and ring disagree",
        fast.implementation()
    );
    if mutation != 0 {
        assert_eq!(opened_fast, None, "a forgery opened");
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let packet: Vec<u8> = (0..1420u32).map(|i| i as u8).collect();
    let seed = |mutation: u8, payload: &[u8]| {
        Writer::new()
            .raw(&[7; 32])
            .u32(5)
            .byte(0)
            .u16(1)
            .byte(mutation)
            .u16(700)
            .byte(0x10)
            .raw(payload)
            .finish()
    };
    vec![
        ("empty", seed(0, &[])),
        ("keepalive-sized", seed(0, &[0; 16])),
        ("full-packet", seed(0, &packet)),
        ("flipped", seed(1, &packet)),
        ("truncated", seed(2, &packet[..300])),
        ("wrong-counter", seed(3, &packet[..64])),
    ]
}
