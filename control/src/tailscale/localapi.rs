//! The client of tailscaled's LocalAPI: HTTP/1.1 over its UNIX socket, one connection per
//! request (the daemon is local; nothing to keep alive), every request bounded in time and
//! size. tailscaled refuses any request whose `Host` is not `local-tailscaled.sock`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::UnixStream;

use super::documents::{self, DocumentError, MaskedPrefs, Notify, Prefs};
use super::{TailnetNode, TailnetView};

/// The `Host` header tailscaled requires (any other gets 403).
pub const HOST: &str = "local-tailscaled.sock";
/// How long one request may take, connect to last byte, unless changed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest reply read: a status of several thousand peers fits many times over.
pub const MAX_DOCUMENT: usize = 64 << 20;
/// The watch-ipn-bus message kinds asked for: peer changes. Older daemons ignore bits they
/// do not know, and every message is taken as "something changed" anyway.
pub const WATCH_MASK: u64 = 4096;

/// What went wrong talking to tailscaled. Each names the request.
#[derive(Debug, Error)]
pub enum LocalApiError {
    #[error("cannot connect to tailscaled's LocalAPI at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("LocalAPI {request}: {source}")]
    Http {
        request: String,
        #[source]
        source: hyper::Error,
    },
    #[error("LocalAPI {request}: no complete answer within {timeout:?}")]
    Timeout { request: String, timeout: Duration },
    #[error("LocalAPI {request}: answered {status}: {message}")]
    Status {
        request: String,
        status: StatusCode,
        message: String,
    },
    #[error("LocalAPI {request}: cannot build the request: {reason}")]
    Request { request: String, reason: String },
    #[error("LocalAPI {request}: reply larger than {limit} bytes")]
    TooLarge { request: String, limit: usize },
    #[error("LocalAPI {request}: {source}")]
    Document {
        request: String,
        #[source]
        source: DocumentError,
    },
}

/// A LocalAPI client for one socket. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct LocalApi {
    socket: PathBuf,
    timeout: Duration,
}

