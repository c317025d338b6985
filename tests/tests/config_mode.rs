//! End-to-end tests of config-file mode (`tailsk8s router --config FILE`): the router
//! configures itself with no `wg` call, brings its interface up, routes the peers' allowed
//! IPs to the TUN from table 5200 through an `ip rule` ahead of tailscaled's (priority below
//! 5210), and removes both on exit; without a config it installs nothing, like wireguard-go.
//! Two routers from config files alone carry pod traffic, survive `kill -9` and a restart
//! with the same key, and leave no route or rule after SIGTERM. A bad config stops the
//! start with `FILE:LINE:COL: problem` and changes nothing on the host.
//!
//! `wg` is used here only to READ what a router reports (`wg show dump`), never to set it.
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ipnet::IpNet;
use tailsk8s_e2e::config_router::{
    line_of, routes_for, rules_for_table, table_routes, uapi_get, Exited, PolicyRule, TableRoute,
    DEFAULT_FWMARK, EXIT_TIMEOUT, ROUTE_TABLE, TAILSCALE_RULE_PRIORITY,
};
use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::wait;
use tailsk8s_e2e::wg::UAPI_DIR;
use tailsk8s_e2e::{
    ping, require_netns, tailsk8s_binary, tcp_transfer, ConfigMesh, ConfigRouter, Impl, KeyPair,
    MeshOptions, Netns, PeerSpec, ShowDump, Topology, TopologyBuilder, WgDevice,
};

/// How long a router that must refuse its config may take to do so.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);
const KB: u64 = 1024;

fn prefix(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A peer that exists only as a key: enough for the router to route and report it.
fn paper_peer() -> PeerSpec {
    PeerSpec {
        public_key: KeyPair::generate(&tailsk8s_binary().unwrap())
            .unwrap()
            .public()
            .to_string(),
        endpoint: Some("198.18.0.2:51820".parse().unwrap()),
        allowed_ips: vec![prefix("198.19.2.0/24"), prefix("fd00:19:2::/64")],
        persistent_keepalive: Some(25),
    }
}

fn links(ns: &Netns) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn link_line(ns: &Netns, ifname: &str) -> Option<String> {
    links(ns)
        .into_iter()
        .find(|line| line.split(':').nth(1).map(str::trim) == Some(ifname))
}

fn uapi_entries(ifname: &str) -> Vec<String> {
    fs::read_dir(UAPI_DIR)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.contains(ifname))
                .collect()
        })
        .unwrap_or_default()
}

/// The routes of our table as a set of (prefix, device).
fn our_routes(ns: &Netns) -> BTreeSet<(IpNet, Option<String>)> {
    table_routes(ns, ROUTE_TABLE)
        .unwrap()
        .into_iter()
        .map(|TableRoute { prefix, device }| (prefix, device))
        .collect()
}

/// Checks the rules of our table: exactly one per family, ahead of tailscaled, excluding
/// the router's own fwmark.
fn assert_our_rules(rules: &[PolicyRule], what: &str) {
    for v6 in [false, true] {
        let family: Vec<&PolicyRule> = rules.iter().filter(|r| r.v6 == v6).collect();
        assert_eq!(
            family.len(),
            1,
            "{what}: v6={v6}: one rule expected: {rules:?}"
        );
        let rule = family[0];
        assert!(
            rule.priority < TAILSCALE_RULE_PRIORITY,
            "{what}: priority {} is not below tailscaled's {TAILSCALE_RULE_PRIORITY}",
            rule.priority
        );
        let mark = format!("not from all fwmark {DEFAULT_FWMARK:#x}/{DEFAULT_FWMARK:#x}");
        assert!(
            rule.selector.starts_with(&mark),
            "{what}: rule does not exempt the router's own packets: {rule:?}"
        );
    }
}

/// No route, rule, interface or socket of `ifname` in `ns`.
fn assert_nothing_left(ns: &Netns, ifname: &str, what: &str) {
    assert!(
        our_routes(ns).is_empty(),
        "{what}: routes left: {:?}",
        our_routes(ns)
    );
    let rules = rules_for_table(ns, ROUTE_TABLE).unwrap();
    assert!(rules.is_empty(), "{what}: rules left: {rules:?}");
    assert_eq!(link_line(ns, ifname), None, "{what}: interface left");
    assert_eq!(
        uapi_entries(ifname),
        Vec::<String>::new(),
        "{what}: socket left"
    );
}

