//! Names that are unique host-wide, and scratch files that go away with their owner.
//!
//! Tests run in parallel threads, and several people (or CI) may run tests, demos and
//! benchmarks on the same machine at once. Namespace names live in one host-wide directory (`/run/netns`) and
//! UAPI sockets in another (`/var/run/wireguard`), so every name carries the process id
//! and a per-process counter.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// Linux limit for an interface name (IFNAMSIZ − 1).
pub const IFNAME_MAX: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A network namespace name: `tsk-<pid>-<n>-<role>`.
pub fn netns_name(role: &str) -> String {
    format!("tsk-{}-{}-{role}", std::process::id(), next())
}

/// A WireGuard interface name, unique host-wide and at most [`IFNAME_MAX`] characters:
/// `tsk` + the pid zero-padded to 7 digits (Linux pids stay below 2^22 = 4194304) + the
/// counter. The fixed width keeps pid 12 / counter 34 apart from pid 123 / counter 4.
pub fn ifname() -> anyhow::Result<String> {
    ifname_for(std::process::id(), next())
}

fn ifname_for(pid: u32, counter: u32) -> anyhow::Result<String> {
    let name = format!("tsk{pid:07}{counter}");
    if name.len() > IFNAME_MAX {
        anyhow::bail!("interface name {name} is longer than {IFNAME_MAX} characters");
    }
    Ok(name)
}

/// A fresh path in the lab's scratch directory (`$TMPDIR/tailsk8s-lab`), for logs and
/// key files. The caller owns the file and removes it.
pub fn scratch_file(stem: &str, extension: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("tailsk8s-lab");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(format!(
        "{stem}-{}-{}.{extension}",
        std::process::id(),
        next()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn netns_names_are_distinct_and_carry_pid_and_role() {
        let names: HashSet<String> = (0..100).map(|_| netns_name("n1")).collect();
        assert_eq!(names.len(), 100);
        let pid = std::process::id().to_string();
        assert!(names.iter().all(|n| n.contains(&pid) && n.ends_with("-n1")));
    }

    #[test]
    fn ifnames_fit_ifnamsiz_for_the_largest_pid() {
        let name = ifname_for(4_194_303, 99_999).unwrap();
        assert_eq!(name, "tsk419430399999");
        assert!(name.len() <= IFNAME_MAX);
    }

    #[test]
    fn ifnames_of_different_processes_never_collide() {
        // Without padding, pid 12 + counter 34 and pid 123 + counter 4 would both be tsk1234.
        assert_ne!(ifname_for(12, 34).unwrap(), ifname_for(123, 4).unwrap());
    }

    #[test]
    fn ifname_counter_overflow_is_an_error() {
        assert!(ifname_for(4_194_303, 100_000).is_err());
    }

    #[test]
    fn scratch_files_are_distinct() {
        let a = scratch_file("log", "txt").unwrap();
        let b = scratch_file("log", "txt").unwrap();
        assert_ne!(a, b);
        assert!(a.parent().unwrap().is_dir());
    }
}
