//! `udp_datagram`: datagrams from the network into two engines.
//!
//! Engine A (index 0) holds an established session with remote peer R and knows a second
//! peer S; engine B (index 1) knows R but has no session. Three remote `Tunn`s produce genuine
//! traffic: R→A, R→B and X→A, where X is a key A does not know. The input is a sequence of
//! operations (see [`Op`]): raw bytes from the fuzzer, genuine datagrams a remote encrypted
//! (any plaintext, spoofed inner sources included), replays of them to either engine from any
//! address, and mutations of them. Whatever an engine sends back goes to the remote that
//! produced the datagram it answers, and what that remote replies joins the genuine traffic,
//! so handshakes with B can complete inside one input.
//!
//! Invariants:
//! - a packet reaches an engine's TUN only when the datagram is, byte for byte, a data message
//!   a remote encrypted for THAT engine, delivered for the first time; the packet is a
//!   well-formed IP packet (whole header, length field equal to its length, as the kernel
//!   requires) and (a prefix of) a plaintext that remote encrypted; and its inner source lies
//!   in the allowed IPs that engine gives the remote;
//! - raw fuzzer bytes (which cannot authenticate) produce no output and change no peer state
//!   (endpoint, counters, handshake time, keys, allowed IPs);
//! - every reply goes to the address the datagram came from.

use std::collections::HashSet;
use std::net::SocketAddr;

use ipnet::IpNet;
use tailsk8s_dataplane::allowed_ips::NaiveAllowedIps;
use tailsk8s_dataplane::config::PeerSnapshot;

use crate::input::{Choices, Writer};
use crate::support::{addr, establish, ip, local, net, Capture, Local, Remote};

/// Operations per input, so one input stays fast however long it is.
const MAX_OPS: usize = 64;

const ENGINE_A: usize = 0;
const ENGINE_B: usize = 1;

/// Remote links: which remote talks to which engine.
const R_TO_A: usize = 0;
const R_TO_B: usize = 1;
const X_TO_A: usize = 2;
const REMOTES: usize = 3;

/// Addresses a datagram may claim to come from.
const SOURCES: [&str; 4] = [
    "198.18.0.2:51820",
    "198.18.0.99:4000",
    "[fd00:18::2]:51820",
    "198.18.0.3:51820",
];

/// One step of an input. Encoding: an op byte (mod 5) then the fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// 0: arbitrary bytes to an engine.
    Raw {
        engine: u8,
        source: u8,
        to_own_ip: bool,
        bytes: Vec<u8>,
    },
    /// 1: a remote encrypts `plaintext` (a data message, or an initiation if it has no
    /// session); the result joins the genuine traffic without being delivered.
    Encrypt { remote: u8, plaintext: Vec<u8> },
    /// 2: a remote starts a fresh handshake.
    Initiate { remote: u8 },
    /// 3: genuine datagram number `wire` (mod their count) to an engine; `engine` 0 means the
    /// one it was made for, 1 the other one.
    Deliver {
        wire: u16,
        engine: u8,
        source: u8,
        to_own_ip: bool,
    },
    /// 4: like Deliver, after changing the datagram: kind 0 xors `value` into byte `at`,
    /// 1 truncates to `at` bytes, 2 appends `value` repeated `at % 64` times.
    Mutate {
        wire: u16,
        engine: u8,
        source: u8,
        kind: u8,
        at: u16,
        value: u8,
    },
}

