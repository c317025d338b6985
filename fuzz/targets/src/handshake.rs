//! `handshake`: handshake and data messages from the network into `tailsk8s-noise`'s
//! consumers.
//!
//! Fixed keys give genuine messages: an initiation from peer P to us, a response from P to an
//! initiation of ours, a cookie reply from P, and a data message P sealed under the session
//! the response gave. The input picks one of them (or raw bytes)
//! and a list of (position, XOR) mutations and a length change, then hands the result to the
//! consumer of that message type, and raw bytes to every consumer.
//!
//! Invariants:
//! - nothing panics, whatever the bytes;
//! - a message (raw bytes, or a mutated genuine one) is accepted exactly when every byte the protocol
//!   authenticates is unchanged and the length is: for an initiation or response everything
//!   before MAC2 (MAC1 covers the message before it; MAC2 is the caller's check under load);
//!   for a cookie reply everything but the receiver index; for a data message everything; and
//!   when accepted, what comes out equals what the genuine message gives (the peer and
//!   timestamp, the session keys, the cookie, the counter and plaintext).

use std::sync::OnceLock;

use std::time::Instant;

use tailsk8s_noise::message::{self, INITIATION_LEN, RESPONSE_LEN};
use tailsk8s_noise::transport::{Transport, HEADER_LEN};
use tailsk8s_noise::{
    consume_initiation, consume_response, cookie, initiate, respond, Identity, Initiated, Peer,
    Session,
};
use x25519_dalek::StaticSecret;

use crate::input::{Choices, Writer};

/// Mutations per input.
const MAX_MUTATIONS: usize = 16;

struct Fixture {
    us: Identity,
    /// P as we know it.
    peer: Peer,
    /// A genuine initiation P sent us, and what it carries.
    initiation: [u8; INITIATION_LEN],
    timestamp: [u8; 12],
    /// Our initiation to P, and P's genuine response to it, and the session it gives.
    initiated: Initiated,
    response: [u8; RESPONSE_LEN],
    session: Session,
    /// P's cookie reply to our initiation, and the cookie in it.
    cookie_reply: [u8; message::COOKIE_REPLY_LEN],
    cookie: [u8; 16],
    /// A data message P sealed under that session (counter 0), and its plaintext.
    data: Vec<u8>,
    plaintext: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let us = Identity::new(StaticSecret::from([0x11; 32]));
        let p = Identity::new(StaticSecret::from([0x22; 32]));
        let peer = Peer::new(&us, *p.public(), Some([0x33; 32]));
        let us_at_p = Peer::new(&p, *us.public(), Some([0x33; 32]));
        let timestamp = [0x40, 0, 0, 0, 0x65, 0, 0, 0, 0, 0, 0, 1];
        let (initiation, _) = initiate(
            &p,
            &us_at_p,
            0xabcd,
            StaticSecret::from([0x44; 32]),
            timestamp,
            None,
        )
        .expect("fixed keys are valid");
        let (ours, initiated) = initiate(
            &us,
            &peer,
            0x1234,
            StaticSecret::from([0x55; 32]),
            timestamp,
            None,
        )
        .expect("fixed keys are valid");
        let (seen, _) = consume_initiation(&p, &ours, |_| Some(&us_at_p)).expect("genuine");
        let (response, p_session) = respond(
            &us_at_p,
            &seen,
            0x5678,
            StaticSecret::from([0x66; 32]),
            None,
        )
        .expect("fixed keys are valid");
        let session = consume_response(&us, &peer, &initiated, &response).expect("genuine");
        let cookie = [0x77; 16];
        let cookie_reply =
            cookie::reply(&p, &ours, &cookie, [0x88; 24]).expect("a handshake message");
        let plaintext: Vec<u8> = (0..64u8).collect();
        let mut data = vec![0u8; HEADER_LEN + plaintext.len() + 16];
        data[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(&plaintext);
        Transport::new(&p_session, Instant::now())
            .seal(Instant::now(), &mut data, plaintext.len())
            .expect("a fresh session seals");
        Fixture {
            data,
            plaintext,
            us,
            peer,
            initiation,
            timestamp,
            initiated,
            response,
            session,
            cookie_reply,
            cookie,
        }
    })
}

/// Applies the input's mutations and length change to `genuine`.
fn mutate(genuine: &[u8], c: &mut Choices) -> Vec<u8> {
    let mut m = genuine.to_vec();
    for _ in 0..c.below(MAX_MUTATIONS + 1) {
        let at = usize::from(c.u16()) % m.len();
        m[at] ^= c.byte();
    }
    match c.below(4) {
        1 => {
            let keep = c.below(m.len());
            m.truncate(keep)
        }
        2 => m.extend_from_slice(c.bytes()),
        _ => {}
    }
    m
}

