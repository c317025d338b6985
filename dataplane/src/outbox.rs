//! The output of one batch: what the engine asked to send and write, in buffers that live as
//! long as the worker (no allocation once they have grown to the working size) — data
//! messages sealed straight into the datagram buffer, the rest copied in — then
//! flushed with as few syscalls as the kernel allows: runs of equal-size datagrams to one
//! endpoint leave as one UDP GSO send, and packets for the TUN are coalesced per flow by our
//! [`Coalescer`] into superpackets when the TUN has offloads (one write each).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tun_rs::SyncDevice;

use crate::engine::{Engine, Transmit};
use crate::gro::Coalescer;
use crate::key::Key;
use crate::peer::Endpoint;
use crate::stats::DropReason;
use crate::sys;
use crate::udp::SocketPair;
use crate::vnet::VNET_HDR_LEN;

/// Largest UDP payload one GSO send may carry (IPv4's limit; IPv6's is a little larger).
const MAX_GSO_BYTES: usize = 65507;

/// See the module documentation.
pub struct Outbox {
    /// The datagrams' bytes, `bytes[..filled]` in use. Never shortened: room lent to the
    /// engine ([`Transmit::send_built`]) is written over, not cleared first.
    bytes: Vec<u8>,
    filled: usize,
    datagrams: Vec<Queued>,
    /// Packets for the TUN, each behind a virtio-net header, merged per flow when offloads
    /// are on.
    packets: Coalescer,
    /// Whether the TUN takes virtio-net headers (else each packet is written bare).
    offload: bool,
}

impl Default for Outbox {
    /// An outbox for a TUN with offloads (TSO, no USO).
    fn default() -> Self {
        Outbox::new(true, false)
    }
}

/// One datagram waiting: where it goes, where its bytes are, and the peer it was sent for
/// (so a failed send counts against that peer).
struct Queued {
    to: Endpoint,
    start: usize,
    end: usize,
    peer: Option<Key>,
}

impl Outbox {
    fn queue(&mut self, to: &Endpoint, datagram: &[u8], peer: Option<Key>) {
        self.room(datagram.len()).copy_from_slice(datagram);
        self.commit(to, datagram.len(), peer);
    }

    /// `len` bytes after what is in use (zeroed only the first time the buffer reaches
    /// that far).
    fn room(&mut self, len: usize) -> &mut [u8] {
        let end = self.filled + len;
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        &mut self.bytes[self.filled..end]
    }

    /// Queues the first `len` bytes of the room as a datagram.
    fn commit(&mut self, to: &Endpoint, len: usize, peer: Option<Key>) {
        let start = self.filled;
        self.filled += len;
        self.datagrams.push(Queued {
            to: *to,
            start,
            end: self.filled,
            peer,
        });
    }
}

impl Transmit for Outbox {
    fn send(&mut self, to: &Endpoint, datagram: &[u8]) {
        self.queue(to, datagram, None);
    }

    fn send_for_peer(&mut self, peer: &Key, to: &Endpoint, datagram: &[u8]) {
        self.queue(to, datagram, Some(*peer));
    }

    fn write_tun(&mut self, packet: &[u8]) {
        self.packets.push(packet);
    }

    fn send_built<R>(
        &mut self,
        peer: &Key,
        to: &Endpoint,
        len: usize,
        _scratch: &mut [u8],
        build: impl FnOnce(&mut [u8]) -> (Option<usize>, R),
    ) -> R {
        let (built, result) = build(self.room(len));
        if let Some(n) = built {
            // A length past the room would be the engine's bug; it sends nothing then.
            debug_assert!(n <= len, "built past the room");
            if n <= len {
                self.commit(to, n, Some(*peer));
            }
        }
        result
    }
}

/// One UDP send: a run of datagrams to one endpoint, all `segment` bytes but the last.
#[derive(Debug, PartialEq, Eq)]
pub struct Run<'a> {
    pub to: Endpoint,
    pub contents: &'a [u8],
    /// `Some(size)` when the run holds more than one datagram.
    pub segment: Option<usize>,
    /// The peer its first datagram was sent for (a run goes to one endpoint: one peer's).
    pub peer: Option<Key>,
}

impl Outbox {
    /// An outbox for a TUN with (`offload`) or without virtio-net headers; `udp_gso` when the
    /// TUN also accepts UDP superpackets (USO).
    pub fn new(offload: bool, udp_gso: bool) -> Outbox {
        let mut packets = Coalescer::new();
        packets.set_merging(offload);
        packets.set_udp_gso(offload && udp_gso);
        Outbox {
            bytes: Vec::new(),
            filled: 0,
            datagrams: Vec::new(),
            packets,
            offload,
        }
    }

    /// TUN writes waiting (superpackets count once).
    pub fn pending_packets(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty() && self.packets.is_empty()
    }

