//! The threads of a running device. Each worker owns one TUN queue and one pair of
//! `SO_REUSEPORT` UDP sockets, and runs two threads, one per direction:
//!
//! ```text
//!  tun thread    poll queue ─► read superpackets, split to segments ─► engine (encrypt)
//!                ─► outbox ─► UDP GSO sends
//!  udp thread    poll sockets ─► recvmmsg + UDP GRO ─► engine (decrypt) ─► outbox
//!                ─► GRO-coalesced TUN writes, UDP sends (handshake replies)
//!  timer thread  every 100 ms ─► engine.tick ─► UDP sends; follow the TUN's MTU
//! ```
//!
//! A thread reads into its own buffers, holds the engine's read lock only while the engine
//! fills its outbox, and makes the syscalls after releasing it.

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;

use super::shared::{ExitReason, Shared};
use crate::engine::new_scratch;
use crate::offload::{copy_into, split, VNET_HDR_LEN};
use crate::stats::DropReason;
use crate::sys::poll_fds;
use crate::udp::UdpSockets;

/// Packets one TUN thread collects before handing them to the engine (one 64 KiB
/// superpacket of 1380-byte segments is 48).
const TUN_BATCH: usize = 128;
/// Datagrams (each possibly a GRO run) one UDP thread reads per `recvmmsg`.
const UDP_BATCH: usize = 32;
/// Decrypted packets collected before a GRO-coalesced write to the TUN.
const TUN_FLUSH_PACKETS: usize = 128;
/// Room for one packet, or one GRO-coalesced run of datagrams.
const BUF_LEN: usize = 65536 + 64;
/// How often threads wake to notice a stop request or new sockets.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Follows socket replacements (a UAPI `listen_port` change) without taking a lock per batch.
struct SocketView {
    sockets: Arc<UdpSockets>,
    generation: u64,
}

impl SocketView {
    fn new(shared: &Shared) -> SocketView {
        SocketView {
            generation: shared.sockets_generation.load(Relaxed),
            sockets: shared.sockets(),
        }
    }

    fn refresh(&mut self, shared: &Shared) {
        let current = shared.sockets_generation.load(Relaxed);
        if current != self.generation {
            self.sockets = shared.sockets();
            self.generation = current;
        }
    }
}

fn max_segments(shared: &Shared, sockets: &UdpSockets, worker: usize) -> usize {
    if !shared.udp_gso {
        return 1;
    }
    sockets
        .worker(worker)
        .sockets()
        .map(|s| s.max_gso_segments())
        .min()
        .unwrap_or(1)
}

pub(crate) fn tun_loop(shared: Arc<Shared>, worker: usize) {
    let queue = shared.tun.queue(worker);
    let offload = shared.tun.offload();
    // One read (a superpacket, or a packet up to the largest MTU) lands here first; packets
    // are then split or copied into `bufs`, which grow to what reads need and stay so.
    let mut original = vec![0u8; VNET_HDR_LEN + BUF_LEN];
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); TUN_BATCH];
    let mut sizes = [0usize; TUN_BATCH];
    let mut scratch = new_scratch();
    let mut outbox = shared.outbox();
    let mut view = SocketView::new(&shared);
    let fd = queue.as_raw_fd();
    while !shared.stop.load(Relaxed) {
        if !poll_fds(&[fd], libc::POLLIN, POLL_INTERVAL) {
            continue;
        }
        let mut count = 0;
        // Keep room for a whole superpacket's segments.
        while count + 64 <= TUN_BATCH {
            let n = match queue.recv(&mut original) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if !shared.tun.exists() => {
                    shared.finish(ExitReason::TunGone);
                    return;
                }
                Err(e) => {
                    shared.finish(ExitReason::Failed(format!("reading the TUN: {e}")));
                    return;
                }
            };
            if !offload {
                copy_into(&mut bufs[count], &original[..n]);
                sizes[count] = n;
                count += 1;
                continue;
            }
            match split(&mut original[..n], &mut bufs[count..], &mut sizes[count..]) {
                Ok(segments) => count += segments,
                Err(_) => shared.engine.stats().drop(DropReason::MalformedPacket),
            }
        }
        if count == 0 {
            continue;
        }
        // The kernel never hands us more than the TUN's MTU: a larger packet means the MTU
        // was just raised (`ip link set mtu`). Follow it now, not at the next timer tick, or
        // the engine would answer "too big" with the old MTU and poison the sender's PMTU.
        if sizes[..count].iter().any(|&n| n > shared.engine.mtu()) {
            shared.refresh_mtu();
        }
        {
            let mut batch = shared.engine.batch();
            for (buf, len) in bufs.iter_mut().zip(sizes.iter()).take(count) {
                batch.handle_tun_packet(buf, *len, &mut scratch, &mut outbox);
            }
        }
        view.refresh(&shared);
        let segments = max_segments(&shared, &view.sockets, worker);
        if outbox
            .flush(
                queue,
                view.sockets.worker(worker),
                segments,
                shared.engine.stats(),
            )
            .is_err()
        {
            shared.finish(ExitReason::TunGone);
            return;
        }
    }
}

