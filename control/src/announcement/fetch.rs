//! Fetching peers' announcements: one HTTP GET per peer, to the peer's own tailnet address,
//! from ours (so the peer's `whois` recognises us), with a deadline and a size cap; many peers
//! at once with bounded concurrency.
//!
//! The key is believed because of where the answer came from: the TCP connection goes to the
//! peer's tailnet address, and tailscaled only delivers packets from that address if they
//! came from that node.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::document::{Announcement, AnnouncementError, ANNOUNCEMENT_PATH, MAX_DOCUMENT_LEN};

/// How long one fetch (connect, request, whole body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Fetches in flight at once.
pub const MAX_CONCURRENT_FETCHES: usize = 16;

/// Why a peer's announcement could not be had.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("connecting to {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("HTTP to {addr}: {error}")]
    Http { addr: SocketAddr, error: String },
    #[error("{addr} answered {status}")]
    Status { addr: SocketAddr, status: u16 },
    #[error("{addr}: no answer within {FETCH_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("{addr}: {error}")]
    Document {
        addr: SocketAddr,
        error: AnnouncementError,
    },
}

/// Where to fetch from and from which of our addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The peer's tailnet address and announcement port.
    pub peer: SocketAddr,
    /// Our tailnet address of the same family, to connect from (`None`: the kernel picks).
    pub local: Option<IpAddr>,
}

/// Fetches one announcement.
pub async fn fetch(target: Target) -> Result<Announcement, FetchError> {
    let addr = target.peer;
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(target)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout { addr }),
    }
}

async fn fetch_inner(target: Target) -> Result<Announcement, FetchError> {
    let addr = target.peer;
    let connect = |error| FetchError::Connect { addr, error };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(connect)?;
    if let Some(local) = target.local {
        socket.bind(SocketAddr::new(local, 0)).map_err(connect)?;
    }
    let stream = socket.connect(addr).await.map_err(connect)?;
    // The answer's origin is what makes the key believable: check it, not assume it.
    let origin = stream.peer_addr().map_err(connect)?;
    if origin != addr {
        return Err(FetchError::Http {
            addr,
            error: format!("connected to {origin} instead"),
        });
    }
    let http = |error: hyper::Error| FetchError::Http {
        addr,
        error: error.to_string(),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(connection);
    let host = match addr {
        SocketAddr::V4(_) => addr.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    };
    let request = hyper::Request::get(ANNOUNCEMENT_PATH)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http {
            addr,
            error: e.to_string(),
        })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_DOCUMENT_LEN)
        .collect()
        .await
        .map_err(|e| FetchError::Http {
            addr,
            error: format!("reading the body: {e}"),
        });
    driver.abort();
    if !status.is_success() {
        return Err(FetchError::Status {
            addr,
            status: status.as_u16(),
        });
    }
    let body = body?.to_bytes();
    let (announcement, skipped) =
        Announcement::parse(&body).map_err(|error| FetchError::Document { addr, error })?;
    if skipped > 0 {
        tracing::debug!(%addr, skipped, "announcement entries this version does not read");
    }
    Ok(announcement)
}

/// Fetches many announcements, at most `limit` at once; results in no particular order,
/// each with its caller-chosen `id`. Each peer's targets (its tailnet addresses) are tried in
/// order until one answers; the last error is returned.
pub async fn fetch_many<I: Send + 'static>(
    targets: Vec<(I, Vec<Target>)>,
    limit: usize,
) -> Vec<(I, Result<Announcement, FetchError>)> {
    let permits = Arc::new(Semaphore::new(limit.max(1)));
    let mut tasks = JoinSet::new();
    for (id, target) in targets {
        let permits = permits.clone();
        tasks.spawn(async move {
            // The semaphore is never closed, so acquiring cannot fail.
            let _permit = permits.acquire_owned().await.ok();
            (id, fetch_first(target).await)
        });
    }
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(result) = done {
            results.push(result);
        }
    }
    results
}

/// The first of `targets` that answers, else the last error.
async fn fetch_first(targets: Vec<Target>) -> Result<Announcement, FetchError> {
    let mut last = None;
    for target in targets {
        match fetch(target).await {
            Ok(a) => return Ok(a),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(FetchError::Http {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        error: "the peer has no tailnet address".into(),
    }))
}
