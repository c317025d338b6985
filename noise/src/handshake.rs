//! The handshake of WireGuard (Noise_IKpsk2, whitepaper §5.4.2–5.4.4): building and
//! consuming the initiation and the response, and the transport keys they agree on. Sans-IO
//! and allocation-free: messages are fixed-size arrays, randomness (the ephemeral key) and
//! time (the TAI64N timestamp) come from the caller, and which peer an initiation names is
//! the caller's lookup. Replay of initiations (timestamps), rate limits and cookies under
//! load are the caller's policy; [`crate::cookie`] has the MAC2 and cookie-reply mechanics.

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::message::{self, Initiation, Response};
use crate::primitives::{hash, kdf, mac, open, seal};

/// The protocol name the chaining key starts from.
const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// WireGuard's prologue.
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
/// MAC1's key is HASH(LABEL_MAC1 ‖ the receiver's static public key).
pub(crate) const LABEL_MAC1: &[u8] = b"mac1----";
/// A cookie reply's key is HASH(LABEL_COOKIE ‖ the sender's static public key).
pub(crate) const LABEL_COOKIE: &[u8] = b"cookie--";

/// Why a handshake message was refused. Nothing about a refused message is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a handshake message of this type and length")]
    Malformed,
    #[error("MAC1 does not match: not for this key, or altered")]
    Mac1,
    #[error("the initiator's static key does not decrypt")]
    StaticDecrypt,
    #[error("the initiator's static key is not a configured peer")]
    UnknownPeer,
    #[error("the timestamp does not decrypt (wrong static key)")]
    TimestampDecrypt,
    #[error("the response does not decrypt (wrong keys or pre-shared key)")]
    ResponseDecrypt,
    #[error("the response answers another initiation")]
    WrongReceiver,
    #[error("a Diffie-Hellman result is all zeros (a low-order public key)")]
    LowOrderKey,
}

/// This node's static key pair and what derives from it alone.
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
    /// Verifies MAC1 of messages sent to this node.
    pub(crate) mac1_key: [u8; 32],
    /// Seals the cookie replies this node sends.
    pub(crate) cookie_key: [u8; 32],
}

/// The MAC1 key and the cookie key that derive from a static public key.
fn mac_keys(public: &PublicKey) -> ([u8; 32], [u8; 32]) {
    (
        hash(&[LABEL_MAC1, public.as_bytes()]),
        hash(&[LABEL_COOKIE, public.as_bytes()]),
    )
}

