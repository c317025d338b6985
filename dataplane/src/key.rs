//! WireGuard keys: the 32-byte Curve25519 values in their three spellings (raw, lowercase
//! hex for UAPI, base64 for config files and `wg`), clamping, and the low-order check.

use std::fmt;

use base64::Engine as _;
use thiserror::Error;

/// Length of every WireGuard key (private, public, preshared).
pub const KEY_LEN: usize = 32;

/// Why a key could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key is 64 hexadecimal characters, got {0} characters")]
    HexLength(usize),
    #[error("a key in hex has only the characters 0-9 and a-f")]
    HexDigit,
    #[error("a key in base64 is 44 characters ending in '=', got {0} characters")]
    Base64Length(usize),
    #[error("not valid base64")]
    Base64,
}

/// A 32-byte WireGuard key. Which kind (private, public, preshared) is up to the holder.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Key(pub [u8; KEY_LEN]);

impl Key {
    pub const ZERO: Key = Key([0; KEY_LEN]);

    pub fn is_zero(&self) -> bool {
        // Constant-time-ish: no early exit on key material.
        self.0.iter().fold(0u8, |acc, b| acc | b) == 0
    }

    /// Parses the UAPI spelling: exactly 64 hex digits (either case accepted on input).
    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        if s.len() != 2 * KEY_LEN {
            return Err(KeyError::HexLength(s.len()));
        }
        let mut out = [0u8; KEY_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::HexDigit)?;
        Ok(Key(out))
    }

    /// The UAPI spelling: 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the spelling of `wg genkey` and config files: standard base64 with padding.
    pub fn from_base64(s: &str) -> Result<Key, KeyError> {
        let s = s.trim();
        if s.len() != 44 || !s.ends_with('=') {
            return Err(KeyError::Base64Length(s.len()));
        }
        let mut out = [0u8; KEY_LEN];
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(s, &mut out)
            .map_err(|_| KeyError::Base64)?;
        if n != KEY_LEN {
            return Err(KeyError::Base64);
        }
        Ok(Key(out))
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Curve25519 clamping, as the kernel stores private keys (`wg` reads them back clamped).
    pub fn clamped(mut self) -> Key {
        self.0[0] &= 248;
        self.0[31] = (self.0[31] & 127) | 64;
        self
    }

    /// A fresh random private key, clamped.
    pub fn generate_private() -> Key {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        Key(secret.to_bytes()).clamped()
    }

    /// The public key of this private key.
    pub fn public_key(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// True when a Diffie-Hellman with this public key yields the all-zero secret: one of the
    /// low-order points, to which WireGuard must never send a handshake.
    ///
    /// A table lookup rather than a probing Diffie-Hellman: every new peer asks, and with
    /// 10,000 peers in one `wg setconf` that scalar multiplication was a third of the time.
    /// The test below checks the table against the Diffie-Hellman.
    pub fn is_low_order_public(&self) -> bool {
        let mut u = self.0;
        // X25519 ignores the top bit of a public key.
        u[KEY_LEN - 1] &= 0x7f;
        LOW_ORDER_POINTS.contains(&u)
    }
}

/// Every 255-bit encoding of a Curve25519 point of small order: u = 0, 1, the two points of
/// order 8, p - 1, and p and p + 1 (non-canonical 0 and 1), little-endian. Any other
/// non-canonical value is p + 2 .. p + 18, which are not of small order.
const LOW_ORDER_POINTS: [[u8; KEY_LEN]; 7] = [
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    hex32("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
];

/// 64 hex digits as 32 bytes, at compile time (a bad digit fails the build).
const fn hex32(text: &str) -> [u8; KEY_LEN] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lowercase hex digit"),
        }
    }
    let t = text.as_bytes();
    assert!(t.len() == 2 * KEY_LEN, "not 64 hex digits");
    let mut out = [0u8; KEY_LEN];
    let mut i = 0;
    while i < KEY_LEN {
        out[i] = digit(t[2 * i]) << 4 | digit(t[2 * i + 1]);
        i += 1;
    }
    out
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material in full: a prefix of the base64 is enough to tell keys apart.
        let b64 = self.to_base64();
        write!(f, "Key({}…)", &b64[..8])
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64_round_trip() {
        let k = Key::generate_private();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(k.to_hex(), k.to_hex().to_lowercase());
    }

    #[test]
    fn bad_spellings_are_errors() {
        assert_eq!(Key::from_hex("abc"), Err(KeyError::HexLength(3)));
        assert_eq!(Key::from_hex(&"g".repeat(64)), Err(KeyError::HexDigit));
        assert!(Key::from_base64("not a key").is_err());
        assert!(Key::from_base64(&"!".repeat(43)).is_err());
    }

    #[test]
    fn clamping_matches_wg() {
        // `wg` reads back /AAA…= as +AAA…= (the kernel's clamping).
        let k = Key::from_base64("/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        assert_eq!(
            k.clamped().to_base64(),
            "+AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAEA="
        );
    }

    #[test]
    fn low_order_points_are_detected() {
        let zero = Key::ZERO;
        let one = {
            let mut k = [0u8; 32];
            k[0] = 1;
            Key(k)
        };
        assert!(zero.is_low_order_public());
        assert!(one.is_low_order_public());
        assert!(!Key::generate_private().public_key().is_low_order_public());
    }

    /// What the table stands for: a Diffie-Hellman with the key gives the all-zero secret.
    fn dh_is_low_order(k: &Key) -> bool {
        // Any private key works: the product with a low-order point is zero for all of them.
        let probe = x25519_dalek::StaticSecret::from([0x41u8; KEY_LEN]);
        !probe
            .diffie_hellman(&x25519_dalek::PublicKey::from(k.0))
            .was_contributory()
    }

    #[test]
    fn low_order_table_agrees_with_diffie_hellman() {
        let mut keys: Vec<Key> = Vec::new();
        for point in LOW_ORDER_POINTS {
            keys.push(Key(point));
            // The same point with the ignored top bit set.
            let mut high = point;
            high[KEY_LEN - 1] |= 0x80;
            keys.push(Key(high));
        }
        assert!(
            keys.iter().all(dh_is_low_order),
            "every table entry is low order"
        );
        // Near misses: each entry with one bit flipped, every non-canonical value p + 2 ..
        // p + 18 (with and without the top bit), and random keys.
        for point in LOW_ORDER_POINTS {
            for bit in 0..255 {
                let mut k = point;
                k[bit / 8] ^= 1 << (bit % 8);
                keys.push(Key(k));
            }
        }
        for low in 0xef..=0xffu8 {
            let mut k = [0xffu8; KEY_LEN];
            k[0] = low;
            keys.push(Key(k));
            k[KEY_LEN - 1] = 0x7f;
            keys.push(Key(k));
        }
        for _ in 0..200 {
            keys.push(Key::generate_private());
            keys.push(Key::generate_private().public_key());
        }
        for k in &keys {
            assert_eq!(k.is_low_order_public(), dh_is_low_order(k), "{:?}", k.0);
        }
    }
}
