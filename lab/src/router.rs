//! The router in config-file mode (`tailsk8s router --config FILE`), and what the end-to-end
//! tests need around its process: signals, waiting for it to serve or to exit, one-shot runs
//! that must fail, and reading back the routes and rules it installs.
//!
//! [`ConfigFile`] renders the router's TOML (see control/src/config.rs for the keys).
//! [`ConfigRouter`] is the guard for one router: it owns a fresh interface name and a private
//! directory (mode 0700) holding `router.toml` and `private.key`, starts the binary in a node
//! namespace, and on drop stops it and removes its socket and directory. It can be killed
//! and restarted with the same files, as a node agent is. [`ConfigMesh`] starts one per node
//! of a [`Topology`], each listing every other node as a peer — no `wg` call configures them.
//!
//! The harness depends on no project crate, so keys come from the binary under test
//! (`tailsk8s genkey` / `tailsk8s pubkey`) or from the caller ([`KeyPair::new`]). Readiness is
//! checked with a UAPI `get` on the socket, without `wg`, so callers such as the demo need no
//! wireguard-tools. The routing constants mirror control/src/routes.rs: the tests read them
//! back from the kernel, which is the point — they are the contract, not a copy of the code.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;

use crate::dump::WgDump;
use crate::names;
use crate::netns::Netns;
use crate::process::{self, Daemon};
use crate::topology::Topology;
use crate::wg::{tailsk8s_binary, EndpointFamily, MeshOptions, PeerSpec, READY_TIMEOUT, UAPI_DIR};

/// The routing table the router puts the peers' allowed IPs in.
pub const ROUTE_TABLE: u32 = 5200;
/// tailscaled's first `ip rule` priority: the router's rule must come before it.
pub const TAILSCALE_RULE_PRIORITY: u32 = 5210;
/// The fwmark the router's own UDP socket carries by default; its rule skips that mark.
pub const DEFAULT_FWMARK: u32 = 0x1000_0000;
/// How long a router gets to exit after it was told to (signal, TUN or socket deleted).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one UAPI request may take before it counts as "not serving yet".
const UAPI_TIMEOUT: Duration = Duration::from_secs(1);
/// File names inside a [`ConfigRouter`]'s directory.
const CONFIG_NAME: &str = "router.toml";
const KEY_NAME: &str = "private.key";

// ---------------------------------------------------------------------------------------------
// Keys

