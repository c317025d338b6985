//! `tailsk8s demo`: STUB, to be replaced by the demo's author.

use crate::cli::DemoArgs;

/// Runs the demonstration.
pub fn run(_args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("`tailsk8s demo` is not built yet")
}
