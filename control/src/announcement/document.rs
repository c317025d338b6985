//! The announcement document: what a router says about itself, as JSON, versioned and
//! tolerant, and what a fetching router accepts of it.
//!
//! ```json
//! {"version":1,"public_key":"<base64>","listen_port":51820,
//!  "endpoints":["198.18.0.1:51820","[fd00:18::1]:51820"],
//!  "pod_cidrs":["198.19.1.0/24","fd00:19:1::/64"]}
//! ```
//! Compatibility: readers ignore unknown fields, and newer versions only add fields, so any
//! `version` ≥ 1 is read. A list entry this version cannot parse (a future kind of endpoint)
//! is skipped and counted rather than refusing the peer; a missing or bad key, a low-order key
//! or port 0 refuse the document.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tailsk8s_dataplane::key::Key;
use thiserror::Error;

/// The version this router writes.
pub const ANNOUNCEMENT_VERSION: u32 = 1;
/// Where the announcement is served.
pub const ANNOUNCEMENT_PATH: &str = "/tailsk8s/v1/announcement";
/// A document larger than this is not an announcement.
pub const MAX_DOCUMENT_LEN: usize = 64 << 10;
/// Entries kept from each list; more are ignored (a router has a few endpoints, a few CIDRs).
pub const MAX_ENTRIES: usize = 64;

/// A router's announcement, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub public_key: Key,
    pub listen_port: u16,
    /// Direct (underlay) endpoints, in the announcer's order of preference.
    pub endpoints: Vec<SocketAddr>,
    /// The pod CIDRs the announcer claims (normalised); Tailscale decides what it may carry.
    pub pod_cidrs: Vec<IpNet>,
}

/// Why a fetched document was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnnouncementError {
    #[error("announcement is not JSON of the expected shape: {0}")]
    Json(String),
    #[error("announcement is larger than {MAX_DOCUMENT_LEN} bytes")]
    TooLarge,
    #[error("announcement has no version (not an announcement)")]
    NoVersion,
    #[error("announcement has no public_key")]
    NoKey,
    #[error("announcement public_key is not a base64 WireGuard key")]
    BadKey,
    #[error("announcement public_key is a low-order point")]
    LowOrderKey,
    #[error("announcement listen_port is 0")]
    PortZero,
}

/// The document as written: every field optional, unknown fields ignored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Wire {
    #[serde(default)]
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(default)]
    listen_port: u16,
    #[serde(default)]
    endpoints: Vec<serde_json::Value>,
    #[serde(default)]
    pod_cidrs: Vec<serde_json::Value>,
}

impl Announcement {
    /// The JSON document this router serves.
    pub fn to_json(&self) -> String {
        let wire = Wire {
            version: ANNOUNCEMENT_VERSION,
            public_key: Some(self.public_key.to_base64()),
            listen_port: self.listen_port,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| e.to_string().into())
                .collect(),
            pod_cidrs: self
                .pod_cidrs
                .iter()
                .map(|p| p.to_string().into())
                .collect(),
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Reads a fetched document. Returns the announcement and how many list entries were
    /// skipped as unreadable.
    pub fn parse(bytes: &[u8]) -> Result<(Announcement, usize), AnnouncementError> {
        if bytes.len() > MAX_DOCUMENT_LEN {
            return Err(AnnouncementError::TooLarge);
        }
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| AnnouncementError::Json(e.to_string()))?;
        if wire.version == 0 {
            return Err(AnnouncementError::NoVersion);
        }
        let key = wire.public_key.ok_or(AnnouncementError::NoKey)?;
        let public_key = Key::from_base64(&key).map_err(|_| AnnouncementError::BadKey)?;
        if public_key.is_low_order_public() {
            return Err(AnnouncementError::LowOrderKey);
        }
        if wire.listen_port == 0 {
            return Err(AnnouncementError::PortZero);
        }
        let mut skipped = 0;
        let mut endpoints = Vec::new();
        for value in wire.endpoints.iter().take(MAX_ENTRIES) {
            match value.as_str().and_then(|s| s.parse::<SocketAddr>().ok()) {
                Some(e) if e.port() != 0 && !endpoints.contains(&e) => endpoints.push(e),
                _ => skipped += 1,
            }
        }
        let mut pod_cidrs = Vec::new();
        for value in wire.pod_cidrs.iter().take(MAX_ENTRIES) {
            match value.as_str().and_then(|s| s.parse::<IpNet>().ok()) {
                Some(p) if !pod_cidrs.contains(&p.trunc()) => pod_cidrs.push(p.trunc()),
                _ => skipped += 1,
            }
        }
        skipped += wire.endpoints.len().saturating_sub(MAX_ENTRIES);
        skipped += wire.pod_cidrs.len().saturating_sub(MAX_ENTRIES);
        Ok((
            Announcement {
                public_key,
                listen_port: wire.listen_port,
                endpoints,
                pod_cidrs,
            },
            skipped,
        ))
    }
}

