//! A running device: the engine wired to one TUN and the listen sockets by three threads.
//!
//! ```text
//!  tun thread    poll TUN ─► read a batch ─► engine (encrypt) ─► outbox ─► UDP sends
//!  udp thread    poll UDP ─► recvmmsg batch ─► engine (decrypt) ─► outbox ─► TUN writes, UDP sends
//!  timer thread  every 100 ms ─► engine.tick ─► outbox ─► UDP sends; follow the TUN's MTU
//! ```
//!
//! Each thread reads into its own buffers, then holds the engine's read lock only while the
//! engine fills its [`Outbox`], and makes the syscalls after releasing it. The device also
//! implements [`DeviceControl`] (UAPI get/set) because a set may rebind the listen sockets.

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use quinn_udp::RecvMeta;
use thiserror::Error;

use crate::config::{DeviceControl, DeviceSnapshot, DeviceUpdate, ErrnoError, SetError};
use crate::engine::{new_scratch, Engine, Transmit};
use crate::peer::Endpoint;
use crate::stats::{DropReason, Stats};
use crate::tun::{Tun, TunError};
use crate::udp::UdpSockets;

/// Packets one thread reads before handing them to the engine.
const BATCH: usize = 32;
/// Room for one packet or one GRO-coalesced run of datagrams.
const BUF_LEN: usize = 65536;
/// How often threads wake to notice a stop request or new sockets.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What a device needs to start.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub ifname: String,
    pub mtu: u16,
    /// 0 = a random port.
    pub listen_port: u16,
    pub fwmark: u32,
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

/// Output the engine produced during one batch, copied into buffers that are reused from
/// batch to batch (no allocation once they have grown to the working size).
#[derive(Default)]
pub struct Outbox {
    bytes: Vec<u8>,
    datagrams: Vec<(Endpoint, usize, usize)>,
    packets: Vec<(usize, usize)>,
}

impl Transmit for Outbox {
    fn send(&mut self, to: &Endpoint, datagram: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.datagrams.push((*to, start, self.bytes.len()));
    }

    fn write_tun(&mut self, packet: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(packet);
        self.packets.push((start, self.bytes.len()));
    }
}

impl Outbox {
    pub fn datagrams(&self) -> impl Iterator<Item = (&Endpoint, &[u8])> {
        self.datagrams
            .iter()
            .map(|(to, a, b)| (to, &self.bytes[*a..*b]))
    }

    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.packets.iter().map(|(a, b)| &self.bytes[*a..*b])
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty() && self.packets.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.datagrams.clear();
        self.packets.clear();
    }

    /// Makes the syscalls: TUN writes first (they feed local pods), then UDP sends.
    fn flush(&mut self, tun: &Tun, sockets: &UdpSockets, stats: &Stats) {
        for packet in self.packets() {
            if tun.send(packet).is_err() {
                stats.drop(DropReason::QueueFull);
            }
        }
        for (to, datagram) in self.datagrams() {
            if send_with_retry(sockets, to, datagram).is_err() {
                stats.drop(DropReason::QueueFull);
            }
        }
        self.clear();
    }
}

fn send_with_retry(sockets: &UdpSockets, to: &Endpoint, datagram: &[u8]) -> io::Result<()> {
    match sockets.send(to, datagram) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            // The socket buffer is full: give the NIC a moment, once.
            if let Some(socket) = sockets.for_endpoint(to) {
                poll_fds(
                    &[socket.as_raw_fd()],
                    libc::POLLOUT,
                    Duration::from_millis(10),
                );
            }
            sockets.send(to, datagram)
        }
        other => other,
    }
}

