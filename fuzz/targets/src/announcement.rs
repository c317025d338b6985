//! `announcement`: a peer router's announcement document (JSON fetched over the tailnet).
//!
//! Every input is used twice:
//! 1. as bytes given to [`Announcement::parse`]: never a panic; an accepted document has a
//!    non-low-order key, a non-zero port, normalised unique pod CIDRs and unique non-zero-port
//!    endpoints, at most `MAX_ENTRIES` of each, and survives a round trip through
//!    [`Announcement::to_json`]; [`accept`] against approved prefixes chosen by the input
//!    never yields a prefix outside an approved one;
//! 2. as choices for a structure-aware generator of valid documents with unknown fields,
//!    odd entries and newer versions, which must parse to what the generator meant.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use tailsk8s::announcement::document::MAX_ENTRIES;
use tailsk8s::announcement::{accept, Announcement};

use crate::input::Choices;

/// The target body.
pub fn run(data: &[u8]) {
    let mut c = Choices::new(data);
    let approved = gen_approved(&mut c);
    check_bytes(c.rest(), &approved);
    let (text, expected) = generate(&mut Choices::new(data));
    match Announcement::parse(text.as_bytes()) {
        Ok((a, _)) => assert_eq!(
            a, expected,
            "generated document parsed differently:\n{text}"
        ),
        Err(e) => panic!("generated document refused: {e}\n{text}"),
    }
}

fn check_bytes(bytes: &[u8], approved: &[IpNet]) {
    let Ok((a, _skipped)) = Announcement::parse(bytes) else {
        return;
    };
    assert!(
        !a.public_key.is_low_order_public(),
        "low-order key accepted"
    );
    assert_ne!(a.listen_port, 0);
    assert!(a.endpoints.len() <= MAX_ENTRIES && a.pod_cidrs.len() <= MAX_ENTRIES);
    for (i, e) in a.endpoints.iter().enumerate() {
        assert_ne!(e.port(), 0, "port-0 endpoint accepted");
        assert!(!a.endpoints[..i].contains(e), "duplicate endpoint");
    }
    for (i, p) in a.pod_cidrs.iter().enumerate() {
        assert_eq!(*p, p.trunc(), "pod CIDR {p} not normalised");
        assert!(!a.pod_cidrs[..i].contains(p), "duplicate pod CIDR");
    }
    match Announcement::parse(a.to_json().as_bytes()) {
        Ok((again, 0)) => assert_eq!(again, a, "round trip changed the announcement"),
        other => panic!("an accepted announcement, written back, reads as {other:?}"),
    }
    let accepted = accept(&a, approved);
    assert_eq!(accepted.public_key, a.public_key);
    for p in &accepted.pod_cidrs {
        assert!(
            approved.iter().any(|ok| ok.contains(p)),
            "{p} accepted outside the approved {approved:?}"
        );
    }
}

fn gen_prefix(c: &mut Choices<'_>) -> IpNet {
    if c.bool() {
        let [x, y] = c.array();
        let len = 8 + c.byte() % 25;
        IpNet::new(Ipv4Addr::new(198, 19, x, y).into(), len).map_or_else(
            |_| IpNet::from(IpAddr::from([198, 19, 0, 0])),
            |n| n.trunc(),
        )
    } else {
        let x = c.u16();
        let len = 32 + c.byte() % 97;
        IpNet::new(Ipv6Addr::new(0xfd00, 0x19, x, 0, 0, 0, 0, 0).into(), len).map_or_else(
            |_| IpNet::from(IpAddr::from([0xfd00, 0x19, 0, 0, 0, 0, 0, 0])),
            |n| n.trunc(),
        )
    }
}

fn gen_approved(c: &mut Choices<'_>) -> Vec<IpNet> {
    (0..c.below(4)).map(|_| gen_prefix(c)).collect()
}

fn gen_endpoint(c: &mut Choices<'_>) -> SocketAddr {
    let port = c.u16().max(1);
    if c.bool() {
        let [x, y] = c.array();
        SocketAddr::new(Ipv4Addr::new(198, 18, x, y).into(), port)
    } else {
        SocketAddr::new(
            Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, c.u16()).into(),
            port,
        )
    }
}

/// A valid document chosen by `c`, and the announcement it must parse to.
pub fn generate(c: &mut Choices<'_>) -> (String, Announcement) {
    let public_key = crate::support::fixed_private_key(c.byte()).public_key();
    let listen_port = c.u16().max(1);
    let mut fields = vec![
        format!("\"version\":{}", 1 + c.below(3)),
        format!("\"public_key\":\"{public_key}\""),
        format!("\"listen_port\":{listen_port}"),
    ];
    let mut endpoints = Vec::new();
    let mut written = Vec::new();
    for _ in 0..c.below(4) {
        match c.below(5) {
            0 => written.push("\"node-a.example:1\"".to_string()),
            1 => written.push("{\"kind\":\"relay\"}".to_string()),
            _ => {
                let e = gen_endpoint(c);
                written.push(format!("\"{e}\""));
                if !endpoints.contains(&e) {
                    endpoints.push(e);
                }
            }
        }
    }
    fields.push(format!("\"endpoints\":[{}]", written.join(",")));
    let mut pod_cidrs = Vec::new();
    let mut written = Vec::new();
    for _ in 0..c.below(4) {
        let p = gen_prefix(c);
        written.push(format!("\"{p}\""));
        if !pod_cidrs.contains(&p) {
            pod_cidrs.push(p);
        }
    }
    fields.push(format!("\"pod_cidrs\":[{}]", written.join(",")));
    if c.bool() {
        fields.push("\"flavour\":{\"new\":[1,2,3]}".to_string());
    }
    let rotate = c.below(fields.len());
    fields.rotate_left(rotate);
    let mut text = String::from("{");
    let _ = write!(
        text,
        "{}",
        fields.join(if c.bool() { "," } else { ",\n  " })
    );
    text.push('}');
    (
        text,
        Announcement {
            public_key,
            listen_port,
            endpoints,
            pod_cidrs,
        },
    )
}

/// Seeds: a full document, a minimal one, and refusals.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let key = crate::support::fixed_private_key(4).public_key();
    let full = Announcement {
        public_key: key,
        listen_port: 51820,
        endpoints: vec!["198.18.0.1:51820"
            .parse()
            .unwrap_or_else(|_| unreachable!())],
        pod_cidrs: vec!["198.19.1.0/24".parse().unwrap_or_else(|_| unreachable!())],
    };
    vec![
        ("full", full.to_json().into_bytes()),
        (
            "minimal",
            format!("{{\"version\":1,\"public_key\":\"{key}\",\"listen_port\":1}}").into_bytes(),
        ),
        (
            "no-version",
            format!("{{\"public_key\":\"{key}\",\"listen_port\":1}}").into_bytes(),
        ),
        ("garbage", b"{\"version\":1,\"public_key\":[".to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_makes_full_documents() {
        let data = [3u8; 300];
        let (text, a) = generate(&mut Choices::new(&data));
        assert!(text.contains("pod_cidrs"), "{text}");
        assert_eq!(Announcement::parse(text.as_bytes()).unwrap().0, a);
    }

    #[test]
    fn many_inputs_hold_the_invariants() {
        for case in 0u32..2000 {
            let mut x = case.wrapping_mul(2_654_435_761).wrapping_add(7);
            let data: Vec<u8> = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            run(&data);
        }
    }
}
