//! Kernel routes for the peers' allowed IPs: they point at the TUN from an own routing table,
//! consulted through an `ip rule` that sits ahead of tailscaled's, for IPv4 and IPv6. Done by
//! running `ip` (iproute2), which every node image has; an error carries the command line and
//! what `ip` printed.
//!
//! Why batched: a router may hold 5,000 peers. One `ip` process per route cost ~2 ms each
//! (10 s to start, 7 s to stop at 5,000); all route changes of one sync or cleanup go to a
//! single `ip -force -batch -` instead (one netlink request per line, one process), so a
//! sync costs one process whatever its size, and a sync that changes one peer sends one
//! line. `-force` keeps going past a failed line, and its "Command failed -:N" tells which
//! lines failed, so what succeeded is still recorded. Rules stay single commands: at most
//! one per family and run.
//!
//! Why an own table and rule: with `--accept-routes`, tailscaled puts peers' approved routes
//! (our pod CIDRs too) in table 52, looked up by rules at priorities 5210–5270 — ahead of
//! `main`, where routes of ours would lose. So ours live in table [`ROUTE_TABLE`] (5200),
//! looked up by a rule at priority [`RULE_PRIORITY`] (5200), just before tailscaled's.
//!
//! Why the rule excludes our fwmark: a peer's allowed IPs may cover its own endpoint (at the
//! extreme, `0.0.0.0/0`); routing our encrypted UDP packets into our own TUN would loop. The
//! router marks its UDP sockets with the config's `fwmark` (default [`DEFAULT_FWMARK`]), and
//! the rule is `not fwmark M/M lookup T`, so the router's own packets use the node's normal
//! routing while everything else to the allowed IPs goes to the TUN (`wg-quick` does the
//! same). With `fwmark = 0` nothing tells our packets apart: the rule applies to all traffic,
//! and default routes (`/0`) are skipped with a warning so they cannot take the underlay away
//! — narrower prefixes that cover an endpoint are then the operator's to avoid.
//! Known gap: tailscaled's own packets (mark 0x80000) do match our rule, so allowed IPs that
//! cover a tailnet peer's underlay address would capture them; pod CIDRs never do.
//!
//! Ownership: the manager removes only routes it installed and rules it added. Routes die with
//! the TUN when the process does; a rule left by a crash (same priority and table) is ours by
//! construction and is replaced when the manager first adds its rule, so rules never pile up.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use thiserror::Error;

/// Our routing table (tailscaled uses 52; we take the 52xx neighbourhood of its rules).
pub const ROUTE_TABLE: u32 = 5200;
/// Priority of our `ip rule`: below tailscaled's 5210, so we are consulted first.
pub const RULE_PRIORITY: u32 = 5200;
/// Default mark of the router's UDP socket. One bit, outside the bits kube-proxy (0x4000,
/// 0x8000) and tailscaled (0xff0000) use: a mark with kube-proxy's masquerade bit would get
/// our tunnel packets NATed.
pub const DEFAULT_FWMARK: u32 = 0x1000_0000;

// The choices above, checked where a change would break them.
const _: () = assert!(
    RULE_PRIORITY < 5210,
    "our rule must come before tailscaled's"
);
const _: () = assert!(DEFAULT_FWMARK.count_ones() == 1);
const _: () = assert!(DEFAULT_FWMARK & (0x4000 | 0x8000 | 0xff_0000) == 0);

