//! Waiting for a condition with a deadline: the lab's (and its callers') one way to let
//! something happen — a process exec, a socket listening, a router re-placing its threads —
//! instead of sleeping for a guessed time.

use std::time::{Duration, Instant};

/// How often [`until`] asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `probe` every [`POLL_INTERVAL`] until it returns `Some(value)` and returns that
/// value; an error naming `what` when `timeout` passes first, or at once when `probe` fails.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_the_probe_gives() {
        let mut calls = 0;
        let value = until("third call", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn fails_naming_what_it_waited_for_after_the_timeout() {
        let started = Instant::now();
        let err =
            until::<()>("the impossible", Duration::from_millis(50), || Ok(None)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(err.to_string().contains("the impossible"), "{err}");
    }

    #[test]
    fn a_failing_probe_ends_the_wait_at_once() {
        let err =
            until::<()>("x", Duration::from_secs(60), || anyhow::bail!("broken")).unwrap_err();
        assert!(err.to_string().contains("broken"));
    }
}
