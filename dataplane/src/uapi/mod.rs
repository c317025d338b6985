//! The WireGuard cross-platform userspace API (UAPI): the text protocol `wg` speaks over the
//! stream socket `/var/run/wireguard/IFNAME.sock`.
//!
//! Four parts, one file each (plus [`client`], the get side used by the demo):
//! - [`parse`]: the lines of a `set=1` operation → one [`crate::config::DeviceUpdate`]
//!   (pure, sans-IO; the whole operation is parsed before anything is applied, so malformed
//!   input changes nothing).
//! - [`format`]: a [`crate::config::DeviceSnapshot`] → the `get=1` reply text (pure).
//! - [`server`]: the socket itself: binding (stale/live socket detection, permissions),
//!   ownership checks, and one thread per connection running get/set operations against a
//!   [`crate::config::DeviceControl`].
//!
//! The contract is `shared/reference/wireguard-uapi.md`; where it says "set is applied line
//! by line", we deliberately deviate: a set is all-or-nothing at parse time, and the engine
//! receives it as a single update.

pub mod client;
pub mod format;
pub mod parse;
pub mod server;

pub use format::format_get;
pub use parse::{parse_set, ParseError, SetParser, MAX_LINE_LEN};
pub use server::{ServeExit, SocketWatch, UapiError, UapiServer, DEFAULT_SOCKET_DIR};

#[cfg(test)]
mod test_device;