    /// Datagrams queued so far, one by one.
    pub fn datagrams(&self) -> impl Iterator<Item = (&Endpoint, &[u8])> {
        self.datagrams
            .iter()
            .map(|q| (&q.to, &self.bytes[q.start..q.end]))
    }

    /// What will be written to the TUN, one write each, without the virtio-net header: a
    /// packet, or (offloads on) a superpacket standing for several.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.packets.written().map(|b| &b[VNET_HDR_LEN..])
    }

    pub fn clear(&mut self) {
        self.filled = 0;
        self.datagrams.clear();
        self.packets.clear();
    }

    /// The queued datagrams grouped into GSO runs of at most `max_segments` datagrams.
    pub fn runs(&self, max_segments: usize) -> impl Iterator<Item = Run<'_>> {
        let max_segments = max_segments.max(1);
        let mut i = 0;
        std::iter::from_fn(move || {
            let first = self.datagrams.get(i)?;
            let (to, start) = (first.to, first.start);
            let segment = first.end - start;
            let mut last_end = first.end;
            let mut count = 1;
            i += 1;
            while let Some(next) = self.datagrams.get(i) {
                let len = next.end - next.start;
                let fits = count < max_segments
                    && next.to == to
                    && next.start == last_end
                    && len <= segment
                    && next.end - start <= MAX_GSO_BYTES;
                if !fits {
                    break;
                }
                last_end = next.end;
                count += 1;
                i += 1;
                if len < segment {
                    // Only the last datagram of a GSO run may be shorter.
                    break;
                }
            }
            Some(Run {
                to,
                contents: &self.bytes[start..last_end],
                segment: (count > 1).then_some(segment),
                peer: first.peer,
            })
        })
    }

    /// Makes the syscalls: TUN writes first (they feed local pods), then UDP sends. Returns an
    /// error only when the TUN itself is gone. A failed send is one drop (per write or per
    /// run), counted in `engine`'s stats: a run's against the peer it was sent for.
    pub fn flush(
        &mut self,
        tun: &SyncDevice,
        sockets: &SocketPair,
        max_segments: usize,
        engine: &Engine,
    ) -> io::Result<()> {
        let mut result = Ok(());
        let skip = if self.offload { 0 } else { VNET_HDR_LEN };
        for write in self.packets.written() {
            match tun.send(&write[skip..]) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    result = Err(e);
                    break;
                }
                Err(_) => engine.stats().drop(DropReason::QueueFull),
            }
        }
        for run in self.runs(max_segments) {
            let reason = match send_with_retry(sockets, &run) {
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => DropReason::TooBig,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => DropReason::QueueFull,
                Err(_) => DropReason::SendFailed,
            };
            engine.count_send_drop(run.peer.as_ref(), reason);
        }
        self.clear();
        result
    }
}