/// A WireGuard key pair in base64. `Debug` does not show the private key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    private: String,
    public: String,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A pair from keys the caller made (e.g. with the data plane's `Key`).
    pub fn new(private: &str, public: &str) -> KeyPair {
        KeyPair {
            private: private.trim().to_string(),
            public: public.trim().to_string(),
        }
    }

    /// A fresh pair from `binary genkey` and `binary pubkey` (the `tailsk8s` binary).
    pub fn generate(binary: &Path) -> anyhow::Result<KeyPair> {
        let private = process::run(Command::new(binary).arg("genkey"))?;
        let public =
            process::run_with_input(Command::new(binary).arg("pubkey"), private.as_bytes())?;
        Ok(KeyPair::new(&private, &public))
    }

    /// The private key, base64.
    pub fn private(&self) -> &str {
        &self.private
    }

    /// The public key, base64.
    pub fn public(&self) -> &str {
        &self.public
    }

    /// Writes the private key to a new file `path`, mode 0600 (the router refuses looser).
    pub fn write_private(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        writeln!(file, "{}", self.private)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

// ---------------------------------------------------------------------------------------------
// The config file

/// A router config file; `None` fields are left out, so the router's defaults apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub interface: Option<String>,
    pub private_key_file: PathBuf,
    pub listen_port: Option<u16>,
    pub mtu: Option<u32>,
    pub fwmark: Option<u32>,
    pub workers: Option<usize>,
    pub offload: Option<bool>,
    pub peers: Vec<PeerSpec>,
}

impl ConfigFile {
    /// A config naming the interface and the private key file, with nothing else set.
    pub fn new(interface: &str, private_key_file: &Path) -> ConfigFile {
        ConfigFile {
            interface: Some(interface.to_string()),
            private_key_file: private_key_file.to_path_buf(),
            listen_port: None,
            mtu: None,
            fwmark: None,
            workers: None,
            offload: None,
            peers: Vec::new(),
        }
    }

    /// The file's text, one key per line, each peer as a `[[peer]]` table.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        if let Some(interface) = &self.interface {
            let _ = writeln!(out, "interface = {}", toml_string(interface));
        }
        let key_file = self.private_key_file.to_string_lossy();
        let _ = writeln!(out, "private_key_file = {}", toml_string(&key_file));
        if let Some(port) = self.listen_port {
            let _ = writeln!(out, "listen_port = {port}");
        }
        if let Some(mtu) = self.mtu {
            let _ = writeln!(out, "mtu = {mtu}");
        }
        if let Some(fwmark) = self.fwmark {
            let _ = writeln!(out, "fwmark = {fwmark:#x}");
        }
        if let Some(workers) = self.workers {
            let _ = writeln!(out, "workers = {workers}");
        }
        if let Some(offload) = self.offload {
            let _ = writeln!(out, "offload = {offload}");
        }
        for peer in &self.peers {
            let _ = writeln!(out, "\n[[peer]]");
            let _ = writeln!(out, "public_key = {}", toml_string(&peer.public_key));
            if let Some(endpoint) = peer.endpoint {
                let _ = writeln!(out, "endpoint = {}", toml_string(&endpoint.to_string()));
            }
            let allowed: Vec<String> = peer
                .allowed_ips
                .iter()
                .map(|ip| toml_string(&ip.to_string()))
                .collect();
            let _ = writeln!(out, "allowed_ips = [{}]", allowed.join(", "));
            if let Some(seconds) = peer.persistent_keepalive {
                let _ = writeln!(out, "persistent_keepalive = {seconds}");
            }
        }
        out
    }
}

/// `s` as a TOML basic string: quoted, with `"`, `\` and control characters escaped.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The 1-based line of the first occurrence of `needle` in `text`.
pub fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.find(needle)
        .map(|offset| text[..offset].matches('\n').count() + 1)
}

// ---------------------------------------------------------------------------------------------
// The router process

/// Where the UAPI socket of `ifname` lives (host-wide).
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{ifname}.sock"))
}

/// The raw answer of a UAPI `get=1` on `ifname`'s socket (`key=value` lines), or an error
/// if nothing serves it or the answer carries a non-zero errno.
pub fn uapi_get(ifname: &str) -> anyhow::Result<String> {
    let path = socket_path(ifname);
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    stream.set_read_timeout(Some(UAPI_TIMEOUT))?;
    stream.set_write_timeout(Some(UAPI_TIMEOUT))?;
    stream.write_all(b"get=1\n\n")?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer ends with an empty line; the server may keep the connection open.
    while !answer.ends_with(b"\n\n") {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the UAPI answer from {}", path.display()))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    match text.lines().rev().find(|l| !l.is_empty()) {
        Some("errno=0") => Ok(text),
        last => anyhow::bail!(
            "UAPI get on {} ended with {last:?}: {text:?}",
            path.display()
        ),
    }
}

/// Sends `signal` (e.g. `libc::SIGINT`) to a running daemon.
pub fn send_signal(daemon: &Daemon, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = daemon
        .pid()
        .ok_or_else(|| anyhow::anyhow!("{} is not running", daemon.label()))?;
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so it cannot
    // have been reused by another process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot signal {}", daemon.label()));
    }
    Ok(())
}

