//! `tailsk8s cni-config`: its arguments and the command, which resolves the node's pod CIDRs
//! (see [`crate::pod_cidr`]) and writes the node's CNI configuration ([`network`]) unless one
//! exists.

use std::path::PathBuf;

pub mod network;

pub use network::{
    existing_config, pod_cidrs_of, CniError, PodNetwork, Written, CNI_VERSION, CONFLIST_FILE,
    DEFAULT_BRIDGE, DEFAULT_CNI_DIR, NETWORK_NAME,
};

/// `tailsk8s cni-config [--config FILE] [--pod-cidr CIDR]… [--node-name NAME] [--cni-dir DIR]`
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct CniConfigArgs {
    /// The router's config file: its `mtu` (and `pod_cidrs`) apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's pod CIDR (IPv4 and/or IPv6; repeat for dual stack), when the config file
    /// names none.
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The Kubernetes Node to read `spec.podCIDRs` from when neither names one (in a cluster,
    /// with the pod's service account).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where the container runtime reads CNI configurations.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CNI_DIR)]
    pub cni_dir: PathBuf,
    /// The pods' bridge.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_BRIDGE)]
    pub bridge: String,
}

/// `tailsk8s cni-config`: resolve the node's pod CIDRs (see [`crate::pod_cidr`]) and the
/// tunnel MTU, and write the configuration unless one exists.
pub fn command(args: &CniConfigArgs) -> anyhow::Result<()> {
    let config = args
        .config
        .as_deref()
        .map(crate::config::RouterConfig::load)
        .transpose()?;
    if let Some(existing) = existing_config(&args.cni_dir)? {
        tracing::info!(path = %existing.display(), "a CNI configuration exists; keeping it");
        return Ok(());
    }
    // The config file's pod_cidrs come first, as for the router.
    let from_file = config.as_ref().map_or(&[][..], |c| &c.pod_cidrs[..]);
    let (pod_cidrs, source) = crate::pod_cidr::resolve_blocking(
        from_file,
        &args.pod_cidrs,
        args.node_name.as_deref(),
        &args.cni_dir,
    )?;
    let network = PodNetwork {
        bridge: args.bridge.clone(),
        pod_cidrs,
        mtu: config
            .as_ref()
            .map_or(crate::config::DEFAULT_MTU, |c| c.mtu),
    };
    match network.write_unless_exists(&args.cni_dir)? {
        Written::Created(path) => tracing::info!(
            path = %path.display(),
            pod_cidrs = ?network.pod_cidrs,
            from = %source,
            mtu = network.mtu,
            "wrote the CNI configuration"
        ),
        Written::Kept(path) => {
            tracing::info!(path = %path.display(), "a CNI configuration exists; keeping it")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_files_pod_cidrs_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("router.toml");
        std::fs::write(
            &config,
            "private_key_file = \"/k\"\nmtu = 1380\ncluster_cidrs = [\"198.19.0.0/16\"]\n\
             pod_cidrs = [\"198.19.4.0/24\"]\n",
        )
        .unwrap();
        let cni_dir = dir.path().join("net.d");
        let args = CniConfigArgs {
            config: Some(config),
            pod_cidrs: vec!["198.19.9.0/24".parse().unwrap()],
            node_name: None,
            cni_dir: cni_dir.clone(),
            bridge: DEFAULT_BRIDGE.into(),
        };
        command(&args).unwrap();
        let written = cni_dir.join(CONFLIST_FILE);
        assert_eq!(
            pod_cidrs_of(&written).unwrap(),
            ["198.19.4.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        let text = std::fs::read_to_string(&written).unwrap();
        assert!(
            text.contains("\"mtu\": 1380") || text.contains("\"mtu\":1380"),
            "{text}"
        );
    }
}
