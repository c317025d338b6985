//! The router run the way the DaemonSet runs it: the image built from deploy/Dockerfile,
//! as a container under a real OCI runtime (podman + runc) on each node's host network
//! (`--network ns:` = `hostNetwork: true`), with exactly the DaemonSet's capabilities
//! (NET_ADMIN, BPF; everything else dropped), no seccomp filter, `/dev/net/tun`, a read-only
//! root filesystem,
//! and the hostPath mounts: the key directory, the UAPI socket directory, the tailscaled
//! socket directory, and the config file (the ConfigMap). Two such nodes carry pod traffic
//! between their bridges; a container started again keeps its key.
//!
//! The image is built once per test process from the debug binary with the same Dockerfile
//! and staging script as scripts/image (which CI also runs for the release image).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tailsk8s_e2e::config_router::{wait_for_exit, wait_until_serving, ConfigFile, PeerSpec};
use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::process::{run, Daemon};
use tailsk8s_e2e::threads::worker_threads;
use tailsk8s_e2e::wg::UAPI_DIR;
use tailsk8s_e2e::{names, ping, tailsk8s_binary, tcp_transfer, Netns, TopologyBuilder};

/// The DaemonSet's capabilities (deploy/daemonset.yaml), and nothing else.
const CAPABILITIES: &[&str] = &["NET_ADMIN", "BPF"];
/// Where the DaemonSet mounts things inside the container.
const KEY_DIR: &str = "/var/lib/tailsk8s";
const CONFIG_FILE: &str = "/etc/tailsk8s/router.toml";
const TAILSCALE_DIR: &str = "/var/run/tailscale";

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    // crun cannot run here (cgroups in hybrid mode), nor the default resource limits.
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The image under test, built once per process and removed at exit of the last test that
/// needs it (podman keeps nothing else: the build stage is replaced by a staged directory).
fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let tag = format!("localhost/tailsk8s:e2e-{}", std::process::id());
        let stage = names::scratch_file("image", "d").unwrap();
        let root = workspace();
        run(Command::new(root.join("deploy/rootfs.sh"))
            .arg(tailsk8s_binary().unwrap())
            .arg(&stage))
        .expect("staging the image's root filesystem");
        let built = run(podman()
            .args(["build", "--quiet", "--build-context"])
            .arg(format!("build={}", stage.display()))
            .args(["-t", &tag, "-f"])
            .arg(root.join("deploy/Dockerfile"))
            .arg(&root));
        let _ = fs::remove_dir_all(&stage);
        built.expect("building the image");
        tag
    })
}

/// The host directories the DaemonSet mounts for one node (hostPath volumes), removed on drop.
struct NodeDirs {
    keys: PathBuf,
    config: PathBuf,
    tailscale: PathBuf,
}

impl NodeDirs {
    fn new() -> NodeDirs {
        let make = |what: &str| {
            let dir = names::scratch_file(what, "d").unwrap();
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            dir
        };
        NodeDirs {
            keys: make("keys"),
            config: make("config"),
            tailscale: make("tailscale"),
        }
    }
}

