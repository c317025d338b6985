//! The command line of `tailsk8s`: the grammar's root (global flags and the subcommands, whose
//! arguments live with their commands) and dispatch.

use clap::{Parser, Subcommand};

use crate::cni::CniConfigArgs;
use crate::demo::DemoArgs;
use crate::logging::LogFormat;
use crate::router::RouterArgs;
use crate::status::StatusArgs;
use crate::tailnet_admin::{AuthorizeArgs, RouteArgs};
use crate::tailscale::admin::Change;

/// tailsk8s: a userspace WireGuard router for Kubernetes pod traffic.
#[derive(Debug, Parser)]
#[command(name = "tailsk8s", version)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug` or `tailsk8s=trace,info` (overrides RUST_LOG;
    /// default: info). Logs go to stderr.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format: `human`, or `json` (one object per line) for log pipelines.
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
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

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Router(args) => crate::router::run(&args),
        Command::Demo(args) => crate::demo::run(&args),
        Command::CniConfig(args) => crate::cni::command(&args),
        Command::Genkey => crate::key_commands::genkey_command(),
        Command::Pubkey => crate::key_commands::pubkey_command(),
        Command::Advertise(args) => {
            crate::tailnet_admin::run_routes(&args, Change::Add, &mut std::io::stdout().lock())
        }
        Command::Withdraw(args) => {
            crate::tailnet_admin::run_routes(&args, Change::Remove, &mut std::io::stdout().lock())
        }
        Command::Authorize(args) => {
            crate::tailnet_admin::run_authorize(&args, &mut std::io::stdout().lock())
        }
        Command::Status(args) => crate::status::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tailsk8s").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_and_subcommands_parse() {
        assert!(matches!(
            parse(&["router"]).unwrap().command,
            Command::Router(_)
        ));
        let cli = parse(&["router", "tsk2", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        assert_eq!(cli.log_format, LogFormat::Human);
        let cli = parse(&["--log-level", "warn", "genkey"]).unwrap();
        assert_eq!(cli.log_level.as_deref(), Some("warn"));
        assert!(matches!(cli.command, Command::Genkey));
        let cli = parse(&["router", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = parse(&["--log-format", "human", "pubkey"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Human);
        assert!(parse(&["router", "--log-format", "xml"]).is_err());
        assert!(matches!(
            parse(&["demo"]).unwrap().command,
            Command::Demo(_)
        ));
        assert!(matches!(
            parse(&["pubkey"]).unwrap().command,
            Command::Pubkey
        ));
        assert!(matches!(
            parse(&["cni-config"]).unwrap().command,
            Command::CniConfig(_)
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
    }
}
