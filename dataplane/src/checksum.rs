//! The Internet checksum (RFC 1071) of IP, TCP and UDP, the one routine behind the checksums
//! the data plane completes ([`crate::offload`]), checks and rewrites ([`crate::gro`]). The
//! sum is tun-rs's (vectorised where the CPU allows, the same its superpacket split uses),
//! except over 64 bytes or more on CPUs with AVX-512, where `wide` sums a whole 64 bytes per
//! step: checking each received segment's checksum before coalescing was 4 % of the
//! receiving router's time with tun-rs's AVX2 sum (which swaps every word's bytes first).
//! Both give the same folded checksum for the same bytes, so what one side writes the other
//! reads back identically. [`copy_sum`] copies a segment's payload and sums it in one pass.

/// Where TCP keeps its checksum, from the start of its header.
pub const TCP_CHECKSUM_OFFSET: usize = 16;
/// Where UDP keeps its checksum, from the start of its header.
pub const UDP_CHECKSUM_OFFSET: usize = 6;

/// Ones' complement sum of `bytes` on top of `initial`, unfolded. Folding it gives the 16-bit
/// Internet checksum sum.
pub fn sum(bytes: &[u8], initial: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if bytes.len() >= wide::MIN_LEN && wide::available() {
        // SAFETY: the CPU has AVX-512F and AVX-512BW (checked just above).
        return initial + unsafe { wide::sum(bytes) };
    }
    tun_rs::checksum_no_fold(bytes, initial)
}

/// Copies `src` to `dst` (of the same length) and returns the ones' complement sum of the
/// bytes, unfolded, as [`sum`] on top of 0 would: one pass over the bytes where a copy and a
/// sum would take two (splitting a superpacket copies and sums every segment's payload).
pub fn copy_sum(dst: &mut [u8], src: &[u8]) -> u64 {
    assert_eq!(dst.len(), src.len(), "copy_sum: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if src.len() >= wide::MIN_LEN && wide::available() {
        // SAFETY: the CPU has AVX-512F and AVX-512BW (checked just above); `dst` is
        // `src.len()` writable bytes (asserted above) and, borrowed apart, not `src`.
        return unsafe { wide::copy_sum_to(dst.as_mut_ptr(), src) };
    }
    dst.copy_from_slice(src);
    tun_rs::checksum_no_fold(src, 0)
}

/// Appends `src` to `dst` and returns its ones' complement sum, unfolded, as [`copy_sum`]
/// does: the coalescer copies each received segment into its superpacket and checks the
/// segment's checksum in this one pass, where it took a sum and then a copy. The room is
/// written once, never cleared first.
pub fn extend_sum(dst: &mut Vec<u8>, src: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= wide::MIN_LEN && wide::available() {
        dst.reserve(src.len());
        let start = dst.len();
        // SAFETY: the CPU has AVX-512F and AVX-512BW (checked just above); `reserve` made
        // room for `src.len()` bytes after `start`, which `copy_sum_to` writes in full
        // before the length takes them in.
        unsafe {
            let total = wide::copy_sum_to(dst.as_mut_ptr().add(start), src);
            dst.set_len(start + src.len());
            return total;
        }
    }
    dst.extend_from_slice(src);
    tun_rs::checksum_no_fold(src, 0)
}

/// The sum in 64-byte steps with AVX-512. Ones' complement addition does not care about byte
/// order (RFC 1071, 2.B): the words are added as they lie in memory (little-endian) in
/// 32-bit lanes, the low and high halves of each lane apart, and only the folded result is
/// swapped back to network order. The last step's load is masked, so the bytes past the end
/// count as zeros — RFC 1071's padding of an odd last byte.
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    /// Below this the sum is a header or two, where a vector step gains nothing.
    pub const MIN_LEN: usize = 64;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// The folded sum of `bytes` in network order.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn sum(bytes: &[u8]) -> u64 {
        let mut total = 0u64;
        for piece in bytes.chunks(PIECE) {
            // SAFETY: nothing is written.
            total += u64::from(unsafe { piece_sum(piece, None) });
        }
        u64::from(super::fold(total).swap_bytes())
    }

    /// [`sum`] of `src`, copying it to the `src.len()` bytes at `dst` (which may be
    /// uninitialised) on the way.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512BW; `dst` must be valid for `src.len()` bytes of
    /// writes and not overlap `src`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn copy_sum_to(dst: *mut u8, src: &[u8]) -> u64 {
        let mut total = 0u64;
        for (i, piece) in src.chunks(PIECE).enumerate() {
            // SAFETY: piece `i` starts `i * PIECE` bytes into `src`, so into `dst` too.
            total += u64::from(piece_sum(piece, Some(unsafe { dst.add(i * PIECE) })));
        }
        u64::from(super::fold(total).swap_bytes())
    }

    /// A 32-bit lane gains at most 2 × 0xffff per step: 32,768 steps (2 MiB) cannot overflow
    /// it; longer input is summed in pieces.
    const PIECE: usize = 32_768 * 64;

    /// The folded sum of one piece (memory order), written to `to` as well where given.
    ///
    /// # Safety
    /// `to`, where given, must be valid for `piece.len()` bytes of writes.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn piece_sum(piece: &[u8], to: Option<*mut u8>) -> u16 {
        let low_half = _mm512_set1_epi32(0xffff);
        let (mut low, mut high) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut chunks = piece.chunks_exact(64);
        let mut at = 0;
        for chunk in chunks.by_ref() {
            // SAFETY: `chunk` is 64 readable bytes; the load is unaligned.
            let v = unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) };
            if let Some(to) = to {
                // SAFETY: `to` takes `piece.len()` bytes, so 64 from `at`; the store is
                // unaligned. Written as one instruction: from a plain store LLVM makes a
                // `memcpy` of the whole piece ahead of the loop, a second pass over it.
                unsafe {
                    std::arch::asm!(
                        "vmovdqu64 zmmword ptr [{to}], {v}",
                        to = in(reg) to.add(at),
                        v = in(zmm_reg) v,
                        options(nostack, preserves_flags),
                    )
                };
            }
            at += 64;
            low = _mm512_add_epi32(low, _mm512_and_si512(v, low_half));
            high = _mm512_add_epi32(high, _mm512_srli_epi32::<16>(v));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mask: u64 = (1u64 << rest.len()) - 1;
            // SAFETY: the mask covers only `rest`'s bytes; masked-off bytes are not read.
            let v = unsafe { _mm512_maskz_loadu_epi8(mask, rest.as_ptr().cast()) };
            if let Some(to) = to {
                // SAFETY: the mask covers only the `rest.len()` bytes left in `to`.
                unsafe { _mm512_mask_storeu_epi8(to.add(at).cast(), mask, v) };
            }
            low = _mm512_add_epi32(low, _mm512_and_si512(v, low_half));
            high = _mm512_add_epi32(high, _mm512_srli_epi32::<16>(v));
        }
        // Widen to 64-bit lanes before adding across: 16 lanes of up to 2^32 each.
        let widen = |v: __m512i| {
            let lo = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(v));
            let hi = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(v));
            _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi)) as u64
        };
        super::fold(widen(low) + widen(high))
    }
}

