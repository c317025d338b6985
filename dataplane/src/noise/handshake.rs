//! A peer's side of the handshake: initiations we send (and retry), initiations we answer,
//! responses we complete, cookie replies we take. The cryptography is `tailsk8s-noise`'s; the
//! policies are here — fresh ephemeral keys and receiver indices, the initiation's timestamp
//! must beat the last one accepted (replays), at most one initiation per peer every 20 ms
//! (floods), a cookie from the peer keyed into MAC2 for two minutes.

use rand_core::{OsRng, RngCore};
use tailsk8s_noise::message::RESPONSE_LEN;
use tailsk8s_noise::{HandshakeError, Initiated, OpenedInitiation};
use x25519_dalek::StaticSecret;

use super::sessions::Keypair;
use super::timers::{jitter_ms, REKEY_TIMEOUT_MS};
use super::{DeviceKeys, PeerNoise};
use crate::stats::DropReason;

/// At most 50 initiations a second from one peer are answered (whitepaper §5.1).
const MIN_INITIATION_INTERVAL_MS: u64 = 1000 / 50;
/// A cookie from the peer is used for MAC2 this long (it changes its secret as often).
const COOKIE_LIFETIME_MS: u64 = 120_000;

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Handshake {
    /// Our initiation waiting for its response.
    pending: Option<Pending>,
    /// Initiations sent in this attempt to handshake (the first and its retries).
    pub attempts: u32,
    /// The timestamp of the last initiation accepted from the peer.
    last_timestamp: Option<[u8; 12]>,
    /// Engine time it was accepted at.
    last_accepted_ms: Option<u64>,
    /// The last cookie the peer sent us, and when.
    cookie: Option<(u64, [u8; 16])>,
    /// The sender index and MAC1 of the last response we sent: a cookie reply may answer it.
    last_response: Option<(u32, [u8; 16])>,
}

struct Pending {
    initiated: Initiated,
    /// Engine time at which to send it again.
    retry_at_ms: u64,
}

impl Handshake {
    pub fn in_progress(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the pending initiation is due again.
    pub fn retry_due(&self, now_ms: u64) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| now_ms >= p.retry_at_ms)
    }

    /// Gives up on the pending initiation.
    pub fn abandon(&mut self) {
        self.pending = None;
        self.attempts = 0;
    }

    fn cookie(&self, now_ms: u64) -> Option<&[u8; 16]> {
        self.cookie
            .as_ref()
            .filter(|(at, _)| now_ms.saturating_sub(*at) < COOKIE_LIFETIME_MS)
            .map(|(_, c)| c)
    }
}

fn ephemeral() -> StaticSecret {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    StaticSecret::from(bytes)
}

fn drop_reason(e: HandshakeError) -> DropReason {
    match e {
        HandshakeError::Mac1 | HandshakeError::StaticDecrypt => DropReason::DecryptFailed,
        HandshakeError::UnknownPeer => DropReason::UnknownPeer,
        HandshakeError::Malformed => DropReason::MalformedDatagram,
        HandshakeError::LowOrderKey => DropReason::LowOrderKey,
        HandshakeError::TimestampDecrypt
        | HandshakeError::ResponseDecrypt
        | HandshakeError::WrongReceiver => DropReason::HandshakeFailed,
    }
}

impl PeerNoise {
    /// Writes a new initiation into `scratch`; `retry` when it repeats an unanswered one
    /// (else a new attempt starts). `None` when the peer's key cannot handshake.
    pub(crate) fn initiate(
        &mut self,
        device: DeviceKeys<'_>,
        now_ms: u64,
        scratch: &mut [u8],
        retry: bool,
    ) -> Option<usize> {
        let index = self.new_index();
        let timestamp = device.clock.timestamp(now_ms);
        let cookie = self.handshake.cookie(now_ms).copied();
        let (msg, initiated) = tailsk8s_noise::initiate(
            device.identity,
            &self.keys,
            index,
            ephemeral(),
            timestamp,
            cookie.as_ref(),
        )
        .ok()?;
        let out = scratch.get_mut(..msg.len())?;
        out.copy_from_slice(&msg);
        self.handshake.attempts = if retry {
            self.handshake.attempts + 1
        } else {
            1
        };
        self.handshake.pending = Some(Pending {
            initiated,
            retry_at_ms: now_ms + REKEY_TIMEOUT_MS + jitter_ms(),
        });
        self.timers.sent_authenticated(now_ms, false);
        Some(msg.len())
    }

