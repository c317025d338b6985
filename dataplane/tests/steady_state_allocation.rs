//! The packet path allocates nothing in steady state: after a warm-up, encrypting on one
//! engine and decrypting on another — through the worker's real `Outbox` — makes no heap
//! allocation. A counting global allocator (this test binary only) checks it, counting only
//! on the measuring thread: the test harness's own threads may allocate at any time (a slow,
//! loaded run once counted 4 of theirs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use etherparse::PacketBuilder;
use tailsk8s_dataplane::key::Key;
use tailsk8s_dataplane::outbox::Outbox;
use tailsk8s_dataplane::testing::Node;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread's allocations are counted (const, no destructor: reading it never
    /// allocates).
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count_one() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Hands every datagram in `sent` to `to` as coming from `from`; returns how many packets
/// `received` holds for the TUN afterwards.
fn deliver(to: &mut Node, from: SocketAddr, sent: &Outbox, received: &mut Outbox) -> usize {
    for (_, datagram) in sent.datagrams() {
        to.datagram(from, None, datagram, received);
    }
    received.packets().count()
}

#[test]
fn encrypt_and_decrypt_allocate_nothing_once_warm() {
    let start = Instant::now();
    let mut a = Node::new(Key::generate_private(), "198.18.0.1:51820", start);
    let mut b = Node::new(Key::generate_private(), "198.18.0.2:51820", start);
    a.add_node(&b, &["198.19.2.0/24"]);
    b.add_node(&a, &["198.19.1.0/24"]);
    let (a_addr, b_addr) = (a.addr, b.addr);
    let mut packet = Vec::new();
    PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64)
        .udp(4000, 5000)
        .write(&mut packet, &[7u8; 1300])
        .unwrap();
    let len = packet.len();
    packet.resize(len + 64, 0);
    let (mut out_a, mut out_b) = (Outbox::default(), Outbox::default());
    let mut delivered = 0usize;

    let mut round = |count: &mut usize| {
        out_a.clear();
        a.tun_packet(&mut packet, len, &mut out_a);
        // Handshake messages and data alike go to b, and b's answers back to a.
        *count += deliver(&mut b, a_addr, &out_a, &mut out_b);
        let replies: Vec<Vec<u8>> = out_b.datagrams().map(|(_, d)| d.to_vec()).collect();
        out_b.clear();
        for reply in replies {
            out_a.clear();
            a.datagram(b_addr, None, &reply, &mut out_a);
            *count += deliver(&mut b, a_addr, &out_a, &mut out_b);
            out_b.clear();
        }
    };
    // Warm-up: the handshake, and buffers growing to their working size.
    for _ in 0..50 {
        round(&mut delivered);
    }
    assert!(delivered > 0, "the session carries packets");

    let before = ALLOCATIONS.load(Relaxed);
    COUNTING.set(true);
    let mut steady = 0usize;
    for _ in 0..2000 {
        out_a.clear();
        a.tun_packet(&mut packet, len, &mut out_a);
        steady += deliver(&mut b, a_addr, &out_a, &mut out_b);
        out_b.clear();
    }
    COUNTING.set(false);
    let allocations = ALLOCATIONS.load(Relaxed) - before;
    assert_eq!(steady, 2000, "every packet arrived");
    assert_eq!(
        allocations, 0,
        "allocations in 2000 packets of steady state"
    );
}

/// The handshake thread's path under a flood: initiations with a valid MAC1 and no cookie,
/// handled under load, are answered with cookie replies without a heap allocation.
#[test]
fn cookie_replies_under_load_allocate_nothing_once_warm() {
    use boringtun::noise::{Tunn, TunnResult};
    let start = Instant::now();
    let mut a = Node::new(Key::generate_private(), "198.18.0.1:51820", start);
    let flooder: SocketAddr = "198.18.100.1:4000".parse().unwrap();
    let public = a.public;
    let initiations: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let mut tunn = Tunn::new(
                x25519_dalek::StaticSecret::from(Key::generate_private().0),
                x25519_dalek::PublicKey::from(public.0),
                None,
                None,
                1,
                None,
            );
            let mut buf = [0u8; 256];
            match tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no initiation"),
            }
        })
        .collect();
    let mut out = Outbox::default();
    let flood = |a: &mut Node, out: &mut Outbox, rounds: usize| {
        for _ in 0..rounds {
            for init in &initiations {
                out.clear();
                let mut batch = a.engine.batch();
                batch.handle_handshake(flooder, None, init, true, &mut a.scratch, out);
            }
        }
    };
    flood(&mut a, &mut out, 2);
    assert_eq!(out.datagrams().count(), 1, "a cookie reply");
    let before = ALLOCATIONS.load(Relaxed);
    COUNTING.set(true);
    flood(&mut a, &mut out, 30);
    COUNTING.set(false);
    let allocations = ALLOCATIONS.load(Relaxed) - before;
    assert_eq!(
        a.engine.stats().cookie_replies_sent.load(Relaxed),
        32 * 64,
        "every initiation got a cookie reply"
    );
    assert_eq!(allocations, 0, "allocations in 1,920 cookie replies");
}
