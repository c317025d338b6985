//! Cryptokey routing table: longest-prefix match from an IP address to the peer that owns it.
//!
//! WireGuard routes an outgoing packet to the peer whose allowed IPs hold the longest prefix
//! containing the destination, and accepts an incoming packet only if its source maps back to
//! the peer that sent it. [`AllowedIps`] is that table. It is generic over the value it stores
//! (the engine stores a `u32` peer slot) and keeps one trie per address family.
//!
//! # Structure
//! Each family is a path-compressed binary trie (a PATRICIA trie, as in Linux's
//! `allowedips.c`): a node holds a prefix; a child extends its parent's prefix by at least one
//! bit, and chains of single-child nodes are skipped, so the depth is bounded by the number of
//! distinct branching points on a path (about log2(n) for spread-out prefixes, at most 33 or
//! 129). Nodes live in one `Vec` and link by `u32` index, which keeps them dense in cache and
//! makes a lookup a short loop of "compare masked address, remember value, follow one bit"
//! that allocates nothing. Removed nodes go to a free list for reuse; the memory itself is
//! returned only by [`AllowedIps::clear`] or dropping the table.
//!
//! # Per-value lists
//! The control path asks "which prefixes does this peer own" (`wg show`) and "drop all of
//! them" (`replace_allowed_ips`, peer removal) once per peer; a whole-trie walk for each made
//! those quadratic in the peer count. So every node holding a value is also on a
//! doubly-linked list of that value's nodes (as Linux and wireguard-go keep a per-peer list),
//! and those questions cost only the value's own prefixes. The links live in a vector
//! parallel to the nodes, not in them, so the lookup's nodes stay as small as before.
//!
//! Why not the alternatives:
//! - per-prefix-length hash maps probed longest first cost one hash per distinct length that
//!   exists; with mixed lengths that is up to 33 (IPv4) or 129 (IPv6) probes per lookup;
//! - multibit (stride) tries look up in fewer steps but make updates and memory use far more
//!   complex, which matters with a single peer holding 30,000+ prefixes;
//! - `ip_network_table` (already in the dependency tree through boringtun) is a fork of the
//!   `treebitmap` crate with hand-written `unsafe` memory management, speaks `ip_network`
//!   types rather than the `ipnet` ones the rest of the project uses, and its lookup returns
//!   a reference plus the matched network where the engine wants a copied peer slot. The trie
//!   here is a few hundred lines of safe code, checked against [`NaiveAllowedIps`] by a
//!   randomised test, so owning it costs less than wrapping that.
//!
//! IPv4 and IPv6 are separate: an IPv4-mapped IPv6 address is looked up in the IPv6 trie,
//! as WireGuard does.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Index meaning "no node". Lookups use `Vec::get`, so it doubles as the bounds check.
const NIL: u32 = u32::MAX;

/// An address family's key: an unsigned integer whose most significant bit is bit 0.
trait Key: Copy + Eq + std::fmt::Debug {
    /// Number of bits in an address (32 or 128).
    const WIDTH: u8;
    /// The key with every bit after the first `len` cleared.
    fn masked(self, len: u8) -> Self;
    /// Bit `i` counted from the most significant (0 or 1), for `i < WIDTH`. `bit(WIDTH)`
    /// returns bit 0 instead of overflowing, which lets the lookup loop step into the (empty)
    /// children of a full-length node without a branch.
    fn bit(self, i: u8) -> usize;
    /// Number of leading bits `self` and `other` share.
    fn common_len(self, other: Self) -> u8;
}

macro_rules! impl_key {
    ($t:ty) => {
        impl Key for $t {
            const WIDTH: u8 = <$t>::BITS as u8;

            #[inline(always)]
            fn masked(self, len: u8) -> Self {
                // A shift by the full width is undefined, so /0 is handled by `checked_shl`.
                self & (!0 as $t)
                    .checked_shl(u32::from(Self::WIDTH - len))
                    .unwrap_or(0)
            }

            #[inline(always)]
            fn bit(self, i: u8) -> usize {
                // Rotating left by i+1 brings bit i to the least significant place.
                (self.rotate_left(u32::from(i) + 1) & 1) as usize
            }

            #[inline(always)]
            fn common_len(self, other: Self) -> u8 {
                (self ^ other).leading_zeros() as u8
            }
        }
    };
}
impl_key!(u32);
impl_key!(u128);

/// One trie node: a prefix, maybe a value, and the two subtries that extend it by a 0 or 1.
///
/// Invariant: a node without a value has exactly two children (it exists only to join them);
/// `remove` collapses such nodes when one side becomes empty.
#[derive(Clone, Debug)]
struct Node<K, T> {
    key: K,
    len: u8,
    child: [u32; 2],
    value: Option<T>,
}

/// Where a node index is stored: the root pointer or one child pointer of a node.
#[derive(Clone, Copy)]
enum Slot {
    Root,
    Child(u32, usize),
}

