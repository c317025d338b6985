//! The client of Tailscale's cloud API v2, for the tailnet admin commands: find this node's
//! device, read and replace its enabled (approved) routes, approve the device. Credentials are
//! an API access token or an OAuth client (exchanged for a one-hour token on first use);
//! neither ever appears in a log line, an error or a `Debug` print.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;

use super::documents::nullable;

/// The public API.
pub const DEFAULT_API_BASE: &str = "https://api.tailscale.com/api/v2";
const TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A credential: shown as `[redacted]`, read only where it is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudAuth {
    /// An API access token (`tskey-api-…`).
    ApiKey(Secret),
    /// An OAuth client (scopes `devices:core` and `devices:routes`).
    OAuth {
        client_id: String,
        client_secret: Secret,
    },
}

/// What went wrong with the cloud API. Each names the request, never a credential.
#[derive(Debug, Error)]
pub enum CloudApiError {
    #[error("cloud API {request}: {source}")]
    Request {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cloud API {request}: answered {status}: {message}")]
    Status {
        request: String,
        status: StatusCode,
        message: String,
    },
    #[error("cloud API {request}: unexpected reply: {source}")]
    Document {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the cloud API lists no device with nodeId {node_id} (is the key for this node's tailnet?)"
    )]
    NoDevice { node_id: String },
}

/// A device as `GET /tailnet/-/devices?fields=all` lists it (the fields tailsk8s reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// The legacy numeric ID, as text: the `{id}` of the device endpoints.
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    /// The StableNodeID: the LocalAPI's `Self.ID`.
    #[serde(default, deserialize_with = "nullable")]
    pub node_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub hostname: String,
    #[serde(default, deserialize_with = "nullable")]
    pub authorized: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub enabled_routes: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub advertised_routes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct DeviceList {
    #[serde(default, deserialize_with = "nullable")]
    devices: Vec<Device>,
}

/// `GET /device/{id}/routes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRoutes {
    #[serde(default, deserialize_with = "nullable")]
    pub advertised_routes: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub enabled_routes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct TokenReply {
    access_token: String,
}

#[derive(Serialize)]
struct SetRoutes<'a> {
    routes: &'a [String],
}

#[derive(Serialize)]
struct SetAuthorized {
    authorized: bool,
}

/// A cloud API client for the tailnet of its credential.
pub struct CloudApi {
    base: String,
    auth: CloudAuth,
    http: reqwest::Client,
    /// The OAuth access token, once fetched.
    token: Mutex<Option<Secret>>,
}

