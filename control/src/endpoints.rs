//! This node's direct endpoints, as announced to peers when the config file gives none: the
//! node's addresses that another node could reach directly, with the listen port.
//!
//! Left out: loopback, link-local, multicast and unspecified addresses; tailnet addresses
//! (100.64.0.0/10, fd7a:115c:a1e0::/48: the tailnet path is not a direct one); addresses
//! inside the cluster CIDRs (pod bridges); and addresses on tailscaled's and our own tunnel
//! interfaces. IPv4 first, then IPv6, each in the kernel's order.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Tailscale's IPv4 range (CGNAT space).
pub const TAILNET_V4: IpNet =
    IpNet::V4(ipnet::Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10));
/// Tailscale's IPv6 range.
pub const TAILNET_V6: IpNet = IpNet::V6(ipnet::Ipv6Net::new_assert(
    Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0),
    48,
));

/// Whether `ip` is a tailnet address.
pub fn is_tailnet(ip: &IpAddr) -> bool {
    TAILNET_V4.contains(ip) || TAILNET_V6.contains(ip)
}

/// Whether an address on interface `ifname` may be announced as a direct endpoint.
pub fn is_direct(
    ifname: &str,
    ip: &IpAddr,
    skip_ifnames: &[&str],
    cluster_cidrs: &[IpNet],
) -> bool {
    if skip_ifnames.contains(&ifname) || ifname.starts_with("tailscale") {
        return false;
    }
    let special = match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_unspecified()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    !special && !is_tailnet(ip) && !cluster_cidrs.iter().any(|c| c.contains(ip))
}

/// The node's direct endpoints on `port` (see the module comment).
pub fn default_endpoints(
    port: u16,
    skip_ifnames: &[&str],
    cluster_cidrs: &[IpNet],
) -> std::io::Result<Vec<SocketAddr>> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (ifname, ip) in interface_addresses()? {
        if is_direct(&ifname, &ip, skip_ifnames, cluster_cidrs) {
            let e = SocketAddr::new(ip, port);
            let list = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            if !list.contains(&e) {
                list.push(e);
            }
        }
    }
    v4.extend(v6);
    Ok(v4)
}

/// Every (interface, address) of this network namespace, from getifaddrs(3).
fn interface_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed; its
        // name is a NUL-terminated string and its address, when not null, a sockaddr of the
        // family it names (sockaddr_in / sockaddr_in6 as checked).
        unsafe {
            let entry = &*cursor;
            let addr = entry.ifa_addr;
            if !addr.is_null() && !entry.ifa_name.is_null() {
                let name = CStr::from_ptr(entry.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                        out.push((name, IpAddr::V4(ip)));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
                    }
                    _ => {}
                }
            }
            cursor = entry.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_addresses_are_announced() {
        let cluster = ["198.19.0.0/16".parse::<IpNet>().unwrap()];
        let ok =
            |ifname: &str, ip: &str| is_direct(ifname, &ip.parse().unwrap(), &["tsk0"], &cluster);
        assert!(ok("eth0", "198.18.0.1"));
        assert!(ok("eth0", "fd00:18::1"));
        assert!(ok("eth0", "203.0.113.7"));
        assert!(!ok("eth0", "127.0.0.1"));
        assert!(!ok("eth0", "169.254.1.1"));
        assert!(!ok("eth0", "fe80::1"));
        assert!(!ok("eth0", "100.101.1.11"));
        assert!(!ok("eth0", "fd7a:115c:a1e0::b"));
        assert!(!ok("cnio0", "198.19.1.1"));
        assert!(!ok("tsk0", "198.18.9.9"));
        assert!(!ok("tailscale0", "198.18.9.9"));
    }

    #[test]
    fn this_namespace_has_addresses_and_loopback_is_left_out() {
        let all = interface_addresses().unwrap();
        assert!(all.iter().any(|(_, ip)| ip.is_loopback()), "{all:?}");
        let announced = default_endpoints(51820, &[], &[]).unwrap();
        assert!(announced
            .iter()
            .all(|e| !e.ip().is_loopback() && e.port() == 51820));
    }
}
