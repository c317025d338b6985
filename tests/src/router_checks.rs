//! What the end-to-end tests check around a config-file router (the lab's
//! [`tailsk8s_lab::router`]): the routes and rules it installs, read back from the kernel;
//! the line an error names; and its peers as the real `wg` reads them ([`ShowDump`]). Tests
//! reach it, with the lab's router and mesh, as `tailsk8s_e2e::config_router`.
//!
//! The routing constants mirror control/src/routes.rs: the tests read them back from the
//! kernel, which is the point — they are the contract, not a copy of the code.

use anyhow::Context;
use ipnet::IpNet;

pub use tailsk8s_lab::mesh::ConfigMesh;
use tailsk8s_lab::netns::Netns;
pub use tailsk8s_lab::process::{run_to_exit, Exited};
pub use tailsk8s_lab::router::*;

use crate::dump::WgDump;

pub const ROUTE_TABLE: u32 = 5200;
/// tailscaled's first `ip rule` priority: the router's rule must come before it.
pub const TAILSCALE_RULE_PRIORITY: u32 = 5210;
/// The fwmark the router's own UDP socket carries by default; its rule skips that mark.
pub const DEFAULT_FWMARK: u32 = 0x1000_0000;

/// The 1-based line of the first occurrence of `needle` in `text`.
pub fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.find(needle)
        .map(|offset| text[..offset].matches('\n').count() + 1)
}

/// `wg show IFNAME dump` of a config-file router, read with the real `wg` (reading only:
/// nothing is set).
pub trait ShowDump {
    fn dump(&self) -> anyhow::Result<WgDump>;
}

impl ShowDump for ConfigRouter<'_> {
    fn dump(&self) -> anyhow::Result<WgDump> {
        let text = self
            .netns()
            .output("wg", &["show", self.ifname(), "dump"])?;
        text.parse()
            .with_context(|| format!("parsing `wg show {} dump`:\n{text}", self.ifname()))
    }
}

// ---------------------------------------------------------------------------------------------
// Routes and rules, as the kernel reports them

/// One route of a routing table (`ip route show table all`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRoute {
    pub prefix: IpNet,
    /// The `dev` of the route, if it has one.
    pub device: Option<String>,
}

/// One policy rule (`ip rule show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub v6: bool,
    pub priority: u32,
    /// Everything after `PRIORITY:`, e.g. `not from all fwmark 0x10000000/0x10000000 lookup 5200`.
    pub selector: String,
}

/// The IPv4 and IPv6 routes of table `table` in `ns` (none if the table does not exist).
pub fn table_routes(ns: &Netns, table: u32) -> anyhow::Result<Vec<TableRoute>> {
    let mut routes = Vec::new();
    for (family, v6) in [("-4", false), ("-6", true)] {
        let text = ns.ip(&[family, "route", "show", "table", "all"])?;
        routes.extend(parse_table_routes(&text, table, v6)?);
    }
    Ok(routes)
}

/// Every route in any table of `ns` whose prefix is exactly `prefix`, as `ip` prints it.
pub fn routes_for(ns: &Netns, prefix: &IpNet) -> anyhow::Result<Vec<String>> {
    let v6 = matches!(prefix, IpNet::V6(_));
    let family = if v6 { "-6" } else { "-4" };
    let text = ns.ip(&[family, "route", "show", "table", "all"])?;
    Ok(text
        .lines()
        .filter(|line| route_prefix(line, v6).ok().flatten() == Some(*prefix))
        .map(str::to_string)
        .collect())
}

/// The IPv4 and IPv6 rules in `ns` that look up `table`.
pub fn rules_for_table(ns: &Netns, table: u32) -> anyhow::Result<Vec<PolicyRule>> {
    let mut rules = Vec::new();
    for (family, v6) in [("-4", false), ("-6", true)] {
        let text = ns.ip(&[family, "rule", "show"])?;
        rules.extend(
            parse_rules(&text, v6)?
                .into_iter()
                .filter(|rule| rule_table(&rule.selector) == Some(table)),
        );
    }
    Ok(rules)
}

/// The name of the router's masquerade table (`table inet tailsk8s`, see
/// control/src/masquerade.rs).
pub const NAT_TABLE: &str = "tailsk8s";

