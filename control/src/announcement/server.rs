//! The announcement server: this router's [`Announcement`](super::Announcement) over HTTP,
//! bound to this node's tailnet addresses only, answered only to tagged cluster nodes.
//!
//! Authorization asks tailscaled who the caller is (`whois` on the TCP peer address, which
//! tailscaled authenticated when the packet came in over the tailnet): a node carrying the
//! cluster tag gets the document; a node without it, or an address tailscaled does not know
//! (its 404), gets 403; when tailscaled cannot answer, 503 — never the document. The check is
//! behind the [`Whois`] trait so it is unit tested here with a fake; the real LocalAPI client
//! implements it.
//!
//! The listeners are bound with IP_FREEBIND: the router may start before tailscaled has put
//! its addresses on `tailscale0`, and a listener on an address not (yet) present is still only
//! ever reachable on that address — never on the node's other interfaces.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::document::ANNOUNCEMENT_PATH;

/// A tailnet node as `whois` names it: enough to authorize it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub stable_id: String,
    pub tags: Vec<String>,
}

/// Who owns a tailnet address: `Ok(None)` when tailscaled does not know it.
pub trait Whois: Send + Sync + 'static {
    fn whois(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Option<Caller>, String>> + Send;
}

/// The outcome of asking who a caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A tagged cluster node.
    Allow(Caller),
    /// Known but untagged, or unknown: 403.
    Deny(&'static str),
    /// tailscaled could not say: 503, and no document.
    Unavailable(String),
}

/// Decides whether the caller at `addr` may read the announcement.
pub async fn authorize<W: Whois>(whois: &W, addr: SocketAddr, tag: &str) -> Verdict {
    match whois.whois(addr).await {
        Ok(Some(caller)) if caller.tags.iter().any(|t| t == tag) => Verdict::Allow(caller),
        Ok(Some(_)) => Verdict::Deny("caller is not tagged as a cluster node"),
        Ok(None) => Verdict::Deny("caller is not a known tailnet node"),
        Err(e) => Verdict::Unavailable(e),
    }
}

struct ServerState<W> {
    whois: W,
    tag: String,
    /// The document, serialised once.
    document: String,
}

/// Binds one listener per address on `port`, with IP_FREEBIND (see the module comment).
pub fn bind(addrs: &[IpAddr], port: u16) -> std::io::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(*ip, port);
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            match ip {
                IpAddr::V4(_) => socket.set_freebind(true)?,
                IpAddr::V6(_) => {
                    socket.set_only_v6(true)?;
                    socket.set_freebind_ipv6(true)?;
                }
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(128)?;
            TcpListener::from_std(socket.into())
        })
        .collect()
}

/// Serves `document` (the announcement's JSON) on every listener until `shutdown` completes.
pub async fn serve<W: Whois>(
    listeners: Vec<TcpListener>,
    document: String,
    whois: W,
    tag: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(ServerState {
        whois,
        tag,
        document,
    });
    let app = Router::new()
        .route(ANNOUNCEMENT_PATH, get(announcement::<W>))
        .with_state(state);
    let shutdown = futures_shared(shutdown);
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let app = app.clone();
        let stop = shutdown.clone();
        servers.spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let mut stop = stop;
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        });
    }
    let mut result = Ok(());
    while let Some(done) = servers.join_next().await {
        if let Ok(Err(e)) = done {
            result = Err(e);
        }
    }
    result
}

/// One shutdown future shared by every listener: a watch channel set when it completes.
fn futures_shared(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    rx
}

async fn announcement<W: Whois>(
    State(state): State<Arc<ServerState<W>>>,
    ConnectInfo(caller): ConnectInfo<SocketAddr>,
) -> Response {
    match authorize(&state.whois, caller, &state.tag).await {
        Verdict::Allow(node) => {
            tracing::debug!(%caller, node = %node.stable_id, "announcement served");
            (
                [(header::CONTENT_TYPE, "application/json")],
                state.document.clone(),
            )
                .into_response()
        }
        Verdict::Deny(why) => {
            tracing::debug!(%caller, "announcement refused: {why}");
            (StatusCode::FORBIDDEN, why).into_response()
        }
        Verdict::Unavailable(e) => {
            tracing::debug!(%caller, "announcement refused: whois failed: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot identify the caller",
            )
                .into_response()
        }
    }
}