/// Waits until one of `fds` is ready for `events` or the timeout passes.
fn poll_fds(fds: &[i32], events: libc::c_short, timeout: Duration) -> bool {
    let mut pollfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(pollfds.len());
    for (slot, fd) in pollfds.iter_mut().zip(fds) {
        slot.fd = *fd;
        slot.events = events;
    }
    // SAFETY: `pollfds[..n]` is a valid array of initialised pollfd structs.
    let ready = unsafe {
        libc::poll(
            pollfds.as_mut_ptr(),
            n as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    ready > 0
}

/// The state the device's threads and its control interface share.
struct Shared {
    engine: Engine,
    tun: Tun,
    sockets: RwLock<Arc<UdpSockets>>,
    /// Bumped whenever `sockets` is replaced, so threads notice without taking the lock.
    sockets_generation: AtomicU64,
    fwmark: AtomicU32,
    stop: AtomicBool,
    exit: Mutex<Option<ExitReason>>,
}

impl Shared {
    fn sockets(&self) -> Arc<UdpSockets> {
        self.sockets.read().clone()
    }

    fn finish(&self, reason: ExitReason) {
        let mut exit = self.exit.lock();
        if exit.is_none() {
            *exit = Some(reason);
        }
        self.stop.store(true, Relaxed);
    }

    fn tick(&self, outbox: &mut Outbox, scratch: &mut [u8; crate::engine::SCRATCH_LEN]) {
        self.engine.tick(Instant::now(), scratch, outbox);
        if !outbox.is_empty() {
            let sockets = self.sockets();
            outbox.flush(&self.tun, &sockets, self.engine.stats());
        }
    }
}

impl DeviceControl for Shared {
    fn get(&self) -> DeviceSnapshot {
        let (private_key, peers) = self.engine.peer_snapshots();
        DeviceSnapshot {
            private_key,
            listen_port: self.sockets().port(),
            fwmark: self.fwmark.load(Relaxed),
            peers,
        }
    }

    fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
        if let Some(fwmark) = update.fwmark {
            self.sockets().set_mark(fwmark).map_err(|e| SetError::Io {
                context: format!("setting fwmark {fwmark}"),
                source: ErrnoError(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            self.fwmark.store(fwmark, Relaxed);
        }
        if let Some(port) = update.listen_port {
            if port == 0 || port != self.sockets().port() {
                let fresh = UdpSockets::bind(port, self.fwmark.load(Relaxed)).map_err(|e| {
                    if e.kind() == io::ErrorKind::AddrInUse {
                        SetError::AddressInUse(format!("UDP port {port}"))
                    } else {
                        SetError::Io {
                            context: format!("binding UDP port {port}"),
                            source: ErrnoError(e.raw_os_error().unwrap_or(libc::EIO)),
                        }
                    }
                })?;
                *self.sockets.write() = Arc::new(fresh);
                self.sockets_generation.fetch_add(1, Relaxed);
            }
        }
        let send_now = self.engine.apply(&update)?;
        if send_now {
            let mut outbox = Outbox::default();
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
        let tun = Tun::create(&options.ifname, options.mtu)?;
        let sockets = UdpSockets::bind(options.listen_port, options.fwmark).map_err(|source| {
            DeviceError::Bind {
                port: options.listen_port,
                source,
            }
        })?;
        let shared = Arc::new(Shared {
            engine: Engine::new(usize::from(options.mtu)),
            tun,
            sockets: RwLock::new(Arc::new(sockets)),
            sockets_generation: AtomicU64::new(0),
            fwmark: AtomicU32::new(options.fwmark),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
        });
        let mut device = Device {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let spawn = |name: &str, body: fn(Arc<Shared>), shared: Arc<Shared>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || body(shared))
                .map_err(DeviceError::Thread)
        };
        device
            .threads
            .push(spawn("tsk-tun", tun_loop, shared.clone())?);
        device
            .threads
            .push(spawn("tsk-udp", udp_loop, shared.clone())?);
        device
            .threads
            .push(spawn("tsk-timers", timer_loop, shared)?);
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

fn tun_loop(shared: Arc<Shared>) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF_LEN]).collect();
    let mut lens = [0usize; BATCH];
    let mut scratch = new_scratch();
    let mut outbox = Outbox::default();
    let mut sockets = shared.sockets();
    let mut generation = shared.sockets_generation.load(Relaxed);
    let fd = shared.tun.as_raw_fd();
    while !shared.stop.load(Relaxed) {
        if !poll_fds(&[fd], libc::POLLIN, POLL_INTERVAL) {
            continue;
        }
        let mut count = 0;
        while count < BATCH {
            match shared.tun.recv(&mut bufs[count]) {
                Ok(n) => {
                    lens[count] = n;
                    count += 1;
                }
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
            }
        }
        if count == 0 {
            continue;
        }
        {
            let mut batch = shared.engine.batch();
            for (buf, len) in bufs.iter_mut().zip(lens.iter()).take(count) {
                batch.handle_tun_packet(buf, *len, &mut scratch, &mut outbox);
            }
        }
        let current = shared.sockets_generation.load(Relaxed);
        if current != generation {
            sockets = shared.sockets();
            generation = current;
        }
        outbox.flush(&shared.tun, &sockets, shared.engine.stats());
    }
}

fn udp_loop(shared: Arc<Shared>) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF_LEN]).collect();
    let mut metas = [RecvMeta::default(); BATCH];
    let mut scratch = new_scratch();
    let mut outbox = Outbox::default();
    let mut sockets = shared.sockets();
    let mut generation = shared.sockets_generation.load(Relaxed);
    while !shared.stop.load(Relaxed) {
        let current = shared.sockets_generation.load(Relaxed);
        if current != generation {
            sockets = shared.sockets();
            generation = current;
        }
        let mut fds = [-1; 2];
        for (fd, socket) in fds.iter_mut().zip(sockets.sockets()) {
            *fd = socket.as_raw_fd();
        }
        if !poll_fds(&fds, libc::POLLIN, POLL_INTERVAL) {
            continue;
        }
        for socket in sockets.sockets() {
            loop {
                let received = {
                    let mut slices: [IoSliceMut<'_>; BATCH] = {
                        let mut iter = bufs.iter_mut();
                        std::array::from_fn(|_| match iter.next() {
                            Some(b) => IoSliceMut::new(&mut b[..]),
                            None => IoSliceMut::new(&mut []),
                        })
                    };
                    socket.recv(&mut slices, &mut metas)
                };
                let count = match received {
                    Ok(count) => count,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here as ECONNREFUSED and the like: not fatal.
                    Err(_) => break,
                };
                {
                    let mut batch = shared.engine.batch();
                    for (meta, buf) in metas.iter().zip(bufs.iter()).take(count) {
                        let from = canonical(meta.addr);
                        let stride = meta.stride.max(1);
                        for datagram in buf[..meta.len].chunks(stride) {
                            batch.handle_datagram(
                                from,
                                meta.dst_ip,
                                datagram,
                                &mut scratch,
                                &mut outbox,
                            );
                        }
                    }
                }
                outbox.flush(&shared.tun, &sockets, shared.engine.stats());
                if count < BATCH {
                    break;
                }
            }
        }
    }
}

fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn timer_loop(shared: Arc<Shared>) {
    let mut scratch = new_scratch();
    let mut outbox = Outbox::default();
    let mut last_mtu_check = Instant::now();
    while !shared.stop.load(Relaxed) {
        std::thread::sleep(POLL_INTERVAL);
        shared.tick(&mut outbox, &mut scratch);
        if last_mtu_check.elapsed() >= Duration::from_secs(1) {
            last_mtu_check = Instant::now();
            if !shared.tun.exists() {
                shared.finish(ExitReason::TunGone);
                return;
            }
            // `ip link set mtu` (wg-quick, operators) changes the tunnel MTU under us.
            if let Ok(mtu) = shared.tun.mtu() {
                if usize::from(mtu) != shared.engine.mtu() {
                    shared.engine.set_mtu(usize::from(mtu));
                }
            }
        }
    }
}
