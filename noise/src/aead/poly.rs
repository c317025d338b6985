//! The scalar Poly1305 (radix 2^64, `u128` products) of the AVX-512 AEAD: the whole MAC on
//! CPUs without IFMA ([`super::avx512`] stitches its blocks into ChaCha20's rounds), and with
//! IFMA the part the eight lanes ([`super::poly_lanes`]) leave — fewer than eight blocks, the
//! padded tail, the lengths — and the final reduction. Its own module so that both users
//! share it without importing each other.

/// Poly1305 with `h` in three 64-bit limbs and `r` in two.
pub(super) struct Poly {
    r0: u64,
    r1: u64,
    /// `r1 + r1 / 4`: `r1 · 2^128 ≡ r1 / 4 · 5` modulo 2^130 − 5 (clamping makes r1 a
    /// multiple of 4).
    s1: u64,
    h: [u64; 3],
    s: u128,
}

impl Poly {
    pub(super) fn new(one_time_key: &[u8]) -> Poly {
        let word = |i: usize| u64::from_le_bytes(one_time_key[i..i + 8].try_into().unwrap());
        let r0 = word(0) & 0x0fff_fffc_0fff_ffff;
        let r1 = word(8) & 0x0fff_fffc_0fff_fffc;
        Poly {
            r0,
            r1,
            s1: r1 + (r1 >> 2),
            h: [0; 3],
            s: u128::from_le_bytes(one_time_key[16..32].try_into().unwrap()),
        }
    }

    /// Absorbs one full 16-byte block (with the 2^128 bit).
    #[inline(always)]
    pub(super) fn block(&mut self, m: &[u8]) {
        let m0 = u64::from_le_bytes(m[..8].try_into().unwrap());
        let m1 = u64::from_le_bytes(m[8..16].try_into().unwrap());
        let [h0, h1, h2] = self.h;
        let (h0, c) = h0.overflowing_add(m0);
        let (h1, c1) = add_carry(h1, m1, c);
        let h2 = h2 + u64::from(c1) + 1;
        let (r0, r1, s1) = (self.r0 as u128, self.r1 as u128, self.s1 as u128);
        let d0 = h0 as u128 * r0 + h1 as u128 * s1;
        let d1 = h0 as u128 * r1 + h1 as u128 * r0 + h2 as u128 * s1 + (d0 >> 64);
        let d2 = h2 * self.r0 + (d1 >> 64) as u64;
        let carry = (d2 >> 2) * 5;
        let (h0, c) = (d0 as u64).overflowing_add(carry);
        let (h1, c1) = (d1 as u64).overflowing_add(u64::from(c));
        self.h = [h0, h1, (d2 & 3) + u64::from(c1)];
    }

    /// The clamped `r`, low and high word.
    pub(super) fn r(&self) -> (u64, u64) {
        (self.r0, self.r1)
    }

    /// Replaces the accumulator (the eight-lane path hands its sum back this way).
    pub(super) fn set_h(&mut self, h: [u64; 3]) {
        self.h = h;
    }

    /// Absorbs `data` zero-padded to a multiple of 16 bytes.
    pub(super) fn padded(&mut self, data: &[u8]) {
        let mut blocks = data.chunks_exact(16);
        for b in blocks.by_ref() {
            self.block(b);
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 16];
            last[..rest.len()].copy_from_slice(rest);
            self.block(&last);
        }
    }

    pub(super) fn finish(self, ciphertext_len: usize) -> [u8; 16] {
        let mut lengths = [0u8; 16];
        lengths[8..].copy_from_slice(&(ciphertext_len as u64).to_le_bytes());
        let mut p = self;
        p.block(&lengths);
        let [h0, h1, h2] = p.h;
        // h < 2p here: subtract p once if h ≥ p, without a branch.
        let (g0, c) = h0.overflowing_add(5);
        let (g1, c1) = h1.overflowing_add(u64::from(c));
        let g2 = h2 + u64::from(c1);
        let take_g = 0u64.wrapping_sub(g2 >> 2);
        let h0 = (g0 & take_g) | (h0 & !take_g);
        let h1 = (g1 & take_g) | (h1 & !take_g);
        (u128::from(h0) | u128::from(h1) << 64)
            .wrapping_add(p.s)
            .to_le_bytes()
    }
}

/// `a + b + carry` and the carry out.
#[inline(always)]
fn add_carry(a: u64, b: u64, carry: bool) -> (u64, bool) {
    let (x, c1) = a.overflowing_add(b);
    let (y, c2) = x.overflowing_add(u64::from(carry));
    (y, c1 | c2)
}