fn stop_with_sigterm(router: &mut ConfigRouter<'_>, what: &str) {
    router.signal(libc::SIGTERM).unwrap();
    let status = router.wait_exit(EXIT_TIMEOUT).unwrap();
    let log = router.daemon_mut().map(|d| d.log()).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{what}: {status}\n{log}");
}

#[test]
fn a_config_file_configures_the_router_routes_and_link_and_sigterm_removes_them() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("cfg").unwrap();
    let mut router = ConfigRouter::new(&ns).unwrap();
    let keys = KeyPair::generate(&tailsk8s_binary().unwrap()).unwrap();
    router.write_private_key(&keys).unwrap();
    let peer = paper_peer();
    let mut config = router.config();
    // Not the defaults, so what we read back can only have come from the file.
    config.listen_port = Some(51999);
    config.mtu = Some(1380);
    config.peers.push(peer.clone());
    router.write_config(&config).unwrap();
    router.start().unwrap();
    let ifname = router.ifname().to_string();

    let dump = router.dump().unwrap();
    assert_eq!(dump.interface.public_key.as_deref(), Some(keys.public()));
    assert_eq!(dump.interface.listen_port, 51999);
    assert_eq!(dump.interface.fwmark, Some(DEFAULT_FWMARK));
    assert_eq!(dump.peers.len(), 1, "{dump:?}");
    assert_eq!(dump.peers[0].public_key, peer.public_key);
    assert_eq!(dump.peers[0].endpoint, peer.endpoint);
    assert_eq!(dump.peers[0].allowed_ips, peer.allowed_ips);
    assert_eq!(dump.peers[0].persistent_keepalive, Some(25));

    let link = link_line(&ns, &ifname).expect("the TUN exists");
    assert!(
        link.contains(",UP,") || link.contains("<UP,"),
        "link not up: {link}"
    );
    assert!(
        link.contains(" mtu 1380 "),
        "mtu not from the config: {link}"
    );

    let expected: BTreeSet<(IpNet, Option<String>)> = peer
        .allowed_ips
        .iter()
        .map(|p| (*p, Some(ifname.clone())))
        .collect();
    assert_eq!(our_routes(&ns), expected, "routes of table {ROUTE_TABLE}");
    // Only there: nothing in `main` (where tailscaled's table 52 would win).
    for allowed in &peer.allowed_ips {
        let everywhere = routes_for(&ns, allowed).unwrap();
        assert_eq!(everywhere.len(), 1, "{allowed}: {everywhere:?}");
    }
    assert_our_rules(&rules_for_table(&ns, ROUTE_TABLE).unwrap(), "running");

    stop_with_sigterm(&mut router, "SIGTERM");
    assert_nothing_left(&ns, &ifname, "after SIGTERM");
}

#[test]
fn without_a_config_file_the_router_installs_no_route_and_no_rule() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("plain").unwrap();
    let device = WgDevice::start(Impl::Tailsk8s, &ns).unwrap();
    let peer = paper_peer();
    device.set_listen_port(51820).unwrap();
    device.set_peer(&peer).unwrap();
    // Even with the link up (as wg-quick would do next), routes are the user's job.
    device.link_up(1420).unwrap();
    let dump = device.dump().unwrap();
    assert_eq!(dump.peers[0].allowed_ips, peer.allowed_ips, "peer was set");

    assert!(our_routes(&ns).is_empty(), "{:?}", our_routes(&ns));
    assert!(rules_for_table(&ns, ROUTE_TABLE).unwrap().is_empty());
    for allowed in &peer.allowed_ips {
        let routes = routes_for(&ns, allowed).unwrap();
        assert!(
            routes.is_empty(),
            "{allowed} routed without a config: {routes:?}"
        );
    }
    let all_rules = ns.ip(&["rule", "show"]).unwrap() + &ns.ip(&["-6", "rule", "show"]).unwrap();
    assert_eq!(
        all_rules.lines().count(),
        5,
        "only the kernel's default rules (3 IPv4, 2 IPv6):\n{all_rules}"
    );
}

