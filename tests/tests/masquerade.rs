//! End-to-end test of the router's masquerade table: a router whose config names its pod
//! CIDRs and the cluster CIDRs installs `table inet tailsk8s` (one postrouting NAT rule per
//! family, pod sources to destinations outside the cluster), replaces a stale one a crash left,
//! and removes it on SIGTERM, exiting within 2 s of the signal.
//! With traffic: a pod reaching a namespace outside the cluster CIDRs (the internet on node
//! 1's other link) arrives with the node's address; pod-to-pod across nodes keeps its source.

use std::time::{Duration, Instant};

use std::fs;

use tailsk8s_e2e::{
    ping, require_netns, tailsk8s_binary, ConfigMesh, ConfigRouter, KeyPair, MeshOptions, Netns,
    TopologyBuilder,
};

/// What the issue asks of a router told to stop.
const EXIT_BUDGET: Duration = Duration::from_secs(2);

/// `nft list table inet tailsk8s` in `ns`, or `None` when there is no such table.
fn nat_table(ns: &Netns) -> Option<String> {
    tailsk8s_e2e::config_router::nat_table(ns).unwrap()
}

#[test]
fn the_masquerade_table_lives_exactly_as_long_as_the_router() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("nat").unwrap();
    let mut router = ConfigRouter::new(&ns).unwrap();
    router
        .write_private_key(&KeyPair::generate(&tailsk8s_binary().unwrap()).unwrap())
        .unwrap();
    let mut text = router.config().to_toml();
    text.push_str(
        "cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/48\"]\n\
         pod_cidrs = [\"198.19.1.0/24\", \"fd00:19:0:1::/64\"]\n",
    );
    router.write_config_text(&text).unwrap();

    // A crashed router's table, with a rule the new one must not keep.
    let stale = "table inet tailsk8s {\n chain postrouting {\n  type nat hook postrouting \
                 priority srcnat; policy accept;\n  ip saddr 198.19.99.0/24 masquerade\n }\n}\n";
    let mut nft = ns.command("nft").unwrap();
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stale.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());

    router.start().unwrap();
    let table = nat_table(&ns).expect("no masquerade table while running");
    assert!(!table.contains("198.19.99.0"), "stale rule kept:\n{table}");
    assert!(
        table.contains("ip saddr 198.19.1.0/24 ip daddr != 198.19.0.0/16 masquerade"),
        "{table}"
    );
    assert!(
        table.contains("ip6 saddr fd00:19:0:1::/64 ip6 daddr != fd00:19::/48 masquerade"),
        "{table}"
    );
    assert_eq!(table.matches("masquerade").count(), 2, "{table}");

    let signalled = Instant::now();
    router.signal(libc::SIGTERM).unwrap();
    let status = router.wait_exit(Duration::from_secs(10)).unwrap();
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < EXIT_BUDGET, "exit took {took:?} after SIGTERM");
    assert_eq!(nat_table(&ns), None, "the table outlived SIGTERM");
}

/// Runs `program args…` in `ns`, which must succeed; returns stdout.
fn run_in(ns: &Netns, program: &str, args: &[&str]) -> String {
    let output = ns.command(program).unwrap().args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An input-hook table in `ns` counting packets from each of `sources` (in order).
fn count_sources(ns: &Netns, sources: &[&str]) {
    let rules: String = sources
        .iter()
        .map(|s| format!("  ip saddr {s} counter\n"))
        .collect();
    let script = format!(
        "table ip seen {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n\
         {rules} }}\n}}\n"
    );
    let mut nft = ns.command("nft").unwrap();
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
}

/// The packet counts of [`count_sources`]'s rules, in order.
fn counted(ns: &Netns) -> Vec<u64> {
    run_in(ns, "nft", &["list", "table", "ip", "seen"])
        .split("counter packets ")
        .skip(1)
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn pods_leave_the_cluster_as_the_node_and_reach_pods_as_themselves() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).build().unwrap();
    let mut mesh = ConfigMesh::start(&topo, &MeshOptions::default()).unwrap();
    // Pod and cluster CIDRs in front of the peers (top-level keys), then a restart: both
    // are settings only a restart applies.
    for (node, router) in topo.nodes().iter().zip(mesh.routers_mut()) {
        let cidrs: Vec<String> = node
            .pod_cidrs()
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect();
        let text = fs::read_to_string(router.config_path()).unwrap();
        let head = format!(
            "cluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/32\"]\npod_cidrs = [{}]\n",
            cidrs.join(", ")
        );
        router.write_config_text(&(head + &text)).unwrap();
        router.stop();
        router.start().unwrap();
    }
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };

    // The internet: a namespace on node 1's other link, outside the cluster CIDRs.
    let inet = Netns::new("inet").unwrap();
    run_in(
        a.netns(),
        "ip",
        &[
            "link",
            "add",
            "up0",
            "type",
            "veth",
            "peer",
            "name",
            "up1",
            "netns",
            inet.name(),
        ],
    );
    run_in(
        a.netns(),
        "ip",
        &["addr", "add", "198.18.50.1/24", "dev", "up0"],
    );
    run_in(a.netns(), "ip", &["link", "set", "up0", "up"]);
    run_in(
        &inet,
        "ip",
        &["addr", "add", "198.18.50.2/24", "dev", "up1"],
    );
    run_in(&inet, "ip", &["link", "set", "up1", "up"]);
    count_sources(&inet, &["198.18.50.1", "198.19.0.0/16"]);
    ping(a.pods()[0].netns(), "198.18.50.2".parse().unwrap(), 2).unwrap();
    let seen = counted(&inet);
    assert!(
        seen[0] >= 2 && seen[1] == 0,
        "outside saw {seen:?} (node, pods)"
    );

    // Pod to pod across the nodes: the pod's own source arrives.
    let pod_a = a.pods()[0].ip(false).to_string();
    count_sources(b.pods()[0].netns(), &[&pod_a]);
    ping(a.pods()[0].netns(), b.pods()[0].ip(false), 2).unwrap();
    let seen = counted(b.pods()[0].netns());
    assert!(seen[0] >= 2, "the pod's source did not arrive: {seen:?}");

    for router in mesh.routers_mut() {
        router.stop();
    }
    for node in topo.nodes() {
        let output = node
            .netns()
            .command("nft")
            .unwrap()
            .args(["list", "table", "inet", "tailsk8s"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "the table outlived SIGTERM");
    }
}