/// Waits until the daemon exits and returns its status; an error (with its log) if it is
/// still running after `timeout`.
pub fn wait_for_exit(daemon: &mut Daemon, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = daemon.exited()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} still runs {timeout:?} later:\n{}",
                daemon.label(),
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the router behind `daemon` answers a UAPI `get` on `ifname`'s socket — by
/// then it has applied its config file and installed its routes. An error with the log if
/// it exits first or does not answer within [`READY_TIMEOUT`].
pub fn wait_until_serving(daemon: &mut Daemon, ifname: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = daemon.exited()? {
            anyhow::bail!(
                "{} exited ({status}) before serving UAPI:\n{}",
                daemon.label(),
                daemon.log()
            );
        }
        let last_error = match uapi_get(ifname) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} did not answer on its UAPI socket within {READY_TIMEOUT:?} ({last_error:#}):\n{}",
                daemon.label(),
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a one-shot run ended.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exited {
    /// `stderr` split into lines (a trailing newline does not add an empty one).
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }
}

/// Runs `cmd` (stdin closed, no terminal colours) until it exits; kills it and fails if it
/// is still running after `timeout` — for runs that are expected to stop on their own, such
/// as a router refusing to start.
pub fn run_to_exit(mut cmd: Command, timeout: Duration) -> anyhow::Result<Exited> {
    // Files, not pipes: nothing has to drain them while the process runs.
    let out_path = names::scratch_file("run", "out")?;
    let err_path = names::scratch_file("run", "err")?;
    let result = (|| {
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&out_path)?)
            .stderr(File::create(&err_path)?);
        let line = process::describe(&cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = fs::read_to_string(&err_path).unwrap_or_default();
                anyhow::bail!("`{line}` still ran after {timeout:?}; stderr:\n{stderr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let read =
            |path: &Path| fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        Ok(Exited {
            status,
            stdout: read(&out_path)?,
            stderr: read(&err_path)?,
        })
    })();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    result
}

// ---------------------------------------------------------------------------------------------
// One router from a config file

/// One `tailsk8s router --config FILE` in a node namespace, with its own interface name and
/// private directory. Created stopped; [`ConfigRouter::start`] runs it (again). Dropping it
/// stops the process (SIGTERM, so it removes its routes), removes a socket it left behind
/// and deletes the directory.
#[derive(Debug)]
pub struct ConfigRouter<'a> {
    ns: &'a Netns,
    binary: PathBuf,
    ifname: String,
    dir: PathBuf,
    public_key: Option<String>,
    daemon: Option<Daemon>,
}

impl<'a> ConfigRouter<'a> {
    /// A router for `ns` using the binary under test ([`tailsk8s_binary`]).
    pub fn new(ns: &'a Netns) -> anyhow::Result<ConfigRouter<'a>> {
        ConfigRouter::with_binary(&tailsk8s_binary()?, ns)
    }

    /// A router for `ns` running `binary` (e.g. the demo's own executable).
    pub fn with_binary(binary: &Path, ns: &'a Netns) -> anyhow::Result<ConfigRouter<'a>> {
        let ifname = names::ifname()?;
        let dir = names::scratch_file(&ifname, "d")?;
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ConfigRouter {
            ns,
            binary: binary.to_path_buf(),
            ifname,
            dir,
            public_key: None,
            daemon: None,
        })
    }

    /// The interface (and UAPI socket) name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The node namespace it runs in.
    pub fn netns(&self) -> &'a Netns {
        self.ns
    }

