//! The timer flow: time passing makes the engine send without any packet in.
//!
//! ```text
//!  tick(now) ─► engine time = now − epoch (never backwards)
//!            ─► per peer with a Noise state: Tunn::update_timers ─► handshake retransmit /
//!               rekey / passive keepalive / expiry ─► send
//!            ─► per peer: persistent keepalive due (or just switched on) and nothing sent
//!               this tick? ─► Tunn::encapsulate(empty) ─► send
//! ```
//!
//! WireGuard's timer rules (REKEY_AFTER_TIME, REJECT_AFTER_TIME, REKEY_TIMEOUT,
//! REKEY_ATTEMPT_TIME, KEEPALIVE_TIMEOUT) live inside boringtun's `Tunn`, which reads its own
//! clock: boringtun 0.7.1 has no `*_at(now)` calls (it also reads the wall clock once per
//! `Tunn`, to date handshake initiations, which no feature changes). The engine's own rules
//! (persistent keepalive, a handshake's age for `wg show`, the per-source handshake limit) run on
//! engine time. boringtun's only way to drive its clock from outside is its `mock-instant` feature
//! (a thread-local mock clock); this crate's `boringtun-mock-clock` feature turns it on and
//! makes every entry point of the engine set that clock to engine time
//! (`set_boringtun_clock`), so tests step boringtun's rules with the times they pass in.
//! No manifest in the workspace enables that feature: a dev-dependency that did would be
//! unified into the router binary under `cargo test --workspace`. A binary must never have
//! it: boringtun would then run on per-thread engine time, and `mock_instant` panics where a
//! worker whose batch began before a tick sees an instant the tick already stored. The
//! router refuses to start when built with it ([`BORINGTUN_CLOCK_DRIVEN_BY_TESTS`]).
//!
//! [`BORINGTUN_CLOCK_DRIVEN_BY_TESTS`]: super::BORINGTUN_CLOCK_DRIVEN_BY_TESTS

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use boringtun::noise::TunnResult;

use super::{send_counted, Engine, Transmit, SCRATCH_LEN};

impl Engine {
    /// Advances engine time to `now` and runs every peer's timers: handshake retries,
    /// rekeying, passive and persistent keepalives, session expiry. Call every 100–250 ms
    /// (boringtun's timers only advance here). An earlier `now` than the last changes
    /// nothing about time: engine time never goes backwards.
    pub fn tick(&self, now: Instant, scratch: &mut [u8; SCRATCH_LEN], tx: &mut impl Transmit) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let now_ms = self.now_ms.fetch_max(now_ms, Relaxed).max(now_ms);
        set_boringtun_clock(now_ms);
        let config = self.config.read();
        let Some(device_keys) = config.device_keys() else {
            return;
        };
        for peer in config.peers.iter().flatten() {
            let mut state = peer.state.lock();
            let state = &mut *state;
            if state.low_order {
                continue;
            }
            let mut sent = false;
            // boringtun's rules: a retransmitted or rekeying initiation, or a passive keepalive.
            // A state not built yet has no timer running (`crate::noise`).
            let timers = state
                .noise
                .built()
                .map(|tunn| tunn.update_timers(&mut scratch[..]));
            if let Some(TunnResult::WriteToNetwork(datagram)) = timers {
                if let Some(endpoint) = state.endpoint {
                    send_counted(
                        &self.stats,
                        Some((&peer.public_key, &mut state.traffic)),
                        tx,
                        &endpoint,
                        datagram,
                    );
                    sent = true;
                }
            }
            // Persistent keepalive is the engine's (boringtun's is left off) so that changing
            // the interval keeps the session.
            let interval_ms = u64::from(state.persistent_keepalive) * 1000;
            let keepalive_needed = state.keepalive_due
                || (interval_ms > 0 && now_ms.saturating_sub(state.last_sent_ms) >= interval_ms);
            if keepalive_needed && !sent {
                state.keepalive_due = false;
                if let Some(endpoint) = state.endpoint {
                    // An empty packet: a keepalive on a session, or a handshake without one
                    // (the peer's first use, then: its Noise state is built now).
                    let tunn = state
                        .noise
                        .get_or_build(state.noise_keys(peer), Some(device_keys));
                    if let Some(TunnResult::WriteToNetwork(datagram)) =
                        tunn.map(|tunn| tunn.encapsulate(&[], &mut scratch[..]))
                    {
                        send_counted(
                            &self.stats,
                            Some((&peer.public_key, &mut state.traffic)),
                            tx,
                            &endpoint,
                            datagram,
                        );
                        sent = true;
                    }
                }
            }
            if sent {
                state.last_sent_ms = now_ms;
            }
        }
    }
}

/// Sets boringtun's clock to engine time on the calling thread, when boringtun is built with
/// its mock clock (the `boringtun-mock-clock` feature); otherwise boringtun reads the real
/// monotonic clock and this does nothing. Called by every engine entry point that can reach
/// boringtun: [`Engine::new`], [`Engine::apply`], [`Engine::batch`], [`Engine::tick`].
#[inline]
pub(super) fn set_boringtun_clock(now_ms: u64) {
    #[cfg(feature = "boringtun-mock-clock")]
    mock_instant::MockClock::set_time(std::time::Duration::from_millis(now_ms));
    #[cfg(not(feature = "boringtun-mock-clock"))]
    let _ = now_ms;
}
