//! tailsk8s benchmarks: the criterion microbenchmarks are in `benches/engine.rs`, the end-to-end
//! comparison is the `iperf3` script; README.md says how to run both, ../BENCHMARKS.md holds
//! the latest results. This library is empty: it only gives the bench targets a crate.