    /// The router's private directory (mode 0700), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the config file is (written by [`ConfigRouter::write_config`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_NAME)
    }

    /// Where [`ConfigRouter::config`] puts the private key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_NAME)
    }

    /// The UAPI socket path.
    pub fn socket_path(&self) -> PathBuf {
        socket_path(&self.ifname)
    }

    /// The public key written with [`ConfigRouter::write_private_key`], if any.
    pub fn public_key(&self) -> Option<&str> {
        self.public_key.as_deref()
    }

    /// A config for this router: its interface name and [`ConfigRouter::key_path`].
    pub fn config(&self) -> ConfigFile {
        ConfigFile::new(&self.ifname, &self.key_path())
    }

    /// Writes `keys`' private key to [`ConfigRouter::key_path`] (0600). Without it the router
    /// creates a key on its first start.
    pub fn write_private_key(&mut self, keys: &KeyPair) -> anyhow::Result<()> {
        keys.write_private(&self.key_path())?;
        self.public_key = Some(keys.public().to_string());
        Ok(())
    }

    /// Writes (or replaces) the config file.
    pub fn write_config(&self, config: &ConfigFile) -> anyhow::Result<()> {
        self.write_config_text(&config.to_toml())
    }

    /// Writes (or replaces) the config file with exactly `text`.
    pub fn write_config_text(&self, text: &str) -> anyhow::Result<()> {
        let path = self.config_path();
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The arguments after the binary: `router [FLAGS…] --config PATH` (flags from
    /// [`crate::wg::ROUTER_FLAGS_ENV`]).
    pub fn router_args(&self) -> Vec<OsString> {
        std::iter::once("router".into())
            .chain(crate::wg::router_flags().into_iter().map(OsString::from))
            .chain(["--config".into(), self.config_path().into_os_string()])
            .collect()
    }

    /// The binary this router runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// `ip netns exec NS BINARY router --config PATH`.
    pub fn command(&self) -> anyhow::Result<Command> {
        let mut cmd = self.ns.command_at(&self.binary)?;
        cmd.args(self.router_args());
        Ok(cmd)
    }

    /// Starts the router on the config file as it is now and waits until it serves UAPI (so
    /// its config is applied and its routes installed). Also restarts after
    /// [`ConfigRouter::kill`] or [`ConfigRouter::stop`].
    pub fn start(&mut self) -> anyhow::Result<()> {
        if let Some(daemon) = self.daemon.as_mut() {
            if daemon.exited()?.is_none() {
                anyhow::bail!("{} is already running", daemon.label());
            }
        }
        let daemon = Daemon::spawn(
            &format!(
                "tailsk8s router --config ({}) in {}",
                self.ifname,
                self.ns.name()
            ),
            self.command()?,
        )?;
        let daemon = self.daemon.insert(daemon);
        wait_until_serving(daemon, &self.ifname)
    }

    /// Runs the router in the foreground on the current config file, expecting it to exit
    /// (e.g. because the config is bad) within `timeout`.
    pub fn run_to_exit(&self, timeout: Duration) -> anyhow::Result<Exited> {
        run_to_exit(self.command()?, timeout)
    }

    /// The running (or last) process, for its log and exit status.
    pub fn daemon_mut(&mut self) -> Option<&mut Daemon> {
        self.daemon.as_mut()
    }

    fn running(&mut self) -> anyhow::Result<&mut Daemon> {
        let ifname = &self.ifname;
        self.daemon
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("router {ifname} was never started"))
    }

    /// Sends `signal` to the running router.
    pub fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        send_signal(self.running()?, signal)
    }

    /// Waits for the router to exit (see [`wait_for_exit`]).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        wait_for_exit(self.running()?, timeout)
    }

    /// `kill -9`: no cleanup runs, so its socket file and `ip rule`s stay behind (its routes
    /// go with the TUN). Returns the exit status.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// SIGTERM and wait: the clean way out. Returns the exit status (SIGKILL after
    /// [`crate::process::STOP_TIMEOUT`] if it ignores SIGTERM).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.daemon.as_mut().and_then(Daemon::stop)
    }

    /// `wg show IFNAME dump`, read with the real `wg` (reading only: nothing is set).
    pub fn dump(&self) -> anyhow::Result<WgDump> {
        let text = self.ns.output("wg", &["show", &self.ifname, "dump"])?;
        text.parse()
            .with_context(|| format!("parsing `wg show {} dump`:\n{text}", self.ifname))
    }
}

impl Drop for ConfigRouter<'_> {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
            // Dropped here, so a panicking test prints the log before the files go.
            drop(daemon);
            // A router that was killed leaves its socket: remove it, or `wg show` tries it
            // forever. The name is ours alone, so no other process's socket goes.
            let _ = fs::remove_file(self.socket_path());
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != ErrorKind::NotFound {
                eprintln!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A mesh of config-file routers

/// One [`ConfigRouter`] per node of a [`Topology`], configured by files alone: each lists
/// every other node as a peer (endpoint = its underlay address, allowed IPs = its pod CIDRs)
/// and installs its own routes. Stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct ConfigMesh<'a> {
    routers: Vec<ConfigRouter<'a>>,
}

