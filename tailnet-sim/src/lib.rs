//! Stand-ins for tailscaled's LocalAPI and Tailscale's cloud API, speaking their real
//! formats, for tests: a simulated [`Tailnet`] of nodes, one [`LocalApiServer`] per node on a
//! UNIX socket, and a [`CloudApiServer`] for the admin side, all changeable while they run.
//! Test code only: the product binary never links it.

pub mod cloudapi;
pub mod localapi;
pub mod server;
pub mod tailnet;

pub use cloudapi::{CloudApiServer, Credentials};
pub use localapi::{Behaviour, LocalApiServer};
pub use server::RecordedRequest;
pub use tailnet::{SimNode, Tailnet};
