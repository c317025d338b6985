//! The node's pod network as the container runtime sees it: the CNI configuration list that
//! puts pods on the kubenet-style bridge `cnio0` with host-local IPAM over the node's pod
//! CIDRs (`tailsk8s cni-config` writes it), and reading the pod CIDRs back from an existing
//! one (the last source of a node's pod CIDRs).
//!
//! The plugins are the standard ones from containernetworking/plugins (`bridge`,
//! `host-local`, `loopback`), as the seed project's kubenet-style setup used them:
//! - `isGateway`: the bridge holds the first address of each range and is the pods' default
//!   gateway, so pod traffic to other nodes reaches the node's routing and thus the TUN;
//! - `ipMasq: false`: pod-to-pod traffic keeps its pod source address across nodes (the
//!   router masquerades only traffic leaving `cluster_cidrs`, see `masquerade`);
//! - `mtu`: the tunnel MTU, so pods never build packets the tunnel must refuse;
//! - `hairpinMode`: a pod reaching itself through a service address gets its packet back.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

/// The bridge the pods of a node sit on (kubenet's name, kept by the seed project).
pub const DEFAULT_BRIDGE: &str = "cnio0";
/// Where kubelet's container runtime looks for CNI configurations.
pub const DEFAULT_CNI_DIR: &str = "/etc/cni/net.d";
/// The file `cni-config` writes; `10-` sorts it ahead of the runtime's examples.
pub const CONFLIST_FILE: &str = "10-tailsk8s.conflist";
/// The network's name in the configuration (and in host-local's lease directory).
pub const NETWORK_NAME: &str = "tailsk8s";
/// The CNI spec version written: the newest that Debian 12's plugins (1.1.1) accept.
pub const CNI_VERSION: &str = "1.0.0";
/// An existing CNI configuration larger than this is not one we can have written.
const MAX_CONFIG_LEN: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum CniError {
    #[error("no pod CIDR for the CNI configuration")]
    NoPodCidr,
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: not a CNI configuration: {reason}", path.display())]
    NotCni { path: PathBuf, reason: String },
}

/// What the node's CNI configuration says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub bridge: String,
    /// The node's pod CIDRs, at most one per family (host-local gives each pod one address
    /// from every range).
    pub pod_cidrs: Vec<IpNet>,
    pub mtu: u32,
}

impl PodNetwork {
    /// The configuration list as the container runtime reads it.
    pub fn conflist(&self) -> Result<Value, CniError> {
        if self.pod_cidrs.is_empty() {
            return Err(CniError::NoPodCidr);
        }
        let ranges: Vec<Value> = self
            .pod_cidrs
            .iter()
            .map(|cidr| json!([{ "subnet": cidr.trunc().to_string() }]))
            .collect();
        let mut routes = Vec::new();
        if self.pod_cidrs.iter().any(|c| matches!(c, IpNet::V4(_))) {
            routes.push(json!({ "dst": "0.0.0.0/0" }));
        }
        if self.pod_cidrs.iter().any(|c| matches!(c, IpNet::V6(_))) {
            routes.push(json!({ "dst": "::/0" }));
        }
        Ok(json!({
            "cniVersion": CNI_VERSION,
            "name": NETWORK_NAME,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "mtu": self.mtu,
                    "ipam": {
                        "type": "host-local",
                        "ranges": ranges,
                        "routes": routes,
                    },
                },
                { "type": "loopback" },
            ],
        }))
    }

    /// Writes the configuration list into `dir` unless the directory already holds a CNI
    /// configuration (ours from an earlier start, or one an operator put there): an existing
    /// network is never replaced under running pods. Returns the file written, or the
    /// existing one that was kept.
    pub fn write_unless_exists(&self, dir: &Path) -> Result<Written, CniError> {
        if let Some(existing) = existing_config(dir)? {
            return Ok(Written::Kept(existing));
        }
        let text =
            serde_json::to_string_pretty(&self.conflist()?).map_err(|e| CniError::NotCni {
                path: dir.join(CONFLIST_FILE),
                reason: e.to_string(),
            })?;
        fs::create_dir_all(dir).map_err(|source| CniError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(CONFLIST_FILE);
        // The runtime may read the directory at any moment: it must see the whole file or
        // none, so write a hidden temporary (runtimes skip names without a CNI suffix) and
        // rename it into place.
        let temp = dir.join(format!(".{CONFLIST_FILE}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&temp)?;
            file.write_all(text.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&temp, &path)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&temp);
            CniError::Write {
                path: path.clone(),
                source,
            }
        })?;
        Ok(Written::Created(path))
    }
}

/// What [`PodNetwork::write_unless_exists`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Created(PathBuf),
    Kept(PathBuf),
}

/// The CNI configuration the runtime would use from `dir`: the first `*.conflist`, `*.conf`
/// or `*.json` file in name order, as kubelet's runtimes pick it. `None` when there is none
/// (or no such directory).
pub fn existing_config(dir: &Path) -> Result<Option<PathBuf>, CniError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CniError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut configs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    configs.sort();
    Ok(configs.into_iter().next())
}

