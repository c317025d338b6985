//! Where the external commands the lab runs (`ip`, `wg`, `ping`, …) live.
//!
//! Commands are resolved to absolute paths once: `ip netns exec` runs its program with the
//! caller's `PATH`, and a root shell without `/usr/sbin` in `PATH` would otherwise find no
//! `ip` or `sysctl` even though they are installed. The standard system directories are
//! searched after `PATH` for the same reason.

use std::env;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directories searched after `PATH`.
const SYSTEM_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The absolute path of `name`, searching `PATH` then the system directories.
pub fn find(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Like [`find`], but an error naming the command when it is missing.
pub fn require(name: &str) -> anyhow::Result<PathBuf> {
    find(name)
        .ok_or_else(|| anyhow::anyhow!("command `{name}` not found (run scripts/install-deps)"))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_command_every_linux_has() {
        let sh = find("sh").expect("sh is on every Linux system");
        assert!(sh.is_absolute());
        assert!(is_executable(&sh));
    }

    #[test]
    fn missing_command_is_an_error_naming_it() {
        let err = require("tailsk8s-no-such-command").unwrap_err();
        assert!(err.to_string().contains("tailsk8s-no-such-command"));
    }
}