impl Op {
    pub fn decode(c: &mut Choices<'_>) -> Op {
        match c.byte() % 5 {
            0 => Op::Raw {
                engine: c.byte(),
                source: c.byte(),
                to_own_ip: c.bool(),
                bytes: c.bytes().to_vec(),
            },
            1 => Op::Encrypt {
                remote: c.byte(),
                plaintext: c.bytes().to_vec(),
            },
            2 => Op::Initiate { remote: c.byte() },
            3 => Op::Deliver {
                wire: c.u16(),
                engine: c.byte(),
                source: c.byte(),
                to_own_ip: c.bool(),
            },
            _ => Op::Mutate {
                wire: c.u16(),
                engine: c.byte(),
                source: c.byte(),
                kind: c.byte(),
                at: c.u16(),
                value: c.byte(),
            },
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        match self {
            Op::Raw {
                engine,
                source,
                to_own_ip,
                bytes,
            } => {
                w.byte(0)
                    .byte(*engine)
                    .byte(*source)
                    .byte(u8::from(*to_own_ip))
                    .bytes(bytes);
            }
            Op::Encrypt { remote, plaintext } => {
                w.byte(1).byte(*remote).bytes(plaintext);
            }
            Op::Initiate { remote } => {
                w.byte(2).byte(*remote);
            }
            Op::Deliver {
                wire,
                engine,
                source,
                to_own_ip,
            } => {
                w.byte(3)
                    .u16(*wire)
                    .byte(*engine)
                    .byte(*source)
                    .byte(u8::from(*to_own_ip));
            }
            Op::Mutate {
                wire,
                engine,
                source,
                kind,
                at,
                value,
            } => {
                w.byte(4)
                    .u16(*wire)
                    .byte(*engine)
                    .byte(*source)
                    .byte(*kind)
                    .u16(*at)
                    .byte(*value);
            }
        }
    }
}

/// Encodes a sequence of operations as one input.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::new();
    for op in ops {
        op.encode(&mut w);
    }
    w.finish()
}

/// A datagram a remote produced.
struct Wire {
    bytes: Vec<u8>,
    remote: usize,
}

struct Link {
    remote: Remote,
    engine: usize,
    /// Every plaintext this remote was asked to encrypt.
    plaintexts: Vec<Vec<u8>>,
}

struct World {
    engines: [Local; 2],
    links: Vec<Link>,
    /// R's allowed IPs as each engine has them (A and B give R the same ones).
    r_allowed: NaiveAllowedIps<()>,
    wires: Vec<Wire>,
    /// (engine, wire) pairs that already put a packet on that engine's TUN.
    delivered: HashSet<(usize, usize)>,
}

fn r_prefixes() -> [IpNet; 2] {
    [net("198.19.2.0/24"), net("fd00:19:2::/64")]
}

impl World {
    fn new() -> World {
        let mut a = local(1, "198.18.0.1:51820");
        let b = local(5, "198.18.0.11:51820");
        let mut r_to_a = Remote::new(2, a.public, SOURCES[0], 1);
        let r_to_b = Remote::new(2, b.public, SOURCES[0], 2);
        let x_to_a = Remote::new(3, a.public, SOURCES[3], 1);
        let s = crate::support::fixed_private_key(4).public_key();

        a.add_peer(r_to_a.public, Some(r_to_a.addr), &r_prefixes());
        a.add_peer(s, Some(addr("198.18.0.4:51820")), &[net("198.19.3.0/24")]);
        b.add_peer(r_to_b.public, Some(r_to_b.addr), &r_prefixes());
        establish(&mut a, &mut r_to_a);

        let mut r_allowed = NaiveAllowedIps::new();
        for prefix in r_prefixes() {
            r_allowed.insert(prefix, ());
        }
        let link = |remote, engine| Link {
            remote,
            engine,
            plaintexts: Vec::new(),
        };
        World {
            engines: [a, b],
            links: vec![
                link(r_to_a, ENGINE_A),
                link(r_to_b, ENGINE_B),
                link(x_to_a, ENGINE_A),
            ],
            r_allowed,
            wires: Vec::new(),
            delivered: HashSet::new(),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Raw {
                engine,
                source,
                to_own_ip,
                bytes,
            } => self.raw(
                usize::from(engine % 2),
                source_addr(source),
                to_own_ip,
                &bytes,
            ),
            Op::Encrypt { remote, plaintext } => {
                let link = &mut self.links[usize::from(remote) % REMOTES];
                link.plaintexts.push(plaintext.clone());
                if let Some(datagram) = link.remote.encapsulate(&plaintext) {
                    self.wires.push(Wire {
                        bytes: datagram,
                        remote: usize::from(remote) % REMOTES,
                    });
                }
            }
            Op::Initiate { remote } => {
                let index = usize::from(remote) % REMOTES;
                if let Some(datagram) = self.links[index].remote.initiation() {
                    self.wires.push(Wire {
                        bytes: datagram,
                        remote: index,
                    });
                }
            }
            Op::Deliver {
                wire,
                engine,
                source,
                to_own_ip,
            } => {
                let Some(index) = self.pick(wire) else { return };
                let bytes = self.wires[index].bytes.clone();
                let engine = self.engine_for(index, engine);
                self.deliver(engine, source_addr(source), to_own_ip, index, &bytes);
            }
            Op::Mutate {
                wire,
                engine,
                source,
                kind,
                at,
                value,
            } => {
                let Some(index) = self.pick(wire) else { return };
                let mut bytes = self.wires[index].bytes.clone();
                mutate(&mut bytes, kind, at, value);
                let engine = self.engine_for(index, engine);
                self.deliver(engine, source_addr(source), true, index, &bytes);
            }
        }
    }

