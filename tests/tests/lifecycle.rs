//! End-to-end tests of the router process's life: it exits cleanly (exit 0, socket removed,
//! interface gone) on SIGINT and SIGTERM, when its TUN is deleted and when its socket file
//! is deleted; it replaces a stale socket and refuses a live one; and a start that cannot
//! succeed (no /dev/net/tun, no CAP_NET_ADMIN, a name too long) says why in one line on
//! stderr, exits non-zero and leaves nothing behind. Without CAP_BPF it starts, says why its
//! workers stay spread, and serves.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tailsk8s_e2e::config_router::{
    rules_for_table, run_to_exit, send_signal, socket_path, table_routes, uapi_get, wait_for_exit,
    wait_until_serving, Exited, EXIT_TIMEOUT, ROUTE_TABLE,
};
use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::process::after_inherited_fds_close;
use tailsk8s_e2e::threads::worker_threads;
use tailsk8s_e2e::wg::UAPI_DIR;
use tailsk8s_e2e::{names, require_netns, tailsk8s_binary, tools, Daemon, Impl, Netns, WgDevice};

/// How long a router that must refuse to start may take to do so.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `ns` has an interface called `ifname`.
fn has_link(ns: &Netns, ifname: &str) -> bool {
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    links
        .lines()
        .any(|line| line.split(':').nth(1).map(str::trim) == Some(ifname))
}

/// Entries of the UAPI directory that belong to `ifname`: its socket, or a temporary file
/// the router made while binding it.
fn uapi_entries(ifname: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(UAPI_DIR) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(ifname))
        .collect()
}

/// No interface, no socket (nor temporary socket file), no route and no rule of ours in
/// `ns`: what a stopped or refused router must leave.
fn assert_nothing_left(ns: &Netns, ifname: &str, what: &str) {
    assert!(
        !has_link(ns, ifname),
        "{what}: interface {ifname} left in {}",
        ns.name()
    );
    let entries = uapi_entries(ifname);
    assert!(
        entries.is_empty(),
        "{what}: left in {UAPI_DIR}: {entries:?}"
    );
    let routes = table_routes(ns, ROUTE_TABLE).unwrap();
    assert!(
        routes.is_empty(),
        "{what}: routes left in table {ROUTE_TABLE}: {routes:?}"
    );
    let rules = rules_for_table(ns, ROUTE_TABLE).unwrap();
    assert!(rules.is_empty(), "{what}: rules left: {rules:?}");
}

fn assert_exit_0(status: ExitStatus, daemon: &Daemon, what: &str) {
    assert_eq!(status.code(), Some(0), "{what}: {status}\n{}", daemon.log());
}

/// A router started without config, driven by `wg` like wireguard-go.
fn plain_router(ns: &Netns) -> WgDevice<'_> {
    WgDevice::start(Impl::Tailsk8s, ns).unwrap()
}

/// `ip netns exec NS tailsk8s router ARGS…` with `prefix` (e.g. setpriv) in between.
fn router_command(ns: &Netns, prefix: &[&str], args: &[&str]) -> Command {
    let binary = tailsk8s_binary().unwrap();
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut cmd = ns.command(program).unwrap();
            cmd.args(rest).arg(&binary);
            cmd
        }
        None => ns.command_at(&binary).unwrap(),
    };
    cmd.arg("router").args(args);
    cmd
}

/// The line of `run`'s stderr that reports the error, checked to say `cause`.
fn error_line<'e>(run: &'e Exited, cause: &[&str]) -> &'e str {
    let line = run
        .stderr_lines()
        .into_iter()
        .find(|line| line.contains("error"))
        .unwrap_or_else(|| panic!("no error line on stderr: {:?}", run.stderr));
    for word in cause {
        assert!(
            line.contains(word),
            "error line does not say {word:?}: {line}"
        );
    }
    line
}

fn assert_refused(run: &Exited, what: &str) {
    assert!(
        !run.status.success(),
        "{what}: the router started ({}); stderr:\n{}",
        run.status,
        run.stderr
    );
}

