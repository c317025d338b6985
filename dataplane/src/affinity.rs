//! Where a running device's workers are placed: pinned (each worker's threads on its CPU,
//! the kernel steering packets to the worker of their CPU) or spread (threads anywhere, the
//! kernel's flow hash). Registers the worker threads, applies a placement, and in the
//! adaptive mode follows [`Adaptive`] from the timer's tick. The mechanisms (BPF programs,
//! CPU sets) are in [`crate::steering`].

use std::os::fd::RawFd;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::steering::{self, Adaptive, CpuMap, WorkerAffinity};
use crate::udp::UdpSockets;

/// The placement of one device's workers.
pub(crate) struct Placement {
    mode: WorkerAffinity,
    map: CpuMap,
    /// Where spread threads may run: every CPU the process may use.
    allowed: Vec<u32>,
    /// Any TUN queue: the steering program is the device's, not the queue's.
    tun_queue: RawFd,
    state: Mutex<State>,
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
        let allowed = steering::allowed_cpus().ok()?;
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

    /// Records the calling thread as one of `worker`'s and places it as the device is now.
    pub(crate) fn register(&self, worker: usize) {
        let tid = steering::current_thread_id();
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
        let Some(pinned) = state.adaptive.observe(delta) else {
            return;
        };
        let sockets = sockets();
        if pinned {
            // Threads first, then the steering: packets never go to a worker whose threads
            // still run elsewhere.
            for &(worker, tid) in &state.threads {
                self.place(worker, tid, true);
            }
            if let Err(e) = self.steer(&sockets, true) {
                tracing::warn!(error = %e, "could not steer packets to pinned workers");
            }
        } else {
            if let Err(e) = self.steer(&sockets, false) {
                tracing::warn!(error = %e, "could not give packets back to the kernel's hash");
            }
            for &(worker, tid) in &state.threads {
                self.place(worker, tid, false);
            }
        }
        // Rare by design (a second of quiet before pinning again): worth a line each.
        if pinned {
            tracing::info!(
                packets_per_tick = delta,
                "workers pinned: the device is quiet"
            );
        } else {
            tracing::info!(
                packets_per_tick = delta,
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
        if let Err(e) = steering::set_thread_cpus(tid, cpus) {
            tracing::warn!(worker, pinned, error = %e, "could not place a worker thread");
        }
    }
}
