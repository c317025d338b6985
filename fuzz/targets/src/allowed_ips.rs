//! `allowed_ips`: sequences of insert / remove / remove-by-value / lookup / clear against
//! [`AllowedIps`], each result compared with [`NaiveAllowedIps`], the obviously-correct list.
//!
//! Addresses are drawn so that prefixes collide often: most are 198.19.0.0 or fd00:19:: with
//! a 16-bit value shifted to a chosen bit position (so two prefixes share long runs of leading
//! bits and split anywhere), the rest are arbitrary; lookups may use IPv4-mapped IPv6
//! addresses. After the sequence the whole table is compared: length, iteration order, every
//! value's prefixes, and lookups at both ends of, and just outside, every stored prefix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use tailsk8s_dataplane::allowed_ips::{AllowedIps, NaiveAllowedIps};

use crate::input::{Choices, Writer};

/// Operations per input.
const MAX_OPS: usize = 512;
/// Values stored are 0..VALUES (peers, in the engine).
const VALUES: u8 = 8;

fn address(c: &mut Choices<'_>, v6: bool) -> IpAddr {
    let mode = c.byte();
    if mode & 0x80 != 0 {
        // Arbitrary address.
        return if v6 {
            Ipv6Addr::from(c.array::<16>()).into()
        } else {
            Ipv4Addr::from(c.array::<4>()).into()
        };
    }
    let noise = u128::from(c.u16());
    if v6 {
        let base = u128::from(Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0));
        let shift = u32::from(mode & 0x7f) % 113;
        Ipv6Addr::from(base ^ (noise << shift)).into()
    } else {
        let base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
        let shift = u32::from(mode & 0x7f) % 17;
        Ipv4Addr::from(base ^ ((noise as u32) << shift)).into()
    }
}

fn prefix(c: &mut Choices<'_>) -> IpNet {
    let v6 = c.bool();
    let addr = address(c, v6);
    let max = if v6 { 128 } else { 32 };
    let len = c.byte() % (max + 1);
    // `len ≤ max` by construction, so `new` cannot fail; fall back to a host route anyway.
    IpNet::new(addr, len).unwrap_or_else(|_| IpNet::from(addr))
}

fn lookup_address(c: &mut Choices<'_>) -> IpAddr {
    match c.below(3) {
        0 => address(c, false),
        1 => address(c, true),
        // IPv4-mapped IPv6: looked up in the IPv6 table, never the IPv4 one.
        _ => match address(c, false) {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            v6 => v6,
        },
    }
}

struct Tables {
    trie: AllowedIps<u8>,
    naive: NaiveAllowedIps<u8>,
}

impl Tables {
    fn lookup(&self, addr: IpAddr) {
        assert_eq!(
            self.trie.lookup(addr),
            self.naive.lookup(addr),
            "lookup({addr}) differs"
        );
    }

    fn step(&mut self, c: &mut Choices<'_>) {
        match c.byte() % 8 {
            0..=2 => {
                let net = prefix(c);
                let value = c.byte() % VALUES;
                assert_eq!(
                    self.trie.insert(net, value),
                    self.naive.insert(net, value),
                    "insert({net}, {value}) returned a different old value"
                );
            }
            3 => {
                let net = prefix(c);
                assert_eq!(
                    self.trie.remove(&net),
                    self.naive.remove(&net),
                    "remove({net}) differs"
                );
            }
            4 => {
                let value = c.byte() % VALUES;
                assert_eq!(
                    self.trie.remove_value(value),
                    self.naive.remove_value(value),
                    "remove_value({value}) removed a different count"
                );
            }
            5 | 6 => self.lookup(lookup_address(c)),
            _ => {
                // Clear only on a specific byte, so long sequences build big tables.
                if c.byte() == 0xff {
                    self.trie.clear();
                    self.naive.clear();
                }
            }
        }
        assert_eq!(self.trie.len(), self.naive.len(), "len differs");
    }

