//! Tests of the UAPI socket over real UNIX sockets in temporary directories, against the
//! device's own get/set on the real engine and real listen sockets ([`SocketDevice`]); and,
//! when `wg` is installed and we are root, driven by the real `wg` in `/var/run/wireguard`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, UdpSocket};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

use ipnet::IpNet;

use super::*;
use crate::config::{DeviceSnapshot, DeviceUpdate, PeerSnapshot, SetError};
use crate::control::SocketDevice;
use crate::key::Key;

static DIR_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temp dir, removed on drop (also on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let seq = DIR_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tsk-uapi-{}-{seq}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running server; stops it and waits for it on drop.
struct Running<D: DeviceControl + 'static = SocketDevice> {
    device: Arc<D>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<ServeExit>>,
    path: PathBuf,
}

impl Running {
    /// Serves a fresh [`SocketDevice`].
    fn start(server: UapiServer) -> Running {
        Running::start_with(server, Arc::new(SocketDevice::new()))
    }
}

impl<D: DeviceControl + 'static> Running<D> {
    fn start_with(server: UapiServer, device: Arc<D>) -> Running<D> {
        let stop = Arc::new(AtomicBool::new(false));
        let path = server.path().to_path_buf();
        let handle = server.serve(device.clone(), stop.clone()).unwrap();
        Running {
            device,
            stop,
            handle: Some(handle),
            path,
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn finish(mut self) -> ServeExit {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl<D: DeviceControl + 'static> Drop for Running<D> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends `request` and reads one reply (everything up to and including the blank line).
fn op(stream: &mut UnixStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    read_reply(stream)
}

fn read_reply(stream: &mut UnixStream) -> String {
    let mut reply = Vec::new();
    let mut buf = [0u8; 65536];
    while !reply.ends_with(b"\n\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "EOF before the end of the reply: {:?}",
            String::from_utf8_lossy(&reply)
        );
        reply.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(reply).unwrap()
}

/// Asserts that a get on `stream` is answered with success.
fn assert_served(stream: &mut UnixStream) {
    let reply = op(stream, "get=1\n\n");
    assert!(reply.ends_with("\nerrno=0\n\n"), "{reply:?}");
}

/// True when the server closed the connection (reads EOF).
fn closed(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(0))
}

fn key(byte: u8) -> Key {
    Key([byte; 32])
}

/// A UDP port nobody held a moment ago (the caller binds it again at once).
fn free_port() -> u16 {
    held_port().0
}

/// A UDP port (IPv4, all addresses), and the socket holding it.
fn held_port() -> (u16, UdpSocket) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    (socket.local_addr().unwrap().port(), socket)
}

#[test]
fn several_operations_on_one_connection() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let mut c = r.connect();
    let random_port = r.device.get().listen_port;
    assert_eq!(
        op(&mut c, "get=1\n\n"),
        format!("listen_port={random_port}\nerrno=0\n\n")
    );
    let (port, next_port) = (free_port(), free_port());
    let set = format!(
        "set=1\nprivate_key={}\nlisten_port={port}\npublic_key={}\nallowed_ip=198.19.1.0/24\n\n",
        key(0x11).to_hex(),
        key(2).to_hex()
    );
    assert_eq!(op(&mut c, &set), "errno=0\n\n");
    let got = op(&mut c, "get=1\n\n");
    let mut want = String::new();
    format_get(&r.device.get(), &mut want);
    assert_eq!(got, want);
    assert!(got.contains(&format!("listen_port={port}\n")), "{got}");
    assert_eq!(got.matches("public_key=").count(), 1, "{got}");
    assert!(
        got.contains(&format!("public_key={}\n", key(2).to_hex())),
        "{got}"
    );
    assert_eq!(got.matches("allowed_ip=").count(), 1, "{got}");
    assert!(got.contains("allowed_ip=198.19.1.0/24\n"), "{got}");
    // A second get on the same connection reads the same.
    assert_eq!(op(&mut c, "get=1\n\n"), got);
    // And a second set on the same connection still works.
    assert_eq!(
        op(&mut c, &format!("set=1\nlisten_port={next_port}\n\n")),
        "errno=0\n\n"
    );
    assert_eq!(r.device.get().listen_port, next_port);
    assert!(op(&mut c, "get=1\n\n").contains(&format!("listen_port={next_port}\n")));
    assert_eq!(r.finish(), ServeExit::Stopped);
}

