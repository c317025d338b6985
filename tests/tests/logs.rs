//! End-to-end tests of the router's log as a container runtime keeps it (stderr to a file):
//! no colour escapes in either format, and `--log-format json` writes one JSON object per
//! line, with the router's events in it.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::fs;

use tailsk8s_e2e::config_router::{send_signal, wait_for_exit, wait_until_serving, EXIT_TIMEOUT};
use tailsk8s_e2e::{names, require_netns, tailsk8s_binary, Daemon, Netns};

/// Runs `tailsk8s [FLAGS…] router IFNAME` in a namespace with stderr to a file, until it
/// serves, then stops it with SIGTERM; returns the log's bytes.
fn router_log(flags: &[&str]) -> Vec<u8> {
    let ns = Netns::new("log").unwrap();
    let ifname = names::ifname().unwrap();
    let mut cmd = ns.command_at(&tailsk8s_binary().unwrap()).unwrap();
    cmd.args(flags).arg("router").arg(&ifname);
    // The runtime's environment says nothing about colour; only the terminal test decides.
    cmd.env_remove("NO_COLOR").env_remove("RUST_LOG");
    let mut daemon = Daemon::spawn(&format!("tailsk8s router {ifname}"), cmd).unwrap();
    wait_until_serving(&mut daemon, &ifname).unwrap();
    send_signal(&daemon, libc::SIGTERM).unwrap();
    let status = wait_for_exit(&mut daemon, EXIT_TIMEOUT).unwrap();
    assert!(status.success(), "router exited with {status}");
    fs::read(daemon.log_path()).unwrap()
}

fn assert_no_escapes(log: &[u8]) {
    assert!(
        !log.contains(&0x1b),
        "escape bytes in the log:\n{}",
        String::from_utf8_lossy(log)
    );
}

#[test]
fn the_human_log_in_a_file_has_no_colour_escapes() {
    if !require_netns() {
        return;
    }
    let log = router_log(&[]);
    assert_no_escapes(&log);
    let text = String::from_utf8(log).unwrap();
    assert!(text.contains("router running"), "{text}");
    assert!(text.contains("router stopped"), "{text}");
}

#[test]
fn the_json_log_is_one_object_per_line() {
    if !require_netns() {
        return;
    }
    let log = router_log(&["--log-format", "json"]);
    assert_no_escapes(&log);
    let text = String::from_utf8(log).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect();
    assert!(events.iter().all(|e| e.is_object()), "{text}");
    let messages: Vec<&str> = events
        .iter()
        .filter_map(|e| e.get("message").and_then(|m| m.as_str()))
        .collect();
    assert!(messages.contains(&"router running"), "{text}");
    assert!(messages.contains(&"router stopped"), "{text}");
    let running = events
        .iter()
        .find(|e| e["message"] == "router running")
        .unwrap();
    assert_eq!(running["level"], "INFO", "{running}");
    assert!(
        running.get("interface").is_some(),
        "fields flattened: {running}"
    );
}
