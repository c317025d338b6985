//! The command line of `tailsk8s`: its grammar (clap), logging setup, dispatch to the
//! subcommands, the small key commands (`genkey`, `pubkey`, as in `wg`), and how an error is
//! shown to the user (one line).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tailsk8s_dataplane::affinity::WorkerAffinity;
use tailsk8s_dataplane::key::Key;
use thiserror::Error;
use tracing_subscriber::EnvFilter;

use crate::config::{check_ifname, RouterConfig};
use crate::tailnet_admin::{AuthorizeArgs, RouteArgs};
use crate::tailscale::admin::Change;

/// The interface name when neither the command line nor the config file gives one.
pub const DEFAULT_IFNAME: &str = "tsk0";
/// A base64 key and a newline are 45 bytes; more input than this is not a key.
const MAX_KEY_INPUT: u64 = 1024;

/// tailsk8s: a userspace WireGuard router for Kubernetes pod traffic.
#[derive(Debug, Parser)]
#[command(name = "tailsk8s", version)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug` or `tailsk8s=trace,info` (overrides RUST_LOG;
    /// default: info). Logs go to stderr.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the WireGuard router on a TUN interface.
    Router(RouterArgs),
    /// Run the demonstration.
    Demo(DemoArgs),
    /// Write this node's CNI configuration (bridge `cnio0`, host-local IPAM over the node's
    /// pod CIDRs, MTU = tunnel MTU) unless the CNI directory already holds one.
    CniConfig(CniConfigArgs),
    /// Print a new private key in base64 (like `wg genkey`).
    Genkey,
    /// Read a base64 private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Advertise pod CIDRs as subnet routes of this node (tailscaled's prefs, keeping its
    /// other routes); with --approve also approve them in the Tailscale cloud API.
    Advertise(RouteArgs),
    /// Withdraw pod CIDRs from this node's advertised routes; with --approve also
    /// un-approve them in the Tailscale cloud API.
    Withdraw(RouteArgs),
    /// Approve a device (this node by default) in a tailnet that requires device approval.
    Authorize(AuthorizeArgs),
    /// Show the running router's peers (node, pod CIDRs, endpoint, path, handshake, traffic),
    /// its peer source and its drops.
    Status(StatusArgs),
}

/// `tailsk8s status [--json] [IFNAME]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct StatusArgs {
    /// Print the JSON document (see README) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The router's interface.
    #[arg(default_value = DEFAULT_IFNAME)]
    pub ifname: String,
}

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
}

/// `tailsk8s demo`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DemoArgs {}

/// `tailsk8s cni-config [--config FILE] [--pod-cidr CIDR]… [--node-name NAME] [--cni-dir DIR]`
#[derive(Debug, Clone, PartialEq, Eq, Args)]
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
    #[arg(long, value_name = "DIR", default_value = crate::cni::DEFAULT_CNI_DIR)]
    pub cni_dir: PathBuf,
    /// The pods' bridge.
    #[arg(long, value_name = "NAME", default_value = crate::cni::DEFAULT_BRIDGE)]
    pub bridge: String,
}