#[test]
fn empty_partial_and_idle_connections_are_harmless() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let before = r.device.get();
    // What `wg` does before every command, far more often than the connection cap (64).
    for _ in 0..500 {
        drop(r.connect());
    }
    let mut c = r.connect();
    c.shutdown(Shutdown::Write).unwrap();
    assert!(closed(&mut c));
    // Half an operation, then gone (a set ended by EOF is applied, so none here).
    for partial in ["get=1\n", "get=", "set="] {
        let mut c = r.connect();
        c.write_all(partial.as_bytes()).unwrap();
    }
    // Connections that stay open and silent do not block others.
    let idle: Vec<UnixStream> = (0..20).map(|_| r.connect()).collect();
    let mut c = r.connect();
    let mut want = String::new();
    format_get(&before, &mut want);
    assert_eq!(op(&mut c, "get=1\n\n"), want);
    assert_eq!(r.device.get(), before);
    drop(idle);
}

#[test]
fn eof_terminates_a_set() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    // With the last line's newline and without it.
    for (newline, port) in [("\n", free_port()), ("", free_port())] {
        let request = format!("set=1\nlisten_port={port}{newline}");
        let mut c = r.connect();
        c.write_all(request.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_reply(&mut c), "errno=0\n\n");
        assert!(closed(&mut c));
        assert_eq!(r.device.get().listen_port, port);
    }
}

#[test]
fn malformed_set_changes_nothing_and_keeps_the_connection() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let mut c = r.connect();
    let before = r.device.get();
    let port = free_port();
    let bad = format!(
        "set=1\nlisten_port={port}\npublic_key={}\nallowed_ip=198.19.1.0/24\nbogus=1\nallowed_ip=198.19.2.0/24\n\n",
        key(2).to_hex()
    );
    assert_eq!(op(&mut c, &bad), format!("errno=-{}\n\n", libc::EINVAL));
    assert_eq!(r.device.get(), before);
    // A line far over the limit is discarded, not buffered, and also refused.
    let long = format!(
        "set=1\nlisten_port={port}\nfwmark={}\n\n",
        "1".repeat(1 << 20)
    );
    assert_eq!(op(&mut c, &long), format!("errno=-{}\n\n", libc::EINVAL));
    assert_eq!(r.device.get(), before);
    // The stream stayed in step: the next operation works.
    assert_eq!(
        op(&mut c, &format!("set=1\nlisten_port={port}\n\n")),
        "errno=0\n\n"
    );
    assert_eq!(r.device.get().listen_port, port);
}

#[test]
fn unknown_keys_and_bad_values_are_einval_and_change_nothing() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let p1 = Key::generate_private().public_key().to_hex();
    let p2 = Key::generate_private().public_key().to_hex();
    let set = format!(
        "set=1\nprivate_key={}\npublic_key={p1}\nallowed_ip=198.19.2.0/24\n\n",
        Key::generate_private().to_hex()
    );
    assert_eq!(op(&mut r.connect(), &set), "errno=0\n\n");
    let before = r.device.get();
    let new_private = Key::generate_private().to_hex();
    // Each request has valid lines before the bad one: a set is applied whole or not at all
    // (a documented choice), so none of them may leave a trace.
    let requests = [
        "set=1\nlisten_port=4000\nno_such_key=1\n\n".to_string(),
        format!("set=1\npublic_key={p2}\nallowed_ip=198.19.3.0/24\nbogus=true\n\n"),
        format!("set=1\nprivate_key={new_private}\nreplace_peers=true\nfwmark=nope\n\n"),
        "set=1\nlisten_port=70000\n\n".to_string(),
        "set=1\npublic_key=not-a-key\n\n".to_string(),
        format!("set=1\npublic_key={p1}\nreplace_allowed_ips=true\nallowed_ip=198.19.9.0/33\n\n"),
        format!("set=1\npublic_key={p1}\nendpoint=198.18.0.2\n\n"),
        format!("set=1\npublic_key={p1}\npersistent_keepalive_interval=-1\n\n"),
        "set=1\nreplace_peers=yes\n\n".to_string(),
        "set=1\nallowed_ip=198.19.2.0/24\n\n".to_string(),
    ];
    for request in &requests {
        let reply = op(&mut r.connect(), request);
        assert_eq!(reply, format!("errno=-{}\n\n", libc::EINVAL), "{request:?}");
        assert_eq!(r.device.get(), before, "{request:?} changed the device");
    }
}