impl Identity {
    pub fn new(secret: StaticSecret) -> Identity {
        let public = PublicKey::from(&secret);
        let (mac1_key, cookie_key) = mac_keys(&public);
        Identity {
            mac1_key,
            cookie_key,
            secret,
            public,
        }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// One peer as the handshake sees it: its static key, the pre-shared key, and what is
/// computed from them once (the static-static DH, the MAC1 and cookie keys).
#[derive(ZeroizeOnDrop)]
pub struct Peer {
    #[zeroize(skip)]
    public: PublicKey,
    psk: [u8; 32],
    /// DH(our static, its static): `None` for a low-order key (no handshake can succeed).
    static_static: Option<[u8; 32]>,
    /// MAC1 of messages sent to this peer.
    pub(crate) mac1_key: [u8; 32],
    /// Opens the cookie replies this peer sends.
    pub(crate) cookie_key: [u8; 32],
}

impl Peer {
    pub fn new(identity: &Identity, public: PublicKey, psk: Option<[u8; 32]>) -> Peer {
        let (mac1_key, cookie_key) = mac_keys(&public);
        Peer {
            static_static: dh(&identity.secret, &public).ok(),
            mac1_key,
            cookie_key,
            psk: psk.unwrap_or([0; 32]),
            public,
        }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// The keys one handshake agreed on, for transport data in both directions.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Session {
    /// The index this node chose: data messages to it carry it as their receiver.
    pub local_index: u32,
    /// The index the peer chose: data messages this node sends carry it.
    pub remote_index: u32,
    pub send_key: [u8; 32],
    pub receive_key: [u8; 32],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .finish_non_exhaustive()
    }
}

/// An initiation this node sent, waiting for its response.
#[derive(ZeroizeOnDrop)]
pub struct Initiated {
    chaining_key: [u8; 32],
    hash: [u8; 32],
    #[zeroize(skip)] // wipes itself
    ephemeral: StaticSecret,
    sender_index: u32,
    /// The initiation's MAC1: a cookie reply to it is sealed with it as associated data.
    pub mac1: [u8; 16],
}

impl Initiated {
    /// The index the initiation names us by: the response's (and a cookie reply's) receiver.
    pub fn sender_index(&self) -> u32 {
        self.sender_index
    }
}

/// A valid initiation from a configured peer, before the caller's replay and load checks.
#[derive(ZeroizeOnDrop)]
pub struct InitiationSeen {
    /// The initiator's static key (the caller's peer).
    #[zeroize(skip)]
    pub peer: PublicKey,
    /// TAI64N: must exceed the last one accepted from this peer.
    pub timestamp: [u8; 12],
    /// The initiator's index (the response's receiver).
    pub sender_index: u32,
    chaining_key: [u8; 32],
    hash: [u8; 32],
    #[zeroize(skip)]
    ephemeral: PublicKey,
}

/// (chaining key, hash) before the first message: fixed for the protocol.
fn initial() -> ([u8; 32], [u8; 32]) {
    let ck = hash(&[CONSTRUCTION]);
    (ck, hash(&[&ck, IDENTIFIER]))
}

fn dh(secret: &StaticSecret, public: &PublicKey) -> Result<[u8; 32], HandshakeError> {
    let shared = secret.diffie_hellman(public);
    if shared.was_contributory() {
        Ok(shared.to_bytes())
    } else {
        Err(HandshakeError::LowOrderKey)
    }
}

/// Builds an initiation to `peer`. `ephemeral` must be fresh (from the OS's random source);
/// `timestamp` is [`crate::primitives::tai64n`] of now; `cookie` the peer's last cookie, if
/// one is fresh (MAC2), else MAC2 is zero.
pub fn initiate(
    identity: &Identity,
    peer: &Peer,
    sender_index: u32,
    ephemeral: StaticSecret,
    timestamp: [u8; 12],
    cookie: Option<&[u8; 16]>,
) -> Result<([u8; message::INITIATION_LEN], Initiated), HandshakeError> {
    let static_static = peer.static_static.ok_or(HandshakeError::LowOrderKey)?;
    let mut msg = [0u8; message::INITIATION_LEN];
    let (ck, h) = initial();
    let h = hash(&[&h, peer.public.as_bytes()]);
    let e_pub = PublicKey::from(&ephemeral);
    let [ck] = kdf::<1>(&ck, e_pub.as_bytes());
    let h = hash(&[&h, e_pub.as_bytes()]);
    let [ck, key] = kdf::<2>(&ck, &dh(&ephemeral, &peer.public)?);
    let m = Initiation::fields(&mut msg);
    *m.kind = message::INITIATION;
    m.sender.copy_from_slice(&sender_index.to_le_bytes());
    m.ephemeral.copy_from_slice(e_pub.as_bytes());
    m.encrypted_static[..32].copy_from_slice(identity.public.as_bytes());
    seal(&key, 0, &h, m.encrypted_static, 32);
    let h = hash(&[&h, m.encrypted_static]);
    let [ck, key] = kdf::<2>(&ck, &static_static);
    m.encrypted_timestamp[..12].copy_from_slice(&timestamp);
    seal(&key, 0, &h, m.encrypted_timestamp, 12);
    let h = hash(&[&h, m.encrypted_timestamp]);
    let mac1 = add_macs(&mut msg, &peer.mac1_key, cookie);
    Ok((
        msg,
        Initiated {
            chaining_key: ck,
            hash: h,
            ephemeral,
            sender_index,
            mac1,
        },
    ))
}

/// Checks MAC1 and decrypts an initiation sent to `identity`; `lookup` finds the peer its
/// static key names (`None`: not configured).
pub fn consume_initiation<'p>(
    identity: &Identity,
    msg: &[u8],
    lookup: impl FnOnce(&PublicKey) -> Option<&'p Peer>,
) -> Result<(InitiationSeen, &'p Peer), HandshakeError> {
    let opened = open_initiation(identity, msg)?;
    let peer = lookup(opened.initiator()).ok_or(HandshakeError::UnknownPeer)?;
    Ok((opened.finish(peer)?, peer))
}

/// An initiation whose MAC1 checked and whose initiator's static key decrypted: the first
/// half of [`consume_initiation`], for callers whose peer is not at hand as a reference (it
/// sits behind the caller's own lock).
#[derive(ZeroizeOnDrop)]
pub struct OpenedInitiation {
    #[zeroize(skip)]
    initiator: PublicKey,
    chaining_key: [u8; 32],
    hash: [u8; 32],
    #[zeroize(skip)]
    ephemeral: PublicKey,
    sender_index: u32,
    encrypted_timestamp: [u8; 28],
}

/// Checks MAC1 of an initiation sent to `identity` and decrypts its initiator's static key
/// (one Diffie-Hellman): who claims to send it.
pub fn open_initiation(
    identity: &Identity,
    msg: &[u8],
) -> Result<OpenedInitiation, HandshakeError> {
    let msg: &[u8; message::INITIATION_LEN] =
        message::exact(msg, message::INITIATION).ok_or(HandshakeError::Malformed)?;
    check_mac1(msg, &identity.mac1_key)?;
    let mut m = *msg;
    let f = Initiation::fields(&mut m);
    let (ck, h) = initial();
    let h = hash(&[&h, identity.public.as_bytes()]);
    let e_pub = PublicKey::from(*f.ephemeral);
    let [ck] = kdf::<1>(&ck, e_pub.as_bytes());
    let h = hash(&[&h, e_pub.as_bytes()]);
    let [ck, key] = kdf::<2>(&ck, &dh(&identity.secret, &e_pub)?);
    // The transcript takes each sealed field as sent: hashed before it is opened in place.
    let h_next = hash(&[&h, f.encrypted_static]);
    if !open(&key, 0, &h, f.encrypted_static, 32) {
        return Err(HandshakeError::StaticDecrypt);
    }
    let h = h_next;
    let mut static_bytes = [0u8; 32];
    static_bytes.copy_from_slice(&f.encrypted_static[..32]);
    let mut encrypted_timestamp = [0u8; 28];
    encrypted_timestamp.copy_from_slice(f.encrypted_timestamp);
    Ok(OpenedInitiation {
        initiator: PublicKey::from(static_bytes),
        chaining_key: ck,
        hash: h,
        ephemeral: e_pub,
        sender_index: u32::from_le_bytes(*f.sender),
        encrypted_timestamp,
    })
}

impl OpenedInitiation {
    /// The static key the initiation claims to come from (proven by [`Self::finish`]).
    pub fn initiator(&self) -> &PublicKey {
        &self.initiator
    }

