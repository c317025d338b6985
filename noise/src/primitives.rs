//! The primitives WireGuard's handshake is built from (whitepaper §5.4): HASH (BLAKE2s-256),
//! MAC (keyed BLAKE2s-128), HMAC-BLAKE2s, the KDF chain, AEAD (ChaCha20-Poly1305 with a
//! counter nonce), XAEAD (XChaCha20-Poly1305, cookies) and TAI64N timestamps. Each is one
//! call on a well-kept RustCrypto crate; nothing here is written by hand.

use blake2::digest::{FixedOutput, Mac as _, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hmac::SimpleHmac;

/// Poly1305's tag.
pub const TAG_LEN: usize = 16;

/// HASH over the concatenation of `parts`.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, parts): keyed BLAKE2s with a 16-byte output.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut m =
        <Blake2sMac<blake2::digest::consts::U16> as blake2::digest::KeyInit>::new_from_slice(key)
            .expect("BLAKE2s takes keys up to 32 bytes");
    for p in parts {
        Update::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <SimpleHmac<Blake2s256> as hmac::Mac>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    for p in parts {
        hmac::Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

/// KDF_n(key, input) for n = 1, 2, 3: the first n outputs of the chain.
pub fn kdf<const N: usize>(key: &[u8; 32], input: &[u8]) -> [[u8; 32]; N] {
    let prk = hmac(key, &[input]);
    let mut out = [[0u8; 32]; N];
    let mut previous = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        let chained: &[u8] = if i == 0 { &[] } else { &previous };
        *slot = hmac(&prk, &[chained, &[i as u8 + 1]]);
        previous = *slot;
    }
    out
}

/// WireGuard's AEAD nonce: 32 zero bits, then the counter little-endian.
pub fn counter_nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Seals `buf[..len]` in place with `aad` under AEAD `A`, the tag at `buf[len..len + 16]`.
fn seal_with<A: KeyInit + AeadInPlace>(
    key: &[u8; 32],
    nonce: &[u8],
    aad: &[u8],
    buf: &mut [u8],
    len: usize,
) {
    let (data, rest) = buf.split_at_mut(len);
    let tag = A::new_from_slice(key)
        .expect("a 32-byte key")
        .encrypt_in_place_detached(GenericArray::from_slice(nonce), aad, data)
        .expect("a handshake field is far below the AEAD's limit");
    rest[..TAG_LEN].copy_from_slice(&tag);
}

/// Opens `buf[..len + 16]` in place under AEAD `A`; `false` (and `buf` unspecified) when it is
/// forged.
fn open_with<A: KeyInit + AeadInPlace>(
    key: &[u8; 32],
    nonce: &[u8],
    aad: &[u8],
    buf: &mut [u8],
    len: usize,
) -> bool {
    let (data, rest) = buf.split_at_mut(len);
    A::new_from_slice(key)
        .expect("a 32-byte key")
        .decrypt_in_place_detached(
            GenericArray::from_slice(nonce),
            aad,
            data,
            GenericArray::from_slice(&rest[..TAG_LEN]),
        )
        .is_ok()
}

/// AEAD: seals `buf[..len]` in place with `aad`, the tag at `buf[len..len + 16]`.
pub fn seal(key: &[u8; 32], counter: u64, aad: &[u8], buf: &mut [u8], len: usize) {
    seal_with::<ChaCha20Poly1305>(key, &counter_nonce(counter), aad, buf, len)
}

/// AEAD: opens `buf[..len + 16]` in place; `false` (and `buf` unspecified) when it is forged.
pub fn open(key: &[u8; 32], counter: u64, aad: &[u8], buf: &mut [u8], len: usize) -> bool {
    open_with::<ChaCha20Poly1305>(key, &counter_nonce(counter), aad, buf, len)
}

/// XAEAD seal of `buf[..len]` with a 24-byte nonce (cookie replies).
pub fn xseal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], buf: &mut [u8], len: usize) {
    seal_with::<XChaCha20Poly1305>(key, nonce, aad, buf, len)
}

/// XAEAD open; `false` when forged.
pub fn xopen(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], buf: &mut [u8], len: usize) -> bool {
    open_with::<XChaCha20Poly1305>(key, nonce, aad, buf, len)
}

/// TAI64N: seconds since 1970 on the TAI64 scale (2^62 + 10, as wireguard-go labels them),
/// then nanoseconds, both big-endian: a responder keeps the largest it has seen per peer and
/// refuses an initiation that does not exceed it (replayed initiations).
pub fn tai64n(since_epoch: std::time::Duration) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&((1u64 << 62) + 10 + since_epoch.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&since_epoch.subsec_nanos().to_be_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blake2s_and_its_mac_match_the_reference_vectors() {
        // RFC 7693 Appendix B: BLAKE2s-256("abc").
        assert_eq!(
            hash(&[b"a", b"bc"]),
            [
                0x50, 0x8c, 0x5e, 0x8c, 0x32, 0x7c, 0x14, 0xe2, 0xe1, 0xa7, 0x2b, 0xa3, 0x4e, 0xeb,
                0x45, 0x2f, 0x37, 0x45, 0x8b, 0x20, 0x9e, 0xd6, 0x3a, 0x29, 0x4d, 0x99, 0x9b, 0x4c,
                0x86, 0x67, 0x59, 0x82
            ]
        );
        // Keyed: a different key gives a different MAC; split input gives the same.
        assert_eq!(mac(b"k", &[b"ab", b"c"]), mac(b"k", &[b"abc"]));
        assert_ne!(mac(b"k", &[b"abc"]), mac(b"j", &[b"abc"]));
    }

    #[test]
    fn kdf_outputs_chain() {
        let key = [3u8; 32];
        let [a] = kdf::<1>(&key, b"x");
        let [b, c] = kdf::<2>(&key, b"x");
        let [d, e, f] = kdf::<3>(&key, b"x");
        assert_eq!((a, b, d, c, e), (b, d, a, e, c));
        assert_ne!(e, f);
        assert_eq!(c, hmac(&hmac(&key, &[b"x"]), &[&a, &[2]]));
    }

    #[test]
    fn aead_round_trips_and_refuses_forgeries() {
        let key = [9u8; 32];
        let mut buf = [0u8; 5 + TAG_LEN];
        buf[..5].copy_from_slice(b"hello");
        seal(&key, 7, b"aad", &mut buf, 5);
        let sealed = buf;
        assert!(!open(&key, 8, b"aad", &mut buf.clone(), 5));
        assert!(!open(&key, 7, b"aae", &mut buf.clone(), 5));
        assert!(open(&key, 7, b"aad", &mut buf, 5));
        assert_eq!(&buf[..5], b"hello");
        let mut x = [0u8; 5 + TAG_LEN];
        x[..5].copy_from_slice(b"hello");
        xseal(&key, &[1; 24], b"m", &mut x, 5);
        assert_ne!(x, sealed);
        assert!(xopen(&key, &[1; 24], b"m", &mut x, 5));
        assert_eq!(&x[..5], b"hello");
    }

    #[test]
    fn timestamps_order_as_time_does() {
        use std::time::Duration;
        let a = tai64n(Duration::new(1_700_000_000, 999_999_999));
        let b = tai64n(Duration::new(1_700_000_001, 0));
        assert!(a < b);
    }
}