#[test]
fn device_errors_are_negative_errnos() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let (taken, _blocker) = held_port();
    let before = r.device.get();
    let mut c = r.connect();
    let reply = op(&mut c, &format!("set=1\nlisten_port={taken}\n\n"));
    assert_eq!(reply, format!("errno=-{}\n\n", libc::EADDRINUSE));
    assert_eq!(r.device.get(), before);
}

#[test]
fn unknown_operation_closes_the_connection() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let before = r.device.get();
    for request in ["bogus=1\n\n", "get=2\n\n", "\n", "GET=1\n\n"] {
        let mut c = r.connect();
        c.write_all(request.as_bytes()).unwrap();
        assert!(closed(&mut c), "{request:?}");
    }
    let mut c = r.connect();
    c.write_all(format!("{}\n", "x".repeat(MAX_LINE_LEN * 2)).as_bytes())
        .unwrap();
    assert!(closed(&mut c));
    // Other connections are served as before.
    let mut want = String::new();
    format_get(&before, &mut want);
    assert_eq!(op(&mut r.connect(), "get=1\n\n"), want);
}

#[test]
fn get_with_trailing_data_is_refused() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let mut c = r.connect();
    assert_eq!(
        op(&mut c, "get=1\nlisten_port=1\n\n"),
        format!("errno=-{}\n\n", libc::EINVAL)
    );
    assert!(closed(&mut c));
}

/// 31,256 prefixes of every length class: IPv4 /32 and /24, IPv6 /128 and /64.
fn many_prefixes() -> BTreeSet<IpNet> {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let v6_base = u128::from("fd00:1::".parse::<Ipv6Addr>().unwrap());
    (0..20_000u32)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(base + i)), 32).unwrap())
        .chain(
            (0..=255u8).map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::new(198, 19, i, 0)), 24).unwrap()),
        )
        .chain(
            (0..10_000u128)
                .map(|i| IpNet::new(IpAddr::V6(Ipv6Addr::from(v6_base + i)), 128).unwrap()),
        )
        .chain((0..1_000u16).map(|i| {
            IpNet::new(
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x19, i, 0, 0, 0, 0, 0)),
                64,
            )
            .unwrap()
        }))
        .collect()
}

#[test]
fn big_config_round_trips_over_the_socket() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let ips = many_prefixes();
    assert!(ips.len() > 31_000);
    let mut set = format!(
        "set=1\nreplace_peers=true\npublic_key={}\n",
        key(1).to_hex()
    );
    for ip in &ips {
        set.push_str(&format!("allowed_ip={ip}\n"));
    }
    for p in 2..=40u8 {
        set.push_str(&format!(
            "public_key={}\nallowed_ip=fd00:40:{p:x}::/64\n",
            key(p).to_hex()
        ));
    }
    set.push('\n');
    let mut c = r.connect();
    assert_eq!(op(&mut c, &set), "errno=0\n\n");
    let got = op(&mut c, "get=1\n\n");
    assert_eq!(got.matches("public_key=").count(), 40);
    // The first peer's prefixes, exactly: none lost, none added.
    let first_peer = got
        .split("public_key=")
        .find(|block| block.starts_with(&key(1).to_hex()))
        .expect("the first peer");
    let back: BTreeSet<IpNet> = first_peer
        .lines()
        .filter_map(|line| line.strip_prefix("allowed_ip="))
        .map(|net| net.parse().unwrap())
        .collect();
    assert_eq!(back.len(), ips.len(), "allowed IPs lost or added");
    assert!(
        back == ips,
        "the allowed IPs read back differ from those set"
    );
    assert_eq!(got.matches("allowed_ip=").count(), ips.len() + 39);
}

