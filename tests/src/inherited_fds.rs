//! Waiting out sockets that children of other test threads may still hold. Tests reach it,
//! with the lab's process module, as `tailsk8s_e2e::process`.

use std::time::{Duration, Instant};

/// How long a socket this process closed may stay open in a child that another test
/// thread forked and has not yet exec'd (close-on-exec only closes it at the exec).
pub const INHERITED_FD_GRACE: Duration = Duration::from_secs(5);

/// Polls `done` until it holds or [`INHERITED_FD_GRACE`] has passed; returns whether it
/// held. For checks that follow closing a socket in the test process: tests run as
/// threads of one process, and any of them may fork at any moment.
pub fn after_inherited_fds_close(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + INHERITED_FD_GRACE;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
