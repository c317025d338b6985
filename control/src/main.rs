//! The `tailsk8s` binary: parse the command line, set up logging, run, and show any error as
//! one line on stderr with exit status 1. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tailsk8s::cli::{self, Cli};
use tailsk8s::logging;

fn main() -> ExitCode {
    if tailsk8s::userspace::invoked_as_userspace_implementation() {
        return tailsk8s::userspace::main();
    }
    let cli = Cli::parse();
    let result =
        logging::init(cli.log_level.as_deref(), cli.log_format).and_then(|()| cli::run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tailsk8s: error: {}", logging::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
