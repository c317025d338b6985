//! A flooder: a namespace wired to one node's underlay side that sends datagrams at a
//! router's listen port as fast as one thread can — random garbage, or handshake
//! initiations that carry a valid MAC1 for the router's public key (so they pass the first
//! check and cost the router work, as a rogue sender's would).
//!
//! MAC1, from the WireGuard paper (§5.4.4): `MAC(HASH("mac1----" ‖ S_pub_responder),
//! msg[..116])`, where HASH is BLAKE2s-256 and MAC is keyed BLAKE2s with a 16-byte output.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::netns::Netns;
use crate::topology::Node;

/// The size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// The bytes MAC1 covers.
const MAC1_COVERS: usize = 116;
/// The WireGuard message type of a cookie reply.
const COOKIE_REPLY: u8 = 3;

/// `count` datagrams of `len` random bytes.
pub fn garbage(count: usize, len: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut random = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    (0..count)
        .map(|_| {
            let mut datagram = vec![0u8; len];
            random.read_exact(&mut datagram)?;
            Ok(datagram)
        })
        .collect()
}

/// `count` handshake initiations with random sender index, ephemeral key, encrypted static
/// and timestamp, and a valid MAC1 for `responder_public` (MAC2 zero: no cookie).
pub fn initiations(responder_public: &[u8; 32], count: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let key = mac1_key(responder_public);
    let mut messages = garbage(count, INITIATION_LEN)?;
    for msg in &mut messages {
        msg[..4].copy_from_slice(&[1, 0, 0, 0]);
        let mac1 = mac1(&key, &msg[..MAC1_COVERS]);
        msg[MAC1_COVERS..MAC1_COVERS + 16].copy_from_slice(&mac1);
        msg[MAC1_COVERS + 16..].fill(0);
    }
    Ok(messages)
}

/// HASH("mac1----" ‖ public key).
pub fn mac1_key(public: &[u8; 32]) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(public)
        .finalize()
        .into()
}

/// Keyed BLAKE2s-128 of `covered` under `key`.
pub fn mac1(key: &[u8; 32], covered: &[u8]) -> [u8; 16] {
    // A 32-byte key is always a valid BLAKE2s key.
    let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("32-byte key");
    mac.update(covered);
    mac.finalize().into_bytes().into()
}

/// What one flood did.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloodReport {
    pub sent: u64,
    pub received: u64,
    pub cookie_replies: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    /// Datagrams sent per second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A namespace with a veth to one node (its own /24 in the underlay range), from which
/// floods are sent. Removed on drop with its namespace.
#[derive(Debug)]
pub struct Flooder {
    ns: Netns,
    addr: Ipv4Addr,
}

impl Flooder {
    /// Wires a flooder namespace to `node`: 198.18.(100+n).1 on the flooder, .2 on the node.
    pub fn attach(node: &Node) -> anyhow::Result<Flooder> {
        let ns = Netns::new("flood")?;
        let subnet = 100 + node.index();
        let addr = Ipv4Addr::new(198, 18, subnet, 1);
        let node_addr = Ipv4Addr::new(198, 18, subnet, 2);
        ns.ip_batch(&[
            format!(
                "link add fl0 type veth peer name fl0 netns {}",
                node.netns().name()
            ),
            format!("addr add {addr}/24 dev fl0"),
            "link set fl0 up".into(),
            format!("route add default via {node_addr}"),
        ])?;
        node.netns().ip_batch(&[
            format!("addr add {node_addr}/24 dev fl0"),
            "link set fl0 up".into(),
        ])?;
        Ok(Flooder { ns, addr })
    }

    /// The flooder's namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The flooder's address.
    pub fn addr(&self) -> IpAddr {
        self.addr.into()
    }

