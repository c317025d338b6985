//! Cookies (whitepaper §5.4.7): a node under load answers a handshake message whose MAC2 is
//! missing or stale with a cookie reply instead of doing Diffie-Hellman; the sender then
//! repeats the message with MAC2 keyed by that cookie, proving it owns its source address.
//! Here are the reply's sealing and opening and MAC2's check; when a node counts as under
//! load, and how often its cookie secret changes (every two minutes), is the caller's policy.

use subtle::ConstantTimeEq;

use crate::handshake::{HandshakeError, Identity, Peer};
use crate::message::{self, COOKIE_REPLY, COOKIE_REPLY_LEN};
use crate::primitives::{mac, xopen, xseal};

/// The cookie a source earns: MAC(the node's current secret, the source's address bytes).
pub fn cookie_for(secret: &[u8; 32], source: &[u8]) -> [u8; 16] {
    mac(secret, &[source])
}

/// Whether handshake message `msg` (MAC1 already checked) carries MAC2 under `cookie`.
pub fn mac2_valid(msg: &[u8], cookie: &[u8; 16]) -> bool {
    let Some(at) = msg.len().checked_sub(16) else {
        return false;
    };
    bool::from(mac(cookie, &[&msg[..at]]).ct_eq(&msg[at..]))
}

/// A cookie reply to handshake message `msg` (whose sender index and MAC1 it echoes),
/// carrying `cookie` sealed under this node's cookie key; `nonce` must be random.
pub fn reply(
    identity: &Identity,
    msg: &[u8],
    cookie: &[u8; 16],
    nonce: [u8; 24],
) -> Result<[u8; COOKIE_REPLY_LEN], HandshakeError> {
    if msg.len() < 4 + 4 + 32 || !matches!(msg[0], message::INITIATION | message::RESPONSE) {
        return Err(HandshakeError::Malformed);
    }
    let mac1 = &msg[msg.len() - 32..msg.len() - 16];
    let mut r = [0u8; COOKIE_REPLY_LEN];
    r[0] = COOKIE_REPLY;
    r[4..8].copy_from_slice(&msg[4..8]);
    r[8..32].copy_from_slice(&nonce);
    r[32..48].copy_from_slice(cookie);
    xseal(&identity.cookie_key, &nonce, mac1, &mut r[32..], 16);
    Ok(r)
}

/// Opens a cookie reply from `peer` to the message whose MAC1 was `mac1`.
pub fn consume_reply(peer: &Peer, mac1: &[u8; 16], msg: &[u8]) -> Result<[u8; 16], HandshakeError> {
    let msg: &[u8; COOKIE_REPLY_LEN] =
        message::exact(msg, COOKIE_REPLY).ok_or(HandshakeError::Malformed)?;
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&msg[8..32]);
    let mut sealed = [0u8; 32];
    sealed.copy_from_slice(&msg[32..]);
    if !xopen(&peer.cookie_key, &nonce, mac1, &mut sealed, 16) {
        return Err(HandshakeError::Mac1);
    }
    let mut cookie = [0u8; 16];
    cookie.copy_from_slice(&sealed[..16]);
    Ok(cookie)
}
