//! Replays the committed fuzz inputs through the target bodies on stable: every seed in
//! `fuzz/seeds/<target>/` and every input that ever crashed, in `fuzz/regressions/<target>/`.
//! A failing input is named and printed in base64, as `scripts/fuzz` prints a fresh crash.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tailsk8s_fuzz_targets::{target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `dir`, sorted; an absent directory has none. Dotfiles (`.gitkeep`) are skipped.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `<fuzz>/<kind>/<target>/`; returns the failures as messages.
fn replay(kind: &str) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut failures = Vec::new();
    for t in TARGETS {
        for path in inputs(&fuzz_dir().join(kind).join(t.name)) {
            let data = match fs::read(&path) {
                Ok(d) => d,
                Err(e) => {
                    failures.push(format!("{}: unreadable: {e}", path.display()));
                    continue;
                }
            };
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| (t.run)(&data))).is_err() {
                failures.push(format!(
                    "target {} failed on {}\n  input (base64): {}",
                    t.name,
                    path.display(),
                    base64::engine::general_purpose::STANDARD.encode(&data)
                ));
            }
        }
    }
    (count, failures)
}

#[test]
fn every_seed_passes() {
    let (count, failures) = replay("seeds");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(count >= TARGETS.len(), "only {count} seeds found");
}

#[test]
fn every_past_crash_stays_fixed() {
    let (_, failures) = replay("regressions");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn committed_seeds_are_what_the_generator_writes() {
    for t in TARGETS {
        let dir = fuzz_dir().join("seeds").join(t.name);
        let mut want: Vec<(String, Vec<u8>)> = (t.seeds)()
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect();
        want.sort();
        let got: Vec<(String, Vec<u8>)> = inputs(&dir)
            .into_iter()
            .map(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                (name.unwrap_or_default(), fs::read(&p).unwrap_or_default())
            })
            .collect();
        assert!(
            got == want,
            "fuzz/seeds/{} is stale: run `cargo run -p tailsk8s-fuzz-targets --bin fuzz-seeds -- fuzz/seeds`",
            t.name
        );
    }
}

#[test]
fn every_input_directory_names_a_target() {
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() {
                assert!(
                    target(&name).is_some(),
                    "fuzz/{kind}/{name} names no target"
                );
            }
        }
    }
}

#[test]
fn a_cargo_fuzz_binary_exists_for_every_target() {
    for t in TARGETS {
        let file = fuzz_dir()
            .join("fuzz_targets")
            .join(format!("{}.rs", t.name));
        let text = fs::read_to_string(&file).unwrap_or_default();
        assert!(
            text.contains(&format!("{}::run", t.name)),
            "{} does not call {}::run",
            file.display(),
            t.name
        );
    }
}