#[test]
fn the_first_start_creates_a_private_key_file_and_restarts_reuse_it() {
    if !require_netns_with(&[("wg", "wireguard-tools")]) {
        return;
    }
    let ns = Netns::new("newkey").unwrap();
    let mut router = ConfigRouter::new(&ns).unwrap();
    // In a directory that does not exist yet either.
    let key_file = router.dir().join("state").join("private.key");
    let mut config = router.config();
    config.private_key_file = key_file.clone();
    router.write_config(&config).unwrap();
    assert!(!key_file.exists());
    router.start().unwrap();

    let mode = fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode {mode:o}");
    let private = fs::read_to_string(&key_file).unwrap();
    // The public key the router reports belongs to the key in the file (derived by `wg`,
    // not by the code under test).
    let public = tailsk8s_e2e::process::run_with_input(
        ns.command("wg").unwrap().arg("pubkey"),
        private.as_bytes(),
    )
    .unwrap();
    let reported = router.dump().unwrap().interface.public_key;
    assert_eq!(reported.as_deref(), Some(public.trim()));

    stop_with_sigterm(&mut router, "first run");
    router.start().unwrap();
    assert_eq!(router.dump().unwrap().interface.public_key, reported);
    assert_eq!(fs::read_to_string(&key_file).unwrap(), private);
}

fn two_nodes() -> Topology {
    TopologyBuilder::new(2).build().unwrap()
}

/// Pings between pods on both nodes, both families.
fn pods_reach_each_other(topo: &Topology) {
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    for v6 in [false, true] {
        ping(a.pods()[0].netns(), b.pods()[1].ip(v6), 2).unwrap();
        ping(b.pods()[0].netns(), a.pods()[1].ip(v6), 2).unwrap();
    }
}

#[test]
fn two_routers_from_config_files_alone_carry_pod_traffic() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mesh = ConfigMesh::start(&topo, &MeshOptions::default()).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    pods_reach_each_other(&topo);
    for v6 in [false, true] {
        let (from, to) = (&a.pods()[0], &b.pods()[0]);
        let report = tcp_transfer(from.netns(), to.netns(), to.ip(v6), 256 * KB).unwrap();
        report.verify(from.ip(v6)).unwrap();
    }
    for (router, other) in mesh.routers().iter().zip(mesh.routers().iter().rev()) {
        let dump = router.dump().unwrap();
        let peer = dump.peer(other.public_key().unwrap()).expect("peered");
        assert!(peer.latest_handshake.is_some(), "{peer:?}");
        assert!(
            peer.rx_bytes > 256 * KB || peer.tx_bytes > 256 * KB,
            "{peer:?}"
        );
    }
}

