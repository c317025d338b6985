//! The virtio-net header (`struct virtio_net_hdr`) in front of every TUN read and write when
//! the TUN has offloads: its length and the values of its `flags` and `gso_type` fields, one
//! home for the reader ([`crate::offload`]) and the writer ([`crate::gro`]). The field
//! layout itself is tun-rs's `VirtioNetHdr`.

/// Bytes of virtio-net header in front of every TUN read and write with offloads.
pub const VNET_HDR_LEN: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// `flags`: the transport checksum is partial (the pseudo-header sum only); the rest is
/// summed from `csum_start` and stored `csum_offset` bytes after it.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// `gso_type`: one packet, not a superpacket.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: a TCP over IPv4 superpacket.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: a TCP over IPv6 superpacket.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type`: a UDP superpacket (USO), either family.
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: TCP with ECN (CWR on the first segment only).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