impl<'a> ConfigMesh<'a> {
    /// Starts the binary under test on every node with `options` (listen port, endpoint
    /// family, keepalive, MTU).
    pub fn start(topology: &'a Topology, options: &MeshOptions) -> anyhow::Result<ConfigMesh<'a>> {
        ConfigMesh::start_with_binary(&tailsk8s_binary()?, topology, options)
    }

    /// Like [`ConfigMesh::start`], running `binary`.
    pub fn start_with_binary(
        binary: &Path,
        topology: &'a Topology,
        options: &MeshOptions,
    ) -> anyhow::Result<ConfigMesh<'a>> {
        let nodes = topology.nodes();
        let mut routers = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut router = ConfigRouter::with_binary(binary, node.netns())?;
            router.write_private_key(&KeyPair::generate(binary)?)?;
            routers.push(router);
        }
        for (node, router) in nodes.iter().zip(&routers) {
            let mut config = router.config();
            config.listen_port = Some(options.listen_port);
            config.mtu = Some(options.mtu);
            for (remote, remote_router) in nodes.iter().zip(&routers) {
                if remote.index() == node.index() {
                    continue;
                }
                let public_key = remote_router
                    .public_key()
                    .ok_or_else(|| anyhow::anyhow!("node {} has no key", remote.index()))?;
                config.peers.push(PeerSpec {
                    public_key: public_key.to_string(),
                    endpoint: Some(SocketAddr::new(
                        remote.underlay(options.endpoints == EndpointFamily::V6),
                        options.listen_port,
                    )),
                    allowed_ips: remote.pod_cidrs(),
                    persistent_keepalive: options.persistent_keepalive,
                });
            }
            router.write_config(&config)?;
        }
        for (node, router) in nodes.iter().zip(&mut routers) {
            router
                .start()
                .with_context(|| format!("starting the router of node {}", node.index()))?;
        }
        Ok(ConfigMesh { routers })
    }

    /// The routers; `routers()[k]` runs on node `k + 1`.
    pub fn routers(&self) -> &[ConfigRouter<'a>] {
        &self.routers
    }

    /// Mutable access: kill, restart, stop single routers.
    pub fn routers_mut(&mut self) -> &mut [ConfigRouter<'a>] {
        &mut self.routers
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_escape_quotes_backslashes_and_control_characters() {
        assert_eq!(toml_string("plain/path"), "\"plain/path\"");
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("x\ny\u{1}"), "\"x\\ny\\u0001\"");
    }

    #[test]
    fn config_file_renders_every_set_key_and_peer() {
        let mut config = ConfigFile::new("tsk9", Path::new("/k/private.key"));
        config.listen_port = Some(51820);
        config.mtu = Some(1380);
        config.fwmark = Some(DEFAULT_FWMARK);
        config.workers = Some(2);
        config.offload = Some(false);
        config.peers.push(PeerSpec {
            public_key: "PUB".into(),
            endpoint: Some("[fd00:18::2]:51820".parse().unwrap()),
            allowed_ips: vec![
                "198.19.2.0/24".parse().unwrap(),
                "fd00:19:2::/64".parse().unwrap(),
            ],
            persistent_keepalive: Some(25),
        });
        assert_eq!(
            config.to_toml(),
            "interface = \"tsk9\"\n\
             private_key_file = \"/k/private.key\"\n\
             listen_port = 51820\n\
             mtu = 1380\n\
             fwmark = 0x10000000\n\
             workers = 2\n\
             offload = false\n\
             \n[[peer]]\n\
             public_key = \"PUB\"\n\
             endpoint = \"[fd00:18::2]:51820\"\n\
             allowed_ips = [\"198.19.2.0/24\", \"fd00:19:2::/64\"]\n\
             persistent_keepalive = 25\n"
        );
    }

    #[test]
    fn unset_keys_are_left_out() {
        let config = ConfigFile::new("tsk9", Path::new("k"));
        assert_eq!(
            config.to_toml(),
            "interface = \"tsk9\"\nprivate_key_file = \"k\"\n"
        );
    }

    #[test]
    fn key_pair_debug_hides_the_private_key() {
        let keys = KeyPair::new("SECRET\n", " PUBLIC ");
        assert_eq!((keys.private(), keys.public()), ("SECRET", "PUBLIC"));
        let shown = format!("{keys:?}");
        assert!(
            shown.contains("PUBLIC") && !shown.contains("SECRET"),
            "{shown}"
        );
    }

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
