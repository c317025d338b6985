//! The node's one NAT rule set: traffic from this node's pods to destinations outside
//! `cluster_cidrs` leaves with the node's address (masquerade), pod-to-pod traffic keeps its
//! pod source. It is an nftables table of our own (`table inet tailsk8s`), written with one
//! atomic `nft -f -` script that also replaces a table a crashed router left behind, and
//! deleted on shutdown.

use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// The table's name (family `inet`: one table for IPv4 and IPv6).
pub const TABLE: &str = "tailsk8s";

/// The rule set for `pod_cidrs` inside `cluster_cidrs`; `None` when there is nothing to
/// masquerade (no pod CIDRs, or no cluster to tell inside from outside).
pub fn script(pod_cidrs: &[IpNet], cluster_cidrs: &[IpNet]) -> Option<String> {
    let set = |cidrs: &[IpNet], v4: bool| -> Option<String> {
        let listed: Vec<String> = cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)) == v4)
            .map(|c| c.trunc().to_string())
            .collect();
        (!listed.is_empty()).then(|| format!("{{ {} }}", listed.join(", ")))
    };
    let mut rules = Vec::new();
    for (v4, family) in [(true, "ip"), (false, "ip6")] {
        if let (Some(pods), Some(cluster)) = (set(pod_cidrs, v4), set(cluster_cidrs, v4)) {
            rules.push(format!(
                "\t\t{family} saddr {pods} {family} daddr != {cluster} masquerade\n"
            ));
        }
    }
    if rules.is_empty() {
        return None;
    }
    // Declaring the table first makes the delete succeed whether or not one exists, and the
    // whole script is one transaction: there is never a moment without the rule.
    Some(format!(
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n{}\t}}\n}}\n",
        rules.concat()
    ))
}

/// The script that removes the table, present or not.
pub fn removal_script() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

/// Installs the rule set (replacing any earlier one); `false` when there was nothing to install.
pub fn install(pod_cidrs: &[IpNet], cluster_cidrs: &[IpNet]) -> anyhow::Result<bool> {
    match script(pod_cidrs, cluster_cidrs) {
        Some(script) => nft(&script).map(|()| true),
        None => Ok(false),
    }
}

/// Removes the table.
pub fn remove() -> anyhow::Result<()> {
    nft(&removal_script())
}

/// Runs `nft -f -` on `script`; an error carries nft's message.
fn nft(script: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .context("writing the nft script")?;
    }
    let output = child.wait_with_output().context("waiting for nft")?;
    if !output.status.success() {
        anyhow::bail!(
            "nft refused the masquerade table ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn dual_stack_gets_one_rule_per_family() {
        let script = script(
            &nets(&["198.19.1.0/24", "fd00:19:0:1::/64"]),
            &nets(&["198.19.0.0/16", "fd00:19::/48"]),
        )
        .unwrap();
        assert_eq!(
            script,
            "table inet tailsk8s {}\ndelete table inet tailsk8s\ntable inet tailsk8s {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr { 198.19.1.0/24 } ip daddr != { 198.19.0.0/16 } masquerade\n\
             \t\tip6 saddr { fd00:19:0:1::/64 } ip6 daddr != { fd00:19::/48 } masquerade\n\
             \t}\n}\n"
        );
    }

    #[test]
    fn nothing_to_masquerade_without_pods_or_cluster() {
        assert_eq!(script(&[], &nets(&["198.19.0.0/16"])), None);
        assert_eq!(script(&nets(&["198.19.1.0/24"]), &[]), None);
        // A family with pods but no cluster range has no inside to keep.
        let v4_only = script(
            &nets(&["198.19.1.0/24", "fd00:19:0:1::/64"]),
            &nets(&["198.19.0.0/16"]),
        )
        .unwrap();
        assert!(v4_only.contains("ip saddr") && !v4_only.contains("ip6"));
    }
}