    /// Answers an initiation from this peer (its MAC1 and, under load, its cookie were
    /// checked, its sender's key decrypted): the response goes into `scratch`, the session
    /// waits as next until the initiator confirms it.
    pub(crate) fn consume_initiation(
        &mut self,
        device: DeviceKeys<'_>,
        now_ms: u64,
        opened: OpenedInitiation,
        scratch: &mut [u8],
    ) -> Result<usize, DropReason> {
        let seen = opened.finish(&self.keys).map_err(drop_reason)?;
        // TAI64N is big-endian: newer compares greater byte by byte.
        if self
            .handshake
            .last_timestamp
            .is_some_and(|last| seen.timestamp <= last)
        {
            return Err(DropReason::HandshakeFailed);
        }
        if self
            .handshake
            .last_accepted_ms
            .is_some_and(|last| now_ms.saturating_sub(last) < MIN_INITIATION_INTERVAL_MS)
        {
            return Err(DropReason::RateLimited);
        }
        let index = self.new_index();
        let cookie = self.handshake.cookie(now_ms).copied();
        let (msg, session) =
            tailsk8s_noise::respond(&self.keys, &seen, index, ephemeral(), cookie.as_ref())
                .map_err(drop_reason)?;
        let out = scratch
            .get_mut(..msg.len())
            .ok_or(DropReason::MalformedDatagram)?;
        out.copy_from_slice(&msg);
        self.handshake.last_timestamp = Some(seen.timestamp);
        self.handshake.last_accepted_ms = Some(now_ms);
        let mut mac1 = [0u8; 16];
        mac1.copy_from_slice(&msg[RESPONSE_LEN - 32..RESPONSE_LEN - 16]);
        self.handshake.last_response = Some((index, mac1));
        let at = device.clock.instant(now_ms);
        self.sessions
            .install_responded(Keypair::new(&session, at, now_ms, false));
        self.timers.received_authenticated(now_ms, false);
        self.timers.sent_authenticated(now_ms, false);
        self.timers.session_derived(now_ms);
        Ok(msg.len())
    }

    /// Completes our pending initiation with the peer's response: the session is current.
    /// The caller then sends what waited for it, or a keepalive to confirm it.
    pub(crate) fn consume_response(
        &mut self,
        device: DeviceKeys<'_>,
        now_ms: u64,
        msg: &[u8],
    ) -> Result<(), DropReason> {
        let Some(pending) = &self.handshake.pending else {
            return Err(DropReason::HandshakeFailed);
        };
        let session =
            tailsk8s_noise::consume_response(device.identity, &self.keys, &pending.initiated, msg)
                .map_err(drop_reason)?;
        self.handshake.abandon();
        let at = device.clock.instant(now_ms);
        self.sessions
            .install_initiated(Keypair::new(&session, at, now_ms, true));
        self.timers.received_authenticated(now_ms, false);
        self.timers.session_derived(now_ms);
        Ok(())
    }

    /// Takes a cookie reply to our pending initiation or to our last response: the next
    /// handshake message carries MAC2 under the cookie. (The retry timer sends it.)
    pub(crate) fn consume_cookie_reply(
        &mut self,
        now_ms: u64,
        msg: &[u8],
    ) -> Result<(), DropReason> {
        let receiver = msg
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or(DropReason::MalformedDatagram)?;
        let mac1 = match (&self.handshake.pending, &self.handshake.last_response) {
            (Some(p), _) if p.initiated.sender_index() == receiver => p.initiated.mac1,
            (_, Some((index, mac1))) if *index == receiver => *mac1,
            _ => return Err(DropReason::HandshakeFailed),
        };
        let cookie =
            tailsk8s_noise::cookie::consume_reply(&self.keys, &mac1, msg).map_err(drop_reason)?;
        self.handshake.cookie = Some((now_ms, cookie));
        Ok(())
    }
}
