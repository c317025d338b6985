//! Whether a namespace test may run on this machine.
//!
//! Without root, `/dev/net/tun` or the commands, a namespace test skips with a message
//! saying why. CI sets [`REQUIRE_NETNS_ENV`]`=1`, and then the same shortfall is a failure:
//! a CI run must never go green by skipping everything.

use std::io::Write;
use std::path::Path;

use crate::tools;

/// Commands every namespace test needs, with the Debian package that provides each (so a
/// skip message can say what to install).
pub const BASE_COMMANDS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("wg", "wireguard-tools"),
    ("wireguard-go", "wireguard-go"),
    ("ping", "iputils-ping"),
    ("sysctl", "procps"),
];

/// Set to `1` to turn every skip into a failure.
pub const REQUIRE_NETNS_ENV: &str = "TAILSK8S_REQUIRE_NETNS";

/// `true` when namespace tests can run here. Otherwise prints why the current test skips
/// and returns `false` — or panics with the same reasons when [`REQUIRE_NETNS_ENV`] is `1`.
///
/// Use at the top of each test: `if !require_netns() { return; }`.
pub fn require_netns() -> bool {
    require_netns_with(&[])
}

/// Like [`require_netns`], also requiring `extra` commands (name, Debian package).
pub fn require_netns_with(extra: &[(&str, &str)]) -> bool {
    // Written to the real stderr, not through eprintln!, which the test harness captures and
    // hides for passing tests: a skip must be visible.
    decide(
        &missing_requirements(extra),
        required_by_env(),
        &mut std::io::stderr(),
    )
}

/// Everything this machine lacks for namespace tests, one human-readable line each.
pub fn missing_requirements(extra: &[(&str, &str)]) -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "not running as root (network namespaces need CAP_SYS_ADMIN / CAP_NET_ADMIN)"
                .to_string(),
        );
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun does not exist".to_string());
    }
    for (command, package) in BASE_COMMANDS.iter().chain(extra) {
        if tools::find(command).is_none() {
            missing.push(format!(
                "command `{command}` not found (Debian package {package})"
            ));
        }
    }
    missing
}

fn required_by_env() -> bool {
    std::env::var(REQUIRE_NETNS_ENV).is_ok_and(|v| v == "1")
}

fn decide(missing: &[String], required: bool, out: &mut dyn Write) -> bool {
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string();
    let reasons = missing.join("; ");
    if required {
        panic!("{test}: {REQUIRE_NETNS_ENV}=1 but namespace tests cannot run: {reasons}");
    }
    let _ = writeln!(
        out,
        "SKIPPED {test}: namespace test cannot run here: {reasons}. \
         Run as root after scripts/install-deps (e.g. `sudo scripts/test`)."
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_when_nothing_is_missing() {
        let mut out = Vec::new();
        assert!(decide(&[], true, &mut out));
        assert!(decide(&[], false, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn skips_when_something_is_missing_and_not_required() {
        let mut out = Vec::new();
        assert!(!decide(&["no root".to_string()], false, &mut out));
        let message = String::from_utf8(out).unwrap();
        assert!(
            message.starts_with("SKIPPED ") && message.contains("no root"),
            "{message}"
        );
    }

    #[test]
    #[should_panic(expected = "no root")]
    fn fails_when_something_is_missing_and_required() {
        decide(&["no root".to_string()], true, &mut Vec::new());
    }

    #[test]
    fn a_missing_extra_command_is_reported_with_its_package() {
        let missing = missing_requirements(&[("tailsk8s-no-such-command", "some-package")]);
        assert!(missing
            .iter()
            .any(|m| m.contains("tailsk8s-no-such-command") && m.contains("some-package")));
    }
}
