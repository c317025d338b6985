//! [`SocketDevice`], the smallest real device the UAPI tests run against: the engine and real
//! listen sockets, without a TUN or threads, driven by the device's own [`get`] and [`set`].

use std::io;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::Mutex;

use super::{get, set, ListenSockets};
use crate::config::{DeviceControl, DeviceSnapshot, DeviceUpdate, SetError};
use crate::engine::{Engine, DEFAULT_MTU};
use crate::udp::UdpSockets;

/// The smallest real device: the engine and one pair of real listen sockets (IPv4 and
/// IPv6, on all addresses), without a TUN or threads, run through [`get`] and [`set`].
/// It never sends: a set that asks for a packet at once is not ticked.
pub(crate) struct SocketDevice {
    pub(crate) engine: Engine,
    sockets: Mutex<UdpSockets>,
    fwmark: AtomicU32,
}

impl SocketDevice {
    /// No key, no peers, a random listen port, no fwmark.
    pub(crate) fn new() -> SocketDevice {
        SocketDevice {
            engine: Engine::new(DEFAULT_MTU, Instant::now()),
            sockets: Mutex::new(UdpSockets::bind(0, 0, 1).expect("binding a random UDP port")),
            fwmark: AtomicU32::new(0),
        }
    }
}

impl ListenSockets for SocketDevice {
    fn port(&self) -> u16 {
        self.sockets.lock().port()
    }

    fn fwmark(&self) -> u32 {
        self.fwmark.load(Relaxed)
    }

    fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        self.sockets.lock().set_mark(fwmark)?;
        self.fwmark.store(fwmark, Relaxed);
        Ok(())
    }

    fn rebind(&self, port: u16) -> io::Result<()> {
        let fresh = UdpSockets::bind(port, self.fwmark(), 1)?;
        *self.sockets.lock() = fresh;
        Ok(())
    }
}

impl DeviceControl for SocketDevice {
    fn get(&self) -> DeviceSnapshot {
        get(&self.engine, self)
    }

    fn set(&self, update: DeviceUpdate) -> Result<(), SetError> {
        set(&self.engine, self, &update).map(|_send_now| ())
    }
}
