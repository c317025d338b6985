//! A stand-in for one node's tailscaled LocalAPI: HTTP/1.1 on a UNIX socket, answering
//! `status`, `whois`, `prefs` (GET and PATCH) and `watch-ipn-bus` with documents of the real
//! shapes (field names and nesting of tailscaled v1.102), rendered from the shared
//! [`Tailnet`] as this node sees it. Like tailscaled it refuses (403) any request whose `Host`
//! is not `local-tailscaled.sock` or that carries an `Origin` or `Referer`.
//!
//! A test can stop and restart it, make it answer garbage, an error status, or nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Response, StatusCode};
use ipnet::IpNet;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::server::{
    json_reply, text_reply, Handler, Listener, RecordedRequest, Reply, ServerThread, SimBody,
};
use crate::tailnet::{SimNode, Tailnet, DNS_SUFFIX, VERSION};

/// How the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Like tailscaled.
    Normal,
    /// `200 OK` with a body that is not JSON of the right shape (and a garbage line on watch
    /// streams opened meanwhile).
    Garbage,
    /// This status code with a text message, on every endpoint.
    Error(u16),
    /// Accepts the request and never answers.
    Silent,
}

struct Shared {
    tailnet: Tailnet,
    self_id: String,
    behaviour: Mutex<Behaviour>,
    /// Whether PATCH prefs is allowed (tailscaled: root or the operator user only).
    writable: Mutex<bool>,
}

/// One node's LocalAPI, serving until stopped or dropped.
pub struct LocalApiServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    thread: Option<ServerThread>,
}