/// A node's neighbours on its value's list: `[previous, next]`, [`NIL`] at the ends (and
/// both [`NIL`] for a node without a value).
type Link = [u32; 2];

/// Counts trie nodes the control-path operations touch, so tests can show that their cost
/// follows what they touch rather than the table's size. Nothing in other builds.
#[cfg(test)]
mod visits {
    use std::cell::Cell;

    thread_local!(static VISITS: Cell<usize> = const { Cell::new(0) });

    pub(super) fn count() {
        VISITS.with(|v| v.set(v.get() + 1));
    }

    /// Nodes visited on this thread so far.
    pub(super) fn total() -> usize {
        VISITS.with(Cell::get)
    }
}

#[cfg(not(test))]
mod visits {
    #[inline(always)]
    pub(super) fn count() {}
}

/// A path-compressed binary trie for one address family.
#[derive(Clone, Debug)]
struct Trie<K, T> {
    nodes: Vec<Node<K, T>>,
    /// Per-value list links, indexed like `nodes` (see the module doc).
    links: Vec<Link>,
    /// The first node of each value's list; a value without prefixes has no entry.
    heads: HashMap<T, u32>,
    /// Indices of unused entries in `nodes`, reused before the vector grows.
    free: Vec<u32>,
    root: u32,
    /// Number of prefixes (nodes with a value).
    len: usize,
}

impl<K: Key, T: Copy + Eq + Hash> Trie<K, T> {
    fn new() -> Self {
        Self {
            nodes: Vec::new(),
            links: Vec::new(),
            heads: HashMap::new(),
            free: Vec::new(),
            root: NIL,
            len: 0,
        }
    }

    fn clear(&mut self) {
        self.nodes.clear();
        self.links.clear();
        self.heads.clear();
        self.free.clear();
        self.root = NIL;
        self.len = 0;
    }

    /// Puts node `i`, which now holds `value`, at the front of `value`'s list.
    fn link(&mut self, i: u32, value: T) {
        let next = self.heads.insert(value, i).unwrap_or(NIL);
        if let Some(l) = self.links.get_mut(next as usize) {
            l[0] = i;
        }
        self.links[i as usize] = [NIL, next];
    }

    /// Takes node `i` off `value`'s list (it no longer holds `value`).
    fn unlink(&mut self, i: u32, value: T) {
        let [prev, next] = std::mem::replace(&mut self.links[i as usize], [NIL, NIL]);
        match self.links.get_mut(prev as usize) {
            Some(l) => l[1] = next,
            None if next == NIL => {
                self.heads.remove(&value);
            }
            None => {
                self.heads.insert(value, next);
            }
        }
        if let Some(l) = self.links.get_mut(next as usize) {
            l[0] = prev;
        }
    }

