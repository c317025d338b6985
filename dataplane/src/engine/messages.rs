//! WireGuard's wire format as far as the engine reads it itself: the four message types,
//! their sizes, where each carries the receiver index, and how a receiver index names a
//! peer. `tailsk8s-noise` parses and builds the messages; the engine only needs enough to route a
//! datagram to the right peer before any cryptography runs.
//!
//! ```text
//!  initiation    type(4) sender(4) ephemeral(32) static(32+16) timestamp(12+16)
//!                mac1(16) mac2(16)                                           = 148
//!  response      type(4) sender(4) receiver(4) ephemeral(32) empty(0+16)
//!                mac1(16) mac2(16)                                           =  92
//!  cookie reply  type(4) receiver(4) nonce(24) cookie(16+16)                 =  64
//!  data          type(4) receiver(4) counter(8) packet(n+16)                 =  32 + n
//! ```
//!
//! The type is a little-endian u32 whose upper three bytes are reserved zero, so a datagram
//! with anything in them is not WireGuard.

/// Message type 1: a handshake initiation.
pub(crate) const MESSAGE_INITIATION: u8 = 1;
/// Message type 2: a handshake response.
pub(crate) const MESSAGE_RESPONSE: u8 = 2;
/// Message type 3: a cookie reply (the responder is under load).
pub(crate) const MESSAGE_COOKIE_REPLY: u8 = 3;
/// Message type 4: transport data (an empty one is a keepalive).
pub(crate) const MESSAGE_DATA: u8 = 4;

/// Bytes of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Bytes of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Bytes of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// A data message's header: type, receiver index, 64-bit counter.
pub const DATA_HEADER_LEN: usize = 16;
/// The Poly1305 tag that follows a data message's ciphertext.
pub const DATA_TAG_LEN: usize = 16;
/// WireGuard's data-message overhead: 16-byte header + 16-byte tag. A keepalive is exactly
/// this long (no plaintext).
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + DATA_TAG_LEN;

/// Where the type sits: the first four bytes.
const TYPE_LEN: usize = 4;
/// Where a response carries the receiver index (after type and sender index).
const RESPONSE_RECEIVER_AT: usize = 8;
/// Where a cookie reply and a data message carry the receiver index (right after the type).
const RECEIVER_AT: usize = 4;

/// Bits of a receiver index below the peer's slot. A peer's session indices are its slot
/// shifted left by 8, with a byte below that changes with every handshake, so the current,
/// previous and next session of one peer have different indices (`crate::noise`). Shifting
/// right by 8 gives the slot back — which is also why a device holds at most 2^24 peers.
const SESSION_BITS: u32 = 8;

/// Most peers a device holds: the slot must fit the 24 bits above the session counter.
pub const MAX_PEERS: usize = 1 << (32 - SESSION_BITS);

/// The peer slot a receiver index names.
pub(crate) fn slot_of(receiver_index: u32) -> u32 {
    receiver_index >> SESSION_BITS
}

/// Whether a datagram claims to be a handshake message (initiation, response or cookie
/// reply): what drivers send to their handshake queue, apart from data. Only the type is
/// read; the engine checks the rest.
pub fn is_handshake(datagram: &[u8]) -> bool {
    matches!(
        datagram.get(..TYPE_LEN),
        Some([
            MESSAGE_INITIATION | MESSAGE_RESPONSE | MESSAGE_COOKIE_REPLY,
            0,
            0,
            0
        ])
    )
}

/// The message type and, for all but initiations, the receiver index, of a datagram whose
/// length fits its type. `None` for anything that is not a WireGuard message. Initiations
/// carry no receiver index: their peer is found from the static key inside.
pub(crate) fn message_header(datagram: &[u8]) -> Option<(u8, Option<u32>)> {
    let header: [u8; TYPE_LEN] = datagram.get(..TYPE_LEN)?.try_into().ok()?;
    let message_type = u32::from_le_bytes(header);
    let index_at = |offset: usize| -> Option<u32> {
        let bytes: [u8; 4] = datagram.get(offset..offset + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes))
    };
    const INITIATION: u32 = MESSAGE_INITIATION as u32;
    const RESPONSE: u32 = MESSAGE_RESPONSE as u32;
    const COOKIE_REPLY: u32 = MESSAGE_COOKIE_REPLY as u32;
    const DATA: u32 = MESSAGE_DATA as u32;
    match (message_type, datagram.len()) {
        (INITIATION, INITIATION_LEN) => Some((MESSAGE_INITIATION, None)),
        (RESPONSE, RESPONSE_LEN) => Some((MESSAGE_RESPONSE, Some(index_at(RESPONSE_RECEIVER_AT)?))),
        (COOKIE_REPLY, COOKIE_REPLY_LEN) => {
            Some((MESSAGE_COOKIE_REPLY, Some(index_at(RECEIVER_AT)?)))
        }
        (DATA, n) if n >= DATA_OVERHEAD => Some((MESSAGE_DATA, Some(index_at(RECEIVER_AT)?))),
        _ => None,
    }
}
