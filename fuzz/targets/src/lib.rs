//! The bodies of tailsk8s's fuzz targets, as plain functions of `&[u8]`.
//!
//! Two callers run exactly these bodies:
//! - the cargo-fuzz crate in `fuzz/` (libFuzzer, nightly features via `RUSTC_BOOTSTRAP=1`),
//!   one tiny `fuzz_targets/<name>.rs` per entry of [`TARGETS`];
//! - `cargo test` on stable (`tests/replay.rs`), which replays every committed seed
//!   (`fuzz/seeds/<name>/`) and every input that ever crashed (`fuzz/regressions/<name>/`),
//!   so a regression fails CI even where libFuzzer cannot run.
//!
//! A body panics when an invariant breaks; that panic is the finding. Each target module
//! documents its invariants and provides `seeds()`, the small inputs `fuzz-seeds` writes.

pub mod aead;
pub mod allowed_ips;
pub mod announcement;
pub mod config;
pub mod gro_coalesce;
pub mod handshake;
pub mod headers;
pub mod input;
pub mod localapi;
pub mod packets;
pub mod support;
pub mod tun_read;
pub mod uapi;
pub mod udp_datagram;

/// One fuzz target: its name (the directory names under `fuzz/seeds` and
/// `fuzz/regressions`, and the cargo-fuzz binary name), its body and its seeds.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

/// Every target, in the order `scripts/fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "tun_read",
        run: tun_read::run,
        seeds: tun_read::seeds,
    },
    Target {
        name: "udp_datagram",
        run: udp_datagram::run,
        seeds: udp_datagram::seeds,
    },
    Target {
        name: "aead",
        run: aead::run,
        seeds: aead::seeds,
    },
    Target {
        name: "handshake",
        run: handshake::run,
        seeds: handshake::seeds,
    },
    Target {
        name: "gro_coalesce",
        run: gro_coalesce::run,
        seeds: gro_coalesce::seeds,
    },
    Target {
        name: "uapi",
        run: uapi::run,
        seeds: uapi::seeds,
    },
    Target {
        name: "config",
        run: config::run,
        seeds: config::seeds,
    },
    Target {
        name: "allowed_ips",
        run: allowed_ips::run,
        seeds: allowed_ips::seeds,
    },
    Target {
        name: "announcement",
        run: announcement::run,
        seeds: announcement::seeds,
    },
    Target {
        name: "localapi",
        run: localapi::run,
        seeds: localapi::seeds,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
