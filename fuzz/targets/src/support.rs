//! In-memory wiring for the engine targets: the data plane's fixture (its [`Capture`] sink,
//! and its `Node` as [`Local`], here with fixed keys: [`local`]), remote peers that are bare boringtun `Tunn`s ([`Remote`]), a handshake
//! between the two ([`establish`]), and an independent reading of IP headers ([`ip`]) that the
//! invariants are checked against.
//!
//! The remote side is a raw `Tunn` rather than a second engine on purpose: a `Tunn` encrypts
//! any plaintext it is given, so a target can make an authenticated peer send exactly the
//! bytes the fuzzer chose (bad headers, spoofed sources) — what a compromised or broken peer
//! can do. The engine's own tests (`dataplane/src/engine/tests.rs`) wire two engines instead.
//!
//! Setup failures panic: they are bugs in this harness, not findings, and show up on the very
//! first input of a run.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use ipnet::IpNet;
use tailsk8s_dataplane::engine::SCRATCH_LEN;
use tailsk8s_dataplane::key::Key;
pub use tailsk8s_dataplane::testing::{Capture, Node as Local};

/// A private key that is the same in every run, so seeds and crashes replay alike.
pub fn fixed_private_key(seed: u8) -> Key {
    Key([seed; 32]).clamped()
}

/// Parses a literal the harness itself wrote; a typo there is a harness bug.
pub fn net(s: &str) -> IpNet {
    s.parse()
        .unwrap_or_else(|_| panic!("harness prefix {s:?} does not parse"))
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("harness address {s:?} does not parse"))
}

pub fn ip_addr(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("harness address {s:?} does not parse"))
}

/// An engine under test with a fixed key ([`fixed_private_key`]`(seed)`) listening on
/// `address`: the data plane's own fixture node.
pub fn local(seed: u8, address: &str) -> Local {
    Local::new(fixed_private_key(seed), address, Instant::now())
}

/// What a remote peer did with a datagram from the engine.
#[derive(Debug, Default)]
pub struct Received {
    /// Datagrams it answers with (handshake responses, keepalives, queued data).
    pub replies: Vec<Vec<u8>>,
    /// Plaintext packets it decrypted.
    pub packets: Vec<Vec<u8>>,
}

/// A remote WireGuard peer reduced to its Noise state machine.
pub struct Remote {
    pub public: Key,
    pub addr: SocketAddr,
    tunn: Box<Tunn>,
    buf: Vec<u8>,
}

impl Remote {
    /// A peer with private key `seed` that talks to the engine whose public key is `engine`.
    pub fn new(seed: u8, engine: Key, address: &str, index: u32) -> Remote {
        let private = fixed_private_key(seed);
        Remote {
            public: private.public_key(),
            addr: addr(address),
            tunn: Box::new(Tunn::new(
                x25519_dalek::StaticSecret::from(private.0),
                x25519_dalek::PublicKey::from(engine.0),
                None,
                None,
                index,
                None,
            )),
            buf: vec![0u8; SCRATCH_LEN],
        }
    }

    /// Encrypts `plaintext` for the engine: a data message with a session, else a handshake
    /// initiation (the plaintext is queued). `None` when a handshake is already under way.
    pub fn encapsulate(&mut self, plaintext: &[u8]) -> Option<Vec<u8>> {
        match self.tunn.encapsulate(plaintext, &mut self.buf) {
            TunnResult::WriteToNetwork(d) => Some(d.to_vec()),
            _ => None,
        }
    }

    /// A fresh handshake initiation.
    pub fn initiation(&mut self) -> Option<Vec<u8>> {
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(d) => Some(d.to_vec()),
            _ => None,
        }
    }

    /// Takes a datagram the engine sent, including the follow-up calls boringtun asks for.
    pub fn receive(&mut self, from: IpAddr, datagram: &[u8]) -> Received {
        let mut out = Received::default();
        match self.tunn.decapsulate(Some(from), datagram, &mut self.buf) {
            TunnResult::WriteToNetwork(reply) => {
                out.replies.push(reply.to_vec());
                while let TunnResult::WriteToNetwork(queued) =
                    self.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    out.replies.push(queued.to_vec());
                }
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                out.packets.push(p.to_vec());
            }
            TunnResult::Done | TunnResult::Err(_) => {}
        }
        out
    }
}

