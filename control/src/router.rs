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
use std::time::{Duration, Instant};

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ipnet::IpNet;
use parking_lot::Mutex;
use tailsk8s_dataplane::affinity::WorkerAffinity;
use tailsk8s_dataplane::config::DeviceUpdate;
use tailsk8s_dataplane::device::{Device, DeviceOptions, ExitReason};
use tailsk8s_dataplane::uapi::server::UapiServer;
use thiserror::Error;
use tracing::{info, warn};

use crate::announcement::Announcement;
use crate::config::{check_ifname, RouterConfig};
use crate::key_file::load_or_create_private_key;
use crate::observe::{RouterView, SourceHandles};
use crate::peer_source::{PeerSource, SourceSettings};
use crate::reconcile::{Applier, StaticPeers};
use crate::reload::{check_reloadable, FileWatch};
use crate::routes::{RouteManager, ROUTE_TABLE, RULE_PRIORITY};
use crate::status::StatusSocket;

/// How often the main loop looks at signals, the TUN and the socket file.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// MTU of a device driven by `wg` alone (wg-quick sets its own afterwards): the engine's
/// default, as the TUN's integer type.
const UAPI_ONLY_MTU: u16 = tailsk8s_dataplane::engine::DEFAULT_MTU as u16;

pub use crate::config::DEFAULT_IFNAME;

/// `tailsk8s router [--config FILE] [IFNAME]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RouterArgs {
    /// The router's TOML config file (keys, port, static peers).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Name of the TUN interface [default: tsk0, or `interface` from the config file].
    /// (Checked by the router, so a bad name is one error line like every other start error.)
    #[arg(value_name = "IFNAME")]
    pub ifname: Option<String>,
    /// Packet workers, each with one TUN queue and one UDP socket pair [default: one per
    /// core, or `workers` from the config file].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Run without TUN offloads and UDP GSO/GRO (for kernels or drivers where they
    /// misbehave); overrides `offload` in the config file.
    #[arg(long)]
    pub no_offload: bool,
    /// Worker placement: `pinned` = each worker on its own CPU, serving the packets of that
    /// CPU (lowest latency; a busy flow shares its CPU with the application), `off` = the
    /// kernel's flow hash, `adaptive` = pinned while quiet, spread while busy [default:
    /// adaptive, or `worker_affinity` from the config file].
    #[arg(long, value_name = "MODE")]
    pub worker_affinity: Option<WorkerAffinity>,
    /// This node's pod CIDR (repeat for dual stack), when the config file's `pod_cidrs` names
    /// none.
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The Kubernetes Node whose `spec.podCIDRs` are this node's pod CIDRs when neither the
    /// config file nor --pod-cidr names one (read with the in-cluster service account; else
    /// the existing CNI configuration in --cni-dir is read). Without it, neither is consulted.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where the container runtime reads CNI configurations (the last pod CIDR source).
    #[arg(long, value_name = "DIR", default_value = crate::cni::DEFAULT_CNI_DIR)]
    pub cni_dir: PathBuf,
}

/// The router's command line disagreeing with itself or its config file (usage errors are
/// clap's).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("bad interface name `{name}`: {reason}")]
    BadInterface { name: String, reason: &'static str },
    #[error(
        "interface `{cli}` on the command line disagrees with interface = \"{file}\" in {}",
        path.display()
    )]
    InterfaceMismatch {
        cli: String,
        file: String,
        path: PathBuf,
    },
}

