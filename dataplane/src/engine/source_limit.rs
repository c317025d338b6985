//! Per-source token buckets for handshake messages that carry a valid cookie while the
//! device is under load: a cookie proves the sender owns its address, not that it is
//! polite, so each source may start only [`PER_SECOND`] handshakes a second (bursts of
//! [`BURST`]) — the kernel's figures. A source is an IPv4 address or an IPv6 /64 (one host
//! usually holds a whole /64). The table has a fixed size, so a flood from many sources
//! evicts the longest-idle ones instead of growing: no allocation after creation. Time is
//! passed in (engine milliseconds).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;

/// Handshakes a source may start per second once its burst is spent.
pub const PER_SECOND: u64 = 20;
/// Handshakes a source may start at once.
pub const BURST: u64 = 5;
/// Credit one handshake costs, in milliseconds of refill.
const COST_MS: u64 = 1000 / PER_SECOND;
/// A full bucket.
const FULL_MS: u64 = BURST * COST_MS;
/// Buckets in the table; sources beyond it evict the longest-idle source of their set.
const ENTRIES: usize = 4096;
/// Buckets a source may land in (its set): a collision evicts within the set only.
const WAYS: usize = 4;

/// A source as the limit counts it: the family and an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source {
    v6: bool,
    bits: u64,
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source {
                v6: false,
                bits: u64::from(u32::from(v4)),
            },
            IpAddr::V6(v6) => Source {
                v6: true,
                bits: (u128::from(v6) >> 64) as u64,
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    source: Source,
    credit_ms: u64,
    last_ms: u64,
}

/// See the module documentation.
pub struct SourceLimit {
    buckets: Box<[Option<Bucket>]>,
    /// Keyed by a per-process secret, so a sender cannot pick sources that share a set.
    hasher: RandomState,
}

impl Default for SourceLimit {
    fn default() -> Self {
        SourceLimit::new()
    }
}

impl SourceLimit {
    pub fn new() -> SourceLimit {
        SourceLimit {
            buckets: vec![None; ENTRIES].into_boxed_slice(),
            hasher: RandomState::new(),
        }
    }

    /// Whether a handshake from `ip` at `now_ms` may go on; spends its credit if so.
    pub fn allow(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        let source = Source::of(ip);
        let set = (self.hasher.hash_one(source) as usize % (ENTRIES / WAYS)) * WAYS;
        let ways = &mut self.buckets[set..set + WAYS];
        if let Some(bucket) = ways.iter_mut().flatten().find(|b| b.source == source) {
            let refill = now_ms.saturating_sub(bucket.last_ms);
            bucket.credit_ms = bucket.credit_ms.saturating_add(refill).min(FULL_MS);
            bucket.last_ms = bucket.last_ms.max(now_ms);
            if bucket.credit_ms < COST_MS {
                return false;
            }
            bucket.credit_ms -= COST_MS;
            return true;
        }
        // A new source: an empty way, else the one idle longest.
        let slot = ways
            .iter_mut()
            .min_by_key(|b| b.map_or(0, |b| b.last_ms.saturating_add(1)))
            .unwrap_or_else(|| unreachable!("a set has WAYS > 0 buckets"));
        *slot = Some(Bucket {
            source,
            credit_ms: FULL_MS - COST_MS,
            last_ms: now_ms,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allowed(limit: &mut SourceLimit, from: IpAddr, now_ms: u64, tries: usize) -> usize {
        (0..tries).filter(|_| limit.allow(from, now_ms)).count()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let mut limit = SourceLimit::new();
        let a = ip("198.18.0.1");
        assert_eq!(allowed(&mut limit, a, 1000, 100), BURST as usize);
        // 50 ms buys one more, 100 ms two; a second refills the burst, never more.
        assert_eq!(allowed(&mut limit, a, 1049, 10), 0);
        assert_eq!(allowed(&mut limit, a, 1050, 10), 1);
        assert_eq!(allowed(&mut limit, a, 1150, 10), 2);
        assert_eq!(allowed(&mut limit, a, 60_000, 100), BURST as usize);
        // Over ten seconds at a steady pace: PER_SECOND a second (plus the first burst).
        let mut passed = 0;
        for ms in (100_000..110_000).step_by(10) {
            passed += allowed(&mut limit, a, ms, 1);
        }
        let expected = BURST + 10 * PER_SECOND;
        assert!(
            (expected - 1..=expected).contains(&(passed as u64)),
            "{passed} passed"
        );
    }

    #[test]
    fn sources_are_counted_apart_and_ipv6_by_slash_64() {
        let mut limit = SourceLimit::new();
        assert_eq!(allowed(&mut limit, ip("198.18.0.1"), 0, 50), BURST as usize);
        assert_eq!(allowed(&mut limit, ip("198.18.0.2"), 0, 50), BURST as usize);
        assert_eq!(allowed(&mut limit, ip("fd00:18::1"), 0, 3), 3);
        // The same /64: the same bucket.
        assert_eq!(allowed(&mut limit, ip("fd00:18::ffff:2"), 0, 50), 2);
        assert_eq!(
            allowed(&mut limit, ip("fd00:18:0:1::1"), 0, 50),
            BURST as usize
        );
        // An IPv4-mapped IPv6 address is the IPv4 source.
        assert_eq!(allowed(&mut limit, ip("::ffff:198.18.0.1"), 0, 50), 0);
    }

    #[test]
    fn time_going_backwards_grants_nothing() {
        let mut limit = SourceLimit::new();
        let a = ip("198.18.0.1");
        assert_eq!(allowed(&mut limit, a, 5000, 50), BURST as usize);
        assert_eq!(allowed(&mut limit, a, 0, 50), 0);
        assert_eq!(allowed(&mut limit, a, 5049, 50), 0);
    }

    #[test]
    fn a_flood_of_sources_stays_in_the_fixed_table_and_evicts_the_idle() {
        let mut limit = SourceLimit::new();
        let busy = ip("198.18.9.9");
        assert_eq!(allowed(&mut limit, busy, 0, 50), BURST as usize);
        // Far more sources than buckets, each new one allowed once.
        for n in 0..(4 * ENTRIES as u32) {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0xc612_8000 + n));
            assert!(limit.allow(source, 1));
        }
        assert_eq!(limit.buckets.len(), ENTRIES);
        // The busy source was evicted (or refilled): it gets no more than a fresh burst.
        assert!(allowed(&mut limit, busy, 2, 50) <= BURST as usize);
    }
}
