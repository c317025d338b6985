//! [`Netns`]: a named network namespace that exists exactly as long as its guard, and the
//! ways to run things inside it.
//!
//! Commands run through `ip netns exec` (or `ip -n` for `ip` itself). Sockets the calling
//! process needs inside a namespace are made by [`Netns::enter`], which runs a closure on a
//! fresh thread switched into the namespace with `setns`: a socket belongs to the namespace
//! it was created in, so it keeps working there after the thread ends.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::names;
use crate::process::{self, Daemon};
use crate::tools;

/// A network namespace `ip netns add`ed on creation and `ip netns del`eted on drop.
///
/// A fresh namespace has `lo` up and IPv6 duplicate address detection off (tests must not
/// wait for addresses to leave the tentative state).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `tsk-<pid>-<n>-<role>`; `role` says what it is in a topology ("n1", "n1p0").
    pub fn new(role: &str) -> anyhow::Result<Netns> {
        let name = names::netns_name(role);
        process::run(Command::new(tools::require("ip")?).args(["netns", "add", &name]))?;
        // From here on the guard deletes the namespace whatever fails next.
        let ns = Netns { name };
        ns.sysctl(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that keeps the namespace alive (`/run/netns/NAME`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs `program` (resolved to an absolute path) inside the namespace.
    pub fn command(&self, program: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(tools::require("ip")?);
        cmd.args(["netns", "exec", &self.name])
            .arg(tools::require(program)?);
        Ok(cmd)
    }

    /// A command that runs the executable at `path` inside the namespace.
    pub fn command_at(&self, path: &Path) -> anyhow::Result<Command> {
        let mut cmd = Command::new(tools::require("ip")?);
        cmd.args(["netns", "exec", &self.name]).arg(path);
        Ok(cmd)
    }

    /// Runs `program args…` inside the namespace; an error with its output if it fails.
    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<()> {
        self.output(program, args).map(drop)
    }

    /// Runs `program args…` inside the namespace and returns its stdout.
    pub fn output<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<String> {
        process::run(self.command(program)?.args(args))
    }

    /// Starts `program args…` inside the namespace as a [`Daemon`].
    pub fn spawn<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> anyhow::Result<Daemon> {
        let mut cmd = self.command(program)?;
        cmd.args(args);
        Daemon::spawn(&format!("{program} in {}", self.name), cmd)
    }

    /// `ip -n NAME args…`, returning stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        process::run(
            Command::new(tools::require("ip")?)
                .args(["-n", &self.name])
                .args(args),
        )
    }

    /// Runs several `ip` commands (one per line, without the leading `ip`) in one process:
    /// building a topology takes dozens of them.
    pub fn ip_batch<S: AsRef<str>>(&self, lines: &[S]) -> anyhow::Result<()> {
        let script: String = lines.iter().map(|l| format!("{}\n", l.as_ref())).collect();
        process::run_with_input(
            Command::new(tools::require("ip")?).args(["-n", &self.name, "-batch", "-"]),
            script.as_bytes(),
        )
        .with_context(|| format!("ip batch in {}:\n{script}", self.name))
        .map(drop)
    }

    /// Whether a TCP socket in this namespace listens on `port` (any address, IPv4 or
    /// IPv6): what a client must wait for before it connects to a server it just started.
    pub fn tcp_listening(&self, port: u16) -> anyhow::Result<bool> {
        // /proc/thread-self: the thread's namespace, where /proc/self/net would show the
        // process's.
        let tables = self.enter(|| {
            ["tcp", "tcp6"].map(|t| std::fs::read_to_string(format!("/proc/thread-self/net/{t}")))
        })?;
        let mut listening = false;
        for table in tables {
            listening |= lists_listener(&table.context("reading /proc/net/tcp")?, port);
        }
        Ok(listening)
    }

    /// Sets sysctls inside the namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> anyhow::Result<()> {
        let args: Vec<String> = std::iter::once("-q".to_string())
            .chain(std::iter::once("-w".to_string()))
            .chain(settings.iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        self.exec("sysctl", &args)
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result.
    /// Sockets created by `f` stay in this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = self.path();
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns only changes this thread's namespace; the fd is open for
                    // the whole call. The thread ends after `f`, so no other code ever
                    // runs in the switched thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let err = std::io::Error::last_os_error();
                        return Err(anyhow::anyhow!("setns into {} failed: {err}", self.name));
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread inside {} panicked", self.name))?
        })
    }
}

/// Whether a `/proc/net/tcp` or `tcp6` table has a socket in state LISTEN (`0A`) on `port`.
fn lists_listener(table: &str, port: u16) -> bool {
    let port = format!("{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1).and_then(|local| local.rsplit_once(':'));
        local_port.is_some_and(|(_, p)| p == port) && fields.get(3) == Some(&"0A")
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let result = tools::require("ip")
            .and_then(|ip| process::run(Command::new(ip).args(["netns", "del", &self.name])));
        if let Err(e) = result {
            eprintln!("cannot delete network namespace {}: {e:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 020213C6:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   \
             1: 020213C6:D431 030213C6:1451 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n";
        assert!(lists_listener(table, 5201));
        // An established connection to the port is no listener.
        assert!(!lists_listener(table, 54321));
        assert!(!lists_listener(table, 80));
    }
}
