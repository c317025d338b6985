//! Reloading the config file while the router runs (SIGHUP, or the file's content changing):
//! what may change without a restart (the static peers), and noticing a change. The file is
//! polled by content through its path, so a Kubernetes ConfigMap's symlink swap counts like
//! an edit in place, and a file briefly missing mid-swap is simply read again next time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::RouterConfig;

/// How often the config file is read to see whether it changed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a new config is refused: the first setting it changes that only a restart applies.
pub fn check_reloadable(current: &RouterConfig, new: &RouterConfig) -> Result<(), &'static str> {
    let fixed: [(&'static str, bool); 12] = [
        ("interface", current.interface == new.interface),
        (
            "private_key_file",
            current.private_key_file == new.private_key_file,
        ),
        ("listen_port", current.listen_port == new.listen_port),
        ("mtu", current.mtu == new.mtu),
        ("fwmark", current.fwmark == new.fwmark),
        ("workers", current.workers == new.workers),
        ("offload", current.offload == new.offload),
        (
            "worker_affinity",
            current.worker_affinity == new.worker_affinity,
        ),
        ("pod_cidrs", current.pod_cidrs == new.pod_cidrs),
        ("cluster_cidrs", current.cluster_cidrs == new.cluster_cidrs),
        ("endpoints", current.endpoints == new.endpoints),
        ("[tailscale]", current.tailscale == new.tailscale),
    ];
    if let Some((key, _)) = fixed.iter().find(|(_, same)| !same) {
        return Err(key);
    }
    // The Tailscale source holds its own copy of the static peers.
    if current.tailscale.is_some() && current.peers != new.peers {
        return Err("[[peer]] (with [tailscale])");
    }
    Ok(())
}

/// Watches the config file's content.
pub struct FileWatch {
    path: PathBuf,
    seen: Option<Vec<u8>>,
    next: Instant,
}

impl FileWatch {
    /// Starts from the file as it is now.
    pub fn new(path: &Path) -> FileWatch {
        FileWatch {
            path: path.to_path_buf(),
            seen: std::fs::read(path).ok(),
            next: Instant::now() + POLL_INTERVAL,
        }
    }

    /// Takes the file as it is now as seen (after a reload for SIGHUP, so that writing the
    /// earlier content back is a change).
    pub fn resync(&mut self) {
        self.seen = std::fs::read(&self.path).ok();
    }

    /// Whether the content differs from the last seen, checked at most every
    /// [`POLL_INTERVAL`]; an unreadable file is no change (a swap in progress).
    pub fn changed(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + POLL_INTERVAL;
        match std::fs::read(&self.path) {
            Ok(content) if self.seen.as_deref() != Some(&content[..]) => {
                self.seen = Some(content);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> RouterConfig {
        let text = format!(
            "private_key_file = \"/k\"\nlisten_port = 51820\n{extra}\n\
             [[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"198.19.2.0/24\"]\n",
            tailsk8s_dataplane::key::Key::generate_private().public_key()
        );
        RouterConfig::parse(Path::new("/etc/r.toml"), &text).unwrap()
    }

    #[test]
    fn peers_may_change_fixed_settings_may_not() {
        let current = config("");
        assert_eq!(check_reloadable(&current, &config("")), Ok(()));
        assert_eq!(
            check_reloadable(&current, &config("mtu = 1300")),
            Err("mtu")
        );
        assert_eq!(
            check_reloadable(&current, &config("interface = \"tsk9\"")),
            Err("interface")
        );
    }

    #[test]
    fn a_content_change_is_seen_once_even_through_a_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("router.toml");
        std::fs::write(dir.path().join("a"), "one").unwrap();
        std::os::unix::fs::symlink("a", &link).unwrap();
        let mut watch = FileWatch::new(&link);
        let mut now = Instant::now() + POLL_INTERVAL;
        assert!(!watch.changed(now));
        std::fs::write(dir.path().join("b"), "two").unwrap();
        std::fs::remove_file(&link).unwrap();
        now += POLL_INTERVAL;
        assert!(!watch.changed(now), "a missing file is no change");
        std::os::unix::fs::symlink("b", &link).unwrap();
        assert!(!watch.changed(now), "polled again before the interval");
        now += POLL_INTERVAL;
        assert!(watch.changed(now));
        now += POLL_INTERVAL;
        assert!(!watch.changed(now));
    }
}