#[test]
fn socket_and_directory_modes() {
    let dir = TempDir::new();
    let sub = dir.0.join("run").join("wireguard");
    let server = UapiServer::bind_in(&sub, "tsk0").unwrap();
    assert_eq!(server.path(), sub.join("tsk0.sock"));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&sub), 0o755);
    assert_eq!(mode(server.path()), 0o600);
    assert!(fs::symlink_metadata(server.path())
        .unwrap()
        .file_type()
        .is_socket());
    // Nothing but the socket is left in the directory (the staging dir is gone).
    let names: Vec<_> = fs::read_dir(&sub)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("tsk0.sock")]);
    // The public name reaches the listener that was bound under the staging name.
    UnixStream::connect(server.path()).unwrap();
    let path = server.path().to_path_buf();
    drop(server);
    assert!(!path.exists(), "the socket is removed on drop");
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new();
    let path = dir.0.join("tsk0.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert_eq!(
        UnixStream::connect(&path).unwrap_err().raw_os_error(),
        Some(libc::ECONNREFUSED)
    );
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let mut c = r.connect();
    assert_served(&mut c);
}

#[test]
fn live_socket_is_refused() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let err = UapiServer::bind_in(&dir.0, "tsk0").unwrap_err();
    assert!(
        matches!(&err, UapiError::InUse { path } if *path == r.path),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&r.path.display().to_string()), "{msg}");
    assert!(msg.contains("another process"), "{msg}");
    // The first server is untouched by the refused attempt (and its probe connection).
    let mut c = r.connect();
    assert_served(&mut c);
}

