//! A running device: the engine, the TUN (one queue per worker) and the listen sockets (one
//! `SO_REUSEPORT` pair per worker), its threads (see [`crate::workers`]) and its lifecycle.
//! The device also implements [`DeviceControl`] (UAPI get/set, see [`crate::control`]) because
//! a set may rebind the listen sockets or change their fwmark.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use thiserror::Error;

use crate::affinity::Placement;
use crate::config::{DeviceControl, DeviceSnapshot, DeviceUpdate, SetError};
use crate::control::{self, ListenSockets};
use crate::engine::{new_scratch, Engine};
use crate::outbox::Outbox;
use crate::steering::WorkerAffinity;
use crate::tun::{Tun, TunError, TunOptions};
use crate::udp::UdpSockets;
use crate::workers;

/// What a device needs to start.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub ifname: String,
    pub mtu: u16,
    /// 0 = a random port.
    pub listen_port: u16,
    pub fwmark: u32,
    /// Worker count (0 = one per core).
    pub workers: usize,
    /// TUN offloads (TSO/USO + GRO writes) and UDP GSO; off for kernels where they misbehave.
    pub offload: bool,
    /// Whether workers are pinned to CPUs, with packets steered to the worker of their CPU
    /// (see [`crate::steering`]).
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

/// Why a device stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// [`Device::stop`] was called.
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
    pub(crate) stop: AtomicBool,
    exit: Mutex<Option<ExitReason>>,
    workers: usize,
    /// Whether UDP sends may carry several datagrams (GSO).
    pub(crate) udp_gso: bool,
    /// Where workers run, unless they are never pinned.
    placement: Option<Placement>,
}

impl Shared {
    pub(crate) fn sockets(&self) -> Arc<UdpSockets> {
        self.sockets.read().clone()
    }

    pub(crate) fn finish(&self, reason: ExitReason) {
        let mut exit = self.exit.lock();
        if exit.is_none() {
            *exit = Some(reason);
        }
        self.stop.store(true, Relaxed);
    }

    /// Registers the calling thread as one of `worker`'s with the placement.
    fn place(&self, worker: usize) {
        if let Some(placement) = &self.placement {
            placement.register(worker);
        }
    }

    /// Takes the TUN's current MTU into the engine.
    pub(crate) fn refresh_mtu(&self) {
        if let Ok(mtu) = self.tun.mtu() {
            if usize::from(mtu) != self.engine.mtu() {
                self.engine.set_mtu(usize::from(mtu));
            }
        }
    }

    /// Lets an adaptive placement follow the load; called once per timer tick.
    pub(crate) fn follow_load(&self) {
        if let Some(placement) = &self.placement {
            let stats = self.engine.stats();
            let packets = stats.tun_packets_in.load(Relaxed) + stats.datagrams_in.load(Relaxed);
            placement.tick(packets, || self.sockets());
        }
    }

    pub(crate) fn tick(&self, outbox: &mut Outbox, scratch: &mut [u8; crate::engine::SCRATCH_LEN]) {
        self.engine.tick(Instant::now(), scratch, outbox);
        if !outbox.is_empty() {
            let sockets = self.sockets();
            // Timer output is handshakes and keepalives: no GSO needed.
            let _ = outbox.flush(self.tun.queue(0), sockets.worker(0), 1, self.engine.stats());
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
        *self.sockets.write() = Arc::new(fresh);
        self.sockets_generation.fetch_add(1, Relaxed);
        // After the swap, outside the sockets lock: a placement change racing with this one
        // then sees the new sockets, and this applies the latest placement.
        if let Some(placement) = &self.placement {
            placement.sockets_replaced(&self.sockets());
        }
        Ok(())
    }
}

impl DeviceControl for Shared {
    fn get(&self) -> DeviceSnapshot {
        control::get(&self.engine, self)
    }

    fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
        if control::set(&self.engine, self, &update)? {
            let mut outbox = self.tun.outbox();
            let mut scratch = new_scratch();
            self.tick(&mut outbox, &mut scratch);
        }
        Ok(())
    }
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
        let udp_gso = tun.offload();
        let placement = Placement::new(
            options.affinity,
            workers,
            std::os::fd::AsRawFd::as_raw_fd(tun.queue(0)),
        )
        .filter(|placement| placement.start(&sockets));
        let shared = Arc::new(Shared {
            engine: Engine::new(usize::from(options.mtu), Instant::now()),
            tun,
            sockets: RwLock::new(Arc::new(sockets)),
            sockets_generation: AtomicU64::new(0),
            fwmark: AtomicU32::new(options.fwmark),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            workers,
            udp_gso,
            placement,
        });
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
            "tsk-timers".to_string(),
            Box::new(move || workers::timer_loop(s)),
        )?;
        tracing::info!(
            interface = %options.ifname,
            workers,
            offload = shared.tun.offload(),
            affinity = options.affinity.name(),
            pinned_workers = shared.placement.is_some(),
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
        self.shared.exit.lock().clone()
    }

    pub fn stop(&self) {
        self.shared.finish(ExitReason::Stopped);
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
