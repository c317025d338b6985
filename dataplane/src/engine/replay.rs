//! Replay drops told apart. boringtun keeps a 1,024-packet window per session and says only
//! whether a data message's counter was seen before (a duplicate) or lies behind its window
//! (too old); the kernel's window is 8,128 packets. To know whether a too-old drop is one
//! the kernel would have taken — the sign that our own sender or the path reordered a
//! peer's packets further than boringtun tolerates — each peer keeps the highest counter it
//! has authenticated in its last two sessions (current and previous receiver index, fixed
//! size, no allocation), and a too-old drop is measured against it.
//!
//! The counter of a dropped message is read in clear from its header: boringtun checks the
//! window before it decrypts, so the counter is not authenticated. A forged message can at
//! most move a drop between the two too-old reasons.

use crate::stats::DropReason;

/// The kernel's window (`COUNTER_WINDOW_SIZE`, 8,192 bits less one word): it accepts a counter
/// at most this far behind the highest seen.
pub(crate) const KERNEL_WINDOW: u64 = 8128;

/// The highest authenticated counter of a peer's last two sessions, by receiver index.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CountersSeen {
    /// (receiver index, highest counter); `sessions[0]` is the one authenticated last.
    sessions: [Option<(u32, u64)>; 2],
}

impl CountersSeen {
    /// A data message of session `receiver_index` with `counter` was authenticated.
    #[inline]
    pub(crate) fn authenticated(&mut self, receiver_index: u32, counter: u64) {
        let [last, previous] = self.sessions;
        self.sessions = match (last, previous) {
            (Some((index, highest)), _) if index == receiver_index => {
                [Some((index, highest.max(counter))), previous]
            }
            (_, Some((index, highest))) if index == receiver_index => {
                [Some((index, highest.max(counter))), last]
            }
            _ => [Some((receiver_index, counter)), last],
        };
    }

    /// The reason for a message boringtun found older than its window: inside the kernel's
    /// window or not. A session the peer did not follow (older than the previous one) counts
    /// as too old for the kernel too, which keeps three sessions at most.
    pub(crate) fn too_old(&self, receiver_index: u32, counter: u64) -> DropReason {
        let behind = self
            .sessions
            .iter()
            .flatten()
            .find(|(index, _)| *index == receiver_index)
            .map(|(_, highest)| highest.saturating_sub(counter));
        match behind {
            Some(behind) if behind <= KERNEL_WINDOW => DropReason::ReplayWindow,
            _ => DropReason::ReplayTooOld,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_behind_the_highest_is_measured_per_session() {
        let mut seen = CountersSeen::default();
        assert_eq!(seen.too_old(7, 0), DropReason::ReplayTooOld);
        seen.authenticated(7, 10_000);
        seen.authenticated(7, 9_000);
        assert_eq!(
            seen.too_old(7, 10_000 - KERNEL_WINDOW),
            DropReason::ReplayWindow
        );
        assert_eq!(
            seen.too_old(7, 10_000 - KERNEL_WINDOW - 1),
            DropReason::ReplayTooOld
        );
        // A new session: the previous one is still followed, an older one is not.
        seen.authenticated(8, 5);
        assert_eq!(seen.too_old(7, 9_000), DropReason::ReplayWindow);
        assert_eq!(seen.too_old(8, 0), DropReason::ReplayWindow);
        seen.authenticated(7, 10_001);
        seen.authenticated(9, 1);
        assert_eq!(seen.too_old(8, 0), DropReason::ReplayTooOld);
        assert_eq!(seen.too_old(7, 10_000), DropReason::ReplayWindow);
    }
}
