//! The AEAD of transport data (ChaCha20-Poly1305 with WireGuard's counter nonce and no
//! associated data): our AVX-512 implementation where the CPU has AVX-512 F and BW (its MAC in
//! eight IFMA lanes where the CPU has those too), ring's elsewhere (and on request). All seal
//! and open in place, the tag after the data; all give the same bytes (tested here, fuzzed by
//! `aead`).

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod poly;
#[cfg(target_arch = "x86_64")]
mod poly_lanes;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use subtle::ConstantTimeEq;

use crate::primitives::{counter_nonce, TAG_LEN};

/// One direction's key, with the implementation chosen for this CPU.
pub struct Aead(Inner);

enum Inner {
    /// Boxed: ring's key holds its precomputed state (over 500 bytes), ours 32.
    Ring(Box<LessSafeKey>),
    #[cfg(target_arch = "x86_64")]
    Avx512(avx512::Avx512Key),
}

impl Aead {
    /// The fastest implementation this CPU runs.
    pub fn new(key: &[u8; 32]) -> Aead {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = avx512::Avx512Key::new(key) {
            return Aead(Inner::Avx512(k));
        }
        Aead::ring(key)
    }

    /// ring's implementation, whatever the CPU (the reference the other is checked against).
    pub fn ring(key: &[u8; 32]) -> Aead {
        Aead(Inner::Ring(Box::new(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key"),
        ))))
    }

    /// Every implementation this CPU runs, fastest first (ring's last): what tests, the fuzz
    /// target and benchmarks check against each other.
    pub fn every_one_here(key: &[u8; 32]) -> Vec<Aead> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = avx512::Avx512Key::new(key) {
            if k.ifma() {
                all.push(Aead(Inner::Avx512(k.clone())));
            }
            all.push(Aead(Inner::Avx512(k.without_ifma())));
        }
        all.push(Aead::ring(key));
        all
    }

    /// Which implementation runs: `avx512-ifma` (the MAC in eight vector lanes), `avx512`
    /// (the MAC scalar, stitched into the keystream) or `ring`.
    pub fn implementation(&self) -> &'static str {
        match &self.0 {
            Inner::Ring(_) => "ring",
            #[cfg(target_arch = "x86_64")]
            Inner::Avx512(k) if k.ifma() => "avx512-ifma",
            #[cfg(target_arch = "x86_64")]
            Inner::Avx512(_) => "avx512",
        }
    }

    /// Seals `buf[..len]` in place under `counter`, the tag at `buf[len..len + 16]`.
    /// `buf` must have room for the tag.
    pub fn seal(&self, counter: u64, buf: &mut [u8], len: usize) {
        let (data, rest) = buf.split_at_mut(len);
        let tag: [u8; TAG_LEN] = match &self.0 {
            Inner::Ring(k) => {
                let tag = k
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(counter_nonce(counter)),
                        Aad::empty(),
                        data,
                    )
                    .expect("a packet is far below the AEAD's limit");
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag.as_ref());
                t
            }
            #[cfg(target_arch = "x86_64")]
            Inner::Avx512(k) => k.seal(counter, data),
        };
        rest[..TAG_LEN].copy_from_slice(&tag);
    }

    /// Seals `plaintext` into `buf`: the ciphertext at `buf[..plaintext.len()]`, the tag after
    /// it, as [`Aead::seal`] of a copy, with no copy where the implementation reads the
    /// plaintext where it lies. `buf` must have room for both.
    pub fn seal_from(&self, counter: u64, plaintext: &[u8], buf: &mut [u8]) {
        let len = plaintext.len();
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            Inner::Avx512(k) => {
                let (data, rest) = buf.split_at_mut(len);
                let tag = k.seal_from(counter, plaintext, data);
                rest[..TAG_LEN].copy_from_slice(&tag);
            }
            Inner::Ring(_) => {
                buf[..len].copy_from_slice(plaintext);
                self.seal(counter, buf, len);
            }
        }
    }

    /// Opens `buf` (ciphertext, then the tag) in place under `counter`; returns the plaintext,
    /// or `None` for a forgery (then `buf` holds nothing anyone may use).
    pub fn open<'a>(&self, counter: u64, buf: &'a mut [u8]) -> Option<&'a mut [u8]> {
        let len = buf.len().checked_sub(TAG_LEN)?;
        match &self.0 {
            Inner::Ring(k) => k
                .open_in_place(
                    Nonce::assume_unique_for_key(counter_nonce(counter)),
                    Aad::empty(),
                    buf,
                )
                .ok(),
            #[cfg(target_arch = "x86_64")]
            Inner::Avx512(k) => {
                let (data, tag) = buf.split_at_mut(len);
                let computed = k.open(counter, data);
                tags_match(computed, tag).then_some(data)
            }
        }
    }
}

