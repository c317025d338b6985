//! The client side of UAPI `get`: what the demo (and later `tailsk8s status`) uses to read a
//! running device the way `wg show` does, from any implementation that serves the socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::config::{DeviceSnapshot, PeerSnapshot};
use crate::key::Key;

/// How long a get may take before the client gives up.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply line accepted (an allowed IP or a key is far shorter).
const MAX_LINE: usize = 4096;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("talking to {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the device answered errno={0}")]
    Errno(i32),
    #[error("bad reply line {line}: {reason}")]
    BadReply { line: usize, reason: String },
}

/// Reads the whole device over the UAPI socket at `path`.
pub fn get(path: &Path) -> Result<DeviceSnapshot, ClientError> {
    let io = |source| ClientError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.write_all(b"get=1\n\n").map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = Read::by_ref(&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .map_err(io)?;
        if n == 0 || line == "\n" {
            break;
        }
        lines.push(line.trim_end_matches('\n').to_string());
    }
    parse_get_reply(lines.iter().map(String::as_str))
}

/// Parses the `key=value` lines of a get reply (without the closing blank line).
pub fn parse_get_reply<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Result<DeviceSnapshot, ClientError> {
    let mut device = DeviceSnapshot::default();
    let mut errno = None;
    let mut handshake_sec = 0u64;
    for (index, line) in lines.into_iter().enumerate() {
        let number = index + 1;
        let bad = |reason: &str| ClientError::BadReply {
            line: number,
            reason: reason.to_string(),
        };
        let (key, value) = line.split_once('=').ok_or_else(|| bad("no '='"))?;
        let number_of = |v: &str| v.parse::<u64>().map_err(|_| bad("not a number"));
        let key_of = |v: &str| Key::from_hex(v).map_err(|e| bad(&e.to_string()));
        if key == "public_key" {
            device.peers.push(PeerSnapshot::new(key_of(value)?));
            continue;
        }
        match (key, device.peers.last_mut()) {
            ("errno", _) => {
                errno = Some(value.parse::<i32>().map_err(|_| bad("bad errno"))?);
            }
            ("private_key", None) => device.private_key = Some(key_of(value)?),
            ("listen_port", None) => {
                device.listen_port = u16::try_from(number_of(value)?).map_err(|_| bad("port"))?
            }
            ("fwmark", None) => {
                device.fwmark = u32::try_from(number_of(value)?).map_err(|_| bad("fwmark"))?
            }
            ("preshared_key", Some(peer)) => {
                let psk = key_of(value)?;
                peer.preshared_key = (!psk.is_zero()).then_some(psk);
            }
            ("endpoint", Some(peer)) => {
                peer.endpoint = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|_| bad("bad endpoint"))?,
                )
            }
            ("last_handshake_time_sec", Some(_)) => handshake_sec = number_of(value)?,
            ("last_handshake_time_nsec", Some(peer)) => {
                let nsec = number_of(value)?;
                peer.last_handshake = if handshake_sec == 0 && nsec == 0 {
                    None
                } else {
                    // A time the clock cannot hold is a bad reply, not a panic.
                    Some(
                        UNIX_EPOCH
                            .checked_add(Duration::from_secs(handshake_sec))
                            .and_then(|t| t.checked_add(Duration::from_nanos(nsec)))
                            .ok_or_else(|| bad("handshake time out of range"))?,
                    )
                };
            }
            ("tx_bytes", Some(peer)) => peer.tx_bytes = number_of(value)?,
            ("rx_bytes", Some(peer)) => peer.rx_bytes = number_of(value)?,
            ("persistent_keepalive_interval", Some(peer)) => {
                peer.persistent_keepalive =
                    u16::try_from(number_of(value)?).map_err(|_| bad("keepalive"))?
            }
            ("allowed_ip", Some(peer)) => peer
                .allowed_ips
                .push(value.parse().map_err(|_| bad("bad allowed_ip"))?),
            // Unknown keys are ignored, as `wg` does.
            _ => {}
        }
    }
    match errno {
        Some(0) => Ok(device),
        Some(n) => Err(ClientError::Errno(n)),
        None => Err(ClientError::BadReply {
            line: 0,
            reason: "no errno line".into(),
        }),
    }
}

/// "1 minute, 5 seconds ago", as `wg show` words it.
pub fn ago(when: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(when).unwrap_or_default().as_secs();
    let units = [
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ];
    let mut left = secs;
    let mut parts = Vec::new();
    for (name, size) in units {
        let n = left / size;
        left %= size;
        if n > 0 {
            parts.push(format!("{n} {name}{}", if n == 1 { "" } else { "s" }));
        }
    }
    if parts.is_empty() {
        "now".to_string()
    } else {
        format!("{} ago", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::format_get;

    #[test]
    fn a_formatted_snapshot_parses_back() {
        let snapshot = DeviceSnapshot {
            private_key: Some(Key::generate_private()),
            listen_port: 51820,
            fwmark: 7,
            peers: vec![PeerSnapshot {
                public_key: Key::generate_private().public_key(),
                preshared_key: None,
                endpoint: Some("[fd00:18::2]:51820".parse().unwrap()),
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 1372,
                tx_bytes: 1428,
                rx_packets: 0,
                tx_packets: 0,
                handshake_initiations: 0,
                drops: Default::default(),
                persistent_keepalive: 25,
                allowed_ips: vec!["198.19.2.0/24".parse().unwrap()],
            }],
        };
        let mut text = String::new();
        format_get(&snapshot, &mut text);
        let parsed = parse_get_reply(text.lines().filter(|l| !l.is_empty())).unwrap();
        assert_eq!(parsed, snapshot);
    }

    #[test]
    fn errors_and_garbage_are_reported() {
        assert!(matches!(
            parse_get_reply(["errno=-22"]),
            Err(ClientError::Errno(-22))
        ));
        assert!(parse_get_reply(["listen_port=x", "errno=0"]).is_err());
        assert!(parse_get_reply(["nonsense"]).is_err());
        assert!(parse_get_reply(["listen_port=1"]).is_err(), "no errno");
    }

    #[test]
    fn a_handshake_time_past_the_clock_is_a_bad_reply() {
        let peer = format!(
            "public_key={}",
            Key::generate_private().public_key().to_hex()
        );
        for (sec, nsec) in [(u64::MAX, 0), (i64::MAX as u64, u64::MAX)] {
            let sec = format!("last_handshake_time_sec={sec}");
            let nsec = format!("last_handshake_time_nsec={nsec}");
            let reply = [peer.as_str(), sec.as_str(), nsec.as_str(), "errno=0"];
            assert!(
                matches!(
                    parse_get_reply(reply),
                    Err(ClientError::BadReply { line: 3, .. })
                ),
                "{sec} {nsec}"
            );
        }
    }

    #[test]
    fn ago_reads_like_wg() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(
            ago(now - Duration::from_secs(65), now),
            "1 minute, 5 seconds ago"
        );
        assert_eq!(ago(now, now), "now");
    }
}