impl LocalApiServer {
    /// Serves the LocalAPI of node `self_id` of `tailnet` on `socket` (a stale socket file
    /// there is replaced). Listening when this returns.
    pub fn start(
        tailnet: &Tailnet,
        self_id: &str,
        socket: impl Into<PathBuf>,
    ) -> std::io::Result<LocalApiServer> {
        let mut server = LocalApiServer {
            socket: socket.into(),
            shared: Arc::new(Shared {
                tailnet: tailnet.clone(),
                self_id: self_id.to_string(),
                behaviour: Mutex::new(Behaviour::Normal),
                writable: Mutex::new(true),
            }),
            requests: Arc::default(),
            thread: None,
        };
        server.restart()?;
        Ok(server)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops listening, closes every connection (watch streams end) and removes the socket.
    pub fn stop(&mut self) {
        if let Some(mut thread) = self.thread.take() {
            thread.stop();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Listens again after [`stop`](Self::stop) (a no-op while running).
    pub fn restart(&mut self) -> std::io::Result<()> {
        if self.thread.is_some() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&self.socket);
        let listener = std::os::unix::net::UnixListener::bind(&self.socket)?;
        let shared = self.shared.clone();
        let handler: Handler = Arc::new(move |request| {
            let shared = shared.clone();
            Box::pin(async move { shared.handle(request).await })
        });
        self.thread = Some(ServerThread::spawn(
            Listener::Unix(listener),
            handler,
            self.requests.clone(),
        )?);
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.thread.is_some()
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock() = behaviour;
    }

    /// Whether PATCH prefs is allowed (default true; false answers 403 as tailscaled does to
    /// a user who is neither root nor the operator).
    pub fn set_writable(&self, writable: bool) {
        *self.shared.writable.lock() = writable;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().clone()
    }

    pub fn clear_requests(&self) {
        self.requests.lock().clear();
    }
}

impl Drop for LocalApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

const GARBAGE: &str = "{\"BackendState\": \"Running\", \"Peer\": [tailscaled garbled this";

impl Shared {
    async fn handle(&self, request: RecordedRequest) -> Reply {
        if request.header("host") != Some("local-tailscaled.sock")
            || request.header("origin").is_some()
            || request.header("referer").is_some()
        {
            return text_reply(StatusCode::FORBIDDEN, "invalid localapi request");
        }
        let behaviour = self.behaviour.lock().clone();
        match behaviour {
            Behaviour::Normal => {}
            Behaviour::Garbage if request.target.starts_with("/localapi/v0/watch-ipn-bus") => {
                return one_line_stream(format!("{GARBAGE}\n"));
            }
            Behaviour::Garbage => {
                return crate::server::reply(StatusCode::OK, "application/json", GARBAGE)
            }
            Behaviour::Error(code) => {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return text_reply(status, "tailnet-sim: failing on purpose");
            }
            Behaviour::Silent => std::future::pending::<()>().await,
        }
        let path = request.target.split('?').next().unwrap_or_default();
        match (request.method.as_str(), path) {
            ("GET", "/localapi/v0/status") => {
                let peers = request.query("peers").as_deref() != Some("false");
                json_reply(StatusCode::OK, &self.status(peers))
            }
            ("GET", "/localapi/v0/whois") => self.whois(&request),
            ("GET", "/localapi/v0/prefs") => match self.tailnet.node(&self.self_id) {
                Some(node) => json_reply(StatusCode::OK, &prefs(&node)),
                None => text_reply(StatusCode::INTERNAL_SERVER_ERROR, "no such node"),
            },
            ("PATCH", "/localapi/v0/prefs") => self.patch_prefs(&request),
            ("GET", "/localapi/v0/watch-ipn-bus") => self.watch(),
            (_, "/localapi/v0/status" | "/localapi/v0/whois" | "/localapi/v0/watch-ipn-bus") => {
                text_reply(StatusCode::METHOD_NOT_ALLOWED, "want GET")
            }
            (_, "/localapi/v0/prefs") => {
                text_reply(StatusCode::METHOD_NOT_ALLOWED, "unsupported method")
            }
            _ => text_reply(StatusCode::NOT_FOUND, "404 page not found"),
        }
    }

    fn status(&self, with_peers: bool) -> Value {
        let nodes = self.tailnet.with_primary_routes();
        let me = nodes.iter().find(|(n, _)| n.stable_id == self.self_id);
        let (backend_state, self_status, ips) = match me {
            Some((node, primary)) => (
                if node.authorized {
                    "Running"
                } else {
                    "NeedsMachineAuth"
                },
                peer_status(node, primary),
                json!(node.tailnet_ips),
            ),
            None => ("NeedsLogin", Value::Null, json!([])),
        };
        let mut peer_map = serde_json::Map::new();
        let visible = me.is_some_and(|(n, _)| n.authorized);
        if with_peers && visible {
            for (node, primary) in &nodes {
                if node.stable_id != self.self_id && node.authorized {
                    peer_map.insert(node.public_key.clone(), peer_status(node, primary));
                }
            }
        }
        json!({
            "Version": VERSION,
            "TUN": true,
            "BackendState": backend_state,
            "HaveNodeKey": true,
            "AuthURL": "",
            "TailscaleIPs": ips,
            "Self": self_status,
            "Health": [],
            "MagicDNSSuffix": DNS_SUFFIX,
            "CurrentTailnet": {
                "Name": "example.com",
                "MagicDNSSuffix": DNS_SUFFIX,
                "MagicDNSEnabled": true
            },
            "CertDomains": null,
            "ExtraRecords": null,
            "Peer": if with_peers { Value::Object(peer_map) } else { Value::Null },
            "User": {
                "6743218120345678": {
                    "ID": 6743218120345678_u64,
                    "LoginName": "tagged-devices",
                    "DisplayName": "Tagged Devices"
                }
            },
            "ClientVersion": {"RunningLatest": true}
        })
    }

    fn whois(&self, request: &RecordedRequest) -> Reply {
        let Some(addr) = request.query("addr") else {
            return text_reply(StatusCode::BAD_REQUEST, "missing 'addr' parameter");
        };
        // tailscaled takes an ip:port, or a bare IP.
        let ip: Option<IpAddr> = addr
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .ok()
            .or_else(|| addr.parse().ok());
        let Some(ip) = ip else {
            return text_reply(StatusCode::BAD_REQUEST, "invalid 'addr' parameter");
        };
        let nodes = self.tailnet.with_primary_routes();
        match nodes
            .iter()
            .find(|(n, _)| n.authorized && n.tailnet_ips.contains(&ip))
        {
            Some((node, primary)) => json_reply(StatusCode::OK, &whois_reply(node, primary)),
            None => text_reply(StatusCode::NOT_FOUND, "no match for IP:port"),
        }
    }

    fn patch_prefs(&self, request: &RecordedRequest) -> Reply {
        if !*self.writable.lock() {
            return text_reply(StatusCode::FORBIDDEN, "prefs write access denied");
        }
        let Ok(Value::Object(change)) = serde_json::from_slice::<Value>(&request.body) else {
            return text_reply(StatusCode::BAD_REQUEST, "invalid JSON body");
        };
        let mut routes = None;
        if change.get("AdvertiseRoutesSet") == Some(&Value::Bool(true)) {
            let list = match change.get("AdvertiseRoutes") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => {
                    let parsed: Option<Vec<IpNet>> = items
                        .iter()
                        .map(|i| i.as_str().and_then(|s| s.parse().ok()))
                        .collect();
                    match parsed {
                        Some(list) => list,
                        None => return text_reply(StatusCode::BAD_REQUEST, "bad AdvertiseRoutes"),
                    }
                }
                Some(_) => return text_reply(StatusCode::BAD_REQUEST, "bad AdvertiseRoutes"),
            };
            routes = Some(list);
        }
        if change.get("RouteAllSet") == Some(&Value::Bool(true)) {
            if let Some(Value::Bool(all)) = change.get("RouteAll") {
                let all = *all;
                self.tailnet.update(&self.self_id, |n| n.route_all = all);
            }
        }
        if let Some(routes) = routes {
            self.tailnet
                .update(&self.self_id, |n| n.advertised_routes = routes);
        }
        match self.tailnet.node(&self.self_id) {
            Some(node) => json_reply(StatusCode::OK, &prefs(&node)),
            None => text_reply(StatusCode::INTERNAL_SERVER_ERROR, "no such node"),
        }
    }

    /// One line per change of the tailnet, until the client or the server goes away.
    fn watch(&self) -> Reply {
        let mut changes = self.tailnet.subscribe();
        changes.mark_unchanged();
        let (tx, rx) = mpsc::unbounded_channel();
        let tailnet = self.tailnet.clone();
        let self_id = self.self_id.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let nodes = tailnet.with_primary_routes();
                let peers: Vec<Value> = nodes
                    .iter()
                    .filter(|(n, _)| n.stable_id != self_id && n.authorized)
                    .map(|(n, primary)| node_json(n, primary))
                    .collect();
                let line = json!({"NetMap": {"Peers": peers}, "Version": VERSION});
                if tx.send(Bytes::from(format!("{line}\n"))).is_err() {
                    break;
                }
            }
        });
        stream_reply(rx)
    }
}