impl LocalApi {
    pub fn new(socket: PathBuf) -> Self {
        LocalApi {
            socket,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another per-request time limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The whole tailnet view (`/status`).
    pub async fn status(&self) -> Result<TailnetView, LocalApiError> {
        let request = "GET /localapi/v0/status";
        let body = self
            .fetch(Method::GET, "/localapi/v0/status", None, request)
            .await?;
        documents::parse_status(&body).map_err(|source| document(request, source))
    }

    /// This node only (`/status?peers=false`): cheap in a large tailnet.
    pub async fn self_status(&self) -> Result<TailnetView, LocalApiError> {
        let request = "GET /localapi/v0/status?peers=false";
        let body = self
            .fetch(
                Method::GET,
                "/localapi/v0/status?peers=false",
                None,
                request,
            )
            .await?;
        documents::parse_status(&body).map_err(|source| document(request, source))
    }

    /// The node owning a tailnet address (`/whois`); `None` when tailscaled knows none (404).
    pub async fn whois(&self, addr: SocketAddr) -> Result<Option<TailnetNode>, LocalApiError> {
        // `[` and `]` of an IPv6 address are not allowed in a query: escape them.
        let addr_text = addr.to_string().replace('[', "%5B").replace(']', "%5D");
        let path = format!("/localapi/v0/whois?addr={addr_text}");
        let request = format!("GET /localapi/v0/whois?addr={addr}");
        match self.fetch(Method::GET, &path, None, &request).await {
            Ok(body) => documents::parse_whois(&body).map_err(|source| document(&request, source)),
            Err(LocalApiError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// This node's prefs.
    pub async fn prefs(&self) -> Result<Prefs, LocalApiError> {
        let request = "GET /localapi/v0/prefs";
        let body = self
            .fetch(Method::GET, "/localapi/v0/prefs", None, request)
            .await?;
        documents::parse_prefs(&body).map_err(|source| document(request, source))
    }

    /// Changes the prefs named in `change`; returns the prefs after the change. Needs root or
    /// tailscaled's operator user.
    pub async fn patch_prefs(&self, change: &MaskedPrefs) -> Result<Prefs, LocalApiError> {
        let request = "PATCH /localapi/v0/prefs";
        // Serializing a struct of strings and bools cannot fail.
        let json = serde_json::to_vec(change).unwrap_or_default();
        let body = self
            .fetch(Method::PATCH, "/localapi/v0/prefs", Some(json), request)
            .await?;
        documents::parse_prefs(&body).map_err(|source| document(request, source))
    }

    /// Follows `watch-ipn-bus`. Each message means "something may have changed": re-read the
    /// status. The stream has no time limit once open (only the connect and the reply head
    /// do): callers re-read on a timer as well, since a stream can go quiet when broken.
    pub async fn watch(&self) -> Result<Watch, LocalApiError> {
        let path = format!("/localapi/v0/watch-ipn-bus?mask={WATCH_MASK}");
        let request = format!("GET {path}");
        let response =
            tokio::time::timeout(self.timeout, self.send(Method::GET, &path, None, &request))
                .await
                .map_err(|_| self.timed_out(&request))??;
        if response.status() != StatusCode::OK {
            return Err(self.refused(response, &request).await);
        }
        Ok(Watch {
            body: response.into_body(),
            buf: BytesMut::new(),
            request,
        })
    }

    /// One request with its reply body, within the time limit; a non-200 answer is an error.
    async fn fetch(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        request: &str,
    ) -> Result<Bytes, LocalApiError> {
        let exchange = async {
            let response = self.send(method, path, body, request).await?;
            if response.status() != StatusCode::OK {
                return Err(self.refused(response, request).await);
            }
            read_body(response.into_body(), request).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.timed_out(request))?
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        request: &str,
    ) -> Result<Response<Incoming>, LocalApiError> {
        let http = |source| LocalApiError::Http {
            request: request.to_string(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| LocalApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection runs until the reply is read (or dropped); its errors surface through
        // the request or the body.
        tokio::spawn(connection);
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, HOST);
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request_value = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| LocalApiError::Request {
                request: request.to_string(),
                reason: e.to_string(),
            })?;
        sender.send_request(request_value).await.map_err(http)
    }

    /// The error for a non-200 answer, with the start of its body (tailscaled explains there).
    async fn refused(&self, response: Response<Incoming>, request: &str) -> LocalApiError {
        let status = response.status();
        let body = Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let message: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let message = match message.char_indices().nth(200) {
            Some((cut, _)) => format!("{}…", &message[..cut]),
            None => message,
        };
        LocalApiError::Status {
            request: request.to_string(),
            status,
            message,
        }
    }

    fn timed_out(&self, request: &str) -> LocalApiError {
        LocalApiError::Timeout {
            request: request.to_string(),
            timeout: self.timeout,
        }
    }
}

fn document(request: &str, source: DocumentError) -> LocalApiError {
    LocalApiError::Document {
        request: request.to_string(),
        source,
    }
}

async fn read_body(body: Incoming, request: &str) -> Result<Bytes, LocalApiError> {
    match Limited::new(body, MAX_DOCUMENT).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(source) => Err(LocalApiError::Http {
                request: request.to_string(),
                source: *source,
            }),
            Err(_) => Err(LocalApiError::TooLarge {
                request: request.to_string(),
                limit: MAX_DOCUMENT,
            }),
        },
    }
}

/// An open watch-ipn-bus stream: newline-delimited `ipn.Notify` messages.
#[derive(Debug)]
pub struct Watch {
    body: Incoming,
    buf: BytesMut,
    request: String,
}

impl Watch {
    /// The next message; `Ok(None)` when tailscaled closed the stream. After an error the
    /// stream is of no further use: open a new one.
    pub async fn next(&mut self) -> Result<Option<Notify>, LocalApiError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(end + 1);
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return documents::parse_notify(line)
                    .map(Some)
                    .map_err(|source| document(&self.request, source));
            }
            if self.buf.len() > MAX_DOCUMENT {
                return Err(LocalApiError::TooLarge {
                    request: self.request.clone(),
                    limit: MAX_DOCUMENT,
                });
            }
            match self.body.frame().await {
                None => {
                    // A last message without its newline still counts.
                    let rest = std::mem::take(&mut self.buf);
                    let rest = rest.trim_ascii();
                    if rest.is_empty() {
                        return Ok(None);
                    }
                    return documents::parse_notify(rest)
                        .map(Some)
                        .map_err(|source| document(&self.request, source));
                }
                Some(Err(source)) => {
                    return Err(LocalApiError::Http {
                        request: self.request.clone(),
                        source,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
