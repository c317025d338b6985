//! The UDP side: per worker one IPv4 and one IPv6 socket on the listen port (either may be
//! missing when the host lacks that family), every worker's in one `SO_REUSEPORT` group per
//! family; batched receive (`recvmmsg`, UDP GRO), GSO sends and per-datagram source address
//! control through `quinn-udp`, large socket buffers, and the fwmark (`SO_MARK`).

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

use crate::peer::Endpoint;
use crate::steering::{self, CpuMap};
use crate::sys::set_int_option;

/// Socket buffer size asked for with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (wireguard-go uses
/// 7 MiB; without it bursts die as receive-buffer errors).
pub const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// One bound socket and quinn-udp's per-socket state.
pub struct BoundSocket {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl BoundSocket {
    fn bind(addr: SocketAddr, fwmark: u32, reuse_port: bool) -> io::Result<BoundSocket> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        force_buffer(&socket, libc::SO_RCVBUFFORCE, SOCKET_BUFFER_BYTES);
        force_buffer(&socket, libc::SO_SNDBUFFORCE, SOCKET_BUFFER_BYTES);
        if fwmark != 0 {
            socket.set_mark(fwmark)?;
        }
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&addr.into())?;
        let socket: UdpSocket = socket.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        allow_fragmentation(&socket, addr.is_ipv6());
        Ok(BoundSocket { socket, state })
    }

    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Receives up to `bufs.len()` datagrams (each may be a GRO batch: see `meta.stride`).
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.state.recv(UdpSockRef::from(&self.socket), bufs, meta)
    }

    /// Sends `contents` to `to`; with `segment_size`, `contents` is several datagrams of that
    /// size sent with one syscall (UDP GSO). Falls back by itself: from any source address
    /// when the one the peer used is gone (the node's address changed), and to one datagram
    /// per syscall when the kernel refuses the GSO send (e.g. segments above the path MTU).
    pub fn send(
        &self,
        to: &Endpoint,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let first = self.try_send(to.addr, to.local_ip, contents, segment_size);
        let source_gone = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH | libc::EHOSTUNREACH)
            )
        };
        let (source, result) = match first {
            Err(e) if to.local_ip.is_some() && source_gone(&e) => {
                (None, self.try_send(to.addr, None, contents, segment_size))
            }
            other => (to.local_ip, other),
        };
        match (result, segment_size) {
            (Err(e), Some(size)) if e.kind() != io::ErrorKind::WouldBlock && size > 0 => {
                for datagram in contents.chunks(size) {
                    self.try_send(to.addr, source, datagram, None)?;
                }
                Ok(())
            }
            (result, _) => result,
        }
    }

    fn try_send(
        &self,
        destination: SocketAddr,
        src_ip: Option<std::net::IpAddr>,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip,
        };
        self.state
            .try_send(UdpSockRef::from(&self.socket), &transmit)
    }

    pub fn set_mark(&self, fwmark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).set_mark(fwmark)
    }

    /// How many datagrams one GSO send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// How many datagrams one GRO receive may return coalesced (1 without GRO).
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

