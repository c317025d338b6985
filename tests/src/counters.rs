//! Counters read from outside a router: its process (RSS, open files, CPU time), a
//! namespace's network statistics (`/proc/net/snmp` and `netstat`, UDP sockets), and an
//! interface's packet counters. The router does not export its own drop counters yet, so
//! these are how the reliability tests see drops and leaks.

use std::fs;
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;
use crate::topology::Topology;
use crate::ConfigMesh;

/// A `/proc/PID/status` field in kB (e.g. `VmRSS`).
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in {path}"))
}

/// How many file descriptors the process has open.
pub fn fd_count(pid: u32) -> anyhow::Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&path)
        .with_context(|| format!("reading {path}"))?
        .count())
}

/// User + system CPU time of a process, all its threads together.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces: fields are counted after its closing parenthesis,
    // from field 3 (state); utime and stime are fields 14 and 15.
    let after = stat
        .rsplit_once(") ")
        .with_context(|| format!("malformed {path}"))?
        .1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> anyhow::Result<u64> {
        let field = fields.get(i).with_context(|| format!("short {path}"))?;
        Ok(field.parse()?)
    };
    let ticks = tick(11)? + tick(12)?;
    // SAFETY: sysconf has no memory preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / per_second))
}

/// The text of `/proc/net/FILE` as the namespace `ns` sees it.
fn proc_net(ns: &Netns, file: &str) -> anyhow::Result<String> {
    // /proc/thread-self: the entering thread's namespace (/proc/self/net is the process's).
    ns.enter(|| fs::read_to_string(format!("/proc/thread-self/net/{file}")))?
        .with_context(|| format!("reading /proc/net/{file} in {}", ns.name()))
}

/// A counter of `/proc/net/FILE` in `ns` (`snmp` or `netstat`: per group a line of names
/// and a line of values), e.g. `("snmp", "Tcp", "RetransSegs")`.
pub fn proc_net_counter(ns: &Netns, file: &str, group: &str, name: &str) -> anyhow::Result<u64> {
    let text = proc_net(ns, file)?;
    counter_in(&text, group, name).with_context(|| format!("no {group} {name} in /proc/net/{file}"))
}

fn counter_in(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (rows.next()?, rows.next()?);
    let index = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// A counter of `/proc/net/snmp` in `ns` (e.g. `Tcp`, `RetransSegs`).
pub fn snmp(ns: &Netns, group: &str, name: &str) -> anyhow::Result<u64> {
    proc_net_counter(ns, "snmp", group, name)
}

/// The UDP sockets (IPv4 and IPv6) bound to `port` in `ns`: bytes waiting in their receive
/// queues, and datagrams they dropped.
pub fn udp_sockets_on(ns: &Netns, port: u16) -> anyhow::Result<(u64, u64)> {
    let port = format!(":{port:04X}");
    let (mut waiting, mut drops) = (0, 0);
    for table in ["udp", "udp6"] {
        let text = proc_net(ns, table)?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(1).is_some_and(|local| local.ends_with(&port)) {
                continue;
            }
            let parsed = (|| {
                let rx_queue = fields.get(4)?.split(':').nth(1)?;
                let dropped = fields.last()?.parse::<u64>().ok()?;
                Some((u64::from_str_radix(rx_queue, 16).ok()?, dropped))
            })();
            let (queued, dropped) =
                parsed.with_context(|| format!("malformed /proc/net/{table} line: {line}"))?;
            waiting += queued;
            drops += dropped;
        }
    }
    Ok((waiting, drops))
}

/// A counter of `ip -s link show dev IFNAME` in `ns`: `direction` "RX:" or "TX:", `column`
/// 1 for packets, 3 for dropped.
pub fn link_counter(
    ns: &Netns,
    ifname: &str,
    direction: &str,
    column: usize,
) -> anyhow::Result<u64> {
    let text = ns.ip(&["-s", "link", "show", "dev", ifname])?;
    let mut lines = text.lines();
    lines.find(|l| l.trim_start().starts_with(direction));
    lines
        .next()
        .and_then(|counters| counters.split_whitespace().nth(column)?.parse().ok())
        .with_context(|| format!("no {direction} column {column} in:\n{text}"))
}

/// Packets a router has written to its TUN `ifname` (the interface's RX counter).
pub fn tun_rx_packets(ns: &Netns, ifname: &str) -> anyhow::Result<u64> {
    link_counter(ns, ifname, "RX:", 1)
}

/// What TCP saw of traffic from `sender` to `receiver` (namespace totals): retransmissions,
/// how many of them the receiver reported as duplicates (D-SACK: spurious, the original had
/// only been reordered), and segments the receiver queued out of order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpView {
    pub retransmitted: u64,
    pub spurious: u64,
    pub out_of_order: u64,
}

impl TcpView {
    pub fn read(sender: &Netns, receiver: &Netns) -> anyhow::Result<TcpView> {
        Ok(TcpView {
            retransmitted: snmp(sender, "Tcp", "RetransSegs")?,
            spurious: proc_net_counter(sender, "netstat", "TcpExt", "TCPDSACKRecv")?,
            out_of_order: proc_net_counter(receiver, "netstat", "TcpExt", "TCPOFOQueue")?,
        })
    }

    /// What grew since `before`.
    pub fn since(self, before: TcpView) -> TcpView {
        TcpView {
            retransmitted: self.retransmitted.saturating_sub(before.retransmitted),
            spurious: self.spurious.saturating_sub(before.spurious),
            out_of_order: self.out_of_order.saturating_sub(before.out_of_order),
        }
    }
}

/// Drops the kernel counts around the routers of a mesh, summed over its nodes: UDP
/// datagrams lost to full socket buffers, and packets for the TUN lost to a full queue.
/// With no underlay loss, TCP retransmissions beyond these were dropped inside a router
/// (replay window, its own queues), which it counts by reason on `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDrops {
    pub udp_rcvbuf_errors: u64,
    pub tun_tx_dropped: u64,
}

impl KernelDrops {
    pub fn read(topology: &Topology, mesh: &ConfigMesh<'_>) -> anyhow::Result<KernelDrops> {
        let mut drops = KernelDrops::default();
        for (node, router) in topology.nodes().iter().zip(mesh.routers()) {
            drops.udp_rcvbuf_errors += snmp(node.netns(), "Udp", "RcvbufErrors")?;
            drops.tun_tx_dropped += link_counter(node.netns(), router.ifname(), "TX:", 3)?;
        }
        Ok(drops)
    }

    /// What grew since `before`.
    pub fn since(self, before: KernelDrops) -> KernelDrops {
        KernelDrops {
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(before.udp_rcvbuf_errors),
            tun_tx_dropped: self.tun_tx_dropped.saturating_sub(before.tun_tx_dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_found_by_group_and_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RetransSegs InErrs\nTcp: 1 42 0\n\
                    Udp: InDatagrams RcvbufErrors\nUdp: 7 3\n";
        assert_eq!(counter_in(text, "Tcp", "RetransSegs"), Some(42));
        assert_eq!(counter_in(text, "Udp", "RcvbufErrors"), Some(3));
        assert_eq!(counter_in(text, "Tcp", "Missing"), None);
        assert_eq!(counter_in(text, "TcpExt", "RetransSegs"), None);
    }
}