fn send_with_retry(sockets: &SocketPair, run: &Run<'_>) -> io::Result<()> {
    match sockets.send(&run.to, run.contents, run.segment) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            // The socket buffer is full: give the NIC a moment, once.
            if let Some(socket) = sockets.for_endpoint(&run.to) {
                sys::poll_fds(
                    &[socket.as_raw_fd()],
                    libc::POLLOUT,
                    Duration::from_millis(10),
                );
            }
            sockets.send(&run.to, run.contents, run.segment)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::new(s.parse().unwrap())
    }

    #[test]
    fn equal_datagrams_to_one_endpoint_form_one_run() {
        let mut out = Outbox::default();
        let a = ep("198.18.0.2:51820");
        let b = ep("198.18.0.3:51820");
        for _ in 0..5 {
            out.send(&a, &[1; 100]);
        }
        out.send(&a, &[2; 40]); // shorter: ends the run
        out.send(&a, &[3; 100]);
        out.send(&b, &[4; 100]);
        let runs: Vec<_> = out.runs(64).collect();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].contents.len(), 540);
        assert_eq!(runs[0].segment, Some(100));
        assert_eq!(runs[1].contents, &[3; 100][..]);
        assert_eq!(runs[1].segment, None);
        assert_eq!(runs[2].to, b);
    }

    #[test]
    fn runs_respect_the_segment_limit_and_longer_datagrams_start_a_new_run() {
        let mut out = Outbox::default();
        let a = ep("[fd00:18::2]:51820");
        for _ in 0..10 {
            out.send(&a, &[0; 1452]);
        }
        out.send(&a, &[0; 1500]);
        let sizes: Vec<_> = out.runs(4).map(|r| (r.contents.len(), r.segment)).collect();
        assert_eq!(
            sizes,
            vec![
                (4 * 1452, Some(1452)),
                (4 * 1452, Some(1452)),
                (2 * 1452, Some(1452)),
                (1500, None)
            ]
        );
        // A GSO send never passes 64 KiB.
        let mut out = Outbox::default();
        for _ in 0..60 {
            out.send(&a, &[0; 1452]);
        }
        assert!(out.runs(64).all(|r| r.contents.len() <= MAX_GSO_BYTES));
        assert_eq!(
            out.runs(64).map(|r| r.contents.len()).sum::<usize>(),
            60 * 1452
        );
    }

    #[test]
    fn a_run_names_the_peer_its_datagrams_were_sent_for() {
        let mut out = Outbox::default();
        let (a, b) = (ep("198.18.0.2:51820"), ep("198.18.0.3:51820"));
        let key = Key::generate_private().public_key();
        out.send_for_peer(&key, &a, &[1; 100]);
        out.send_for_peer(&key, &a, &[1; 100]);
        out.send(&b, &[2; 100]); // a cookie reply: no peer's
        let peers: Vec<_> = out.runs(64).map(|r| (r.segment, r.peer)).collect();
        assert_eq!(peers, vec![(Some(100), Some(key)), (None, None)]);
    }

    #[test]
    fn a_datagram_built_in_lent_room_is_queued_like_a_sent_one() {
        let (a, b) = (ep("198.18.0.2:51820"), ep("198.18.0.3:51820"));
        let key = Key::generate_private().public_key();
        let mut scratch = [0u8; 64];
        let mut built = Outbox::default();
        let mut sent = Outbox::default();
        // A long datagram first, so the room lent later lies over its bytes.
        built.send_for_peer(&key, &b, &[7; 300]);
        sent.send_for_peer(&key, &b, &[7; 300]);
        built.clear();
        sent.clear();
        for (i, len) in [100usize, 100, 60].into_iter().enumerate() {
            let result = built.send_built(&key, &a, 200, &mut scratch, |room| {
                assert!(room.len() >= 200, "room as asked for");
                room[..len].fill(i as u8);
                (Some(len), i)
            });
            assert_eq!(result, i, "the builder's result comes back");
            sent.send_for_peer(&key, &a, &vec![i as u8; len]);
        }
        // Nothing built: nothing queued, and the result still comes back.
        let result = built.send_built(&key, &a, 200, &mut scratch, |room| {
            room.fill(9);
            (None, "queued")
        });
        assert_eq!(result, "queued");
        let runs = |o: &Outbox| {
            o.runs(64)
                .map(|r| (r.to, r.contents.to_vec(), r.segment, r.peer))
                .collect::<Vec<_>>()
        };
        assert_eq!(runs(&built), runs(&sent));
        assert_eq!(built.datagrams().count(), 3);
    }

    /// The engine seals into the outbox's room: the datagram it leaves there is one the
    /// peer opens, for the initiation and for data alike.
    #[test]
    fn the_engine_seals_into_the_outbox() {
        use crate::testing::{pair, pump, Capture};
        use etherparse::PacketBuilder;
        let ping = |seq: u16, payload: usize| {
            let mut out = Vec::new();
            PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64)
                .icmpv4_echo_request(7, seq)
                .write(&mut out, &vec![0xab; payload])
                .unwrap();
            out
        };
        let (mut a, mut b) = pair(std::time::Instant::now());
        let mut out = Outbox::default();
        let first = ping(1, 56);
        let mut buf = first.clone();
        buf.resize(first.len() + 16, 0);
        a.tun_packet(&mut buf, first.len(), &mut out);
        let sent: Vec<_> = out.datagrams().map(|(to, d)| (*to, d.to_vec())).collect();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.len(), 148, "an initiation");
        let mut capture = Capture::default();
        capture.sent = sent;
        let (_, b_tun) = pump(&mut a, &mut b, capture, true);
        assert_eq!(b_tun, vec![first]);
        // With the session: three data messages of different sizes in one batch.
        out.clear();
        let packets: Vec<_> = [1372usize, 0, 57].iter().map(|&n| ping(2, n)).collect();
        for p in &packets {
            let mut buf = p.clone();
            buf.resize(p.len() + 16, 0);
            a.tun_packet(&mut buf, p.len(), &mut out);
        }
        let datagrams: Vec<_> = out.datagrams().map(|(_, d)| d.to_vec()).collect();
        assert_eq!(datagrams.len(), 3);
        let mut arrived = Vec::new();
        for d in &datagrams {
            arrived.extend(b.net_in(a.addr, d).tun);
        }
        assert_eq!(arrived, packets);
    }

    #[test]
    fn packets_are_written_whole_and_buffers_are_reused() {
        let mut out = Outbox::new(false, false);
        out.write_tun(&[9; 60]);
        out.write_tun(&[8; 20]);
        let got: Vec<_> = out.packets().map(|p| p.to_vec()).collect();
        assert_eq!(got, vec![vec![9; 60], vec![8; 20]]);
        out.clear();
        assert!(out.is_empty());
        out.write_tun(&[7; 30]);
        assert_eq!(out.packets().next(), Some(&[7; 30][..]));
        assert_eq!(out.pending_packets(), 1);
    }
}