impl AsRawFd for BoundSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// quinn-udp sets DF on every datagram (PMTU probing, right for QUIC). A tunnel must instead
/// carry a datagram larger than the underlay's MTU, as the kernel's WireGuard and
/// wireguard-go do: let the kernel fragment it.
fn allow_fragmentation(socket: &UdpSocket, ipv6: bool) {
    let fd = socket.as_raw_fd();
    // Best effort: where an option is missing, the kernel's default is kept.
    if ipv6 {
        let _ = set_int_option(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        );
        let _ = set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
    } else {
        let _ = set_int_option(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
    }
}

fn force_buffer(socket: &Socket, option: libc::c_int, bytes: usize) {
    let forced = set_int_option(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        option,
        bytes as libc::c_int,
    );
    if forced.is_err() {
        // Without CAP_NET_ADMIN: take what the sysctl limits allow.
        let _ = if option == libc::SO_RCVBUFFORCE {
            socket.set_recv_buffer_size(bytes)
        } else {
            socket.set_send_buffer_size(bytes)
        };
    }
}

/// One IPv4 and one IPv6 socket on the listen port (either may be missing when the host
/// lacks that family).
pub struct SocketPair {
    pub v4: Option<BoundSocket>,
    pub v6: Option<BoundSocket>,
}

impl SocketPair {
    fn bind(port: u16, fwmark: u32, reuse_port: bool) -> io::Result<SocketPair> {
        // A family the host lacks is skipped; a taken port is an error.
        let bind = |ip: std::net::IpAddr, port: u16| match BoundSocket::bind(
            SocketAddr::new(ip, port),
            fwmark,
            reuse_port,
        ) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
            Err(_) => Ok(None),
        };
        let v4 = bind(Ipv4Addr::UNSPECIFIED.into(), port)?;
        let port = match &v4 {
            Some(s) => s.local_port()?,
            None => port,
        };
        let v6 = bind(Ipv6Addr::UNSPECIFIED.into(), port)?;
        if v4.is_none() && v6.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "neither IPv4 nor IPv6 UDP sockets can be bound",
            ));
        }
        Ok(SocketPair { v4, v6 })
    }

    fn port(&self) -> io::Result<u16> {
        match (&self.v4, &self.v6) {
            (Some(s), _) | (None, Some(s)) => s.local_port(),
            (None, None) => Err(io::Error::from(io::ErrorKind::AddrNotAvailable)),
        }
    }

    /// The socket for a destination's family.
    pub fn for_endpoint(&self, to: &Endpoint) -> Option<&BoundSocket> {
        if to.addr.is_ipv4() {
            self.v4.as_ref()
        } else {
            self.v6.as_ref()
        }
    }

    pub fn send(
        &self,
        to: &Endpoint,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        match self.for_endpoint(to) {
            Some(socket) => socket.send(to, contents, segment_size),
            None => Err(io::Error::from(io::ErrorKind::AddrNotAvailable)),
        }
    }

    pub fn sockets(&self) -> impl Iterator<Item = &BoundSocket> {
        self.v4.iter().chain(self.v6.iter())
    }
}

/// The listen sockets of a device: one [`SocketPair`] per worker, all on one port through
/// `SO_REUSEPORT`, so the kernel spreads peers' flows over the workers.
pub struct UdpSockets {
    workers: Vec<SocketPair>,
    port: u16,
}