impl fmt::Debug for CloudApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudApi")
            .field("base", &self.base)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl CloudApi {
    /// A client of the API at `base` (e.g. [`DEFAULT_API_BASE`]).
    pub fn new(base: &str, auth: CloudAuth) -> Result<CloudApi, CloudApiError> {
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("tailsk8s/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| CloudApiError::Request {
                request: "set-up".into(),
                source,
            })?;
        Ok(CloudApi {
            base: base.trim_end_matches('/').to_string(),
            auth,
            http,
            token: Mutex::new(None),
        })
    }

    /// All devices of the tailnet, with their routes.
    pub async fn devices(&self) -> Result<Vec<Device>, CloudApiError> {
        let list: DeviceList = self
            .call(Method::GET, "/tailnet/-/devices?fields=all", None)
            .await?;
        Ok(list.devices)
    }

    /// The device whose `nodeId` is `node_id` (the LocalAPI's `Self.ID`).
    pub async fn device_by_node_id(&self, node_id: &str) -> Result<Device, CloudApiError> {
        self.devices()
            .await?
            .into_iter()
            .find(|d| d.node_id == node_id)
            .ok_or_else(|| CloudApiError::NoDevice {
                node_id: node_id.to_string(),
            })
    }

    pub async fn routes(&self, device_id: &str) -> Result<DeviceRoutes, CloudApiError> {
        self.call(Method::GET, &format!("/device/{device_id}/routes"), None)
            .await
    }

    /// Replaces the device's enabled routes with exactly `routes`.
    pub async fn set_enabled_routes(
        &self,
        device_id: &str,
        routes: &[String],
    ) -> Result<DeviceRoutes, CloudApiError> {
        let body = serde_json::to_value(SetRoutes { routes }).unwrap_or_default();
        self.call(
            Method::POST,
            &format!("/device/{device_id}/routes"),
            Some(body),
        )
        .await
    }

    /// Approves (or un-approves) a device in a tailnet that requires device approval.
    pub async fn set_authorized(
        &self,
        device_id: &str,
        authorized: bool,
    ) -> Result<(), CloudApiError> {
        let body = serde_json::to_value(SetAuthorized { authorized }).unwrap_or_default();
        self.send(
            Method::POST,
            &format!("/device/{device_id}/authorized"),
            Some(body),
        )
        .await
        .map(drop)
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CloudApiError> {
        let request = format!("{method} {path}");
        let bytes = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|source| CloudApiError::Document { request, source })
    }

    /// One authenticated request; its body when the answer is 2xx.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Vec<u8>, CloudApiError> {
        let request = format!("{method} {path}");
        let token = self.access_token().await?;
        tracing::debug!(%request, "cloud API request");
        let mut builder = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token.expose());
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        self.finish(builder, &request).await
    }

    async fn finish(
        &self,
        builder: reqwest::RequestBuilder,
        request: &str,
    ) -> Result<Vec<u8>, CloudApiError> {
        let failed = |source: reqwest::Error| CloudApiError::Request {
            request: request.to_string(),
            // Ours names the request; keep URLs (and whatever a query may carry) out.
            source: source.without_url(),
        };
        let response = builder.send().await.map_err(failed)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(failed)?;
        if !status.is_success() {
            return Err(CloudApiError::Status {
                request: request.to_string(),
                status,
                message: self.redact(&error_message(&bytes)),
            });
        }
        Ok(bytes.to_vec())
    }

    /// The bearer token: the API key, or the OAuth client's access token (fetched once).
    async fn access_token(&self) -> Result<Secret, CloudApiError> {
        let (client_id, client_secret) = match &self.auth {
            CloudAuth::ApiKey(key) => return Ok(key.clone()),
            CloudAuth::OAuth {
                client_id,
                client_secret,
            } => (client_id, client_secret),
        };
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            return Ok(token.clone());
        }
        let request = "POST /oauth/token";
        tracing::debug!(%client_id, "fetching an OAuth access token");
        let builder = self.http.post(format!("{}/oauth/token", self.base)).form(&[
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.expose()),
            ("grant_type", "client_credentials"),
        ]);
        let bytes = self.finish(builder, request).await?;
        let reply: TokenReply =
            serde_json::from_slice(&bytes).map_err(|source| CloudApiError::Document {
                request: request.to_string(),
                source,
            })?;
        let token = Secret::new(reply.access_token);
        *cached = Some(token.clone());
        Ok(token)
    }

    /// Any credential the server might echo back becomes `[redacted]`.
    fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        let mut secrets = vec![];
        match &self.auth {
            CloudAuth::ApiKey(key) => secrets.push(key.expose().to_string()),
            CloudAuth::OAuth { client_secret, .. } => {
                secrets.push(client_secret.expose().to_string())
            }
        }
        // Busy only while the token is being fetched, when there is none to hide yet.
        if let Ok(token) = self.token.try_lock() {
            secrets.extend(token.as_ref().map(|t| t.expose().to_string()));
        }
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            out = out.replace(secret.as_str(), "[redacted]");
        }
        out
    }
}

/// The API's `{"message": …}`, else the start of the body, on one line.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    let text = match serde_json::from_slice::<Message>(body) {
        Ok(m) => m.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if text.is_empty() => "(no message)".to_string(),
        None => text,
    }
}
