//! Poly1305 eight blocks at a time with AVX-512 IFMA (52-bit multiply-accumulate), for
//! [`super::avx512`] where the CPU has it: the bulk of a message in eight lanes, radix 2^44
//! (limbs of 44, 44 and 42 bits), each lane a Horner chain over every eighth block in powers
//! of r^8, the last step in r^8 … r^1 so that the lanes add up to the sequential result. The
//! scalar radix-2^64 [`Poly`] takes what is left (fewer than eight blocks, the padded tail,
//! the lengths).
//!
//! Why: the scalar chain costs about ten cycles per 16-byte block on its multiply latency and
//! bounded the stitched loop (issue 9: 340 ns of a 520 ns seal at 1420 bytes); eight
//! independent lanes on the vector multipliers take a fraction of that once the keystream no
//! longer waits for it. Branches and memory accesses depend on lengths only.

use std::arch::x86_64::*;

use super::poly::Poly;

const MASK44: u64 = (1 << 44) - 1;
const MASK42: u64 = (1 << 42) - 1;

/// A residue modulo 2^130 − 5 in radix 2^44, limbs partly reduced.
type Limbs = [u64; 3];

/// The clamped r of a one-time key in radix 2^44.
fn limbs_of(r0: u64, r1: u64) -> Limbs {
    [r0 & MASK44, ((r0 >> 44) | (r1 << 20)) & MASK44, r1 >> 24]
}

/// a · b modulo 2^130 − 5 (2^132 ≡ 20), carried back to limbs below 2^44, 2^44 + 1, 2^42.
fn mul(a: Limbs, b: Limbs) -> Limbs {
    let w = |x: u64| x as u128;
    let (s1, s2) = (b[1] * 20, b[2] * 20);
    let d0 = w(a[0]) * w(b[0]) + w(a[1]) * w(s2) + w(a[2]) * w(s1);
    let d1 = w(a[0]) * w(b[1]) + w(a[1]) * w(b[0]) + w(a[2]) * w(s2);
    let d2 = w(a[0]) * w(b[2]) + w(a[1]) * w(b[1]) + w(a[2]) * w(b[0]);
    let d1 = d1 + (d0 >> 44);
    let d2 = d2 + (d1 >> 44);
    let (mut t0, t1, t2) = (
        (d0 as u64) & MASK44,
        (d1 as u64) & MASK44,
        (d2 as u64) & MASK42,
    );
    t0 += ((d2 >> 42) as u64) * 5;
    [t0 & MASK44, t1 + (t0 >> 44), t2]
}

/// Eight Horner chains over a message's whole 128-byte chunks, fed one chunk at a time (so
/// that the chunks can be absorbed between ChaCha20's rounds), in order from the first.
pub(super) struct Lanes {
    h: [__m512i; 3],
    /// r^8 in every lane, and its limbs 1 and 2 times 20 (2^132 ≡ 20).
    r8: [__m512i; 3],
    s8: [__m512i; 2],
    /// Lane j's multiplier for the last chunk, r^(8 − j), and its limbs 1 and 2 times 20.
    last: [__m512i; 3],
    s_last: [__m512i; 2],
    /// Whole chunks in the message, and how many were absorbed.
    chunks: usize,
    absorbed: usize,
}

impl Lanes {
    /// The lanes for a message of `len` bytes under `poly`'s r (`poly` still empty).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and IFMA.
    #[target_feature(enable = "avx512f,avx512ifma")]
    #[inline]
    pub(super) unsafe fn new(poly: &Poly, len: usize) -> Lanes {
        let (r0, r1) = poly.r();
        let r = limbs_of(r0, r1);
        // r^1 … r^8 three multiplications deep: r² on the scalar multiplier, then r³ and r⁴
        // in two lanes, then r⁵ … r⁸ in four (a scalar multiplication per power cost 4 % of
        // the sending router's CPU).
        let r2 = mul(r, r);
        let r3_r4 = mul_lanes(
            r2.map(|x| _mm512_set1_epi64(x as i64)),
            std::array::from_fn(|i| alternate(r[i], r2[i])),
        );
        // [r, r², r³, r⁴] twice, and r⁴ in every lane.
        let up_to_r4: [__m512i; 3] = std::array::from_fn(|i| {
            let idx = _mm512_setr_epi64(0, 1, 8, 9, 0, 1, 8, 9);
            _mm512_permutex2var_epi64(alternate(r[i], r2[i]), idx, r3_r4[i])
        });
        let r4 = r3_r4.map(|v| _mm512_permutexvar_epi64(_mm512_set1_epi64(1), v));
        // [r⁵, r⁶, r⁷, r⁸] twice.
        let r5_r8 = mul_lanes(r4, up_to_r4);
        let r8 = r5_r8.map(|v| _mm512_permutexvar_epi64(_mm512_set1_epi64(3), v));
        let last: [__m512i; 3] = std::array::from_fn(|i| {
            let idx = _mm512_setr_epi64(3, 2, 1, 0, 11, 10, 9, 8);
            _mm512_permutex2var_epi64(r5_r8[i], idx, up_to_r4[i])
        });
        Lanes {
            h: [_mm512_setzero_si512(); 3],
            r8,
            s8: [times20(r8[1]), times20(r8[2])],
            last,
            s_last: [times20(last[1]), times20(last[2])],
            chunks: len / 128,
            absorbed: 0,
        }
    }