/// An `ip` command that failed. Causes are part of the message, not `source()`.
#[derive(Debug, Error)]
pub enum RouteError {
    #[error("cannot run `{command}` (is iproute2 installed?): {error}")]
    Spawn {
        command: String,
        error: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

impl RouteError {
    fn stderr(&self) -> &str {
        match self {
            RouteError::Spawn { .. } => "",
            RouteError::Command { stderr, .. } => stderr,
        }
    }

    /// True when the failure means "there was nothing to remove": the route or rule is
    /// already gone, or so is the device it used (its routes went with it).
    fn is_already_gone(&self) -> bool {
        let e = self.stderr();
        e.contains("No such process")
            || e.contains("No such file or directory")
            || e.contains("Cannot find device")
    }
}

/// IPv4 or IPv6: the two halves of every table, rule and route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(prefix: &IpNet) -> Family {
        match prefix {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// Runs `ip`, optionally in a named network namespace (`ip -n NS`).
#[derive(Debug, Clone, Default)]
struct Ip {
    netns: Option<String>,
}

impl Ip {
    fn run(&self, args: &[&str]) -> Result<String, RouteError> {
        let mut full: Vec<&str> = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.netns {
            full.extend(["-n", ns.as_str()]);
        }
        full.extend_from_slice(args);
        let command = format!("ip {}", full.join(" "));
        let output =
            Command::new("ip")
                .args(&full)
                .output()
                .map_err(|error| RouteError::Spawn {
                    command: command.clone(),
                    error,
                })?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(RouteError::Command {
            command,
            status: output.status.to_string(),
            stderr: one_line(&stderr),
        })
    }

    /// The command line `ip` would run for `line` on its own (for messages).
    fn command_of(&self, line: &str) -> String {
        match &self.netns {
            Some(ns) => format!("ip -n {ns} {line}"),
            None => format!("ip {line}"),
        }
    }

    /// Runs every line through one `ip -force -batch -` and returns the lines that failed,
    /// by index, each with what `ip` said about it. Err only when `ip` could not run at all
    /// or failed without naming a line.
    fn batch(&self, lines: &[String]) -> Result<Vec<(usize, RouteError)>, RouteError> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<&str> = Vec::with_capacity(5);
        if let Some(ns) = &self.netns {
            args.extend(["-n", ns.as_str()]);
        }
        args.extend(["-force", "-batch", "-"]);
        let command = format!("ip {} ({} lines)", args.join(" "), lines.len());
        let spawn_error = |error| RouteError::Spawn {
            command: command.clone(),
            error,
        };
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let mut input = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines {
            input.push_str(line);
            input.push('\n');
        }
        let mut stdin = child.stdin.take();
        // Written from a second thread: `ip` may fill its stderr pipe before it has read all
        // of stdin, and both sides would then wait for each other.
        let output = std::thread::scope(|scope| {
            scope.spawn(move || {
                if let Some(stdin) = stdin.as_mut() {
                    // A write error means `ip` went away; its status tells the rest.
                    let _ = stdin.write_all(input.as_bytes());
                }
                drop(stdin);
            });
            child.wait_with_output()
        })
        .map_err(spawn_error)?;
        if output.status.success() {
            return Ok(Vec::new());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let status = output.status.to_string();
        let failed = batch_failures(&stderr, lines.len());
        if failed.is_empty() {
            return Err(RouteError::Command {
                command,
                status,
                stderr: one_line(&stderr),
            });
        }
        Ok(failed
            .into_iter()
            .map(|(index, said)| {
                let error = RouteError::Command {
                    command: self.command_of(&lines[index]),
                    status: status.clone(),
                    stderr: said,
                };
                (index, error)
            })
            .collect())
    }

    fn set_link_up(&self, ifname: &str, mtu: u32) -> Result<(), RouteError> {
        let mtu = mtu.to_string();
        self.run(&["link", "set", "dev", ifname, "mtu", &mtu, "up"])
            .map(drop)
    }
}

/// One line: messages from `ip` end in newlines and sometimes span two lines.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The failed lines of `ip -force -batch -` (0-based) with what `ip` printed before naming
/// each: its stderr is, per failed line, the message and then "Command failed -:N".
fn batch_failures(stderr: &str, lines: usize) -> Vec<(usize, String)> {
    let mut failed = Vec::new();
    let mut said = String::new();
    for text in stderr.lines() {
        let number = text
            .trim()
            .strip_prefix("Command failed -:")
            .and_then(|n| n.parse::<usize>().ok());
        match number {
            Some(n) if (1..=lines).contains(&n) => {
                failed.push((n - 1, one_line(&said)));
                said.clear();
            }
            _ => {
                said.push_str(text);
                said.push('\n');
            }
        }
    }
    failed
}

/// One change to a route in our table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteChange {
    Add(IpNet),
    Delete(IpNet),
}

/// Sets the MTU of `ifname` and brings it up (in the current network namespace).
pub fn set_link_up(ifname: &str, mtu: u32) -> Result<(), RouteError> {
    Ip::default().set_link_up(ifname, mtu)
}

/// Keeps the kernel's routes to the TUN equal to a set of prefixes, and owns the rules that
/// make the kernel use them. Call [`RouteManager::cleanup`] on exit (`Drop` does it too).
#[derive(Debug)]
pub struct RouteManager {
    ifname: String,
    table: u32,
    priority: u32,
    /// Traffic with this mark skips our table; 0 = no exclusion.
    fwmark: u32,
    ip: Ip,
    /// Routes this manager installed and has not removed.
    installed: BTreeSet<IpNet>,
    /// Families whose rule this manager added and has not removed.
    rules: BTreeSet<Family>,
}

impl RouteManager {
    /// A manager for routes via `ifname` in `table`, looked up by a rule at `priority`.
    /// Nothing is changed until [`RouteManager::sync`].
    pub fn new(ifname: &str, table: u32, priority: u32) -> RouteManager {
        RouteManager {
            ifname: ifname.to_string(),
            table,
            priority,
            fwmark: 0,
            ip: Ip::default(),
            installed: BTreeSet::new(),
            rules: BTreeSet::new(),
        }
    }

    /// Exempts packets carrying `fwmark` (the router's own UDP socket mark) from our table;
    /// 0 disables the exemption (and then `/0` prefixes are skipped).
    pub fn with_fwmark(mut self, fwmark: u32) -> RouteManager {
        self.fwmark = fwmark;
        self
    }

    /// Runs every command in the named network namespace (`ip -n NAME`). For tests: the
    /// router itself runs in its namespace and uses the default.
    pub fn in_netns(mut self, name: &str) -> RouteManager {
        self.ip.netns = Some(name.to_string());
        self
    }

    /// Sets the MTU of the managed interface and brings it up.
    pub fn set_link_up(&self, mtu: u32) -> Result<(), RouteError> {
        self.ip.set_link_up(&self.ifname, mtu)
    }

    /// The prefixes currently routed by this manager.
    pub fn installed(&self) -> impl Iterator<Item = &IpNet> {
        self.installed.iter()
    }

    /// Makes the routes equal to `prefixes` (normalised): adds the missing, removes the stale
    /// ones it installed earlier. Idempotent. On error, what succeeded stays recorded, so the
    /// next call retries only the rest.
    pub fn sync(&mut self, prefixes: &[IpNet]) -> Result<(), RouteError> {
        let changes = self.plan(prefixes);
        for family in [Family::V4, Family::V6] {
            let adds = changes
                .iter()
                .any(|c| matches!(c, RouteChange::Add(p) if Family::of(p) == family));
            if adds {
                self.ensure_rule(family)?;
            }
        }
        let first_error = self.apply(&changes)?;
        first_error.map_or(Ok(()), Err)
    }

    /// The changes that bring our routes from `installed` to `prefixes` (normalised, and
    /// without `/0` when there is no fwmark): deletions of the stale, additions of the
    /// missing, nothing for the rest.
    fn plan(&self, prefixes: &[IpNet]) -> Vec<RouteChange> {
        let mut wanted = BTreeSet::new();
        for prefix in prefixes.iter().map(IpNet::trunc) {
            if prefix.prefix_len() == 0 && self.fwmark == 0 {
                tracing::warn!(
                    "not routing {prefix} to {}: without an fwmark it would capture the \
                     router's own encrypted traffic (set `fwmark` in the config)",
                    self.ifname
                );
                continue;
            }
            wanted.insert(prefix);
        }
        let stale = self.installed.difference(&wanted).copied();
        let missing = wanted.difference(&self.installed).copied();
        stale
            .map(RouteChange::Delete)
            .chain(missing.map(RouteChange::Add))
            .collect()
    }

    /// Sends `changes` in one batch and records each one that took effect (a deletion of a
    /// route already gone counts). Returns the first failure, after recording the rest.
    fn apply(&mut self, changes: &[RouteChange]) -> Result<Option<RouteError>, RouteError> {
        let table = self.table.to_string();
        let lines: Vec<String> = changes
            .iter()
            .map(|change| {
                let (verb, prefix) = match change {
                    RouteChange::Add(p) => ("replace", p),
                    RouteChange::Delete(p) => ("del", p),
                };
                format!("route {verb} {prefix} dev {} table {table}", self.ifname)
            })
            .collect();
        let mut failed: Vec<Option<RouteError>> = (0..changes.len()).map(|_| None).collect();
        for (index, error) in self.ip.batch(&lines)? {
            failed[index] = Some(error);
        }
        let mut first_error = None;
        for (change, error) in changes.iter().zip(failed) {
            match (change, error) {
                (RouteChange::Add(p), None) => {
                    self.installed.insert(*p);
                }
                (RouteChange::Delete(p), None) => {
                    self.installed.remove(p);
                }
                (RouteChange::Delete(p), Some(e)) if e.is_already_gone() => {
                    self.installed.remove(p);
                }
                (_, Some(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        tracing::debug!(
            changes = changes.len(),
            routes = self.installed.len(),
            "routes via {} in table {table}",
            self.ifname
        );
        Ok(first_error)
    }

    /// Removes every route this manager installed and every rule it added. Keeps going past
    /// failures (it runs on the way out) and returns the first.
    pub fn cleanup(&mut self) -> Result<(), RouteError> {
        let stale: Vec<RouteChange> = self
            .installed
            .iter()
            .copied()
            .map(RouteChange::Delete)
            .collect();
        let mut first_error = match self.apply(&stale) {
            Ok(first) => first,
            Err(e) => Some(e),
        };
        // Whatever could not be removed is not ours to retry on the way out: the routes
        // go with the TUN when the process exits.
        self.installed.clear();
        for family in std::mem::take(&mut self.rules) {
            let mut args = vec![family.flag(), "rule", "del"];
            let selector = self.rule_selector();
            args.extend(selector.iter().map(String::as_str));
            match self.ip.run(&args) {
                Err(e) if !e.is_already_gone() => {
                    first_error.get_or_insert(e);
                }
                _ => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `priority P [not fwmark M/M] lookup T`: the words after `ip rule add|del`.
    fn rule_selector(&self) -> Vec<String> {
        let mut words = vec!["priority".to_string(), self.priority.to_string()];
        if self.fwmark != 0 {
            let mark = format!("{:#x}/{:#x}", self.fwmark, self.fwmark);
            words.extend(["not".to_string(), "fwmark".to_string(), mark]);
        }
        words.extend(["lookup".to_string(), self.table.to_string()]);
        words
    }

    fn ensure_rule(&mut self, family: Family) -> Result<(), RouteError> {
        if self.rules.contains(&family) {
            return Ok(());
        }
        // Rules left at our priority for our table by a crashed run: remove them (a bounded
        // loop: `ip rule del` removes one match per call).
        let priority = self.priority.to_string();
        let table = self.table.to_string();
        for _ in 0..64 {
            let del = ["rule", "del", "priority", &priority, "lookup", &table];
            if self
                .ip
                .run(&[&[family.flag()][..], &del[..]].concat())
                .is_err()
            {
                break;
            }
        }
        let selector = self.rule_selector();
        let mut args = vec![family.flag(), "rule", "add"];
        args.extend(selector.iter().map(String::as_str));
        self.ip.run(&args)?;
        tracing::debug!("ip {} rule add {}", family.flag(), selector.join(" "));
        self.rules.insert(family);
        Ok(())
    }
}

impl Drop for RouteManager {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!("removing routes of {}: {e}", self.ifname);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 198.19.X.Y/32 for i in 0..n: distinct hosts, as many as a large cluster has nodes.
    fn hosts(n: usize) -> Vec<IpNet> {
        (0..n)
            .map(|i| {
                format!("198.19.{}.{}/32", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn one_peer_changed_among_thousands_is_one_route_change() {
        let mut m = RouteManager::new("tsk0", ROUTE_TABLE, RULE_PRIORITY).with_fwmark(1);
        let mut prefixes = hosts(5000);
        m.installed = prefixes.iter().copied().collect();
        assert!(m.plan(&prefixes).is_empty(), "unchanged: nothing to send");

        let added: IpNet = "fd00:19:7::/64".parse().unwrap();
        prefixes.push(added);
        assert_eq!(m.plan(&prefixes), vec![RouteChange::Add(added)]);
        prefixes.pop();

        // A peer's allowed IP moves: its old route goes, its new one comes, no other.
        let old = prefixes[1234];
        let new: IpNet = "198.19.200.7/32".parse().unwrap();
        prefixes[1234] = new;
        assert_eq!(
            m.plan(&prefixes),
            vec![RouteChange::Delete(old), RouteChange::Add(new)]
        );

        prefixes.remove(1234);
        assert_eq!(m.plan(&prefixes), vec![RouteChange::Delete(old)]);
    }

    #[test]
    fn batch_failures_are_matched_to_their_lines() {
        let stderr = "Cannot find device \"nosuch\"\nCommand failed -:1\n\
                      RTNETLINK answers: No such process\nCommand failed -:3\n\
                      Command failed -:9\n";
        assert_eq!(
            batch_failures(stderr, 3),
            vec![
                (0, "Cannot find device \"nosuch\"".to_string()),
                (2, "RTNETLINK answers: No such process".to_string()),
            ]
        );
        assert!(batch_failures("ip: unknown option\n", 3).is_empty());
    }

    #[test]
    fn rule_selector_excludes_the_mark() {
        let m = RouteManager::new("tsk0", ROUTE_TABLE, RULE_PRIORITY).with_fwmark(0x1000_0000);
        assert_eq!(
            m.rule_selector().join(" "),
            "priority 5200 not fwmark 0x10000000/0x10000000 lookup 5200"
        );
        let m = RouteManager::new("tsk0", 7, 8);
        assert_eq!(m.rule_selector().join(" "), "priority 8 lookup 7");
    }

    #[test]
    fn failed_command_error_names_the_command() {
        // `ip` in a namespace that cannot exist fails, root or not.
        let ip = Ip {
            netns: Some("tsk-no-such-netns-\u{1}".to_string()),
        };
        match ip.run(&["link", "show"]) {
            Err(RouteError::Command {
                command, stderr, ..
            }) => {
                assert!(command.starts_with("ip -n tsk-no-such-netns-"), "{command}");
                assert!(!stderr.is_empty());
                assert!(!stderr.contains('\n'));
            }
            Err(RouteError::Spawn { .. }) => {} // no iproute2 on this machine: also an error
            Ok(out) => panic!("ip in a missing netns succeeded: {out}"),
        }
    }

    /// A network namespace with a (persistent, unattached) TUN device `tsk-d0`, deleted on
    /// drop (also when a test panics). A TUN like the router's; the kernel routes to it once
    /// it is up, even with no process attached.
    struct Netns {
        name: String,
    }

    impl Netns {
        /// None (after a message) when this process cannot create namespaces, unless
        /// TAILSK8S_REQUIRE_NETNS=1, where that is a failure.
        fn create(tag: &str) -> Option<Netns> {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            let required = std::env::var("TAILSK8S_REQUIRE_NETNS").is_ok_and(|v| v == "1");
            if !root {
                assert!(
                    !required,
                    "TAILSK8S_REQUIRE_NETNS=1 but not running as root"
                );
                eprintln!("skipping {tag}: needs root for network namespaces");
                return None;
            }
            let name = format!("tsk-rt-{tag}-{}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                assert!(!required, "cannot create network namespace {name}");
                eprintln!("skipping {tag}: cannot create network namespace {name}");
                return None;
            }
            let ns = Netns { name };
            ns.ip(&["tuntap", "add", "mode", "tun", "name", "tsk-d0"]);
            Some(ns)
        }

        fn ip(&self, args: &[&str]) -> String {
            let out = Command::new("ip")
                .arg("-n")
                .arg(&self.name)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// The destinations in our table; none when the kernel has no such table (yet).
        fn routes(&self, family: &str) -> Vec<String> {
            let table = ROUTE_TABLE.to_string();
            let out = Command::new("ip")
                .args(["-n", &self.name, family, "route", "show", "table", &table])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && stderr.contains("table does not exist") {
                return Vec::new();
            }
            assert!(out.status.success(), "ip route show: {stderr}");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
                .collect()
        }

        fn our_rules(&self, family: &str) -> Vec<String> {
            self.ip(&[family, "rule", "show"])
                .lines()
                .filter(|l| l.contains(&format!("lookup {ROUTE_TABLE}")))
                .map(str::to_string)
                .collect()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn sync_and_cleanup_in_a_netns() {
        let Some(ns) = Netns::create("sync") else {
            return;
        };
        let mut m = RouteManager::new("tsk-d0", ROUTE_TABLE, RULE_PRIORITY)
            .with_fwmark(DEFAULT_FWMARK)
            .in_netns(&ns.name);
        m.set_link_up(1420).unwrap();
        assert!(ns.ip(&["link", "show", "tsk-d0"]).contains("mtu 1420"));

        // A route in our table that someone else put there: never touched.
        let table = ROUTE_TABLE.to_string();
        ns.ip(&[
            "route",
            "add",
            "198.19.99.0/24",
            "dev",
            "tsk-d0",
            "table",
            &table,
        ]);

        m.sync(&nets(&[
            "198.19.2.0/24",
            "fd00:19:2::/64",
            "198.19.3.5/32",
            "0.0.0.0/0",
        ]))
        .unwrap();
        let v4 = ns.routes("-4");
        for p in ["default", "198.19.2.0/24", "198.19.3.5", "198.19.99.0/24"] {
            assert!(v4.contains(&p.to_string()), "{p} missing from {v4:?}");
        }
        assert!(ns.routes("-6").contains(&"fd00:19:2::/64".to_string()));
        let rules = ns.our_rules("-4");
        assert_eq!(rules.len(), 1, "{rules:?}");
        assert!(
            rules[0].starts_with("5200:")
                && rules[0].contains("not from all fwmark 0x10000000/0x10000000"),
            "{rules:?}"
        );
        assert_eq!(ns.our_rules("-6").len(), 1);

        // Idempotent: the same set changes nothing, adds no second rule.
        m.sync(&nets(&[
            "198.19.2.0/24",
            "fd00:19:2::/64",
            "198.19.3.5/32",
            "0.0.0.0/0",
        ]))
        .unwrap();
        assert_eq!(ns.routes("-4").len(), v4.len());
        assert_eq!(ns.our_rules("-4").len(), 1);

        // Stale routes go, new ones come, the foreign one stays.
        m.sync(&nets(&["198.19.2.7/24", "fd00:19:3::/64"])).unwrap();
        let mut v4 = ns.routes("-4");
        v4.sort();
        assert_eq!(v4, vec!["198.19.2.0/24", "198.19.99.0/24"]);
        assert_eq!(ns.routes("-6"), vec!["fd00:19:3::/64"]);

        m.cleanup().unwrap();
        assert_eq!(ns.routes("-4"), vec!["198.19.99.0/24"]);
        assert!(ns.routes("-6").is_empty());
        assert!(ns.our_rules("-4").is_empty());
        assert!(ns.our_rules("-6").is_empty());
        // Cleanup twice is harmless.
        m.cleanup().unwrap();
    }

    #[test]
    fn without_fwmark_default_routes_are_skipped() {
        let Some(ns) = Netns::create("nomark") else {
            return;
        };
        let mut m = RouteManager::new("tsk-d0", ROUTE_TABLE, RULE_PRIORITY).in_netns(&ns.name);
        m.set_link_up(1280).unwrap();
        m.sync(&nets(&["0.0.0.0/0", "::/0", "198.19.2.0/24"]))
            .unwrap();
        assert_eq!(ns.routes("-4"), vec!["198.19.2.0/24"]);
        assert!(ns.routes("-6").is_empty());
        let rules = ns.our_rules("-4");
        assert_eq!(rules.len(), 1);
        assert!(!rules[0].contains("fwmark"), "{rules:?}");
        // No IPv6 prefix, so no IPv6 rule either.
        assert!(ns.our_rules("-6").is_empty());
    }

    #[test]
    fn drop_cleans_up_and_leftover_rules_are_replaced() {
        let Some(ns) = Netns::create("drop") else {
            return;
        };
        // A rule left behind by a crashed run.
        let (table, prio) = (ROUTE_TABLE.to_string(), RULE_PRIORITY.to_string());
        ns.ip(&["-4", "rule", "add", "priority", &prio, "lookup", &table]);
        {
            let mut m = RouteManager::new("tsk-d0", ROUTE_TABLE, RULE_PRIORITY)
                .with_fwmark(DEFAULT_FWMARK)
                .in_netns(&ns.name);
            m.set_link_up(1420).unwrap();
            m.sync(&nets(&["198.19.2.0/24"])).unwrap();
            let rules = ns.our_rules("-4");
            assert_eq!(rules.len(), 1, "{rules:?}");
            assert!(rules[0].contains("fwmark"));
        }
        assert!(ns.routes("-4").is_empty());
        assert!(ns.our_rules("-4").is_empty());
    }

    #[test]
    fn failures_carry_the_command_and_change_nothing_recorded() {
        let Some(ns) = Netns::create("fail") else {
            return;
        };
        // The link is down: the kernel refuses routes via it.
        let mut m = RouteManager::new("tsk-d0", ROUTE_TABLE, RULE_PRIORITY).in_netns(&ns.name);
        let err = m.sync(&nets(&["198.19.2.0/24"])).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("route replace 198.19.2.0/24 dev tsk-d0 table 5200"),
            "{shown}"
        );
        assert_eq!(m.installed().count(), 0);
        // Once the link is up, the next sync succeeds.
        m.set_link_up(1420).unwrap();
        m.sync(&nets(&["198.19.2.0/24"])).unwrap();
        assert_eq!(m.installed().count(), 1);
        let missing = RouteManager::new("tsk-none", 1, 1).in_netns(&ns.name);
        assert!(missing
            .set_link_up(1420)
            .unwrap_err()
            .to_string()
            .contains("tsk-none"));
    }

    #[test]
    fn thousands_of_routes_in_one_batch_and_one_change_touches_one() {
        let Some(ns) = Netns::create("scale") else {
            return;
        };
        let mut m = RouteManager::new("tsk-d0", ROUTE_TABLE, RULE_PRIORITY)
            .with_fwmark(DEFAULT_FWMARK)
            .in_netns(&ns.name);
        // While the link is down the kernel refuses every route: thousands of failures,
        // more than a pipe holds of `ip`'s messages, each one matched to its line.
        let mut prefixes = hosts(5000);
        let err = m.sync(&prefixes).unwrap_err().to_string();
        assert!(
            err.contains("route replace 198.19.0.1/32 dev tsk-d0"),
            "{err}"
        );
        assert_eq!(m.installed().count(), 0);

        m.set_link_up(1420).unwrap();
        m.sync(&prefixes).unwrap();
        assert_eq!(ns.routes("-4").len(), 5000);
        assert_eq!(m.installed().count(), 5000);

        // One route in the kernel that the manager does not expect to change is deleted
        // behind its back: a sync that changes one other peer sends that one change only,
        // so the missing route is not noticed (the manager trusts its record).
        ns.ip(&[
            "route",
            "del",
            "198.19.0.2/32",
            "table",
            &ROUTE_TABLE.to_string(),
        ]);
        prefixes[0] = "198.19.200.7/32".parse().unwrap();
        m.sync(&prefixes).unwrap();
        let v4 = ns.routes("-4");
        assert_eq!(v4.len(), 4999);
        assert!(v4.contains(&"198.19.200.7".to_string()));
        assert!(!v4.contains(&"198.19.0.1".to_string()));
        assert!(!v4.contains(&"198.19.0.2".to_string()));

        m.cleanup().unwrap();
        assert!(ns.routes("-4").is_empty());
        assert!(ns.our_rules("-4").is_empty());
    }
}
