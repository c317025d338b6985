//! UAPI end to end: the real router process (`tailsk8s router IFNAME` in a namespace) driven
//! by the real `wg` and, where `wg` cannot say it, by raw UAPI text over the UNIX socket from
//! this process (the socket directory is host-wide, so no `setns` is needed to reach it).
//!
//! Only what needs the kernel, real packets or the real `wg` against the real binary lives
//! here. The update semantics (keys, the peer set, allowed IPs, the listen port) are tested
//! on the device's own get/set in `dataplane/src/control/tests.rs`, the socket protocol
//! (errors, connections, EOF, large replies) and `wg` against the server in
//! `dataplane/src/uapi/server_tests.rs`, the parser in `dataplane/src/uapi/parse.rs`.
//!
//! Themes, in file order: handshake time and wire byte counters (real handshakes), `wg
//! showconf` fed back to `wg setconf` on a fresh router, low-order public keys (nothing
//! leaves the namespace), and the wireguard-go compatible entry point used by `wg-quick`.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tailsk8s_e2e::gate::require_netns_with;
use tailsk8s_e2e::{
    names, ping, process, require_netns, tailsk8s_binary, tools, wg::UAPI_DIR, Daemon, Impl, Netns,
    PeerDump, PeerSpec, TopologyBuilder, WgDevice, WgDump,
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
    // nothing): read both sides once their counters agree, so no message is still on its way.
    let (on_a, on_b) = wait_for(Duration::from_secs(2), "handshake counters agree", || {
        let on_a = peer(&dump(&a), b.public_key()).clone();
        let on_b = peer(&dump(&b), a.public_key()).clone();
        (on_a.tx_bytes == on_b.rx_bytes && on_b.tx_bytes == on_a.rx_bytes).then_some((on_a, on_b))
    });
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
// `wg showconf` read back and fed to `wg setconf`, small and large
// ---------------------------------------------------------------------------------------

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

/// Waits until the peer `public` has sent something, and returns its tx bytes.
fn wait_for_tx(device: &WgDevice, public: &str) -> u64 {
    wait_for(Duration::from_secs(3), "a handshake initiation", || {
        let tx = peer(&dump(device), public).tx_bytes;
        (tx > 0).then_some(tx)
    })
}

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
    // An absence check: nothing may be sent, so there is no event to wait for. Watching
    // 1.5 s more lets the persistent keepalive (every 1 s, the one timer that would send
    // without traffic) come due at least once after the last ping.
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
    // No waiting needed: a daemonizing run serves from a forked child, which the list of
    // processes running PROGRAM IFNAME would show beside (or instead of) our child, whose
    // parent leaves only once that child serves.
    assert_eq!(daemon.exited().unwrap(), None, "it left the foreground");
    assert_eq!(
        userspace.daemons(),
        [daemon.pid().unwrap()],
        "the socket is served by another process than our child"
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
