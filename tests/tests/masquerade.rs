//! End-to-end test of the router's masquerade table: a router whose config names its pod
//! CIDRs and the cluster CIDRs installs `table inet tailsk8s` (one postrouting NAT rule per
//! family, pod sources to destinations outside the cluster), replaces a stale one a crash left,
//! and removes it on SIGTERM, exiting within 2 s of the signal.
//!
//! Not yet here: traffic through the table (a pod reaching a namespace outside the cluster
//! arrives with the node's address, pod-to-pod keeps its source).

use std::time::{Duration, Instant};

use tailsk8s_e2e::{require_netns, tailsk8s_binary, ConfigRouter, KeyPair, Netns};

/// What the issue asks of a router told to stop.
const EXIT_BUDGET: Duration = Duration::from_secs(2);

/// `nft list table inet tailsk8s` in `ns`, or `None` when there is no such table.
fn nat_table(ns: &Netns) -> Option<String> {
    let output = ns
        .command("nft")
        .unwrap()
        .args(["list", "table", "inet", "tailsk8s"])
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
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