/// Errors of the command line itself (usage errors are clap's).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
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
    pub fn interface(&self, config: Option<&RouterConfig>) -> Result<String, CliError> {
        let from_file = config.and_then(|c| c.interface.as_deref().map(|i| (i, &c.path)));
        match (self.ifname.as_deref(), from_file) {
            (Some(cli), Some((file, path))) if cli != file => Err(CliError::InterfaceMismatch {
                cli: cli.to_string(),
                file: file.to_string(),
                path: path.clone(),
            }),
            (Some(cli), _) => {
                check_ifname(cli).map_err(|reason| CliError::BadInterface {
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

/// Logs to stderr, filtered by `--log-level`, else `RUST_LOG`, else `info`. A filter that does
/// not parse is an error rather than silently logging nothing.
pub fn init_tracing(log_level: Option<&str>) -> anyhow::Result<()> {
    // The filter's parse error repeats itself in its source chain: keep only its message.
    let parse = |what: &str, filter: &str| {
        EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("bad {what} `{filter}`: {e}"))
    };
    let filter = match log_level {
        Some(level) => parse("--log-level", level)?,
        None => match std::env::var("RUST_LOG") {
            Ok(level) if !level.is_empty() => parse("RUST_LOG", &level)?,
            // boringtun logs routine session expiry at ERROR: keep its chatter out by default.
            _ => EnvFilter::new("info,boringtun=off"),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Router(args) => crate::router::run(&args),
        Command::Demo(args) => crate::demo::run(&args),
        Command::CniConfig(args) => crate::cni::command(&args),
        Command::Genkey => {
            warn_if_stdout_is_shared_file();
            genkey(&mut std::io::stdout().lock())
        }
        Command::Pubkey => pubkey(&mut std::io::stdin().lock(), &mut std::io::stdout().lock()),
        Command::Advertise(args) => {
            crate::tailnet_admin::run_routes(&args, Change::Add, &mut std::io::stdout().lock())
        }
        Command::Withdraw(args) => {
            crate::tailnet_admin::run_routes(&args, Change::Remove, &mut std::io::stdout().lock())
        }
        Command::Authorize(args) => {
            crate::tailnet_admin::run_authorize(&args, &mut std::io::stdout().lock())
        }
        Command::Status(args) => crate::status::command(
            std::path::Path::new(tailsk8s_dataplane::uapi::DEFAULT_SOCKET_DIR),
            &args.ifname,
            args.json,
            &mut std::io::stdout().lock(),
        ),
    }
}

/// Writes a new private key, base64 and a newline.
pub fn genkey(out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "{}", Key::generate_private()).context("cannot write the key")?;
    out.flush().context("cannot write the key")
}

/// Reads a base64 private key and writes its public key, base64 and a newline.
pub fn pubkey(input: &mut dyn Read, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut bytes = Vec::with_capacity(64);
    input
        .take(MAX_KEY_INPUT)
        .read_to_end(&mut bytes)
        .context("cannot read the private key from stdin")?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| anyhow::anyhow!("stdin is not a base64 private key: not text"))?;
    let private = Key::from_base64(text).context("stdin is not a base64 private key")?;
    writeln!(out, "{}", private.public_key()).context("cannot write the key")?;
    out.flush().context("cannot write the key")
}

/// Like `wg genkey`: a private key about to land in a file others can read deserves a word.
fn warn_if_stdout_is_shared_file() {
    let stdout = std::io::stdout();
    let Ok(fd) = stdout.as_fd().try_clone_to_owned() else {
        return;
    };
    if let Ok(meta) = std::fs::File::from(fd).metadata() {
        if meta.is_file() && meta.mode() & 0o077 != 0 {
            eprintln!(
                "warning: writing a private key to a file that group or others can read; \
                 consider `umask 077` first"
            );
        }
    }
}

/// An error as the one line the user sees: the whole cause chain, joined with ": ".
pub fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tailsk8s").chain(args.iter().copied()))
    }

    fn router_args(args: &[&str]) -> RouterArgs {
        match parse(args).unwrap().command {
            Command::Router(r) => r,
            other => panic!("not router: {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn router_arguments_parse() {
        assert_eq!(
            router_args(&["router"]),
            RouterArgs {
                config: None,
                ifname: None,
                workers: None,
                no_offload: false,
                worker_affinity: None,
            }
        );
        assert_eq!(
            router_args(&["router", "--config", "/etc/r.toml", "tsk1"]),
            RouterArgs {
                config: Some("/etc/r.toml".into()),
                ifname: Some("tsk1".into()),
                workers: None,
                no_offload: false,
                worker_affinity: None,
            }
        );
        let fast = router_args(&[
            "router",
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
        assert!(parse(&["router", "--worker-affinity", "always"]).is_err());
        let cli = parse(&["router", "tsk2", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        let cli = parse(&["--log-level", "warn", "genkey"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("warn"));
        assert!(matches!(cli.command, Command::Genkey));
        assert!(matches!(
            parse(&["demo"]).unwrap().command,
            Command::Demo(_)
        ));
        assert!(matches!(
            parse(&["pubkey"]).unwrap().command,
            Command::Pubkey
        ));
    }

    #[test]
    fn tailnet_admin_arguments_parse() {
        let Command::Advertise(args) = parse(&["advertise", "--cidr", "10.100.1.0/24"])
            .unwrap()
            .command
        else {
            panic!("not advertise")
        };
        assert_eq!(
            args.cidrs,
            ["10.100.1.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
        assert!(!args.approve);
        assert_eq!(
            args.local.socket,
            Path::new(crate::tailscale::DEFAULT_SOCKET)
        );
        assert_eq!(
            args.cloud.api_base,
            crate::tailscale::cloud::DEFAULT_API_BASE
        );
        let Command::Withdraw(args) = parse(&[
            "withdraw",
            "--cidr",
            "10.100.1.0/24",
            "--cidr",
            "fd00:100:1::/64",
            "--approve",
            "--socket",
            "/tmp/ts.sock",
            "--oauth-client-id",
            "kX",
            "--oauth-client-secret-file",
            "/etc/secret",
            "--api-base",
            "http://127.0.0.1:1/api/v2",
        ])
        .unwrap()
        .command
        else {
            panic!("not withdraw")
        };
        assert_eq!(args.cidrs.len(), 2);
        assert!(args.approve);
        assert_eq!(args.local.socket, Path::new("/tmp/ts.sock"));
        assert_eq!(args.cloud.oauth_client_id.as_deref(), Some("kX"));
        assert_eq!(args.cloud.api_base, "http://127.0.0.1:1/api/v2");
        let Command::Authorize(args) =
            parse(&["authorize", "--api-key-file", "/k", "--node-id", "nX"])
                .unwrap()
                .command
        else {
            panic!("not authorize")
        };
        assert_eq!(args.node_id.as_deref(), Some("nX"));
        assert_eq!(args.cloud.api_key_file.as_deref(), Some(Path::new("/k")));

        // No CIDR, a CIDR with host bits, an OAuth ID without its secret, both kinds of key.
        assert!(parse(&["advertise"]).is_err());
        assert!(parse(&["advertise", "--cidr", "10.100.1.1/24"]).is_err());
        assert!(parse(&["authorize", "--oauth-client-id", "kX"]).is_err());
        assert!(parse(&["authorize", "--oauth-client-secret-file", "/s"]).is_err());
        assert!(parse(&[
            "authorize",
            "--api-key-file",
            "/k",
            "--oauth-client-id",
            "kX",
            "--oauth-client-secret-file",
            "/s"
        ])
        .is_err());
        // Never a key on the command line (ps would show it).
        assert!(parse(&["authorize", "--api-key", "tskey-api-x"]).is_err());
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["route"]).is_err());
        assert!(parse(&["router", "tsk0", "tsk1"]).is_err());
        assert!(parse(&["router", "--config"]).is_err());
        assert!(parse(&["router", "--workers", "0"]).is_err());
        assert!(parse(&["router", "--workers", "257"]).is_err());
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
                Err(CliError::BadInterface { .. })
            ));
        }
    }

    #[test]
    fn genkey_then_pubkey_agree_with_the_key_type() {
        let mut private = Vec::new();
        genkey(&mut private).unwrap();
        let text = String::from_utf8(private.clone()).unwrap();
        assert!(text.ends_with('\n') && text.len() == 45, "{text:?}");
        let key = Key::from_base64(&text).unwrap();
        assert_eq!(key, key.clamped());

        let mut public = Vec::new();
        pubkey(&mut private.as_slice(), &mut public).unwrap();
        assert_eq!(
            String::from_utf8(public).unwrap(),
            format!("{}\n", key.public_key())
        );
    }

    #[test]
    fn pubkey_matches_a_known_vector() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .to_base64();
        let mut public = Vec::new();
        pubkey(&mut private.as_bytes(), &mut public).unwrap();
        let expected =
            Key::from_hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
                .unwrap();
        assert_eq!(String::from_utf8(public).unwrap(), format!("{expected}\n"));
    }

    #[test]
    fn pubkey_refuses_garbage() {
        for input in [&b""[..], b"hello\n", &[0xff; 44], &[b'A'; 4096]] {
            let mut out = Vec::new();
            let err = pubkey(&mut &input[..], &mut out).unwrap_err();
            assert!(
                one_line(&err).starts_with("stdin is not a base64 private key"),
                "{err:#}"
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn errors_become_one_line() {
        let err = anyhow::anyhow!("inner\nsecond line").context("outer");
        assert_eq!(one_line(&err), "outer: inner second line");
    }
}
