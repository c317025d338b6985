//! The plumbing both stand-in servers share: an HTTP/1.1 server on its own thread and tokio
//! runtime (so synchronous end-to-end tests and async unit tests can both use it), a
//! listener bound before `start` returns (a client may connect at once), the record of the
//! requests received, and a stop that closes every open connection, watch streams included.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

/// One request as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent (`/api/v2/device/1/routes`, `/localapi/v0/whois?addr=…`).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// `"METHOD target"`, handy for comparing the sequence of requests.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.target)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of a query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let (_, query) = self.target.split_once('?')?;
        form_pairs(query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// `a=1&b=%5B` → pairs, percent- and `+`-decoded.
pub fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body: whole, a stream of chunks (watch-ipn-bus), or one that never comes.
pub enum SimBody {
    Full(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    // A whole body gets a Content-Length, as Go's net/http gives small replies.
    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            SimBody::Stream(_) => SizeHint::default(),
        }
    }
}

pub type Reply = Response<SimBody>;
pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;
/// Answers one request (its body already read).
pub type Handler = Arc<dyn Fn(RecordedRequest) -> ReplyFuture + Send + Sync>;

pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(SimBody::Full(Some(body.into())))
        .expect("static response parts are valid")
}

pub fn json_reply(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}

pub fn text_reply(status: StatusCode, text: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", format!("{text}\n"))
}

/// What the server listens on.
pub enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// A running server thread; stopping it (or dropping it) closes every connection.
pub struct ServerThread {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    pub fn spawn(
        listener: Listener,
        handler: Handler,
        requests: Arc<Mutex<Vec<RecordedRequest>>>,
    ) -> std::io::Result<ServerThread> {
        match &listener {
            Listener::Unix(l) => l.set_nonblocking(true)?,
            Listener::Tcp(l) => l.set_nonblocking(true)?,
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (shutdown, mut stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("tailnet-sim".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = either::Listening::from_std(listener) else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => match accepted {
                                Ok(io) => serve(io, handler.clone(), requests.clone()),
                                Err(_) => break,
                            },
                        }
                    }
                });
                // Dropping the runtime here cancels every connection task.
                drop(runtime);
            })?;
        Ok(ServerThread {
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One listener and stream type over UNIX and TCP sockets.
mod either {
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    pub enum Listening {
        Unix(tokio::net::UnixListener),
        Tcp(tokio::net::TcpListener),
    }

    pub enum Stream {
        Unix(tokio::net::UnixStream),
        Tcp(tokio::net::TcpStream),
    }

    impl Listening {
        /// Needs the runtime: call inside it.
        pub fn from_std(listener: super::Listener) -> std::io::Result<Listening> {
            Ok(match listener {
                super::Listener::Unix(l) => Listening::Unix(tokio::net::UnixListener::from_std(l)?),
                super::Listener::Tcp(l) => Listening::Tcp(tokio::net::TcpListener::from_std(l)?),
            })
        }

        pub async fn accept(&self) -> std::io::Result<Stream> {
            match self {
                Listening::Unix(l) => Ok(Stream::Unix(l.accept().await?.0)),
                Listening::Tcp(l) => Ok(Stream::Tcp(l.accept().await?.0)),
            }
        }
    }

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Stream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            }
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_flush(cx),
                Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            }
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
                Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            }
        }
    }
}

fn serve(io: either::Stream, handler: Handler, requests: Arc<Mutex<Vec<RecordedRequest>>>) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let handler = handler.clone();
        let requests = requests.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            let recorded = RecordedRequest {
                method: parts.method.to_string(),
                target: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                headers: parts.headers,
                body,
            };
            requests.lock().push(recorded.clone());
            Ok::<_, Infallible>(handler(recorded).await)
        }
    });
    tokio::spawn(async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .await;
    });
}
