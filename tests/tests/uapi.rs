//! The UAPI rules of `shared/reference/wireguard-uapi.md`, proved against the real router
//! process (`tailsk8s router IFNAME` in a namespace), driven by the real `wg` and, where `wg`
//! cannot say it, by raw UAPI text over the UNIX socket from this process (the socket
//! directory is host-wide, so no `setns` is needed to reach it).
//!
//! Themes, in file order: errors (negative errno, nothing changed), handshake time and wire
//! byte counters, keys, peer-set semantics, connection handling, large configurations,
//! low-order public keys, and the wireguard-go compatible entry point used by `wg-quick`.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::process::after_inherited_fds_close;
use tailsk8s_e2e::{
    names, ping, ping_with_deadline, process, require_netns, tailsk8s_binary, tools, wg::UAPI_DIR,
    Daemon, Impl, Netns, PeerDump, PeerSpec, TopologyBuilder, WgDevice, WgDump,
};

// ---------------------------------------------------------------------------------------
// Raw UAPI over the socket
// ---------------------------------------------------------------------------------------

/// How long a raw client waits for any reply bytes.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// One reply: its `key=value` lines (without the final `errno`) and the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    pairs: Vec<(String, String)>,
    errno: i64,
}

impl Reply {
    /// Every value of `key`, in order.
    fn values(&self, key: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of `key`.
    fn value(&self, key: &str) -> Option<&str> {
        self.values(key).first().copied()
    }
}

/// A raw UAPI connection, as `wg` opens one.
struct Uapi {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Uapi {
    fn connect(socket: &Path) -> Uapi {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        let writer = stream.try_clone().unwrap();
        Uapi {
            reader: BufReader::new(stream),
            writer,
        }
    }

    fn send(&mut self, text: &str) {
        self.writer
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("cannot send {text:?}: {e}"));
    }

    /// Reads one reply: lines up to the blank line; the last one must be `errno=N`.
    fn reply(&mut self) -> Reply {
        let mut pairs = Vec::new();
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("reading a reply after {pairs:?}: {e}"));
            assert!(
                n > 0,
                "connection closed in the middle of a reply: {pairs:?}"
            );
            let line = line
                .strip_suffix('\n')
                .unwrap_or_else(|| panic!("reply line without newline: {line:?}"));
            if line.is_empty() {
                break;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("reply line without '=': {line:?}"));
            pairs.push((key.to_string(), value.to_string()));
        }
        let (key, value) = pairs.pop().expect("an empty reply");
        assert_eq!(key, "errno", "a reply must end with errno: {pairs:?}");
        let errno = value
            .parse()
            .unwrap_or_else(|_| panic!("errno {value:?} is not a number"));
        Reply { pairs, errno }
    }

    fn request(&mut self, text: &str) -> Reply {
        self.send(text);
        self.reply()
    }

    /// Reads until the server closes; everything it still sent. Fails if it stays open.
    fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => rest,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept the connection open for {REPLY_TIMEOUT:?}: {rest:?}")
            }
            // A reset also means the server closed it.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => rest,
            Err(e) => panic!("reading until close: {e}"),
        }
    }
}

/// One operation on its own connection.
fn uapi(device: &WgDevice, text: &str) -> Reply {
    Uapi::connect(&device.socket_path()).request(text)
}

fn uapi_get(device: &WgDevice) -> Reply {
    let reply = uapi(device, "get=1\n\n");
    assert_eq!(reply.errno, 0, "get failed: {reply:?}");
    reply
}

// ---------------------------------------------------------------------------------------
// Keys: `wg` speaks base64, UAPI lowercase hex
// ---------------------------------------------------------------------------------------

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.trim().trim_end_matches('=').bytes() {
        let value = BASE64
            .iter()
            .position(|&b| b == c)
            .unwrap_or_else(|| panic!("{text:?} is not base64"));
        bits = bits << 6 | value as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

/// A base64 key (`wg`) in the UAPI spelling.
fn hex(key_base64: &str) -> String {
    let bytes = base64_decode(key_base64);
    assert_eq!(bytes.len(), 32, "{key_base64:?} is not a 32-byte key");
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A UAPI hex key in `wg`'s base64 spelling.
fn base64(key_hex: &str) -> String {
    assert_eq!(key_hex.len(), 64, "{key_hex:?} is not a hex key");
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    base64_encode(&bytes)
}

#[derive(Debug, Clone)]
struct KeyPair {
    private: String,
    public: String,
}

fn wg_command() -> Command {
    Command::new(tools::require("wg").unwrap())
}

/// A fresh key pair from `wg genkey` / `wg pubkey`.
fn keypair() -> KeyPair {
    let private = process::run(wg_command().arg("genkey")).unwrap();
    KeyPair {
        public: pubkey(&private),
        private: private.trim().to_string(),
    }
}

fn pubkey(private: &str) -> String {
    process::run_with_input(wg_command().arg("pubkey"), private.as_bytes())
        .unwrap()
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A file this test owns, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    /// Writes `text` to a fresh 0600 file (wg-quick warns about readable configs).
    fn with(stem: &str, extension: &str, text: &str) -> Scratch {
        let path = names::scratch_file(stem, extension).unwrap();
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
        Scratch(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `tailsk8s router IFNAME` in `ns`, answering `wg`, with a fresh private key.
fn router(ns: &Netns) -> WgDevice<'_> {
    WgDevice::start(Impl::Tailsk8s, ns).unwrap_or_else(|e| panic!("starting the router: {e:#}"))
}

/// A namespace with a stand-in underlay: `d0` (198.18.0.1/24, fd00:18::1/64), one end of a
/// veth pair whose other end `d1` has no address. Endpoints in those subnets are routable,
/// and whatever is sent to them vanishes at `d1` (no ARP or neighbour discovery either:
/// this kernel has no `dummy` driver).
fn netns_with_sink(role: &str) -> Netns {
    let ns = Netns::new(role).unwrap();
    ns.ip_batch(&[
        "link add d0 type veth peer name d1",
        "link set d0 arp off",
        "addr add 198.18.0.1/24 dev d0",
        "addr add fd00:18::1/64 dev d0 nodad",
        "link set d1 up",
        "link set d0 up",
    ])
    .unwrap();
    ns
}

fn dump(device: &WgDevice) -> WgDump {
    device
        .dump()
        .unwrap_or_else(|e| panic!("wg show dump: {e:#}"))
}

fn peer<'d>(dump: &'d WgDump, public: &str) -> &'d PeerDump {
    dump.peer(public)
        .unwrap_or_else(|| panic!("peer {public} missing from {dump:#?}"))
}

fn peer_keys(dump: &WgDump) -> BTreeSet<String> {
    dump.peers.iter().map(|p| p.public_key.clone()).collect()
}

fn nets(list: &[&str]) -> BTreeSet<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn allowed(peer: &PeerDump) -> BTreeSet<IpNet> {
    peer.allowed_ips.iter().copied().collect()
}

fn assert_running(device: &mut WgDevice) {
    let daemon = device.daemon_mut();
    let exited = daemon.exited().unwrap();
    assert!(
        exited.is_none(),
        "{} exited ({exited:?}):\n{}",
        daemon.label(),
        daemon.log()
    );
}

/// Polls `probe` every 50 ms until it returns `Some`, or panics after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn peer_spec(public: &str, endpoint: Option<&str>, allowed_ips: &[&str]) -> PeerSpec {
    PeerSpec {
        public_key: public.to_string(),
        endpoint: endpoint.map(|e| e.parse().unwrap()),
        allowed_ips: allowed_ips.iter().map(|n| n.parse().unwrap()).collect(),
        persistent_keepalive: None,
    }
}

// ---------------------------------------------------------------------------------------
// Errors: a negative errno, and nothing changed
// ---------------------------------------------------------------------------------------

#[test]
fn a_listen_port_in_use_is_a_negative_errno_and_changes_nothing() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    device.set_listen_port(51820).unwrap();
    let blocker = ns
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 51999)))
        .unwrap()
        .expect("port 51999 is free in a fresh namespace");
    let before = dump(&device);
    let newcomer = keypair().public;

    // `wg` shows the negative errno as its message. The peer in the same set must not be
    // added: the set failed (whether it stops at the first error or is all-or-nothing).
    let err = device
        .set(&[
            "listen-port",
            "51999",
            "peer",
            &newcomer,
            "allowed-ips",
            "198.19.2.0/24",
        ])
        .expect_err("the port is taken");
    assert!(
        format!("{err:#}").contains("Address already in use"),
        "wg did not show EADDRINUSE: {err:#}"
    );
    let raw = uapi(&device, "set=1\nlisten_port=51999\n\n");
    assert_eq!(raw.errno, -i64::from(libc::EADDRINUSE), "{raw:?}");
    assert_eq!(dump(&device), before, "a failed set changed the device");
    // Still bound to the old port, not merely reporting it.
    let old = ns
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 51820)))
        .unwrap();
    assert!(
        old.is_err_and(|e| e.kind() == ErrorKind::AddrInUse),
        "the router no longer holds port 51820"
    );

    // Once the port is free the same request succeeds: the error was about the port.
    drop(blocker);
    let mut last = None;
    let took = after_inherited_fds_close(|| {
        let raw = uapi(&device, "set=1\nlisten_port=51999\n\n");
        let ok = raw.errno == 0;
        last = Some(raw);
        ok
    });
    assert!(took, "the freed port was still refused: {last:?}");
    assert_eq!(dump(&device).interface.listen_port, 51999);
}