#[test]
fn sigint_stops_the_router_cleanly() {
    if !require_netns() {
        return;
    }
    stops_cleanly_on(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_stops_the_router_cleanly() {
    if !require_netns() {
        return;
    }
    stops_cleanly_on(libc::SIGTERM, "SIGTERM");
}

fn stops_cleanly_on(signal: libc::c_int, what: &str) {
    let ns = Netns::new("sig").unwrap();
    let mut device = plain_router(&ns);
    let ifname = device.ifname().to_string();
    assert!(has_link(&ns, &ifname) && device.socket_path().exists());
    send_signal(device.daemon_mut(), signal).unwrap();
    let status = wait_for_exit(device.daemon_mut(), EXIT_TIMEOUT).unwrap();
    assert_exit_0(status, device.daemon_mut(), what);
    assert_nothing_left(&ns, &ifname, what);
}

#[test]
fn deleting_the_tun_stops_the_router_cleanly() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("tundel").unwrap();
    let mut device = plain_router(&ns);
    let ifname = device.ifname().to_string();
    ns.ip(&["link", "del", &ifname]).unwrap();
    let status = wait_for_exit(device.daemon_mut(), EXIT_TIMEOUT).unwrap();
    assert_exit_0(status, device.daemon_mut(), "TUN deleted");
    assert_nothing_left(&ns, &ifname, "TUN deleted");
}

#[test]
fn deleting_the_socket_file_stops_the_router_cleanly() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("sockdel").unwrap();
    let mut device = plain_router(&ns);
    let ifname = device.ifname().to_string();
    fs::remove_file(device.socket_path()).unwrap();
    let status = wait_for_exit(device.daemon_mut(), EXIT_TIMEOUT).unwrap();
    assert_exit_0(status, device.daemon_mut(), "socket deleted");
    assert_nothing_left(&ns, &ifname, "socket deleted");
}

#[test]
fn a_stale_socket_is_replaced() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("stale").unwrap();
    let ifname = names::ifname().unwrap();
    let path = socket_path(&ifname);
    fs::create_dir_all(UAPI_DIR).unwrap();
    // A socket file nobody listens on, as a crashed daemon leaves it (dropping a listener
    // does not unlink its path).
    drop(UnixListener::bind(&path).unwrap());
    let stale = fs::metadata(&path).unwrap();
    assert!(stale.file_type().is_socket());
    assert!(
        after_inherited_fds_close(|| UnixStream::connect(&path).is_err()),
        "the stale socket accepts"
    );

    let mut cmd = router_command(&ns, &[], &[&ifname]);
    cmd.env("NO_COLOR", "1");
    let mut daemon = Daemon::spawn(&format!("tailsk8s router {ifname}"), cmd).unwrap();
    // Removes the socket even if the test fails before the router did.
    let _cleanup = RemoveOnDrop(path.clone());
    wait_until_serving(&mut daemon, &ifname).unwrap();
    let answer = uapi_get(&ifname).unwrap();
    assert!(answer.contains("listen_port="), "{answer}");
    assert!(has_link(&ns, &ifname));

    send_signal(&daemon, libc::SIGTERM).unwrap();
    let status = wait_for_exit(&mut daemon, EXIT_TIMEOUT).unwrap();
    assert_exit_0(status, &daemon, "after replacing a stale socket");
    assert_nothing_left(&ns, &ifname, "after replacing a stale socket");
}

