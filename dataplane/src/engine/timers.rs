//! The timer flow: time passing makes the engine send without any packet in.
//!
//! ```text
//!  tick(now) ─► engine time = now − epoch (never backwards)
//!            ─► per peer with a Noise state: its timer rules (`crate::noise`'s timers):
//!               handshake retransmit / rekey / passive keepalive / expiry ─► send
//!            ─► per peer: persistent keepalive due (or just switched on) and nothing sent
//!               this tick? ─► a keepalive (or, without a session, an initiation) ─► send
//! ```
//!
//! Every rule runs on engine time, so tests step them by passing instants to `tick`. The
//! engine's own rules here: persistent keepalive (kept out of the Noise state so changing
//! the interval keeps the session), a handshake's age for `wg show`, the per-source
//! handshake limit.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::{send_counted, Engine, Transmit, SCRATCH_LEN};
use crate::noise::Outgoing;
use crate::stats::{DropReason, Tally};

impl Engine {
    /// Advances engine time to `now` and runs every peer's timers: handshake retries,
    /// rekeying, passive and persistent keepalives, session expiry. Call every 100 ms (the
    /// rules fire within a tick of their due time). An earlier `now` than the last changes
    /// nothing about time: engine time never goes backwards.
    pub fn tick(&self, now: Instant, scratch: &mut [u8; SCRATCH_LEN], tx: &mut impl Transmit) {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let now_ms = self.now_ms.fetch_max(now_ms, Relaxed).max(now_ms);
        let config = self.config.read();
        let Some(device) = config.device_keys(&self.clock) else {
            return;
        };
        let tally = Tally::default();
        for peer in config.peers.iter().flatten() {
            let mut state = peer.state.lock();
            let state = &mut *state;
            if state.low_order {
                continue;
            }
            let mut sent = false;
            // A state not built yet has no timer running (`crate::noise`).
            if let Some(noise) = state.noise.built() {
                let tick = noise.tick(device, now_ms, &mut scratch[..]);
                for _ in 0..tick.dropped {
                    self.stats.peer_drop(&peer.drops, DropReason::NoSession);
                }
                if let (Some(n), Some(endpoint)) = (tick.message, state.endpoint) {
                    send_counted(
                        &tally,
                        Some((&peer.public_key, &mut state.traffic)),
                        tx,
                        &endpoint,
                        &scratch[..n],
                    );
                    sent = true;
                }
            }
            let interval_ms = u64::from(state.persistent_keepalive) * 1000;
            let keepalive_needed = state.keepalive_due
                || (interval_ms > 0 && now_ms.saturating_sub(state.last_sent_ms) >= interval_ms);
            if keepalive_needed && !sent {
                state.keepalive_due = false;
                if let Some(endpoint) = state.endpoint {
                    // An empty packet: a keepalive on a session, or a handshake without one
                    // (the peer's first use, then: its Noise state is built now).
                    let noise = state
                        .noise
                        .get_or_build(state.noise_keys(peer), Some(device));
                    if let Some(Outgoing::Data(n) | Outgoing::Initiation(n)) =
                        noise.map(|noise| noise.send(device, now_ms, &[], &mut scratch[..]))
                    {
                        send_counted(
                            &tally,
                            Some((&peer.public_key, &mut state.traffic)),
                            tx,
                            &endpoint,
                            &scratch[..n],
                        );
                        sent = true;
                    }
                }
            }
            if sent {
                state.last_sent_ms = now_ms;
            }
        }
        self.stats.add_tally(&tally);
    }
}