#[test]
fn unknown_keys_and_bad_values_are_einval_and_change_nothing() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let mut device = router(&ns);
    device.set_listen_port(51820).unwrap();
    let p1 = keypair().public;
    let p2 = hex(&keypair().public);
    device
        .set_peer(&peer_spec(&p1, None, &["198.19.2.0/24"]))
        .unwrap();
    let before = dump(&device);
    let p1 = hex(&p1);
    let new_private = hex(&keypair().private);

    // Each request has valid lines before the bad one: the router applies a set whole or
    // not at all (a documented choice), so none of them may leave a trace.
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
        let reply = uapi(&device, request);
        assert_eq!(
            reply.errno,
            -i64::from(libc::EINVAL),
            "{request:?} → {reply:?}"
        );
        assert_eq!(dump(&device), before, "{request:?} changed the device");
    }
    assert_running(&mut device);
}

// ---------------------------------------------------------------------------------------
// Handshake time and wire byte counters
// ---------------------------------------------------------------------------------------

const INITIATION: u64 = 148;
const RESPONSE: u64 = 92;
const KEEPALIVE: u64 = 32;
/// A default `ping` (84-byte IPv4 packet) padded to 96, plus header and tag.
const PING_MESSAGE: u64 = 96 + 32;

#[test]
fn handshake_time_is_absolute_and_counters_count_wire_bytes() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(2).pods_per_node(1).build().unwrap();
    let [n1, n2] = topo.nodes() else {
        panic!("two nodes")
    };
    let a = router(n1.netns());
    let b = router(n2.netns());
    for (device, remote) in [(&a, n2), (&b, n1)] {
        device.set_listen_port(51820).unwrap();
        device.link_up(1420).unwrap();
        device.route(&remote.pod_cidr_v4().into()).unwrap();
    }
    let b_endpoint = SocketAddr::new(n2.underlay_v4().into(), 51820).to_string();
    let b_cidr = n2.pod_cidr_v4().to_string();
    // B cannot initiate: it has no endpoint for A.
    b.set_peer(&peer_spec(
        a.public_key(),
        None,
        &[&n1.pod_cidr_v4().to_string()],
    ))
    .unwrap();
    a.set_peer(&peer_spec(b.public_key(), Some(&b_endpoint), &[&b_cidr]))
        .unwrap();
    assert_eq!(peer(&dump(&a), b.public_key()).latest_handshake, None);

    // Turning persistent keepalive on sends a keepalive at once, which needs a handshake.
    let before = unix_now();
    a.set(&["peer", b.public_key(), "persistent-keepalive", "25"])
        .unwrap();
    let (on_a, on_b) = wait_for(Duration::from_secs(5), "handshake and keepalive", || {
        let on_a = peer(&dump(&a), b.public_key()).clone();
        let on_b = peer(&dump(&b), a.public_key()).clone();
        (on_a.latest_handshake.is_some()
            && on_b.latest_handshake.is_some()
            && on_b.rx_bytes > INITIATION)
            .then_some((on_a, on_b))
    });
    let after = unix_now();
    for (side, seen) in [("initiator", &on_a), ("responder", &on_b)] {
        let at = seen.latest_handshake.unwrap();
        assert!(
            before.saturating_sub(1) <= at && at <= after + 1,
            "{side}: latest handshake {at} is not between {before} and {after} (Unix time)"
        );
    }
    let raw = uapi_get(&a);
    assert_eq!(
        raw.value("last_handshake_time_sec"),
        Some(on_a.latest_handshake.unwrap().to_string().as_str())
    );
    let nsec: u64 = raw
        .value("last_handshake_time_nsec")
        .unwrap()
        .parse()
        .unwrap();
    assert!(nsec < 1_000_000_000, "nsec {nsec}");

    // A handshake alone: the initiator sent its initiation and then the keepalive, the
    // responder only its response. Everything one side sent, the other received (a veth loses
    // nothing).
    std::thread::sleep(Duration::from_millis(300));
    let (on_a, on_b) = (
        peer(&dump(&a), b.public_key()).clone(),
        peer(&dump(&b), a.public_key()).clone(),
    );
    eprintln!(
        "after the handshake: initiator tx {} rx {}, responder tx {} rx {}",
        on_a.tx_bytes, on_a.rx_bytes, on_b.tx_bytes, on_b.rx_bytes
    );
    assert_eq!(on_a.rx_bytes, RESPONSE, "initiator rx: {on_a:?}");
    assert_eq!(on_b.tx_bytes, RESPONSE, "responder tx: {on_b:?}");
    assert_eq!(
        on_a.tx_bytes,
        INITIATION + KEEPALIVE,
        "initiator tx is not one initiation and the one keepalive: {on_a:?}"
    );
    assert_eq!(
        on_a.tx_bytes, on_b.rx_bytes,
        "sent ≠ received: {on_a:?} {on_b:?}"
    );

    // Data: every ping is one 128-byte message each way.
    ping(n1.pods()[0].netns(), n2.pods()[0].ipv4().into(), 3).unwrap();
    let (a2, b2) = wait_for(Duration::from_secs(2), "counters agree", || {
        let a2 = peer(&dump(&a), b.public_key()).clone();
        let b2 = peer(&dump(&b), a.public_key()).clone();
        (a2.tx_bytes == b2.rx_bytes && b2.tx_bytes == a2.rx_bytes).then_some((a2, b2))
    });
    for (side, delta) in [
        ("initiator tx", a2.tx_bytes - on_a.tx_bytes),
        ("initiator rx", a2.rx_bytes - on_a.rx_bytes),
        ("responder tx", b2.tx_bytes - on_b.tx_bytes),
    ] {
        assert!(
            delta >= 3 * PING_MESSAGE && delta.is_multiple_of(PING_MESSAGE),
            "{side} grew by {delta}, not a whole number of {PING_MESSAGE}-byte ping messages"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

#[test]
fn private_keys_are_stored_clamped() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let unclamped = "/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let clamped = "+AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAEA=";
    let file = Scratch::with("unclamped", "key", unclamped);
    device.set(&["private-key", file.path()]).unwrap();

    let shown = device
        .wg(&["show", device.ifname(), "private-key"])
        .unwrap();
    assert_eq!(shown.trim(), clamped);
    assert_eq!(
        uapi_get(&device).value("private_key"),
        Some(hex(clamped).as_str())
    );
    let interface = dump(&device).interface;
    assert_eq!(
        interface.public_key.as_deref(),
        Some(pubkey(clamped).as_str())
    );
}

#[test]
fn private_key_from_dev_null_removes_it_and_keeps_the_peers() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let p1 = keypair().public;
    device
        .set_peer(&peer_spec(&p1, None, &["198.19.2.0/24"]))
        .unwrap();
    assert!(dump(&device).interface.private_key.is_some());

    device.set(&["private-key", "/dev/null"]).unwrap();
    let after = dump(&device);
    assert_eq!(after.interface.private_key, None, "{after:#?}");
    assert_eq!(after.interface.public_key, None, "{after:#?}");
    assert_eq!(uapi_get(&device).value("private_key"), None);
    // The kernel keeps peers without a private key; so does wireguard-go.
    assert_eq!(peer_keys(&after), BTreeSet::from([p1]));
}