/// `nft list table inet tailsk8s` in `ns`, or `None` when there is no such table.
pub fn nat_table(ns: &Netns) -> anyhow::Result<Option<String>> {
    let output = ns
        .command("nft")?
        .args(["list", "table", "inet", NAT_TABLE])
        .output()
        .context("running nft")?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// Whether `ns` has a link named `ifname`.
pub fn link_exists(ns: &Netns, ifname: &str) -> anyhow::Result<bool> {
    let text = ns.ip(&["-o", "link", "show"])?;
    Ok(text
        .lines()
        .any(|line| line.split(':').nth(1).map(str::trim) == Some(ifname)))
}

const ROUTE_TYPES: &[&str] = &[
    "unicast",
    "local",
    "broadcast",
    "multicast",
    "throw",
    "unreachable",
    "prohibit",
    "blackhole",
    "nat",
    "anycast",
];

/// The prefix a route line of family `v6` starts with (after an optional route type);
/// `None` for lines that are no route (e.g. `nexthop` continuation lines), an error for a
/// bad prefix.
fn route_prefix(line: &str, v6: bool) -> anyhow::Result<Option<IpNet>> {
    let mut words = line.split_whitespace();
    let Some(mut first) = words.next() else {
        return Ok(None);
    };
    if ROUTE_TYPES.contains(&first) {
        first = match words.next() {
            Some(word) => word,
            None => return Ok(None),
        };
    }
    if first == "nexthop" {
        return Ok(None);
    }
    let prefix = match first {
        "default" if v6 => "::/0".to_string(),
        "default" => "0.0.0.0/0".to_string(),
        p if p.contains('/') => p.to_string(),
        p if p.contains(':') => format!("{p}/128"),
        p => format!("{p}/32"),
    };
    prefix
        .parse()
        .map(Some)
        .with_context(|| format!("bad prefix in route `{line}`"))
}

/// The routes of `table` in the output of `ip -4|-6 route show table all`.
fn parse_table_routes(text: &str, table: u32, v6: bool) -> anyhow::Result<Vec<TableRoute>> {
    let table = table.to_string();
    let mut routes = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let value_of = |key: &str| {
            words
                .windows(2)
                .find(|pair| pair[0] == key)
                .map(|pair| pair[1])
        };
        if value_of("table") != Some(table.as_str()) {
            continue;
        }
        if let Some(prefix) = route_prefix(line, v6)? {
            routes.push(TableRoute {
                prefix,
                device: value_of("dev").map(str::to_string),
            });
        }
    }
    Ok(routes)
}

/// The rules in the output of `ip rule show`: `PRIORITY:<tab>SELECTOR… ACTION`.
fn parse_rules(text: &str, v6: bool) -> anyhow::Result<Vec<PolicyRule>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (priority, selector) = line
                .split_once(':')
                .with_context(|| format!("no `PRIORITY:` in rule `{line}`"))?;
            Ok(PolicyRule {
                v6,
                priority: priority
                    .trim()
                    .parse()
                    .with_context(|| format!("bad priority in rule `{line}`"))?,
                selector: selector.trim().to_string(),
            })
        })
        .collect()
}

/// The table a rule selector looks up (`lookup N` or `table N`), if numeric.
fn rule_table(selector: &str) -> Option<u32> {
    let words: Vec<&str> = selector.split_whitespace().collect();
    words
        .windows(2)
        .find(|pair| pair[0] == "lookup" || pair[0] == "table")
        .and_then(|pair| pair[1].parse().ok())
}

/// `tailsk8s status --json IFNAME`: what the running router says of itself.
pub fn status_json(ifname: &str) -> anyhow::Result<serde_json::Value> {
    let binary = tailsk8s_lab::binary::tailsk8s_binary()?;
    let out = std::process::Command::new(&binary)
        .args(["status", "--json", ifname])
        .output()
        .with_context(|| format!("running {} status", binary.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "tailsk8s status --json {ifname}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("tailsk8s status --json: not JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_counts_from_one() {
        let text = "a = 1\nb = 2\n\nc = 3\n";
        assert_eq!(line_of(text, "a ="), Some(1));
        assert_eq!(line_of(text, "c ="), Some(4));
        assert_eq!(line_of(text, "d ="), None);
    }

    #[test]
    fn table_routes_are_picked_from_all_tables() {
        let text = "198.19.2.0/24 dev tsk1 table 5200 scope link \n\
                    unreachable 198.19.9.0/24 table 5200 \n\
                    default via 198.18.0.1 dev ul0 table 5200 \n\
                    198.19.3.0/24 dev tsk1 table 52 scope link \n\
                    local 198.18.0.1 dev ul0 table local proto kernel scope host src 198.18.0.1 \n\
                    198.18.0.0/24 dev ul0 proto kernel scope link src 198.18.0.1 \n";
        let routes = parse_table_routes(text, 5200, false).unwrap();
        assert_eq!(
            routes,
            [
                TableRoute {
                    prefix: "198.19.2.0/24".parse().unwrap(),
                    device: Some("tsk1".into())
                },
                TableRoute {
                    prefix: "198.19.9.0/24".parse().unwrap(),
                    device: None
                },
                TableRoute {
                    prefix: "0.0.0.0/0".parse().unwrap(),
                    device: Some("ul0".into())
                },
            ]
        );
        let v6 = "fd00:19:2::/64 dev tsk1 table 5200 metric 1024 pref medium\n\
                  default dev tsk1 table 5200 metric 1024 pref medium\n";
        let prefixes: Vec<IpNet> = parse_table_routes(v6, 5200, true)
            .unwrap()
            .into_iter()
            .map(|r| r.prefix)
            .collect();
        assert_eq!(
            prefixes,
            [
                "fd00:19:2::/64".parse::<IpNet>().unwrap(),
                "::/0".parse().unwrap()
            ]
        );
        assert!(parse_table_routes("bogus/99 dev x table 5200\n", 5200, false).is_err());
    }

    #[test]
    fn rules_are_parsed_with_priority_and_table() {
        let text = "0:\tfrom all lookup local\n\
                    5200:\tnot from all fwmark 0x10000000/0x10000000 lookup 5200\n\
                    5210:\tfrom all fwmark 0x80000/0xff0000 lookup main\n\
                    32766:\tfrom all lookup main\n";
        let rules = parse_rules(text, true).unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(
            rules[1],
            PolicyRule {
                v6: true,
                priority: 5200,
                selector: "not from all fwmark 0x10000000/0x10000000 lookup 5200".into()
            }
        );
        assert_eq!(rule_table(&rules[1].selector), Some(5200));
        assert_eq!(rule_table(&rules[2].selector), None);
        assert!(parse_rules("no priority here\n", false).is_err());
    }
}
