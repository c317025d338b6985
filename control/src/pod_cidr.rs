//! Where a node's pod CIDRs come from, in order: the config file's `pod_cidrs`, `--pod-cidr`
//! on the command line, the Kubernetes Node object (`spec.podCIDRs`, read with the in-cluster
//! service account), or the host-local ranges of an existing CNI configuration. The first
//! source that has any wins; later ones are not consulted (a Node object is not fetched when
//! the operator named the CIDR).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use thiserror::Error;

use crate::cni::network as cni;

/// How long the Node object may take to arrive before the start fails.
const NODE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Which source gave the pod CIDRs (logged at start, so an operator sees why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    ConfigFile,
    CommandLine,
    NodeObject { node: String },
    CniConfig { path: std::path::PathBuf },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::ConfigFile => write!(f, "the config file's pod_cidrs"),
            Source::CommandLine => write!(f, "--pod-cidr"),
            Source::NodeObject { node } => write!(f, "the Kubernetes Node `{node}`"),
            Source::CniConfig { path } => write!(f, "the CNI configuration {}", path.display()),
        }
    }
}

#[derive(Debug, Error)]
pub enum PodCidrError {
    #[error("reading the Kubernetes Node `{node}`: {reason}")]
    Node { node: String, reason: String },
    #[error("the Kubernetes Node `{node}` has a pod CIDR that does not parse: `{cidr}`")]
    BadNodeCidr { node: String, cidr: String },
    #[error(transparent)]
    Cni(#[from] cni::CniError),
    #[error("starting the runtime that reads the Kubernetes Node: {0}")]
    Runtime(std::io::Error),
    #[error(
        "no pod CIDR for this node: set pod_cidrs in the config file or --pod-cidr, run in a \
         cluster whose Node object has spec.podCIDRs (with NODE_NAME set), or provide a CNI \
         configuration in {cni_dir}"
    )]
    None { cni_dir: String },
}

/// The sources a caller has; `node` is the Kubernetes Node to ask (name and a client), when
/// running in a cluster.
pub struct Sources<'a> {
    pub config_file: &'a [IpNet],
    pub command_line: &'a [IpNet],
    pub node: Option<(&'a str, kube::Client)>,
    pub cni_dir: &'a Path,
}

/// The node's pod CIDRs and where they came from.
pub async fn resolve(sources: Sources<'_>) -> Result<(Vec<IpNet>, Source), PodCidrError> {
    if !sources.config_file.is_empty() {
        return Ok((sources.config_file.to_vec(), Source::ConfigFile));
    }
    if !sources.command_line.is_empty() {
        return Ok((sources.command_line.to_vec(), Source::CommandLine));
    }
    if let Some((node, client)) = sources.node {
        let cidrs = node_pod_cidrs(client, node).await?;
        if !cidrs.is_empty() {
            return Ok((
                cidrs,
                Source::NodeObject {
                    node: node.to_string(),
                },
            ));
        }
    }
    if let Some(path) = cni::existing_config(sources.cni_dir)? {
        let cidrs = cni::pod_cidrs_of(&path)?;
        return Ok((cidrs, Source::CniConfig { path }));
    }
    Err(PodCidrError::None {
        cni_dir: sources.cni_dir.display().to_string(),
    })
}

/// [`resolve`] for the synchronous commands (`router`, `cni-config`): the Node `node_name` is
/// asked only in a cluster (in-cluster credentials present), on a runtime of its own that is
/// started only when the earlier sources name nothing.
pub fn resolve_blocking(
    config_file: &[IpNet],
    command_line: &[IpNet],
    node_name: Option<&str>,
    cni_dir: &Path,
) -> Result<(Vec<IpNet>, Source), PodCidrError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PodCidrError::Runtime)?;
    let client = match (config_file.is_empty() && command_line.is_empty(), node_name) {
        (true, Some(_)) => runtime.block_on(async { in_cluster_client() })?,
        _ => None,
    };
    runtime.block_on(resolve(Sources {
        config_file,
        command_line,
        node: node_name.zip(client),
        cni_dir,
    }))
}

/// `spec.podCIDRs` of the Node `name` (falling back to the single `spec.podCIDR` that
/// clusters before dual-stack set); empty when the controller manager has not allocated one.
pub async fn node_pod_cidrs(client: kube::Client, name: &str) -> Result<Vec<IpNet>, PodCidrError> {
    let nodes: kube::Api<Node> = kube::Api::all(client);
    let node_error = |reason: String| PodCidrError::Node {
        node: name.to_string(),
        reason,
    };
    let node = tokio::time::timeout(NODE_READ_TIMEOUT, nodes.get(name))
        .await
        .map_err(|_| node_error(format!("no answer within {NODE_READ_TIMEOUT:?}")))?
        .map_err(|e| node_error(e.to_string()))?;
    let spec = node.spec.unwrap_or_default();
    let listed = spec
        .pod_cidrs
        .filter(|cidrs| !cidrs.is_empty())
        .or_else(|| spec.pod_cidr.map(|c| vec![c]))
        .unwrap_or_default();
    listed
        .into_iter()
        .map(|cidr| {
            cidr.parse::<IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| PodCidrError::BadNodeCidr {
                    node: name.to_string(),
                    cidr,
                })
        })
        .collect()
}

/// A client with the in-cluster service account (`KUBERNETES_SERVICE_HOST`, the mounted
/// token and CA), or `None` outside a cluster.
pub fn in_cluster_client() -> Result<Option<kube::Client>, PodCidrError> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return Ok(None);
    }
    let config = kube::Config::incluster().map_err(|e| PodCidrError::Node {
        node: "(this node)".into(),
        reason: format!("in-cluster configuration: {e}"),
    })?;
    kube::Client::try_from(config)
        .map(Some)
        .map_err(|e| PodCidrError::Node {
            node: "(this node)".into(),
            reason: format!("client: {e}"),
        })
}
