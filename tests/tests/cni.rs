//! `tailsk8s cni-config` output checked by the CNI plugins themselves: the configuration list
//! the binary writes is executed, plugin by plugin as a container runtime does, with the real
//! `bridge`, `host-local` and `loopback` plugins (Debian's containernetworking-plugins) for a
//! pod namespace on a node namespace. The pod must come up on `cnio0` with an address from
//! each pod CIDR, the tunnel MTU and default routes via the bridge.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::{names, tailsk8s_binary, Netns};

/// Where Debian installs the CNI plugins.
const CNI_PATH: &str = "/usr/lib/cni";

/// Runs one plugin of `list` for `command` (ADD/DEL) the way a runtime does: the plugin's own
/// object plus the list's `name` and `cniVersion` on stdin, the CNI_* variables set, in the
/// node's namespace.
fn run_plugin(
    node: &Netns,
    pod: &Netns,
    list: &Value,
    plugin: &Value,
    ifname: &str,
    command: &str,
) -> Value {
    let mut config = plugin.clone();
    config["name"] = list["name"].clone();
    config["cniVersion"] = list["cniVersion"].clone();
    let kind = plugin["type"].as_str().expect("plugin type");
    let mut cmd = node.command(&format!("{CNI_PATH}/{kind}")).unwrap();
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{kind} {command} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap()
    }
}

struct ScratchDir(PathBuf);
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn cni_config(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(tailsk8s_binary().unwrap())
        .arg("cni-config")
        .arg("--cni-dir")
        .arg(dir)
        .args(extra)
        .env_remove("NODE_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

#[test]
fn the_written_conflist_brings_a_dual_stack_pod_up_through_the_real_plugins() {
    if !require_netns_with(&[("/usr/lib/cni/bridge", "containernetworking-plugins")]) {
        return;
    }
    let scratch = ScratchDir(names::scratch_file("cni", "d").unwrap());
    fs::create_dir(&scratch.0).unwrap();
    let cni_dir = scratch.0.join("net.d");
    let config_file = scratch.0.join("router.toml");
    fs::write(
        &config_file,
        "private_key_file = \"private.key\"\nmtu = 1380\n",
    )
    .unwrap();
    let out = cni_config(
        &cni_dir,
        &[
            "--config",
            config_file.to_str().unwrap(),
            "--pod-cidr",
            "198.19.1.0/24",
            "--pod-cidr",
            "fd00:19:1::/64",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = cni_dir.join("10-tailsk8s.conflist");
    let mut list: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    // Leases in this test's directory rather than the machine's /var/lib/cni.
    list["plugins"][0]["ipam"]["dataDir"] =
        Value::String(scratch.0.join("leases").display().to_string());

    let node = Netns::new("cninode").unwrap();
    let pod = Netns::new("cnipod").unwrap();
    let plugins = list["plugins"].as_array().unwrap().clone();
    let bridge = plugins.iter().find(|p| p["type"] == "bridge").unwrap();
    let loopback = plugins.iter().find(|p| p["type"] == "loopback").unwrap();
    let result = run_plugin(&node, &pod, &list, bridge, "eth0", "ADD");
    run_plugin(&node, &pod, &list, loopback, "lo", "ADD");

    // The result names an address from each pod CIDR, with the bridge as gateway.
    let ips: Vec<String> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap().to_string())
        .collect();
    assert!(ips.iter().any(|a| a.starts_with("198.19.1.")), "{ips:?}");
    assert!(ips.iter().any(|a| a.starts_with("fd00:19:1::")), "{ips:?}");
    let gateways: Vec<&str> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ip| ip["gateway"].as_str())
        .collect();
    assert_eq!(gateways, ["198.19.1.1", "fd00:19:1::1"]);

    // The kernel agrees: the pod's eth0 at the tunnel MTU, default routes via the bridge,
    // and the node's bridge cnio0 holding the gateway addresses.
    let link = pod.ip(&["-o", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1380"), "{link}");
    let routes = pod.ip(&["-4", "route", "show", "default"]).unwrap();
    assert!(routes.contains("via 198.19.1.1"), "{routes}");
    let routes6 = pod.ip(&["-6", "route", "show", "default"]).unwrap();
    assert!(routes6.contains("via fd00:19:1::1"), "{routes6}");
    let bridge_addrs = node.ip(&["-o", "addr", "show", "cnio0"]).unwrap();
    assert!(bridge_addrs.contains("198.19.1.1/24"), "{bridge_addrs}");
    let lo = pod.ip(&["-o", "link", "show", "lo"]).unwrap();
    assert!(lo.contains("UP"), "{lo}");

    run_plugin(&node, &pod, &list, bridge, "eth0", "DEL");
    assert!(pod.ip(&["-o", "link", "show", "eth0"]).is_err());

    // Run again: an existing configuration is kept, byte for byte.
    let before = fs::read(&path).unwrap();
    let out = cni_config(&cni_dir, &["--pod-cidr", "198.19.9.0/24"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn without_any_pod_cidr_source_cni_config_fails_with_one_clear_line() {
    let scratch = ScratchDir(names::scratch_file("cni", "d").unwrap());
    let out = cni_config(&scratch.0, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no pod CIDR for this node"), "{stderr}");
    assert!(!scratch.0.exists(), "nothing written");
}