/// Folds a sum to 16 bits with end-around carry (zero only for a zero sum).
pub fn fold(mut total: u64) -> u16 {
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

/// The pseudo-header sum (unfolded) of the transport header behind IP header `ip`.
pub fn pseudo_sum(ip: &[u8], v6: bool, protocol: u8, transport_len: u16) -> u64 {
    let addresses = if v6 { &ip[8..40] } else { &ip[12..20] };
    sum(addresses, u64::from(protocol) + u64::from(transport_len))
}

/// A plain 16-bit RFC 1071 checksum written out word by word, for tests to check against
/// (so they trust neither [`sum`] nor etherparse): the complement of the folded sum of
/// `bytes` (an odd last byte padded with zero) on top of `initial`.
#[cfg(test)]
pub(crate) fn reference(bytes: &[u8], initial: u32) -> u16 {
    let mut total = initial;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        total += u32::from(word);
        total = (total & 0xffff) + (total >> 16);
    }
    !(total as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes from a xorshift generator whose state is `seed`.
    fn pseudo_random(len: usize, seed: &mut u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    }

    #[test]
    fn the_sum_agrees_with_the_word_by_word_reference() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in (0..80).chain([1279, 1280, 1500, 9001, 65535]) {
            let bytes = pseudo_random(len, &mut seed);
            assert_eq!(!fold(sum(&bytes, 0)), reference(&bytes, 0), "{len} bytes");
            assert_eq!(
                !fold(sum(&bytes, 0x1_2345)),
                reference(&bytes, 0x2346),
                "{len} bytes on top of a carry"
            );
        }
        assert_eq!(fold(0), 0);
        // The vector sum's edges: zeros (0, never 0xffff), all ones, every length around a
        // step and its masked tail, odd lengths (the last byte pads with zero).
        for len in 60..200 {
            for fill in [0u8, 0xff, 0x80] {
                let bytes = vec![fill; len];
                assert_eq!(
                    !fold(sum(&bytes, 0)),
                    reference(&bytes, 0),
                    "{len} × {fill:#x}"
                );
            }
        }
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
    }

    #[test]
    fn extend_sum_appends_and_sums_like_sum() {
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut dst = Vec::new();
        for len in (0..300).chain([1279, 1380, 1500, 9001, 65535]) {
            let src = pseudo_random(len, &mut seed);
            let before = dst.clone();
            let summed = extend_sum(&mut dst, &src);
            assert_eq!(
                &dst[..before.len()],
                &before[..],
                "{len}: what was there stays"
            );
            assert_eq!(&dst[before.len()..], &src[..], "{len} bytes appended");
            assert_eq!(!fold(summed), reference(&src, 0), "{len} bytes summed");
            if dst.len() > 100_000 {
                dst.truncate(7);
            }
        }
    }

    #[test]
    fn copy_sum_copies_and_sums_like_sum() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in (0..300).chain([1279, 1380, 1500, 9001, 65535]) {
            let src = pseudo_random(len, &mut seed);
            // Bytes around the destination stay as they were (the masked tail writes only
            // the copy's own bytes).
            let mut dst = vec![0xa5u8; len + 70];
            let summed = copy_sum(&mut dst[3..3 + len], &src);
            assert_eq!(&dst[3..3 + len], &src[..], "{len} bytes copied");
            assert!(dst[..3].iter().chain(&dst[3 + len..]).all(|&b| b == 0xa5));
            assert_eq!(!fold(summed), reference(&src, 0), "{len} bytes summed");
        }
    }
}
