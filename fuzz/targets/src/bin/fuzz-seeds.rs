//! Writes the seed corpora: `fuzz-seeds DIR` puts each target's `seeds()` into
//! `DIR/<target>/<seed name>`, replacing what was there. The committed `fuzz/seeds/` is this
//! program's output (`cargo run -p tailsk8s-fuzz-targets --bin fuzz-seeds -- fuzz/seeds`),
//! and `tests/replay.rs` fails when the two drift apart.

use std::path::PathBuf;
use std::process::ExitCode;

use tailsk8s_fuzz_targets::TARGETS;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz-seeds DIR");
        return ExitCode::from(2);
    };
    for target in TARGETS {
        let out = dir.join(target.name);
        if out.exists() {
            if let Err(e) = std::fs::remove_dir_all(&out) {
                eprintln!("cannot clear {}: {e}", out.display());
                return ExitCode::FAILURE;
            }
        }
        if let Err(e) = std::fs::create_dir_all(&out) {
            eprintln!("cannot create {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        for (name, bytes) in (target.seeds)() {
            let path = out.join(name);
            if let Err(e) = std::fs::write(&path, &bytes) {
                eprintln!("cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        println!("{}: {} seeds", target.name, (target.seeds)().len());
    }
    ExitCode::SUCCESS
}
