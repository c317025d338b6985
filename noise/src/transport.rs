//! Transport data under one session's keys (whitepaper §5.4.6): sealing a data message where
//! the packet already lies — the 16-byte header written in front, the tag behind, no copy —
//! and opening one in place behind the replay window. The send counter is atomic and the
//! window takes a short lock twice (check before decrypting, accept after), so several
//! workers may seal and open for one peer at once. The AEAD is [`crate::aead`]'s: our
//! AVX-512 ChaCha20-Poly1305 where the CPU has it, ring's (boringtun's) elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::aead::Aead;
use crate::handshake::Session;
use crate::message::DATA;
use crate::primitives::TAG_LEN;
use crate::replay::{ReplayError, ReplayWindow, REJECT_AFTER_MESSAGES};

/// Type, reserved, receiver index, counter.
pub const HEADER_LEN: usize = 16;
/// After this many messages a session should be replaced (the initiator rekeys).
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// After this long a session refuses to seal or open anything.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

/// Why a data message was not sealed or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("the session is too old or has used up its counters")]
    Expired,
    #[error("not a data message of this session")]
    Malformed,
    #[error("the data message does not authenticate")]
    Forged,
    #[error("replayed: {0}")]
    Replay(#[from] ReplayError),
}

/// See the module documentation.
pub struct Transport {
    pub local_index: u32,
    pub remote_index: u32,
    send: Aead,
    receive: Aead,
    next_send: AtomicU64,
    window: parking_lot::Mutex<ReplayWindow>,
    established: Instant,
}

impl Transport {
    /// Transport for `session`, agreed at `established`.
    pub fn new(session: &Session, established: Instant) -> Transport {
        Transport::with(session, established, Aead::new)
    }

    /// Transport for `session` with the AEAD `aead` makes of each key (e.g. [`Aead::ring`]).
    pub fn with(
        session: &Session,
        established: Instant,
        aead: impl Fn(&[u8; 32]) -> Aead,
    ) -> Transport {
        Transport {
            local_index: session.local_index,
            remote_index: session.remote_index,
            send: aead(&session.send_key),
            receive: aead(&session.receive_key),
            next_send: AtomicU64::new(0),
            window: parking_lot::Mutex::new(ReplayWindow::default()),
            established,
        }
    }

