//! Where a running device's workers are placed, and when. Pinned: each worker's threads run
//! on one CPU and the kernel hands a packet to the worker of the CPU it is on. Spread: threads
//! run anywhere and the kernel's flow hash picks the worker.
//!
//! Why pin: on a VM, waking a thread that sleeps on another, idle vCPU costs tens of
//! microseconds, and a round trip through a userspace router needs several wake-ups. With the
//! worker of the sending CPU serving the packet, a pod's request, both routers and the reply
//! stay on the CPU the pod sent from, and each wake-up is a cheap local switch. Why spread: a
//! busy flow then shares its CPU with the application, halving its throughput on small
//! nodes. [`Adaptive`] pins while the device is quiet and spreads while it is busy.
//!
//! Here are the policy ([`WorkerAffinity`], [`Adaptive`] and its thresholds) and the
//! `Placement` that applies it: it registers the worker threads, places them, and in the
//! adaptive mode follows the load from the timer's tick. The mechanisms (the CPU map and the
//! BPF programs) are in [`crate::steering`]. Everything is best effort: without CAP_BPF, on
//! old kernels or in a cpuset that cannot be read, the device stays spread.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::steering::{self, CpuMap};
use crate::sys;
use crate::udp::UdpSockets;

/// How workers are placed on CPUs (`worker_affinity` in the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerAffinity {
    /// Pinned while quiet, spread while busy (see [`Adaptive`]).
    #[default]
    Adaptive,
    /// Always pinned: the lowest latency, less throughput per busy flow.
    Pinned,
    /// Never pinned: the kernel's flow hash picks the worker.
    Off,
}

impl WorkerAffinity {
    pub const NAMES: [&'static str; 3] = ["adaptive", "pinned", "off"];

    pub fn name(self) -> &'static str {
        match self {
            WorkerAffinity::Adaptive => "adaptive",
            WorkerAffinity::Pinned => "pinned",
            WorkerAffinity::Off => "off",
        }
    }
}

impl std::str::FromStr for WorkerAffinity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "adaptive" => Ok(WorkerAffinity::Adaptive),
            "pinned" => Ok(WorkerAffinity::Pinned),
            "off" => Ok(WorkerAffinity::Off),
            other => Err(format!(
                "unknown worker affinity `{other}` (expected one of: {})",
                WorkerAffinity::NAMES.join(", ")
            )),
        }
    }
}

/// Packets (TUN reads plus datagrams received) in one timer tick above which an adaptive
/// device spreads its workers: 1,000 per 100 ms is ~115 Mbit/s of full-size packets, a few
/// per cent of one core — far above request/response traffic (a ping every millisecond is
/// 200 per tick on each router), far below one busy flow.
pub const SPREAD_ABOVE_PER_TICK: u64 = 1_000;
/// Packets per tick below which a tick counts as quiet.
pub const QUIET_BELOW_PER_TICK: u64 = 300;
/// Quiet ticks in a row before an adaptive device pins its workers again (1 s at 100 ms), so
/// a flow pausing briefly does not flap between the modes.
pub const QUIET_TICKS_TO_PIN: u32 = 10;

/// The adaptive mode's decision, fed the packet count of each timer tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adaptive {
    pinned: bool,
    quiet_ticks: u32,
}

impl Default for Adaptive {
    /// A fresh device is quiet: pinned.
    fn default() -> Self {
        Adaptive {
            pinned: true,
            quiet_ticks: 0,
        }
    }
}

impl Adaptive {
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// Takes one tick's packet count; returns the new placement (`true` = pinned) when it
    /// changes.
    pub fn observe(&mut self, packets: u64) -> Option<bool> {
        if self.pinned {
            if packets > SPREAD_ABOVE_PER_TICK {
                self.pinned = false;
                self.quiet_ticks = 0;
                return Some(false);
            }
            return None;
        }
        if packets < QUIET_BELOW_PER_TICK {
            self.quiet_ticks += 1;
            if self.quiet_ticks >= QUIET_TICKS_TO_PIN {
                self.pinned = true;
                self.quiet_ticks = 0;
                return Some(true);
            }
        } else {
            self.quiet_ticks = 0;
        }
        None
    }

    /// Takes the packet count of the tick so far: a pinned device that is already busy
    /// spreads now instead of at the tick's end. Returns `Some(false)` when it spreads.
    pub fn observe_so_far(&mut self, packets: u64) -> Option<bool> {
        if self.pinned && packets > SPREAD_ABOVE_PER_TICK {
            return self.observe(packets);
        }
        None
    }
}

