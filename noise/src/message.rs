//! The wire layout of WireGuard's handshake messages (whitepaper §5.4): their types, lengths
//! and fields as views into fixed-size arrays. All integers are little-endian.

/// Message types (the first byte; the next three are zero). The engine's own copy of the
/// layout (`tailsk8s_dataplane::engine::messages`, routing a datagram before any crypto) is
/// to take these once the router runs this crate.
pub const INITIATION: u8 = 1;
pub const RESPONSE: u8 = 2;
pub const COOKIE_REPLY: u8 = 3;
pub const DATA: u8 = 4;

pub const INITIATION_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;
pub const COOKIE_REPLY_LEN: usize = 64;

/// `msg` as a message of type `kind` and exactly `N` bytes, if it is one.
pub(crate) fn exact<const N: usize>(msg: &[u8], kind: u8) -> Option<&[u8; N]> {
    let msg: &[u8; N] = msg.try_into().ok()?;
    (msg[..4] == [kind, 0, 0, 0]).then_some(msg)
}

/// Splits `m` at the given field lengths (which add up to at most its length).
fn split<const K: usize>(mut m: &mut [u8], lens: [usize; K]) -> [&mut [u8]; K] {
    let mut out: [&mut [u8]; K] = std::array::from_fn(|_| <&mut [u8]>::default());
    for (slot, len) in out.iter_mut().zip(lens) {
        let (head, rest) = std::mem::take(&mut m).split_at_mut(len);
        *slot = head;
        m = rest;
    }
    out
}

fn array<const N: usize>(s: &mut [u8]) -> &mut [u8; N] {
    s.try_into().expect("the layout's field lengths")
}

/// Type 1: type, sender index, ephemeral, sealed static key, sealed timestamp, MAC1, MAC2.
pub(crate) struct Initiation;

pub(crate) struct InitiationFields<'a> {
    pub kind: &'a mut u8,
    pub sender: &'a mut [u8; 4],
    pub ephemeral: &'a mut [u8; 32],
    pub encrypted_static: &'a mut [u8; 48],
    pub encrypted_timestamp: &'a mut [u8; 28],
}

impl Initiation {
    pub(crate) fn fields(m: &mut [u8; INITIATION_LEN]) -> InitiationFields<'_> {
        let [kind, sender, ephemeral, st, ts] = split(m, [4, 4, 32, 48, 28]);
        InitiationFields {
            kind: &mut kind[0],
            sender: array(sender),
            ephemeral: array(ephemeral),
            encrypted_static: array(st),
            encrypted_timestamp: array(ts),
        }
    }
}

/// Type 2: type, sender index, receiver index, ephemeral, sealed empty payload, MAC1, MAC2.
pub(crate) struct Response;

pub(crate) struct ResponseFields<'a> {
    pub kind: &'a mut u8,
    pub sender: &'a mut [u8; 4],
    pub receiver: &'a mut [u8; 4],
    pub ephemeral: &'a mut [u8; 32],
    pub encrypted_nothing: &'a mut [u8; 16],
}

impl Response {
    pub(crate) fn fields(m: &mut [u8; RESPONSE_LEN]) -> ResponseFields<'_> {
        let [kind, sender, receiver, ephemeral, nothing] = split(m, [4, 4, 4, 32, 16]);
        ResponseFields {
            kind: &mut kind[0],
            sender: array(sender),
            receiver: array(receiver),
            ephemeral: array(ephemeral),
            encrypted_nothing: array(nothing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_tile_the_message_without_macs() {
        let mut m = [0u8; INITIATION_LEN];
        let f = Initiation::fields(&mut m);
        *f.kind = 1;
        f.sender.fill(2);
        f.ephemeral.fill(3);
        f.encrypted_static.fill(4);
        f.encrypted_timestamp.fill(5);
        assert_eq!(m[0], 1);
        assert_eq!(&m[4..8], &[2; 4]);
        assert_eq!(&m[40..88], &[4; 48][..]);
        assert_eq!(&m[88..116], &[5; 28][..]);
        assert_eq!(&m[116..], &[0; 32][..]);
        let mut r = [0u8; RESPONSE_LEN];
        Response::fields(&mut r).encrypted_nothing.fill(6);
        assert_eq!(&r[44..60], &[6; 16][..]);
        assert_eq!(&r[60..], &[0; 32][..]);
    }

    #[test]
    fn exact_wants_type_reserved_zeros_and_length() {
        let mut m = [0u8; RESPONSE_LEN];
        m[0] = RESPONSE;
        assert!(exact::<RESPONSE_LEN>(&m, RESPONSE).is_some());
        assert!(exact::<RESPONSE_LEN>(&m, INITIATION).is_none());
        assert!(exact::<RESPONSE_LEN>(&m[..91], RESPONSE).is_none());
        m[2] = 1;
        assert!(exact::<RESPONSE_LEN>(&m, RESPONSE).is_none());
    }
}
