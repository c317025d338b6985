//! ChaCha20-Poly1305 as WireGuard's transport data uses it (a 64-bit counter nonce, no
//! associated data, the 16-byte tag after the ciphertext), behind one trait so the bench runs
//! the same loop over each implementation; and a pair of boringtun `Tunn`s with a session
//! established in memory, to weigh boringtun's own per-packet work against the bare AEAD.
//!
//! Every implementation seals in place: `buf[..len]` plaintext becomes ciphertext and the tag
//! lands in `buf[len..len + 16]`; opening reverses it. The tests check that they all produce
//! the same bytes, so the bench compares equals.

use std::net::Ipv4Addr;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Poly1305's tag.
pub const TAG_LEN: usize = 16;

/// One AEAD keyed for one direction of a session.
pub trait TransportAead {
    /// Seals `buf[..len]` in place under `counter`, the tag after it; `buf.len() >= len + 16`.
    fn seal(&mut self, counter: u64, buf: &mut [u8], len: usize);
    /// Opens `buf[..len + 16]` sealed under `counter` back into `buf[..len]`; false if forged.
    fn open(&mut self, counter: u64, buf: &mut [u8], len: usize) -> bool;
}

/// WireGuard's nonce: 32 zero bits, then the counter little-endian.
fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// ring and aws-lc-rs share one API; a macro keeps the two adapters identical.
macro_rules! ring_like {
    ($name:ident, $krate:ident) => {
        pub struct $name($krate::aead::LessSafeKey);

        impl $name {
            pub fn new(key: &[u8; 32]) -> Self {
                let unbound = $krate::aead::UnboundKey::new(&$krate::aead::CHACHA20_POLY1305, key)
                    .expect("a 32-byte key");
                $name($krate::aead::LessSafeKey::new(unbound))
            }
        }

        impl TransportAead for $name {
            fn seal(&mut self, counter: u64, buf: &mut [u8], len: usize) {
                let (data, rest) = buf.split_at_mut(len);
                let tag = self
                    .0
                    .seal_in_place_separate_tag(
                        $krate::aead::Nonce::assume_unique_for_key(nonce(counter)),
                        $krate::aead::Aad::empty(),
                        data,
                    )
                    .expect("sealing cannot fail below 256 GiB");
                rest[..TAG_LEN].copy_from_slice(tag.as_ref());
            }

            fn open(&mut self, counter: u64, buf: &mut [u8], len: usize) -> bool {
                self.0
                    .open_in_place(
                        $krate::aead::Nonce::assume_unique_for_key(nonce(counter)),
                        $krate::aead::Aad::empty(),
                        &mut buf[..len + TAG_LEN],
                    )
                    .is_ok()
            }
        }
    };
}

ring_like!(Ring, ring);
#[cfg(feature = "aws-lc")]
ring_like!(AwsLc, aws_lc_rs);

/// RustCrypto's `chacha20poly1305` (portable Rust with SIMD backends chosen at run time).
pub struct RustCrypto(chacha20poly1305::ChaCha20Poly1305);

impl RustCrypto {
    pub fn new(key: &[u8; 32]) -> Self {
        use chacha20poly1305::KeyInit;
        RustCrypto(chacha20poly1305::ChaCha20Poly1305::new(key.into()))
    }
}

impl TransportAead for RustCrypto {
    fn seal(&mut self, counter: u64, buf: &mut [u8], len: usize) {
        use chacha20poly1305::AeadInPlace;
        let (data, rest) = buf.split_at_mut(len);
        let tag = self
            .0
            .encrypt_in_place_detached(&nonce(counter).into(), b"", data)
            .expect("sealing cannot fail below 256 GiB");
        rest[..TAG_LEN].copy_from_slice(&tag);
    }

    fn open(&mut self, counter: u64, buf: &mut [u8], len: usize) -> bool {
        use chacha20poly1305::AeadInPlace;
        let (data, rest) = buf.split_at_mut(len);
        let tag = chacha20poly1305::Tag::clone_from_slice(&rest[..TAG_LEN]);
        self.0
            .decrypt_in_place_detached(&nonce(counter).into(), b"", data, &tag)
            .is_ok()
    }
}

/// tailsk8s-noise's AEAD (`noise/src/aead`), where it is our AVX-512 implementation.
pub struct Own(tailsk8s_noise::aead::Aead);

impl TransportAead for Own {
    fn seal(&mut self, counter: u64, buf: &mut [u8], len: usize) {
        self.0.seal(counter, buf, len);
    }