    /// Whole 128-byte chunks of the message (what the lanes take; the rest is the scalar
    /// chain's).
    pub(super) fn chunks(&self) -> usize {
        self.chunks
    }

    /// Chunks absorbed so far.
    pub(super) fn absorbed(&self) -> usize {
        self.absorbed
    }

    /// Absorbs the next chunk of `message` (the whole message, the same on every call); does
    /// nothing once every chunk is in.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and IFMA.
    #[target_feature(enable = "avx512f,avx512ifma")]
    #[inline]
    pub(super) unsafe fn absorb_next(&mut self, message: &[u8]) {
        if self.absorbed >= self.chunks {
            return;
        }
        let chunk = &message[128 * self.absorbed..128 * (self.absorbed + 1)];
        self.absorbed += 1;
        let mask44 = _mm512_set1_epi64(MASK44 as i64);
        let a = _mm512_loadu_si512(chunk.as_ptr() as *const _);
        let b = _mm512_loadu_si512(chunk[64..].as_ptr() as *const _);
        let lo = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b);
        let hi = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b);
        let m0 = _mm512_and_si512(lo, mask44);
        let m1 = _mm512_and_si512(
            _mm512_or_si512(_mm512_srli_epi64::<44>(lo), _mm512_slli_epi64::<20>(hi)),
            mask44,
        );
        let m2 = _mm512_or_si512(_mm512_srli_epi64::<24>(hi), _mm512_set1_epi64(1 << 40));
        let h = [
            _mm512_add_epi64(self.h[0], m0),
            _mm512_add_epi64(self.h[1], m1),
            _mm512_add_epi64(self.h[2], m2),
        ];
        self.h = if self.absorbed == self.chunks {
            mul_by(h, self.last, self.s_last)
        } else {
            mul_by(h, self.r8, self.s8)
        };
    }

    /// Hands the lanes' sum to `poly` (every chunk absorbed), whose scalar chain goes on with
    /// the rest of the message from byte `128 · chunks`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and IFMA.
    #[target_feature(enable = "avx512f,avx512ifma")]
    #[inline]
    pub(super) unsafe fn finish(&self, poly: &mut Poly) {
        debug_assert_eq!(self.absorbed, self.chunks);
        if self.chunks == 0 {
            return;
        }
        // The lanes' sum, carried to 44/44/42 bits, then into the scalar representation.
        let s = self.h.map(|v| _mm512_reduce_add_epi64(v) as u64);
        let t = mul_free_carry(mul_free_carry(s));
        poly.set_h([t[0] | (t[1] << 44), (t[1] >> 20) | (t[2] << 24), t[2] >> 40]);
    }
}

/// `a · b` lane by lane modulo 2^130 − 5 (limbs below 2^46 in — the sum of a limb out and a
/// message limb — and out a little over 44, 44 and 42 bits, see [`mul_by`]).
#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
unsafe fn mul_lanes(a: [__m512i; 3], b: [__m512i; 3]) -> [__m512i; 3] {
    mul_by(a, b, [times20(b[1]), times20(b[2])])
}

/// `h · rr` lane by lane, with `s` = rr's limbs 1 and 2 times 20 given.
#[target_feature(enable = "avx512f,avx512ifma")]
#[inline]
unsafe fn mul_by(h: [__m512i; 3], rr: [__m512i; 3], s: [__m512i; 2]) -> [__m512i; 3] {
    let [h0, h1, h2] = h;
    let [s1, s2] = s;
    let zero = _mm512_setzero_si512();
    let mask44 = _mm512_set1_epi64(MASK44 as i64);
    let mask42 = _mm512_set1_epi64(MASK42 as i64);
    // Products below 2^104 in two halves: low 52 bits, and high bits (weight 2^52).
    let lo0 = _mm512_madd52lo_epu64(
        _mm512_madd52lo_epu64(_mm512_madd52lo_epu64(zero, h0, rr[0]), h1, s2),
        h2,
        s1,
    );
    let hi0 = _mm512_madd52hi_epu64(
        _mm512_madd52hi_epu64(_mm512_madd52hi_epu64(zero, h0, rr[0]), h1, s2),
        h2,
        s1,
    );
    let lo1 = _mm512_madd52lo_epu64(
        _mm512_madd52lo_epu64(_mm512_madd52lo_epu64(zero, h0, rr[1]), h1, rr[0]),
        h2,
        s2,
    );
    let hi1 = _mm512_madd52hi_epu64(
        _mm512_madd52hi_epu64(_mm512_madd52hi_epu64(zero, h0, rr[1]), h1, rr[0]),
        h2,
        s2,
    );
    let lo2 = _mm512_madd52lo_epu64(
        _mm512_madd52lo_epu64(_mm512_madd52lo_epu64(zero, h0, rr[2]), h1, rr[1]),
        h2,
        rr[0],
    );
    let hi2 = _mm512_madd52hi_epu64(
        _mm512_madd52hi_epu64(_mm512_madd52hi_epu64(zero, h0, rr[2]), h1, rr[1]),
        h2,
        rr[0],
    );
    // Weight 2^52 is limb weight · 2^8; what passes 2^132 comes back times 20.
    let t0 = _mm512_add_epi64(lo0, times20(_mm512_slli_epi64::<8>(hi2)));
    let t1 = _mm512_add_epi64(lo1, _mm512_slli_epi64::<8>(hi0));
    let t2 = _mm512_add_epi64(lo2, _mm512_slli_epi64::<8>(hi1));
    // Each limb's carry moved up at once, not one after another: limbs below 2^56 here, so
    // the carries are below 2^14 and the results below 2^44 + 2^16, 2^44 + 2^12 and
    // 2^42 + 2^12 — inputs the next multiplication takes (below 2^52) — with a chain three
    // operations deep instead of ten (the lanes' chain is what a seal's last chunks wait on).
    let (c0, c1, c2) = (
        _mm512_srli_epi64::<44>(t0),
        _mm512_srli_epi64::<44>(t1),
        _mm512_srli_epi64::<42>(t2),
    );
    [
        _mm512_add_epi64(
            _mm512_and_si512(t0, mask44),
            _mm512_add_epi64(c2, _mm512_slli_epi64::<2>(c2)),
        ),
        _mm512_add_epi64(_mm512_and_si512(t1, mask44), c0),
        _mm512_add_epi64(_mm512_and_si512(t2, mask42), c1),
    ]
}