/// What a router accepts of a peer's announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub public_key: Key,
    pub endpoints: Vec<SocketAddr>,
    /// The announced pod CIDRs cut down to the approved ones.
    pub pod_cidrs: Vec<IpNet>,
}

/// Accepts `announcement`, fetched from the peer's own tailnet address, with its pod CIDRs
/// limited to `approved` (the peer's primary routes inside the cluster CIDRs): each announced
/// prefix inside an approved one is kept; an announced prefix wider than an approved one
/// yields the approved one. Nothing outside `approved` is ever accepted.
pub fn accept(announcement: &Announcement, approved: &[IpNet]) -> Accepted {
    let mut pod_cidrs: Vec<IpNet> = Vec::new();
    for announced in &announcement.pod_cidrs {
        for ok in approved {
            let kept = if ok.contains(announced) {
                Some(*announced)
            } else if announced.contains(ok) {
                Some(*ok)
            } else {
                None
            };
            if let Some(p) = kept {
                if !pod_cidrs.contains(&p) {
                    pod_cidrs.push(p);
                }
            }
        }
    }
    Accepted {
        public_key: announcement.public_key,
        endpoints: announcement.endpoints.clone(),
        pod_cidrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn sample() -> Announcement {
        Announcement {
            public_key: Key::generate_private().public_key(),
            listen_port: 51820,
            endpoints: vec![
                "198.18.0.1:51820".parse().unwrap(),
                "[fd00:18::1]:51820".parse().unwrap(),
            ],
            pod_cidrs: vec![net("198.19.1.0/24"), net("fd00:19:1::/64")],
        }
    }

    #[test]
    fn a_document_round_trips() {
        let a = sample();
        assert_eq!(Announcement::parse(a.to_json().as_bytes()), Ok((a, 0)));
    }

    #[test]
    fn unknown_fields_newer_versions_and_odd_entries_are_tolerated() {
        let key = Key::generate_private().public_key();
        let text = format!(
            r#"{{"version":3,"public_key":"{key}","listen_port":7,"flavour":"new",
               "endpoints":["198.18.0.1:7","node-a.example:7",{{"kind":"relay"}},"198.18.0.1:7"],
               "pod_cidrs":["198.19.1.9/24","x"]}}"#
        );
        let (a, skipped) = Announcement::parse(text.as_bytes()).unwrap();
        assert_eq!(a.public_key, key);
        assert_eq!(a.endpoints, vec!["198.18.0.1:7".parse().unwrap()]);
        assert_eq!(a.pod_cidrs, vec![net("198.19.1.0/24")]);
        assert_eq!(skipped, 4);
    }

    #[test]
    fn bad_documents_are_refused() {
        let key = Key::generate_private().public_key();
        let cases: Vec<(String, AnnouncementError)> = vec![
            (
                format!(r#"{{"public_key":"{key}","listen_port":1}}"#),
                AnnouncementError::NoVersion,
            ),
            (
                r#"{"version":1,"listen_port":1}"#.into(),
                AnnouncementError::NoKey,
            ),
            (
                r#"{"version":1,"public_key":"abc","listen_port":1}"#.into(),
                AnnouncementError::BadKey,
            ),
            (
                format!(
                    r#"{{"version":1,"public_key":"{}","listen_port":1}}"#,
                    Key::ZERO
                ),
                AnnouncementError::LowOrderKey,
            ),
            (
                format!(r#"{{"version":1,"public_key":"{key}"}}"#),
                AnnouncementError::PortZero,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                Announcement::parse(text.as_bytes()).map(|_| ()),
                Err(expected),
                "{text}"
            );
        }
        for garbage in [
            &b"[]"[..],
            b"null",
            b"{",
            b"\xff\xfe",
            b"{\"version\":\"1\"}",
        ] {
            assert!(Announcement::parse(garbage).is_err(), "{garbage:?}");
        }
        let big = vec![b' '; MAX_DOCUMENT_LEN + 1];
        assert_eq!(
            Announcement::parse(&big).map(|_| ()),
            Err(AnnouncementError::TooLarge)
        );
    }

    #[test]
    fn pod_cidrs_are_accepted_only_as_far_as_approved() {
        let mut a = sample();
        a.pod_cidrs = vec![
            net("198.19.1.0/24"),  // approved exactly
            net("198.19.2.0/25"),  // inside an approved /24
            net("198.19.0.0/16"),  // wider than approved ones: cut down to them
            net("fd00:19:9::/64"), // never approved
        ];
        let approved = [
            net("198.19.1.0/24"),
            net("198.19.2.0/24"),
            net("fd00:19:1::/64"),
        ];
        let accepted = accept(&a, &approved);
        assert_eq!(
            accepted.pod_cidrs,
            vec![
                net("198.19.1.0/24"),
                net("198.19.2.0/25"),
                net("198.19.2.0/24")
            ]
        );
        assert_eq!(accepted.public_key, a.public_key);
        assert!(accept(&a, &[]).pod_cidrs.is_empty());
    }
}