#[test]
fn without_cap_bpf_the_router_says_so_and_serves_with_spread_workers() {
    if !require_netns_with(&[("setpriv", "util-linux")]) {
        return;
    }
    let ns = Netns::new("nobpf").unwrap();
    let ifname = names::ifname().unwrap();
    // Root without the capabilities that load BPF programs (CAP_SYS_ADMIN also would).
    let drop = "-bpf,-sys_admin,-perfmon";
    let prefix = [
        "setpriv",
        &format!("--inh-caps={drop}"),
        &format!("--bounding-set={drop}"),
    ];
    let mut cmd = router_command(&ns, &prefix, &["--workers", "2", &ifname]);
    cmd.env("NO_COLOR", "1");
    let mut daemon =
        Daemon::spawn(&format!("tailsk8s router {ifname} without CAP_BPF"), cmd).unwrap();
    wait_until_serving(&mut daemon, &ifname).unwrap();
    assert!(uapi_get(&ifname).unwrap().contains("listen_port="));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        // The workers run, spread: no thread is held to one CPU.
        let pid = daemon.pid().expect("running");
        let workers = worker_threads(pid);
        assert_eq!(
            workers.len(),
            4,
            "two workers, two threads each: {workers:?}"
        );
        assert!(
            workers.iter().all(|t| !t.on_one_cpu()),
            "pinned without CAP_BPF: {workers:?}"
        );
        // And it tried, and warned saying why: the kernel's own reason (EPERM), not our
        // wording, in a line at warning level (README: "logs a warning").
        let log = daemon.log();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("Operation not permitted")),
            "{log}"
        );
    }
    send_signal(&daemon, libc::SIGTERM).unwrap();
    let status = wait_for_exit(&mut daemon, EXIT_TIMEOUT).unwrap();
    assert_exit_0(status, &daemon, "without CAP_BPF");
    assert_nothing_left(&ns, &ifname, "without CAP_BPF");
}

/// Removes a path on drop (for sockets a test makes itself).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn a_live_socket_is_a_clear_error_and_stays_untouched() {
    if !require_netns() {
        return;
    }
    let (first_ns, second_ns) = (Netns::new("live1").unwrap(), Netns::new("live2").unwrap());
    let mut first = plain_router(&first_ns);
    let ifname = first.ifname().to_string();
    let socket = first.socket_path();
    let inode_before = fs::metadata(&socket).unwrap().ino_and_dev();

    // The same interface name in another namespace: the socket directory is host-wide.
    let run = run_to_exit(router_command(&second_ns, &[], &[&ifname]), REFUSE_TIMEOUT).unwrap();
    assert_eq!(run.status.code(), Some(1), "stderr:\n{}", run.stderr);
    let lines = run.stderr_lines();
    assert_eq!(lines.len(), 1, "stderr is not one line: {lines:?}");
    assert!(lines[0].starts_with("tailsk8s: error: "), "{}", lines[0]);
    error_line(&run, &[&socket.to_string_lossy(), "another process"]);
    assert!(
        !has_link(&second_ns, &ifname),
        "the refused router made a TUN"
    );

    // The first router keeps its socket (the very same file) and keeps serving.
    assert_eq!(fs::metadata(&socket).unwrap().ino_and_dev(), inode_before);
    let dump = first.dump().unwrap();
    assert_eq!(
        dump.interface.public_key.as_deref(),
        Some(first.public_key())
    );
    assert!(
        first.daemon_mut().exited().unwrap().is_none(),
        "first router died"
    );
    assert!(has_link(&first_ns, &ifname));
}

trait InodeAndDevice {
    fn ino_and_dev(&self) -> (u64, u64);
}

impl InodeAndDevice for fs::Metadata {
    fn ino_and_dev(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        (self.ino(), self.dev())
    }
}

// ---------------------------------------------------------------------------------------------
// Start errors

/// One way to make the start impossible, and what the error line must name.
struct StartError {
    what: &'static str,
    /// Command prefix run inside the node namespace before the binary.
    prefix: Vec<String>,
    /// Interface name to ask for (`None`: a fresh valid one).
    ifname: Option<String>,
    cause: &'static [&'static str],
}

/// `sh -c` that mounts an empty tmpfs over /dev/net — in a private mount namespace made
/// by `unshare --mount`, so the host's /dev/net/tun is untouched — then runs the binary.
fn without_dev_net_tun() -> StartError {
    StartError {
        what: "no /dev/net/tun",
        prefix: vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            tools::require("sh").unwrap().to_string_lossy().into_owned(),
            "-c".into(),
            "mount -t tmpfs none /dev/net && exec \"$0\" \"$@\"".into(),
        ],
        ifname: None,
        cause: &["/dev/net/tun"],
    }
}

