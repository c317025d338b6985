//! A router's `/metrics` read from inside its node's namespace (with `curl`, as a scraper
//! would), and the drop counters by reason taken out of it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;

use crate::netns::Netns;

/// The text of `GET /metrics` on `listen`, from inside `ns`; an error unless it is 200.
pub fn metrics(ns: &Netns, listen: SocketAddr) -> anyhow::Result<String> {
    let url = format!("http://{listen}/metrics");
    ns.output("curl", &["-sf", "--max-time", "5", &url])
        .with_context(|| format!("GET {url}"))
}

/// Every `tailsk8s_drops_total{reason="…"}` sample of a `/metrics` text, by reason.
pub fn drops_by_reason(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| line.strip_prefix("tailsk8s_drops_total{reason=\""))
        .filter_map(|rest| {
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// `after − before` per reason, only the reasons that grew.
pub fn grown(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(reason, n)| {
            let grew = n.saturating_sub(before.get(reason).copied().unwrap_or(0));
            (grew > 0).then(|| (reason.clone(), grew))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_read_by_reason_and_differenced() {
        let text = "# HELP tailsk8s_drops Packets dropped\n\
                    tailsk8s_drops_total{reason=\"replay\"} 3\n\
                    tailsk8s_drops_total{reason=\"replay_too_old\"} 0\n\
                    tailsk8s_peer_receive_bytes_total{public_key=\"k\"} 9\n";
        let before = drops_by_reason(text);
        assert_eq!(before.len(), 2);
        assert_eq!(before["replay"], 3);
        let after = drops_by_reason(&text.replace("} 0", "} 5"));
        assert_eq!(
            grown(&before, &after),
            BTreeMap::from([("replay_too_old".to_string(), 5)])
        );
    }
}
