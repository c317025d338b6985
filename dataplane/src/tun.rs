//! The TUN device: created (or attached to) by name through `tun-rs`, packets read and written
//! without a packet-information header, nonblocking so one worker can poll it beside its UDP
//! sockets. Offloads and multiple queues come with the fast path.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use thiserror::Error;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, Error)]
pub enum TunError {
    #[error("interface name {0:?} is invalid: 1 to 15 characters, no '/', whitespace or ':'")]
    BadName(String),
    #[error("/dev/net/tun is missing: load the tun module or give the container the device")]
    NoDevice,
    #[error("creating TUN {name} needs CAP_NET_ADMIN (run as root or a privileged pod)")]
    NotPermitted { name: String },
    #[error("interface {name} already exists and is not a TUN this process can attach to")]
    Busy { name: String },
    #[error("creating TUN {name}: {source}")]
    Io { name: String, source: io::Error },
}

/// Checks a name the way the kernel will, so a bad name fails before anything is created.
pub fn check_ifname(name: &str) -> Result<(), TunError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(TunError::BadName(name.to_string()))
    }
}

/// A TUN device opened by this process.
pub struct Tun {
    device: SyncDevice,
    name: String,
}

impl Tun {
    /// Creates the TUN `name` (down, no addresses) with the given MTU.
    pub fn create(name: &str, mtu: u16) -> Result<Tun, TunError> {
        check_ifname(name)?;
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(TunError::NoDevice);
        }
        let device = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .packet_information(false)
            .build_sync()
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TunError::NotPermitted {
                    name: name.to_string(),
                },
                Some(libc::EBUSY) | Some(libc::EEXIST) => TunError::Busy {
                    name: name.to_string(),
                },
                Some(libc::ENOENT) | Some(libc::ENODEV) => TunError::NoDevice,
                _ => TunError::Io {
                    name: name.to_string(),
                    source,
                },
            })?;
        device
            .set_nonblocking(true)
            .map_err(|source| TunError::Io {
                name: name.to_string(),
                source,
            })?;
        Ok(Tun {
            device,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet; `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.recv(buf)
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.device.send(packet)
    }

    /// Sets the link up or down.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        self.device.enabled(up)
    }

    pub fn mtu(&self) -> io::Result<u16> {
        self.device.mtu()
    }

    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        self.device.set_mtu(mtu)
    }

    /// Whether the interface still exists (it is gone after `ip link del`).
    pub fn exists(&self) -> bool {
        interface_index(&self.name).is_some()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}

/// The kernel's index of an interface in this network namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_kernel_rules() {
        assert!(check_ifname("tsk0").is_ok());
        assert!(check_ifname("a23456789012345").is_ok());
        assert!(check_ifname("a234567890123456").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
    }
}
