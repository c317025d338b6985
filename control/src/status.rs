//! `tailsk8s status [IFNAME] [--json]`: the running router's [`Status`], read over a UNIX
//! socket beside its UAPI socket (`/var/run/wireguard/IFNAME.status`, mode 0600: peers'
//! endpoints are not for every local user). The router writes one JSON document per
//! connection and closes it. The name does not end in `.sock`, so `wg show` does not take it
//! for an interface.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::io::AsyncWriteExt;

use crate::config::DEFAULT_IFNAME;
use crate::observe::{RouterView, Status};

/// `tailsk8s status [--json] [IFNAME]`
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct StatusArgs {
    /// Print the JSON document (see README) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The router's interface.
    #[arg(default_value = DEFAULT_IFNAME)]
    pub ifname: String,
}

/// Runs `tailsk8s status`: asks the router behind the standard socket directory.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    command(
        Path::new(tailsk8s_dataplane::uapi::DEFAULT_SOCKET_DIR),
        &args.ifname,
        args.json,
        &mut std::io::stdout().lock(),
    )
}

/// The status socket of interface `ifname` in the UAPI socket directory `dir`.
pub fn socket_path(dir: &Path, ifname: &str) -> PathBuf {
    dir.join(format!("{ifname}.status"))
}

/// The bound status socket; removes its file when dropped.
pub struct StatusSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl StatusSocket {
    /// Binds the socket (replacing a leftover file: the UAPI socket of the same name is
    /// already ours) and restricts it to root.
    pub fn bind(path: PathBuf) -> anyhow::Result<StatusSocket> {
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("binding the status socket {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("status socket: non-blocking")?;
        Ok(StatusSocket { listener, path })
    }

    /// Answers every connection with the status, until `stop` turns true.
    pub async fn serve(self, view: RouterView, mut stop: tokio::sync::watch::Receiver<bool>) {
        let listener = match self
            .listener
            .try_clone()
            .and_then(tokio::net::UnixListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("status socket: {e}");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.changed() => break,
            };
            let Ok((mut stream, _)) = accepted else {
                continue;
            };
            let view = view.clone();
            tokio::spawn(async move {
                let Ok(status) = tokio::task::spawn_blocking(move || view.status()).await else {
                    return;
                };
                if let Ok(json) = serde_json::to_vec(&status) {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), stream.write_all(&json)).await;
                }
            });
        }
        drop(self);
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the status from a router's socket.
pub fn read(path: &Path) -> anyhow::Result<Status> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is `tailsk8s router` running on this interface?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a status", path.display()))
}

/// `tailsk8s status`: prints the JSON document or a table.
pub fn command(dir: &Path, ifname: &str, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let status = read(&socket_path(dir, ifname))?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &status)?;
        writeln!(out)?;
    } else {
        write_table(&status, SystemTime::now(), out)?;
    }
    Ok(())
}

