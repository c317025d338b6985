//! WireGuard's own end-to-end scenarios, modelled on the kernel's selftest
//! (`tools/testing/selftests/wireguard/netns.sh`), kept to those that apply to a userspace
//! router: roaming over an IPv4 and an IPv6 underlay, cryptokey reverse-path filtering
//! against an overlapping more-specific peer, a private-key change followed by an immediate
//! handshake, NAT traversal with persistent keepalive, replying from the address the peer
//! used, wire-exact transfer counters, and a big tunnel MTU.
//!
//! tailsk8s runs on both ends (configured by the real `wg` through the harness), and
//! wireguard-go stands in on one end where an independent implementation adds something
//! (roaming, key change, NAT, counters). Topologies the harness does not offer — a NAT box
//! between the nodes, a second underlay address, an address inside another node's pod
//! CIDR — are built here with `ip` and `nft` inside the test's own namespaces.
//!
//! Needs the binary: `cargo build --bins` (scripts/test does it) or `TAILSK8S_BIN=…`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tailsk8s_e2e::topology::UNDERLAY_IF;
use tailsk8s_e2e::{
    gate, ping, ping_with_deadline, process, require_netns, tools, wait, EndpointFamily, Impl,
    Mesh, MeshOptions, Netns, Node, PeerDump, PeerSpec, Topology, TopologyBuilder, WgDevice,
};

/// The listen port every device uses unless a test moves it.
const PORT: u16 = 51820;

fn two_nodes() -> Topology {
    TopologyBuilder::new(2).build().unwrap()
}

fn pair(topo: &Topology, endpoints: EndpointFamily) -> Mesh<'_> {
    let options = MeshOptions {
        endpoints,
        ..Default::default()
    };
    Mesh::start_with(topo, &[Impl::Tailsk8s, Impl::Tailsk8s], &options).unwrap()
}

/// What `device` reports about its peer with public key `key`.
fn peer_dump(device: &WgDevice, key: &str) -> PeerDump {
    let dump = device.dump().unwrap();
    dump.peer(key).cloned().unwrap_or_else(|| {
        panic!(
            "{} has no peer {key}: {dump:?}",
            device.implementation().name()
        )
    })
}

/// The endpoint `device` has for its peer with public key `key`.
fn endpoint_of(device: &WgDevice, key: &str) -> Option<SocketAddr> {
    peer_dump(device, key).endpoint
}

/// Fails if the device's daemon has exited (a crash that traffic did not reveal).
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

/// `ping ARGS…` inside `ns`, returning its stdout (for options [`ping`] does not offer).
fn ping_args(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    ns.output("ping", args)
}

/// How many ICMP echo requests the IPv4 stack of `ns` has received (`Icmp: InEchos` in the
/// namespace's /proc/net/snmp): proof that a packet was, or was not, delivered to it.
fn icmp_in_echos(ns: &Netns) -> u64 {
    let snmp = ns.output("cat", &["/proc/net/snmp"]).unwrap();
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next(), icmp.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no Icmp lines in /proc/net/snmp:\n{snmp}")
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "InEchos")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or_else(|| panic!("no Icmp InEchos in /proc/net/snmp:\n{snmp}"))
}

/// A fresh key pair from `wg genkey` / `wg pubkey`: (private, public), base64.
fn key_pair() -> (String, String) {
    let wg = tools::require("wg").unwrap();
    let private = process::run(Command::new(&wg).arg("genkey")).unwrap();
    let public = process::run_with_input(Command::new(&wg).arg("pubkey"), private.as_bytes())
        .unwrap()
        .trim()
        .to_string();
    (private.trim().to_string(), public)
}

/// `address/prefix` for an underlay address, with `nodad` for IPv6 (no tentative state).
fn underlay_addr_args(addr: IpAddr) -> Vec<String> {
    match addr {
        IpAddr::V4(_) => vec![format!("{addr}/24")],
        IpAddr::V6(_) => vec![format!("{addr}/64"), "nodad".to_string()],
    }
}

