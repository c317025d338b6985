//! The packet path allocates nothing in steady state: after a warm-up, encrypting on one
//! engine and decrypting on another — through the worker's real `Outbox` — makes no heap
//! allocation. A counting global allocator (this test binary only) checks it, counting only
//! on the measuring thread: the test harness's own threads may allocate at any time (a slow,
//! loaded run once counted 4 of theirs).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use etherparse::PacketBuilder;
use tailsk8s_dataplane::config::{AllowedIpChange, DeviceUpdate, PeerUpdate};
use tailsk8s_dataplane::engine::{new_scratch, Engine, DEFAULT_MTU};
use tailsk8s_dataplane::key::Key;
use tailsk8s_dataplane::outbox::Outbox;

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

fn engine_with_peer(private: Key, peer: Key, endpoint: &str, allowed: &str) -> Engine {
    let engine = Engine::new(DEFAULT_MTU);
    let mut update = PeerUpdate::new(peer);
    update.endpoint = Some(endpoint.parse().unwrap());
    update.allowed_ips = vec![AllowedIpChange::Add(allowed.parse().unwrap())];
    engine
        .apply(&DeviceUpdate {
            private_key: Some(Some(private)),
            peers: vec![update],
            ..Default::default()
        })
        .unwrap();
    engine
}

/// Hands every datagram in `sent` to `to` as coming from `from`; returns how many packets
/// `received` holds for the TUN afterwards.
fn deliver(
    to: &Engine,
    from: SocketAddr,
    sent: &Outbox,
    scratch: &mut [u8; tailsk8s_dataplane::engine::SCRATCH_LEN],
    received: &mut Outbox,
) -> usize {
    for (_, datagram) in sent.datagrams() {
        to.batch()
            .handle_datagram(from, None, datagram, scratch, received);
    }
    received.packets().count()
}

#[test]
fn encrypt_and_decrypt_allocate_nothing_once_warm() {
    let (ka, kb) = (Key::generate_private(), Key::generate_private());
    let a_addr: SocketAddr = "198.18.0.1:51820".parse().unwrap();
    let b_addr: SocketAddr = "198.18.0.2:51820".parse().unwrap();
    let a = engine_with_peer(ka, kb.public_key(), "198.18.0.2:51820", "198.19.2.0/24");
    let b = engine_with_peer(kb, ka.public_key(), "198.18.0.1:51820", "198.19.1.0/24");
    let mut packet = Vec::new();
    PacketBuilder::ipv4([198, 19, 1, 2], [198, 19, 2, 2], 64)
        .udp(4000, 5000)
        .write(&mut packet, &[7u8; 1300])
        .unwrap();
    let len = packet.len();
    packet.resize(len + 64, 0);
    let (mut scratch_a, mut scratch_b) = (new_scratch(), new_scratch());
    let (mut out_a, mut out_b) = (Outbox::default(), Outbox::default());
    let mut delivered = 0usize;

    let mut round = |count: &mut usize| {
        out_a.clear();
        a.batch()
            .handle_tun_packet(&mut packet, len, &mut scratch_a, &mut out_a);
        // Handshake messages and data alike go to b, and b's answers back to a.
        *count += deliver(&b, a_addr, &out_a, &mut scratch_b, &mut out_b);
        let replies: Vec<Vec<u8>> = out_b.datagrams().map(|(_, d)| d.to_vec()).collect();
        out_b.clear();
        for reply in replies {
            out_a.clear();
            a.batch()
                .handle_datagram(b_addr, None, &reply, &mut scratch_a, &mut out_a);
            *count += deliver(&b, a_addr, &out_a, &mut scratch_b, &mut out_b);
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
        a.batch()
            .handle_tun_packet(&mut packet, len, &mut scratch_a, &mut out_a);
        steady += deliver(&b, a_addr, &out_a, &mut scratch_b, &mut out_b);
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
