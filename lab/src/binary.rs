//! Which `tailsk8s` binary the lab runs, and the extra router flags every router gets.
//!
//! Callers that are the binary (the demo) pass their own path. Everyone else (the tests)
//! takes `$TAILSK8S_BIN`, else `tailsk8s` in the cargo target directory the caller was built
//! into.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Environment variable naming the `tailsk8s` binary to run.
pub const TAILSK8S_BIN_ENV: &str = "TAILSK8S_BIN";

/// Environment variable with extra `tailsk8s router` flags for every router the lab
/// starts, e.g. `--no-offload`: the test suite runs once with offloads and once without.
pub const ROUTER_FLAGS_ENV: &str = "TAILSK8S_ROUTER_FLAGS";

/// The `tailsk8s` binary: `$TAILSK8S_BIN`, else `tailsk8s` in the cargo target directory
/// the running program was built into (`target/debug/deps/x` → `target/debug/tailsk8s`,
/// `target/release/tailsk8s-lab` → `target/release/tailsk8s`).
pub fn tailsk8s_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(TAILSK8S_BIN_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            anyhow::bail!("{TAILSK8S_BIN_ENV}={} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let path = binary_beside(&exe).ok_or_else(|| {
        anyhow::anyhow!("cannot derive the target directory from {}", exe.display())
    })?;
    if !path.is_file() {
        anyhow::bail!(
            "tailsk8s binary not found at {}: run `cargo build --bins` first (or set {TAILSK8S_BIN_ENV})",
            path.display()
        );
    }
    Ok(path)
}

/// The flags from [`ROUTER_FLAGS_ENV`], split on white space.
pub fn router_flags() -> Vec<String> {
    std::env::var(ROUTER_FLAGS_ENV)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `…/target/<profile>/deps/<test>` → `…/target/<profile>/tailsk8s`; a binary that is not in
/// a `deps` directory looks beside itself.
fn binary_beside(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let dir = if dir.file_name()? == "deps" {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.join("tailsk8s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_is_found_beside_the_deps_directory_or_the_program() {
        assert_eq!(
            binary_beside(Path::new("/w/target/debug/deps/router-0123abcd")),
            Some(PathBuf::from("/w/target/debug/tailsk8s"))
        );
        assert_eq!(
            binary_beside(Path::new("/w/target/release/tailsk8s-lab")),
            Some(PathBuf::from("/w/target/release/tailsk8s"))
        );
    }
}
