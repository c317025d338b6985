//! Reloading the config file while the router runs (SIGHUP, or the file's content changing):
//! what may change without a restart (the static peers, with or without `[tailscale]`: the
//! [`crate::reconcile::Applier`] joins them with the Tailscale peers it last had), and
//! noticing a change. The file is
//! polled by content through its path, so a Kubernetes ConfigMap's symlink swap counts like
//! an edit in place, and a file briefly missing mid-swap is simply read again next time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::RouterConfig;

/// How often the config file is read to see whether it changed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why a new config is refused: the first setting it changes that only a restart applies.
pub fn check_reloadable(current: &RouterConfig, new: &RouterConfig) -> Result<(), &'static str> {
    let fixed: [(&'static str, bool); 13] = [
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
        (
            "[metrics] listen",
            current.metrics_listen == new.metrics_listen,
        ),
    ];
    match fixed.iter().find(|(_, same)| !same) {
        Some((key, _)) => Err(key),
        None => Ok(()),
    }
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
        config_with_tables(extra, "")
    }

    /// A config with `extra` top-level keys, a fresh static peer, and `tables` after it.
    fn config_with_tables(extra: &str, tables: &str) -> RouterConfig {
        let text = format!(
            "private_key_file = \"/k\"\nlisten_port = 51820\n{extra}\n\
             [[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"198.19.2.0/24\"]\n{tables}",
            tailsk8s_dataplane::key::Key::generate_private().public_key()
        );
        RouterConfig::parse(Path::new("/etc/r.toml"), &text).unwrap()
    }

    const TAILSCALE: &str = "cluster_cidrs = [\"198.19.0.0/16\"]";
    const TAILSCALE_TABLE: &str = "[tailscale]\nsocket = \"/run/ts.sock\"\n";

    #[test]
    fn with_tailscale_the_static_peers_may_change_too() {
        let current = config_with_tables(TAILSCALE, TAILSCALE_TABLE);
        let other_peer = config_with_tables(TAILSCALE, TAILSCALE_TABLE);
        assert_ne!(current.peers, other_peer.peers);
        assert_eq!(check_reloadable(&current, &other_peer), Ok(()));
        let other_socket =
            config_with_tables(TAILSCALE, "[tailscale]\nsocket = \"/run/other.sock\"\n");
        assert_eq!(
            check_reloadable(&current, &other_socket),
            Err("[tailscale]")
        );
        let without = config_with_tables(TAILSCALE, "");
        assert_eq!(check_reloadable(&current, &without), Err("[tailscale]"));
    }

    #[test]
    fn the_metrics_listener_needs_a_restart() {
        let current = config("");
        let metrics = config_with_tables("", "[metrics]\nlisten = \"127.0.0.1:9586\"\n");
        assert_eq!(
            check_reloadable(&current, &metrics),
            Err("[metrics] listen")
        );
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