/// Whether `tag` is `computed`, in constant time: one comparison of 128-bit words, not
/// subtle's byte by byte (each byte through its own optimisation barrier, ~1 % of a receiving
/// router's samples).
#[cfg(target_arch = "x86_64")]
fn tags_match(computed: [u8; TAG_LEN], tag: &[u8]) -> bool {
    let Ok(tag) = <[u8; TAG_LEN]>::try_from(tag) else {
        return false;
    };
    bool::from(u128::from_ne_bytes(computed).ct_eq(&u128::from_ne_bytes(tag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_implementation_seals_like_ring_at_every_length_and_refuses_forgeries() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let ring = Aead::ring(&key);
        for fastest in &Aead::every_one_here(&key) {
            check_against_ring(fastest, &ring);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tags_match_only_the_same_sixteen_bytes() {
        let t: [u8; TAG_LEN] = std::array::from_fn(|i| (i * 17) as u8);
        assert!(tags_match(t, &t));
        for i in 0..TAG_LEN {
            for bit in 0..8 {
                let mut u = t;
                u[i] ^= 1 << bit;
                assert!(!tags_match(t, &u), "byte {i} bit {bit}");
            }
        }
        assert!(!tags_match(t, &t[..TAG_LEN - 1]));
    }

    fn check_against_ring(fastest: &Aead, ring: &Aead) {
        eprintln!("checking {} against ring", fastest.implementation());
        // Every length over the AVX-512 steps' edges (704 bytes: one step of rows; 960: one
        // wide step; 1728: one wide step with three groups of rows beside it, the IFMA path's
        // longest single step; 1984: two wide steps, the scalar MAC's path), then long ones.
        for len in (0..2100).chain([4000, 9001, 65000]) {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let counter = 0x1_0000_0001 * len as u64 + 9;
            let mut a = plain.clone();
            a.resize(len + TAG_LEN, 0);
            let mut b = a.clone();
            fastest.seal(counter, &mut a, len);
            ring.seal(counter, &mut b, len);
            assert_eq!(a, b, "length {len}");
            for aead in [fastest, ring] {
                // Sealed from elsewhere, into a buffer holding other bytes: the same message.
                let mut c = vec![0xa5; len + TAG_LEN];
                aead.seal_from(counter, &plain, &mut c);
                assert_eq!(a, c, "length {len}, sealed from elsewhere");
            }
            for aead in [fastest, ring] {
                let mut forged = a.clone();
                forged[len / 2] ^= 0x40;
                assert!(
                    aead.open(counter, &mut forged).is_none(),
                    "forgery at {len}"
                );
                assert!(
                    aead.open(counter + 1, &mut a.clone()).is_none(),
                    "wrong counter at {len}"
                );
                let mut ok = a.clone();
                assert_eq!(
                    aead.open(counter, &mut ok).map(|p| p.to_vec()),
                    Some(plain.clone())
                );
            }
        }
        assert!(ring.open(0, &mut [0u8; 15]).is_none());
        assert!(fastest.open(0, &mut [0u8; 15]).is_none());
    }
}