impl RouterArgs {
    /// The interface to use: the command line's, else the config file's, else [`DEFAULT_IFNAME`].
    /// When both name one, they must agree (a mismatch is likely the wrong file).
    pub fn interface(&self, config: Option<&RouterConfig>) -> Result<String, ArgsError> {
        let from_file = config.and_then(|c| c.interface.as_deref().map(|i| (i, &c.path)));
        match (self.ifname.as_deref(), from_file) {
            (Some(cli), Some((file, path))) if cli != file => Err(ArgsError::InterfaceMismatch {
                cli: cli.to_string(),
                file: file.to_string(),
                path: path.clone(),
            }),
            (Some(cli), _) => {
                check_ifname(cli).map_err(|reason| ArgsError::BadInterface {
                    name: cli.to_string(),
                    reason,
                })?;
                Ok(cli.to_string())
            }
            (None, Some((file, _))) => Ok(file.to_string()),
            (None, None) => Ok(DEFAULT_IFNAME.to_string()),
        }
    }
}

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
    let config = match &args.config {
        Some(path) => Some(RouterConfig::load(path)?),
        None => None,
    };
    let ifname = args.interface(config.as_ref())?;
    let pod_cidrs = match &config {
        Some(config) => pod_cidrs(args, config)?,
        None => Vec::new(),
    };

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
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())
        .context("installing signal handlers")?;

    // The socket first: a live one means another daemon owns this name, and nothing may be
    // created. If the device then fails, dropping the server removes the socket again.
    let uapi = UapiServer::bind(&ifname)?;
    let options = DeviceOptions {
        ifname: ifname.clone(),
        mtu: match &config {
            Some(c) => u16::try_from(c.mtu).context("mtu")?,
            None => UAPI_ONLY_MTU,
        },
        // The config file owns the MTU (a restart changes it); driven by `wg` alone, the
        // link's MTU is the tunnel's, as wg-quick expects.
        follow_link_mtu: config.is_none(),
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
    let mut masquerading = false;
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
        let statics = StaticPeers {
            peers: config.peers.clone(),
            preshared,
            own_pod_cidrs: pod_cidrs.clone(),
        };
        let started = Applier::start(device.control(), Some(manager), base, statics)
            .with_context(|| format!("applying {} and its routes", config.path.display()))?;
        if crate::masquerade::install(&pod_cidrs, &config.cluster_cidrs)
            .context("installing the masquerade rule")?
        {
            masquerading = true;
            info!(
                table = crate::masquerade::TABLE,
                "masquerading pod traffic that leaves cluster_cidrs"
            );
        }
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
                pod_cidrs: pod_cidrs.clone(),
            };
            let settings = SourceSettings {
                tailscale: tailscale.clone(),
                cluster_cidrs: config.cluster_cidrs.clone(),
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

    let mut current = config.clone();
    let mut file_watch = current.as_ref().map(|c| FileWatch::new(&c.path));
    let shutdown = loop {
        std::thread::sleep(WATCH_INTERVAL);
        if stop.load(Ordering::Relaxed) {
            break Ok(Shutdown::Signal);
        }
        let hangup = hup.swap(false, Ordering::Relaxed);
        let edited = file_watch
            .as_mut()
            .is_some_and(|w| w.changed(Instant::now()));
        if hangup || edited {
            // Before reading the file: a write racing the reload is then seen as a change.
            if let Some(watch) = file_watch.as_mut().filter(|_| hangup) {
                watch.resync();
            }
            if let (Some(current), Some(applier)) = (current.as_mut(), &applier) {
                reload(current, &pod_cidrs, applier);
            }
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
    if masquerading {
        if let Err(e) = crate::masquerade::remove() {
            warn!("removing the masquerade table: {e:#}");
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

/// Re-reads the config file and applies its static peers, per peer, beside the Tailscale
/// peers the source last found (unchanged peers of either kind keep their sessions; the
/// Tailscale peers change only as the conflict rule says). A file that does not parse, or
/// changes what only a restart applies, is refused with one log line and changes nothing.
fn reload(current: &mut RouterConfig, pod_cidrs: &[IpNet], applier: &Mutex<Applier>) {
    let path = current.path.clone();
    let result = (|| -> anyhow::Result<usize> {
        let new = RouterConfig::load(&path)?;
        check_reloadable(current, &new)
            .map_err(|key| anyhow::anyhow!("it changes {key}, which needs a restart"))?;
        let preshared = new.load_preshared_keys().context("preshared_key_file")?;
        let statics = StaticPeers {
            peers: new.peers.clone(),
            preshared,
            own_pod_cidrs: pod_cidrs.to_vec(),
        };
        let changed = applier.lock().set_statics(statics)?.peer_blocks;
        *current = new;
        Ok(changed)
    })();
    match result {
        Ok(changed) => info!(changed_peers = changed, "reloaded {}", path.display()),
        Err(e) => warn!(
            "refused the new {}: {}; nothing changed",
            path.display(),
            crate::logging::one_line(&e)
        ),
    }
}

/// This node's pod CIDRs: the config file's, else `--pod-cidr`, else (with a node name) the
/// Node object's or the existing CNI configuration's (see [`crate::pod_cidr`]); none when
/// nothing names them (a router without pods of its own). Logged with their source.
pub fn pod_cidrs(args: &RouterArgs, config: &RouterConfig) -> anyhow::Result<Vec<IpNet>> {
    if config.pod_cidrs.is_empty() && args.pod_cidrs.is_empty() && args.node_name.is_none() {
        return Ok(Vec::new());
    }
    let (cidrs, source) = crate::pod_cidr::resolve_blocking(
        &config.pod_cidrs,
        &args.pod_cidrs,
        args.node_name.as_deref(),
        &args.cni_dir,
    )?;
    let cidrs: Vec<IpNet> = cidrs.into_iter().map(|c| c.trunc()).collect();
    // The file's own are checked by its parser; the others must sit in the cluster too, or
    // their routes would never be announced to the other nodes.
    if let Some(outside) = cidrs.iter().find(|c| {
        !config
            .cluster_cidrs
            .iter()
            .any(|cluster| cluster.contains(*c))
    }) {
        bail!(
            "pod CIDR {outside} (from {source}) is not inside cluster_cidrs of {}",
            config.path.display()
        );
    }
    info!(pod_cidrs = ?cidrs, from = %source, "this node's pod CIDRs");
    Ok(cidrs)
}

/// How long the control plane's tasks get to finish after the stop, of the 2 s a stop may
/// take (the routes, rules and the TUN are removed after it).
const CONTROL_STOP_GRACE: Duration = Duration::from_millis(500);

/// Waits for every task of `tasks` to end.
async fn drain(tasks: &mut tokio::task::JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// Runs `tasks` until they all end or `stop` turns true; then gives them `grace` to end on
/// their own and aborts the rest. Each task stops at once when told; one that does not (a
/// server waiting for a client to hang up) must not hold the router's exit.
async fn run_until_stopped(
    mut tasks: tokio::task::JoinSet<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) {
    let ended_alone = tokio::select! {
        () = drain(&mut tasks) => true,
        () = async { let _ = stop.wait_for(|s| *s).await; } => false,
    };
    if !ended_alone {
        let _ = tokio::time::timeout(grace, drain(&mut tasks)).await;
    }
    // Dropping the set aborts what is left.
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
                    run_until_stopped(tasks, stopped, CONTROL_STOP_GRACE).await;
                });
                // Not waiting for blocking tasks: one still applying holds the applier's
                // lock, which the main thread takes next for the cleanup anyway.
                runtime.shutdown_background();
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    /// The router's arguments under a root of their own, as `tailsk8s router` parses them.
    #[derive(Debug, Parser)]
    struct Root {
        #[command(flatten)]
        args: RouterArgs,
    }

    fn router_args(args: &[&str]) -> RouterArgs {
        parse(args).unwrap()
    }

    fn parse(args: &[&str]) -> Result<RouterArgs, clap::Error> {
        Root::try_parse_from(std::iter::once("router").chain(args.iter().copied())).map(|r| r.args)
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_stop_is_cut_off_after_the_grace() {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        // A well-behaved task, and one that never ends (a client that never hangs up).
        let mut told = stopped.clone();
        tasks.spawn(async move {
            let _ = told.wait_for(|s| *s).await;
        });
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _dropped_when_aborted = dropped_tx;
            std::future::pending::<()>().await;
        });
        let grace = Duration::from_millis(100);
        let running = tokio::spawn(run_until_stopped(tasks, stopped, grace));
        let _ = stop.send(true);
        let stopped_at = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("stops despite the hanging task")
            .unwrap();
        assert!(stopped_at.elapsed() >= grace, "{:?}", stopped_at.elapsed());
        // The hanging task was aborted (its end of the channel dropped), not left running.
        let aborted = tokio::time::timeout(Duration::from_secs(5), dropped_rx).await;
        assert!(matches!(aborted, Ok(Err(_))), "the hanging task still runs");
    }

    #[tokio::test]
    async fn tasks_that_end_alone_need_no_stop() {
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async {});
        tokio::time::timeout(
            Duration::from_secs(5),
            run_until_stopped(tasks, stopped, Duration::from_secs(60)),
        )
        .await
        .expect("returns when every task ended");
    }

    #[test]
    fn router_arguments_parse() {
        assert_eq!(
            router_args(&[]),
            RouterArgs {
                config: None,
                ifname: None,
                workers: None,
                no_offload: false,
                worker_affinity: None,
                pod_cidrs: vec![],
                node_name: None,
                cni_dir: crate::cni::DEFAULT_CNI_DIR.into(),
            }
        );
        assert_eq!(
            router_args(&["--config", "/etc/r.toml", "tsk1"]),
            RouterArgs {
                config: Some("/etc/r.toml".into()),
                ifname: Some("tsk1".into()),
                workers: None,
                no_offload: false,
                worker_affinity: None,
                pod_cidrs: vec![],
                node_name: None,
                cni_dir: crate::cni::DEFAULT_CNI_DIR.into(),
            }
        );
        let fast = router_args(&[
            "--workers",
            "4",
            "--no-offload",
            "--worker-affinity",
            "pinned",
        ]);
        assert_eq!(
            (fast.workers, fast.no_offload, fast.worker_affinity),
            (Some(4), true, Some(WorkerAffinity::Pinned))
        );
        assert!(parse(&["--worker-affinity", "always"]).is_err());
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(parse(&["tsk0", "tsk1"]).is_err());
        assert!(parse(&["--config"]).is_err());
        assert!(parse(&["--workers", "0"]).is_err());
        assert!(parse(&["--workers", "257"]).is_err());
    }

    fn config_with_interface(interface: Option<&str>) -> RouterConfig {
        let mut text = String::from("private_key_file = \"/k\"\n");
        if let Some(i) = interface {
            text.push_str(&format!("interface = \"{i}\"\n"));
        }
        RouterConfig::parse(Path::new("/etc/r.toml"), &text).unwrap()
    }

    #[test]
    fn interface_comes_from_cli_file_or_default() {
        let none = RouterArgs {
            config: None,
            ifname: None,
            workers: None,
            no_offload: false,
            worker_affinity: None,
            pod_cidrs: vec![],
            node_name: None,
            cni_dir: crate::cni::DEFAULT_CNI_DIR.into(),
        };
        let tsk1 = RouterArgs {
            ifname: Some("tsk1".into()),
            ..none.clone()
        };
        let file_tsk1 = config_with_interface(Some("tsk1"));
        let file_none = config_with_interface(None);
        assert_eq!(none.interface(None).unwrap(), DEFAULT_IFNAME);
        assert_eq!(none.interface(Some(&file_none)).unwrap(), DEFAULT_IFNAME);
        assert_eq!(none.interface(Some(&file_tsk1)).unwrap(), "tsk1");
        assert_eq!(tsk1.interface(None).unwrap(), "tsk1");
        assert_eq!(tsk1.interface(Some(&file_none)).unwrap(), "tsk1");
        assert_eq!(tsk1.interface(Some(&file_tsk1)).unwrap(), "tsk1");
        let file_tsk9 = config_with_interface(Some("tsk9"));
        let err = tsk1.interface(Some(&file_tsk9)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "interface `tsk1` on the command line disagrees with interface = \"tsk9\" in /etc/r.toml"
        );
        for bad in ["a/b", "much-too-long-name", ""] {
            let args = RouterArgs {
                ifname: Some(bad.into()),
                ..none.clone()
            };
            assert!(matches!(
                args.interface(None),
                Err(ArgsError::BadInterface { .. })
            ));
        }
    }

    fn cluster_config(pod_cidrs: &str) -> RouterConfig {
        let text = format!(
            "private_key_file = \"/k\"\ncluster_cidrs = [\"198.19.0.0/16\", \"fd00:19::/48\"]\n\
             pod_cidrs = [{pod_cidrs}]\n"
        );
        RouterConfig::parse(Path::new("/etc/r.toml"), &text).unwrap()
    }

    fn args_with(extra: &[&str], cni_dir: &Path) -> RouterArgs {
        let mut all = vec!["--cni-dir", cni_dir.to_str().unwrap()];
        all.extend_from_slice(extra);
        parse(&all).unwrap()
    }

    #[test]
    fn pod_cidrs_from_the_file_then_the_flag_then_the_cni_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let network = crate::cni::PodNetwork {
            bridge: "cnio0".into(),
            pod_cidrs: vec![net("198.19.7.0/24")],
            mtu: 1420,
        };
        network.write_unless_exists(dir.path()).unwrap();

        let file = cluster_config("\"198.19.1.0/24\"");
        let flag = args_with(&["--pod-cidr", "198.19.2.0/24"], dir.path());
        assert_eq!(pod_cidrs(&flag, &file).unwrap(), [net("198.19.1.0/24")]);

        let empty_file = cluster_config("");
        let both = args_with(
            &[
                "--pod-cidr",
                "198.19.2.0/24",
                "--pod-cidr",
                "fd00:19:0:2::/64",
            ],
            dir.path(),
        );
        assert_eq!(
            pod_cidrs(&both, &empty_file).unwrap(),
            [net("198.19.2.0/24"), net("fd00:19:0:2::/64")]
        );

        // Without a node name the host's CNI directory is none of the router's business.
        let neither = args_with(&[], dir.path());
        assert_eq!(pod_cidrs(&neither, &empty_file).unwrap(), []);
        // With one (and no cluster credentials here) the existing CNI configuration speaks.
        let in_node = args_with(&["--node-name", "node-a"], dir.path());
        assert_eq!(
            pod_cidrs(&in_node, &empty_file).unwrap(),
            [net("198.19.7.0/24")]
        );

        let outside = args_with(&["--pod-cidr", "198.51.100.0/24"], dir.path());
        let err = pod_cidrs(&outside, &empty_file).unwrap_err();
        assert!(
            err.to_string().contains("not inside cluster_cidrs"),
            "{err}"
        );
        // Host bits are dropped, as the config file's parser would refuse them.
        let host_bits = args_with(&["--pod-cidr", "198.19.2.1/24"], dir.path());
        assert_eq!(
            pod_cidrs(&host_bits, &empty_file).unwrap(),
            [net("198.19.2.0/24")]
        );
    }
}