/// The rule every consumer is held to: `outcome`, what it made of message `m`, is a success
/// exactly when `m` equals `genuine` in length and in every byte outside `free` (the bytes the
/// protocol does not authenticate); a success must then `match_genuine`.
fn holds<T, E: std::fmt::Display>(
    what: &str,
    m: &[u8],
    genuine: &[u8],
    free: std::ops::Range<usize>,
    outcome: Result<T, E>,
    match_genuine: impl FnOnce(T),
) {
    let authentic = m.len() == genuine.len()
        && m.iter()
            .zip(genuine)
            .enumerate()
            .all(|(i, (a, b))| a == b || free.contains(&i));
    match outcome {
        Ok(got) => {
            assert!(authentic, "an altered {what} was accepted");
            match_genuine(got);
        }
        Err(e) => assert!(!authentic, "a genuine {what} was refused: {e}"),
    }
}

fn check_initiation(f: &Fixture, m: &[u8]) {
    let outcome = consume_initiation(&f.us, m, |_| Some(&f.peer));
    let mac2 = INITIATION_LEN - 16..INITIATION_LEN;
    holds(
        "initiation",
        m,
        &f.initiation,
        mac2,
        outcome,
        |(seen, _)| {
            assert_eq!(&seen.peer, f.peer.public());
            assert_eq!(seen.timestamp, f.timestamp);
            assert_eq!(seen.sender_index, 0xabcd);
        },
    );
}

fn check_response(f: &Fixture, m: &[u8]) {
    let outcome = consume_response(&f.us, &f.peer, &f.initiated, m);
    let mac2 = RESPONSE_LEN - 16..RESPONSE_LEN;
    holds("response", m, &f.response, mac2, outcome, |session| {
        assert_eq!(session, f.session)
    });
}

fn check_cookie_reply(f: &Fixture, m: &[u8]) {
    let outcome = cookie::consume_reply(&f.peer, &f.initiated.mac1, m);
    // The receiver index is the only field outside the seal.
    holds("cookie reply", m, &f.cookie_reply, 4..8, outcome, |got| {
        assert_eq!(got, f.cookie)
    });
}

fn check_data(f: &Fixture, m: &[u8]) {
    let receiver = Transport::new(&f.session, Instant::now());
    let mut opened = m.to_vec();
    let outcome = receiver.open(Instant::now(), &mut opened);
    holds(
        "data message",
        m,
        &f.data,
        0..0,
        outcome,
        |(counter, plain)| assert_eq!((counter, &plain[..]), (0, &f.plaintext[..])),
    );
}

pub fn run(data: &[u8]) {
    let f = fixture();
    let mut c = Choices::new(data);
    match c.below(5) {
        0 => {
            let raw = c.rest();
            check_initiation(f, raw);
            check_response(f, raw);
            check_cookie_reply(f, raw);
            check_data(f, raw);
            let _ = cookie::mac2_valid(raw, &f.cookie);
            let _ = cookie::reply(&f.us, raw, &f.cookie, [0; 24]);
        }
        1 => check_initiation(f, &mutate(&f.initiation, &mut c)),
        2 => check_response(f, &mutate(&f.response, &mut c)),
        3 => check_cookie_reply(f, &mutate(&f.cookie_reply, &mut c)),
        _ => check_data(f, &mutate(&f.data, &mut c)),
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let f = fixture();
    let genuine = |kind: u8| Writer::new().byte(kind).byte(0).byte(0).finish();
    vec![
        (
            "raw-initiation",
            Writer::new().byte(0).raw(&f.initiation).finish(),
        ),
        (
            "raw-response",
            Writer::new().byte(0).raw(&f.response).finish(),
        ),
        ("initiation", genuine(1)),
        ("response", genuine(2)),
        ("cookie-reply", genuine(3)),
        ("data", genuine(4)),
        (
            "data-counter-flipped",
            Writer::new()
                .byte(4)
                .byte(1)
                .u16(8)
                .byte(1)
                .byte(0)
                .finish(),
        ),
        (
            "initiation-mac2-flipped",
            Writer::new()
                .byte(1)
                .byte(1)
                .u16(140)
                .byte(0xff)
                .byte(0)
                .finish(),
        ),
        (
            "response-sender-flipped",
            Writer::new()
                .byte(2)
                .byte(1)
                .u16(5)
                .byte(1)
                .byte(0)
                .finish(),
        ),
        (
            "cookie-receiver-flipped",
            Writer::new()
                .byte(3)
                .byte(1)
                .u16(4)
                .byte(9)
                .byte(0)
                .finish(),
        ),
        (
            "initiation-truncated",
            Writer::new().byte(1).byte(0).byte(1).byte(100).finish(),
        ),
    ]
}