#[test]
fn taking_a_peers_private_key_removes_that_peer() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let (k2, p3) = (keypair(), keypair().public);
    for (public, cidr) in [(&k2.public, "198.19.2.0/24"), (&p3, "198.19.3.0/24")] {
        device.set_peer(&peer_spec(public, None, &[cidr])).unwrap();
    }
    let file = Scratch::with("k2", "key", &k2.private);
    device.set(&["private-key", file.path()]).unwrap();
    let after = dump(&device);
    assert_eq!(
        after.interface.public_key.as_deref(),
        Some(k2.public.as_str())
    );
    assert_eq!(peer_keys(&after), BTreeSet::from([p3]));
}

#[test]
fn our_own_public_key_as_a_peer_is_ignored() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let own = device.public_key().to_string();
    device
        .set_peer(&peer_spec(&own, None, &["198.19.2.0/24"]))
        .unwrap();
    assert!(dump(&device).peers.is_empty(), "{:#?}", dump(&device));

    // In a raw set, the ignored block's lines are ignored with it, not given to anyone.
    let p2 = keypair().public;
    let reply = uapi(
        &device,
        &format!(
            "set=1\npublic_key={}\nallowed_ip=198.19.2.0/24\npublic_key={}\nallowed_ip=198.19.3.0/24\n\n",
            hex(&own),
            hex(&p2)
        ),
    );
    assert_eq!(reply.errno, 0, "{reply:?}");
    let after = dump(&device);
    assert_eq!(peer_keys(&after), BTreeSet::from([p2.clone()]));
    assert_eq!(allowed(peer(&after, &p2)), nets(&["198.19.3.0/24"]));
}

/// `wg showconf` text as sets: order of peers and of allowed IPs is the implementation's
/// (wireguard-go keeps peers in a hash map), so it is not compared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Conf {
    interface: BTreeMap<String, String>,
    /// By public key: the other fields, and the allowed IPs.
    peers: BTreeMap<String, (BTreeMap<String, String>, BTreeSet<IpNet>)>,
}

impl Conf {
    fn parse(text: &str) -> Conf {
        type PeerFields = (BTreeMap<String, String>, BTreeSet<IpNet>);
        fn finish(peer: Option<PeerFields>, conf: &mut Conf) {
            if let Some((mut fields, ips)) = peer {
                let key = fields
                    .remove("PublicKey")
                    .expect("a peer without PublicKey");
                assert!(
                    conf.peers.insert(key, (fields, ips)).is_none(),
                    "duplicate peer"
                );
            }
        }
        let mut conf = Conf::default();
        let mut current: Option<PeerFields> = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line {
                "[Interface]" => {}
                "[Peer]" => finish(current.replace(Default::default()), &mut conf),
                _ => {
                    let (key, value) = line
                        .split_once(" = ")
                        .unwrap_or_else(|| panic!("showconf line {line:?}"));
                    match (&mut current, key) {
                        (Some((_, ips)), "AllowedIPs") => {
                            for ip in value.split(',').map(str::trim) {
                                assert!(ips.insert(ip.parse().unwrap()), "{ip} twice");
                            }
                        }
                        (Some((fields, _)), _) => {
                            assert!(fields.insert(key.into(), value.into()).is_none(), "{line}");
                        }
                        (None, _) => {
                            conf.interface.insert(key.into(), value.into());
                        }
                    }
                }
            }
        }
        finish(current, &mut conf);
        conf
    }
}

fn showconf(device: &WgDevice) -> String {
    device.wg(&["showconf", device.ifname()]).unwrap()
}

