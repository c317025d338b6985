//! The router.toml that deploy/daemonset.yaml's ConfigMap carries is one the router accepts:
//! manifest and config parser never drift apart.

use std::path::Path;

use tailsk8s::config::RouterConfig;

const MANIFEST: &str = include_str!("../../deploy/daemonset.yaml");

/// The block scalar under `router.toml: |`, de-indented (YAML's literal style: every line
/// indented at least as much as the first, ended by a less indented line).
fn router_toml(manifest: &str) -> Option<String> {
    let mut lines = manifest.lines();
    lines.find(|line| line.trim() == "router.toml: |")?;
    let mut indent = None;
    let mut text = String::new();
    for line in lines {
        if line.trim().is_empty() {
            text.push('\n');
            continue;
        }
        let this = line.len() - line.trim_start().len();
        let block = *indent.get_or_insert(this);
        if this < block || block == 0 {
            break;
        }
        text.push_str(&line[block..]);
        text.push('\n');
    }
    Some(text)
}

#[test]
fn the_block_scalar_is_read_as_yaml_would() {
    let yaml = "data:\n  router.toml: |\n    a = 1\n\n    [t]\n      b = 2\n---\nkind: X\n";
    assert_eq!(router_toml(yaml).unwrap(), "a = 1\n\n[t]\n  b = 2\n");
    assert!(router_toml("kind: X\n").is_none());
}

#[test]
fn the_daemonsets_router_toml_parses() {
    let text = router_toml(MANIFEST).expect("deploy/daemonset.yaml has a router.toml");
    let config = RouterConfig::parse(Path::new("/etc/tailsk8s/router.toml"), &text)
        .unwrap_or_else(|e| panic!("deploy/daemonset.yaml's router.toml: {e}\n{text}"));
    assert_eq!(config.interface.as_deref(), Some("tsk0"));
    assert!(config.tailscale.is_some());
    assert!(!config.cluster_cidrs.is_empty());
}