    /// The prefixes holding `value`, in no particular order; visits only those nodes.
    fn prefixes_of(&self, value: T) -> impl Iterator<Item = (K, u8)> + '_ {
        let mut i = self.heads.get(&value).copied().unwrap_or(NIL);
        std::iter::from_fn(move || {
            let n = self.nodes.get(i as usize)?;
            visits::count();
            i = self.links[i as usize][1];
            Some((n.key, n.len))
        })
    }

    /// Removes every prefix holding `value`; returns how many. Costs the depth of each.
    fn remove_value(&mut self, value: T) -> usize {
        let mut removed = 0;
        while let Some(&i) = self.heads.get(&value) {
            let n = &self.nodes[i as usize];
            let (key, len) = (n.key, n.len);
            // The head is always removed, so the loop ends; `remove` unlinks it.
            let old = self.remove(key, len);
            debug_assert!(old == Some(value), "list out of step with the trie");
            removed += 1;
        }
        removed
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<T> {
        let mut best = None;
        let mut i = self.root;
        while let Some(n) = self.nodes.get(i as usize) {
            // `n.key` has no host bits, so the address is inside the prefix exactly when they
            // share its first `len` bits.
            if addr.common_len(n.key) < n.len {
                break;
            }
            if n.value.is_some() {
                best = n.value;
            }
            // A full-length node has no children, so this ends the loop (see `Key::bit`).
            i = n.child[addr.bit(n.len)];
        }
        best
    }

    fn get_slot(&self, slot: Slot) -> u32 {
        match slot {
            Slot::Root => self.root,
            Slot::Child(p, b) => self.nodes[p as usize].child[b],
        }
    }

    fn set_slot(&mut self, slot: Slot, idx: u32) {
        match slot {
            Slot::Root => self.root = idx,
            Slot::Child(p, b) => self.nodes[p as usize].child[b] = idx,
        }
    }

    /// Stores `node` in a free entry; a value it holds goes on that value's list.
    fn alloc(&mut self, node: Node<K, T>) -> u32 {
        let value = node.value;
        let i = if let Some(i) = self.free.pop() {
            self.nodes[i as usize] = node;
            i
        } else {
            // More than 4 billion nodes cannot fit in memory long before this wraps.
            self.nodes.push(node);
            self.links.push([NIL, NIL]);
            (self.nodes.len() - 1) as u32
        };
        if let Some(v) = value {
            self.link(i, v);
        }
        i
    }

    fn release(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        n.value = None;
        n.child = [NIL, NIL];
        self.free.push(i);
    }

    fn leaf(key: K, len: u8, value: T) -> Node<K, T> {
        Node {
            key,
            len,
            child: [NIL, NIL],
            value: Some(value),
        }
    }

    /// Sets the value of prefix `key/len` (`key` already masked); returns the value it replaced.
    fn insert(&mut self, key: K, len: u8, value: T) -> Option<T> {
        let mut slot = Slot::Root;
        loop {
            let cur = self.get_slot(slot);
            let Some(n) = self.nodes.get(cur as usize) else {
                let new = self.alloc(Self::leaf(key, len, value));
                self.set_slot(slot, new);
                self.len += 1;
                return None;
            };
            let common = key.common_len(n.key).min(len).min(n.len);
            if common == n.len {
                if n.len == len {
                    let old = self.nodes[cur as usize].value.replace(value);
                    match old {
                        None => self.len += 1,
                        Some(o) if o != value => self.unlink(cur, o),
                        Some(_) => return old,
                    }
                    self.link(cur, value);
                    return old;
                }
                // `n` is a strict prefix of the new one: descend on the next bit.
                slot = Slot::Child(cur, key.bit(n.len));
                continue;
            }
            let n_key = n.key;
            let new = if common == len {
                // The new prefix is a strict prefix of `n`: it becomes `n`'s parent.
                let mut node = Self::leaf(key, len, value);
                node.child[n_key.bit(len)] = cur;
                self.alloc(node)
            } else {
                // They differ at bit `common`: a value-less node joins the two.
                let leaf = self.alloc(Self::leaf(key, len, value));
                let mut join = Node {
                    key: key.masked(common),
                    len: common,
                    child: [NIL, NIL],
                    value: None,
                };
                join.child[key.bit(common)] = leaf;
                join.child[n_key.bit(common)] = cur;
                self.alloc(join)
            };
            self.set_slot(slot, new);
            self.len += 1;
            return None;
        }
    }

    /// Removes prefix `key/len` (`key` already masked); returns its value.
    fn remove(&mut self, key: K, len: u8) -> Option<T> {
        let mut parent_slot = Slot::Root;
        let mut slot = Slot::Root;
        let mut cur = self.root;
        loop {
            let n = self.nodes.get(cur as usize)?;
            visits::count();
            if n.len > len || key.masked(n.len) != n.key {
                return None;
            }
            if n.len == len {
                break;
            }
            parent_slot = slot;
            slot = Slot::Child(cur, key.bit(n.len));
            cur = n.child[key.bit(n.len)];
        }
        let old = self.nodes[cur as usize].value.take()?;
        self.unlink(cur, old);
        self.len -= 1;
        match self.nodes[cur as usize].child {
            [NIL, NIL] => {
                self.set_slot(slot, NIL);
                self.release(cur);
                // A value-less parent now joins a single child: replace it by that child.
                if let Slot::Child(p, b) = slot {
                    if self.nodes[p as usize].value.is_none() {
                        let other = self.nodes[p as usize].child[1 - b];
                        self.set_slot(parent_slot, other);
                        self.release(p);
                    }
                }
            }
            [only, NIL] | [NIL, only] => {
                self.set_slot(slot, only);
                self.release(cur);
            }
            // Two children: the node stays to join them.
            _ => {}
        }
        Some(old)
    }

    /// Prefixes and values in pre-order (a prefix before the longer ones inside it, the
    /// 0-branch before the 1-branch), which is ascending (address, prefix length) order.
    fn iter(&self) -> TrieIter<'_, K, T> {
        let mut stack = Vec::new();
        if self.root != NIL {
            stack.push(self.root);
        }
        TrieIter { trie: self, stack }
    }

    /// Checks the structural invariants; used by tests.
    #[cfg(test)]
    fn check(&self) {
        fn walk<K: Key, T: Copy + Eq>(
            t: &Trie<K, T>,
            i: u32,
            min_len: u8,
            prefix: (K, u8),
        ) -> usize {
            let n = &t.nodes[i as usize];
            assert!(n.len >= min_len && n.len <= K::WIDTH, "length order");
            assert_eq!(n.key, n.key.masked(n.len), "host bits set");
            assert_eq!(n.key.masked(prefix.1), prefix.0, "child outside parent");
            let kids: Vec<u32> = n.child.iter().copied().filter(|&c| c != NIL).collect();
            if n.value.is_none() {
                assert_eq!(kids.len(), 2, "value-less node must join two children");
            }
            let mut count = usize::from(n.value.is_some());
            for (b, &c) in n.child.iter().enumerate() {
                if c != NIL {
                    assert_eq!(t.nodes[c as usize].key.bit(n.len), b, "child on wrong side");
                    count += walk(t, c, n.len + 1, (n.key, n.len));
                }
            }
            count
        }
        let count = if self.root == NIL {
            0
        } else {
            walk(
                self,
                self.root,
                0,
                (self.nodes[self.root as usize].key.masked(0), 0),
            )
        };
        assert_eq!(count, self.len, "len out of sync");
        assert_eq!(
            self.nodes.len() - self.free.len(),
            self.live_nodes(),
            "leaked nodes"
        );
        assert_eq!(self.links.len(), self.nodes.len(), "links out of step");
        let mut listed = 0;
        for (&value, &head) in &self.heads {
            let mut prev = NIL;
            let mut i = head;
            assert_ne!(i, NIL, "empty list kept");
            while i != NIL {
                let n = &self.nodes[i as usize];
                assert!(n.value == Some(value), "node on the wrong value's list");
                assert_eq!(self.links[i as usize][0], prev, "broken back link");
                listed += 1;
                assert!(listed <= self.len, "list cycle");
                prev = i;
                i = self.links[i as usize][1];
            }
        }
        assert_eq!(listed, self.len, "prefixes missing from their lists");
    }

    #[cfg(test)]
    fn live_nodes(&self) -> usize {
        fn walk<K: Key, T: Copy + Eq>(t: &Trie<K, T>, i: u32) -> usize {
            if i == NIL {
                return 0;
            }
            let n = &t.nodes[i as usize];
            1 + walk(t, n.child[0]) + walk(t, n.child[1])
        }
        walk(self, self.root)
    }
}