    /// Sends `payloads` round robin to `target` until `stop` is set — as fast as one thread
    /// can (`sendmmsg`), or at most `rate` datagrams per second — counting the answers (and
    /// among them cookie replies).
    pub fn flood(
        &self,
        target: SocketAddr,
        payloads: &[Vec<u8>],
        rate: Option<u64>,
        stop: &AtomicBool,
    ) -> anyhow::Result<FloodReport> {
        anyhow::ensure!(!payloads.is_empty(), "nothing to flood with");
        let socket = self
            .ns
            .enter(|| UdpSocket::bind(SocketAddr::new(self.addr.into(), 0)))?
            .context("cannot bind the flooder's socket")?;
        socket.connect(target)?;
        let answers = socket.try_clone()?;
        answers.set_read_timeout(Some(Duration::from_millis(50)))?;
        let received = AtomicU64::new(0);
        let cookies = AtomicU64::new(0);
        let started = Instant::now();
        let sent = std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    match answers.recv(&mut buf) {
                        Ok(n) => {
                            received.fetch_add(1, Ordering::Relaxed);
                            if n > 0 && buf[0] == COOKIE_REPLY {
                                cookies.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        // ICMP errors (e.g. port unreachable while the router restarts).
                        Err(_) => {}
                    }
                }
            });
            let mut sent = 0u64;
            let mut batches = payloads.chunks(BATCH).cycle();
            while !stop.load(Ordering::Relaxed) {
                if let Some(rate) = rate {
                    // Pacing: ahead of the rate, wait for the clock to catch up.
                    let due = started.elapsed().as_secs_f64() * rate as f64;
                    if sent as f64 >= due {
                        std::thread::sleep(Duration::from_micros(100));
                        continue;
                    }
                }
                if let Some(batch) = batches.next() {
                    // Errors (ENOBUFS, a refused port) only mean this batch was not sent.
                    sent += send_batch(&socket, batch).unwrap_or(0) as u64;
                }
            }
            sent
        });
        Ok(FloodReport {
            sent,
            received: received.into_inner(),
            cookie_replies: cookies.into_inner(),
            elapsed: started.elapsed(),
        })
    }
}

/// Datagrams per `sendmmsg`: one system call sends many, so the flood is as fast as one
/// thread can make it.
const BATCH: usize = 64;

/// Sends `batch` (at most [`BATCH`] datagrams) on the connected `socket` with one
/// `sendmmsg`; returns how many were sent.
fn send_batch(socket: &UdpSocket, batch: &[Vec<u8>]) -> std::io::Result<usize> {
    let mut iovecs: Vec<libc::iovec> = batch
        .iter()
        .map(|payload| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect();
    // SAFETY: every header points at one iovec, which points into a payload; all outlive
    // the call. The socket is connected, so no address is needed.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            0,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiations_carry_type_1_a_mac1_over_the_first_116_bytes_and_no_mac2() {
        let public = [7u8; 32];
        let messages = initiations(&public, 3).unwrap();
        let key = mac1_key(&public);
        for msg in &messages {
            assert_eq!(msg.len(), INITIATION_LEN);
            assert_eq!(&msg[..4], &[1, 0, 0, 0]);
            assert_eq!(msg[116..132], mac1(&key, &msg[..116]));
            assert_eq!(&msg[132..], &[0u8; 16]);
        }
        assert_ne!(messages[0], messages[1]);
        // Bound to the key: another responder's MAC1 differs.
        let other = mac1_key(&[8u8; 32]);
        assert_ne!(messages[0][116..132], mac1(&other, &messages[0][..116]));
    }

    /// An initiation made by boringtun (an independent implementation) carries the MAC1
    /// this module computes for the responder's key.
    #[test]
    fn mac1_matches_boringtuns_initiation() {
        use boringtun::noise::{Tunn, TunnResult};
        let responder = x25519_dalek::StaticSecret::from([9u8; 32]);
        let responder_public = x25519_dalek::PublicKey::from(&responder);
        let mut tunn = Tunn::new(
            x25519_dalek::StaticSecret::from([5u8; 32]),
            responder_public,
            None,
            None,
            1,
            None,
        );
        let mut buf = [0u8; 256];
        let TunnResult::WriteToNetwork(msg) = tunn.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation");
        };
        assert_eq!(msg.len(), INITIATION_LEN);
        let key = mac1_key(responder_public.as_bytes());
        assert_eq!(msg[116..132], mac1(&key, &msg[..116]));
    }
}
