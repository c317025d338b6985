//! The threads of a running device. Each worker owns one TUN queue and one pair of
//! `SO_REUSEPORT` UDP sockets, and runs two threads, one per direction:
//!
//! ```text
//!  tun thread    poll queue ─► read superpackets, split to segments into a batch
//!                ─► engine (encrypt) ─► outbox ─► UDP GSO sends
//!                (a superpacket with more segments than a batch: batch after batch)
//!  udp thread    poll sockets ─► recvmmsg + UDP GRO ─► handshake messages to the
//!                handshake queue (see `handshakes`) ─► the rest: engine (decrypt) ─► outbox
//!                ─► GRO-coalesced TUN writes
//!  handshake     handshake queue ─► engine (MAC, cookie, DH) ─► UDP sends (see `handshakes`)
//!  (tun and udp threads, after each batch: a pinned adaptive device whose tick is already
//!  busy spreads now)
//!  pinned (the `pinned` mode; adaptive while quiet): the udp thread steps aside and the
//!                tun thread polls its queue and its sockets, serving each in turn
//!                (at most a few `recvmmsg`s before it looks at the queue again)
//!  timer thread  every 100 ms ─► engine.tick ─► UDP sends; the adaptive placement follows
//!                the load; every second: follow the TUN's MTU (or, configured, say
//!                when it differs), notice a deleted TUN
//! ```
//!
//! A thread reads into its own buffers, holds the engine's read lock only while the engine
//! fills its outbox, and makes the syscalls after releasing it.
//!
//! Why a quiet worker serves both directions from one thread: a request through a router
//! and its reply then wake one thread fewer on each side (the reply a pod sends while the
//! thread writes the request is read on the thread's next turn, without a sleep and a
//! wake-up), and on a VM each wake-up of a sleeping thread costs microseconds. Busy, a
//! thread per direction keeps both directions of a flow moving at once. The UDP thread
//! steps aside only between its polls and the TUN thread serves the sockets only while it
//! has (`Shared::udp_thread_serving`), so the sockets are never left unserved; for a moment
//! both may read them, which at most reorders a few datagrams (the replay window takes it).

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;

use super::handshakes;
use super::shared::{heartbeat_slot, ExitReason, HeartbeatOf, Shared};
use super::tun_batch::{Deliver, TunBatch, TUN_BATCH};
use crate::engine::{new_scratch, Batch, SCRATCH_LEN};
use crate::offload::PAD_ROOM;
use crate::outbox::Outbox;
use crate::stats::DropReason;
use crate::sys::poll_fds;
use crate::udp::UdpSockets;
use crate::vnet::VNET_HDR_LEN;

/// Datagrams (each possibly a GRO run) one UDP thread reads per `recvmmsg`.
const UDP_BATCH: usize = 32;
/// Datagrams per `recvmmsg` when a TUN thread serves its worker's sockets (pinned: a quiet
/// device, so little traffic; a smaller batch keeps the second set of buffers small).
const TUN_THREAD_UDP_BATCH: usize = 8;
/// `recvmmsg`s per socket a TUN thread makes before it looks at its TUN queue again.
const TUN_THREAD_UDP_READS: usize = 4;
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

pub(super) fn max_segments(shared: &Shared, sockets: &UdpSockets, worker: usize) -> usize {
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

/// Where a TUN thread's packets go: sealed by the engine into the outbox as they are read,
/// then sent.
struct TunSink<'s> {
    shared: &'s Shared,
    worker: usize,
    queue: &'s tun_rs::SyncDevice,
    /// The engine's batch while a read's packets are handed over: it holds the
    /// configuration's read lock, so it ends before every syscall.
    batch: Option<Batch<'s>>,
    scratch: Box<[u8; SCRATCH_LEN]>,
    outbox: Outbox,
    view: SocketView,
}