/// The placement of one device's workers.
pub(crate) struct Placement {
    mode: WorkerAffinity,
    map: CpuMap,
    /// Where spread threads may run: every CPU the process may use.
    allowed: Vec<u32>,
    /// Any TUN queue: the steering program is the device's, not the queue's.
    tun_queue: RawFd,
    state: Mutex<State>,
    /// Mirrors of `state.adaptive.pinned()` and `state.last_packets`, so the data threads
    /// can see without the lock whether the current tick already calls for spreading.
    pinned: AtomicBool,
    tick_start: AtomicU64,
}

struct State {
    /// The current placement (also in the `pinned` mode, where it never changes).
    adaptive: Adaptive,
    /// Worker threads: (worker index, thread id).
    threads: Vec<(usize, libc::pid_t)>,
    /// The load counter at the previous tick.
    last_packets: u64,
}

impl Placement {
    /// `None` when workers are never pinned: mode `off`, one worker, more workers than
    /// CPUs, or an unreadable affinity mask.
    pub(crate) fn new(mode: WorkerAffinity, workers: usize, tun_queue: RawFd) -> Option<Self> {
        if mode == WorkerAffinity::Off {
            return None;
        }
        let allowed = sys::allowed_cpus().ok()?;
        let map = CpuMap::from_allowed(&allowed, workers)?;
        Some(Placement {
            mode,
            map,
            allowed,
            tun_queue,
            state: Mutex::new(State {
                adaptive: Adaptive::default(),
                threads: Vec::new(),
                last_packets: 0,
            }),
            pinned: AtomicBool::new(true),
            tick_start: AtomicU64::new(0),
        })
    }

