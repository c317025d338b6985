//! WireGuard's handshake and transport data, owned: Noise_IKpsk2 initiation and response
//! ([`handshake`]), their wire layout ([`message`]), cookies under load ([`cookie`]), data
//! messages sealed and opened in place under a session's keys ([`transport`]) behind the
//! replay window ([`replay`]) with the AEAD chosen for the CPU ([`aead`]), and the primitives
//! they are built from ([`primitives`]).
//! Sans-IO: callers bring randomness, time and peers, and keep the policies (timestamps, rate
//! limits, timers, session slots).
//!
//! Why it exists (issue 9): boringtun keeps the transport keys a handshake agrees on inside
//! its `Tunn`, so the data path cannot choose its AEAD or avoid boringtun's copy. With the
//! handshake here, the keys are ours. The router runs it (each peer's Noise state in
//! `tailsk8s-dataplane`'s `noise` keeps the policies); it is checked against boringtun 0.7.1
//! in both roles (`tests/boringtun.rs`), down to data messages.

pub mod aead;
pub mod cookie;
pub mod handshake;
pub mod message;
pub mod primitives;
pub mod replay;
pub mod transport;

pub use handshake::{
    consume_initiation, consume_response, initiate, mac1_valid, open_initiation, respond,
    HandshakeError, Identity, Initiated, InitiationSeen, OpenedInitiation, Peer, Session,
};