struct TrieIter<'a, K, T> {
    trie: &'a Trie<K, T>,
    stack: Vec<u32>,
}

impl<K: Key, T: Copy> Iterator for TrieIter<'_, K, T> {
    type Item = (K, u8, T);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(i) = self.stack.pop() {
            let Some(n) = self.trie.nodes.get(i as usize) else {
                continue;
            };
            visits::count();
            // Push 1 first so the 0-branch is visited first.
            for c in [n.child[1], n.child[0]] {
                if c != NIL {
                    self.stack.push(c);
                }
            }
            if let Some(v) = n.value {
                return Some((n.key, n.len, v));
            }
        }
        None
    }
}

/// Longest-prefix-match table from IP prefixes to values (peers).
///
/// Each prefix has at most one value; inserting a prefix that exists moves it to the new value.
#[derive(Clone, Debug)]
pub struct AllowedIps<T> {
    v4: Trie<u32, T>,
    v6: Trie<u128, T>,
}

impl<T: Copy + Eq + Hash> Default for AllowedIps<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Eq + Hash> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            v4: Trie::new(),
            v6: Trie::new(),
        }
    }

    /// Maps `net` (host bits cleared first) to `value`. Returns the value the same prefix had
    /// before, if any: this is how a prefix moves from one peer to another.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Removes exactly the prefix `net` (host bits cleared first); returns its value.
    /// Longer and shorter prefixes around it stay.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// Removes every prefix mapped to `value` (all allowed IPs of one peer); returns how many.
    /// Costs those prefixes only, not the table's size.
    pub fn remove_value(&mut self, value: T) -> usize {
        self.v4.remove_value(value) + self.v6.remove_value(value)
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    /// The value of the longest IPv4 prefix containing `addr`.
    #[inline]
    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<T> {
        self.v4.lookup(u32::from(addr))
    }

    /// The value of the longest IPv6 prefix containing `addr`.
    #[inline]
    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<T> {
        self.v6.lookup(u128::from(addr))
    }

    /// All prefixes mapped to `value`: IPv4 before IPv6, each ascending by address and then
    /// by prefix length (the same order as `IpNet`'s `Ord`). Costs those prefixes only (and
    /// sorting them), not the table's size.
    pub fn prefixes_of(&self, value: T) -> Vec<IpNet> {
        let mut v4: Vec<(u32, u8)> = self.v4.prefixes_of(value).collect();
        let mut v6: Vec<(u128, u8)> = self.v6.prefixes_of(value).collect();
        // Keys are distinct (one node per prefix), so an unstable sort is deterministic.
        v4.sort_unstable();
        v6.sort_unstable();
        let mut out = Vec::with_capacity(v4.len() + v6.len());
        // `new` only fails for lengths above 32/128, which the tries never hold.
        out.extend(
            v4.into_iter()
                .filter_map(|(k, l)| Ipv4Net::new(Ipv4Addr::from(k), l).ok().map(IpNet::V4)),
        );
        out.extend(
            v6.into_iter()
                .filter_map(|(k, l)| Ipv6Net::new(Ipv6Addr::from(k), l).ok().map(IpNet::V6)),
        );
        out
    }

    /// Every prefix with its value, in the order [`prefixes_of`](Self::prefixes_of) documents.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, T)> + '_ {
        // `new` only fails for lengths above 32/128, which the tries never hold.
        let v4 = self.v4.iter().filter_map(|(k, l, v)| {
            Ipv4Net::new(Ipv4Addr::from(k), l)
                .ok()
                .map(|n| (IpNet::V4(n), v))
        });
        let v6 = self.v6.iter().filter_map(|(k, l, v)| {
            Ipv6Net::new(Ipv6Addr::from(k), l)
                .ok()
                .map(|n| (IpNet::V6(n), v))
        });
        v4.chain(v6)
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.len + self.v6.len
    }

    /// True if the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every prefix.
    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }
}

