//! Well-formed sample packets (built with `etherparse`) for seeds and the harness's own tests.
//! Addresses given here are harness literals; a typo panics.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;

fn v4(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>()
        .unwrap_or_else(|_| panic!("harness address {s:?}"))
        .octets()
}

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>()
        .unwrap_or_else(|_| panic!("harness address {s:?}"))
        .octets()
}

/// Writes a finished builder step; every step type has its own `size`/`write`, hence a macro.
macro_rules! build {
    ($builder:expr, $payload:expr $(,)?) => {{
        let builder = $builder;
        let payload: &[u8] = $payload;
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        if let Err(e) = builder.write(&mut out, payload) {
            panic!("sample packet does not build: {e}");
        }
        out
    }};
}

pub fn icmp_v4(src: &str, dst: &str, payload: usize) -> Vec<u8> {
    build!(
        PacketBuilder::ipv4(v4(src), v4(dst), 64).icmpv4_echo_request(7, 1),
        &vec![0xab; payload],
    )
}

pub fn icmp_v6(src: &str, dst: &str, payload: usize) -> Vec<u8> {
    build!(
        PacketBuilder::ipv6(v6(src), v6(dst), 64).icmpv6_echo_request(7, 1),
        &vec![0x5a; payload],
    )
}

pub fn udp_v4(src: &str, dst: &str, payload: usize) -> Vec<u8> {
    build!(
        PacketBuilder::ipv4(v4(src), v4(dst), 64).udp(5353, 53),
        &vec![0x11; payload],
    )
}

pub fn udp_v6(src: &str, dst: &str, payload: usize) -> Vec<u8> {
    build!(
        PacketBuilder::ipv6(v6(src), v6(dst), 64).udp(5353, 53),
        &vec![0x11; payload],
    )
}

pub fn tcp_syn_v4(src: &str, dst: &str) -> Vec<u8> {
    build!(
        PacketBuilder::ipv4(v4(src), v4(dst), 64)
            .tcp(40000, 443, 1, 65535)
            .syn(),
        &[],
    )
}

pub fn tcp_syn_v6(src: &str, dst: &str) -> Vec<u8> {
    build!(
        PacketBuilder::ipv6(v6(src), v6(dst), 64)
            .tcp(40000, 443, 1, 65535)
            .syn(),
        &[],
    )
}

/// Sets the IPv4 don't-fragment bit (the header checksum goes stale; nobody here checks it).
pub fn with_df(mut packet: Vec<u8>) -> Vec<u8> {
    if let Some(flags) = packet.get_mut(6) {
        *flags |= 0x40;
    }
    packet
}