    /// Applies the first placement (pinned: both modes start quiet). Returns `false`, having
    /// logged why, when the kernel refuses the steering programs: the device then stays
    /// spread for good.
    pub(crate) fn start(&self, sockets: &UdpSockets) -> bool {
        match self.steer(sockets, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "workers stay spread: the kernel refused the steering programs");
                let _ = self.steer(sockets, false);
                false
            }
        }
    }

    /// Whether the workers are pinned now (the lock-free mirror of the placement).
    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.load(Relaxed)
    }

    /// Records the calling thread as one of `worker`'s and places it as the device is now.
    pub(crate) fn register(&self, worker: usize) {
        let tid = sys::current_thread_id();
        let mut state = self.state.lock();
        state.threads.push((worker, tid));
        if state.adaptive.pinned() {
            self.place(worker, tid, true);
        }
    }

    /// New listen sockets (a `listen_port` change) get the current placement.
    pub(crate) fn sockets_replaced(&self, sockets: &UdpSockets) {
        let state = self.state.lock();
        if state.adaptive.pinned() {
            if let Err(e) = sockets.steer(Some(&self.map)) {
                tracing::warn!(error = %e, "new listen sockets keep the kernel's hash");
            }
        }
    }

    /// One timer tick: `packets` is the device's running count of packets in (TUN reads
    /// plus datagrams). In the adaptive mode, switches placement when the load says so.
    /// `sockets` gives the current listen sockets (read under the placement's lock, so a
    /// concurrent `listen_port` change is never left with the old placement).
    pub(crate) fn tick(&self, packets: u64, sockets: impl Fn() -> Arc<UdpSockets>) {
        if self.mode != WorkerAffinity::Adaptive {
            return;
        }
        let mut state = self.state.lock();
        let delta = packets.saturating_sub(state.last_packets);
        state.last_packets = packets;
        self.tick_start.store(packets, Relaxed);
        let Some(pinned) = state.adaptive.observe(delta) else {
            return;
        };
        self.apply(&state, pinned, delta, &sockets());
    }

    /// Called by the data threads after each batch with the same running count as
    /// [`Placement::tick`]: a pinned adaptive device whose tick is already busy spreads now.
    /// Why not wait for the tick: while pinned, a busy flow's packets follow the CPU its
    /// sender runs on, so the scheduler moving the sender splits one peer's packets between
    /// two workers and their queues; the longer that lasts, the further they are reordered —
    /// a whole tick at full rate is tens of thousands of packets, beyond any replay window.
    /// Never waits: when another thread holds the placement, that one decides.
    pub(crate) fn burst(&self, packets: u64, sockets: impl Fn() -> Arc<UdpSockets>) {
        if self.mode != WorkerAffinity::Adaptive || !self.pinned.load(Relaxed) {
            return;
        }
        let so_far = packets.saturating_sub(self.tick_start.load(Relaxed));
        if so_far <= SPREAD_ABOVE_PER_TICK {
            return;
        }
        let Some(mut state) = self.state.try_lock() else {
            return;
        };
        if let Some(pinned) = state.adaptive.observe_so_far(so_far) {
            self.apply(&state, pinned, so_far, &sockets());
        }
        // The tick's own count starts where the spread happened, as if the tick ended here.
        state.last_packets = packets;
        self.tick_start.store(packets, Relaxed);
    }

    /// Moves the threads and the steering to the new placement; `packets` is the load that
    /// decided it, for the log.
    fn apply(&self, state: &State, pinned: bool, packets: u64, sockets: &UdpSockets) {
        self.pinned.store(pinned, Relaxed);
        if pinned {
            // Threads first, then the steering: packets never go to a worker whose threads
            // still run elsewhere.
            for &(worker, tid) in &state.threads {
                self.place(worker, tid, true);
            }
            if let Err(e) = self.steer(sockets, true) {
                tracing::warn!(error = %e, "could not steer packets to pinned workers");
            }
        } else {
            if let Err(e) = self.steer(sockets, false) {
                tracing::warn!(error = %e, "could not give packets back to the kernel's hash");
            }
            for &(worker, tid) in &state.threads {
                self.place(worker, tid, false);
            }
        }
        // Rare by design (a second of quiet before pinning again): worth a line each.
        if pinned {
            tracing::info!(
                packets_per_tick = packets,
                "workers pinned: the device is quiet"
            );
        } else {
            tracing::info!(
                packets_per_tick = packets,
                "workers spread: the device is busy"
            );
        }
    }

    /// Steers the TUN's and the sockets' packets to the worker of their CPU, or (`pinned`
    /// false) gives both back to the kernel's hash.
    fn steer(&self, sockets: &UdpSockets, pinned: bool) -> std::io::Result<()> {
        let map = pinned.then_some(&self.map);
        steering::steer_tun(self.tun_queue, map)?;
        sockets.steer(map)
    }

    fn place(&self, worker: usize, tid: libc::pid_t, pinned: bool) {
        let cpu = [self.map.cpu_of(worker)];
        let cpus: &[u32] = if pinned { &cpu } else { &self.allowed };
        if let Err(e) = sys::set_thread_cpus(tid, cpus) {
            tracing::warn!(worker, pinned, error = %e, "could not place a worker thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_spreads_at_once_when_busy_and_pins_after_a_quiet_second() {
        let mut a = Adaptive::default();
        assert!(a.pinned());
        assert_eq!(
            a.observe(SPREAD_ABOVE_PER_TICK),
            None,
            "at the threshold: stays"
        );
        assert_eq!(a.observe(SPREAD_ABOVE_PER_TICK + 1), Some(false));
        assert_eq!(a.observe(100_000), None);
        // Quiet ticks, interrupted by a moderate one: the count starts over.
        for _ in 0..QUIET_TICKS_TO_PIN - 1 {
            assert_eq!(a.observe(0), None);
        }
        assert_eq!(a.observe(QUIET_BELOW_PER_TICK), None, "not quiet");
        for _ in 0..QUIET_TICKS_TO_PIN - 1 {
            assert_eq!(a.observe(QUIET_BELOW_PER_TICK - 1), None);
        }
        assert_eq!(a.observe(0), Some(true));
        assert!(a.pinned());
    }

    #[test]
    fn a_busy_tick_spreads_before_it_ends_but_never_pins() {
        let mut a = Adaptive::default();
        assert_eq!(a.observe_so_far(SPREAD_ABOVE_PER_TICK), None);
        assert_eq!(a.observe_so_far(SPREAD_ABOVE_PER_TICK + 1), Some(false));
        // Spread: a part of a tick says nothing about quiet, whatever its count.
        for _ in 0..2 * QUIET_TICKS_TO_PIN {
            assert_eq!(a.observe_so_far(0), None);
        }
        assert!(!a.pinned());
    }

    #[test]
    fn affinity_names_round_trip_and_unknown_ones_are_refused() {
        for name in WorkerAffinity::NAMES {
            assert_eq!(name.parse::<WorkerAffinity>().unwrap().name(), name);
        }
        let err = "pinnned".parse::<WorkerAffinity>().unwrap_err();
        assert!(err.contains("adaptive, pinned, off"), "{err}");
        assert_eq!(WorkerAffinity::default(), WorkerAffinity::Adaptive);
    }
}
