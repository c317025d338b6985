//! One `tailsk8s router --config FILE` on a node: its config file, its key, its process.
//!
//! [`ConfigFile`] renders the router's TOML (see control/src/config.rs for the keys).
//! [`ConfigRouter`] is the guard for one router: it owns a fresh interface name and a private
//! directory (mode 0700) holding `router.toml` and `private.key`, starts the binary in a node
//! namespace, and on drop stops it and removes its socket and directory. It can be killed
//! and restarted with the same files, as a node agent is. Around the process: signals, and
//! waiting for it to serve or to exit.
//!
//! The lab depends on no project crate, so keys come from the `tailsk8s` binary itself
//! (`tailsk8s genkey` / `tailsk8s pubkey`) or from the caller ([`KeyPair::new`]). Readiness is
//! checked with a UAPI `get` on the socket, without `wg`, so callers such as the demo need no
//! wireguard-tools.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;

use crate::binary::{router_flags, tailsk8s_binary};
use crate::names;
use crate::netns::Netns;
use crate::process::{self, Daemon, Exited};

/// Where UAPI sockets live (host-wide, shared by every namespace).
pub const UAPI_DIR: &str = "/var/run/wireguard";
/// How long a freshly started router gets to answer on its UAPI socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
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
// Peers

/// One peer, as a config file's `[[peer]]` table (or `wg set IFNAME peer …`) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Base64.
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
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
    /// `[metrics] listen`.
    pub metrics_listen: Option<SocketAddr>,
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
            metrics_listen: None,
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
        if let Some(listen) = self.metrics_listen {
            let _ = writeln!(out, "\n[metrics]");
            let _ = writeln!(out, "listen = {}", toml_string(&listen.to_string()));
        }
        for peer in &self.peers {
            out.push_str(&peer.to_toml());
        }
        out
    }
}

impl PeerSpec {
    /// The peer as a `[[peer]]` table, after a blank line (for the end of a config file).
    pub fn to_toml(&self) -> String {
        let mut out = String::from("\n[[peer]]\n");
        let _ = writeln!(out, "public_key = {}", toml_string(&self.public_key));
        if let Some(endpoint) = self.endpoint {
            let _ = writeln!(out, "endpoint = {}", toml_string(&endpoint.to_string()));
        }
        let allowed: Vec<String> = self
            .allowed_ips
            .iter()
            .map(|ip| toml_string(&ip.to_string()))
            .collect();
        let _ = writeln!(out, "allowed_ips = [{}]", allowed.join(", "));
        if let Some(seconds) = self.persistent_keepalive {
            let _ = writeln!(out, "persistent_keepalive = {seconds}");
        }
        out
    }
}

/// `s` as a TOML string, quoted and escaped by the `toml` crate (the parser's own rules).
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
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
    /// A router for `ns` running [`tailsk8s_binary`] (`$TAILSK8S_BIN` or the one beside this
    /// program).
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
    /// [`crate::binary::ROUTER_FLAGS_ENV`]).
    pub fn router_args(&self) -> Vec<OsString> {
        std::iter::once("router".into())
            .chain(router_flags().into_iter().map(OsString::from))
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
        process::run_to_exit(self.command()?, timeout)
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
}

impl Drop for ConfigRouter<'_> {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
            // Dropped here, so a panicking caller prints the log before the files go.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_read_back_as_written() {
        for s in ["plain/path", "a\"b\\c", "x\ny\u{1}", "it's", "'\"'"] {
            let doc = format!("v = {}", toml_string(s));
            let table: toml::Table = doc.parse().expect("valid TOML");
            assert_eq!(table["v"].as_str(), Some(s), "{doc}");
        }
    }

    #[test]
    fn config_file_renders_every_set_key_and_peer() {
        let mut config = ConfigFile::new("tsk9", Path::new("/k/private.key"));
        config.listen_port = Some(51820);
        config.mtu = Some(1380);
        config.fwmark = Some(0x1000_0000);
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
}
