//! Running external commands: one-shot commands whose failure becomes an error carrying
//! their output, runs expected to end on their own ([`run_to_exit`]), and [`Daemon`], the
//! guard for long-running processes.
//!
//! A daemon's stdout and stderr go to a scratch log file. When the guard drops it stops the
//! process (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]) and reaps it; if the thread is
//! panicking (a failed test) or `TAILSK8S_E2E_LOGS=1` it first prints the log, so a failure
//! shows what the router or wireguard-go said.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::names;

/// How long a daemon gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Set to `1` to print every daemon's log when it stops, not only on failure.
pub const SHOW_LOGS_ENV: &str = "TAILSK8S_E2E_LOGS";

/// `program args…` as a shell-like string, for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with no input; its stdout on success, otherwise an error
/// holding the command line, exit status, stdout and stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    run_with_input(cmd, &[])
}

/// Like [`run`], feeding `input` on stdin (e.g. `wg pubkey`, `ip -batch -`).
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> anyhow::Result<String> {
    let line = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // Input is small (keys, a few dozen `ip` lines), far below the pipe buffer, so
        // writing it all before reading the output cannot deadlock.
        stdin
            .write_all(input)
            .with_context(|| format!("cannot write stdin of `{line}`"))?;
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("cannot wait for `{line}`"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        anyhow::bail!(
            "`{line}` failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            stdout.trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(stdout)
}

/// A long-running child process, stopped and reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    label: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdin closed and stdout + stderr appended to a fresh log file.
    /// `label` names it in diagnostics (e.g. "wireguard-go tsk00012341 in tsk-1234-0-n1").
    ///
    /// The child gets SIGKILL if the thread that spawned it dies without dropping the guard
    /// (e.g. a test binary is killed), so call this from the thread that owns the guard.
    pub fn spawn(label: &str, mut cmd: Command) -> anyhow::Result<Daemon> {
        let log = names::scratch_file("daemon", "log")?;
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        // Logs are read as text: no terminal colour codes (tracing and others honour this).
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure only calls prctl, which is async-signal-safe, between fork
        // and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let line = describe(&cmd);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&log);
                return Err(e).with_context(|| format!("cannot start {label}: `{line}`"));
            }
        };
        Ok(Daemon {
            label: label.to_string(),
            child: Some(child),
            status: None,
            log,
        })
    }

    /// The name given at spawn.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The process id, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `Some(status)` once the process has exited (reaping it), `None` while it runs.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.status = Some(status);
                self.child = None;
            }
        }
        Ok(self.status)
    }

    /// Stops the process: SIGTERM, up to [`STOP_TIMEOUT`] to exit, then SIGKILL. Reaps it
    /// and returns its exit status; calling it again returns the same status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return self.status;
        };
        if let Ok(Some(status)) = child.try_wait() {
            self.status = Some(status);
            return self.status;
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child, so
            // it cannot have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return self.status;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!(
            "{} did not exit {STOP_TIMEOUT:?} after SIGTERM; killing it",
            self.label
        );
        let _ = child.kill();
        self.status = child.wait().ok();
        self.status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let status = self.stop();
        let show = std::thread::panicking() || std::env::var(SHOW_LOGS_ENV).is_ok_and(|v| v == "1");
        if show {
            let status = status.map_or_else(|| "unknown".to_string(), |s| s.to_string());
            eprintln!(
                "----- log of {} (exit: {status}) -----\n{}----- end of log -----",
                self.label,
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log);
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
        let line = describe(&cmd);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // Signal 0 checks existence. A reaped child's pid is gone unless reused, which
        // cannot happen within these few milliseconds in practice.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[test]
    fn run_returns_stdout() {
        let out = run(Command::new("sh").args(["-c", "echo hello"])).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[test]
    fn run_failure_carries_stderr_and_command() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("oops"), "{text}");
        assert!(text.contains("sh -c"), "{text}");
    }

    #[test]
    fn run_with_input_feeds_stdin() {
        assert_eq!(
            run_with_input(&mut Command::new("cat"), b"abc").unwrap(),
            "abc"
        );
    }

    #[test]
    fn daemon_is_terminated_and_reaped_on_drop_and_its_log_removed() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let daemon = Daemon::spawn("sleeper", cmd).unwrap();
        let pid = daemon.pid().unwrap();
        let log = daemon.log_path().to_path_buf();
        assert!(alive(pid));
        drop(daemon);
        assert!(!alive(pid), "daemon {pid} still alive after drop");
        assert!(!log.exists());
    }

    #[test]
    fn daemon_ignoring_sigterm_is_killed() {
        let mut cmd = Command::new("sh");
        // An ignored signal stays ignored across exec, so `sleep` itself ignores TERM.
        cmd.args(["-c", "trap '' TERM; exec sleep 30"]);
        let mut daemon = Daemon::spawn("stubborn", cmd).unwrap();
        // Once the shell has exec'd `sleep`, its trap is in place.
        let comm = format!("/proc/{}/comm", daemon.pid().unwrap());
        crate::wait::until("sh execs sleep", Duration::from_secs(5), || {
            Ok((std::fs::read_to_string(&comm)?.trim() == "sleep").then_some(()))
        })
        .unwrap();
        let started = Instant::now();
        let status = daemon.stop().expect("reaped");
        assert!(started.elapsed() >= STOP_TIMEOUT);
        assert!(!status.success());
    }

    #[test]
    fn daemon_log_captures_stdout_and_stderr_and_exit_is_seen() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 7"]);
        let mut daemon = Daemon::spawn("short", cmd).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = daemon.exited().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "short-lived daemon did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(7));
        let log = daemon.log();
        assert!(log.contains("out") && log.contains("err"), "{log}");
        assert_eq!(daemon.stop(), Some(status));
    }

    #[test]
    fn spawn_failure_is_an_error() {
        assert!(Daemon::spawn("nothing", Command::new("/nonexistent/tailsk8s")).is_err());
    }
}