    fn open(&mut self, counter: u64, buf: &mut [u8], len: usize) -> bool {
        self.0.open(counter, &mut buf[..len + TAG_LEN]).is_some()
    }
}

/// OpenSSL's EVP interface against the system libssl: one context per direction, keyed once;
/// each packet only sets its nonce (as a long-lived session would use it).
#[cfg(feature = "openssl")]
pub struct OpenSsl {
    seal: openssl::cipher_ctx::CipherCtx,
    open: openssl::cipher_ctx::CipherCtx,
}

#[cfg(feature = "openssl")]
impl OpenSsl {
    pub fn new(key: &[u8; 32]) -> Self {
        let cipher = openssl::cipher::Cipher::chacha20_poly1305();
        let mut seal = openssl::cipher_ctx::CipherCtx::new().expect("an EVP context");
        seal.encrypt_init(Some(cipher), Some(key), None)
            .expect("keying ChaCha20-Poly1305");
        let mut open = openssl::cipher_ctx::CipherCtx::new().expect("an EVP context");
        open.decrypt_init(Some(cipher), Some(key), None)
            .expect("keying ChaCha20-Poly1305");
        OpenSsl { seal, open }
    }

    /// OpenSSL's version string, for the report.
    pub fn version() -> &'static str {
        openssl::version::version()
    }
}

#[cfg(feature = "openssl")]
impl TransportAead for OpenSsl {
    fn seal(&mut self, counter: u64, buf: &mut [u8], len: usize) {
        let ctx = &mut self.seal;
        ctx.encrypt_init(None, None, Some(&nonce(counter)))
            .expect("setting the nonce");
        let (data, rest) = buf.split_at_mut(len);
        ctx.cipher_update_inplace(data, len).expect("sealing");
        ctx.cipher_final(&mut []).expect("sealing");
        ctx.tag(&mut rest[..TAG_LEN]).expect("the tag");
    }

    fn open(&mut self, counter: u64, buf: &mut [u8], len: usize) -> bool {
        let ctx = &mut self.open;
        let (data, rest) = buf.split_at_mut(len);
        ctx.decrypt_init(None, None, Some(&nonce(counter))).is_ok()
            && ctx.set_tag(&rest[..TAG_LEN]).is_ok()
            && ctx.cipher_update_inplace(data, len).is_ok()
            && ctx.cipher_final(&mut []).is_ok()
    }
}

/// OpenSSL through its C functions alone, one context per direction keyed once: per packet
/// `EVP_CipherInit_ex` (nonce only), one update, final, and the tag control — the least the
/// EVP interface allows, without the safe wrapper's length queries.
#[cfg(feature = "openssl")]
pub struct OpenSslFfi {
    seal: *mut openssl_sys::EVP_CIPHER_CTX,
    open: *mut openssl_sys::EVP_CIPHER_CTX,
}

#[cfg(feature = "openssl")]
impl OpenSslFfi {
    pub fn new(key: &[u8; 32]) -> Self {
        openssl_sys::init();
        // SAFETY: contexts are created, checked for null, keyed with a 32-byte key for the
        // ChaCha20-Poly1305 cipher (which takes exactly that), and freed in Drop.
        unsafe {
            let cipher = openssl_sys::EVP_chacha20_poly1305();
            let seal = openssl_sys::EVP_CIPHER_CTX_new();
            let open = openssl_sys::EVP_CIPHER_CTX_new();
            assert!(!seal.is_null() && !open.is_null(), "EVP contexts");
            let null = std::ptr::null();
            assert_eq!(
                openssl_sys::EVP_EncryptInit_ex(
                    seal,
                    cipher,
                    std::ptr::null_mut(),
                    key.as_ptr(),
                    null
                ),
                1
            );
            assert_eq!(
                openssl_sys::EVP_DecryptInit_ex(
                    open,
                    cipher,
                    std::ptr::null_mut(),
                    key.as_ptr(),
                    null
                ),
                1
            );
            OpenSslFfi { seal, open }
        }
    }
}

#[cfg(feature = "openssl")]
impl Drop for OpenSslFfi {
    fn drop(&mut self) {
        // SAFETY: both were made by EVP_CIPHER_CTX_new and are freed once.
        unsafe {
            openssl_sys::EVP_CIPHER_CTX_free(self.seal);
            openssl_sys::EVP_CIPHER_CTX_free(self.open);
        }
    }
}