fn allowed_ips_arg(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(IpNet::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------
// 1. Roaming
// ---------------------------------------------------------------------------------------

/// Node 1 (running `roamer`) moves its listen port and, with `move_address`, also trades its
/// underlay address for a new one (what a NAT rebinding or a DHCP renewal look like from
/// outside), then speaks first: node 2 (tailsk8s) must move its endpoint to the source of
/// the latest authenticated packet, and replies must reach the new address — node 2 has no
/// other way to learn it. A roamer whose address moved must notice that the source address
/// it used until now is gone.
fn roaming(roamer: Impl, family: EndpointFamily, move_address: bool) {
    let v6 = family == EndpointFamily::V6;
    let topo = two_nodes();
    let options = MeshOptions {
        endpoints: family,
        ..Default::default()
    };
    let mut mesh = Mesh::start_with(&topo, &[roamer, Impl::Tailsk8s], &options).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, a1, b0, b1) = (&a.pods()[0], &a.pods()[1], &b.pods()[0], &b.pods()[1]);
    let roamer_key = mesh.devices()[0].public_key().to_string();

    ping(a0.netns(), b0.ipv4().into(), 2).unwrap();
    assert_eq!(
        endpoint_of(&mesh.devices()[1], &roamer_key),
        Some(SocketAddr::new(a.underlay(v6), PORT))
    );

    let new_addr: IpAddr = match (move_address, v6) {
        (false, _) => a.underlay(v6),
        (true, true) => Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x11).into(),
        (true, false) => Ipv4Addr::new(198, 18, 0, 11).into(),
    };
    if move_address {
        let old = underlay_addr_args(a.underlay(v6)).remove(0);
        a.netns()
            .ip_batch(&[
                format!("addr del {old} dev {UNDERLAY_IF}"),
                format!(
                    "addr add {} dev {UNDERLAY_IF}",
                    underlay_addr_args(new_addr).join(" ")
                ),
            ])
            .unwrap();
    }
    mesh.devices()[0].set_listen_port(PORT + 1).unwrap();

    // Node 1 speaks first, from an address node 2 has never seen.
    ping(a0.netns(), b0.ipv4().into(), 2).expect("node 1 must reach node 2 from its new address");
    assert_eq!(
        endpoint_of(&mesh.devices()[1], &roamer_key),
        Some(SocketAddr::new(new_addr, PORT + 1)),
        "node 2 must use node 1's latest authenticated source address"
    );
    // Node 2 now reaches node 1 on its own initiative, over the other inner family too.
    ping(b1.netns(), a1.ipv6().into(), 2).unwrap();
    assert_eq!(
        endpoint_of(&mesh.devices()[1], &roamer_key),
        Some(SocketAddr::new(new_addr, PORT + 1))
    );
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

#[test]
fn roaming_over_an_ipv4_underlay_follows_the_latest_authenticated_packet() {
    if !require_netns() {
        return;
    }
    roaming(Impl::Tailsk8s, EndpointFamily::V4, true);
}

#[test]
fn roaming_over_an_ipv6_underlay_follows_the_latest_authenticated_packet() {
    if !require_netns() {
        return;
    }
    roaming(Impl::Tailsk8s, EndpointFamily::V6, true);
}

#[test]
fn roaming_to_a_new_listen_port_is_followed() {
    if !require_netns() {
        return;
    }
    roaming(Impl::Tailsk8s, EndpointFamily::V4, false);
}

#[test]
fn tailsk8s_follows_a_roaming_wireguard_go_peer_over_ipv4() {
    if !require_netns() {
        return;
    }
    roaming(Impl::WireguardGo, EndpointFamily::V4, true);
}

#[test]
fn tailsk8s_follows_a_roaming_wireguard_go_peer_over_ipv6() {
    if !require_netns() {
        return;
    }
    roaming(Impl::WireguardGo, EndpointFamily::V6, true);
}

// ---------------------------------------------------------------------------------------
// 2. Cryptokey reverse-path filtering
// ---------------------------------------------------------------------------------------

/// Node 1 has peers B (node 2, 198.19.2.0/24) and C (node 3, allowed 198.19.2.128/25 — more
/// specific, so it owns that range). A packet that B authenticates but whose inner source
/// lies in C's /25 must be dropped: B cannot speak for C. C's own packets from that range
/// arrive, and B's from the rest of its /24 still do.
#[test]
fn cryptokey_filter_drops_a_peer_spoofing_a_more_specific_peer() {
    if !require_netns() {
        return;
    }
    let topo = TopologyBuilder::new(3).build().unwrap();
    let mut mesh = Mesh::start(&topo, &[Impl::Tailsk8s; 3]).unwrap();
    let [a, b, c] = topo.nodes() else {
        panic!("three nodes")
    };
    let target = &a.pods()[0];
    let (a_dev, b_dev, c_dev) = (&mesh.devices()[0], &mesh.devices()[1], &mesh.devices()[2]);
    let c_range: IpNet = "198.19.2.128/25".parse().unwrap();
    let contested = Ipv4Addr::new(198, 19, 2, 130);
    assert!(b.pod_cidr_v4().contains(&contested) && c_range.contains(&IpAddr::from(contested)));

    a_dev
        .set_peer(&PeerSpec {
            public_key: c_dev.public_key().to_string(),
            endpoint: None,
            allowed_ips: vec![c_range],
            persistent_keepalive: None,
        })
        .unwrap();
    // Both B and C own the contested address locally, so either can send from it.
    for node in [b, c] {
        node.netns()
            .ip(&["addr", "add", &format!("{contested}/32"), "dev", "lo"])
            .unwrap();
    }
    let from_contested = |node: &Node, count: &str| {
        ping_args(
            node.netns(),
            &[
                "-n",
                "-q",
                "-c",
                count,
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                &contested.to_string(),
                &target.ipv4().to_string(),
            ],
        )
    };

    // Sessions with both peers exist, and C's packets from its /25 arrive (and the replies
    // route back to C, the more specific owner).
    ping(b.pods()[0].netns(), target.ipv4().into(), 2).unwrap();
    from_contested(c, "2").expect("C's own packets from its /25 must arrive");

    let echos_before = icmp_in_echos(target.netns());
    let rx_before = peer_dump(a_dev, b_dev.public_key()).rx_bytes;
    // B sends 3 authenticated echo requests claiming C's address. Whatever happens to them,
    // B gets no reply (a delivered one would be answered to C), so only counters tell.
    let _ = from_contested(b, "3");
    let rx_after = peer_dump(a_dev, b_dev.public_key()).rx_bytes;
    assert!(
        rx_after >= rx_before + 3 * DATA_ECHO,
        "node 1 must have received B's 3 packets (rx {rx_before} → {rx_after})"
    );
    assert_eq!(
        icmp_in_echos(target.netns()),
        echos_before,
        "packets from B with a source in C's /25 reached the pod"
    );

    // C still gets through, and so does B from its own part of the /24.
    from_contested(c, "2").expect("C's own packets from its /25 must still arrive");
    ping(b.pods()[1].netns(), target.ipv4().into(), 2).unwrap();
    assert!(icmp_in_echos(target.netns()) >= echos_before + 4);
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

// ---------------------------------------------------------------------------------------
// 3. Private key change
// ---------------------------------------------------------------------------------------

/// After traffic, node 1 (tailsk8s) gets a new private key and node 2 replaces the old public
/// key with the new one. Node 1's old sessions are now useless; it must drop them and
/// handshake on the next packet, so a ping succeeds at once — well before the 5 s
/// Rekey-Timeout a stale session would cost.
fn private_key_change(other: Impl) {
    let topo = two_nodes();
    let mut mesh = Mesh::start(&topo, &[Impl::Tailsk8s, other]).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (a0, b0) = (&a.pods()[0], &b.pods()[0]);
    ping(a0.netns(), b0.ipv4().into(), 2).unwrap();

    let (changer, watcher) = (&mesh.devices()[0], &mesh.devices()[1]);
    let old_public = changer.public_key().to_string();
    let (private, new_public) = key_pair();
    process::run_with_input(
        a.netns().command("wg").unwrap().args([
            "set",
            changer.ifname(),
            "private-key",
            "/dev/stdin",
        ]),
        private.as_bytes(),
    )
    .unwrap();
    assert_eq!(
        changer.dump().unwrap().interface.public_key.as_deref(),
        Some(new_public.as_str())
    );
    let endpoint = SocketAddr::new(a.underlay_v4().into(), PORT).to_string();
    let allowed = allowed_ips_arg(&a.pod_cidrs());
    watcher
        .set(&[
            "peer",
            &old_public,
            "remove",
            "peer",
            &new_public,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ])
        .unwrap();

    let started = Instant::now();
    ping_with_deadline(a0.netns(), b0.ipv4().into(), 1, Duration::from_secs(2))
        .expect("traffic must resume at once after a private key change");
    eprintln!("first reply {:?} after the key change", started.elapsed());
    assert!(peer_dump(watcher, &new_public).latest_handshake.is_some());
    // The other direction uses the new session too.
    ping_with_deadline(b0.netns(), a0.ipv6().into(), 1, Duration::from_secs(2)).unwrap();
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

#[test]
fn private_key_change_handshakes_immediately() {
    if !require_netns() {
        return;
    }
    private_key_change(Impl::Tailsk8s);
}

#[test]
fn private_key_change_handshakes_immediately_with_wireguard_go() {
    if !require_netns() {
        return;
    }
    private_key_change(Impl::WireguardGo);
}

// ---------------------------------------------------------------------------------------
// 4. NAT with persistent keepalive
// ---------------------------------------------------------------------------------------

/// The inside network between node 1 and the NAT box (the outside one is the harness's
/// 198.18.0.0/24).
const INSIDE_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const NAT_INSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
const NAT_OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// Replaces the direct underlay of a two-node topology with a router namespace that
/// masquerades node 1 (inside, 198.18.1.1) behind 198.18.0.254. Node 2 gets no route to the
/// inside network: only the NAT's mapping leads there.
fn nat_box(inside: &Node, outside: &Node) -> Netns {
    let nat = Netns::new("nat").unwrap();
    nat.sysctl(&[("net.ipv4.ip_forward", "1")]).unwrap();
    // Deleting one end of the harness's veth pair deletes both.
    inside.netns().ip(&["link", "del", UNDERLAY_IF]).unwrap();
    nat.ip_batch(&[
        format!(
            "link add in0 type veth peer name {UNDERLAY_IF} netns {}",
            inside.netns().name()
        ),
        format!(
            "link add out0 type veth peer name {UNDERLAY_IF} netns {}",
            outside.netns().name()
        ),
        format!("addr add {NAT_INSIDE}/24 dev in0"),
        format!("addr add {NAT_OUTSIDE}/24 dev out0"),
        "link set in0 up".to_string(),
        "link set out0 up".to_string(),
    ])
    .unwrap();
    inside
        .netns()
        .ip_batch(&[
            format!("addr add {INSIDE_NODE}/24 dev {UNDERLAY_IF}"),
            format!("link set {UNDERLAY_IF} up"),
            format!("route add 198.18.0.0/24 via {NAT_INSIDE}"),
        ])
        .unwrap();
    outside
        .netns()
        .ip_batch(&[
            format!("addr add {}/24 dev {UNDERLAY_IF}", outside.underlay_v4()),
            format!("link set {UNDERLAY_IF} up"),
        ])
        .unwrap();
    let rules = "table ip tsk_nat {\n\
                   chain postrouting {\n\
                     type nat hook postrouting priority srcnat; policy accept;\n\
                     oifname \"out0\" masquerade\n\
                   }\n\
                 }\n";
    process::run_with_input(
        nat.command("nft").unwrap().args(["-f", "-"]),
        rules.as_bytes(),
    )
    .unwrap();
    nat
}

/// Starts `implementation` on `node` with the default port and MTU, routing `remote`'s pod
/// CIDRs into the tunnel; the peer is configured by the caller.
fn device_on<'a>(implementation: Impl, node: &'a Node, remote: &Node) -> WgDevice<'a> {
    let device = WgDevice::start(implementation, node.netns()).unwrap();
    device.set_listen_port(PORT).unwrap();
    device.link_up(MeshOptions::default().mtu).expect("link up");
    for cidr in remote.pod_cidrs() {
        device.route(&cidr).unwrap();
    }
    device
}

/// Node 1 sits behind the NAT box with persistent-keepalive 1 and an endpoint for node 2;
/// node 2 has no endpoint for node 1. The keepalive alone must teach node 2 the NATed
/// endpoint, keep the mapping alive, and let node 2's pods reach node 1's.
fn nat_traversal(inside_impl: Impl, outside_impl: Impl) {
    let topo = two_nodes();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let _nat = nat_box(a, b);
    let mut outside = device_on(outside_impl, b, a);
    let mut inside = device_on(inside_impl, a, b);
    outside
        .set_peer(&PeerSpec {
            public_key: inside.public_key().to_string(),
            endpoint: None,
            allowed_ips: a.pod_cidrs(),
            persistent_keepalive: None,
        })
        .unwrap();
    assert_eq!(endpoint_of(&outside, inside.public_key()), None);
    // Without a way in, node 2 cannot reach node 1's pods.
    assert!(ping_with_deadline(
        b.pods()[0].netns(),
        a.pods()[0].ipv4().into(),
        1,
        Duration::from_secs(1)
    )
    .is_err());

    inside
        .set_peer(&PeerSpec {
            public_key: outside.public_key().to_string(),
            endpoint: Some(SocketAddr::new(b.underlay_v4().into(), PORT)),
            allowed_ips: b.pod_cidrs(),
            persistent_keepalive: Some(1),
        })
        .unwrap();
    let learned = wait::until(
        "node 2 learns node 1's NATed endpoint",
        Duration::from_secs(10),
        || Ok(endpoint_of(&outside, inside.public_key())),
    )
    .unwrap();
    assert_eq!(
        learned.ip(),
        IpAddr::from(NAT_OUTSIDE),
        "the endpoint must be the NAT's outside address"
    );
    for v6 in [false, true] {
        ping(b.pods()[0].netns(), a.pods()[1].ip(v6), 2).unwrap();
    }
    // The keepalives keep coming with no traffic to carry.
    let rx = peer_dump(&outside, inside.public_key()).rx_bytes;
    wait::until(
        "another persistent keepalive",
        Duration::from_secs(4),
        || Ok((peer_dump(&outside, inside.public_key()).rx_bytes > rx).then_some(())),
    )
    .unwrap();
    assert_running(&mut inside);
    assert_running(&mut outside);
}

#[test]
fn nat_persistent_keepalive_teaches_the_outside_peer_the_endpoint() {
    if !gate::require_netns_with(&[("nft", "nftables")]) {
        return;
    }
    nat_traversal(Impl::Tailsk8s, Impl::Tailsk8s);
}

#[test]
fn nat_persistent_keepalive_from_tailsk8s_teaches_wireguard_go() {
    if !gate::require_netns_with(&[("nft", "nftables")]) {
        return;
    }
    nat_traversal(Impl::Tailsk8s, Impl::WireguardGo);
}

// ---------------------------------------------------------------------------------------
// 5. Reply from the address the peer used
// ---------------------------------------------------------------------------------------

/// Node 1 has a second underlay address and node 2 uses it as node 1's endpoint. The kernel
/// would pick node 1's primary address as the source of an unbound reply; node 1's router
/// must answer (and keep sending) from the address node 2 used, or node 2 would roam its
/// endpoint to the primary.
fn reply_from_used_address(family: EndpointFamily) {
    let v6 = family == EndpointFamily::V6;
    let topo = two_nodes();
    let mut mesh = pair(&topo, family);
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let secondary: IpAddr = if v6 {
        Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x11).into()
    } else {
        Ipv4Addr::new(198, 18, 0, 11).into()
    };
    a.netns()
        .ip_batch(&[format!(
            "addr add {} dev {UNDERLAY_IF}",
            underlay_addr_args(secondary).join(" ")
        )])
        .unwrap();
    let responder_key = mesh.devices()[0].public_key().to_string();
    let used = SocketAddr::new(secondary, PORT);
    mesh.devices()[1]
        .set(&["peer", &responder_key, "endpoint", &used.to_string()])
        .unwrap();

    // Node 2 initiates towards the secondary address…
    ping(b.pods()[0].netns(), a.pods()[0].ipv4().into(), 2).unwrap();
    assert_eq!(
        endpoint_of(&mesh.devices()[1], &responder_key),
        Some(used),
        "node 1 answered from another address than the one node 2 used"
    );
    // …and node 1's own traffic keeps leaving from it.
    ping(a.pods()[1].netns(), b.pods()[1].ipv6().into(), 2).unwrap();
    assert_eq!(endpoint_of(&mesh.devices()[1], &responder_key), Some(used));
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

#[test]
fn replies_leave_from_the_ipv4_address_the_peer_used() {
    if !require_netns() {
        return;
    }
    reply_from_used_address(EndpointFamily::V4);
}

#[test]
fn replies_leave_from_the_ipv6_address_the_peer_used() {
    if !require_netns() {
        return;
    }
    reply_from_used_address(EndpointFamily::V6);
}

// ---------------------------------------------------------------------------------------
// 6. Wire-exact transfer counters
// ---------------------------------------------------------------------------------------

/// Handshake initiation on the wire (type, sender, ephemeral, static, timestamp, MACs).
const HANDSHAKE_INITIATION: u64 = 148;
/// Handshake response.
const HANDSHAKE_RESPONSE: u64 = 92;
/// A data message carrying nothing (header 16 + tag 16).
const KEEPALIVE: u64 = 32;
/// A data message carrying one 84-byte IPv4 echo (`ping -s 56`), padded to 96.
const DATA_ECHO: u64 = KEEPALIVE + 84_u64.div_ceil(16) * 16;
const PINGS: u64 = 10;

/// A fresh pair, then exactly 10 echo requests from node 1's pod. The initiator sent the
/// initiation and 10 requests (1428 bytes), plus possibly one keepalive that confirms the
/// session right after the response (1460: the kernel's selftest accepts both; boringtun
/// always sends it); it received the response and 10 replies (1372). The responder saw
/// exactly the mirror image. The pings take ~2 s, far inside the 10 s passive-keepalive
/// window, so no timer-driven keepalive can slip in, and no other packet is routed into the
/// tunnel. The TUN's own link counters count inner bytes, so only `wg show` is checked.
fn transfer_counters(initiator: Impl, responder: Impl) {
    let topo = two_nodes();
    let mut mesh = Mesh::start(&topo, &[initiator, responder]).unwrap();
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let count = PINGS.to_string();
    let out = ping_args(
        a.pods()[0].netns(),
        &[
            "-n",
            "-q",
            "-c",
            &count,
            "-s",
            "56",
            "-i",
            "0.2",
            "-W",
            "2",
            &b.pods()[0].ipv4().to_string(),
        ],
    )
    .unwrap();
    assert!(
        out.contains(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "{out}"
    );

    let (i_dev, r_dev) = (&mesh.devices()[0], &mesh.devices()[1]);
    let seen_by_initiator = peer_dump(i_dev, r_dev.public_key());
    let seen_by_responder = peer_dump(r_dev, i_dev.public_key());
    eprintln!(
        "{} → {}: initiator rx {} tx {}, responder rx {} tx {}",
        initiator.name(),
        responder.name(),
        seen_by_initiator.rx_bytes,
        seen_by_initiator.tx_bytes,
        seen_by_responder.rx_bytes,
        seen_by_responder.tx_bytes
    );
    let sent = HANDSHAKE_INITIATION + PINGS * DATA_ECHO;
    let received = HANDSHAKE_RESPONSE + PINGS * DATA_ECHO;
    assert_eq!((sent, received), (1428, 1372), "the kernel's numbers");
    assert_eq!(
        seen_by_initiator.rx_bytes, received,
        "initiator rx: {seen_by_initiator:?}"
    );
    assert!(
        [sent, sent + KEEPALIVE].contains(&seen_by_initiator.tx_bytes),
        "initiator tx: {seen_by_initiator:?}"
    );
    assert_eq!(
        seen_by_responder.tx_bytes, received,
        "responder tx: {seen_by_responder:?}"
    );
    assert_eq!(
        seen_by_responder.rx_bytes, seen_by_initiator.tx_bytes,
        "responder rx must equal initiator tx: {seen_by_responder:?}"
    );
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

#[test]
fn transfer_counters_are_wire_exact() {
    if !require_netns() {
        return;
    }
    transfer_counters(Impl::Tailsk8s, Impl::Tailsk8s);
}

#[test]
fn transfer_counters_match_wireguard_go_as_responder() {
    if !require_netns() {
        return;
    }
    transfer_counters(Impl::Tailsk8s, Impl::WireguardGo);
}

#[test]
fn transfer_counters_match_wireguard_go_as_initiator() {
    if !require_netns() {
        return;
    }
    transfer_counters(Impl::WireguardGo, Impl::Tailsk8s);
}

// ---------------------------------------------------------------------------------------
// 7. Big MTU
// ---------------------------------------------------------------------------------------

/// The selftest's big MTU: 34816 − 1500 + the default 1420.
const BIG_MTU: u32 = 34736;
/// ICMP payload of the big pings: 20028 bytes of IPv4, 20048 of IPv6.
const BIG_PING: &str = "20000";

/// Two tailsk8s nodes whose underlay links have `underlay_mtu`, with tunnel MTU [`BIG_MTU`]
/// (set by `ip link set mtu` after the routers started, as the harness always does).
fn big_mtu_pair(topo: &Topology, underlay_mtu: u32, endpoints: EndpointFamily) -> Mesh<'_> {
    for node in topo.nodes() {
        node.netns()
            .ip(&["link", "set", UNDERLAY_IF, "mtu", &underlay_mtu.to_string()])
            .unwrap();
    }
    let options = MeshOptions {
        endpoints,
        mtu: BIG_MTU,
        ..Default::default()
    };
    Mesh::start_with(topo, &[Impl::Tailsk8s, Impl::Tailsk8s], &options).unwrap()
}

/// Unfragmentable big pings both ways, over both inner families, between the nodes' bridge
/// addresses: they lie in the pod CIDRs, so the cryptokey check passes, and the pods' own
/// 1500-byte links stay out of the way.
fn assert_big_pings_cross(topo: &Topology, what: &str) {
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    for (from, to) in [(a, b), (b, a)] {
        for (src, dst) in [
            (IpAddr::from(from.bridge_v4()), IpAddr::from(to.bridge_v4())),
            (from.bridge_v6().into(), to.bridge_v6().into()),
        ] {
            let (src, dst) = (src.to_string(), dst.to_string());
            ping_args(
                from.netns(),
                &[
                    "-n", "-q", "-c", "2", "-i", "0.2", "-w", "10", "-s", BIG_PING, "-M", "do",
                    "-I", &src, &dst,
                ],
            )
            .unwrap_or_else(|e| panic!("{what}: {BIG_PING}-byte ping {src} → {dst}: {e:#}"));
        }
    }
}

/// Waits until both routers carry a [`BIG_PING`] packet, i.e. have adopted the raised link
/// MTU (tailsk8s polls it about once a second). The probe is not DF (`-M dont`, and echo
/// replies are never DF): a router that still has the old MTU drops it silently. A DF probe
/// would instead get "fragmentation needed, MTU 1420" back, which the sending kernel caches
/// for the destination for 10 minutes (`net.ipv4.route.mtu_expires`) and which would then
/// fail the real, DF checks. One reply proves both routers passed a big packet.
fn wait_for_big_mtu(topo: &Topology) {
    let [a, b] = topo.nodes() else {
        panic!("two nodes")
    };
    let (src, dst) = (a.bridge_v4().to_string(), b.bridge_v4().to_string());
    wait::until(
        "a big non-DF ping crossing (both routers adopted the MTU and sent the ~20 kB datagram)",
        Duration::from_secs(10),
        || {
            Ok(ping_args(
                a.netns(),
                &[
                    "-n", "-q", "-c", "1", "-W", "1", "-s", BIG_PING, "-M", "dont", "-I", &src,
                    &dst,
                ],
            )
            .ok())
        },
    )
    .unwrap();
}

/// Big MTU over an underlay that carries the whole encrypted datagram (~20 kB): the
/// routers' buffers and offload paths must pass a big datagram unharmed.
#[test]
fn big_mtu_over_a_jumbo_underlay() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mut mesh = big_mtu_pair(&topo, 65535, EndpointFamily::V4);
    wait_for_big_mtu(&topo);
    assert_big_pings_cross(&topo, "underlay MTU 65535");
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

/// Big MTU over a 1500-byte underlay: the sending kernel fragments the outer UDP datagram and
/// the receiving one reassembles it, as with the kernel's WireGuard, whose outer packets
/// leave with DF clear. A router that forced DF on its socket, or sent the datagram as a UDP
/// GSO segment larger than the path MTU, fails here.
fn big_mtu_fragmenting(family: EndpointFamily) {
    let topo = two_nodes();
    let mut mesh = big_mtu_pair(&topo, 1500, family);
    wait_for_big_mtu(&topo);
    assert_big_pings_cross(&topo, "underlay MTU 1500");
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}

#[test]
fn big_mtu_over_a_fragmenting_ipv4_underlay() {
    if !require_netns() {
        return;
    }
    big_mtu_fragmenting(EndpointFamily::V4);
}

#[test]
fn big_mtu_over_a_fragmenting_ipv6_underlay() {
    if !require_netns() {
        return;
    }
    big_mtu_fragmenting(EndpointFamily::V6);
}

/// The kernel's selftest raises the MTU and pings at once. The routers must use the new MTU
/// as soon as `ip link set mtu` returns; a router that lags answers the first big packets
/// with "fragmentation needed, MTU 1420", and the sender's kernel then caches that PMTU for
/// the destination for 10 minutes.
#[test]
fn big_mtu_works_as_soon_as_the_link_mtu_is_raised() {
    if !require_netns() {
        return;
    }
    let topo = two_nodes();
    let mut mesh = big_mtu_pair(&topo, 65535, EndpointFamily::V4);
    assert_big_pings_cross(&topo, "right after ip link set mtu");
    for device in mesh.devices_mut() {
        assert_running(device);
    }
}