impl Deliver for TunSink<'_> {
    fn packet(&mut self, buf: &mut [u8], len: usize) {
        let shared = self.shared;
        let mut batch = self.batch.get_or_insert_with(|| shared.engine.batch());
        // The kernel never hands us more than the TUN's MTU: a larger packet means the MTU
        // was just raised (`ip link set mtu`). Follow it now, not at the next timer tick, or
        // the engine would answer "too big" with the old MTU and poison the sender's PMTU.
        if shared.follow_link_mtu && len > batch.mtu() {
            self.batch = None;
            shared.refresh_mtu();
            batch = self.batch.insert(shared.engine.batch());
        }
        batch.handle_tun_packet(buf, len, &mut self.scratch, &mut self.outbox);
    }

    fn read_done(&mut self) {
        self.batch = None;
    }

    fn flush(&mut self) -> bool {
        self.batch = None;
        let shared = self.shared;
        self.view.refresh(shared);
        let segments = max_segments(shared, &self.view.sockets, self.worker);
        let sockets = self.view.sockets.worker(self.worker);
        let flushed = self
            .outbox
            .flush(self.queue, sockets, segments, &shared.engine);
        if flushed.is_err() {
            shared.finish(ExitReason::TunGone);
        }
        flushed.is_ok()
    }
}