    fn pick(&self, wire: u16) -> Option<usize> {
        (!self.wires.is_empty()).then(|| usize::from(wire) % self.wires.len())
    }

    fn engine_for(&self, wire: usize, choice: u8) -> usize {
        let intended = self.links[self.wires[wire].remote].engine;
        if choice.is_multiple_of(2) {
            intended
        } else {
            1 - intended
        }
    }

    fn is_genuine(&self, bytes: &[u8]) -> bool {
        self.wires.iter().any(|w| w.bytes == bytes)
    }

    fn raw(&mut self, engine: usize, from: SocketAddr, to_own_ip: bool, bytes: &[u8]) {
        if self.is_genuine(bytes) {
            // Cannot happen without the session keys, but then it is not "raw".
            return;
        }
        // Drops are counted against the peer a datagram's receiver index names (claimed, so
        // raw bytes may claim one): everything else about the peers must stay.
        let state = |peers: Vec<PeerSnapshot>| -> Vec<PeerSnapshot> {
            peers
                .into_iter()
                .map(|p| PeerSnapshot {
                    drops: Default::default(),
                    ..p
                })
                .collect()
        };
        let before = state(self.engines[engine].peers());
        let out = self.engines[engine].net_in_at(
            from,
            to_own_ip.then_some(self.engines[engine].addr.ip()),
            bytes,
        );
        assert!(
            out.tun.is_empty(),
            "raw bytes from {from} reached engine {engine}'s TUN"
        );
        assert!(
            out.sent.is_empty(),
            "raw bytes from {from} made engine {engine} send {} datagrams",
            out.sent.len()
        );
        assert!(
            state(self.engines[engine].peers()) == before,
            "raw bytes from {from} changed engine {engine}'s peer state"
        );
    }

    /// Delivers `bytes`, derived from genuine datagram `wire`, and checks the outcome.
    fn deliver(
        &mut self,
        engine: usize,
        from: SocketAddr,
        to_own_ip: bool,
        wire: usize,
        bytes: &[u8],
    ) {
        let out = self.engines[engine].net_in_at(
            from,
            to_own_ip.then_some(self.engines[engine].addr.ip()),
            bytes,
        );
        self.check_tun(engine, wire, bytes, &out);
        let remote = self.wires[wire].remote;
        let engine_ip = self.engines[engine].addr.ip();
        for (to, reply) in &out.sent {
            assert_eq!(
                to.addr, from,
                "a reply went elsewhere than its datagram came from"
            );
            let got = self.links[remote].remote.receive(engine_ip, reply);
            for datagram in got.replies {
                self.wires.push(Wire {
                    bytes: datagram,
                    remote,
                });
            }
        }
    }