/// The human table: the device, the source, one line per peer (its drops summed over the
/// reasons; `--json` has them by reason), the device's drops that happened.
pub fn write_table(status: &Status, now: SystemTime, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "interface {}  workers {}  offload {}  key {}",
        status.interface,
        status.workers,
        if status.offload { "on" } else { "off" },
        if status.key_loaded {
            "loaded"
        } else {
            "missing"
        }
    )?;
    match &status.source {
        None => writeln!(out, "source    config file only")?,
        Some(s) => {
            let age = s
                .sync_age_seconds
                .map_or("never".to_string(), |a| format!("{a:.0}s ago"));
            write!(
                out,
                "source    tailscale {}  last sync {age}  errors {}",
                s.state, s.errors
            )?;
            if let Some(why) = &s.reason {
                write!(out, "  ({why})")?;
            }
            writeln!(out)?;
        }
    }
    writeln!(out)?;
    let now_unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let rows: Vec<[String; 9]> = status
        .peers
        .iter()
        .map(|p| {
            [
                if p.node.is_empty() {
                    "-".to_string()
                } else {
                    p.node.clone()
                },
                p.pod_cidrs.join(","),
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                p.path.clone(),
                p.last_handshake.map_or("never".to_string(), |at| {
                    format!("{}s ago", now_unix.saturating_sub(at))
                }),
                p.rx_bytes.to_string(),
                p.tx_bytes.to_string(),
                p.drops
                    .iter()
                    .fold(0u64, |sum, d| sum.saturating_add(d.count))
                    .to_string(),
                p.public_key.clone(),
            ]
        })
        .collect();
    let header = [
        "NODE",
        "POD CIDRS",
        "ENDPOINT",
        "PATH",
        "HANDSHAKE",
        "RX BYTES",
        "TX BYTES",
        "DROPS",
        "PUBLIC KEY",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>, out: &mut dyn Write| -> std::io::Result<()> {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", padded.join("  ").trim_end())
    };
    line(header.to_vec(), out)?;
    for row in &rows {
        line(row.iter().map(String::as_str).collect(), out)?;
    }
    let dropped: Vec<String> = status
        .drops
        .iter()
        .filter(|d| d.count > 0)
        .map(|d| format!("{} {}", d.reason, d.count))
        .collect();
    writeln!(out)?;
    if dropped.is_empty() {
        writeln!(out, "drops     none")
    } else {
        writeln!(out, "drops     {}", dropped.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{DropCount, PeerStatus, SourceStatus};

    fn sample() -> Status {
        Status {
            interface: "tsk0".into(),
            workers: 2,
            offload: false,
            key_loaded: true,
            source: Some(SourceStatus {
                state: "stale".into(),
                reason: Some("connection refused".into()),
                last_sync: Some(990.0),
                sync_age_seconds: Some(10.0),
                errors: 4,
                reconcile_seconds: Some(0.01),
            }),
            peers: vec![PeerStatus {
                public_key: "AAA=".into(),
                node: "node-b".into(),
                pod_cidrs: vec!["198.19.2.0/24".into(), "fd00:19:2::/64".into()],
                endpoint: Some("198.18.0.2:51820".into()),
                path: "tailnet".into(),
                state: "connected".into(),
                last_handshake: Some(995),
                rx_bytes: 10,
                tx_bytes: 20,
                rx_packets: 1,
                tx_packets: 2,
                handshake_attempts: 1,
                drops: vec![
                    DropCount {
                        reason: "not_allowed".into(),
                        count: 2,
                    },
                    DropCount {
                        reason: "too_big".into(),
                        count: 5,
                    },
                ],
            }],
            drops: vec![
                DropCount {
                    reason: "no_route".into(),
                    count: 3,
                },
                DropCount {
                    reason: "replay".into(),
                    count: 0,
                },
            ],
        }
    }

    #[test]
    fn the_table_shows_peers_source_and_drops_and_json_round_trips() {
        let status = sample();
        let mut out = Vec::new();
        write_table(&status, UNIX_EPOCH + Duration::from_secs(1000), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("offload off"), "{text}");
        assert!(
            text.contains("tailscale stale  last sync 10s ago  errors 4  (connection refused)"),
            "{text}"
        );
        let header = text.lines().find(|l| l.starts_with("NODE")).unwrap();
        let row = text.lines().find(|l| l.starts_with("node-b")).unwrap();
        let drops_at = header.find("DROPS").unwrap();
        assert_eq!(
            row[drops_at..].split_whitespace().next(),
            Some("7"),
            "the peer's drops, summed: {text}"
        );
        for cell in [
            "198.19.2.0/24,fd00:19:2::/64",
            "198.18.0.2:51820",
            "tailnet",
            "5s ago",
            "AAA=",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert!(text.ends_with("drops     no_route 3\n"), "{text}");
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status);
    }

    #[test]
    fn drop_counts_past_u64_saturate_instead_of_overflowing() {
        // A status socket is only the router's, but what it says is still read, not trusted.
        let mut status = sample();
        status.peers[0].drops[0].count = u64::MAX;
        let mut out = Vec::new();
        write_table(&status, UNIX_EPOCH + Duration::from_secs(1000), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let row = text.lines().find(|l| l.starts_with("node-b")).unwrap();
        assert!(row.contains(&u64::MAX.to_string()), "{row}");
    }
}