#[cfg(feature = "openssl")]
impl TransportAead for OpenSslFfi {
    fn seal(&mut self, counter: u64, buf: &mut [u8], len: usize) {
        assert!(buf.len() >= len + TAG_LEN && len <= i32::MAX as usize);
        let n = nonce(counter);
        let mut outl = 0;
        // SAFETY: the context is keyed (new); the nonce is 12 bytes, the cipher's IV length;
        // update writes len bytes in place (a stream cipher), final writes none, the tag
        // control writes 16 bytes into the buffer's tail, which the assert above guarantees.
        // (OpenSSL's EVP_CTRL_AEAD_{GET,SET}_TAG are the GCM controls' values, 0x10 and 0x11.)
        unsafe {
            let ok = openssl_sys::EVP_EncryptInit_ex(
                self.seal,
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null(),
                n.as_ptr(),
            ) == 1
                && openssl_sys::EVP_EncryptUpdate(
                    self.seal,
                    buf.as_mut_ptr(),
                    &mut outl,
                    buf.as_ptr(),
                    len as i32,
                ) == 1
                && openssl_sys::EVP_EncryptFinal_ex(
                    self.seal,
                    buf.as_mut_ptr().add(len),
                    &mut outl,
                ) == 1
                && openssl_sys::EVP_CIPHER_CTX_ctrl(
                    self.seal,
                    openssl_sys::EVP_CTRL_GCM_GET_TAG,
                    TAG_LEN as i32,
                    buf.as_mut_ptr().add(len).cast(),
                ) == 1;
            assert!(ok, "sealing");
        }
    }

    fn open(&mut self, counter: u64, buf: &mut [u8], len: usize) -> bool {
        assert!(buf.len() >= len + TAG_LEN && len <= i32::MAX as usize);
        let n = nonce(counter);
        let mut outl = 0;
        // SAFETY: as in seal; the tag control reads the 16 bytes after the ciphertext.
        unsafe {
            openssl_sys::EVP_DecryptInit_ex(
                self.open,
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null(),
                n.as_ptr(),
            ) == 1
                && openssl_sys::EVP_CIPHER_CTX_ctrl(
                    self.open,
                    openssl_sys::EVP_CTRL_GCM_SET_TAG,
                    TAG_LEN as i32,
                    buf.as_mut_ptr().add(len).cast(),
                ) == 1
                && openssl_sys::EVP_DecryptUpdate(
                    self.open,
                    buf.as_mut_ptr(),
                    &mut outl,
                    buf.as_ptr(),
                    len as i32,
                ) == 1
                && openssl_sys::EVP_DecryptFinal_ex(self.open, buf.as_mut_ptr().add(len), &mut outl)
                    == 1
        }
    }
}

/// Every implementation built into this bench, by name, keyed with `key`.
pub fn all(key: &[u8; 32]) -> Vec<(&'static str, Box<dyn TransportAead>)> {
    let mut v: Vec<(&'static str, Box<dyn TransportAead>)> = vec![
        ("ring", Box::new(Ring::new(key))),
        ("rustcrypto", Box::new(RustCrypto::new(key))),
    ];
    // Ours, each path this CPU runs: the MAC in IFMA lanes, and the stitched scalar MAC.
    for own in tailsk8s_noise::aead::Aead::every_one_here(key) {
        let name = match own.implementation() {
            "avx512-ifma" => "own-avx512-ifma",
            "avx512" => "own-avx512",
            _ => continue,
        };
        v.push((name, Box::new(Own(own))));
    }
    #[cfg(feature = "aws-lc")]
    v.push(("aws-lc-rs", Box::new(AwsLc::new(key))));
    #[cfg(feature = "openssl")]
    v.push(("openssl", Box::new(OpenSsl::new(key))));
    #[cfg(feature = "openssl")]
    v.push(("openssl-ffi", Box::new(OpenSslFfi::new(key))));
    v
}

/// Offset of the encrypted part in a WireGuard data message (type, receiver index, counter).
pub const DATA_HEADER_LEN: usize = 16;

/// What owning transport-data crypto would do per packet, as a prototype: the plaintext already
/// sits at `DATA_HEADER_LEN` in the buffer the datagram leaves from (the TUN read lands there),
/// so the message is written in place — header, then seal — with no copy. boringtun instead
/// copies the packet from the caller's buffer into the datagram buffer, then seals.
pub fn seal_data_message(
    aead: &mut dyn TransportAead,
    receiver_index: u32,
    counter: u64,
    buf: &mut [u8],
    len: usize,
) -> usize {
    buf[..4].copy_from_slice(&4u32.to_le_bytes());
    buf[4..8].copy_from_slice(&receiver_index.to_le_bytes());
    buf[8..16].copy_from_slice(&counter.to_le_bytes());
    aead.seal(counter, &mut buf[DATA_HEADER_LEN..], len);
    DATA_HEADER_LEN + len + TAG_LEN
}