    /// The AEAD implementation in use (`avx512` or `ring`).
    pub fn aead(&self) -> &'static str {
        self.send.implementation()
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.established) >= REJECT_AFTER_TIME
    }

    /// Whether the session has sent enough to be replaced.
    pub fn wants_rekey(&self) -> bool {
        self.next_send.load(Ordering::Relaxed) >= REKEY_AFTER_MESSAGES
    }

    /// Seals the packet at `buf[HEADER_LEN..HEADER_LEN + len]` (padded by the caller) into a
    /// data message in place; returns its length (`HEADER_LEN + len + 16`). `buf` must have
    /// room for the tag.
    pub fn seal(&self, now: Instant, buf: &mut [u8], len: usize) -> Result<usize, TransportError> {
        let (counter, total) = self.header(now, buf, len)?;
        self.send.seal(counter, &mut buf[HEADER_LEN..total], len);
        Ok(total)
    }

    /// Seals `packet` (padded by the caller) into a data message in `buf`, reading it where
    /// it lies; returns the message's length (`HEADER_LEN + packet.len() + 16`). The same
    /// message [`Transport::seal`] makes of a copy at `buf[HEADER_LEN..]`.
    pub fn seal_from(
        &self,
        now: Instant,
        packet: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, TransportError> {
        let (counter, total) = self.header(now, buf, packet.len())?;
        self.send
            .seal_from(counter, packet, &mut buf[HEADER_LEN..total]);
        Ok(total)
    }

    /// The next counter, its message's length, and the message's header written to `buf`.
    fn header(
        &self,
        now: Instant,
        buf: &mut [u8],
        len: usize,
    ) -> Result<(u64, usize), TransportError> {
        let total = HEADER_LEN + len + TAG_LEN;
        if buf.len() < total {
            return Err(TransportError::Malformed);
        }
        if self.expired(now) {
            return Err(TransportError::Expired);
        }
        let counter = self.next_send.fetch_add(1, Ordering::Relaxed);
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(TransportError::Expired);
        }
        buf[..4].copy_from_slice(&[DATA, 0, 0, 0]);
        buf[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        buf[8..16].copy_from_slice(&counter.to_le_bytes());
        Ok((counter, total))
    }

    /// Opens the data message `msg` in place; returns its counter and the plaintext (padding
    /// included). A refused message leaves the window unchanged.
    pub fn open<'a>(
        &self,
        now: Instant,
        msg: &'a mut [u8],
    ) -> Result<(u64, &'a mut [u8]), TransportError> {
        if msg.len() < HEADER_LEN + TAG_LEN
            || msg[..4] != [DATA, 0, 0, 0]
            || msg[4..8] != self.local_index.to_le_bytes()
        {
            return Err(TransportError::Malformed);
        }
        if self.expired(now) {
            return Err(TransportError::Expired);
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&msg[8..16]);
        let counter = u64::from_le_bytes(c);
        self.window.lock().check(counter)?;
        let plain = self
            .receive
            .open(counter, &mut msg[HEADER_LEN..])
            .ok_or(TransportError::Forged)?;
        self.window.lock().accept(counter)?;
        Ok((counter, plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Transport, Transport) {
        let s = Session {
            local_index: 1,
            remote_index: 2,
            send_key: [3; 32],
            receive_key: [4; 32],
        };
        let mirror = Session {
            local_index: 2,
            remote_index: 1,
            send_key: [4; 32],
            receive_key: [3; 32],
        };
        let t = Instant::now();
        (Transport::new(&s, t), Transport::new(&mirror, t))
    }

    #[test]
    fn seals_from_elsewhere_the_message_it_seals_in_place() {
        let ((a, _), (c, _)) = (pair(), pair());
        let now = Instant::now();
        let packet: Vec<u8> = (0..1420).map(|i| (i * 13) as u8).collect();
        let mut in_place = vec![0u8; HEADER_LEN + packet.len() + TAG_LEN];
        in_place[HEADER_LEN..HEADER_LEN + packet.len()].copy_from_slice(&packet);
        let n = a.seal(now, &mut in_place, packet.len()).unwrap();
        let mut elsewhere = vec![0xff; n + 7];
        assert_eq!(c.seal_from(now, &packet, &mut elsewhere), Ok(n));
        assert_eq!(&elsewhere[..n], &in_place[..]);
        assert_eq!(
            c.seal_from(now, &packet, &mut elsewhere[..n - 1]),
            Err(TransportError::Malformed)
        );
    }

    #[test]
    fn seals_in_place_and_opens_once() {
        let (a, b) = pair();
        let now = Instant::now();
        let mut buf = vec![0u8; HEADER_LEN + 32 + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + 32].copy_from_slice(&[7; 32]);
        let n = a.seal(now, &mut buf, 32).unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(&buf[4..8], &2u32.to_le_bytes());
        let sealed = buf.clone();
        let (counter, plain) = b.open(now, &mut buf).unwrap();
        assert_eq!((counter, &plain[..]), (0, &[7u8; 32][..]));
        let mut again = sealed.clone();
        assert_eq!(
            b.open(now, &mut again).err(),
            Some(TransportError::Replay(ReplayError::Duplicate))
        );
        let mut forged = sealed.clone();
        forged[20] ^= 1;
        // Counter 0 was accepted: a forgery under a fresh counter is what must fail.
        forged[8] = 1;
        assert_eq!(b.open(now, &mut forged).err(), Some(TransportError::Forged));
        assert_eq!(
            a.open(now, &mut sealed.clone()).err(),
            Some(TransportError::Malformed)
        );
    }

    #[test]
    fn an_old_session_refuses_both_ways() {
        let (a, b) = pair();
        let later = Instant::now() + REJECT_AFTER_TIME;
        let mut buf = vec![0u8; HEADER_LEN + TAG_LEN];
        assert_eq!(
            a.seal(later, &mut buf, 0).err(),
            Some(TransportError::Expired)
        );
        a.seal(Instant::now(), &mut buf, 0).unwrap();
        assert_eq!(b.open(later, &mut buf).err(), Some(TransportError::Expired));
        assert!(!a.wants_rekey());
    }
}
