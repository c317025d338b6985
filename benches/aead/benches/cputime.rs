//! The same operations as the `aead` bench, timed in this thread's CPU time (from
//! `/proc/thread-self/schedstat`) instead of wall time, so that a machine shared with other
//! work still gives comparable figures: time the thread waits for a CPU is not counted.
//! Rounds run every implementation in turn (interleaved), and the table gives the median over
//! rounds of ns per operation and MiB of plaintext per CPU second, with the ratio to ring.
//!
//! `cargo bench --manifest-path benches/aead/Cargo.toml --features aws-lc,openssl --bench cputime`
//! (`-- ROUNDS`, default 7). Prints a markdown table on stdout.

use std::hint::black_box;

use boringtun::noise::TunnResult;
use tailsk8s_aead_bench::{
    all, ipv4_packet, median, rounds_from_args, seal_data_message, tunn_pair, TransportAead,
    DATA_HEADER_LEN, TAG_LEN,
};

/// This thread's CPU time so far, in ns (schedstat's first field).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat (Linux)");
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number of ns")
}

/// CPU ns per call of `f`, over `n` calls.
fn per_op(n: u64, mut f: impl FnMut()) -> f64 {
    let t0 = thread_cpu_ns();
    for _ in 0..n {
        f();
    }
    (thread_cpu_ns() - t0) as f64 / n as f64
}

fn main() {
    let rounds = rounds_from_args(7);
    #[cfg(feature = "openssl")]
    eprintln!("openssl: {}", tailsk8s_aead_bench::OpenSsl::version());
    let key = [0x5au8; 32];
    println!("| operation | size (B) | implementation | CPU ns per op (median of {rounds}) | MiB per CPU second | × ring |");
    println!("|---|---|---|---|---|---|");
    for size in [64usize, 1420] {
        let n: u64 = 500_000;
        let mut aeads = all(&key);
        let names: Vec<&str> = aeads.iter().map(|(name, _)| *name).collect();
        // [operation][implementation] → samples
        let ops = ["seal", "seal_open", "owned_data_message"];
        let mut samples = vec![vec![Vec::new(); aeads.len()]; ops.len()];
        let mut tunn_samples = [Vec::new(), Vec::new()];
        let packet = ipv4_packet(size);
        let (mut ta, _) = tunn_pair();
        let (mut ra, mut rb) = tunn_pair();
        let mut wire = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let mut counter = 0u64;
        for _ in 0..rounds {
            for (i, (_, a)) in aeads.iter_mut().enumerate() {
                let a: &mut dyn TransportAead = &mut **a;
                let mut buf = vec![0x11u8; DATA_HEADER_LEN + size + TAG_LEN];
                samples[0][i].push(per_op(n, || {
                    counter += 1;
                    a.seal(counter, black_box(&mut buf), size);
                }));
                samples[1][i].push(per_op(n, || {
                    counter += 1;
                    a.seal(counter, black_box(&mut buf), size);
                    assert!(a.open(counter, black_box(&mut buf), size));
                }));
                samples[2][i].push(per_op(n, || {
                    counter += 1;
                    black_box(seal_data_message(a, 7, counter, black_box(&mut buf), size));
                }));
            }
            tunn_samples[0].push(per_op(n, || {
                match ta.encapsulate(black_box(&packet), &mut wire) {
                    TunnResult::WriteToNetwork(d) => {
                        black_box(d.len());
                    }
                    _ => panic!("no data message"),
                }
            }));
            tunn_samples[1].push(per_op(n, || {
                let d = match ra.encapsulate(black_box(&packet), &mut wire) {
                    TunnResult::WriteToNetwork(d) => d,
                    _ => panic!("no data message"),
                };
                match rb.decapsulate(None, d, &mut out) {
                    TunnResult::WriteToTunnelV4(p, _) => {
                        black_box(p.len());
                    }
                    _ => panic!("not delivered"),
                }
            }));
        }
        let mib = |ns: f64| size as f64 / ns * 1e9 / (1 << 20) as f64;
        for (o, op) in ops.iter().enumerate() {
            let ring = median(&mut samples[o][0].clone());
            for (i, name) in names.iter().enumerate() {
                let ns = median(&mut samples[o][i]);
                println!(
                    "| {op} | {size} | {name} | {ns:.0} | {:.0} | {:.2}× |",
                    mib(ns),
                    ring / ns
                );
            }
        }
        let ring_seal = median(&mut samples[0][0].clone());
        let ring_pair = median(&mut samples[1][0].clone());
        for (t, (label, ring)) in [
            ("boringtun Tunn::encapsulate (vs ring seal)", ring_seal),
            (
                "boringtun encapsulate + decapsulate (vs ring seal_open)",
                ring_pair,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let ns = median(&mut tunn_samples[t]);
            println!(
                "| {label} | {size} | boringtun 0.7.1 (ring) | {ns:.0} | {:.0} | {:.2}× |",
                mib(ns),
                ring / ns
            );
        }
    }
}