impl UdpSockets {
    /// Binds `workers` socket pairs on `port` (0 = a random port, the same for all). Fails when
    /// the port is taken by anyone, or when no family can be bound.
    pub fn bind(port: u16, fwmark: u32, workers: usize) -> io::Result<UdpSockets> {
        let workers = workers.max(1);
        // SO_REUSEPORT would let us join another root process's group on a fixed port; a
        // plain bind first proves the port is free (as the kernel's own wg would refuse).
        if port != 0 {
            drop(SocketPair::bind(port, 0, false)?);
        }
        // With a random port the IPv6 bind may find "our" port taken: retry a few times.
        let mut last_err = None;
        for _ in 0..8 {
            let first = match SocketPair::bind(port, fwmark, workers > 1) {
                Ok(first) => first,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && port == 0 => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let chosen = first.port()?;
            let mut pairs = vec![first];
            for _ in 1..workers {
                pairs.push(SocketPair::bind(chosen, fwmark, true)?);
            }
            return Ok(UdpSockets {
                workers: pairs,
                port: chosen,
            });
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("could not bind the listen port")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The sockets of worker `index` (wrapping, so any index is valid).
    pub fn worker(&self, index: usize) -> &SocketPair {
        &self.workers[index % self.workers.len()]
    }

    pub fn send(&self, to: &Endpoint, datagram: &[u8]) -> io::Result<()> {
        self.worker(0).send(to, datagram, None)
    }

    pub fn set_mark(&self, fwmark: u32) -> io::Result<()> {
        for socket in self.sockets() {
            socket.set_mark(fwmark)?;
        }
        Ok(())
    }

    /// With a map, makes each family's reuseport group deliver to the worker of the
    /// receiving CPU (the group's `k`-th socket is worker `k`'s: they were bound in that
    /// order); without, gives the groups back to the kernel's hash.
    pub fn steer(&self, map: Option<&CpuMap>) -> io::Result<()> {
        if self.workers.len() < 2 {
            return Ok(());
        }
        for socket in self.workers[0].sockets() {
            steering::steer_reuseport_group(socket.as_raw_fd(), map)?;
        }
        Ok(())
    }

    /// Every socket of every worker.
    pub fn sockets(&self) -> impl Iterator<Item = &BoundSocket> {
        self.workers.iter().flat_map(|w| w.sockets())
    }

    /// Shuts the receiving side of every socket, once new sockets replace these: a thread
    /// polling them wakes at once (they read as ready, with nothing but what was already
    /// queued) and moves to the new ones, instead of staying deaf to the new port until its
    /// poll times out — up to 100 ms, long enough to stall a pod's first packets after a
    /// `listen-port` change. Sending on them still works until the last holder lets go.
    pub fn stop_receiving(&self) {
        for socket in self.sockets() {
            // Best effort: a socket that cannot be shut is left to the poll timeout.
            let _ = socket2::SockRef::from(&socket.socket).shutdown(std::net::Shutdown::Read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_port_is_shared_by_both_families() {
        let sockets = UdpSockets::bind(0, 0, 2).expect("bind");
        assert_ne!(sockets.port(), 0);
        for s in sockets.sockets() {
            assert_eq!(s.local_port().unwrap(), sockets.port());
        }
    }

    #[test]
    fn replaced_sockets_wake_their_pollers_and_yield_no_datagram() {
        let sockets = UdpSockets::bind(0, 0, 2).expect("bind");
        let fds: Vec<RawFd> = sockets.sockets().map(BoundSocket::as_raw_fd).collect();
        let long = std::time::Duration::from_secs(10);
        sockets.stop_receiving();
        // Readable now (a poll that timed out would return no bits, after 10 s).
        assert_eq!(
            crate::sys::poll_fds(&fds, libc::POLLIN, long),
            (1 << fds.len()) - 1
        );
        for socket in sockets.sockets() {
            let mut buf = [0u8; 1500];
            let mut meta = [RecvMeta::default()];
            let read = socket.recv(&mut [IoSliceMut::new(&mut buf)], &mut meta);
            let datagrams = match read {
                Ok(n) => meta[..n].iter().filter(|m| m.len > 0).count(),
                Err(_) => 0,
            };
            assert_eq!(datagrams, 0, "{read:?}");
        }
    }

    #[test]
    fn taken_port_is_an_error() {
        let first = UdpSockets::bind(0, 0, 2).expect("bind");
        let err = UdpSockets::bind(first.port(), 0, 1)
            .err()
            .expect("second bind must fail");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn datagrams_cross_loopback_with_their_local_address() {
        let a = UdpSockets::bind(0, 0, 1).expect("bind a");
        let b = UdpSockets::bind(0, 0, 1).expect("bind b");
        let to = Endpoint::new(SocketAddr::from((Ipv4Addr::LOCALHOST, b.port())));
        a.send(&to, b"hello").expect("send");
        let socket = b.worker(0).v4.as_ref().expect("v4");
        let mut buf = [0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let n = loop {
            match socket.recv(&mut [IoSliceMut::new(&mut buf)], &mut meta) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("recv: {e}"),
            }
        };
        assert_eq!(n, 1);
        assert_eq!(&buf[..meta[0].len], b"hello");
        assert_eq!(meta[0].addr.port(), a.port());
        assert_eq!(meta[0].dst_ip, Some(Ipv4Addr::LOCALHOST.into()));
    }
}