/// Root, but with CAP_NET_ADMIN dropped from the bounding and inheritable sets (so exec
/// does not give it back).
fn without_cap_net_admin() -> StartError {
    StartError {
        what: "no CAP_NET_ADMIN",
        prefix: [
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
        ]
        .map(String::from)
        .to_vec(),
        ifname: None,
        cause: &["CAP_NET_ADMIN"],
    }
}

/// An unprivileged user: no capabilities at all.
fn as_nobody() -> StartError {
    StartError {
        what: "unprivileged user",
        prefix: [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]
        .map(String::from)
        .to_vec(),
        ifname: None,
        cause: &["Permission denied"],
    }
}

/// 16 characters: one more than Linux allows.
fn name_too_long() -> StartError {
    StartError {
        what: "interface name too long",
        prefix: Vec::new(),
        ifname: Some(format!("tsk{:013}", std::process::id())),
        cause: &["longer than 15"],
    }
}

/// Runs the router as `case` says inside a fresh namespace; returns the run, the namespace
/// and the interface name it asked for.
fn start_failing(case: &StartError) -> (Exited, Netns, String) {
    let ns = Netns::new("fail").unwrap();
    let ifname = case
        .ifname
        .clone()
        .unwrap_or_else(|| names::ifname().unwrap());
    let prefix: Vec<&str> = case.prefix.iter().map(String::as_str).collect();
    let run = run_to_exit(router_command(&ns, &prefix, &[&ifname]), REFUSE_TIMEOUT).unwrap();
    (run, ns, ifname)
}

fn fails_cleanly(case: &StartError) {
    let (run, ns, ifname) = start_failing(case);
    assert_refused(&run, case.what);
    error_line(&run, case.cause);
    assert_nothing_left(&ns, &ifname, case.what);
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(
        links.lines().count(),
        1,
        "{}: links left: {links}",
        case.what
    );
}

#[test]
fn no_dev_net_tun_is_a_clear_error_and_leaves_nothing() {
    if !require_netns_with(&[("unshare", "util-linux"), ("sh", "dash")]) {
        return;
    }
    fails_cleanly(&without_dev_net_tun());
    // The tmpfs stayed in the private mount namespace.
    assert!(std::path::Path::new("/dev/net/tun").exists());
}

#[test]
fn no_cap_net_admin_is_a_clear_error_and_leaves_nothing() {
    if !require_netns_with(&[("setpriv", "util-linux")]) {
        return;
    }
    fails_cleanly(&without_cap_net_admin());
}

#[test]
fn an_unprivileged_user_gets_a_clear_error_and_nothing_is_left() {
    if !require_netns_with(&[("setpriv", "util-linux")]) {
        return;
    }
    fails_cleanly(&as_nobody());
}

#[test]
fn a_too_long_interface_name_is_a_clear_error_and_leaves_nothing() {
    if !require_netns() {
        return;
    }
    let case = name_too_long();
    assert_eq!(
        case.ifname.as_deref().map(str::len),
        Some(names::IFNAME_MAX + 1)
    );
    fails_cleanly(&case);
}

/// The wording: a start error is ONE line on stderr, the program's own
/// `tailsk8s: error: …` line, and nothing else (no log lines, no usage text).
#[test]
fn start_errors_are_exactly_one_line_on_stderr() {
    if !require_netns_with(&[("unshare", "util-linux"), ("setpriv", "util-linux")]) {
        return;
    }
    let mut failures = Vec::new();
    for case in [
        without_dev_net_tun(),
        without_cap_net_admin(),
        as_nobody(),
        name_too_long(),
    ] {
        let (run, _ns, _ifname) = start_failing(&case);
        assert_refused(&run, case.what);
        let lines = run.stderr_lines();
        let one_line = matches!(lines.as_slice(), [line] if line.starts_with("tailsk8s: error: "));
        if !one_line {
            failures.push(format!("{} ({}): {lines:#?}", case.what, run.status));
        }
    }
    assert!(
        failures.is_empty(),
        "stderr is not exactly one `tailsk8s: error: …` line:\n{}",
        failures.join("\n")
    );
}
