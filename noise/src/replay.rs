//! The receive side's replay window (whitepaper §5.4.6, RFC 6479's bitmap): which counters of
//! one session's data messages were accepted, over the last 8,128 below the greatest — the
//! kernel's and wireguard-go's window, eight times boringtun's 1,024, so a worker descheduled
//! between encrypting and sending cannot push a peer's packets out of it.

/// Counters a session may never use (the last 2^13 of the space, as the kernel refuses them).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

const WORDS: usize = 128;
const BITS: u64 = (WORDS * 64) as u64;
/// How far below the greatest counter a message may still be accepted: the bitmap minus the
/// word that is being reused.
pub const WINDOW: u64 = BITS - 64;

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("counter already accepted")]
    Duplicate,
    #[error("counter more than {WINDOW} below the greatest accepted")]
    TooOld,
    #[error("counter beyond the session's limit")]
    Exhausted,
}

/// See the module documentation.
#[derive(Clone)]
pub struct ReplayWindow {
    /// The greatest counter accepted, when any was.
    greatest: Option<u64>,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            greatest: None,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` would be accepted now (before decrypting: a cheap refusal).
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(ReplayError::Exhausted);
        }
        let Some(greatest) = self.greatest else {
            return Ok(());
        };
        if counter > greatest {
            return Ok(());
        }
        if greatest - counter > WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (word, bit) = position(counter);
        if self.bits[word] & bit != 0 {
            Err(ReplayError::Duplicate)
        } else {
            Ok(())
        }
    }

    /// Marks `counter` accepted (after the message authenticated), checking again: another
    /// thread may have accepted it since [`ReplayWindow::check`].
    pub fn accept(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        let (word, bit) = position(counter);
        if self.greatest.is_none_or(|g| counter > g) {
            // Moving up: clear the words after the old greatest's up to the new one's (at most
            // the whole ring), so their old bits are not taken for counters of the new range.
            let to = counter / 64;
            let from = self.greatest.map_or(to, |g| g / 64 + 1);
            for w in from..=to.min(from + WORDS as u64 - 1) {
                self.bits[(w % WORDS as u64) as usize] = 0;
            }
            self.greatest = Some(counter);
        }
        self.bits[word] |= bit;
        Ok(())
    }
}

fn position(counter: u64) -> (usize, u64) {
    (
        ((counter / 64) % WORDS as u64) as usize,
        1 << (counter % 64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_reordered_duplicate_and_too_old() {
        let mut w = ReplayWindow::default();
        for c in 0..100 {
            assert_eq!(w.accept(c), Ok(()));
        }
        assert_eq!(w.accept(50), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(200), Ok(()));
        assert_eq!(
            w.accept(150),
            Ok(()),
            "below the greatest, inside the window, new"
        );
        assert_eq!(w.accept(150), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(200 + WINDOW), Ok(()));
        // Exactly WINDOW below the greatest is still inside; one more is not.
        assert_eq!(w.check(200), Err(ReplayError::Duplicate));
        assert_eq!(w.accept(199), Err(ReplayError::TooOld));
        assert_eq!(w.accept(201), Ok(()));
        assert_eq!(w.accept(REJECT_AFTER_MESSAGES), Err(ReplayError::Exhausted));
    }

    #[test]
    fn a_jump_clears_the_reused_words() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(5), Ok(()));
        // 5 + BITS lands on the same bit: it must not read as a duplicate.
        assert_eq!(w.accept(5 + BITS), Ok(()));
        assert_eq!(w.accept(5 + BITS - 1), Ok(()));
        assert_eq!(w.accept(5), Err(ReplayError::TooOld));
        // A jump far beyond, then counters just below it are new.
        assert_eq!(w.accept(1 << 40), Ok(()));
        for c in (1u64 << 40) - 100..(1 << 40) {
            assert_eq!(w.accept(c), Ok(()), "{c}");
        }
    }

    #[test]
    fn matches_a_set_based_model_on_a_random_walk() {
        use std::collections::HashSet;
        let mut w = ReplayWindow::default();
        let mut seen = HashSet::new();
        let mut greatest: Option<u64> = None;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = greatest.unwrap_or(0);
            let c = match x % 8 {
                0 => base + x % 300,
                1 => base.saturating_sub(x % (WINDOW + 200)),
                _ => base.saturating_sub(x % 64) + (x >> 60),
            };
            let expected = if greatest.is_some_and(|g| c <= g && g - c > WINDOW) {
                Err(ReplayError::TooOld)
            } else if seen.contains(&c) {
                Err(ReplayError::Duplicate)
            } else {
                Ok(())
            };
            assert_eq!(w.accept(c), expected, "counter {c}, greatest {greatest:?}");
            if expected.is_ok() {
                seen.insert(c);
                greatest = Some(greatest.map_or(c, |g| g.max(c)));
            }
        }
    }
}