#[test]
fn other_files_are_not_replaced() {
    let dir = TempDir::new();
    let path = dir.0.join("tsk0.sock");
    fs::write(&path, b"keep me").unwrap();
    let err = UapiServer::bind_in(&dir.0, "tsk0").unwrap_err();
    assert!(matches!(err, UapiError::NotASocket { .. }), "{err:?}");
    assert_eq!(fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn invalid_names_are_refused() {
    let dir = TempDir::new();
    for name in [
        "",
        ".",
        "..",
        "a/b",
        "a:b",
        "a b",
        "sixteen-chars-xx",
        "a\0b",
    ] {
        let err = UapiServer::bind_in(&dir.0, name).unwrap_err();
        assert!(
            matches!(err, UapiError::InvalidName { .. }),
            "{name:?}: {err:?}"
        );
    }
    UapiServer::bind_in(&dir.0, "fifteen-chars-x").unwrap();
}

#[test]
fn ownership_is_lost_when_the_file_is_deleted() {
    let dir = TempDir::new();
    let server = UapiServer::bind_in(&dir.0, "tsk0").unwrap();
    let watch = server.watch();
    assert!(server.still_owned() && watch.still_owned());
    fs::remove_file(server.path()).unwrap();
    assert!(!server.still_owned() && !watch.still_owned());
}

#[test]
fn ownership_is_lost_when_the_file_is_replaced_and_the_new_one_survives() {
    let dir = TempDir::new();
    let server = UapiServer::bind_in(&dir.0, "tsk0").unwrap();
    fs::remove_file(server.path()).unwrap();
    let other = UnixListener::bind(server.path()).unwrap();
    assert!(!server.still_owned());
    let path = server.path().to_path_buf();
    drop(server);
    assert!(
        path.exists(),
        "a socket bound by someone else is left alone"
    );
    drop(other);
}

#[test]
fn serving_ends_when_the_socket_is_deleted() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    // An open idle connection must not delay the exit.
    let _idle = r.connect();
    fs::remove_file(&r.path).unwrap();
    let start = Instant::now();
    while !r.handle.as_ref().unwrap().is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server did not notice"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let mut r = r;
    assert_eq!(
        r.handle.take().unwrap().join().unwrap(),
        ServeExit::SocketLost
    );
}

#[test]
fn stop_is_prompt_with_open_connections_and_removes_the_socket() {
    let dir = TempDir::new();
    let r = Running::start(UapiServer::bind_in(&dir.0, "tsk0").unwrap());
    let mut busy = r.connect();
    busy.write_all(b"set=1\nlisten_port=5\n").unwrap(); // a set left unfinished
    let _idle = r.connect();
    // Connections are accepted in order: once a third is answered, both are being served.
    assert_served(&mut r.connect());
    let path = r.path.clone();
    let start = Instant::now();
    assert_eq!(r.finish(), ServeExit::Stopped);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(!path.exists());
    assert!(closed(&mut busy));
}

#[test]
fn idle_clients_are_dropped() {
    let dir = TempDir::new();
    let server = UapiServer::bind_in(&dir.0, "tsk0")
        .unwrap()
        .with_idle_timeout(Duration::from_millis(300));
    let r = Running::start(server);
    let mut c = r.connect();
    let start = Instant::now();
    assert!(closed(&mut c));
    assert!(start.elapsed() >= Duration::from_millis(250));
}

/// A server with room for one connection, and a client holding it.
fn one_slot_taken() -> (TempDir, Running, UnixStream) {
    let dir = TempDir::new();
    let server = UapiServer::bind_in(&dir.0, "tsk0")
        .unwrap()
        .with_max_connections(1);
    let r = Running::start(server);
    let mut first = r.connect();
    assert_served(&mut first);
    (dir, r, first)
}

#[test]
fn connections_over_the_cap_are_closed() {
    let (_dir, r, first) = one_slot_taken();
    // Closed once the wait for a slot runs out.
    let mut second = r.connect();
    assert!(closed(&mut second));
    drop(first);
    // Once the first is gone, a new connection is served again.
    let start = Instant::now();
    loop {
        let mut c = r.connect();
        let mut buf = [0u8; 64];
        // Until the first connection's slot is freed, the server may still close new ones.
        if c.write_all(b"get=1\n\n").is_ok() && matches!(c.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_connection_over_the_cap_waits_briefly_for_a_slot() {
    let (_dir, r, first) = one_slot_taken();
    // The first leaves shortly after the second arrives, as `wg`'s probes do.
    let leaving = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        drop(first);
    });
    let mut second = r.connect();
    assert_served(&mut second);
    leaving.join().unwrap();
}

#[test]
fn line_reader_splits_and_bounds_lines() {
    let flags = StopFlags {
        external: Arc::new(AtomicBool::new(false)),
        internal: Arc::new(AtomicBool::new(false)),
    };
    let input = format!(
        "a=1\n\n{}\n{}\nlast",
        "x".repeat(MAX_LINE_LEN),
        "y".repeat(MAX_LINE_LEN + 1)
    );
    let mut r = LineReader::new(input.as_bytes(), flags, DEFAULT_IDLE_TIMEOUT);
    let mut line = Vec::new();
    let mut next = |line: &mut Vec<u8>| r.next_line(line).unwrap();
    assert_eq!(next(&mut line), Line::Text);
    assert_eq!(line, b"a=1");
    assert_eq!(next(&mut line), Line::Text);
    assert!(line.is_empty());
    assert_eq!(next(&mut line), Line::Text);
    assert_eq!(line.len(), MAX_LINE_LEN);
    assert_eq!(next(&mut line), Line::TooLong);
    assert_eq!(next(&mut line), Line::Text);
    assert_eq!(line, b"last");
    assert_eq!(next(&mut line), Line::Eof);
}

// ---- the real `wg` ----

/// Skips (or, under `TAILSK8S_REQUIRE_NETNS=1`, fails) when the real `wg` cannot be used.
fn wg_usable() -> bool {
    let problem = if Command::new("wg").arg("--version").output().is_err() {
        Some("`wg` (wireguard-tools) is not installed")
    } else if unsafe { libc::geteuid() } != 0 {
        Some("not root (wg needs /var/run/wireguard)")
    } else {
        None
    };
    match problem {
        None => true,
        Some(why) if std::env::var("TAILSK8S_REQUIRE_NETNS").as_deref() == Ok("1") => {
            panic!("TAILSK8S_REQUIRE_NETNS=1 but {why}")
        }
        Some(why) => {
            eprintln!("skipping the real-wg test: {why}");
            false
        }
    }
}

fn wg(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("wg").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wg_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = wg(args);
    assert!(ok, "wg {args:?} failed: {stderr}");
    stdout
}

fn peer_of<'a>(state: &'a DeviceSnapshot, public_key: &Key) -> &'a PeerSnapshot {
    state
        .peers
        .iter()
        .find(|p| p.public_key == *public_key)
        .unwrap_or_else(|| panic!("peer {public_key:?} missing"))
}

