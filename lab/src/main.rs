//! `tailsk8s-lab up`: builds a lab topology — nodes with a pod bridge and pods, an underlay —
//! and keeps it until SIGINT, SIGTERM or SIGHUP, for scripts that run their own data planes
//! on it (benches/iperf3 compares tailsk8s with plain routing and wireguard-go there).
//!
//! Once everything exists it prints shell assignments naming the namespaces, then
//! `READY=1`; after the signal it removes everything and exits 0.

use std::io::Write;

use anyhow::Context;
use tailsk8s_lab::TopologyBuilder;

const USAGE: &str = "usage: tailsk8s-lab up [--nodes N] [--pods N] [--pod-mtu MTU]

Builds N nodes (default 2), each with a pod bridge cnio0 and N pods (default 2, pod MTU
default 1500), joined by an underlay, and keeps them until SIGINT, SIGTERM or SIGHUP. Prints
NODE<i>=<namespace> and NODE<i>_POD<j>=<namespace> lines, then READY=1. Needs root.";

fn main() {
    if let Err(e) = run() {
        eprintln!("tailsk8s-lab: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, flags)) = args.split_first() else {
        anyhow::bail!("{USAGE}");
    };
    if command != "up" {
        anyhow::bail!("unknown command {command:?}\n{USAGE}");
    }
    let builder = parse_up(flags)?;
    // Blocked before anything exists, so a signal during the build waits for the guards
    // below instead of killing the process with namespaces left behind.
    let signals = block_signals()?;
    let topology = builder.build().context("building the topology")?;
    let mut out = String::new();
    for node in topology.nodes() {
        let i = node.index();
        out.push_str(&format!("NODE{i}={}\n", node.netns().name()));
        for (j, pod) in node.pods().iter().enumerate() {
            out.push_str(&format!("NODE{i}_POD{j}={}\n", pod.netns().name()));
        }
    }
    out.push_str("READY=1\n");
    let mut stdout = std::io::stdout();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    wait_for(&signals)?;
    drop(topology);
    Ok(())
}

fn parse_up(flags: &[String]) -> anyhow::Result<TopologyBuilder> {
    let (mut nodes, mut pods, mut pod_mtu) = (2u8, 2u8, None);
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        let value = flags
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("bad value {value:?} for {flag}");
        match flag.as_str() {
            "--nodes" => nodes = value.parse().with_context(bad)?,
            "--pods" => pods = value.parse().with_context(bad)?,
            "--pod-mtu" => pod_mtu = Some(value.parse::<u32>().with_context(bad)?),
            _ => anyhow::bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    let builder = TopologyBuilder::new(nodes).pods_per_node(pods);
    Ok(match pod_mtu {
        Some(mtu) => builder.pod_mtu(mtu),
        None => builder,
    })
}

/// Blocks SIGINT, SIGTERM and SIGHUP for this thread (and the threads it starts), so that
/// [`wait_for`] receives them.
fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("blocking signals");
        }
        Ok(set)
    }
}

/// Waits until one of the blocked signals arrives.
fn wait_for(signals: &libc::sigset_t) -> anyhow::Result<()> {
    let mut signal = 0;
    // SAFETY: both pointers are valid for the call.
    let rc = unsafe { libc::sigwait(signals, &mut signal) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("waiting for a signal");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flags_are_parsed_and_bad_ones_refused() {
        assert!(parse_up(&strings(&[
            "--nodes",
            "3",
            "--pods",
            "1",
            "--pod-mtu",
            "1420"
        ]))
        .is_ok());
        assert!(parse_up(&strings(&["--nodes"])).is_err());
        assert!(parse_up(&strings(&["--nodes", "x"])).is_err());
        assert!(parse_up(&strings(&["--colour", "1"])).is_err());
    }
}
