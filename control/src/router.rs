//! `tailsk8s router`: the node agent's main loop. It validates everything it was given before
//! touching the host, then binds the UAPI socket that `wg` talks to (first: a live one means
//! another daemon owns the name), creates the device (TUN + listen sockets + engine threads),
//! applies the config file (if any) and its kernel routes, serves the socket, and tears all
//! of it down on SIGINT/SIGTERM, when the TUN is deleted, or when its UAPI socket file is
//! deleted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tailsk8s_dataplane::device::{Device, DeviceOptions, ExitReason};
use tailsk8s_dataplane::uapi::server::UapiServer;
use tracing::{info, warn};

use crate::cli::RouterArgs;
use crate::config::RouterConfig;
use crate::key_file::load_or_create_private_key;
use crate::routes::{RouteManager, ROUTE_TABLE, RULE_PRIORITY};

/// How often the main loop looks at signals, the TUN and the socket file.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// MTU of a device driven by `wg` alone (wg-quick sets its own afterwards): the engine's
/// default, as the TUN's integer type.
const UAPI_ONLY_MTU: u16 = tailsk8s_dataplane::engine::DEFAULT_MTU as u16;

/// Why the router stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    Signal,
    TunDeleted,
    SocketDeleted,
}

/// Runs the router in the foreground until it is told to stop.
pub fn run(args: &RouterArgs) -> anyhow::Result<()> {
    run_with(args, || {})
}

/// Like [`run`], calling `ready` once the device is up and the UAPI socket serves.
pub fn run_with(args: &RouterArgs, ready: impl FnOnce()) -> anyhow::Result<()> {
    if tailsk8s_dataplane::engine::BORINGTUN_CLOCK_DRIVEN_BY_TESTS {
        anyhow::bail!(
            "this binary was built with the data plane's boringtun-mock-clock feature, a test \
             build whose WireGuard timers run on a test clock; build without it"
        );
    }
    let config = match &args.config {
        Some(path) => Some(RouterConfig::load(path)?),
        None => None,
    };
    let ifname = args.interface(config.as_ref())?;

    // Everything that can fail on bad input fails here, before the host is touched (the
    // private key file is created on first start by design).
    let prepared = match &config {
        Some(config) => {
            let private_key =
                load_or_create_private_key(&config.private_key_file).with_context(|| {
                    format!("{}:{}", config.path.display(), config.private_key_file_at)
                })?;
            let preshared = config
                .load_preshared_keys()
                .with_context(|| format!("{}: preshared_key_file", config.path.display()))?;
            Some((config, config.to_device_update(private_key, &preshared)))
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }

    // The socket first: a live one means another daemon owns this name, and nothing may be
    // created. If the device then fails, dropping the server removes the socket again.
    let uapi = UapiServer::bind(&ifname)?;
    let options = DeviceOptions {
        ifname: ifname.clone(),
        mtu: match &config {
            Some(c) => u16::try_from(c.mtu).context("mtu")?,
            None => UAPI_ONLY_MTU,
        },
        listen_port: config.as_ref().map_or(0, |c| c.listen_port),
        fwmark: config.as_ref().map_or(0, |c| c.fwmark),
        workers: match args.workers {
            Some(n) => usize::from(n),
            None => config.as_ref().map_or(0, |c| c.workers),
        },
        offload: !args.no_offload && config.as_ref().is_none_or(|c| c.offload),
        affinity: args
            .worker_affinity
            .or(config.as_ref().map(|c| c.worker_affinity))
            .unwrap_or_default(),
    };
    let device = Device::start(&options)?;
    let mut routes = None;
    if let Some((config, update)) = prepared {
        device
            .control()
            .set(update)
            .with_context(|| format!("applying {}", config.path.display()))?;
        let mut manager =
            RouteManager::new(&ifname, ROUTE_TABLE, RULE_PRIORITY).with_fwmark(config.fwmark);
        let installed = manager
            .set_link_up(config.mtu)
            .and_then(|()| manager.sync(&config.all_allowed_ips()));
        if let Err(e) = installed {
            let _ = manager.cleanup();
            return Err(e).context("installing routes");
        }
        info!(
            peers = config.peers.len(),
            routes = manager.installed().count(),
            table = ROUTE_TABLE,
            "configured from {}",
            config.path.display()
        );
        routes = Some(manager);
    }
    let watch = uapi.watch();
    let server = uapi.serve(device.control(), stop.clone())?;
    info!(
        interface = %ifname,
        listen_port = device.listen_port(),
        socket = %watch.path().display(),
        "router running"
    );
    ready();

    let shutdown = loop {
        std::thread::sleep(WATCH_INTERVAL);
        if stop.load(Ordering::Relaxed) {
            break Ok(Shutdown::Signal);
        }
        match device.exit_reason() {
            Some(ExitReason::TunGone) => break Ok(Shutdown::TunDeleted),
            Some(ExitReason::Failed(why)) => break Err(why),
            Some(ExitReason::Stopped) => break Ok(Shutdown::Signal),
            None => {}
        }
        if !watch.still_owned() {
            break Ok(Shutdown::SocketDeleted);
        }
    };

    stop.store(true, Ordering::Relaxed);
    if let Some(mut manager) = routes {
        if let Err(e) = manager.cleanup() {
            warn!("removing routes: {e}");
        }
    }
    drop(device);
    if server.join().is_err() {
        warn!("the UAPI server thread panicked");
    }
    match shutdown {
        Ok(reason) => {
            info!(?reason, "router stopped");
            Ok(())
        }
        Err(why) => bail!("{why}"),
    }
}