#[test]
fn kill_9_and_restart_resume_traffic_with_the_same_key_and_sigterm_leaves_nothing() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mut mesh = ConfigMesh::start(&topo, &MeshOptions::default()).unwrap();
    pods_reach_each_other(&topo);
    let node = topo.nodes()[0].netns();
    let routes_before = our_routes(node);
    assert_eq!(routes_before.len(), 2, "{routes_before:?}");

    let router = &mut mesh.routers_mut()[0];
    let ifname = router.ifname().to_string();
    let public_key = router.dump().unwrap().interface.public_key;
    assert_eq!(public_key.as_deref(), router.public_key());
    router.kill().unwrap();
    // What a crash leaves: the routes went with the TUN, but the socket file and the rules
    // stay — the restart below has to cope with both.
    assert_eq!(link_line(node, &ifname), None);
    assert!(our_routes(node).is_empty(), "{:?}", our_routes(node));
    assert_our_rules(
        &rules_for_table(node, ROUTE_TABLE).unwrap(),
        "after kill -9",
    );
    assert!(router.socket_path().exists(), "kill -9 removed the socket?");
    assert!(uapi_get(&ifname).is_err(), "a killed router still answers");

    router.start().unwrap();
    assert_eq!(router.dump().unwrap().interface.public_key, public_key);
    assert_eq!(our_routes(node), routes_before);
    // The leftover rules were replaced, not doubled.
    assert_our_rules(
        &rules_for_table(node, ROUTE_TABLE).unwrap(),
        "after restart",
    );
    pods_reach_each_other(&topo);

    for (index, router) in mesh.routers_mut().iter_mut().enumerate() {
        let ifname = router.ifname().to_string();
        stop_with_sigterm(router, &format!("router {}", index + 1));
        assert_nothing_left(topo.nodes()[index].netns(), &ifname, "after SIGTERM");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad configs

/// A config that must be refused, and what the one error line must say.
struct BadConfig {
    what: &'static str,
    /// The config file's text (`None`: the file does not exist).
    text: Option<String>,
    /// The text whose line the message must name (`None`: no line, e.g. unreadable file).
    at: Option<&'static str>,
    /// Words the message must contain besides the file and line.
    problem: Vec<String>,
}

/// A valid config for `router` whose key file (and its directory) do not exist yet: a run
/// that refuses the config must not create them.
fn valid_config_text(router: &ConfigRouter<'_>) -> String {
    let mut config = router.config();
    config.private_key_file = router.dir().join("state").join("private.key");
    config.listen_port = Some(51820);
    config.peers.push(paper_peer());
    config.to_toml()
}

/// `valid` with `from` replaced by `to` (which must occur, or the test would prove nothing).
fn broken(valid: &str, from: &str, to: &str) -> String {
    assert!(valid.contains(from), "{from:?} not in\n{valid}");
    valid.replacen(from, to, 1)
}

/// Runs `router` on its config (as `cmd` builds it) and checks: refused with exit 1, the host
/// unchanged (no TUN, socket, route, rule or key file), then the one error line.
fn assert_refused(router: &ConfigRouter<'_>, case: &BadConfig, run: &Exited) {
    let (ns, ifname, what) = (router.netns(), router.ifname(), case.what);
    assert_eq!(
        run.status.code(),
        Some(1),
        "{what}: stderr:\n{}",
        run.stderr
    );
    assert_eq!(links(ns).len(), 1, "{what}: links created: {:?}", links(ns));
    assert_eq!(uapi_entries(ifname), Vec::<String>::new(), "{what}: socket");
    assert!(our_routes(ns).is_empty(), "{what}: routes");
    assert!(
        rules_for_table(ns, ROUTE_TABLE).unwrap().is_empty(),
        "{what}: rules"
    );
    assert!(
        !router.dir().join("state").exists(),
        "{what}: key directory created"
    );

    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {lines:?}");
    let line = lines[0];
    assert!(line.starts_with("tailsk8s: error: "), "{what}: {line}");
    let mut expected = router.config_path().display().to_string();
    if let (Some(text), Some(at)) = (&case.text, case.at) {
        let number = line_of(text, at).expect("the marker is in the text");
        expected = format!("{expected}:{number}:");
    }
    assert!(
        line.contains(&expected),
        "{what}: does not name {expected:?}: {line}"
    );
    for word in &case.problem {
        assert!(
            line.contains(word.as_str()),
            "{what}: does not say {word:?}: {line}"
        );
    }
}

fn refuses(make: impl Fn(&ConfigRouter<'_>) -> BadConfig) {
    let ns = Netns::new("badcfg").unwrap();
    let router = ConfigRouter::new(&ns).unwrap();
    let case = make(&router);
    if let Some(text) = &case.text {
        router.write_config_text(text).unwrap();
    }
    let run = router.run_to_exit(REFUSE_TIMEOUT).unwrap();
    assert_refused(&router, &case, &run);
}

#[test]
fn the_valid_base_of_the_bad_configs_is_accepted() {
    // Without this, a "bad config" test could pass because the base config was bad.
    if !require_netns() {
        return;
    }
    let ns = Netns::new("basecfg").unwrap();
    let mut router = ConfigRouter::new(&ns).unwrap();
    router
        .write_config_text(&valid_config_text(&router))
        .unwrap();
    router.start().unwrap();
    assert!(router.dir().join("state").join("private.key").exists());
}

#[test]
fn an_unknown_key_is_refused_with_file_line_and_key() {
    if !require_netns() {
        return;
    }
    refuses(|router| BadConfig {
        what: "unknown key",
        text: Some(broken(
            &valid_config_text(router),
            "listen_port =",
            "listen_prot =",
        )),
        at: Some("listen_prot"),
        problem: vec!["unknown key".into(), "listen_prot".into()],
    });
}

#[test]
fn a_bad_public_key_is_refused_with_file_line_and_problem() {
    if !require_netns() {
        return;
    }
    refuses(|router| {
        let valid = valid_config_text(router);
        let key = valid
            .lines()
            .find_map(|l| l.strip_prefix("public_key = "))
            .expect("a peer key")
            .to_string();
        BadConfig {
            what: "bad public key",
            text: Some(broken(&valid, &key, "\"not-a-key\"")),
            at: Some("not-a-key"),
            problem: vec!["bad public_key".into()],
        }
    });
}

#[test]
fn a_bad_cidr_is_refused_with_file_line_and_value() {
    if !require_netns() {
        return;
    }
    refuses(|router| BadConfig {
        what: "bad CIDR",
        text: Some(broken(
            &valid_config_text(router),
            "198.19.2.0/24",
            "198.19.2.0/33",
        )),
        at: Some("198.19.2.0/33"),
        problem: vec!["198.19.2.0/33".into()],
    });
}

#[test]
fn a_too_long_interface_name_in_the_file_is_refused_with_file_line_and_problem() {
    if !require_netns() {
        return;
    }
    refuses(|router| {
        let long = format!("{}abcdefghijklmnop", router.ifname());
        BadConfig {
            what: "interface name too long",
            text: Some(broken(
                &valid_config_text(router),
                &format!("interface = \"{}\"", router.ifname()),
                &format!("interface = \"{long}\""),
            )),
            at: Some("interface ="),
            problem: vec!["longer than 15".into()],
        }
    });
}

#[test]
fn a_missing_config_file_is_refused_naming_it() {
    if !require_netns() {
        return;
    }
    refuses(|_| BadConfig {
        what: "missing file",
        text: None,
        at: None,
        problem: vec!["No such file".into()],
    });
}

#[test]
fn an_unreadable_config_file_is_refused_naming_it() {
    if !require_netns_with(&[("setpriv", "util-linux")]) {
        return;
    }
    let ns = Netns::new("unread").unwrap();
    let router = ConfigRouter::new(&ns).unwrap();
    let case = BadConfig {
        what: "unreadable file",
        text: Some(valid_config_text(&router)),
        at: None,
        problem: vec!["Permission denied".into()],
    };
    router
        .write_config_text(case.text.as_deref().unwrap())
        .unwrap();
    let path = router.config_path();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads any file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: drop both, as a
    // router in a restricted pod would lack them.
    let drop_caps = "-dac_override,-dac_read_search";
    let mut cmd = ns.command("setpriv").unwrap();
    cmd.arg(format!("--inh-caps={drop_caps}"))
        .arg(format!("--bounding-set={drop_caps}"))
        .arg(router.binary())
        .args(router.router_args());
    let run = tailsk8s_e2e::config_router::run_to_exit(cmd, REFUSE_TIMEOUT).unwrap();
    assert_refused(&router, &case, &run);
}

/// A key file others can read, left exactly as it was.
fn loose_key_case(router: &ConfigRouter<'_>) -> (BadConfig, String) {
    let keys = KeyPair::generate(&tailsk8s_binary().unwrap()).unwrap();
    keys.write_private(&router.key_path()).unwrap();
    fs::set_permissions(router.key_path(), fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = router.config();
    config.peers.push(paper_peer());
    let key_path = router.key_path().display().to_string();
    let case = BadConfig {
        what: "key file with loose permissions",
        text: Some(config.to_toml()),
        at: Some("private_key_file"),
        problem: vec![key_path.clone(), "0644".into()],
    };
    (case, key_path)
}

fn run_loose_key(check: impl Fn(&ConfigRouter<'_>, &BadConfig, &Exited)) {
    let ns = Netns::new("loose").unwrap();
    let router = ConfigRouter::new(&ns).unwrap();
    let (case, _) = loose_key_case(&router);
    router
        .write_config_text(case.text.as_deref().unwrap())
        .unwrap();
    let before = fs::read(router.key_path()).unwrap();
    let run = router.run_to_exit(REFUSE_TIMEOUT).unwrap();
    check(&router, &case, &run);
    let key = router.key_path();
    assert_eq!(fs::read(&key).unwrap(), before, "key file changed");
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "key file mode changed");
}

#[test]
fn a_key_file_with_loose_permissions_is_refused_naming_it_and_changes_nothing() {
    if !require_netns() {
        return;
    }
    run_loose_key(|router, case, run| {
        let (ns, what) = (router.netns(), case.what);
        assert_eq!(
            run.status.code(),
            Some(1),
            "{what}: stderr:\n{}",
            run.stderr
        );
        assert_eq!(links(ns).len(), 1, "{what}: links created: {:?}", links(ns));
        assert_eq!(uapi_entries(router.ifname()), Vec::<String>::new());
        assert!(our_routes(ns).is_empty() && rules_for_table(ns, ROUTE_TABLE).unwrap().is_empty());
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {lines:?}");
        assert!(lines[0].starts_with("tailsk8s: error: "), "{}", lines[0]);
        for word in &case.problem {
            assert!(
                lines[0].contains(word.as_str()),
                "does not say {word:?}: {}",
                lines[0]
            );
        }
    });
}

/// The issue asks every bad-config message to name the file and the line: for a key file,
/// that is the config line that names it.
#[test]
fn a_key_file_with_loose_permissions_is_reported_at_its_config_line() {
    if !require_netns() {
        return;
    }
    run_loose_key(assert_refused);
}

/// `SocketAddr` is what the config's endpoint must read back as (a guard against the
/// harness rendering endpoints the router would parse differently).
#[test]
fn endpoints_render_as_the_router_reads_them_back() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("ep").unwrap();
    let mut router = ConfigRouter::new(&ns).unwrap();
    let mut config = router.config();
    let mut v6_peer = paper_peer();
    let endpoint: SocketAddr = "[fd00:18::2]:51820".parse().unwrap();
    v6_peer.endpoint = Some(endpoint);
    config.peers.push(v6_peer);
    router.write_config(&config).unwrap();
    router.start().unwrap();
    assert_eq!(router.dump().unwrap().peers[0].endpoint, Some(endpoint));
}

// ---------------------------------------------------------------------------------------------
// Reload

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Node 1's router's latest handshake with `peer`.
fn handshake_with(router: &ConfigRouter<'_>, peer: &str) -> Option<u64> {
    router
        .dump()
        .unwrap()
        .peer(peer)
        .and_then(|p| p.latest_handshake)
}

#[test]
fn a_config_reload_adds_a_peer_without_re_handshaking_the_others() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(3).build().unwrap();
    let mut mesh = ConfigMesh::start(&topo, &MeshOptions::default()).unwrap();
    let [a, b, c] = topo.nodes() else {
        panic!("three nodes")
    };
    let (key_b, key_c) = {
        let routers = mesh.routers();
        (
            routers[1].public_key().unwrap().to_string(),
            routers[2].public_key().unwrap().to_string(),
        )
    };
    ping(a.pods()[0].netns(), b.pods()[0].ip(false), 2).unwrap();
    ping(a.pods()[0].netns(), c.pods()[0].ip(false), 2).unwrap();

    // Node 1's file without node 3, then with it again: the reload is what adds the peer.
    let router = &mut mesh.routers_mut()[0];
    let full = fs::read_to_string(router.config_path()).unwrap();
    let blocks: Vec<&str> = full.split("\n[[peer]]").collect();
    let without_c: String = blocks
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.contains(&key_c))
        .map(|(i, b)| {
            if i == 0 {
                b.to_string()
            } else {
                format!("\n[[peer]]{b}")
            }
        })
        .collect();
    assert_ne!(without_c, full, "node 3's peer not in\n{full}");
    router.write_config_text(&without_c).unwrap();
    router.signal(libc::SIGHUP).unwrap();
    wait::until("node 3 removed by SIGHUP", Duration::from_secs(10), || {
        Ok(router.dump()?.peer(&key_c).is_none().then_some(()))
    })
    .unwrap();

    // The handshake times have a resolution of a second: let one pass so a new one shows.
    let before = handshake_with(router, &key_b).expect("handshake with node 2");
    wait::until("a second", Duration::from_secs(3), || {
        Ok((unix_now() > before).then_some(()))
    })
    .unwrap();

    // Added back by the file changing alone (no signal).
    router.write_config_text(&full).unwrap();
    wait::until(
        "node 3 added by the file change",
        Duration::from_secs(10),
        || Ok(router.dump()?.peer(&key_c).is_some().then_some(())),
    )
    .unwrap();
    ping(a.pods()[0].netns(), c.pods()[0].ip(false), 2).unwrap();
    ping(a.pods()[0].netns(), b.pods()[0].ip(false), 2).unwrap();
    assert_eq!(
        handshake_with(router, &key_b),
        Some(before),
        "node 2's session was re-handshaken by the reload"
    );

    // A bad file is refused and changes nothing.
    router.write_config_text("this is not toml").unwrap();
    router.signal(libc::SIGHUP).unwrap();
    wait::until("the refusal in the log", Duration::from_secs(10), || {
        let log = router.daemon_mut().unwrap().log();
        Ok(log.contains("refused the new").then_some(()))
    })
    .unwrap();
    ping(a.pods()[0].netns(), c.pods()[0].ip(false), 1).unwrap();
    assert!(router.dump().unwrap().peer(&key_b).is_some());
    router.write_config_text(&full).unwrap();
}
