//! Parsing `wg show IFNAME dump`: what `wg` reads back from a device over UAPI, as structs.
//!
//! Format (tab-separated, wireguard-tools): a first line for the interface — private key,
//! public key, listen port, fwmark (`0x…` or `off`) — then one line per peer — public key,
//! preshared key, endpoint, allowed IPs (comma-separated), latest handshake (Unix seconds,
//! `0` = never), rx bytes, tx bytes, persistent keepalive (seconds or `off`). A missing
//! value prints as `(none)`. The text comes from another program, so every field is
//! checked and a malformed line is an error, never a panic.

use std::net::SocketAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// A malformed `wg show dump` text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    #[error("empty dump")]
    Empty,
    #[error("line {line}: expected {expected} tab-separated fields, found {found}")]
    FieldCount {
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error("line {line}: bad {field} {value:?}")]
    BadField {
        line: usize,
        field: &'static str,
        value: String,
    },
}

/// Everything `wg show IFNAME dump` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDump {
    pub interface: InterfaceDump,
    pub peers: Vec<PeerDump>,
}

/// The interface line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDump {
    /// Base64, `None` when unset.
    pub private_key: Option<String>,
    /// Base64, `None` when no private key is set.
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
}

/// One peer line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDump {
    /// Base64.
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds of the last completed handshake; `None` = never.
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

impl WgDump {
    /// The peer with this base64 public key.
    pub fn peer(&self, public_key: &str) -> Option<&PeerDump> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

impl FromStr for WgDump {
    type Err = DumpError;

    fn from_str(text: &str) -> Result<WgDump, DumpError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, first) = lines.next().ok_or(DumpError::Empty)?;
        let interface = parse_interface(&Fields::new(1, first, 4)?)?;
        let peers = lines
            .map(|(i, line)| parse_peer(&Fields::new(i + 1, line, 8)?))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WgDump { interface, peers })
    }
}

/// The fields of one line, with its number for error messages.
struct Fields<'a> {
    line: usize,
    values: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    fn new(line: usize, text: &'a str, expected: usize) -> Result<Fields<'a>, DumpError> {
        let values: Vec<&str> = text.split('\t').collect();
        if values.len() != expected {
            return Err(DumpError::FieldCount {
                line,
                expected,
                found: values.len(),
            });
        }
        Ok(Fields { line, values })
    }

    fn raw(&self, index: usize) -> &'a str {
        self.values[index]
    }

    /// `None` for `(none)` (and for `off` where that is allowed), else the parsed value.
    fn optional<T: FromStr>(
        &self,
        index: usize,
        field: &'static str,
    ) -> Result<Option<T>, DumpError> {
        match self.values[index] {
            "(none)" | "off" => Ok(None),
            value => self.parse(field, value).map(Some),
        }
    }

    fn required<T: FromStr>(&self, index: usize, field: &'static str) -> Result<T, DumpError> {
        self.parse(field, self.values[index])
    }

    fn parse<T: FromStr>(&self, field: &'static str, value: &str) -> Result<T, DumpError> {
        value.parse().map_err(|_| self.bad(field, value))
    }

    fn bad(&self, field: &'static str, value: &str) -> DumpError {
        DumpError::BadField {
            line: self.line,
            field,
            value: value.to_string(),
        }
    }

    fn key(&self, index: usize, field: &'static str) -> Result<Option<String>, DumpError> {
        match self.values[index] {
            "(none)" => Ok(None),
            value if is_base64_key(value) => Ok(Some(value.to_string())),
            value => Err(self.bad(field, value)),
        }
    }
}