impl Drop for NodeDirs {
    fn drop(&mut self) {
        for dir in [&self.keys, &self.config, &self.tailscale] {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// One router container on a node; removed (with force) on drop.
struct RouterContainer {
    name: String,
    ifname: String,
    daemon: Option<Daemon>,
}

impl RouterContainer {
    /// Runs the image on `node`'s network with the DaemonSet's settings and waits until the
    /// router serves UAPI on the host's socket directory.
    fn start(node: &Netns, dirs: &NodeDirs, ifname: &str) -> RouterContainer {
        let name = format!("{}-{ifname}", names::netns_name("ctr"));
        let mut cmd = podman();
        cmd.args(["run", "--rm", "--name", &name])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .arg(format!("--network=ns:{}", node.path().display()))
            .args(["--cap-drop", "all"]);
        for cap in CAPABILITIES {
            cmd.args(["--cap-add", cap]);
        }
        // The DaemonSet's `seccompProfile: Unconfined`: runtime-default profiles (podman's,
        // CRI-O's) allow the bpf() syscall only with CAP_SYS_ADMIN, which we do not grant.
        cmd.args(["--security-opt", "seccomp=unconfined"])
            .args(["--device", "/dev/net/tun", "--read-only"])
            .arg(format!("--volume={}:{KEY_DIR}", dirs.keys.display()))
            .arg(format!(
                "--volume={}:{CONFIG_FILE}:ro",
                dirs.config.join("router.toml").display()
            ))
            .arg(format!("--volume={UAPI_DIR}:{UAPI_DIR}"))
            .arg(format!(
                "--volume={}:{TAILSCALE_DIR}",
                dirs.tailscale.display()
            ))
            .args(["--env", "RUST_LOG=info"])
            .arg(image());
        let mut daemon = Daemon::spawn(&format!("router container {name}"), cmd).unwrap();
        wait_until_serving(&mut daemon, ifname)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
        RouterContainer {
            name,
            ifname: ifname.to_string(),
            daemon: Some(daemon),
        }
    }

    /// The router process as the host sees it.
    fn host_pid(&self) -> u32 {
        let out =
            run(podman().args(["inspect", "--format", "{{.State.Pid}}", &self.name])).unwrap();
        out.trim().parse().unwrap()
    }

    /// The router's public key, as `wg` on the host reads it through the shared socket
    /// directory.
    fn public_key(&self) -> String {
        let out = run(Command::new("wg").args(["show", &self.ifname, "public-key"])).unwrap();
        out.trim().to_string()
    }

    /// `podman stop`: SIGTERM, as the kubelet stops a pod; the router must exit cleanly.
    fn stop(&mut self) {
        run(podman().args(["stop", "--time", "5", &self.name])).unwrap();
        if let Some(mut daemon) = self.daemon.take() {
            let status = wait_for_exit(&mut daemon, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
            assert!(
                status.success(),
                "router container exited with {status}:\n{}",
                daemon.log()
            );
        }
    }
}

impl Drop for RouterContainer {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "2", &self.name])
            .output();
        if let Some(daemon) = self.daemon.as_mut() {
            daemon.stop();
        }
    }
}

fn write_config(dirs: &NodeDirs, config: &ConfigFile) {
    fs::write(dirs.config.join("router.toml"), config.to_toml()).unwrap();
}

#[test]
fn router_containers_carry_pod_traffic_and_keep_their_keys() {
    if !require_netns_with(&[("podman", "podman"), ("runc", "runc")]) {
        return;
    }
    let topology = TopologyBuilder::new(2).build().unwrap();
    let nodes = topology.nodes();
    let dirs: Vec<NodeDirs> = nodes.iter().map(|_| NodeDirs::new()).collect();
    let ifnames: Vec<String> = nodes.iter().map(|_| names::ifname().unwrap()).collect();
    let config = |k: usize| {
        let mut config = ConfigFile::new(&ifnames[k], &Path::new(KEY_DIR).join("private.key"));
        config.listen_port = Some(51820);
        config
    };

    // First start: no key yet. Each router creates its key in the hostPath directory.
    let mut keys = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        write_config(&dirs[k], &config(k));
        let mut container = RouterContainer::start(node.netns(), &dirs[k], &ifnames[k]);
        keys.push(container.public_key());
        container.stop();
        let key_file = dirs[k].keys.join("private.key");
        let mode = fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key_file.display());
    }
    assert_ne!(keys[0], keys[1]);

    // Started again with each other as peers (a changed ConfigMap): same keys, pod traffic.
    let mut containers = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let other = 1 - k;
        let mut config = config(k);
        config.peers.push(PeerSpec {
            public_key: keys[other].clone(),
            endpoint: Some((nodes[other].underlay_v4(), 51820).into()),
            allowed_ips: nodes[other].pod_cidrs(),
            persistent_keepalive: None,
        });
        write_config(&dirs[k], &config);
        let container = RouterContainer::start(node.netns(), &dirs[k], &ifnames[k]);
        assert_eq!(
            container.public_key(),
            keys[k],
            "a restarted container keeps its key"
        );
        containers.push(container);
    }
    let (a, b) = (&nodes[0].pods()[0], &nodes[1].pods()[0]);
    for v6 in [false, true] {
        ping(a.netns(), b.ip(v6), 3).unwrap();
        ping(b.netns(), a.ip(v6), 3).unwrap();
    }
    let report = tcp_transfer(a.netns(), b.netns(), b.ip(false), 20 << 20).unwrap();
    report.verify(a.ip(false)).unwrap();

    // With BPF granted, the workers are placed (pinned while quiet, one CPU each) rather
    // than left spread for lack of a capability; with one CPU there is nothing to place.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        let pid = containers[0].host_pid();
        tailsk8s_e2e::wait::until(
            "the container's workers pinned, one CPU each",
            Duration::from_secs(10),
            || {
                let workers = worker_threads(pid);
                let pinned = !workers.is_empty() && workers.iter().all(|t| t.on_one_cpu());
                Ok(pinned.then_some(()))
            },
        )
        .unwrap_or_else(|e| {
            let log = containers[0]
                .daemon
                .as_ref()
                .map(Daemon::log)
                .unwrap_or_default();
            panic!("{e:#}: {:?}\n{log}", worker_threads(pid))
        });
    }

    // kubelet stops the pod: SIGTERM, clean exit, routes and rules gone from the node.
    for container in &mut containers {
        container.stop();
    }
    for node in nodes {
        let rules = node.netns().ip(&["rule", "show"]).unwrap();
        assert!(!rules.contains("lookup 5200"), "rule left behind:\n{rules}");
    }
}