#[test]
fn showconf_round_trips_through_setconf_on_a_fresh_router() {
    if !require_netns() {
        return;
    }
    let ns_a = netns_with_sink("uapia");
    let ns_b = netns_with_sink("uapib");
    let a = router(&ns_a);
    let b = router(&ns_b);
    let (p1, p2, p3) = (keypair().public, keypair().public, keypair().public);
    let psk = process::run(wg_command().arg("genpsk")).unwrap();
    let psk_file = Scratch::with("psk", "key", &psk);
    a.set(&["listen-port", "51820", "fwmark", "0x1234"])
        .unwrap();
    a.set(&[
        "peer",
        &p1,
        "preshared-key",
        psk_file.path(),
        "endpoint",
        "198.18.0.2:51820",
        "persistent-keepalive",
        "25",
        "allowed-ips",
        "198.19.2.0/24,fd00:19:2::/64",
    ])
    .unwrap();
    a.set_peer(&peer_spec(
        &p2,
        Some("[fd00:18::3]:51821"),
        &["198.19.3.0/24", "198.19.4.128/25"],
    ))
    .unwrap();
    a.set_peer(&peer_spec(&p3, None, &[])).unwrap();

    let text = showconf(&a);
    let conf = Conf::parse(&text);
    // What was set is what `wg` reads back (so the comparison below is not vacuous).
    assert_eq!(conf.interface["ListenPort"], "51820", "{text}");
    assert_eq!(conf.interface["FwMark"], "0x1234", "{text}");
    assert_eq!(pubkey(&conf.interface["PrivateKey"]), a.public_key());
    let (fields, ips) = &conf.peers[&p1];
    assert_eq!(fields["PresharedKey"], psk.trim());
    assert_eq!(fields["Endpoint"], "198.18.0.2:51820");
    assert_eq!(fields["PersistentKeepalive"], "25");
    assert_eq!(*ips, nets(&["198.19.2.0/24", "fd00:19:2::/64"]));
    assert_eq!(conf.peers[&p2].0["Endpoint"], "[fd00:18::3]:51821");
    assert!(conf.peers[&p3].1.is_empty());

    let file = Scratch::with("showconf", "conf", &text);
    b.wg(&["setconf", b.ifname(), file.path()]).unwrap();
    let copy = showconf(&b);
    assert_eq!(Conf::parse(&copy), conf, "A:\n{text}\nB:\n{copy}");
    assert_eq!(
        dump(&b).interface.public_key.as_deref(),
        Some(a.public_key())
    );
}

// ---------------------------------------------------------------------------------------
// Peer-set semantics
// ---------------------------------------------------------------------------------------

#[test]
fn setconf_replaces_all_peers_and_addconf_adds() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let (p1, p2, p3, p4) = (
        keypair().public,
        keypair().public,
        keypair().public,
        keypair().public,
    );
    for (public, cidr) in [(&p1, "198.19.1.0/24"), (&p2, "198.19.2.0/24")] {
        device.set_peer(&peer_spec(public, None, &[cidr])).unwrap();
    }
    let private = device
        .wg(&["show", device.ifname(), "private-key"])
        .unwrap();
    let conf = Scratch::with(
        "setconf",
        "conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {p3}\nAllowedIPs = 198.19.3.0/24\n",
            private.trim()
        ),
    );
    device
        .wg(&["setconf", device.ifname(), conf.path()])
        .unwrap();
    let after = dump(&device);
    assert_eq!(peer_keys(&after), BTreeSet::from([p3.clone()]));
    assert_eq!(allowed(peer(&after, &p3)), nets(&["198.19.3.0/24"]));

    let add = Scratch::with(
        "addconf",
        "conf",
        &format!("[Interface]\n\n[Peer]\nPublicKey = {p4}\nAllowedIPs = 198.19.4.0/24\n"),
    );
    device
        .wg(&["addconf", device.ifname(), add.path()])
        .unwrap();
    assert_eq!(peer_keys(&dump(&device)), BTreeSet::from([p3, p4]));
}

#[test]
fn set_allowed_ips_replaces_the_list_and_an_empty_list_clears_it() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let p1 = keypair().public;
    device
        .set_peer(&peer_spec(&p1, None, &["198.19.2.0/24", "fd00:19:2::/64"]))
        .unwrap();
    device
        .set(&["peer", &p1, "allowed-ips", "198.19.5.0/24"])
        .unwrap();
    assert_eq!(allowed(peer(&dump(&device), &p1)), nets(&["198.19.5.0/24"]));
    device.set(&["peer", &p1, "allowed-ips", ""]).unwrap();
    assert!(allowed(peer(&dump(&device), &p1)).is_empty());
}

#[test]
fn update_only_changes_existing_peers_and_creates_none() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let (p1, p2, p3) = (keypair().public, keypair().public, keypair().public);
    device
        .set_peer(&peer_spec(&p1, None, &["198.19.2.0/24"]))
        .unwrap();

    let reply = uapi(
        &device,
        &format!(
            "set=1\npublic_key={}\nupdate_only=true\nendpoint=198.18.0.2:51820\nreplace_allowed_ips=true\nallowed_ip=198.19.5.0/24\n\
             public_key={}\nupdate_only=true\nallowed_ip=198.19.6.0/24\n\
             public_key={}\nallowed_ip=198.19.7.0/24\n\n",
            hex(&p1),
            hex(&p2),
            hex(&p3)
        ),
    );
    assert_eq!(reply.errno, 0, "{reply:?}");
    let after = dump(&device);
    // p2 did not exist: untouched means not created; p3 had no update_only.
    assert_eq!(peer_keys(&after), BTreeSet::from([p1.clone(), p3.clone()]));
    let updated = peer(&after, &p1);
    assert_eq!(updated.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
    assert_eq!(allowed(updated), nets(&["198.19.5.0/24"]));
    assert_eq!(allowed(peer(&after, &p3)), nets(&["198.19.7.0/24"]));
}

#[test]
fn remove_deletes_only_that_peer() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let (p1, p2) = (keypair().public, keypair().public);
    device
        .set_peer(&peer_spec(
            &p1,
            Some("198.18.0.2:51820"),
            &["198.19.1.0/24"],
        ))
        .unwrap();
    device
        .set_peer(&peer_spec(
            &p2,
            Some("198.18.0.3:51820"),
            &["198.19.2.0/24"],
        ))
        .unwrap();
    let kept = peer(&dump(&device), &p2).clone();
    device.set(&["peer", &p1, "remove"]).unwrap();
    let after = dump(&device);
    assert_eq!(after.peers, vec![kept]);
}

