//! The WireGuard cross-platform userspace API (UAPI): the text protocol `wg` speaks over the
//! stream socket `/var/run/wireguard/IFNAME.sock`.
//!
//! Three parts, one file each (plus [`client`], the get side used by the demo):
//! - [`parse`]: the lines of a `set=1` operation → one [`crate::config::DeviceUpdate`]
//!   (pure, sans-IO; the whole operation is parsed before anything is applied, so malformed
//!   input changes nothing).
//! - [`format`](mod@format): a [`crate::config::DeviceSnapshot`] → the `get=1` reply text (pure).
//! - [`server`]: the socket itself: binding (stale/live socket detection, permissions),
//!   ownership checks, and one thread per connection running get/set operations against a
//!   [`crate::config::DeviceControl`].
//!
//! The contract is WireGuard's "Cross-platform Userspace Interface" (wireguard.com/xplatform),
//! as `wg` and wireguard-go speak it. One deliberate deviation: wireguard-go applies a set
//! line by line, so a bad line leaves the lines before it applied; here a set is parsed whole
//! first, a malformed one changes nothing, and the device receives it as a single update.

pub mod client;
pub mod format;
pub mod parse;
pub mod server;

pub use format::format_get;
pub use parse::{parse_set, ParseError, SetParser, MAX_LINE_LEN};
pub use server::{ServeExit, SocketWatch, UapiError, UapiServer, DEFAULT_SOCKET_DIR};