    fn check_tun(&mut self, engine: usize, wire: usize, bytes: &[u8], out: &Capture) {
        if out.tun.is_empty() {
            return;
        }
        assert_eq!(
            out.tun.len(),
            1,
            "one datagram wrote {} packets",
            out.tun.len()
        );
        let packet = &out.tun[0];
        let link = &self.links[self.wires[wire].remote];
        assert!(
            self.wires[wire].bytes == bytes,
            "a modified datagram reached engine {engine}'s TUN"
        );
        assert_eq!(
            link.engine, engine,
            "a datagram encrypted for engine {} reached engine {engine}'s TUN",
            link.engine
        );
        assert_eq!(
            bytes.first(),
            Some(&4),
            "a non-data message reached the TUN"
        );
        assert!(
            self.delivered.insert((engine, wire)),
            "a replayed datagram reached engine {engine}'s TUN again"
        );
        // What the kernel's WireGuard accepts after decryption: a whole IP header whose
        // length field matches the packet (it drops "dishonest packet sizes").
        let header = match ip::version(packet) {
            Some(4) => 20,
            Some(6) => 40,
            _ => usize::MAX,
        };
        assert!(
            packet.len() >= header && ip::claimed_len(packet) == Some(packet.len()),
            "a malformed packet ({} bytes, header claims {:?}) reached engine {engine}'s TUN",
            packet.len(),
            ip::claimed_len(packet)
        );
        assert!(
            link.plaintexts
                .iter()
                .any(|p| !packet.is_empty() && p.starts_with(packet)),
            "the TUN got a packet the remote never sent"
        );
        let Some(source) = ip::source(packet) else {
            panic!("a packet without a source address reached the TUN");
        };
        let allowed = match self.wires[wire].remote {
            R_TO_A | R_TO_B => self.r_allowed.lookup(source).is_some(),
            // X is no peer of A's: nothing of X's may ever be delivered.
            _ => false,
        };
        assert!(
            allowed,
            "inner source {source} is outside the sending peer's allowed IPs"
        );
    }
}

fn source_addr(choice: u8) -> SocketAddr {
    addr(SOURCES[usize::from(choice) % SOURCES.len()])
}

fn mutate(bytes: &mut Vec<u8>, kind: u8, at: u16, value: u8) {
    let at = usize::from(at);
    match kind % 3 {
        0 => {
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] ^= value;
            }
        }
        1 => bytes.truncate(at),
        _ => bytes.extend(std::iter::repeat_n(value, at % 64)),
    }
}

/// The target body.
pub fn run(data: &[u8]) {
    let mut world = World::new();
    let mut choices = Choices::new(data);
    for _ in 0..MAX_OPS {
        if choices.is_empty() {
            break;
        }
        world.apply(Op::decode(&mut choices));
    }
}