/// `a` in the even lanes, `b` in the odd ones.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn alternate(a: u64, b: u64) -> __m512i {
    let (a, b) = (a as i64, b as i64);
    _mm512_setr_epi64(a, b, a, b, a, b, a, b)
}

/// `v · 20`, lane by lane.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn times20(v: __m512i) -> __m512i {
    _mm512_add_epi64(_mm512_slli_epi64::<4>(v), _mm512_slli_epi64::<2>(v))
}

/// Absorbs every whole 128-byte chunk of `message` into the empty `poly`; returns how many
/// bytes that took (the scalar chain takes the rest). The tests' way through the lanes (the
/// AEAD feeds them between its rounds).
///
/// # Safety
/// The CPU must have AVX-512 F and IFMA.
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512ifma")]
unsafe fn absorb_chunks(poly: &mut Poly, message: &[u8]) -> usize {
    if message.len() < 128 {
        return 0;
    }
    let mut lanes = Lanes::new(poly, message.len());
    for _ in 0..lanes.chunks() {
        lanes.absorb_next(message);
    }
    lanes.finish(poly);
    128 * lanes.chunks()
}

/// Carries limbs (each below 2^50) back to 44, 44 and 42 bits (the top's excess × 5).
fn mul_free_carry(s: Limbs) -> Limbs {
    let t1 = s[1] + (s[0] >> 44);
    let t2 = s[2] + (t1 >> 44);
    let t0 = (s[0] & MASK44) + (t2 >> 42) * 5;
    [t0 & MASK44, (t1 & MASK44) + (t0 >> 44), t2 & MASK42]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_44_multiplication_matches_radix_64() {
        // (p − 1) · 2 ≡ p − 2 (p = 2^130 − 5): the only representative below 2^130 + 2^44.
        let a = [MASK44 - 5, MASK44, MASK42];
        let got = mul_free_carry(mul_free_carry(mul(a, [2, 0, 0])));
        assert_eq!(got, [MASK44 - 6, MASK44, MASK42]);
        assert_eq!(mul([3, 0, 0], [5, 0, 0]), [15, 0, 0]);
        assert_eq!(mul([0, 1, 0], [0, 1, 0]), [0, 0, 1]);
    }

    /// The eight-lane path and the scalar one give the same tag, at the extremes of the
    /// carries: all-ones keys and blocks, and a pseudo-random mix.
    #[test]
    fn eight_lanes_tag_like_the_scalar_chain() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512ifma")) {
            eprintln!("no AVX-512 IFMA here: nothing to compare");
            return;
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        let random: Vec<u8> = (0..4096).map(|_| next()).collect();
        for key in [[0xffu8; 32], [0u8; 32], std::array::from_fn(|i| random[i])] {
            for fill in [None, Some(0xffu8), Some(0u8)] {
                for len in [128, 129, 255, 256, 1024, 1420, 4096] {
                    let data: Vec<u8> = match fill {
                        Some(b) => vec![b; len],
                        None => random[..len].to_vec(),
                    };
                    let mut scalar = Poly::new(&key);
                    scalar.padded(&data);
                    let mut lanes = Poly::new(&key);
                    // SAFETY: the features were checked above.
                    let taken = unsafe { absorb_chunks(&mut lanes, &data) };
                    assert_eq!(taken, len / 128 * 128);
                    lanes.padded(&data[taken..]);
                    assert_eq!(
                        lanes.finish(len),
                        scalar.finish(len),
                        "key {:x?}…, fill {fill:?}, {len} bytes",
                        &key[..4]
                    );
                }
            }
        }
    }
}