pub(crate) fn tun_loop(shared: Arc<Shared>, worker: usize) {
    let queue = shared.tun.queue(worker);
    let offload = shared.tun.offload();
    // One read (a superpacket, or a packet up to the largest MTU) lands here, with room for
    // the padding behind its last packet; its packets are handed over where they lie.
    let mut read = vec![0u8; VNET_HDR_LEN + BUF_LEN + PAD_ROOM];
    let read_max = read.len() - PAD_ROOM;
    let mut batch = TunBatch::new(TUN_BATCH);
    let mut sink = TunSink {
        shared: &shared,
        worker,
        queue,
        batch: None,
        scratch: new_scratch(),
        outbox: shared.outbox(),
        view: SocketView::new(&shared),
    };
    let fd = queue.as_raw_fd();
    let heartbeat = heartbeat_slot(HeartbeatOf::Tun(worker), shared.workers());
    let mut udp = UdpSide::<TUN_THREAD_UDP_BATCH>::new(&shared);
    let mut udp_view = SocketView::new(&shared);
    while !shared.stop.load(Relaxed) {
        shared.beat(heartbeat);
        // While the UDP thread steps aside (pinned), this thread serves the sockets too.
        udp_view.refresh(&shared);
        let sockets = &udp_view.sockets;
        let pair = sockets.worker(worker);
        let mut fds = [fd, -1, -1];
        let mut nfds = 1;
        if !shared.udp_thread_serving(worker) {
            for socket in pair.sockets() {
                fds[nfds] = socket.as_raw_fd();
                nfds += 1;
            }
        }
        let ready = poll_fds(&fds[..nfds], libc::POLLIN, POLL_INTERVAL);
        if ready == 0 {
            continue;
        }
        // Checked again: the UDP thread may have taken over while this one slept.
        if ready >> 1 != 0 && !shared.udp_thread_serving(worker) {
            let segments = max_segments(&shared, sockets, worker);
            if !udp.serve(
                &shared,
                queue,
                pair,
                ready >> 1,
                segments,
                TUN_THREAD_UDP_READS,
            ) {
                return;
            }
        }
        if ready & 1 == 0 {
            continue;
        }
        while batch.wants_read() {
            let n = match queue.recv(&mut read[..read_max]) {
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
            if batch.push(&mut read, n, offload, &mut sink).is_err() {
                shared.engine.stats().drop(DropReason::MalformedPacket);
            }
        }
        if !batch.flush(&mut sink) {
            return;
        }
        shared.follow_burst();
    }
}

pub(crate) fn udp_loop(shared: Arc<Shared>, worker: usize) {
    let queue = shared.tun.queue(worker);
    let mut side = UdpSide::<UDP_BATCH>::new(&shared);
    let mut view = SocketView::new(&shared);
    let heartbeat = heartbeat_slot(HeartbeatOf::Udp(worker), shared.workers());
    while !shared.stop.load(Relaxed) {
        shared.beat(heartbeat);
        // Pinned, the worker's TUN thread serves the sockets too (see the module
        // documentation): step aside until the device spreads again.
        if shared.pinned_now() {
            shared.udp_thread_serves(worker, false);
            std::thread::park_timeout(POLL_INTERVAL);
            continue;
        }
        shared.udp_thread_serves(worker, true);
        view.refresh(&shared);
        let sockets = view.sockets.clone();
        let pair = sockets.worker(worker);
        let mut fds = [-1; 2];
        for (fd, socket) in fds.iter_mut().zip(pair.sockets()) {
            *fd = socket.as_raw_fd();
        }
        let ready = poll_fds(&fds, libc::POLLIN, POLL_INTERVAL);
        if ready == 0 {
            continue;
        }
        let segments = max_segments(&shared, &sockets, worker);
        if !side.serve(&shared, queue, pair, ready, segments, usize::MAX) {
            return;
        }
    }
}

/// A worker's UDP side: buffers for `N` datagrams (each possibly a GRO run) per `recvmmsg`,
/// and the engine's scratch and outbox for them. The UDP thread has one; the TUN thread has
/// a smaller one for when it serves the sockets itself.
struct UdpSide<const N: usize> {
    bufs: Vec<Vec<u8>>,
    metas: [RecvMeta; N],
    scratch: Box<[u8; crate::engine::SCRATCH_LEN]>,
    outbox: crate::outbox::Outbox,
}

impl<const N: usize> UdpSide<N> {
    fn new(shared: &Shared) -> Self {
        UdpSide {
            bufs: (0..N).map(|_| vec![0u8; BUF_LEN]).collect(),
            metas: [RecvMeta::default(); N],
            scratch: new_scratch(),
            outbox: shared.outbox(),
        }
    }

    /// Reads what the sockets of `pair` that `ready` names (bit i: socket i) hold, at most
    /// `max_reads` `recvmmsg`s per socket: handshake messages to their queue, the rest
    /// through the engine to the TUN. False once the TUN is gone.
    fn serve(
        &mut self,
        shared: &Shared,
        queue: &tun_rs::SyncDevice,
        pair: &crate::udp::SocketPair,
        ready: u32,
        segments: usize,
        max_reads: usize,
    ) -> bool {
        let UdpSide {
            bufs,
            metas,
            scratch,
            outbox,
        } = self;
        // Only the sockets poll named: reading the other family's socket would cost a
        // syscall on every wake-up that finds nothing there.
        for (_, socket) in pair
            .sockets()
            .enumerate()
            .filter(|(i, _)| ready & 1 << i != 0)
        {
            for _ in 0..max_reads {
                let received = {
                    let mut iter = bufs.iter_mut();
                    let mut slices: [IoSliceMut<'_>; N] =
                        std::array::from_fn(|_| match iter.next() {
                            Some(b) => IoSliceMut::new(&mut b[..]),
                            None => IoSliceMut::new(&mut []),
                        });
                    socket.recv(&mut slices, metas)
                };
                let count = match received {
                    Ok(count) => count,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here as ECONNREFUSED and the like: not fatal.
                    Err(_) => break,
                };
                // Handshake messages leave for their own queue first, with no lock held.
                for (meta, buf) in metas.iter().zip(bufs.iter()).take(count) {
                    let from = canonical(meta.addr);
                    for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                        if handshakes::belongs_here(datagram)
                            && !shared.handshakes.offer(from, meta.dst_ip, datagram)
                        {
                            shared.engine.stats().drop(DropReason::HandshakeQueueFull);
                        }
                    }
                }
                // Decrypted packets wait in the outbox for GRO; flush every
                // `TUN_FLUSH_PACKETS` so its buffers stay few (memory) and writes stay timely.
                // Data messages are opened where they lie in `bufs`.
                let mut datagrams = metas
                    .iter()
                    .zip(bufs.iter_mut())
                    .take(count)
                    .flat_map(|(meta, buf)| {
                        let from = canonical(meta.addr);
                        buf[..meta.len]
                            .chunks_mut(meta.stride.max(1))
                            .map(move |d| (from, meta.dst_ip, d))
                    })
                    .filter(|(_, _, d)| !handshakes::belongs_here(d))
                    .peekable();
                while datagrams.peek().is_some() {
                    {
                        let mut batch = shared.engine.batch();
                        for (from, local_ip, datagram) in datagrams.by_ref() {
                            batch.handle_datagram(from, local_ip, datagram, scratch, outbox);
                            if outbox.pending_packets() >= TUN_FLUSH_PACKETS {
                                break;
                            }
                        }
                    }
                    if outbox.flush(queue, pair, segments, &shared.engine).is_err() {
                        shared.finish(ExitReason::TunGone);
                        return false;
                    }
                }
                shared.follow_burst();
                if count < N {
                    break;
                }
            }
        }
        true
    }
}

fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

pub(crate) fn timer_loop(shared: Arc<Shared>) {
    let mut scratch = new_scratch();
    let mut outbox = shared.outbox();
    let mut last_mtu_check = Instant::now();
    let mut link_mtu = None;
    let heartbeat = heartbeat_slot(HeartbeatOf::Timers, shared.workers());
    while !shared.stop.load(Relaxed) {
        shared.beat(heartbeat);
        std::thread::sleep(POLL_INTERVAL);
        shared.tick(&mut outbox, &mut scratch);
        shared.follow_load();
        if last_mtu_check.elapsed() >= Duration::from_secs(1) {
            last_mtu_check = Instant::now();
            if !shared.tun.exists() {
                shared.finish(ExitReason::TunGone);
                return;
            }
            // `ip link set mtu` (wg-quick, operators) changes the tunnel MTU under us, unless
            // it is configured.
            shared.refresh_mtu();
            shared.note_link_mtu(&mut link_mtu);
        }
    }
}

/// The handshake thread: see [`handshakes`].
pub(crate) fn handshake_loop(shared: Arc<Shared>) {
    if let Err(e) = crate::sys::set_current_thread_nice(handshakes::NICE) {
        tracing::debug!(error = %e, "cannot lower the handshake thread's priority");
    }
    let queue = &shared.handshakes;
    let mut scratch = new_scratch();
    let mut outbox = shared.outbox();
    let mut policy = handshakes::LoadPolicy::default();
    let mut batch: Vec<Box<handshakes::Handshake>> = Vec::with_capacity(handshakes::BATCH);
    while !shared.stop.load(Relaxed) {
        let Some(first) = queue.recv_timeout(handshakes::POLL_INTERVAL) else {
            continue;
        };
        batch.push(first);
        while batch.len() < handshakes::BATCH {
            match queue.try_recv() {
                Some(slot) => batch.push(slot),
                None => break,
            }
        }
        // Like the kernel, the messages being handled count as queued.
        let now_ms = shared.engine.now().as_millis() as u64;
        let under_load = policy.under_load(queue.len() + batch.len(), now_ms);
        {
            let mut engine = shared.engine.batch();
            for slot in &batch {
                engine.handle_handshake(
                    slot.from,
                    slot.local_ip,
                    slot.datagram(),
                    under_load,
                    &mut scratch,
                    &mut outbox,
                );
            }
        }
        for slot in batch.drain(..) {
            queue.recycle(slot);
        }
        if !outbox.is_empty() {
            let sockets = shared.sockets();
            // Handshake messages go to the network only, never to the TUN. A flood's cookie
            // replies all go to the flooder at the same size: one GSO send per batch.
            let segments = max_segments(&shared, &sockets, 0);
            let _ = outbox.flush(
                shared.tun.queue(0),
                sockets.worker(0),
                segments,
                &shared.engine,
            );
        }
    }
}