/// A minimal IPv4 packet of `len` bytes (header checksum left zero: boringtun reads only the
/// version, length and source).
pub fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&Ipv4Addr::new(198, 19, 1, 2).octets());
    p[16..20].copy_from_slice(&Ipv4Addr::new(198, 19, 2, 2).octets());
    p
}

/// Two boringtun tunnels with a session established in memory (initiation, response, and one
/// data packet so the responder confirms the session): `a` encapsulates, `b` decapsulates.
pub fn tunn_pair() -> (Tunn, Tunn) {
    let sa = StaticSecret::from([1u8; 32]);
    let sb = StaticSecret::from([2u8; 32]);
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let mut m1 = vec![0u8; 2048];
    let mut m2 = vec![0u8; 2048];
    let mut m3 = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut m1, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no handshake initiation"),
    };
    let response = match b.decapsulate(None, &init, &mut m2) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no handshake response"),
    };
    match a.decapsulate(None, &response, &mut m3) {
        // The initiator answers the response with a keepalive: the responder's confirmation.
        TunnResult::WriteToNetwork(keepalive) => {
            let keepalive = keepalive.to_vec();
            assert!(matches!(
                b.decapsulate(None, &keepalive, &mut m2),
                TunnResult::Done
            ));
        }
        TunnResult::Done => {}
        _ => panic!("the handshake did not complete"),
    }
    (a, b)
}

/// The median of `v` (sorted in place): what the benches report over their rounds.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The rounds a bench runs: its first numeric argument, else `default`.
pub fn rounds_from_args(default: usize) -> usize {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_implementation_seals_to_the_same_bytes_and_opens_them() {
        let key = [7u8; 32];
        let plain: Vec<u8> = (0..1420u32).map(|i| i as u8).collect();
        let mut reference: Option<Vec<u8>> = None;
        for (name, mut aead) in all(&key) {
            let mut buf = plain.clone();
            buf.resize(plain.len() + TAG_LEN, 0);
            aead.seal(42, &mut buf, plain.len());
            match &reference {
                None => reference = Some(buf.clone()),
                Some(r) => assert_eq!(&buf, r, "{name} seals differently"),
            }
            let mut forged = buf.clone();
            forged[3] ^= 1;
            assert!(
                !aead.open(42, &mut forged, plain.len()),
                "{name} opened a forgery"
            );
            assert!(
                !aead.open(43, &mut buf.clone(), plain.len()),
                "{name}: wrong nonce"
            );
            assert!(aead.open(42, &mut buf, plain.len()), "{name} did not open");
            assert_eq!(&buf[..plain.len()], &plain[..], "{name} opened wrongly");
        }
    }

    #[test]
    fn a_prototype_data_message_has_the_wire_layout_and_opens() {
        // Same key and counter as boringtun's first data message cannot be arranged from
        // outside (its keys are private), so check the layout and that it opens.
        let key = [9u8; 32];
        let mut ring = Ring::new(&key);
        let packet = ipv4_packet(1420);
        let mut buf = vec![0u8; DATA_HEADER_LEN + 1420 + TAG_LEN];
        buf[DATA_HEADER_LEN..DATA_HEADER_LEN + 1420].copy_from_slice(&packet);
        let n = seal_data_message(&mut ring, 0xabcd, 5, &mut buf, 1420);
        assert_eq!(n, buf.len());
        assert_eq!(&buf[..4], &[4, 0, 0, 0]);
        assert_eq!(&buf[4..8], &0xabcdu32.to_le_bytes());
        assert!(ring.open(5, &mut buf[DATA_HEADER_LEN..], 1420));
        assert_eq!(&buf[DATA_HEADER_LEN..DATA_HEADER_LEN + 1420], &packet[..]);
    }

    #[test]
    fn the_tunn_pair_carries_a_packet() {
        let (mut a, mut b) = tunn_pair();
        let packet = ipv4_packet(1420);
        let mut wire = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let datagram = match a.encapsulate(&packet, &mut wire) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no data message"),
        };
        assert_eq!(datagram.len(), DATA_HEADER_LEN + 1420 + TAG_LEN);
        match b.decapsulate(None, &datagram, &mut out) {
            TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &packet[..]),
            _ => panic!("not delivered"),
        }
    }
}