/// Runs a complete handshake initiated by `remote`, leaving both sides with a confirmed
/// session (the engine has received the remote's first keepalive).
pub fn establish(local: &mut Local, remote: &mut Remote) {
    let Some(init) = remote.initiation() else {
        panic!("remote produced no handshake initiation");
    };
    let answer = local.net_in(remote.addr, &init);
    let [(_, response)] = answer.sent.as_slice() else {
        panic!(
            "engine answered an initiation with {} datagrams",
            answer.sent.len()
        );
    };
    let confirmed = remote.receive(local.addr.ip(), response);
    let [keepalive] = confirmed.replies.as_slice() else {
        panic!(
            "remote sent {} datagrams after the response",
            confirmed.replies.len()
        );
    };
    let done = local.net_in(remote.addr, keepalive);
    assert!(
        done.sent.is_empty() && done.tun.is_empty(),
        "a keepalive produced output"
    );
}

/// The harness's own, deliberately minimal reading of IP headers: the oracle the engine's
/// decisions are checked against. It is more lenient than the engine (it only needs the
/// addresses to be present), so "the engine acted ⇒ the oracle agrees" is a sound check.
pub mod ip {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn field<const N: usize>(p: &[u8], at: usize) -> Option<[u8; N]> {
        p.get(at..at + N)?.try_into().ok()
    }

    pub fn version(p: &[u8]) -> Option<u8> {
        p.first().map(|b| b >> 4)
    }

    pub fn source(p: &[u8]) -> Option<IpAddr> {
        match version(p)? {
            4 if p.len() >= 20 => Some(Ipv4Addr::from(field::<4>(p, 12)?).into()),
            6 if p.len() >= 40 => Some(Ipv6Addr::from(field::<16>(p, 8)?).into()),
            _ => None,
        }
    }

    pub fn destination(p: &[u8]) -> Option<IpAddr> {
        match version(p)? {
            4 if p.len() >= 20 => Some(Ipv4Addr::from(field::<4>(p, 16)?).into()),
            6 if p.len() >= 40 => Some(Ipv6Addr::from(field::<16>(p, 24)?).into()),
            _ => None,
        }
    }

    /// The length the header claims (IPv4 total length, IPv6 40 + payload length).
    pub fn claimed_len(p: &[u8]) -> Option<usize> {
        match version(p)? {
            4 => Some(usize::from(u16::from_be_bytes(field::<2>(p, 2)?))),
            6 => Some(40 + usize::from(u16::from_be_bytes(field::<2>(p, 4)?))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_session_carries_a_packet_both_ways() {
        let mut local = local(1, "198.18.0.1:51820");
        let mut remote = Remote::new(2, local.public, "198.18.0.2:51820", 7);
        local.add_peer(remote.public, Some(remote.addr), &[net("198.19.2.0/24")]);
        establish(&mut local, &mut remote);
        let peer = &local.peers()[0];
        assert!(peer.last_handshake.is_some());
        assert_eq!(peer.endpoint, Some(remote.addr));

        let packet = crate::packets::icmp_v4("198.19.2.9", "198.19.1.1", 8);
        let datagram = remote.encapsulate(&packet).expect("a data message");
        let out = local.net_in(remote.addr, &datagram);
        assert_eq!(out.tun, vec![packet.clone()]);

        let mut buf = crate::packets::icmp_v4("198.19.1.1", "198.19.2.9", 8);
        let len = buf.len();
        buf.resize(len + 16, 0);
        let out = local.tun_buf_in(&mut buf, len);
        let [(to, sent)] = out.sent.as_slice() else {
            panic!("expected one datagram, got {:?}", out.sent);
        };
        assert_eq!(to.addr, remote.addr);
        let got = remote.receive(local.addr.ip(), sent);
        assert_eq!(got.packets, vec![buf[..len].to_vec()]);
    }

    #[test]
    fn oracle_reads_addresses_and_lengths() {
        let v4 = crate::packets::icmp_v4("198.19.1.1", "198.19.2.9", 8);
        assert_eq!(ip::source(&v4), Some("198.19.1.1".parse().unwrap()));
        assert_eq!(ip::destination(&v4), Some("198.19.2.9".parse().unwrap()));
        assert_eq!(ip::claimed_len(&v4), Some(v4.len()));
        let v6 = crate::packets::icmp_v6("fd00:19:1::1", "fd00:19:2::9", 8);
        assert_eq!(ip::destination(&v6), Some("fd00:19:2::9".parse().unwrap()));
        assert_eq!(ip::claimed_len(&v6), Some(v6.len()));
        assert_eq!(ip::destination(&v4[..19]), None);
        assert_eq!(ip::source(&[0x60; 39]), None);
    }
}