/// 32 bytes in standard base64: 43 characters and one `=`.
fn is_base64_key(value: &str) -> bool {
    value.len() == 44
        && value.ends_with('=')
        && value[..43]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn parse_interface(f: &Fields) -> Result<InterfaceDump, DumpError> {
    let fwmark = match f.raw(3) {
        "off" => None,
        value => {
            let hex = value
                .strip_prefix("0x")
                .ok_or_else(|| f.bad("fwmark", value))?;
            Some(u32::from_str_radix(hex, 16).map_err(|_| f.bad("fwmark", value))?)
        }
    };
    Ok(InterfaceDump {
        private_key: f.key(0, "private key")?,
        public_key: f.key(1, "public key")?,
        listen_port: f.required(2, "listen port")?,
        fwmark,
    })
}

fn parse_peer(f: &Fields) -> Result<PeerDump, DumpError> {
    let public_key = f
        .key(0, "public key")?
        .ok_or_else(|| f.bad("public key", f.raw(0)))?;
    let allowed_ips = match f.raw(3) {
        "(none)" => Vec::new(),
        list => list
            .split(',')
            .map(|net| f.parse("allowed IP", net))
            .collect::<Result<_, _>>()?,
    };
    let latest_handshake: u64 = f.required(4, "latest handshake")?;
    Ok(PeerDump {
        public_key,
        preshared_key: f.key(1, "preshared key")?,
        endpoint: f.optional(2, "endpoint")?,
        allowed_ips,
        latest_handshake: (latest_handshake != 0).then_some(latest_handshake),
        rx_bytes: f.required(5, "rx bytes")?,
        tx_bytes: f.required(6, "tx bytes")?,
        persistent_keepalive: f.optional(7, "persistent keepalive")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    const PEER: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PEER2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn sample() -> String {
        format!(
            "{PRIV}\t{PUB}\t51820\toff\n\
             {PEER}\t(none)\t198.18.0.2:51820\t198.19.2.0/24,fd00:19:2::/64\t1700000000\t1372\t1428\toff\n\
             {PEER2}\t(none)\t[fd00:18::3]:51821\t(none)\t0\t0\t0\t25\n"
        )
    }

    #[test]
    fn parses_interface_and_peers() {
        let dump: WgDump = sample().parse().unwrap();
        assert_eq!(dump.interface.private_key.as_deref(), Some(PRIV));
        assert_eq!(dump.interface.public_key.as_deref(), Some(PUB));
        assert_eq!(dump.interface.listen_port, 51820);
        assert_eq!(dump.interface.fwmark, None);
        assert_eq!(dump.peers.len(), 2);

        let p = dump.peer(PEER).unwrap();
        assert_eq!(p.endpoint, Some("198.18.0.2:51820".parse().unwrap()));
        assert_eq!(
            p.allowed_ips,
            vec![
                "198.19.2.0/24".parse::<IpNet>().unwrap(),
                "fd00:19:2::/64".parse().unwrap()
            ]
        );
        assert_eq!(p.latest_handshake, Some(1_700_000_000));
        assert_eq!((p.rx_bytes, p.tx_bytes), (1372, 1428));
        assert_eq!(p.persistent_keepalive, None);
        assert_eq!(p.preshared_key, None);

        let q = dump.peer(PEER2).unwrap();
        assert_eq!(q.endpoint, Some("[fd00:18::3]:51821".parse().unwrap()));
        assert!(q.allowed_ips.is_empty());
        assert_eq!(q.latest_handshake, None);
        assert_eq!(q.persistent_keepalive, Some(25));
    }

    #[test]
    fn parses_a_bare_interface_with_fwmark_and_no_key() {
        let dump: WgDump = "(none)\t(none)\t0\t0x2a\n".parse().unwrap();
        assert_eq!(dump.interface.private_key, None);
        assert_eq!(dump.interface.public_key, None);
        assert_eq!(dump.interface.listen_port, 0);
        assert_eq!(dump.interface.fwmark, Some(42));
        assert!(dump.peers.is_empty());
    }

    #[test]
    fn rejects_malformed_text() {
        assert_eq!("".parse::<WgDump>(), Err(DumpError::Empty));
        assert!(matches!(
            format!("{PRIV}\t{PUB}\t51820\n").parse::<WgDump>(),
            Err(DumpError::FieldCount {
                line: 1,
                expected: 4,
                found: 3
            })
        ));
        let bad_port = format!("{PRIV}\t{PUB}\t70000\toff\n");
        assert!(matches!(
            bad_port.parse::<WgDump>(),
            Err(DumpError::BadField {
                field: "listen port",
                ..
            })
        ));
        let bad_key = format!("{PRIV}\tnot-a-key\t1\toff\n");
        assert!(matches!(
            bad_key.parse::<WgDump>(),
            Err(DumpError::BadField {
                field: "public key",
                ..
            })
        ));
        let bad_fwmark = format!("{PRIV}\t{PUB}\t1\t42\n");
        assert!(matches!(
            bad_fwmark.parse::<WgDump>(),
            Err(DumpError::BadField {
                field: "fwmark",
                ..
            })
        ));
    }

    #[test]
    fn rejects_malformed_peer_fields_naming_line_and_field() {
        let head = format!("{PRIV}\t{PUB}\t1\toff\n");
        let cases = [
            (
                "(none)\t(none)\t(none)\t(none)\t0\t0\t0\toff".to_string(),
                "public key",
            ),
            (
                format!("{PEER}\t(none)\tnowhere\t(none)\t0\t0\t0\toff"),
                "endpoint",
            ),
            (
                format!("{PEER}\t(none)\t(none)\t198.19.2.0/33\t0\t0\t0\toff"),
                "allowed IP",
            ),
            (
                format!("{PEER}\t(none)\t(none)\t(none)\t-1\t0\t0\toff"),
                "latest handshake",
            ),
            (
                format!("{PEER}\t(none)\t(none)\t(none)\t0\tx\t0\toff"),
                "rx bytes",
            ),
            (
                format!("{PEER}\t(none)\t(none)\t(none)\t0\t0\t0\t99999"),
                "persistent keepalive",
            ),
        ];
        for (line, field) in cases {
            let err = format!("{head}{line}\n").parse::<WgDump>().unwrap_err();
            assert!(
                matches!(&err, DumpError::BadField { line: 2, field: f, .. } if *f == field),
                "{line}: {err}"
            );
        }
    }
}