/// The obviously-correct reference implementation: a list scanned for the longest match.
///
/// Kept for tests, fuzz targets and benchmarks that compare against [`AllowedIps`]; it is
/// linear in the number of prefixes and must not be used on the packet path.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct NaiveAllowedIps<T> {
    entries: Vec<(IpNet, T)>,
}

#[doc(hidden)]
impl<T: Copy + Eq> NaiveAllowedIps<T> {
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let net = net.trunc();
        match self.entries.iter_mut().find(|(n, _)| *n == net) {
            Some((_, v)) => Some(std::mem::replace(v, value)),
            None => {
                self.entries.push((net, value));
                None
            }
        }
    }

    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        let net = net.trunc();
        let i = self.entries.iter().position(|(n, _)| *n == net)?;
        Some(self.entries.swap_remove(i).1)
    }

    pub fn remove_value(&mut self, value: T) -> usize {
        let before = self.entries.len();
        self.entries.retain(|&(_, v)| v != value);
        before - self.entries.len()
    }

    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        self.entries
            .iter()
            .filter(|(n, _)| n.contains(&addr))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|&(_, v)| v)
    }

    pub fn prefixes_of(&self, value: T) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .entries
            .iter()
            .filter(|&&(_, v)| v == value)
            .map(|&(n, _)| n)
            .collect();
        out.sort();
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn check<T: Copy + Eq + Hash>(t: &AllowedIps<T>) {
        t.v4.check();
        t.v6.check();
    }

    #[test]
    fn empty_table_matches_nothing() {
        let t: AllowedIps<u32> = AllowedIps::new();
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("198.18.0.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), None);
        assert_eq!(t.prefixes_of(0), Vec::<IpNet>::new());
    }

    #[test]
    fn default_routes_match_everything_in_their_family_only() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 1);
        assert_eq!(t.lookup(ip("0.0.0.0")), Some(1));
        assert_eq!(t.lookup(ip("255.255.255.255")), Some(1));
        assert_eq!(t.lookup(ip("::")), None);
        t.insert(net("::/0"), 2);
        assert_eq!(
            t.lookup(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(2)
        );
        assert_eq!(
            t.lookup(ip("::ffff:198.18.0.1")),
            Some(2),
            "mapped v6 stays v6"
        );
        assert_eq!(t.lookup(ip("198.18.0.1")), Some(1));
        assert_eq!(t.len(), 2);
        check(&t);
    }

    #[test]
    fn host_routes_match_only_their_address() {
        let mut t = AllowedIps::new();
        t.insert(net("198.18.0.7/32"), 1);
        t.insert(net("fd00::7/128"), 2);
        assert_eq!(t.lookup(ip("198.18.0.7")), Some(1));
        assert_eq!(t.lookup(ip("198.18.0.6")), None);
        assert_eq!(t.lookup(ip("198.18.0.8")), None);
        assert_eq!(t.lookup(ip("fd00::7")), Some(2));
        assert_eq!(t.lookup(ip("fd00::6")), None);
        assert_eq!(t.lookup(ip("fd00::8")), None);
        check(&t);
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insert_order() {
        let nets = [
            ("0.0.0.0/0", 0),
            ("198.18.0.0/15", 1),
            ("198.19.0.0/16", 2),
            ("198.19.4.0/24", 3),
            ("198.19.4.128/25", 4),
            ("198.19.4.200/32", 5),
        ];
        let probes = [
            ("100.64.0.1", 0),
            ("198.18.3.3", 1),
            ("198.19.9.9", 2),
            ("198.19.4.1", 3),
            ("198.19.4.129", 4),
            ("198.19.4.200", 5),
            ("198.19.4.201", 4),
        ];
        // Forward, reverse and an interleaved order build different trie shapes.
        for order in [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [3, 5, 0, 4, 1, 2]] {
            let mut t = AllowedIps::new();
            for i in order {
                t.insert(net(nets[i].0), nets[i].1);
            }
            check(&t);
            for (a, want) in probes {
                assert_eq!(t.lookup(ip(a)), Some(want), "{a} with order {order:?}");
            }
        }
    }

    #[test]
    fn host_bits_are_cleared_on_insert_and_remove() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("198.18.5.77/24"), 1), None);
        assert_eq!(t.prefixes_of(1), vec![net("198.18.5.0/24")]);
        assert_eq!(t.lookup(ip("198.18.5.1")), Some(1));
        // The same prefix written with other host bits is the same prefix.
        assert_eq!(t.insert(net("198.18.5.1/24"), 2), Some(1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(&net("198.18.5.200/24")), Some(2));
        assert!(t.is_empty());
        t.insert(net("fd00:1:2:3:4::9/64"), 3);
        assert_eq!(t.prefixes_of(3), vec![net("fd00:1:2:3::/64")]);
        check(&t);
    }

    #[test]
    fn inserting_an_existing_prefix_moves_it_to_the_new_value() {
        let mut t = AllowedIps::new();
        t.insert(net("198.18.0.0/24"), 1);
        t.insert(net("198.18.0.0/16"), 1);
        assert_eq!(t.insert(net("198.18.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("198.18.0.9")), Some(2));
        assert_eq!(t.lookup(ip("198.18.1.9")), Some(1));
        assert_eq!(t.prefixes_of(1), vec![net("198.18.0.0/16")]);
        assert_eq!(t.prefixes_of(2), vec![net("198.18.0.0/24")]);
        assert_eq!(t.len(), 2);
        check(&t);
    }

    #[test]
    fn remove_takes_only_the_exact_prefix() {
        let mut t = AllowedIps::new();
        t.insert(net("198.18.0.0/16"), 1);
        t.insert(net("198.18.7.0/24"), 2);
        t.insert(net("198.18.7.7/32"), 3);
        assert_eq!(t.remove(&net("198.18.0.0/17")), None, "absent prefix");
        assert_eq!(t.remove(&net("198.18.7.0/24")), Some(2));
        assert_eq!(t.remove(&net("198.18.7.0/24")), None, "already gone");
        assert_eq!(t.lookup(ip("198.18.7.1")), Some(1));
        assert_eq!(t.lookup(ip("198.18.7.7")), Some(3));
        assert_eq!(t.remove(&net("198.18.0.0/16")), Some(1));
        assert_eq!(t.lookup(ip("198.18.7.1")), None);
        assert_eq!(t.lookup(ip("198.18.7.7")), Some(3));
        assert_eq!(t.remove(&net("fd00::/8")), None, "other family");
        assert_eq!(t.len(), 1);
        check(&t);
    }

    #[test]
    fn remove_value_drops_every_prefix_of_one_value() {
        let mut t = AllowedIps::new();
        t.insert(net("198.18.0.0/16"), 1);
        t.insert(net("198.18.1.0/24"), 2);
        t.insert(net("198.18.1.128/25"), 1);
        t.insert(net("fd00::/64"), 1);
        t.insert(net("fd00::/48"), 2);
        assert_eq!(t.remove_value(1), 4 - 1);
        assert_eq!(t.remove_value(1), 0);
        assert_eq!(t.prefixes_of(1), Vec::<IpNet>::new());
        assert_eq!(t.lookup(ip("198.18.1.200")), Some(2));
        assert_eq!(t.lookup(ip("198.18.2.1")), None);
        assert_eq!(t.lookup(ip("fd00::1")), Some(2));
        assert_eq!(t.len(), 2);
        check(&t);
    }

    /// A table of `peers` values with one host route each, plus value `u32::MAX` holding
    /// three prefixes (two IPv4, one IPv6) among them.
    fn many_peers(peers: u32) -> AllowedIps<u32> {
        let mut t = AllowedIps::new();
        for p in 0..peers {
            let n = Ipv4Net::new(Ipv4Addr::from(0x6440_0000 + p), 32).unwrap();
            t.insert(IpNet::V4(n), p);
        }
        for n in ["100.64.0.7/32", "198.19.0.0/16", "fd00::/64"] {
            t.insert(net(n), u32::MAX);
        }
        t
    }

    /// Trie nodes `f` visits (on this thread).
    fn visited<R>(f: impl FnOnce() -> R) -> (usize, R) {
        let before = visits::total();
        let r = f();
        (visits::total() - before, r)
    }

    #[test]
    fn one_values_prefixes_cost_only_those_prefixes() {
        // What `wg show` and `replace_allowed_ips` ask once per peer: with a whole-table walk
        // each, a device with n peers costs n^2.
        for peers in [10, 10_000] {
            let mut t = many_peers(peers);
            let (n, got) = visited(|| t.prefixes_of(u32::MAX));
            assert_eq!(got.len(), 3);
            assert_eq!(
                n, 3,
                "prefixes_of visits the value's own nodes ({peers} peers)"
            );
            let (n, removed) = visited(|| t.remove_value(u32::MAX));
            assert_eq!(removed, 3);
            // Each removal walks one path from the root: at most 33 nodes in IPv4 (the
            // trie over 10,000 consecutive host routes is about 15 deep) and 129 in IPv6.
            assert!(
                n <= 2 * 33 + 129,
                "remove_value visited {n} nodes ({peers} peers)"
            );
            check(&t);
            let (n, removed) = visited(|| t.remove_value(8));
            assert_eq!(removed, 1);
            assert!(n <= 33, "remove_value visited {n} nodes ({peers} peers)");
            let (n, _) = visited(|| t.remove_value(u32::MAX - 1));
            assert_eq!(n, 0, "a value without prefixes costs nothing");
        }
    }

    #[test]
    fn moving_a_prefix_moves_it_between_lists() {
        let mut t = many_peers(100);
        // 100.64.0.7/32 belonged to 7, then u32::MAX took it.
        assert_eq!(t.prefixes_of(7), Vec::<IpNet>::new());
        assert_eq!(t.insert(net("100.64.0.7/32"), 7), Some(u32::MAX));
        assert_eq!(
            t.insert(net("100.64.0.7/32"), 7),
            Some(7),
            "same value again"
        );
        assert_eq!(t.prefixes_of(7), vec![net("100.64.0.7/32")]);
        assert_eq!(
            t.prefixes_of(u32::MAX),
            vec![net("198.19.0.0/16"), net("fd00::/64")]
        );
        check(&t);
        assert_eq!(t.remove_value(u32::MAX), 2);
        assert_eq!(t.remove_value(7), 1);
        assert_eq!(t.len(), 99);
        check(&t);
    }

    #[test]
    fn prefixes_of_is_sorted_v4_first_then_address_then_length() {
        let mut t = AllowedIps::new();
        for n in [
            "fd00::/16",
            "198.19.0.0/16",
            "100.64.0.0/10",
            "198.18.0.0/15",
            "198.18.0.0/16",
            "fd00::/8",
            "0.0.0.0/0",
        ] {
            t.insert(net(n), 7);
        }
        t.insert(net("198.18.9.0/24"), 8);
        let want: Vec<IpNet> = [
            "0.0.0.0/0",
            "100.64.0.0/10",
            "198.18.0.0/15",
            "198.18.0.0/16",
            "198.19.0.0/16",
            "fd00::/8",
            "fd00::/16",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        assert_eq!(t.prefixes_of(7), want);
        let mut sorted = want.clone();
        sorted.sort();
        assert_eq!(sorted, want, "documented order is IpNet's Ord");
    }

    #[test]
    fn clear_empties_and_table_is_reusable() {
        let mut t = AllowedIps::new();
        t.insert(net("198.18.0.0/16"), 1);
        t.insert(net("fd00::/8"), 1);
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("198.18.0.1")), None);
        t.insert(net("198.18.0.0/24"), 2);
        assert_eq!(t.lookup(ip("198.18.0.1")), Some(2));
        check(&t);
    }

    #[test]
    fn freed_nodes_are_reused() {
        let mut t = AllowedIps::new();
        for round in 0..3 {
            for i in 0..256u32 {
                t.insert(
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0xC612_0000 | i << 4), 28).unwrap()),
                    round,
                );
            }
            assert_eq!(t.remove_value(round), 256);
            check(&t);
        }
        // 256 leaves need fewer than 512 nodes; without reuse three rounds would need 3x.
        assert!(t.v4.nodes.len() < 512, "arena grew to {}", t.v4.nodes.len());
    }

    /// Random addresses inside the ranges the project may use (198.18.0.0/15, 100.64.0.0/10,
    /// fd00::/8), with few varying bits so prefixes overlap often.
    fn random_addr(rng: &mut StdRng, v6: bool) -> IpAddr {
        if v6 {
            // fd00::/8 with the variation in a few chosen places.
            let hi: u128 = 0xfd << 120 | u128::from(rng.gen::<u8>() & 0x0f) << 112;
            let mid = u128::from(rng.gen::<u16>() & 0x00ff) << 64;
            let lo = u128::from(rng.gen::<u8>());
            IpAddr::V6(Ipv6Addr::from(hi | mid | lo))
        } else {
            let base: u32 = if rng.gen_bool(0.7) {
                0xC612_0000
            } else {
                0x6440_0000
            };
            let bits: u32 = rng.gen::<u32>()
                & if base == 0xC612_0000 {
                    0x0001_0F0F
                } else {
                    0x003F_00FF
                };
            IpAddr::V4(Ipv4Addr::from(base | bits))
        }
    }

    fn random_net(rng: &mut StdRng) -> IpNet {
        let v6 = rng.gen_bool(0.4);
        let addr = random_addr(rng, v6);
        let max = if v6 { 128 } else { 32 };
        // Mostly lengths that end among the varying bits, so prefixes nest and overlap;
        // sometimes the extremes. Short ones are rare or they would cover every lookup.
        let len = match rng.gen_range(0..100) {
            0 => 0,
            1..=3 => rng.gen_range(0..=max),
            4..=13 => max,
            _ if v6 => rng.gen_range(16..=127),
            _ => rng.gen_range(18..=31),
        };
        IpNet::new(addr, len).unwrap()
    }

    #[test]
    fn randomised_operations_agree_with_the_naive_table() {
        let mut rng = StdRng::seed_from_u64(0x7a11_5c8e);
        let mut t: AllowedIps<u32> = AllowedIps::new();
        let mut oracle: NaiveAllowedIps<u32> = NaiveAllowedIps::new();
        let mut known: Vec<IpNet> = Vec::new();
        let (mut hits, mut lookups) = (0, 0);
        for step in 0..20_000 {
            match rng.gen_range(0..100) {
                0..=39 => {
                    let n = random_net(&mut rng);
                    let v = rng.gen_range(0..8);
                    known.push(n);
                    assert_eq!(
                        t.insert(n, v),
                        oracle.insert(n, v),
                        "insert {n} step {step}"
                    );
                }
                40..=74 => {
                    // Mostly prefixes that were inserted, sometimes new ones.
                    let n = if !known.is_empty() && rng.gen_bool(0.8) {
                        known[rng.gen_range(0..known.len())]
                    } else {
                        random_net(&mut rng)
                    };
                    assert_eq!(t.remove(&n), oracle.remove(&n), "remove {n} step {step}");
                }
                75..=76 => {
                    let v = rng.gen_range(0..8);
                    assert_eq!(
                        t.remove_value(v),
                        oracle.remove_value(v),
                        "remove_value {v}"
                    );
                }
                77 if rng.gen_bool(0.05) => {
                    t.clear();
                    oracle.clear();
                }
                _ => {
                    for _ in 0..8 {
                        let v6 = rng.gen_bool(0.4);
                        let a = random_addr(&mut rng, v6);
                        let got = t.lookup(a);
                        assert_eq!(got, oracle.lookup(a), "lookup {a} step {step}");
                        hits += usize::from(got.is_some());
                        lookups += 1;
                    }
                }
            }
            assert_eq!(t.len(), oracle.len(), "len at step {step}");
            if step % 500 == 0 {
                check(&t);
                for v in 0..8 {
                    assert_eq!(t.prefixes_of(v), oracle.prefixes_of(v), "prefixes_of {v}");
                }
            }
        }
        check(&t);
        // The generator must exercise both outcomes, or the comparison proves little.
        assert!(
            hits > lookups / 10 && hits < lookups * 9 / 10,
            "{hits} of {lookups}"
        );
    }

    #[test]
    fn one_peer_with_30000_prefixes_among_40_peers() {
        const BASE: u32 = 0xC612_0000; // 198.18.0.0
        let mut rng = StdRng::seed_from_u64(30_000);
        let mut t: AllowedIps<u32> = AllowedIps::new();
        // Peer 0: 30,000 distinct /32s in 198.18.0.0/15, every 4th address.
        for i in 0..30_000u32 {
            let n = IpNet::V4(Ipv4Net::new(Ipv4Addr::from(BASE + i * 4), 32).unwrap());
            assert_eq!(t.insert(n, 0), None);
        }
        // Peers 1..40: a /24 each (over some of peer 0's host routes) and a /64.
        for p in 1..40u32 {
            let v4 = Ipv4Net::new(Ipv4Addr::from(BASE + (p << 8)), 24).unwrap();
            let v6 = Ipv6Net::new(Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(p) << 64), 64);
            t.insert(IpNet::V4(v4), p);
            t.insert(IpNet::V6(v6.unwrap()), p);
        }
        assert_eq!(t.len(), 30_000 + 39 * 2);
        check(&t);
        // What a lookup must return, worked out from how the table was filled.
        let expected = |offset: u32, with_peer0: bool| {
            if with_peer0 && offset & 3 == 0 && offset / 4 < 30_000 {
                Some(0)
            } else if (1..40).contains(&(offset >> 8)) {
                Some(offset >> 8)
            } else {
                None
            }
        };
        for _ in 0..5_000 {
            let offset = rng.gen_range(0..0x2_0000);
            let a = Ipv4Addr::from(BASE + offset);
            assert_eq!(t.lookup_v4(a), expected(offset, true), "{a}");
        }
        assert_eq!(t.prefixes_of(0).len(), 30_000);
        assert_eq!(t.prefixes_of(7).len(), 2);
        assert_eq!(t.remove_value(0), 30_000);
        assert_eq!(t.len(), 39 * 2);
        check(&t);
        for _ in 0..5_000 {
            let offset = rng.gen_range(0..0x2_0000);
            let a = Ipv4Addr::from(BASE + offset);
            assert_eq!(t.lookup_v4(a), expected(offset, false), "{a} after removal");
        }
    }
}
