//! A running device: the engine, the TUN (one queue per worker) and the listen sockets (one
//! `SO_REUSEPORT` pair per worker), started, stopped and handed to the UAPI. It owns what
//! runs beneath it: the state its threads share (`shared`), the threads themselves
//! (`workers`), the TUN thread's batch (`tun_batch`) and the handshake queue with its
//! thread (`handshakes`).

mod handshakes;
mod shared;
mod tun_batch;
mod workers;

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use thiserror::Error;

use crate::affinity::{Placement, WorkerAffinity};
use crate::config::DeviceControl;
use crate::engine::Engine;
use crate::tun::{Tun, TunError, TunOptions};
use crate::udp::UdpSockets;
use shared::Shared;

pub use shared::ExitReason;

/// What a device needs to start.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub ifname: String,
    pub mtu: u16,
    /// Whether the tunnel MTU follows the TUN's (`ip link set mtu`, as wg-quick sets it
    /// after the device starts, and as wireguard-go follows it). False when the MTU is
    /// configured: the engine keeps `mtu`, and a packet larger than it that the TUN lets
    /// through (its MTU raised behind the router's back) is dropped as `too_big` with an ICMP
    /// error carrying `mtu`, so the sender's path MTU comes back to what the tunnel carries.
    pub follow_link_mtu: bool,
    /// 0 = a random port.
    pub listen_port: u16,
    pub fwmark: u32,
    /// Worker count (0 = one per core).
    pub workers: usize,
    /// TUN offloads (TSO/USO + GRO writes) and UDP GSO; off for kernels where they misbehave.
    pub offload: bool,
    /// Whether workers are pinned to CPUs, with packets steered to the worker of their CPU
    /// (see [`crate::affinity`]).
    pub affinity: WorkerAffinity,
}

impl DeviceOptions {
    /// The worker count to use: the configured one, or one per core.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(transparent)]
    Tun(#[from] TunError),
    #[error("binding UDP port {port}: {source}")]
    Bind { port: u16, source: io::Error },
    #[error("starting a device thread: {0}")]
    Thread(io::Error),
}

/// A running device. Dropping it stops its threads.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Device {
    /// Creates the TUN, binds the listen sockets and starts the threads.
    pub fn start(options: &DeviceOptions) -> Result<Device, DeviceError> {
        let workers = options.worker_count();
        let tun = Tun::create(
            &options.ifname,
            TunOptions {
                mtu: options.mtu,
                queues: workers,
                offload: options.offload,
            },
        )?;
        let sockets =
            UdpSockets::bind(options.listen_port, options.fwmark, workers).map_err(|source| {
                DeviceError::Bind {
                    port: options.listen_port,
                    source,
                }
            })?;
        let placement = Placement::new(
            options.affinity,
            workers,
            std::os::fd::AsRawFd::as_raw_fd(tun.queue(0)),
        )
        .filter(|placement| placement.start(&sockets));
        let engine = Engine::new(usize::from(options.mtu), Instant::now());
        let mut shared = Shared::new(engine, tun, sockets, options.fwmark, workers, placement);
        shared.follow_link_mtu = options.follow_link_mtu;
        let shared = Arc::new(shared);
        let mut device = Device {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let mut spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(body)
                .map(|handle| device.threads.push(handle))
                .map_err(DeviceError::Thread)
        };
        for worker in 0..workers {
            let s = shared.clone();
            spawn(
                format!("tsk-tun{worker}"),
                Box::new(move || {
                    s.place(worker);
                    workers::tun_loop(s, worker)
                }),
            )?;
            let s = shared.clone();
            spawn(
                format!("tsk-udp{worker}"),
                Box::new(move || {
                    s.place(worker);
                    workers::udp_loop(s, worker)
                }),
            )?;
        }
        let s = shared.clone();
        spawn(
            "tsk-handshake".to_string(),
            Box::new(move || workers::handshake_loop(s)),
        )?;
        let s = shared.clone();
        spawn(
            "tsk-timers".to_string(),
            Box::new(move || workers::timer_loop(s)),
        )?;
        tracing::info!(
            interface = %options.ifname,
            workers,
            offload = shared.tun.offload(),
            affinity = options.affinity.name(),
            pinned_workers = shared.pinned_workers(),
            // Which ChaCha20-Poly1305 seals and opens data messages on this CPU.
            aead = tailsk8s_noise::aead::Aead::new(&[0; 32]).implementation(),
            "device started"
        );
        Ok(device)
    }

    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// The UAPI / control-plane view of this device.
    pub fn control(&self) -> Arc<dyn DeviceControl> {
        self.shared.clone()
    }

    pub fn tun(&self) -> &Tun {
        &self.shared.tun
    }

    pub fn listen_port(&self) -> u16 {
        self.shared.sockets().port()
    }

    /// Why the device stopped, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.exit_reason()
    }

    pub fn stop(&self) {
        self.shared.finish(ExitReason::Stopped);
    }

    /// A handle for health checks and metrics that outlives borrows of the device.
    pub fn health(&self) -> DeviceHealth {
        DeviceHealth {
            shared: self.shared.clone(),
        }
    }
}

/// What a health check or a metrics scrape reads of a running device: its threads' liveness,
/// whether it still runs, its worker count and offload state.
#[derive(Clone)]
pub struct DeviceHealth {
    shared: Arc<Shared>,
}

impl DeviceHealth {
    /// The device's threads that have not gone round their loop for longer than `max`.
    /// Threads wake at least every 100 ms, so a second or more means one is stuck.
    pub fn stalled_threads(&self, max: std::time::Duration) -> Vec<String> {
        self.shared.stalled(max)
    }

    /// `None` while the device runs; why it stopped otherwise.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.exit_reason()
    }

    /// Whether the TUN interface still exists.
    pub fn tun_exists(&self) -> bool {
        self.shared.tun.exists()
    }

    pub fn workers(&self) -> usize {
        self.shared.workers()
    }

    /// Whether the TUN runs with offloads (TSO/USO reads, GRO writes).
    pub fn offload(&self) -> bool {
        self.shared.tun.offload()
    }

    /// Whether UDP sends may carry several datagrams (GSO).
    pub fn udp_gso(&self) -> bool {
        self.shared.udp_gso
    }

    /// The engine's device-wide counters (drops by reason and totals).
    pub fn stats(&self) -> &crate::stats::Stats {
        self.shared.engine.stats()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
