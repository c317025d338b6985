//! What a wake-up costs the code it interrupts, on this machine: 1420-byte seals by this
//! crate's own AEAD, timed with the TSC (wall time, so time the guest loses to the hypervisor
//! counts), alone and with another thread on the same CPU waking every 100 µs from a timer —
//! as the pods' TCP pacing timers and the routers' wake-ups interrupt a router's crypto.
//! On bare metal a wake-up costs a few µs; in a guest each is a timer interrupt, a context
//! switch each way and a timer reprogramming, and the interrupt and the reprogramming each a
//! VM exit (BENCHMARKS.md, session 12).
//!
//! `taskset -c 1 cargo bench --manifest-path benches/aead/Cargo.toml --bench wake_tax`
//! (`-- ROUNDS`, default 5; the pinning puts both threads on one CPU). Prints a markdown table.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tailsk8s_aead_bench::{median, rounds_from_args};
use tailsk8s_noise::aead::Aead;

const SIZE: usize = 1420;
const SEALS: usize = 2_000_000;

/// TSC ticks per seal over `SEALS` seals.
fn ticks_per_seal(aead: &Aead, input: &[u8], out: &mut [u8]) -> f64 {
    // SAFETY: reading the TSC has no preconditions on x86_64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    for i in 0..SEALS {
        aead.seal_from(i as u64, black_box(input), black_box(&mut *out));
    }
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / SEALS as f64
}

/// TSC ticks per ns, from a 200 ms sleep.
fn ticks_per_ns() -> f64 {
    // SAFETY: as above.
    let (t0, c0) = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let (t1, c1) = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
    (c1 - c0) as f64 / (t1 - t0).as_nanos() as f64
}

fn main() {
    let rounds = rounds_from_args(5);
    let aead = Aead::new(&[7; 32]);
    let input = vec![0x55u8; SIZE];
    let mut out = vec![0u8; SIZE + 16];
    let per_ns = ticks_per_ns();
    let (mut alone, mut beside, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        alone.push(ticks_per_seal(&aead, &input, &mut out) / per_ns);
        let (stop, wakes) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let sleeper = {
            let (stop, wakes) = (stop.clone(), wakes.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(100));
                    wakes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let start = Instant::now();
        beside.push(ticks_per_seal(&aead, &input, &mut out) / per_ns);
        rates.push(wakes.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64());
        stop.store(true, Ordering::Relaxed);
        sleeper.join().expect("the sleeper thread");
    }
    let (a, b, r) = (median(&mut alone), median(&mut beside), median(&mut rates));
    // Seals per second beside the sleeper × the time each lost = time lost per second.
    let lost_per_wake_us = (b - a) * (1e9 / b) / r / 1e3;
    println!(
        "| {} seal, {SIZE} B | ns per seal (median of {rounds}) |",
        aead.implementation()
    );
    println!("|---|---|");
    println!("| alone | {a:.0} |");
    println!("| a thread on the same CPU waking every 100 µs ({r:.0} wake-ups/s) | {b:.0} |");
    println!("| time lost per wake-up | {lost_per_wake_us:.1} µs |");
}
