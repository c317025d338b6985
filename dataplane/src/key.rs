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
    pub fn is_low_order_public(&self) -> bool {
        // Any private key works: the product with a low-order point is zero for all of them.
        let probe = x25519_dalek::StaticSecret::from([0x41u8; KEY_LEN]);
        let shared = probe.diffie_hellman(&x25519_dalek::PublicKey::from(self.0));
        !shared.was_contributory()
    }
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
}
