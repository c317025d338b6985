//! A UDP relay between two WireGuard endpoints that reorders and duplicates data packets,
//! as a congested or multi-path underlay does: the replay window must deliver every inner
//! packet once, whatever order and however often its datagram arrives.
//!
//! The relay runs on a thread of the test process with a socket inside a namespace. Each
//! router's peer endpoint is the relay; the relay forwards a datagram from one side to the
//! other. Only transport data messages (type 4) are reordered or duplicated, so handshakes
//! are not disturbed.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;

/// The WireGuard message type of transport data.
const TRANSPORT_DATA: u8 = 4;
/// After this long without a datagram the relay releases what it holds back.
const IDLE_FLUSH: Duration = Duration::from_millis(50);

/// What the relay does to data packets.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Holds back one data packet of every `hold_every` (0: none)…
    pub hold_every: u64,
    /// …and sends it after this many later data packets of the same direction.
    pub displacement: usize,
    /// Sends one data packet of every `duplicate_every` twice at once, and a third time
    /// `displacement` packets later (0: none).
    pub duplicate_every: u64,
}

/// What the relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    pub forwarded: u64,
    pub held: u64,
    pub duplicated: u64,
}

/// One direction's delayed datagrams: (data packets still to pass, datagram).
type Delayed = VecDeque<(usize, Vec<u8>)>;

/// Relays between `a` and `b` through a socket bound to `bind` inside `ns` until `stop` is
/// set, applying `faults`; returns what it did. Datagrams from anyone else are ignored.
pub fn run(
    ns: &Netns,
    bind: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
    faults: Faults,
    stop: &AtomicBool,
) -> anyhow::Result<RelayReport> {
    let socket = ns
        .enter(|| UdpSocket::bind(bind))?
        .with_context(|| format!("cannot bind the relay to {bind} in {}", ns.name()))?;
    socket.set_read_timeout(Some(IDLE_FLUSH))?;
    // The relay stands in for the underlay, which does not lose what the test did not ask
    // for: room for a few seconds of the tests' streams should its thread be descheduled.
    set_receive_buffer(&socket, RECEIVE_BUFFER)?;
    let mut report = RelayReport::default();
    // Per direction: [towards b, towards a].
    let mut delayed: [Delayed; 2] = [VecDeque::new(), VecDeque::new()];
    let mut data_seen = [0u64; 2];
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                for (queue, to) in delayed.iter_mut().zip([b, a]) {
                    for (_, datagram) in queue.drain(..) {
                        socket.send_to(&datagram, to)?;
                        report.forwarded += 1;
                    }
                }
                continue;
            }
            Err(e) => return Err(e).context("relay receive failed"),
        };
        let (direction, to) = if from == a {
            (0, b)
        } else if from == b {
            (1, a)
        } else {
            continue;
        };
        let datagram = &buf[..n];
        if datagram.first() != Some(&TRANSPORT_DATA) {
            socket.send_to(datagram, to)?;
            report.forwarded += 1;
            continue;
        }
        data_seen[direction] += 1;
        let seen = data_seen[direction];
        let queue = &mut delayed[direction];
        // Release what has waited for enough later packets.
        for entry in queue.iter_mut() {
            entry.0 = entry.0.saturating_sub(1);
        }
        while queue.front().is_some_and(|(left, _)| *left == 0) {
            if let Some((_, old)) = queue.pop_front() {
                socket.send_to(&old, to)?;
                report.forwarded += 1;
            }
        }
        if faults.hold_every > 0 && seen % faults.hold_every == 0 {
            queue.push_back((faults.displacement, datagram.to_vec()));
            report.held += 1;
            continue;
        }
        socket.send_to(datagram, to)?;
        report.forwarded += 1;
        if faults.duplicate_every > 0 && seen % faults.duplicate_every == 0 {
            socket.send_to(datagram, to)?;
            queue.push_back((faults.displacement, datagram.to_vec()));
            report.forwarded += 1;
            report.duplicated += 1;
        }
    }
    Ok(report)
}

/// The relay socket's receive buffer (the kernel doubles it, capped by `rmem_max` unless
/// forced: the relay runs as root, so `SO_RCVBUFFORCE`).
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

fn set_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) -> anyhow::Result<()> {
    tailsk8s_lab::traffic::set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .context("setting the relay's receive buffer")
}
