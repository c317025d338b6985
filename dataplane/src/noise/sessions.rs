//! A peer's sessions and the packets waiting for one. Three slots, as in the kernel: the
//! current session (the one we send with), the previous one (still opened, for data the peer
//! sent before it switched) and the next one (agreed as responder, not yet confirmed: the
//! initiator sends first, and its first data message makes it current). A data message finds
//! its session by the receiver index it carries.

use std::collections::VecDeque;
use std::time::Instant;

use tailsk8s_noise::transport::{Transport, TransportError, HEADER_LEN};
use tailsk8s_noise::Session;

use crate::stats::DropReason;

/// Packets kept while a handshake runs (the kernel's and wireguard-go's staged queue); past
/// it the oldest goes.
pub(super) const MAX_QUEUED: usize = 128;

/// One session's transport data and what the timer rules need of it.
pub(super) struct Keypair {
    pub transport: Transport,
    /// Engine time it was agreed at.
    pub established_ms: u64,
    /// Whether we initiated its handshake: only the initiator rekeys on time.
    pub initiator: bool,
}

impl Keypair {
    pub fn new(session: &Session, at: Instant, established_ms: u64, initiator: bool) -> Keypair {
        Keypair {
            transport: Transport::new(session, at),
            established_ms,
            initiator,
        }
    }
}

#[derive(Default)]
pub(super) struct Sessions {
    pub current: Option<Box<Keypair>>,
    pub previous: Option<Box<Keypair>>,
    pub next: Option<Box<Keypair>>,
    /// Padded packets waiting for a session (allocated only while a handshake runs).
    queue: VecDeque<Vec<u8>>,
}

/// A data message opened: where its plaintext lies in the caller's buffer, and whether it
/// confirmed the next session (which is now current).
pub(crate) struct Opened {
    pub plaintext: std::ops::Range<usize>,
    pub confirmed: bool,
}

impl Sessions {
    /// Seals `packet` with the current session into `scratch` (header, ciphertext, tag);
    /// `None` without a usable one (none, expired or out of counters).
    #[inline]
    pub fn seal(&self, at: Instant, packet: &[u8], scratch: &mut [u8]) -> Option<usize> {
        let keypair = self.current.as_ref()?;
        keypair.transport.seal_from(at, packet, scratch).ok()
    }

    /// Queues a packet until a session exists; `true` when the oldest waiting one was
    /// dropped to make room.
    pub fn queue(&mut self, packet: &[u8]) -> bool {
        let dropped = self.queue.len() >= MAX_QUEUED;
        if dropped {
            self.queue.pop_front();
        }
        self.queue.push_back(packet.to_vec());
        dropped
    }

    /// Seals the oldest waiting packet, when there is one and a usable session.
    pub fn seal_queued(&mut self, at: Instant, scratch: &mut [u8]) -> Option<usize> {
        let packet = self.queue.front()?;
        let n = self.seal(at, packet, scratch)?;
        self.queue.pop_front();
        Some(n)
    }

    /// Drops every waiting packet; returns how many.
    pub fn clear_queue(&mut self) -> u64 {
        let n = self.queue.len() as u64;
        self.queue = VecDeque::new();
        n
    }

    /// Opens the data message in `buf` (a copy of the datagram) with the session its receiver
    /// index names.
    pub fn open(
        &mut self,
        at: Instant,
        receiver: u32,
        buf: &mut [u8],
    ) -> Result<Opened, DropReason> {
        fn holding(slot: &Option<Box<Keypair>>, receiver: u32) -> Option<&Keypair> {
            slot.as_deref()
                .filter(|k| k.transport.local_index == receiver)
        }
        let named = |slot| holding(slot, receiver);
        let (keypair, is_next) = match (named(&self.current), named(&self.previous)) {
            (Some(k), _) | (None, Some(k)) => (k, false),
            (None, None) => (named(&self.next).ok_or(DropReason::NoSession)?, true),
        };
        let (_, plain) = keypair.transport.open(at, buf).map_err(drop_reason)?;
        let plaintext = HEADER_LEN..HEADER_LEN + plain.len();
        if is_next {
            // The initiator used the session we agreed to as responder: it is confirmed.
            self.previous = self.current.take();
            self.current = self.next.take();
        }
        Ok(Opened {
            plaintext,
            confirmed: is_next,
        })
    }

    /// A session agreed as initiator: current at once (the previous current, or an
    /// unconfirmed next, stays to open what the peer sent with it).
    pub fn install_initiated(&mut self, keypair: Keypair) {
        self.previous = self.next.take().or_else(|| self.current.take());
        self.current = Some(Box::new(keypair));
    }

    /// A session agreed as responder: next, until the initiator's first data message.
    pub fn install_responded(&mut self, keypair: Keypair) {
        self.next = Some(Box::new(keypair));
    }

    /// Forgets every session and waiting packet (keys after long silence); returns the
    /// packets dropped.
    pub fn clear(&mut self) -> u64 {
        self.current = None;
        self.previous = None;
        self.next = None;
        self.clear_queue()
    }
}

fn drop_reason(e: TransportError) -> DropReason {
    use tailsk8s_noise::replay::ReplayError;
    match e {
        TransportError::Forged => DropReason::DecryptFailed,
        TransportError::Replay(ReplayError::Duplicate) => DropReason::Replay,
        TransportError::Replay(ReplayError::TooOld | ReplayError::Exhausted) => {
            DropReason::ReplayTooOld
        }
        TransportError::Expired => DropReason::NoSession,
        TransportError::Malformed => DropReason::MalformedDatagram,
    }
}