#[test]
fn a_minus_allowed_ip_removes_only_that_entry_of_that_peer() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let (p1, p2) = (keypair().public, keypair().public);
    device
        .set_peer(&peer_spec(
            &p1,
            None,
            &["198.19.2.0/24", "198.19.3.0/24", "fd00:19:2::/64"],
        ))
        .unwrap();
    device
        .set_peer(&peer_spec(&p2, None, &["198.19.9.0/24"]))
        .unwrap();
    let reply = uapi(
        &device,
        &format!(
            "set=1\npublic_key={}\nallowed_ip=-198.19.2.0/24\nallowed_ip=-fd00:19:2::/64\nallowed_ip=-198.19.9.0/24\n\n",
            hex(&p1)
        ),
    );
    assert_eq!(reply.errno, 0, "{reply:?}");
    let after = dump(&device);
    assert_eq!(allowed(peer(&after, &p1)), nets(&["198.19.3.0/24"]));
    // Removing through p1 an entry that belongs to p2 does not take it from p2.
    assert_eq!(allowed(peer(&after, &p2)), nets(&["198.19.9.0/24"]));
}

/// Waits until the peer `public` has sent something, and returns its tx bytes.
fn wait_for_tx(device: &WgDevice, public: &str) -> u64 {
    wait_for(Duration::from_secs(3), "a handshake initiation", || {
        let tx = peer(&dump(device), public).tx_bytes;
        (tx > 0).then_some(tx)
    })
}

#[test]
fn an_allowed_ip_given_to_another_peer_moves_to_it() {
    if !require_netns() {
        return;
    }
    let ns = netns_with_sink("uapi");
    let device = router(&ns);
    let (p1, p2) = (keypair().public, keypair().public);
    device
        .set_peer(&peer_spec(
            &p1,
            Some("198.18.0.2:51820"),
            &["198.19.2.0/24", "198.19.3.0/24"],
        ))
        .unwrap();
    device
        .set_peer(&peer_spec(
            &p2,
            Some("198.18.0.3:51820"),
            &["198.19.2.0/24"],
        ))
        .unwrap();
    let after = dump(&device);
    assert_eq!(allowed(peer(&after, &p1)), nets(&["198.19.3.0/24"]));
    assert_eq!(allowed(peer(&after, &p2)), nets(&["198.19.2.0/24"]));

    // The data plane agrees: traffic to the moved prefix starts a handshake with p2 only.
    device.link_up(1420).unwrap();
    device.route(&"198.19.0.0/16".parse().unwrap()).unwrap();
    let unreachable = ping_with_deadline(
        &ns,
        "198.19.2.5".parse().unwrap(),
        1,
        Duration::from_secs(1),
    );
    assert!(unreachable.is_err(), "nobody answers behind p2");
    let tx = wait_for_tx(&device, &p2);
    assert_eq!(tx % INITIATION, 0, "p2 sent {tx} bytes, not initiations");
    assert_eq!(
        peer(&dump(&device), &p1).tx_bytes,
        0,
        "p1 was sent traffic for p2"
    );
    let _ = ping_with_deadline(
        &ns,
        "198.19.3.5".parse().unwrap(),
        1,
        Duration::from_secs(1),
    );
    assert_eq!(wait_for_tx(&device, &p1) % INITIATION, 0);
}

// ---------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------

#[test]
fn several_operations_share_one_connection() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let p1 = hex(&keypair().public);
    let mut conn = Uapi::connect(&device.socket_path());
    let set = conn.request(&format!(
        "set=1\nlisten_port=51830\npublic_key={p1}\nallowed_ip=198.19.2.0/24\n\n"
    ));
    assert_eq!(set.errno, 0, "{set:?}");
    let first = conn.request("get=1\n\n");
    let second = conn.request("get=1\n\n");
    for get in [&first, &second] {
        assert_eq!(get.errno, 0, "{get:?}");
        assert_eq!(get.value("listen_port"), Some("51830"), "{get:?}");
        assert_eq!(get.values("public_key"), [p1.as_str()], "{get:?}");
        assert_eq!(get.values("allowed_ip"), ["198.19.2.0/24"], "{get:?}");
    }
    assert_eq!(first, second);
    // And a second set on the same connection still works.
    assert_eq!(conn.request("set=1\nlisten_port=51831\n\n").errno, 0);
    assert_eq!(
        conn.request("get=1\n\n").value("listen_port"),
        Some("51831")
    );
}

#[test]
fn empty_and_idle_connections_are_harmless() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let mut device = router(&ns);
    device.set_listen_port(51820).unwrap();
    let socket = device.socket_path();
    // What `wg` does before every command, far more often than any connection limit.
    for i in 0..500 {
        let stream = UnixStream::connect(&socket)
            .unwrap_or_else(|e| panic!("probe connection {i} refused: {e}"));
        drop(stream);
    }
    // Half an operation, then gone (a set ended by EOF is applied, so none here).
    for partial in ["get=1\n", "get=", "set="] {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(partial.as_bytes()).unwrap();
    }
    // Connections that stay open and silent do not block others.
    let idle: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let after = dump(&device);
    assert_eq!(after.interface.listen_port, 51820, "{after:#?}");
    assert_eq!(uapi_get(&device).value("listen_port"), Some("51820"));
    drop(idle);
    assert_running(&mut device);
}

#[test]
fn an_unknown_operation_closes_the_connection() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let mut device = router(&ns);
    let mut conn = Uapi::connect(&device.socket_path());
    conn.send("bogus=1\n\n");
    let rest = conn.read_to_close();
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("errno=0"),
        "an unknown operation succeeded: {text:?}"
    );
    // Other connections are served as before.
    assert_eq!(uapi_get(&device).errno, 0);
    assert_running(&mut device);
}

#[test]
fn a_set_ended_by_eof_is_applied() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let mut conn = Uapi::connect(&device.socket_path());
    conn.send("set=1\nlisten_port=51840\n");
    conn.writer.shutdown(std::net::Shutdown::Write).unwrap();
    let reply = conn.reply();
    assert_eq!(reply.errno, 0, "{reply:?}");
    assert!(conn.read_to_close().is_empty());
    assert_eq!(dump(&device).interface.listen_port, 51840);
}

// ---------------------------------------------------------------------------------------
// Large configurations
// ---------------------------------------------------------------------------------------

/// `[Interface]` with the device's current private key and a listen port.
fn interface_section(device: &WgDevice) -> String {
    let private = device
        .wg(&["show", device.ifname(), "private-key"])
        .unwrap();
    format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\n",
        private.trim()
    )
}

/// Appends `AllowedIPs` lines, 100 entries each.
fn push_allowed_ips(conf: &mut String, ips: &BTreeSet<IpNet>) {
    let list: Vec<String> = ips.iter().map(IpNet::to_string).collect();
    for chunk in list.chunks(100) {
        let _ = writeln!(conf, "AllowedIPs = {}", chunk.join(", "));
    }
}