/// The pod CIDRs of the host-local ranges in an existing CNI configuration (a `.conflist` or
/// a single-plugin `.conf`), the last source of a node's pod CIDRs.
pub fn pod_cidrs_of(path: &Path) -> Result<Vec<IpNet>, CniError> {
    use std::io::Read as _;
    let read_err = |source| CniError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_LEN)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    pod_cidrs_in(&text).map_err(|reason| CniError::NotCni {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`pod_cidrs_of`] on the file's text.
pub fn pod_cidrs_in(text: &str) -> Result<Vec<IpNet>, String> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        plugins: Option<Vec<Plugin>>,
        #[serde(flatten)]
        single: Plugin,
    }
    #[derive(Deserialize)]
    struct Plugin {
        #[serde(default)]
        ipam: Option<Ipam>,
    }
    #[derive(Deserialize)]
    struct Ipam {
        #[serde(default)]
        subnet: Option<String>,
        #[serde(default)]
        ranges: Vec<Vec<Range>>,
    }
    #[derive(Deserialize)]
    struct Range {
        subnet: String,
    }
    let config: Config = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let plugins = config.plugins.unwrap_or_else(|| vec![config.single]);
    let mut cidrs = Vec::new();
    for ipam in plugins.into_iter().filter_map(|p| p.ipam) {
        let subnets = ipam
            .subnet
            .into_iter()
            .chain(ipam.ranges.into_iter().flatten().map(|r| r.subnet));
        for subnet in subnets {
            let cidr: IpNet = subnet
                .parse()
                .map_err(|_| format!("`{subnet}` is not a CIDR"))?;
            if !cidrs.contains(&cidr) {
                cidrs.push(cidr);
            }
        }
    }
    if cidrs.is_empty() {
        return Err("no IPAM subnet in it".into());
    }
    Ok(cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(cidrs: &[&str]) -> PodNetwork {
        PodNetwork {
            bridge: DEFAULT_BRIDGE.into(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            mtu: 1420,
        }
    }

    #[test]
    fn dual_stack_conflist_has_one_range_set_per_family_and_default_routes() {
        let list = network(&["198.19.1.0/24", "fd00:19:1::/64"])
            .conflist()
            .unwrap();
        let bridge = &list["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], "cnio0");
        assert_eq!(bridge["mtu"], 1420);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(
            bridge["ipam"]["ranges"],
            json!([[{"subnet": "198.19.1.0/24"}], [{"subnet": "fd00:19:1::/64"}]])
        );
        assert_eq!(
            bridge["ipam"]["routes"],
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        assert_eq!(list["plugins"][1]["type"], "loopback");
    }

    #[test]
    fn single_family_gets_only_its_default_route() {
        let list = network(&["198.19.1.0/24"]).conflist().unwrap();
        assert_eq!(
            list["plugins"][0]["ipam"]["routes"],
            json!([{"dst": "0.0.0.0/0"}])
        );
    }

    #[test]
    fn no_pod_cidr_is_an_error() {
        assert!(matches!(network(&[]).conflist(), Err(CniError::NoPodCidr)));
    }

    #[test]
    fn pod_cidrs_read_back_from_what_we_write() {
        let net = network(&["198.19.1.0/24", "fd00:19:1::/64"]);
        let text = net.conflist().unwrap().to_string();
        assert_eq!(pod_cidrs_in(&text).unwrap(), net.pod_cidrs);
    }

    #[test]
    fn pod_cidrs_from_a_single_plugin_conf_with_the_old_subnet_key() {
        let text = r#"{"cniVersion":"0.3.1","name":"k","type":"bridge","bridge":"cnio0",
            "ipam":{"type":"host-local","subnet":"198.19.7.0/24"}}"#;
        assert_eq!(
            pod_cidrs_in(text).unwrap(),
            vec!["198.19.7.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn garbage_and_configs_without_ipam_are_refused() {
        assert!(pod_cidrs_in("not json").is_err());
        assert!(pod_cidrs_in(r#"{"plugins":[{"type":"loopback"}]}"#).is_err());
        assert!(pod_cidrs_in(r#"{"plugins":[{"ipam":{"ranges":[[{"subnet":"x"}]]}}]}"#).is_err());
    }

    #[test]
    fn an_existing_configuration_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("05-theirs.conf");
        fs::write(&theirs, "{}").unwrap();
        let written = network(&["198.19.1.0/24"])
            .write_unless_exists(dir.path())
            .unwrap();
        assert_eq!(written, Written::Kept(theirs.clone()));
        assert_eq!(fs::read_to_string(&theirs).unwrap(), "{}");
        assert!(!dir.path().join(CONFLIST_FILE).exists());
    }

    #[test]
    fn written_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cni_dir = dir.path().join("net.d");
        let net = network(&["198.19.1.0/24"]);
        let path = match net.write_unless_exists(&cni_dir).unwrap() {
            Written::Created(path) => path,
            other => panic!("{other:?}"),
        };
        assert_eq!(pod_cidrs_of(&path).unwrap(), net.pod_cidrs);
        let other = network(&["198.19.9.0/24"]);
        assert_eq!(
            other.write_unless_exists(&cni_dir).unwrap(),
            Written::Kept(path.clone())
        );
        assert_eq!(pod_cidrs_of(&path).unwrap(), net.pod_cidrs);
        // No temporary left behind.
        assert_eq!(fs::read_dir(&cni_dir).unwrap().count(), 1);
    }
}
