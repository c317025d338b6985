//! The state a running device's threads and its control interface share: the engine, the
//! TUN, the listen sockets (replaced by a `listen_port` change), the handshake queue, the
//! worker placement, and
//! the stop flag with the reason the device stopped. Also the UAPI's get/set
//! ([`DeviceControl`], whose semantics are [`crate::control`]'s), since a set may rebind the
//! listen sockets or change their fwmark.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use super::handshakes::{self, HandshakeQueue};
use crate::affinity::Placement;
use crate::config::{DeviceControl, DeviceSnapshot, DeviceUpdate, SetError};
use crate::control::{self, ListenSockets};
use crate::engine::{new_scratch, Engine, SCRATCH_LEN};
use crate::outbox::Outbox;
use crate::tun::Tun;
use crate::udp::UdpSockets;

/// One heartbeat per thread: a TUN and a UDP thread per worker, then the timer thread.
fn heartbeat_slots(workers: usize) -> usize {
    2 * workers + 1
}

/// Which heartbeat a thread bumps.
pub(crate) enum HeartbeatOf {
    Tun(usize),
    Udp(usize),
    Timers,
}

pub(crate) fn heartbeat_slot(of: HeartbeatOf, workers: usize) -> usize {
    match of {
        HeartbeatOf::Tun(w) => 2 * w,
        HeartbeatOf::Udp(w) => 2 * w + 1,
        HeartbeatOf::Timers => 2 * workers,
    }
}

/// The thread name of a heartbeat slot (as the device names its threads).
fn heartbeat_name(slot: usize, workers: usize) -> String {
    if slot == 2 * workers {
        "tsk-timers".to_string()
    } else if slot.is_multiple_of(2) {
        format!("tsk-tun{}", slot / 2)
    } else {
        format!("tsk-udp{}", slot / 2)
    }
}

/// Why a device stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// [`super::Device::stop`] was called.
    Stopped,
    /// The TUN interface was deleted.
    TunGone,
    /// An I/O error the device cannot recover from.
    Failed(String),
}

/// The state the device's threads and its control interface share.
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) tun: Tun,
    sockets: RwLock<Arc<UdpSockets>>,
    /// Bumped whenever `sockets` is replaced, so threads notice without taking the lock.
    pub(crate) sockets_generation: AtomicU64,
    fwmark: AtomicU32,
    /// Handshake messages from the UDP threads for the handshake thread.
    pub(crate) handshakes: HandshakeQueue,
    pub(crate) stop: AtomicBool,
    exit: Mutex<Option<ExitReason>>,
    workers: usize,
    /// Whether UDP sends may carry several datagrams (GSO).
    pub(crate) udp_gso: bool,
    /// Whether the engine's MTU follows the TUN's (see [`super::DeviceOptions`]).
    pub(crate) follow_link_mtu: bool,
    /// Where workers run, unless they are never pinned.
    placement: Option<Placement>,
    /// Each thread's last loop, in milliseconds since `started` (see [`Shared::beat`]).
    heartbeats: Box<[AtomicU64]>,
    started: Instant,
    /// Per worker: whether its UDP thread serves its sockets now (else its TUN thread does).
    udp_thread_serving: Box<[AtomicBool]>,
}

impl Shared {
    pub(crate) fn new(
        engine: Engine,
        tun: Tun,
        sockets: UdpSockets,
        fwmark: u32,
        workers: usize,
        placement: Option<Placement>,
    ) -> Shared {
        Shared {
            engine,
            udp_gso: tun.offload(),
            follow_link_mtu: true,
            tun,
            sockets: RwLock::new(Arc::new(sockets)),
            sockets_generation: AtomicU64::new(0),
            fwmark: AtomicU32::new(fwmark),
            handshakes: HandshakeQueue::new(handshakes::CAPACITY),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            workers,
            placement,
            heartbeats: (0..heartbeat_slots(workers))
                .map(|_| AtomicU64::new(0))
                .collect(),
            started: Instant::now(),
            udp_thread_serving: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Marks thread `slot` alive (see [`heartbeat_slot`]); every device thread calls it each
    /// time round its loop, which it goes through at least every poll interval.
    pub(crate) fn beat(&self, slot: usize) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(beat) = self.heartbeats.get(slot) {
            beat.store(ms, Relaxed);
        }
    }

    /// The threads whose last beat is older than `max`, by name.
    pub(crate) fn stalled(&self, max: std::time::Duration) -> Vec<String> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self.heartbeats
            .iter()
            .enumerate()
            .filter(|(_, beat)| now.saturating_sub(beat.load(Relaxed)) > max)
            .map(|(slot, _)| heartbeat_name(slot, self.workers))
            .collect()
    }

    pub(crate) fn workers(&self) -> usize {
        self.workers
    }

    pub(crate) fn sockets(&self) -> Arc<UdpSockets> {
        self.sockets.read().clone()
    }

    /// An outbox whose TUN writes fit this device's TUN (headers, superpackets or not).
    pub(crate) fn outbox(&self) -> Outbox {
        Outbox::new(self.tun.offload(), self.tun.udp_gso())
    }

