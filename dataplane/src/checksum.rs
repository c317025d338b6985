//! The Internet checksum (RFC 1071) of IP, TCP and UDP, the one routine behind the checksums
//! the data plane completes ([`crate::offload`]), checks and rewrites ([`crate::gro`]). The
//! sum is tun-rs's (vectorised where the CPU allows), the same that its superpacket split
//! uses, so what one side writes the other reads back identically.

/// Where TCP keeps its checksum, from the start of its header.
pub const TCP_CHECKSUM_OFFSET: usize = 16;
/// Where UDP keeps its checksum, from the start of its header.
pub const UDP_CHECKSUM_OFFSET: usize = 6;

/// Ones' complement sum of `bytes` on top of `initial`, unfolded. Folding it gives the 16-bit
/// Internet checksum sum.
pub fn sum(bytes: &[u8], initial: u64) -> u64 {
    tun_rs::checksum_no_fold(bytes, initial)
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

    #[test]
    fn the_sum_agrees_with_the_word_by_word_reference() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in (0..80).chain([1279, 1280, 1500, 9001, 65535]) {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            assert_eq!(!fold(sum(&bytes, 0)), reference(&bytes, 0), "{len} bytes");
            assert_eq!(
                !fold(sum(&bytes, 0x1_2345)),
                reference(&bytes, 0x2346),
                "{len} bytes on top of a carry"
            );
        }
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
    }
}