#[test]
fn one_peer_with_30000_allowed_ips_round_trips_complete() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let device = router(&ns);
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let v6_base = u128::from("fd00:1::".parse::<Ipv6Addr>().unwrap());
    let ips: BTreeSet<IpNet> = (0..20_000u32)
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
        .collect();
    assert!(ips.len() > 31_000);
    let p1 = keypair().public;
    let mut conf = interface_section(&device);
    let _ = writeln!(conf, "\n[Peer]\nPublicKey = {p1}");
    push_allowed_ips(&mut conf, &ips);
    let file = Scratch::with("large", "conf", &conf);
    device
        .wg(&["setconf", device.ifname(), file.path()])
        .unwrap();

    let back = Conf::parse(&showconf(&device));
    assert_eq!(back.peers.len(), 1);
    let got = &back.peers[&p1].1;
    assert_eq!(got.len(), ips.len(), "allowed IPs lost or added");
    assert!(
        got == &ips,
        "the allowed IPs read back differ from those set"
    );
    assert_eq!(peer(&dump(&device), &p1).allowed_ips.len(), ips.len());
}

#[test]
fn forty_peers_round_trip_complete() {
    if !require_netns() {
        return;
    }
    let ns = netns_with_sink("uapi");
    let device = router(&ns);
    let mut conf = interface_section(&device);
    for i in 0..40u8 {
        let _ = writeln!(conf, "\n[Peer]\nPublicKey = {}", keypair().public);
        if i % 2 == 0 {
            let _ = writeln!(conf, "PresharedKey = {}", keypair().private);
        }
        let endpoint = if i % 3 == 0 {
            format!("[fd00:18::{:x}]:{}", i + 2, 51820 + u16::from(i))
        } else {
            format!("198.18.0.{}:51820", i + 2)
        };
        let _ = writeln!(conf, "Endpoint = {endpoint}");
        if i % 5 == 0 {
            let _ = writeln!(conf, "PersistentKeepalive = {}", 25 + u16::from(i));
        }
        let ips = nets(&[
            &format!("198.19.{i}.0/24"),
            &format!("198.19.{}.0/25", 100 + i),
            &format!("fd00:19:{i:x}::/64"),
        ]);
        push_allowed_ips(&mut conf, &ips);
    }
    let file = Scratch::with("forty", "conf", &conf);
    device
        .wg(&["setconf", device.ifname(), file.path()])
        .unwrap();
    let back = showconf(&device);
    let expected = Conf::parse(&conf);
    assert_eq!(expected.peers.len(), 40);
    assert_eq!(
        Conf::parse(&back),
        expected,
        "set:\n{conf}\nread back:\n{back}"
    );
}

// ---------------------------------------------------------------------------------------
// Low-order public keys
// ---------------------------------------------------------------------------------------

/// The seven Curve25519 points of small order (with the top bit clear): a Diffie-Hellman
/// with any of them gives the all-zero secret, so WireGuard must never handshake with them.
const LOW_ORDER: [&str; 7] = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
];

/// UDP datagrams (IPv4 + IPv6) the namespace has sent, from `nstat`.
fn udp_out_datagrams(ns: &Netns) -> u64 {
    let text = ns
        .output("nstat", &["-asz", "UdpOutDatagrams", "Udp6OutDatagrams"])
        .unwrap();
    let mut seen = 0;
    let total = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            match fields.next()? {
                "UdpOutDatagrams" | "Udp6OutDatagrams" => {
                    seen += 1;
                    fields.next()?.parse::<u64>().ok()
                }
                _ => None,
            }
        })
        .sum();
    assert_eq!(seen, 2, "nstat did not report both counters:\n{text}");
    total
}

