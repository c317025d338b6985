//! The wireguard-go-compatible entry point, so `wg-quick` can run tailsk8s unchanged:
//! `WG_QUICK_USERSPACE_IMPLEMENTATION=/usr/local/bin/tailsk8s-wg wg-quick up tsk0`, where
//! `tailsk8s-wg` is a symlink to the `tailsk8s` binary. Invoked under that name as
//! `tailsk8s-wg [-f|--foreground] IFNAME`, it does what `wireguard-go IFNAME` does: start the
//! router for IFNAME (UAPI only, no config file) and, unless `-f` or
//! `WG_PROCESS_FOREGROUND=1`, go to the background, returning success once the UAPI socket
//! is serving — or the router's one-line error and exit status 1.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::logging::{self, LogFormat};
use crate::router::RouterArgs;

/// The program name that selects this entry point.
pub const PROGRAM_NAME: &str = "tailsk8s-wg";

/// What the daemon writes to its parent once it is serving.
const READY: &[u8] = b"ready\n";

/// True when the process was started as [`PROGRAM_NAME`].
pub fn invoked_as_userspace_implementation() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == PROGRAM_NAME))
        .unwrap_or(false)
}

struct Invocation {
    ifname: String,
    foreground: bool,
}

fn parse(args: &[OsString]) -> anyhow::Result<Option<Invocation>> {
    let mut foreground = std::env::var_os("WG_PROCESS_FOREGROUND").is_some_and(|v| v == "1");
    let mut ifname = None;
    for arg in args {
        match arg.to_str() {
            Some("-f") | Some("--foreground") => foreground = true,
            Some("--version") | Some("-v") => {
                // A closed stdout (`| head -c0`) is the reader's choice, not a crash.
                let _ = writeln!(
                    std::io::stdout(),
                    "tailsk8s {} (wireguard-go compatible entry point)",
                    env!("CARGO_PKG_VERSION")
                );
                return Ok(None);
            }
            Some(name) if ifname.is_none() && !name.starts_with('-') => {
                ifname = Some(name.to_string())
            }
            _ => bail!("usage: {PROGRAM_NAME} [-f/--foreground] INTERFACE-NAME"),
        }
    }
    let ifname = ifname.context(format!(
        "usage: {PROGRAM_NAME} [-f/--foreground] INTERFACE-NAME"
    ))?;
    crate::config::check_ifname(&ifname)
        .map_err(|reason| anyhow::anyhow!("bad interface name {ifname:?}: {reason}"))?;
    Ok(Some(Invocation { ifname, foreground }))
}

/// Runs the entry point; the binary's `main` calls this when [`invoked_as_userspace_implementation`].
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let invocation = match parse(&args) {
        Ok(Some(invocation)) => invocation,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return fail(&e),
    };
    let router_args = RouterArgs {
        config: None,
        ifname: Some(invocation.ifname),
        workers: None,
        no_offload: false,
        worker_affinity: None,
        pod_cidrs: Vec::new(),
        node_name: None,
        cni_dir: crate::cni::DEFAULT_CNI_DIR.into(),
    };
    if invocation.foreground {
        let result =
            logging::init(None, LogFormat::Human).and_then(|()| crate::router::run(&router_args));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    // Fork before any thread exists; the parent waits for the daemon's word.
    let (mut from_daemon, to_parent) = match pipe() {
        Ok(fds) => fds,
        Err(e) => return fail(&e),
    };
    // SAFETY: single-threaded here (nothing has spawned a thread yet), so the child may
    // continue running ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => fail(&anyhow::anyhow!(std::io::Error::last_os_error()).context("fork")),
        0 => {
            drop(from_daemon);
            run_daemon(&router_args, File::from(to_parent))
        }
        _ => {
            drop(to_parent);
            // One line: "ready", or the error that stopped the daemon (EOF if it died).
            let mut word = Vec::new();
            let mut byte = [0u8; 1];
            while word.len() < 4096 {
                match from_daemon.read(&mut byte) {
                    Ok(1) => {
                        word.push(byte[0]);
                        if byte[0] == b'\n' {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            if word == READY {
                ExitCode::SUCCESS
            } else {
                let text = String::from_utf8_lossy(&word);
                let line = text.trim();
                if line.is_empty() {
                    eprintln!("{PROGRAM_NAME}: error: the daemon exited before it was ready");
                } else {
                    eprintln!("{PROGRAM_NAME}: error: {line}");
                }
                ExitCode::FAILURE
            }
        }
    }
}

fn run_daemon(args: &RouterArgs, to_parent: File) -> ExitCode {
    // SAFETY: setsid has no preconditions; it detaches from the caller's terminal session.
    unsafe { libc::setsid() };
    // Like wireguard-go's daemon, hold none of the caller's descriptors: `$(tailsk8s-wg X)`
    // must return. Errors before readiness travel through the pipe instead.
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: both descriptors are valid.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let mut parent = Some(to_parent);
    let result = logging::init(None, LogFormat::Human).and_then(|()| {
        crate::router::run_with(args, || {
            // Dropping the write end after the word closes the pipe: the parent returns.
            if let Some(mut pipe) = parent.take() {
                let _ = pipe.write_all(READY);
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(mut pipe) = parent.take() {
                let _ = writeln!(pipe, "{}", logging::one_line(&e));
            }
            ExitCode::FAILURE
        }
    }
}

fn pipe() -> anyhow::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("{PROGRAM_NAME}: error: {}", logging::one_line(err));
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_like_wireguard_go() {
        let inv = parse(&args(&["-f", "tsk9"])).unwrap().unwrap();
        assert_eq!((inv.ifname.as_str(), inv.foreground), ("tsk9", true));
        let inv = parse(&args(&["tsk9"])).unwrap().unwrap();
        assert_eq!(inv.ifname, "tsk9");
        assert!(parse(&args(&[])).is_err());
        assert!(parse(&args(&["a", "b"])).is_err());
        assert!(parse(&args(&["--bogus", "tsk9"])).is_err());
        assert!(parse(&args(&["much-too-long-interface"])).is_err());
    }
}