    /// Why the device stopped, once it has.
    pub(crate) fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.lock().clone()
    }

    /// Whether the workers are pinned right now (the `pinned` mode, or an adaptive device
    /// while quiet). Then each worker's TUN thread serves its UDP sockets as well, and the
    /// UDP thread waits: a round trip through a quiet router wakes one thread fewer on each
    /// side (the reply a pod sends while this thread writes the request is read by the same
    /// thread on its next turn), which took a fifth off the round trip's p99 where it was
    /// measured (BENCHMARKS.md, session 8). Busy, one thread per direction carries more.
    pub(crate) fn pinned_now(&self) -> bool {
        self.placement.as_ref().is_some_and(|p| p.is_pinned())
    }

    /// The UDP thread of `worker` says whether it serves its sockets: it steps aside only
    /// between polls, and the TUN thread serves them only while it does not, so the sockets
    /// are never left unserved.
    pub(crate) fn udp_thread_serves(&self, worker: usize, serving: bool) {
        if let Some(flag) = self.udp_thread_serving.get(worker) {
            flag.store(serving, Relaxed);
        }
    }

    pub(crate) fn udp_thread_serving(&self, worker: usize) -> bool {
        self.udp_thread_serving
            .get(worker)
            .is_none_or(|flag| flag.load(Relaxed))
    }

    /// Whether the workers may be pinned (else they always stay spread).
    pub(crate) fn pinned_workers(&self) -> bool {
        self.placement.is_some()
    }

    /// Stops the device's threads, keeping the first reason given.
    pub(crate) fn finish(&self, reason: ExitReason) {
        let mut exit = self.exit.lock();
        if exit.is_none() {
            *exit = Some(reason);
        }
        self.stop.store(true, Relaxed);
    }

    /// Registers the calling thread as one of `worker`'s with the placement.
    pub(crate) fn place(&self, worker: usize) {
        if let Some(placement) = &self.placement {
            placement.register(worker);
        }
    }

    /// Takes the TUN's current MTU into the engine, when the device follows it.
    pub(crate) fn refresh_mtu(&self) {
        if !self.follow_link_mtu {
            return;
        }
        if let Ok(mtu) = self.tun.mtu() {
            if usize::from(mtu) != self.engine.mtu() {
                self.engine.set_mtu(usize::from(mtu));
            }
        }
    }

    /// A device with a configured MTU: says once per change when the TUN's MTU differs from
    /// it (`last` is the TUN's MTU seen at the previous check).
    pub(crate) fn note_link_mtu(&self, last: &mut Option<u16>) {
        if self.follow_link_mtu {
            return;
        }
        let Ok(link) = self.tun.mtu() else {
            return;
        };
        if *last == Some(link) {
            return;
        }
        let tunnel = self.engine.mtu();
        if last.is_some() || usize::from(link) != tunnel {
            if usize::from(link) > tunnel {
                tracing::warn!(
                    link_mtu = link,
                    tunnel_mtu = tunnel,
                    "the TUN's MTU is above the configured tunnel MTU: larger packets are \
                     dropped (too_big) with an ICMP error carrying the tunnel MTU"
                );
            } else {
                tracing::info!(
                    link_mtu = link,
                    tunnel_mtu = tunnel,
                    "the TUN's MTU changed"
                );
            }
        }
        *last = Some(link);
    }

    /// Lets an adaptive placement follow the load; called once per timer tick.
    pub(crate) fn follow_load(&self) {
        if let Some(placement) = &self.placement {
            placement.tick(self.packets_in(), || self.sockets());
        }
    }

    /// Lets a pinned adaptive placement spread as soon as the load calls for it; called by
    /// the data threads after each batch (see `Placement::burst`).
    #[inline]
    pub(crate) fn follow_burst(&self) {
        if let Some(placement) = &self.placement {
            placement.burst(self.packets_in(), || self.sockets());
        }
    }

    /// The load the placement follows: TUN reads plus datagrams received, so far.
    fn packets_in(&self) -> u64 {
        let stats = self.engine.stats();
        stats.tun_packets_in.load(Relaxed) + stats.datagrams_in.load(Relaxed)
    }

    pub(crate) fn tick(&self, outbox: &mut Outbox, scratch: &mut [u8; SCRATCH_LEN]) {
        self.engine.tick(Instant::now(), scratch, outbox);
        if !outbox.is_empty() {
            let sockets = self.sockets();
            // Timer output is handshakes and keepalives: no GSO needed.
            let _ = outbox.flush(self.tun.queue(0), sockets.worker(0), 1, &self.engine);
        }
    }
}

impl ListenSockets for Shared {
    fn port(&self) -> u16 {
        self.sockets().port()
    }

    fn fwmark(&self) -> u32 {
        self.fwmark.load(Relaxed)
    }

    fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        self.sockets().set_mark(fwmark)?;
        self.fwmark.store(fwmark, Relaxed);
        Ok(())
    }

    fn rebind(&self, port: u16) -> io::Result<()> {
        let fresh = UdpSockets::bind(port, self.fwmark.load(Relaxed), self.workers)?;
        let old = std::mem::replace(&mut *self.sockets.write(), Arc::new(fresh));
        self.sockets_generation.fetch_add(1, Relaxed);
        // After the swap, outside the sockets lock: a placement change racing with this one
        // then sees the new sockets, and this applies the latest placement.
        if let Some(placement) = &self.placement {
            placement.sockets_replaced(&self.sockets());
        }
        // The threads polling the old sockets move to the new ones now.
        old.stop_receiving();
        Ok(())
    }
}

impl DeviceControl for Shared {
    fn get(&self) -> DeviceSnapshot {
        control::get(&self.engine, self)
    }

    fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
        if control::set(&self.engine, self, &update)? {
            let mut outbox = self.outbox();
            let mut scratch = new_scratch();
            self.tick(&mut outbox, &mut scratch);
        }
        Ok(())
    }
}