fn stream_reply(rx: mpsc::UnboundedReceiver<Bytes>) -> Reply {
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(SimBody::Stream(rx))
        .expect("static response parts are valid")
}

/// A stream that sends `line` and then stays open until the client goes.
fn one_line_stream(line: String) -> Reply {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(Bytes::from(line));
    tokio::spawn(async move { tx.closed().await });
    stream_reply(rx)
}

fn texts<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// A node as `ipnstate.PeerStatus`.
fn peer_status(node: &SimNode, primary: &[IpNet]) -> Value {
    let mut allowed: Vec<String> = texts(primary);
    allowed.extend(node.tailnet_ips.iter().map(|ip| host_prefix(*ip)));
    json!({
        "ID": node.stable_id,
        "NodeID": node.node_id,
        "PublicKey": node.public_key,
        "HostName": node.host_name,
        "DNSName": node.dns_name(),
        "OS": "linux",
        "UserID": 6743218120345678_u64,
        "TailscaleIPs": node.tailnet_ips,
        "AllowedIPs": allowed,
        "Tags": if node.tags.is_empty() { Value::Null } else { json!(node.tags) },
        "PrimaryRoutes": if primary.is_empty() { Value::Null } else { json!(texts(primary)) },
        "Addrs": null,
        "CurAddr": "",
        "Relay": "nyc",
        "PeerRelay": "",
        "RxBytes": 0,
        "TxBytes": 0,
        "Created": "2026-08-01T09:15:27.436281759Z",
        "LastWrite": "0001-01-01T00:00:00Z",
        "LastSeen": if node.online { "0001-01-01T00:00:00Z" } else { "2026-08-22T11:40:00Z" },
        "LastHandshake": "0001-01-01T00:00:00Z",
        "Online": node.online,
        "ExitNode": false,
        "ExitNodeOption": false,
        "Active": false,
        "PeerAPIURL": node.tailnet_ips.iter().map(|ip| match ip {
            IpAddr::V4(v4) => format!("http://{v4}:45312"),
            IpAddr::V6(v6) => format!("http://[{v6}]:45312"),
        }).collect::<Vec<_>>(),
        "TaildropTarget": 0,
        "NoFileSharingReason": "",
        "InNetworkMap": true,
        "InMagicSock": true,
        "InEngine": true
    })
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// A node as `tailcfg.Node`.
fn node_json(node: &SimNode, primary: &[IpNet]) -> Value {
    let addresses: Vec<String> = node.tailnet_ips.iter().map(|ip| host_prefix(*ip)).collect();
    let mut allowed = addresses.clone();
    allowed.extend(texts(primary));
    json!({
        "ID": node.node_id,
        "StableID": node.stable_id,
        "Name": node.dns_name(),
        "User": 6743218120345678_u64,
        "Key": node.public_key,
        "KeyExpiry": "0001-01-01T00:00:00Z",
        "Machine": format!("mkey:{:064x}", node.node_id),
        "Addresses": addresses,
        "AllowedIPs": allowed,
        "Endpoints": ["198.51.100.11:41641"],
        "HomeDERP": 1,
        "Hostinfo": {
            "IPNVersion": VERSION,
            "OS": "linux",
            "Hostname": node.host_name,
            "RoutableIPs": if node.advertised_routes.is_empty() {
                Value::Null
            } else {
                json!(texts(&node.advertised_routes))
            },
        },
        "Created": "2026-08-01T09:17:02.118904211Z",
        "Cap": 130,
        "Tags": if node.tags.is_empty() { Value::Null } else { json!(node.tags) },
        "PrimaryRoutes": if primary.is_empty() { Value::Null } else { json!(texts(primary)) },
        "Online": node.online,
        "MachineAuthorized": node.authorized,
        "ComputedName": node.host_name,
        "ComputedNameWithHost": node.host_name
    })
}

/// A `whois` reply for `node` with its `primary` routes, as tailscaled sends it for a peer
/// (also for parser tests that need the document itself).
pub fn whois_reply(node: &SimNode, primary: &[IpNet]) -> Value {
    json!({
        "Node": node_json(node, primary),
        "UserProfile": {
            "ID": 6743218120345678_u64,
            "LoginName": "tagged-devices",
            "DisplayName": "Tagged Devices",
            "ProfilePicURL": ""
        },
        "CapMap": null
    })
}

/// `ipn.Prefs` of `node` as the LocalAPI returns it (keys stripped; also for parser tests
/// that need the document itself).
pub fn prefs(node: &SimNode) -> Value {
    json!({
        "ControlURL": "https://controlplane.tailscale.com",
        "RouteAll": node.route_all,
        "ExitNodeID": "",
        "ExitNodeIP": "",
        "ExitNodeAllowLANAccess": false,
        "CorpDNS": true,
        "RunSSH": false,
        "RunWebClient": false,
        "WantRunning": true,
        "LoggedOut": false,
        "ShieldsUp": false,
        "AdvertiseTags": if node.tags.is_empty() { Value::Null } else { json!(node.tags) },
        "Hostname": "",
        "NotepadURLs": false,
        "AdvertiseRoutes": if node.advertised_routes.is_empty() {
            Value::Null
        } else {
            json!(texts(&node.advertised_routes))
        },
        "AdvertiseServices": null,
        "NoSNAT": false,
        "NoStatefulFiltering": true,
        "NetfilterMode": 2,
        "AutoUpdate": {"Check": true, "Apply": false},
        "AppConnector": {"Advertise": false},
        "PostureChecking": false,
        "NetfilterKind": "",
        "DriveShares": null,
        "Config": null
    })
}
