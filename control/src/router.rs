//! `tailsk8s router`: the node agent's main loop. It validates everything it was given before
//! touching the host, then binds the UAPI socket that `wg` talks to (first: a live one means
//! another daemon owns the name), creates the device (TUN + listen sockets + engine threads),
//! applies the config file (if any) and its kernel routes, starts the control plane's one
//! tokio runtime on its own thread (the Tailscale peer source when the file has a
//! `[tailscale]` table, see [`crate::peer_source`]; the status socket, see [`crate::status`];
//! the metrics server with `[metrics]`, see [`crate::metrics`]), serves the socket, and tears all of it down on SIGINT/SIGTERM,
//! when the TUN is deleted, or when its UAPI socket file is deleted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::Mutex;
use tailsk8s_dataplane::config::DeviceUpdate;
use tailsk8s_dataplane::device::{Device, DeviceOptions, ExitReason};
use tailsk8s_dataplane::uapi::server::UapiServer;
use tracing::{info, warn};

use crate::announcement::Announcement;
use crate::cli::RouterArgs;
use crate::config::RouterConfig;
use crate::key_file::load_or_create_private_key;
use crate::observe::{RouterView, SourceHandles};
use crate::peer_source::{PeerSource, SourceSettings};
use crate::reconcile::{desired_peers, Applier};
use crate::routes::{RouteManager, ROUTE_TABLE, RULE_PRIORITY};
use crate::status::StatusSocket;

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
            Some((config, private_key, preshared))
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
    let mut applier: Option<Arc<Mutex<Applier>>> = None;
    let mut source: Option<PeerSource> = None;
    if let Some((config, private_key, preshared)) = prepared {
        let manager =
            RouteManager::new(&ifname, ROUTE_TABLE, RULE_PRIORITY).with_fwmark(config.fwmark);
        manager
            .set_link_up(config.mtu)
            .context("bringing the link up")?;
        let base = DeviceUpdate {
            private_key: Some(Some(private_key)),
            listen_port: Some(config.listen_port),
            fwmark: Some(config.fwmark),
            ..DeviceUpdate::default()
        };
        let statics = desired_peers(&config.peers, &preshared, &[], &config.pod_cidrs);
        let started = Applier::start(device.control(), Some(manager), base, statics)
            .with_context(|| format!("applying {} and its routes", config.path.display()))?;
        info!(
            peers = config.peers.len(),
            table = ROUTE_TABLE,
            "configured from {}",
            config.path.display()
        );
        let shared = Arc::new(Mutex::new(started));
        if let Some(tailscale) = &config.tailscale {
            let listen_port = device.listen_port();
            let endpoints = if config.endpoints.is_empty() {
                crate::endpoints::default_endpoints(listen_port, &[&ifname], &config.cluster_cidrs)
                    .context("listing this node's addresses for the announcement")?
            } else {
                config.endpoints.clone()
            };
            let announcement = Announcement {
                public_key: private_key.public_key(),
                listen_port,
                endpoints,
                pod_cidrs: config.pod_cidrs.clone(),
            };
            let settings = SourceSettings {
                tailscale: tailscale.clone(),
                cluster_cidrs: config.cluster_cidrs.clone(),
                own_pod_cidrs: config.pod_cidrs.clone(),
                statics: config.peers.clone(),
                preshared,
            };
            info!(
                socket = %tailscale.socket.display(),
                tag = %tailscale.tag,
                endpoints = ?announcement.endpoints,
                "peers from Tailscale"
            );
            source = Some(PeerSource::new(settings, shared.clone(), &announcement));
        }
        applier = Some(shared);
    }
    let watch = uapi.watch();
    // The status socket and the metrics server (when configured) beside the peer source,
    // all on the control plane's one runtime. Bound here so a taken port fails the start.
    let view = RouterView {
        interface: ifname.clone(),
        device: device.control(),
        health: device.health(),
        applier: applier.clone(),
        source: source.as_ref().map(|s| SourceHandles {
            freshness: s.freshness(),
            stats: s.sync_stats(),
            paths: s.paths(),
        }),
    };
    let status_socket = StatusSocket::bind(crate::status::socket_path(
        watch.path().parent().unwrap_or(std::path::Path::new(".")),
        &ifname,
    ))?;
    let metrics = match config.as_ref().and_then(|c| c.metrics_listen) {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding [metrics] listen = {addr}"))?;
            listener.set_nonblocking(true)?;
            info!(listen = %addr, "serving /metrics, /healthz, /readyz");
            Some(listener)
        }
        None => None,
    };
    let source = Some(ControlThread::start(source, view, status_socket, metrics)?);
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
    if let Some(source) = source {
        source.stop();
    }
    if let Some(applier) = applier {
        if let Some(manager) = applier.lock().routes_mut() {
            if let Err(e) = manager.cleanup() {
                warn!("removing routes: {e}");
            }
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

/// The control plane's one tokio runtime on its own thread: the peer source (with a
/// `[tailscale]` table), the status socket, and the metrics server (with `[metrics]`).
struct ControlThread {
    stop: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl ControlThread {
    fn start(
        source: Option<PeerSource>,
        view: RouterView,
        status: StatusSocket,
        metrics: Option<std::net::TcpListener>,
    ) -> anyhow::Result<ControlThread> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tailsk8s-control")
            .enable_all()
            .build()
            .context("starting the control plane's runtime")?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("tailsk8s-source".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    if let Some(source) = source {
                        tasks.spawn(source.run(stopped.clone()));
                    }
                    tasks.spawn(status.serve(view.clone(), stopped.clone()));
                    if let Some(listener) = metrics {
                        let mut stop = stopped.clone();
                        tasks.spawn(async move {
                            let listener = match tokio::net::TcpListener::from_std(listener) {
                                Ok(l) => l,
                                Err(e) => {
                                    warn!("metrics server: {e}");
                                    return;
                                }
                            };
                            let served = axum::serve(listener, crate::metrics::router(view))
                                .with_graceful_shutdown(async move {
                                    let _ = stop.wait_for(|s| *s).await;
                                })
                                .await;
                            if let Err(e) = served {
                                warn!("metrics server stopped: {e}");
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .context("starting the control plane thread")?;
        Ok(ControlThread { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(true);
        if self.thread.join().is_err() {
            warn!("the control plane thread panicked");
        }
    }
}