/// The real device, showing one peer with a handshake time and counters as if traffic had
/// flowed (this test sends nothing): what `wg show` makes of them is under test.
struct AfterTraffic {
    device: SocketDevice,
    traffic: Mutex<Option<(Key, SystemTime, u64, u64)>>,
}

impl DeviceControl for AfterTraffic {
    fn get(&self) -> DeviceSnapshot {
        let mut state = self.device.get();
        if let Some((key, at, rx, tx)) = *self.traffic.lock().unwrap() {
            if let Some(peer) = state.peers.iter_mut().find(|p| p.public_key == key) {
                peer.last_handshake = Some(at);
                peer.rx_bytes = rx;
                peer.tx_bytes = tx;
            }
        }
        state
    }

    fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
        self.device.set(update)
    }
}

#[test]
fn real_wg_drives_the_server() {
    if !wg_usable() {
        return;
    }
    let name = format!("tsku{}", std::process::id());
    let files = TempDir::new();
    let device = Arc::new(AfterTraffic {
        device: SocketDevice::new(),
        traffic: Mutex::new(None),
    });
    let r = Running::start_with(UapiServer::bind(&name).unwrap(), device);
    let (port, next_port) = (free_port(), free_port());
    let private = Key::generate_private();
    // An unclamped spelling of the private key: `wg` must read back the clamped one.
    let mut unclamped = private;
    unclamped.0[0] |= 7;
    let psk = Key([0x5a; 32]);
    let peers: Vec<Key> = (0..41)
        .map(|_| Key::generate_private().public_key())
        .collect();
    let key_file = files.0.join("private");
    fs::write(&key_file, unclamped.to_base64()).unwrap();
    let psk_file = files.0.join("psk");
    fs::write(&psk_file, psk.to_base64()).unwrap();
    let p0 = peers[0].to_base64();

    // wg set
    wg_ok(&[
        "set",
        &name,
        "private-key",
        key_file.to_str().unwrap(),
        "listen-port",
        &port.to_string(),
        "fwmark",
        "0x20",
        "peer",
        &p0,
        "preshared-key",
        psk_file.to_str().unwrap(),
        "endpoint",
        "198.18.0.2:51820",
        "persistent-keepalive",
        "25",
        "allowed-ips",
        "198.19.1.0/24,fd00:1::/64",
    ]);
    let state = r.device.get();
    assert_eq!(state.private_key, Some(private));
    assert_eq!(state.listen_port, port);
    assert_eq!(state.fwmark, 0x20);
    let p = peer_of(&state, &peers[0]);
    assert_eq!(p.preshared_key, Some(psk));
    assert_eq!(p.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
    assert_eq!(p.persistent_keepalive, 25);
    assert_eq!(
        p.allowed_ips,
        vec![
            "198.19.1.0/24".parse().unwrap(),
            "fd00:1::/64".parse().unwrap()
        ]
    );

    // wg show: absolute handshake time and counters.
    let handshake = SystemTime::now() - Duration::from_secs(5);
    let handshake_sec = handshake
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    *r.device.traffic.lock().unwrap() = Some((peers[0], handshake, 1372, 1428));
    let dump = wg_ok(&["show", &name, "dump"]);
    let mut lines = dump.lines();
    let device: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(
        device,
        vec![
            private.to_base64(),
            private.public_key().to_base64(),
            port.to_string(),
            "0x20".into()
        ]
    );
    let peer: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(
        peer,
        vec![
            p0.clone(),
            psk.to_base64(),
            "198.18.0.2:51820".into(),
            "198.19.1.0/24,fd00:1::/64".into(),
            handshake_sec.to_string(),
            "1372".into(),
            "1428".into(),
            "25".into()
        ]
    );
    let human = wg_ok(&["show", &name]);
    assert!(human.contains("seconds ago"), "{human}");
    assert!(!human.contains("years"), "{human}");

    // wg showconf
    let conf = wg_ok(&["showconf", &name]);
    assert!(
        conf.contains(&format!("PrivateKey = {}", private.to_base64())),
        "{conf}"
    );
    assert!(conf.contains(&format!("ListenPort = {port}")), "{conf}");
    assert!(conf.contains("FwMark = 0x20"), "{conf}");
    assert!(
        conf.contains("AllowedIPs = 198.19.1.0/24, fd00:1::/64"),
        "{conf}"
    );

    // wg setconf: 40 peers, one with 31,256 prefixes of every length class; replaces
    // peers[0].
    let many = many_prefixes();
    let mut setconf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {next_port}\n",
        private.to_base64()
    );
    setconf.push_str(&format!(
        "[Peer]\nPublicKey = {}\nEndpoint = [fd00::3]:51822\n",
        peers[1].to_base64()
    ));
    let list: Vec<String> = many.iter().map(IpNet::to_string).collect();
    for chunk in list.chunks(100) {
        setconf.push_str(&format!("AllowedIPs = {}\n", chunk.join(", ")));
    }
    for (i, p) in peers[2..40].iter().enumerate() {
        setconf.push_str(&format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = fd00:40:{i:x}::/64\n",
            p.to_base64(),
        ));
    }
    let conf_file = files.0.join("setconf.conf");
    fs::write(&conf_file, &setconf).unwrap();
    wg_ok(&["setconf", &name, conf_file.to_str().unwrap()]);
    let state = r.device.get();
    assert_eq!(state.listen_port, next_port);
    assert_eq!(state.fwmark, 0, "setconf sends fwmark=0");
    assert_eq!(state.peers.len(), 39);
    assert!(state.peers.iter().all(|p| p.public_key != peers[0]));
    assert_eq!(peer_of(&state, &peers[1]).allowed_ips.len(), many.len());
    let shown = wg_ok(&["showconf", &name]);
    // The big peer's section of what `wg` read back, exactly: none lost, none added.
    let section = shown
        .split("[Peer]")
        .find(|s| s.contains(&format!("PublicKey = {}", peers[1].to_base64())))
        .expect("the big peer in showconf");
    let read_back: BTreeSet<IpNet> = section
        .lines()
        .filter_map(|line| line.strip_prefix("AllowedIPs = "))
        .flat_map(|list| list.split(", "))
        .map(|net| net.parse().unwrap())
        .collect();
    assert_eq!(read_back.len(), many.len(), "wg read back everything");
    assert!(
        read_back == many,
        "wg read back other prefixes than were set"
    );
    assert!(
        shown.contains("Endpoint = [fd00::3]:51822"),
        "IPv6 endpoint"
    );

    // wg addconf: adds the 40th peer, keeps the rest.
    let add_file = files.0.join("addconf.conf");
    fs::write(
        &add_file,
        format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = 198.19.200.0/24\n",
            peers[40].to_base64()
        ),
    )
    .unwrap();
    wg_ok(&["addconf", &name, add_file.to_str().unwrap()]);
    assert_eq!(r.device.get().peers.len(), 40);

    // wg syncconf: a get, then a diff, back to the setconf file.
    wg_ok(&["syncconf", &name, conf_file.to_str().unwrap()]);
    let state = r.device.get();
    assert_eq!(state.peers.len(), 39);
    assert!(state.peers.iter().all(|p| p.public_key != peers[40]));

    // wg set … remove, and an empty allowed-ips list.
    wg_ok(&["set", &name, "peer", &peers[2].to_base64(), "remove"]);
    wg_ok(&[
        "set",
        &name,
        "peer",
        &peers[3].to_base64(),
        "allowed-ips",
        "",
    ]);
    let state = r.device.get();
    assert_eq!(state.peers.len(), 38);
    assert!(peer_of(&state, &peers[3]).allowed_ips.is_empty());

    // An error from the device reaches the user as the errno's text.
    let (taken, _blocker) = held_port();
    let (ok, _, stderr) = wg(&["set", &name, "listen-port", &taken.to_string()]);
    assert!(!ok);
    assert!(stderr.contains("Address already in use"), "{stderr}");

    // private-key /dev/null removes the key.
    wg_ok(&["set", &name, "private-key", "/dev/null"]);
    assert_eq!(r.device.get().private_key, None);
    let dump = wg_ok(&["show", &name, "dump"]);
    assert!(dump.starts_with("(none)\t(none)\t"), "{dump}");

    // `wg show` lists the interface while it lives.
    assert!(wg_ok(&["show", "interfaces"])
        .split_whitespace()
        .any(|n| n == name));
    let path = r.path.clone();
    assert_eq!(r.finish(), ServeExit::Stopped);
    assert!(!path.exists());
}
