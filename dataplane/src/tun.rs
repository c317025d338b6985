//! The TUN device: created (or attached to) by name through `tun-rs`, packets read and written
//! without a packet-information header, one nonblocking queue per worker (`IFF_MULTI_QUEUE`),
//! with offloads (`IFF_VNET_HDR`, TSO/USO) when the kernel grants them. Also the kernel's rules
//! for interface names.

use std::io;

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

/// What is wrong with an interface name by the kernel's rules (`dev_valid_name`), if
/// anything. The one check behind the TUN, the UAPI socket path and the config file.
pub fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("must not be \".\" or \"..\"")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("must not contain '/', ':', whitespace or control characters")
    } else {
        None
    }
}

/// Checks a name the way the kernel will, so a bad name fails before anything is created.
pub fn check_ifname(name: &str) -> Result<(), TunError> {
    match ifname_problem(name) {
        Some(_) => Err(TunError::BadName(name.to_string())),
        None => Ok(()),
    }
}

/// How a TUN device was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunOptions {
    pub mtu: u16,
    /// Queues to open (`IFF_MULTI_QUEUE` when more than one): one per worker.
    pub queues: usize,
    /// Ask for `IFF_VNET_HDR` + TSO/USO offloads; falls back to plain packets if refused.
    pub offload: bool,
}

/// A TUN device opened by this process: one file descriptor per queue.
pub struct Tun {
    queues: Vec<SyncDevice>,
    name: String,
    offload: bool,
}

impl Tun {
    /// Creates the TUN `name` (down, no addresses).
    pub fn create(name: &str, options: TunOptions) -> Result<Tun, TunError> {
        check_ifname(name)?;
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Err(TunError::NoDevice);
        }
        let queues = options.queues.max(1);
        let open = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .mtu(options.mtu)
                .packet_information(false)
                .offload(offload)
                .multi_queue(queues > 1)
                .build_sync()
        };
        let (first, offload) = match open(options.offload) {
            Ok(device) => (device, options.offload),
            Err(e) if options.offload && !is_setup_error(&e) => {
                // Vendor kernels and some drivers refuse TUNSETOFFLOAD: run without it.
                tracing::warn!(interface = name, error = %e, "TUN offloads refused; running without them");
                (open(false).map_err(|e| tun_error(name, e))?, false)
            }
            Err(e) => return Err(tun_error(name, e)),
        };
        let mut devices = vec![first];
        for _ in 1..queues {
            let queue = devices[0].try_clone().map_err(|e| tun_error(name, e))?;
            devices.push(queue);
        }
        for device in &devices {
            device
                .set_nonblocking(true)
                .map_err(|source| TunError::Io {
                    name: name.to_string(),
                    source,
                })?;
        }
        Ok(Tun {
            queues: devices,
            name: name.to_string(),
            offload,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether reads carry virtio-net headers (superpackets) and writes may be coalesced.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Whether the TUN also takes UDP superpackets (USO4/USO6, kernel 6.2+).
    pub fn udp_gso(&self) -> bool {
        self.offload && self.queues[0].udp_gso()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Queue `index` (wrapping, so any index is valid).
    pub fn queue(&self, index: usize) -> &SyncDevice {
        &self.queues[index % self.queues.len()]
    }

    /// Sets the link up or down.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        self.queues[0].enabled(up)
    }

    pub fn mtu(&self) -> io::Result<u16> {
        self.queues[0].mtu()
    }

    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        self.queues[0].set_mtu(mtu)
    }

    /// Whether the interface still exists (it is gone after `ip link del`).
    pub fn exists(&self) -> bool {
        interface_index(&self.name).is_some()
    }
}

/// Errors that would recur without offloads too (permissions, no device, bad name).
fn is_setup_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::EBUSY | libc::EEXIST | libc::ENOENT | libc::ENODEV)
    )
}

fn tun_error(name: &str, source: io::Error) -> TunError {
    match source.raw_os_error() {
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