    /// Completes the initiation with `peer`, the one [`Self::initiator`] names: the
    /// static-static Diffie-Hellman proves the claim, and the timestamp decrypts.
    pub fn finish(mut self, peer: &Peer) -> Result<InitiationSeen, HandshakeError> {
        if peer.public != self.initiator {
            return Err(HandshakeError::UnknownPeer);
        }
        let static_static = peer.static_static.ok_or(HandshakeError::LowOrderKey)?;
        let [ck, key] = kdf::<2>(&self.chaining_key, &static_static);
        let h_next = hash(&[&self.hash, &self.encrypted_timestamp]);
        if !open(&key, 0, &self.hash, &mut self.encrypted_timestamp, 12) {
            return Err(HandshakeError::TimestampDecrypt);
        }
        let mut timestamp = [0u8; 12];
        timestamp.copy_from_slice(&self.encrypted_timestamp[..12]);
        Ok(InitiationSeen {
            peer: self.initiator,
            timestamp,
            sender_index: self.sender_index,
            chaining_key: ck,
            hash: h_next,
            ephemeral: self.ephemeral,
        })
    }
}

/// Whether handshake message `msg` (an initiation or a response, by its length) carries a
/// valid MAC1 for `identity`: the check that costs no Diffie-Hellman, made before anything
/// else (and before deciding on a cookie reply under load).
pub fn mac1_valid(identity: &Identity, msg: &[u8]) -> bool {
    let ok = |r: Result<(), HandshakeError>| r.is_ok();
    if let Some(m) = message::exact::<{ message::INITIATION_LEN }>(msg, message::INITIATION) {
        return ok(check_mac1(m, &identity.mac1_key));
    }
    if let Some(m) = message::exact::<{ message::RESPONSE_LEN }>(msg, message::RESPONSE) {
        return ok(check_mac1(m, &identity.mac1_key));
    }
    false
}

/// Answers an initiation the caller accepted; returns the response and the session (this
/// node is its responder: it may send once the initiator has sent first).
pub fn respond(
    peer: &Peer,
    seen: &InitiationSeen,
    sender_index: u32,
    ephemeral: StaticSecret,
    cookie: Option<&[u8; 16]>,
) -> Result<([u8; message::RESPONSE_LEN], Session), HandshakeError> {
    let mut msg = [0u8; message::RESPONSE_LEN];
    let e_pub = PublicKey::from(&ephemeral);
    let [ck] = kdf::<1>(&seen.chaining_key, e_pub.as_bytes());
    let h = hash(&[&seen.hash, e_pub.as_bytes()]);
    let [ck] = kdf::<1>(&ck, &dh(&ephemeral, &seen.ephemeral)?);
    let [ck] = kdf::<1>(&ck, &dh(&ephemeral, &peer.public)?);
    let [ck, tau, key] = kdf::<3>(&ck, &peer.psk);
    let h = hash(&[&h, &tau]);
    {
        let f = Response::fields(&mut msg);
        *f.kind = message::RESPONSE;
        f.sender.copy_from_slice(&sender_index.to_le_bytes());
        f.receiver.copy_from_slice(&seen.sender_index.to_le_bytes());
        f.ephemeral.copy_from_slice(e_pub.as_bytes());
        seal(&key, 0, &h, f.encrypted_nothing, 0);
    }
    add_macs(&mut msg, &peer.mac1_key, cookie);
    let [receive_key, send_key] = kdf::<2>(&ck, &[]);
    Ok((
        msg,
        Session {
            local_index: sender_index,
            remote_index: seen.sender_index,
            send_key,
            receive_key,
        },
    ))
}

/// Checks MAC1 and completes the handshake `initiated` began with `peer`.
pub fn consume_response(
    identity: &Identity,
    peer: &Peer,
    initiated: &Initiated,
    msg: &[u8],
) -> Result<Session, HandshakeError> {
    let msg: &[u8; message::RESPONSE_LEN] =
        message::exact(msg, message::RESPONSE).ok_or(HandshakeError::Malformed)?;
    check_mac1(msg, &identity.mac1_key)?;
    let mut m = *msg;
    let f = Response::fields(&mut m);
    if u32::from_le_bytes(*f.receiver) != initiated.sender_index {
        return Err(HandshakeError::WrongReceiver);
    }
    let e_pub = PublicKey::from(*f.ephemeral);
    let [ck] = kdf::<1>(&initiated.chaining_key, e_pub.as_bytes());
    let h = hash(&[&initiated.hash, e_pub.as_bytes()]);
    let [ck] = kdf::<1>(&ck, &dh(&initiated.ephemeral, &e_pub)?);
    let [ck] = kdf::<1>(&ck, &dh(&identity.secret, &e_pub)?);
    let [ck, tau, key] = kdf::<3>(&ck, &peer.psk);
    let h = hash(&[&h, &tau]);
    if !open(&key, 0, &h, f.encrypted_nothing, 0) {
        return Err(HandshakeError::ResponseDecrypt);
    }
    let [send_key, receive_key] = kdf::<2>(&ck, &[]);
    Ok(Session {
        local_index: initiated.sender_index,
        remote_index: u32::from_le_bytes(*f.sender),
        send_key,
        receive_key,
    })
}

/// Writes MAC1 (and MAC2 with `cookie`, else zeros) into the last 32 bytes of `msg`;
/// returns MAC1.
fn add_macs<const N: usize>(
    msg: &mut [u8; N],
    mac1_key: &[u8; 32],
    cookie: Option<&[u8; 16]>,
) -> [u8; 16] {
    let mac1 = mac(mac1_key, &[&msg[..N - 32]]);
    msg[N - 32..N - 16].copy_from_slice(&mac1);
    let mac2 = cookie.map_or([0; 16], |c| mac(c, &[&msg[..N - 16]]));
    msg[N - 16..].copy_from_slice(&mac2);
    mac1
}

fn check_mac1<const N: usize>(msg: &[u8; N], mac1_key: &[u8; 32]) -> Result<(), HandshakeError> {
    use subtle::ConstantTimeEq;
    let expected = mac(mac1_key, &[&msg[..N - 32]]);
    if bool::from(expected.ct_eq(&msg[N - 32..N - 16])) {
        Ok(())
    } else {
        Err(HandshakeError::Mac1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Identity, Identity) {
        (
            Identity::new(StaticSecret::from([1u8; 32])),
            Identity::new(StaticSecret::from([2u8; 32])),
        )
    }

    fn handshake(
        psk_i: Option<[u8; 32]>,
        psk_r: Option<[u8; 32]>,
    ) -> Result<(Session, Session), HandshakeError> {
        let (i, r) = pair();
        let r_as_peer = Peer::new(&i, *r.public(), psk_i);
        let i_as_peer = Peer::new(&r, *i.public(), psk_r);
        let (init, initiated) = initiate(
            &i,
            &r_as_peer,
            11,
            StaticSecret::from([3u8; 32]),
            [0; 12],
            None,
        )?;
        let (seen, peer) =
            consume_initiation(&r, &init, |k| (k == i.public()).then_some(&i_as_peer))?;
        let (resp, responder) = respond(peer, &seen, 22, StaticSecret::from([4u8; 32]), None)?;
        let initiator = consume_response(&i, &r_as_peer, &initiated, &resp)?;
        Ok((initiator, responder))
    }

    #[test]
    fn both_sides_agree_on_crossed_keys() {
        let (i, r) = handshake(None, None).unwrap();
        assert_eq!((i.local_index, i.remote_index), (11, 22));
        assert_eq!((r.local_index, r.remote_index), (22, 11));
        assert_eq!(i.send_key, r.receive_key);
        assert_eq!(i.receive_key, r.send_key);
        assert_ne!(i.send_key, i.receive_key);
    }

    #[test]
    fn a_psk_mismatch_fails_the_response() {
        assert!(handshake(Some([5; 32]), Some([5; 32])).is_ok());
        assert_eq!(
            handshake(Some([5; 32]), None).err(),
            Some(HandshakeError::ResponseDecrypt)
        );
    }

    #[test]
    fn altered_or_misaddressed_messages_are_refused() {
        let (i, r) = pair();
        let r_as_peer = Peer::new(&i, *r.public(), None);
        let i_as_peer = Peer::new(&r, *i.public(), None);
        let (init, _) = initiate(
            &i,
            &r_as_peer,
            1,
            StaticSecret::from([3u8; 32]),
            [0; 12],
            None,
        )
        .unwrap();
        for at in [0, 5, 20, 60, 100, 120] {
            let mut bad = init;
            bad[at] ^= 1;
            assert!(
                consume_initiation(&r, &bad, |_| Some(&i_as_peer)).is_err(),
                "byte {at}"
            );
        }
        assert_eq!(
            consume_initiation(&r, &init[..147], |_| Some(&i_as_peer)).err(),
            Some(HandshakeError::Malformed)
        );
        // Sent to another node: MAC1 is for r's key.
        let other = Identity::new(StaticSecret::from([9u8; 32]));
        assert_eq!(
            consume_initiation(&other, &init, |_| Some(&i_as_peer)).err(),
            Some(HandshakeError::Mac1)
        );
        assert_eq!(
            consume_initiation(&r, &init, |_| None).err(),
            Some(HandshakeError::UnknownPeer)
        );
    }
}