    fn check_whole(&self) {
        assert_eq!(self.trie.is_empty(), self.naive.is_empty());
        let mut expected = Vec::new();
        for value in 0..VALUES {
            let prefixes = self.trie.prefixes_of(value);
            assert_eq!(
                prefixes,
                self.naive.prefixes_of(value),
                "prefixes_of({value}) differ"
            );
            expected.extend(prefixes.into_iter().map(|p| (p, value)));
        }
        expected.sort();
        let iterated: Vec<(IpNet, u8)> = self.trie.iter().collect();
        assert_eq!(iterated, expected, "iter() is not the sorted table");
        for (net, _) in &iterated {
            for addr in edges(net) {
                self.lookup(addr);
            }
        }
    }
}

/// The first and last address of a prefix and their outside neighbours.
fn edges(net: &IpNet) -> Vec<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)]
                .into_iter()
                .flatten()
                .map(|a| Ipv4Addr::from(a).into())
                .collect()
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            [Some(lo), Some(hi), lo.checked_sub(1), hi.checked_add(1)]
                .into_iter()
                .flatten()
                .map(|a| Ipv6Addr::from(a).into())
                .collect()
        }
    }
}

/// The target body.
pub fn run(data: &[u8]) {
    let mut tables = Tables {
        trie: AllowedIps::new(),
        naive: NaiveAllowedIps::new(),
    };
    let mut c = Choices::new(data);
    for _ in 0..MAX_OPS {
        if c.is_empty() {
            break;
        }
        tables.step(&mut c);
    }
    tables.check_whole();
}

/// Seeds: nested prefixes moving between values, removals, and mapped lookups.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    // insert: op 0, family, mode, noise u16, len, value
    let insert = |w: &mut Writer, v6: bool, shift: u8, noise: u16, len: u8, value: u8| {
        w.byte(0)
            .byte(u8::from(v6))
            .byte(shift)
            .u16(noise)
            .byte(len)
            .byte(value);
    };
    let lookup = |w: &mut Writer, family: u8, shift: u8, noise: u16| {
        w.byte(5).byte(family).byte(shift).u16(noise);
    };
    let mut nested = Writer::new();
    for (len, value) in [(16, 0), (24, 1), (25, 2), (32, 3), (0, 4)] {
        insert(&mut nested, false, 0, 0x0280, len, value);
    }
    for noise in [0x0280, 0x02ff, 0x0300, 0x0000] {
        lookup(&mut nested, 0, 0, noise);
    }
    lookup(&mut nested, 2, 0, 0x0280);

    let mut moving = Writer::new();
    insert(&mut moving, true, 64, 0x0001, 64, 1);
    insert(&mut moving, true, 64, 0x0001, 64, 2);
    insert(&mut moving, true, 64, 0x0003, 63, 1);
    moving.byte(3).byte(1).byte(64).u16(0x0001).byte(64); // remove
    moving.byte(4).byte(1); // remove_value(1)
    lookup(&mut moving, 1, 64, 0x0001);

    let mut arbitrary = Writer::new();
    arbitrary
        .byte(0)
        .byte(0)
        .byte(0x80)
        .raw(&[0, 0, 0, 0])
        .byte(0)
        .byte(5);
    arbitrary
        .byte(0)
        .byte(1)
        .byte(0x80)
        .raw(&[0; 16])
        .byte(0)
        .byte(6);
    arbitrary.byte(7).byte(0xff); // clear
    insert(&mut arbitrary, false, 16, 0xffff, 1, 7);

    vec![
        ("nested", nested.finish()),
        ("moving", moving.finish()),
        ("defaults-and-clear", arbitrary.finish()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_include_the_neighbours() {
        let e = edges(&"198.19.2.0/24".parse().unwrap());
        let want: Vec<IpAddr> = ["198.19.2.0", "198.19.2.255", "198.19.1.255", "198.19.3.0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(e, want);
        assert_eq!(edges(&"0.0.0.0/0".parse().unwrap()).len(), 2);
    }

    #[test]
    fn the_nested_seed_builds_five_prefixes() {
        let seed = seeds().remove(0).1;
        let mut tables = Tables {
            trie: AllowedIps::new(),
            naive: NaiveAllowedIps::new(),
        };
        let mut c = Choices::new(&seed);
        while !c.is_empty() {
            tables.step(&mut c);
        }
        assert_eq!(tables.trie.len(), 5);
        assert_eq!(tables.trie.lookup("198.19.2.200".parse().unwrap()), Some(2));
    }
}
