//! WireGuard's timer rules for one peer (whitepaper §6), on engine time, run from the engine's
//! tick (every 100 ms) — so each fires within a tick of its due time:
//!
//! - an unanswered initiation is sent again after REKEY_TIMEOUT (5 s) plus up to 333 ms of
//!   jitter, and given up after REKEY_ATTEMPT_TIME / REKEY_TIMEOUT = 18 initiations, with the
//!   packets that waited for it;
//! - data sent with nothing heard back for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s) starts a
//!   new handshake (the session is presumed dead);
//! - the initiator of the current session handshakes again once it is REKEY_AFTER_TIME
//!   (120 s) old and in use, or REJECT_AFTER_TIME − KEEPALIVE_TIMEOUT − REKEY_TIMEOUT (165 s)
//!   old and still receiving; either side when its send counter nears REKEY_AFTER_MESSAGES;
//! - data received with nothing sent back for KEEPALIVE_TIMEOUT (10 s) gets a keepalive;
//! - 3 × REJECT_AFTER_TIME (540 s) after the last session was agreed, every key is dropped.
//!
//! Sessions older than REJECT_AFTER_TIME refuse to seal or open by themselves
//! (`tailsk8s_noise::transport`). Persistent keepalive is the engine's rule
//! (`crate::engine::timers`), so changing its interval keeps the session.

use rand_core::{OsRng, RngCore};

use super::{DeviceKeys, PeerNoise};

pub(super) const REKEY_TIMEOUT_MS: u64 = 5_000;
const REKEY_TIMEOUT_JITTER_MS: u32 = 334;
const KEEPALIVE_TIMEOUT_MS: u64 = 10_000;
const REKEY_AFTER_TIME_MS: u64 = 120_000;
const REJECT_AFTER_TIME_MS: u64 = 180_000;
/// REKEY_ATTEMPT_TIME (90 s) in initiations: the first and its retries.
const MAX_INITIATIONS: u32 = 90_000 / REKEY_TIMEOUT_MS as u32;

/// Up to a third of a second, so that peers that lost packets at once do not retry at once.
pub(super) fn jitter_ms() -> u64 {
    u64::from(OsRng.next_u32() % REKEY_TIMEOUT_JITTER_MS)
}

/// What the rules remember between ticks (engine time, milliseconds).
#[derive(Default)]
pub(super) struct Timers {
    /// Data received and nothing sent since (from then): a keepalive is due 10 s later.
    data_received_unanswered: Option<u64>,
    /// Data sent and nothing received since (from then): a handshake is due 15 s later.
    data_sent_unanswered: Option<u64>,
    last_data_sent: Option<u64>,
    last_data_received: Option<u64>,
    /// When the last session was agreed: its keys go 540 s later.
    last_session: Option<u64>,
}

impl Timers {
    /// Anything authenticated went out: a data message (`data`), a keepalive or a handshake
    /// message.
    pub fn sent_authenticated(&mut self, now_ms: u64, data: bool) {
        self.data_received_unanswered = None;
        if data {
            self.last_data_sent = Some(now_ms);
            self.data_sent_unanswered.get_or_insert(now_ms);
        }
    }

    /// Anything authenticated came in: a data message with a packet (`data`), a keepalive
    /// or a handshake message.
    pub fn received_authenticated(&mut self, now_ms: u64, data: bool) {
        self.data_sent_unanswered = None;
        if data {
            self.last_data_received = Some(now_ms);
            self.data_received_unanswered.get_or_insert(now_ms);
        }
    }

    pub fn session_derived(&mut self, now_ms: u64) {
        self.last_session = Some(now_ms);
    }
}

/// Whether `at` lies at most `within` before `now`.
fn recent(at: Option<u64>, now_ms: u64, within: u64) -> bool {
    at.is_some_and(|t| now_ms.saturating_sub(t) <= within)
}

/// Whether `at` lies at least `after` before `now`.
fn due(at: Option<u64>, now_ms: u64, after: u64) -> bool {
    at.is_some_and(|t| now_ms.saturating_sub(t) >= after)
}

/// What one tick of a peer's rules came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Tick {
    /// A message to send (an initiation or a keepalive) in `scratch[..n]`.
    pub message: Option<usize>,
    /// Packets that waited for a session and were dropped (the handshake was given up, or
    /// the keys were dropped).
    pub dropped: u64,
}

impl PeerNoise {
    /// Runs the rules at engine time `now_ms`; at most one message goes out per tick.
    pub(crate) fn tick(&mut self, device: DeviceKeys<'_>, now_ms: u64, scratch: &mut [u8]) -> Tick {
        let mut tick = Tick::default();
        if due(self.timers.last_session, now_ms, 3 * REJECT_AFTER_TIME_MS) {
            tick.dropped += self.sessions.clear();
            self.handshake.abandon();
            self.timers = Timers::default();
            return tick;
        }
        if self.handshake.retry_due(now_ms) {
            if self.handshake.attempts >= MAX_INITIATIONS {
                self.handshake.abandon();
                tick.dropped += self.sessions.clear_queue();
                self.timers.data_sent_unanswered = None;
            } else {
                tick.message = self.initiate(device, now_ms, scratch, true);
            }
            return tick;
        }
        if !self.handshake.in_progress() && self.wants_handshake(now_ms) {
            self.timers.data_sent_unanswered = None;
            tick.message = self.initiate(device, now_ms, scratch, false);
            return tick;
        }
        if due(
            self.timers.data_received_unanswered,
            now_ms,
            KEEPALIVE_TIMEOUT_MS,
        ) {
            let at = device.clock.instant(now_ms);
            tick.message = self.sessions.seal(at, &[], scratch);
            // Sent, or no session to send it with: either way this keepalive is done.
            self.timers.sent_authenticated(now_ms, false);
        }
        tick
    }

    /// Whether a new handshake is due: data went unanswered, or the current session is due
    /// for replacement.
    fn wants_handshake(&self, now_ms: u64) -> bool {
        if due(
            self.timers.data_sent_unanswered,
            now_ms,
            KEEPALIVE_TIMEOUT_MS + REKEY_TIMEOUT_MS,
        ) {
            return true;
        }
        let Some(current) = &self.sessions.current else {
            return false;
        };
        let age = now_ms.saturating_sub(current.established_ms);
        let in_use = recent(self.timers.last_data_sent, now_ms, KEEPALIVE_TIMEOUT_MS);
        let receiving = recent(self.timers.last_data_received, now_ms, KEEPALIVE_TIMEOUT_MS);
        let stale_receive = REJECT_AFTER_TIME_MS - KEEPALIVE_TIMEOUT_MS - REKEY_TIMEOUT_MS;
        (current.initiator
            && ((age >= REKEY_AFTER_TIME_MS && in_use) || (age >= stale_receive && receiving)))
            || current.transport.wants_rekey()
    }
}