pub(crate) fn udp_loop(shared: Arc<Shared>, worker: usize) {
    let queue = shared.tun.queue(worker);
    let mut bufs: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; BUF_LEN]).collect();
    let mut metas = [RecvMeta::default(); UDP_BATCH];
    let mut scratch = new_scratch();
    let mut outbox = shared.outbox();
    let mut view = SocketView::new(&shared);
    while !shared.stop.load(Relaxed) {
        view.refresh(&shared);
        let sockets = view.sockets.clone();
        let pair = sockets.worker(worker);
        let mut fds = [-1; 2];
        for (fd, socket) in fds.iter_mut().zip(pair.sockets()) {
            *fd = socket.as_raw_fd();
        }
        if !poll_fds(&fds, libc::POLLIN, POLL_INTERVAL) {
            continue;
        }
        let segments = max_segments(&shared, &sockets, worker);
        for socket in pair.sockets() {
            loop {
                let received = {
                    let mut iter = bufs.iter_mut();
                    let mut slices: [IoSliceMut<'_>; UDP_BATCH] =
                        std::array::from_fn(|_| match iter.next() {
                            Some(b) => IoSliceMut::new(&mut b[..]),
                            None => IoSliceMut::new(&mut []),
                        });
                    socket.recv(&mut slices, &mut metas)
                };
                let count = match received {
                    Ok(count) => count,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here as ECONNREFUSED and the like: not fatal.
                    Err(_) => break,
                };
                // Decrypted packets wait in the outbox for GRO; flush every
                // `TUN_FLUSH_PACKETS` so its buffers stay few (memory) and writes stay timely.
                let mut datagrams = metas
                    .iter()
                    .zip(bufs.iter())
                    .take(count)
                    .flat_map(|(meta, buf)| {
                        let from = canonical(meta.addr);
                        buf[..meta.len]
                            .chunks(meta.stride.max(1))
                            .map(move |d| (from, meta.dst_ip, d))
                    })
                    .peekable();
                while datagrams.peek().is_some() {
                    {
                        let mut batch = shared.engine.batch();
                        for (from, local_ip, datagram) in datagrams.by_ref() {
                            batch.handle_datagram(
                                from,
                                local_ip,
                                datagram,
                                &mut scratch,
                                &mut outbox,
                            );
                            if outbox.pending_packets() >= TUN_FLUSH_PACKETS {
                                break;
                            }
                        }
                    }
                    if outbox
                        .flush(queue, pair, segments, shared.engine.stats())
                        .is_err()
                    {
                        shared.finish(ExitReason::TunGone);
                        return;
                    }
                }
                if count < UDP_BATCH {
                    break;
                }
            }
        }
    }
}

fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

pub(crate) fn timer_loop(shared: Arc<Shared>) {
    let mut scratch = new_scratch();
    let mut outbox = shared.outbox();
    let mut last_mtu_check = Instant::now();
    while !shared.stop.load(Relaxed) {
        std::thread::sleep(POLL_INTERVAL);
        shared.tick(&mut outbox, &mut scratch);
        shared.follow_load();
        if last_mtu_check.elapsed() >= Duration::from_secs(1) {
            last_mtu_check = Instant::now();
            if !shared.tun.exists() {
                shared.finish(ExitReason::TunGone);
                return;
            }
            // `ip link set mtu` (wg-quick, operators) changes the tunnel MTU under us.
            shared.refresh_mtu();
        }
    }
}
