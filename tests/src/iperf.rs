//! iperf3 between two pods: a one-shot server, and a client run read back as the
//! receiver's throughput. For measurements only: the tests never assert on throughput.

use std::time::Duration;

use anyhow::Context;

use crate::process::Daemon;
use crate::topology::Pod;
use crate::wait;

/// The port the server listens on.
pub const PORT: u16 = 5201;

/// Starts `iperf3 -s -1` (one test, then exit) in `to` and waits until it listens.
pub fn server(to: &Pod) -> anyhow::Result<Daemon> {
    let mut server = to
        .netns()
        .spawn("iperf3", &["-s", "-1", "-p", &PORT.to_string()])?;
    wait::until("iperf3 listens", Duration::from_secs(10), || {
        if let Some(status) = server.exited()? {
            anyhow::bail!("iperf3 -s exited: {status}\n{}", server.log());
        }
        Ok(to.netns().tcp_listening(PORT)?.then_some(()))
    })?;
    Ok(server)
}

/// The client's arguments for one TCP stream of `seconds` to `to`, in Mbit/s.
pub fn client_args(to: &Pod, seconds: u64) -> Vec<String> {
    [
        "-c",
        &to.ipv4().to_string(),
        "-p",
        &PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-f",
        "m",
    ]
    .map(str::to_string)
    .to_vec()
}

/// The receiver's Mbit/s of a run of `seconds` with `streams` parallel TCP streams.
pub fn mbit_parallel(from: &Pod, to: &Pod, seconds: u64, streams: u32) -> anyhow::Result<f64> {
    let _server = server(to)?;
    let mut args = client_args(to, seconds);
    args.extend(["-P".to_string(), streams.to_string()]);
    let out = from.netns().output("iperf3", &args)?;
    // With several streams the total is the `[SUM]` receiver line, which comes last.
    out.lines()
        .rfind(|l| l.trim_end().ends_with("receiver"))
        .and_then(receiver_mbit)
        .with_context(|| format!("no receiver line in:\n{out}"))
}

/// The receiver's Mbit/s of a single-stream run of `seconds` from `from` to `to`.
pub fn mbit(from: &Pod, to: &Pod, seconds: u64) -> anyhow::Result<f64> {
    let _server = server(to)?;
    let out = from.netns().output("iperf3", &client_args(to, seconds))?;
    receiver_mbit(&out).with_context(|| format!("no receiver line in:\n{out}"))
}

/// The `Mbits/sec` figure of iperf3's `receiver` summary line.
pub fn receiver_mbit(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_end().ends_with("receiver"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let unit = fields.iter().position(|f| *f == "Mbits/sec")?;
    fields.get(unit.checked_sub(1)?)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receiver_line_is_read() {
        let out = "[  5]   0.00-5.00   sec  1.10 GBytes  1890 Mbits/sec  12             sender\n\
                   [  5]   0.00-5.00   sec  1.10 GBytes  1885 Mbits/sec                  receiver\n";
        assert_eq!(receiver_mbit(out), Some(1885.0));
        assert_eq!(receiver_mbit("no summary"), None);
        assert_eq!(receiver_mbit("Mbits/sec receiver"), None);
    }
}
