//! libFuzzer entry point for `aead`; the body and its invariants live in
//! `tailsk8s_fuzz_targets::aead` so that `cargo test` replays inputs through the same code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tailsk8s_fuzz_targets::aead::run(data));