/// Seeds: the conversations worth starting from.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::packets::*;
    let ping = icmp_v4("198.19.2.9", "198.19.1.1", 16);
    let ping6 = icmp_v6("fd00:19:2::9", "fd00:19:1::1", 16);
    let spoofed = icmp_v4("198.19.3.9", "198.19.1.1", 16);
    let encrypt = |remote: usize, p: &[u8]| Op::Encrypt {
        remote: remote as u8,
        plaintext: p.to_vec(),
    };
    let deliver = |wire: u16, engine: u8, source: u8| Op::Deliver {
        wire,
        engine,
        source,
        to_own_ip: true,
    };
    let raw = |engine: u8, bytes: Vec<u8>| Op::Raw {
        engine,
        source: 0,
        to_own_ip: true,
        bytes,
    };
    let mut data_header = vec![4, 0, 0, 0, 1, 1, 0, 0];
    data_header.extend_from_slice(&[0; 8 + 16 + 16]);
    let mut init = vec![1, 0, 0, 0];
    init.resize(148, 0x42);
    let mut response = vec![2, 0, 0, 0, 9, 9, 9, 9, 1, 1, 0, 0];
    response.resize(92, 0);
    let mut cookie = vec![3, 0, 0, 0, 1, 1, 0, 0];
    cookie.resize(64, 0);
    let all = [
        (
            "data-to-a",
            vec![encrypt(R_TO_A, &ping), deliver(0, 0, 0), deliver(0, 0, 1)],
        ),
        (
            "data-v6-roams",
            vec![encrypt(R_TO_A, &ping6), deliver(0, 0, 2)],
        ),
        (
            "spoofed-inner-source",
            vec![encrypt(R_TO_A, &spoofed), deliver(0, 0, 0)],
        ),
        (
            "data-to-the-wrong-engine",
            vec![encrypt(R_TO_A, &ping), deliver(0, 1, 0)],
        ),
        (
            "handshake-with-b",
            vec![
                encrypt(R_TO_B, &ping),
                deliver(0, 0, 0),
                deliver(1, 0, 0),
                encrypt(R_TO_B, &ping6),
                deliver(2, 0, 0),
            ],
        ),
        (
            "unknown-initiator",
            vec![
                Op::Initiate {
                    remote: X_TO_A as u8,
                },
                deliver(0, 0, 3),
            ],
        ),
        (
            "mutated-data",
            vec![
                encrypt(R_TO_A, &ping),
                Op::Mutate {
                    wire: 0,
                    engine: 0,
                    source: 0,
                    kind: 0,
                    at: 40,
                    value: 0x80,
                },
            ],
        ),
        (
            "mac2-of-initiation",
            vec![
                Op::Initiate {
                    remote: R_TO_B as u8,
                },
                Op::Mutate {
                    wire: 0,
                    engine: 0,
                    source: 1,
                    kind: 0,
                    at: 147,
                    value: 1,
                },
            ],
        ),
        (
            "raw-shapes",
            vec![
                raw(0, data_header),
                raw(0, init),
                raw(1, response),
                raw(0, cookie),
                raw(1, vec![]),
            ],
        ),
    ];
    all.into_iter()
        .map(|(name, ops)| (name, encode(&ops)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_their_encoding() {
        for (name, seed) in seeds() {
            let mut c = Choices::new(&seed);
            let mut ops = Vec::new();
            while !c.is_empty() {
                ops.push(Op::decode(&mut c));
            }
            assert_eq!(encode(&ops), seed, "{name}");
        }
    }

    #[test]
    fn genuine_data_is_delivered_once_and_spoofed_sources_are_not() {
        let mut world = World::new();
        let ping = crate::packets::icmp_v4("198.19.2.9", "198.19.1.1", 16);
        world.apply(Op::Encrypt {
            remote: R_TO_A as u8,
            plaintext: ping.clone(),
        });
        let out = world.engines[ENGINE_A].net_in(addr(SOURCES[0]), &world.wires[0].bytes);
        assert_eq!(
            out.tun,
            vec![ping],
            "the harness's genuine path really delivers"
        );
        let again = world.engines[ENGINE_A].net_in(addr(SOURCES[0]), &world.wires[0].bytes);
        assert!(again.tun.is_empty());
    }

    #[test]
    fn b_completes_a_handshake_inside_one_input() {
        let mut world = World::new();
        let ping = crate::packets::icmp_v4("198.19.2.9", "198.19.1.1", 16);
        let seed = seeds()
            .into_iter()
            .find(|(name, _)| *name == "handshake-with-b")
            .map(|(_, s)| s)
            .unwrap_or_default();
        let mut c = Choices::new(&seed);
        while !c.is_empty() {
            world.apply(Op::decode(&mut c));
        }
        assert!(world.engines[ENGINE_B].peers()[0].last_handshake.is_some());
        assert!(
            world.delivered.iter().any(|(e, _)| *e == ENGINE_B),
            "B delivered a packet after the handshake"
        );
        let _ = ping;
    }

    #[test]
    #[should_panic(expected = "malformed packet")]
    fn the_oracle_catches_a_packet_shorter_than_its_header() {
        let mut world = World::new();
        // IPv4 with total length 0: boringtun hands the engine an empty packet for it.
        let mut lying = crate::packets::icmp_v4("198.19.2.9", "198.19.1.1", 16);
        lying[2..4].copy_from_slice(&[0, 0]);
        world.apply(Op::Encrypt {
            remote: R_TO_A as u8,
            plaintext: lying,
        });
        let bytes = world.wires[0].bytes.clone();
        let mut out = Capture::default();
        out.tun.push(Vec::new());
        world.check_tun(ENGINE_A, 0, &bytes, &out);
    }

    #[test]
    #[should_panic(expected = "inner source")]
    fn the_oracle_catches_a_spoofed_source_that_got_through() {
        let mut world = World::new();
        let spoofed = crate::packets::icmp_v4("198.19.3.9", "198.19.1.1", 16);
        world.apply(Op::Encrypt {
            remote: R_TO_A as u8,
            plaintext: spoofed.clone(),
        });
        let bytes = world.wires[0].bytes.clone();
        // Pretend the engine had delivered it.
        let mut out = Capture::default();
        out.tun.push(spoofed);
        world.check_tun(ENGINE_A, 0, &bytes, &out);
    }
}
