//! Cookies under load, the responder's side (whitepaper §5.4.7): the secret a source's cookie
//! is made from (a new random one every two minutes), the check of a handshake message's
//! MAC2 against its source's cookie, and the cookie reply to a message without one. The
//! sealing and the MACs are `tailsk8s_noise::cookie`'s; when the device counts as under load
//! is the driver's policy.

use std::net::SocketAddr;

use rand_core::{OsRng, RngCore};
use tailsk8s_noise::message::COOKIE_REPLY_LEN;
use tailsk8s_noise::Identity;

/// How long one secret makes cookies.
const SECRET_LIFETIME_MS: u64 = 120_000;

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Cookies {
    /// The current secret and the engine time it was made at.
    secret: Option<(u64, [u8; 32])>,
}

impl Cookies {
    /// The cookie `source` earns now.
    fn cookie(&mut self, now_ms: u64, source: SocketAddr) -> [u8; 16] {
        let secret = match self.secret {
            Some((made, secret)) if now_ms.saturating_sub(made) < SECRET_LIFETIME_MS => secret,
            _ => {
                let mut secret = [0u8; 32];
                OsRng.fill_bytes(&mut secret);
                self.secret = Some((now_ms, secret));
                secret
            }
        };
        let mut bytes = [0u8; 18];
        let n = match source.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => {
                bytes[..4].copy_from_slice(&v4.octets());
                4
            }
            std::net::IpAddr::V6(v6) => {
                bytes[..16].copy_from_slice(&v6.octets());
                16
            }
        };
        bytes[n..n + 2].copy_from_slice(&source.port().to_be_bytes());
        tailsk8s_noise::cookie::cookie_for(&secret, &bytes[..n + 2])
    }

    /// Whether handshake message `msg` (MAC1 already valid) from `source` carries the
    /// cookie its source earned; if not, the cookie reply to send (`None` if the message is
    /// too malformed to answer).
    pub(crate) fn check(
        &mut self,
        identity: &Identity,
        now_ms: u64,
        source: SocketAddr,
        msg: &[u8],
    ) -> Result<(), Option<[u8; COOKIE_REPLY_LEN]>> {
        let cookie = self.cookie(now_ms, source);
        if tailsk8s_noise::cookie::mac2_valid(msg, &cookie) {
            return Ok(());
        }
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        Err(tailsk8s_noise::cookie::reply(identity, msg, &cookie, nonce).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x25519_dalek::StaticSecret;

    #[test]
    fn a_cookie_is_per_source_and_changes_with_the_secret() {
        let mut cookies = Cookies::default();
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:51821".parse().unwrap();
        let first = cookies.cookie(0, a);
        assert_eq!(cookies.cookie(SECRET_LIFETIME_MS - 1, a), first);
        assert_ne!(
            cookies.cookie(1, b),
            first,
            "the port is part of the source"
        );
        assert_ne!(cookies.cookie(SECRET_LIFETIME_MS, a), first, "a new secret");
        let identity = Identity::new(StaticSecret::from([7u8; 32]));
        // Too short to answer: refused without a reply.
        assert_eq!(cookies.check(&identity, 0, a, &[1, 0, 0, 0]), Err(None));
    }
}