/// Pings every address once, in parallel, for about `seconds`; none is expected to answer.
fn ping_all_unanswered(ns: &Netns, addrs: &[IpAddr], seconds: u32) {
    let children: Vec<_> = addrs
        .iter()
        .map(|addr| {
            ns.command("ping")
                .unwrap()
                .args([
                    "-n",
                    "-q",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-w",
                    &seconds.to_string(),
                ])
                .arg(addr.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for (mut child, addr) in children.into_iter().zip(addrs) {
        let status = child.wait().unwrap();
        assert!(!status.success(), "{addr} answered a ping");
    }
}

#[test]
fn low_order_public_keys_are_accepted_but_never_sent_to() {
    if !require_netns_with(&[("nstat", "iproute2")]) {
        return;
    }
    let ns = netns_with_sink("uapi");
    let device = router(&ns);
    device.set_listen_port(51820).unwrap();
    device.link_up(1420).unwrap();
    device.route(&"198.19.0.0/16".parse().unwrap()).unwrap();
    let mut targets = Vec::new();
    for (i, key) in (10u8..).zip(LOW_ORDER) {
        let endpoint = if i % 2 == 0 {
            format!("198.18.0.{i}:51820")
        } else {
            format!("[fd00:18::{i:x}]:51820")
        };
        device
            .set(&[
                "peer",
                &base64(key),
                "endpoint",
                &endpoint,
                "persistent-keepalive",
                "1",
                "allowed-ips",
                &format!("198.19.{i}.0/24"),
            ])
            .unwrap_or_else(|e| panic!("low-order key {key} refused: {e:#}"));
        targets.push(IpAddr::V4(Ipv4Addr::new(198, 19, i, 1)));
    }
    let before = udp_out_datagrams(&ns);
    ping_all_unanswered(&ns, &targets, 2);
    std::thread::sleep(Duration::from_millis(1500));

    let after = dump(&device);
    let accepted: BTreeSet<String> = LOW_ORDER.iter().map(|k| base64(k)).collect();
    assert_eq!(
        peer_keys(&after),
        accepted,
        "not every low-order key was accepted"
    );
    for p in &after.peers {
        assert_eq!(
            p.tx_bytes, 0,
            "sent to low-order key {}: {p:?}",
            p.public_key
        );
        assert_eq!(p.latest_handshake, None, "{p:?}");
        assert_eq!(p.persistent_keepalive, Some(1), "{p:?}");
    }
    assert_eq!(
        udp_out_datagrams(&ns),
        before,
        "UDP datagrams left the namespace"
    );

    // The same setup with an ordinary key does send (so the counters above can move).
    let normal = keypair().public;
    device
        .set(&[
            "peer",
            &normal,
            "endpoint",
            "198.18.0.30:51820",
            "persistent-keepalive",
            "1",
            "allowed-ips",
            "198.19.30.0/24",
        ])
        .unwrap();
    let tx = wait_for_tx(&device, &normal);
    assert_eq!(tx % INITIATION, 0, "{tx}");
    assert!(
        udp_out_datagrams(&ns) > before,
        "nstat did not see the initiation"
    );
    for p in &dump(&device).peers {
        assert!(p.public_key == normal || p.tx_bytes == 0, "{p:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The wireguard-go compatible entry point: `tailsk8s-wg IFNAME`, and wg-quick
// ---------------------------------------------------------------------------------------

/// The name under which the binary behaves like `wireguard-go`.
const WG_ENTRY: &str = "tailsk8s-wg";
/// How long `tailsk8s-wg`, `wireguard-go` or `wg-quick` may take to return.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A userspace WireGuard started the wireguard-go way (`PROGRAM IFNAME`), which leaves a
/// daemon that is not our child. On drop it ends that daemon (removing the socket, which
/// tells it to exit, then SIGTERM by pid) and removes its scratch directory.
struct Userspace {
    /// What to run: `DIR/tailsk8s-wg` → the binary, or `wireguard-go`.
    program: PathBuf,
    /// The file the daemon's `/proc/PID/exe` points to.
    exe: PathBuf,
    /// The scratch directory holding the symlink (and config files), if any.
    dir: Option<PathBuf>,
    ifname: String,
}

impl Userspace {
    /// `DIR/tailsk8s-wg`, a symlink to the binary under test, in a fresh 0700 directory.
    fn tailsk8s_wg() -> Userspace {
        let exe = tailsk8s_binary()
            .and_then(|b| Ok(b.canonicalize()?))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let dir = names::scratch_file("wgentry", "d").unwrap();
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&exe, dir.join(WG_ENTRY)).unwrap();
        Userspace {
            program: dir.join(WG_ENTRY),
            exe,
            dir: Some(dir),
            ifname: names::ifname().unwrap(),
        }
    }

    /// Debian's `wireguard-go`: the behaviour `tailsk8s-wg` copies.
    fn wireguard_go() -> Userspace {
        let program = tools::require("wireguard-go").unwrap();
        Userspace {
            exe: program.canonicalize().unwrap(),
            program,
            dir: None,
            ifname: names::ifname().unwrap(),
        }
    }

    fn socket(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.ifname))
    }

    /// Running processes of our program with our interface name as an argument.
    fn daemons(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let proc_dir = PathBuf::from(format!("/proc/{pid}"));
                let exe = fs::read_link(proc_dir.join("exe")).ok();
                let cmdline = fs::read(proc_dir.join("cmdline")).unwrap_or_default();
                let stat = fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
                // A zombie has exited; it only waits for a parent to reap it.
                let zombie = stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, s)| s.starts_with('Z'));
                exe.as_deref() == Some(self.exe.as_path())
                    && cmdline
                        .split(|&b| b == 0)
                        .any(|arg| arg == self.ifname.as_bytes())
                    && !zombie
            })
            .collect()
    }

    /// `PROGRAM IFNAME` inside `ns`, with neither foreground nor logging asked for.
    fn command(&self, ns: &Netns) -> Command {
        let mut cmd = ns.command_at(&self.program).unwrap();
        cmd.arg(&self.ifname)
            .env_remove("WG_PROCESS_FOREGROUND")
            .env_remove("LOG_LEVEL");
        cmd
    }

    /// Waits until the daemon has exited and its socket and interface are gone.
    fn wait_gone(&self, ns: &Netns) {
        wait_for(Duration::from_secs(5), "the daemon to exit", || {
            self.daemons().is_empty().then_some(())
        });
        assert!(
            !self.socket().exists(),
            "{} left behind",
            self.socket().display()
        );
        assert!(
            ns.ip(&["link", "show", &self.ifname]).is_err(),
            "interface {} left behind",
            self.ifname
        );
    }
}

