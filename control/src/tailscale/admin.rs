//! The tailnet admin commands, the seed project's tools rebuilt: `advertise` and `withdraw`
//! a pod CIDR as a subnet route of this node (LocalAPI prefs, read-modify-write so the other
//! advertised routes stay), optionally approving or un-approving it in the cloud API
//! (read-modify-write of the device's enabled routes), and `authorize` (device approval).
//! Each returns the lines to show the user; nothing is sent when nothing would change.

use ipnet::IpNet;
use thiserror::Error;

use super::cloud::{CloudApi, CloudApiError, Device};
use super::documents::MaskedPrefs;
use super::localapi::{LocalApi, LocalApiError};

#[derive(Debug, Error)]
pub enum AdminError {
    #[error(transparent)]
    LocalApi(#[from] LocalApiError),
    #[error(transparent)]
    Cloud(#[from] CloudApiError),
    #[error("tailscaled has no node yet (BackendState {backend_state:?}): log in first")]
    NoNode { backend_state: String },
}

/// Whether routes are added or taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add,
    Remove,
}

/// `routes` with `cidrs` added at the end (those not there yet) or removed. Entries are
/// compared as prefixes; an entry that does not parse is kept as it is (it is not ours to
/// drop).
pub fn edit_routes(routes: &[String], cidrs: &[IpNet], change: Change) -> Vec<String> {
    let is_one_of = |entry: &String| entry.parse::<IpNet>().is_ok_and(|net| cidrs.contains(&net));
    match change {
        Change::Add => {
            let mut out = routes.to_vec();
            for cidr in cidrs {
                if !out
                    .iter()
                    .any(|e| e.parse::<IpNet>().is_ok_and(|n| n == *cidr))
                {
                    out.push(cidr.to_string());
                }
            }
            out
        }
        Change::Remove => routes.iter().filter(|e| !is_one_of(e)).cloned().collect(),
    }
}

fn list(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn shown(routes: &[String]) -> String {
    if routes.is_empty() {
        "none".to_string()
    } else {
        routes.join(", ")
    }
}

/// `tailsk8s advertise` / `withdraw`: changes this node's advertised routes, then (with a
/// cloud client) its approved routes.
pub async fn change_routes(
    local: &LocalApi,
    cloud: Option<&CloudApi>,
    cidrs: &[IpNet],
    change: Change,
) -> Result<Vec<String>, AdminError> {
    let mut lines = Vec::new();
    let prefs = local.prefs().await?;
    let routes = edit_routes(&prefs.advertise_routes, cidrs, change);
    let (done, already) = match change {
        Change::Add => ("advertised", "already advertised"),
        Change::Remove => ("withdrew", "not advertised"),
    };
    if routes == prefs.advertise_routes {
        lines.push(format!("{}: {already}", list(cidrs)));
    } else {
        tracing::info!(routes = %shown(&routes), "changing this node's advertised routes");
        let after = local
            .patch_prefs(&MaskedPrefs::advertise_routes(routes))
            .await?;
        lines.push(format!(
            "{done} {}; advertised routes now: {}",
            list(cidrs),
            shown(&after.advertise_routes)
        ));
    }
    if let Some(cloud) = cloud {
        let device = this_device(local, cloud).await?;
        let current = cloud.routes(&device.id).await?;
        let enabled = edit_routes(&current.enabled_routes, cidrs, change);
        let (done, already) = match change {
            Change::Add => ("approved", "already approved"),
            Change::Remove => ("un-approved", "not approved"),
        };
        if enabled == current.enabled_routes {
            lines.push(format!(
                "{}: {already} on device {}",
                list(cidrs),
                device_name(&device)
            ));
        } else {
            tracing::info!(device = %device_name(&device), routes = %shown(&enabled),
                "changing the device's approved routes");
            let after = cloud.set_enabled_routes(&device.id, &enabled).await?;
            lines.push(format!(
                "{done} {} on device {}; approved routes now: {}",
                list(cidrs),
                device_name(&device),
                shown(&after.enabled_routes)
            ));
        }
    }
    Ok(lines)
}

/// `tailsk8s authorize`: approves the device `node_id`, or this node's.
pub async fn authorize(
    local: &LocalApi,
    cloud: &CloudApi,
    node_id: Option<&str>,
) -> Result<Vec<String>, AdminError> {
    let device = match node_id {
        Some(id) => cloud.device_by_node_id(id).await?,
        None => this_device(local, cloud).await?,
    };
    if device.authorized {
        return Ok(vec![format!(
            "device {} is already authorized",
            device_name(&device)
        )]);
    }
    tracing::info!(device = %device_name(&device), "authorizing the device");
    cloud.set_authorized(&device.id, true).await?;
    Ok(vec![format!("authorized device {}", device_name(&device))])
}

/// The cloud API's device for this node: the one whose `nodeId` is the LocalAPI's `Self.ID`
/// (host names can repeat; IDs cannot).
async fn this_device(local: &LocalApi, cloud: &CloudApi) -> Result<Device, AdminError> {
    let view = local.self_status().await?;
    if view.self_node.stable_id.is_empty() {
        return Err(AdminError::NoNode {
            backend_state: view.backend_state,
        });
    }
    Ok(cloud.device_by_node_id(&view.self_node.stable_id).await?)
}

fn device_name(device: &Device) -> String {
    let name = if device.hostname.is_empty() {
        &device.name
    } else {
        &device.hostname
    };
    format!("{name} ({})", device.node_id)
}

#[cfg(test)]
mod tests;
