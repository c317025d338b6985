//! A device's UAPI get and set over its two halves: the engine (private key, peers, allowed
//! IPs) and the listen sockets (port, fwmark). The one place that says what a set does outside
//! the engine and in what order; the running [`crate::device`] and the UAPI server tests both
//! run it, so the tests exercise the device's own semantics.

use std::io;
use std::time::SystemTime;

use crate::config::{DeviceSnapshot, DeviceUpdate, ErrnoError, SetError};
use crate::engine::Engine;

/// The listen sockets, as a set changes them.
pub(crate) trait ListenSockets {
    /// The port bound now.
    fn port(&self) -> u16;
    /// The mark the sockets' packets carry (0: none).
    fn fwmark(&self) -> u32;
    /// Marks the sockets' packets with `fwmark` (0: none) from now on.
    fn set_fwmark(&self, fwmark: u32) -> io::Result<()>;
    /// Replaces the sockets with ones bound to `port` (0: a random port) and marked with
    /// [`ListenSockets::fwmark`]. On error the old sockets stay.
    fn rebind(&self, port: u16) -> io::Result<()>;
}

/// The device as a UAPI `get` reports it (handshakes dated by the wall clock now).
pub(crate) fn get(engine: &Engine, sockets: &impl ListenSockets) -> DeviceSnapshot {
    let (private_key, peers) = engine.peer_snapshots(SystemTime::now(), std::time::Instant::now());
    DeviceSnapshot {
        private_key,
        listen_port: sockets.port(),
        fwmark: sockets.fwmark(),
        peers,
    }
}

/// Applies `update` in this order: the fwmark (so a rebind below already carries it), the
/// listen port (rebound when it changes, and always for 0: a fresh random port), then the
/// private key and the peers in the engine. The first failure ends the set; what came before
/// it stays applied (a new fwmark when the port is taken). Returns true when the engine wants
/// a packet sent at once (a keepalive just switched on): tick it.
pub(crate) fn set(
    engine: &Engine,
    sockets: &impl ListenSockets,
    update: &DeviceUpdate,
) -> Result<bool, SetError> {
    if let Some(fwmark) = update.fwmark {
        sockets
            .set_fwmark(fwmark)
            .map_err(|e| io_error(format!("setting fwmark {fwmark}"), &e))?;
    }
    if let Some(port) = update.listen_port {
        if port == 0 || port != sockets.port() {
            sockets.rebind(port).map_err(|e| {
                if e.kind() == io::ErrorKind::AddrInUse {
                    SetError::AddressInUse(format!("UDP port {port}"))
                } else {
                    io_error(format!("binding UDP port {port}"), &e)
                }
            })?;
        }
    }
    engine.apply(update)
}

fn io_error(context: String, e: &io::Error) -> SetError {
    SetError::Io {
        context,
        source: ErrnoError(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

#[cfg(test)]
mod socket_device;
#[cfg(test)]
pub(crate) use socket_device::SocketDevice;

#[cfg(test)]
mod tests;