impl Drop for Userspace {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.socket());
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.daemons().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.daemons() {
            eprintln!(
                "{} {} (pid {pid}) still running; terminating it",
                self.program.display(),
                self.ifname
            );
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill has no memory preconditions; the pid was just found running
                // our program for our unique interface name.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Waits for `child` to exit; kills it and panics after [`COMMAND_TIMEOUT`].
fn wait_exit(
    child: &mut std::process::Child,
    line: &str,
    output: impl Fn() -> String,
) -> ExitStatus {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{line}` did not return within {COMMAND_TIMEOUT:?}:\n{}",
                output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with stdout and stderr in a file (a daemon it leaves behind may keep them
/// open, so pipes might never reach EOF); its status and output.
fn run_detached(mut cmd: Command) -> (ExitStatus, String) {
    let log = Scratch::with("cmd", "log", "");
    let out = fs::OpenOptions::new().append(true).open(&log.0).unwrap();
    let line = process::describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let read = || fs::read_to_string(&log.0).unwrap_or_default();
    (wait_exit(&mut child, &line, read), read())
}

/// Runs `cmd` with stdout and stderr on pipes, as `out=$(cmd)` in a script does. Returns
/// its status and, if both pipes reached EOF within 2 s of its exit, what it wrote — `None`
/// when something it left behind still holds them (the script would hang).
fn run_captured(mut cmd: Command) -> (ExitStatus, Option<String>) {
    let line = process::describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let (sender, receiver) = std::sync::mpsc::channel();
    let pipes: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    for mut pipe in pipes {
        let sender = sender.clone();
        // Detached on purpose: if a daemon holds the pipe, this thread blocks until the
        // daemon is stopped at the end of the test.
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = sender.send(text);
        });
    }
    let status = wait_exit(&mut child, &line, String::new);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut output = String::new();
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(text) => output.push_str(&text),
            Err(_) => return (status, None),
        }
    }
    (status, Some(output))
}

/// `PROGRAM IFNAME` without `-f`: returns success once the socket answers, leaves one
/// daemon running that does not hold the caller's output, and exits when its socket is
/// deleted (removing the interface).
fn daemonizes_like_wireguard_go(userspace: &Userspace) {
    let ns = Netns::new("uapi").unwrap();
    let (status, output) = run_captured(userspace.command(&ns));
    let shown = ns.output("wg", &["show", &userspace.ifname, "dump"]);
    assert!(
        status.success(),
        "`PROGRAM IFNAME` failed ({status}): {output:?}"
    );
    // Ready when it returns: the socket answers at once, without any waiting.
    assert!(
        shown.is_ok(),
        "socket not ready on return: {shown:?}\n{output:?}"
    );
    assert_eq!(userspace.daemons().len(), 1, "no daemon kept running");
    ns.ip(&["link", "show", &userspace.ifname]).unwrap();
    assert!(
        output.is_some(),
        "the daemon keeps the caller's stdout/stderr open: `out=$({} IFNAME)` would hang",
        userspace.program.display()
    );

    fs::remove_file(userspace.socket()).unwrap();
    userspace.wait_gone(&ns);
}

#[test]
fn wireguard_go_daemonizes_the_way_tailsk8s_wg_must() {
    if !require_netns() {
        return;
    }
    // The reference behaviour, so the check below is known to be passable.
    daemonizes_like_wireguard_go(&Userspace::wireguard_go());
}

#[test]
fn tailsk8s_wg_daemonizes_like_wireguard_go() {
    if !require_netns() {
        return;
    }
    daemonizes_like_wireguard_go(&Userspace::tailsk8s_wg());
}

#[test]
fn tailsk8s_wg_stays_in_the_foreground_with_wg_process_foreground() {
    if !require_netns() {
        return;
    }
    let ns = Netns::new("uapi").unwrap();
    let userspace = Userspace::tailsk8s_wg();
    let mut cmd = userspace.command(&ns);
    cmd.env("WG_PROCESS_FOREGROUND", "1");
    let label = format!("{WG_ENTRY} {}", userspace.ifname);
    let mut daemon = Daemon::spawn(&label, cmd).unwrap();
    wait_for(Duration::from_secs(10), "the foreground socket", || {
        if let Some(status) = daemon.exited().unwrap() {
            panic!("exited ({status}) in the foreground:\n{}", daemon.log());
        }
        (userspace.socket().exists() && ns.output("wg", &["show", &userspace.ifname]).is_ok())
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.exited().unwrap(), None, "it left the foreground");
    assert_eq!(
        userspace.daemons(),
        [daemon.pid().unwrap()],
        "not our child"
    );
    let status = daemon.stop().expect("reaped");
    assert!(status.success(), "SIGTERM exit: {status}\n{}", daemon.log());
    userspace.wait_gone(&ns);
}

/// `PATH` with the system directories first: `wg-quick` finds `ip` and `wg` through it.
fn system_path() -> String {
    let mut path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string();
    if let Ok(current) = std::env::var("PATH") {
        path = format!("{path}:{current}");
    }
    path
}

#[test]
fn wg_quick_runs_tailsk8s_as_its_userspace_implementation() {
    if !require_netns_with(&[("wg-quick", "wireguard-tools"), ("env", "coreutils")]) {
        return;
    }
    let topo = TopologyBuilder::new(2).pods_per_node(1).build().unwrap();
    let [n1, n2] = topo.nodes() else {
        panic!("two nodes")
    };
    // The peer: a tailsk8s router on node 2 at 100.64.0.2.
    let remote = router(n2.netns());
    remote.set_listen_port(51820).unwrap();
    n2.netns()
        .ip(&["addr", "add", "100.64.0.2/32", "dev", remote.ifname()])
        .unwrap();
    remote.link_up(1420).unwrap();
    remote.route(&"100.64.0.1/32".parse().unwrap()).unwrap();

    let userspace = Userspace::tailsk8s_wg();
    let local = keypair();
    remote
        .set_peer(&peer_spec(&local.public, None, &["100.64.0.1/32"]))
        .unwrap();
    // wg-quick takes the interface name from the file name; no DNS line (no resolvconf).
    let conf_path = userspace
        .dir
        .as_ref()
        .unwrap()
        .join(format!("{}.conf", userspace.ifname));
    let conf = format!(
        "[Interface]\nAddress = 100.64.0.1/32\nPrivateKey = {}\nListenPort = 51820\n\n\
         [Peer]\nPublicKey = {}\nEndpoint = {}:51820\nAllowedIPs = 100.64.0.2/32\n",
        local.private,
        remote.public_key(),
        n2.underlay_v4()
    );
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&conf_path)
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .unwrap();
    let wg_quick = tools::require("wg-quick").unwrap();
    let quick = |action: &str| {
        let mut cmd = n1.netns().command("env").unwrap();
        cmd.arg(format!(
            "WG_QUICK_USERSPACE_IMPLEMENTATION={}",
            userspace.program.display()
        ))
        .arg(format!("PATH={}", system_path()))
        .arg(&wg_quick)
        .arg(action)
        .arg(&conf_path);
        run_detached(cmd)
    };

    let (status, output) = quick("up");
    assert!(status.success(), "wg-quick up failed ({status}):\n{output}");
    assert_eq!(
        userspace.daemons().len(),
        1,
        "tailsk8s is not serving it:\n{output}"
    );
    let show = || -> WgDump {
        n1.netns()
            .output("wg", &["show", &userspace.ifname, "dump"])
            .unwrap()
            .parse()
            .unwrap()
    };
    let shown = show();
    assert_eq!(
        shown.interface.public_key.as_deref(),
        Some(local.public.as_str())
    );
    assert_eq!(shown.interface.listen_port, 51820);
    assert_eq!(shown.peers.len(), 1, "{shown:#?}");
    let p = &shown.peers[0];
    assert_eq!(p.public_key, remote.public_key());
    assert_eq!(
        p.endpoint,
        Some(SocketAddr::new(n2.underlay_v4().into(), 51820))
    );
    assert_eq!(allowed(p), nets(&["100.64.0.2/32"]));

    // wg-quick gave the interface its address and routes: traffic flows to the peer.
    ping(n1.netns(), "100.64.0.2".parse().unwrap(), 3).unwrap();
    let shown = show();
    assert!(shown.peers[0].latest_handshake.is_some(), "{shown:#?}");

    let (status, output) = quick("down");
    assert!(
        status.success(),
        "wg-quick down failed ({status}):\n{output}"
    );
    userspace.wait_gone(n1.netns());
}

// ---------------------------------------------------------------------------------------
// The helpers' own checks
// ---------------------------------------------------------------------------------------

#[test]
fn key_spellings_convert_both_ways() {
    assert_eq!(
        hex("+AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAEA="),
        "f800000000000000000000000000000000000000000000000000000000000040"
    );
    assert_eq!(
        base64(LOW_ORDER[0]),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    );
    for key in LOW_ORDER {
        assert_eq!(hex(&base64(key)), key);
    }
    assert_eq!(base64_encode(b"ab"), "YWI=");
    assert_eq!(base64_decode("YWI="), b"ab");
}

#[test]
fn showconf_is_compared_as_sets() {
    let a = "[Interface]\nListenPort = 1\n\n[Peer]\nPublicKey = K1\nAllowedIPs = 198.19.1.0/24, 198.19.2.0/24\n\n[Peer]\nPublicKey = K2\n";
    let b = "[Interface]\nListenPort = 1\n\n[Peer]\nPublicKey = K2\n\n[Peer]\nPublicKey = K1\nAllowedIPs = 198.19.2.0/24\nAllowedIPs = 198.19.1.0/24\n";
    assert_eq!(Conf::parse(a), Conf::parse(b));
    let c = b.replace("198.19.1.0/24", "198.19.3.0/24");
    assert_ne!(Conf::parse(a), Conf::parse(&c));
    assert_ne!(
        Conf::parse(a),
        Conf::parse(&a.replace("ListenPort = 1", "ListenPort = 2"))
    );
}
