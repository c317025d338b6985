//! This crate's handshake against boringtun 0.7.1's, in both roles, with and without a
//! pre-shared key, through cookies under load, down to data messages sealed with the agreed
//! keys in each direction: an independent implementation agreeing byte for byte is what
//! shows the key schedule right.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use tailsk8s_noise::primitives::{open, seal, tai64n, TAG_LEN};
use tailsk8s_noise::{
    consume_initiation, consume_response, cookie, initiate, respond, Identity, Peer, Session,
};
use x25519_dalek::{PublicKey, StaticSecret};

const OURS: [u8; 32] = [0x11; 32];
const THEIRS: [u8; 32] = [0x22; 32];
const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));

fn now() -> [u8; 12] {
    tai64n(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970"),
    )
}

fn ephemeral(seed: u8) -> StaticSecret {
    StaticSecret::from([seed; 32])
}

/// A minimal IPv4 packet (boringtun reads its version, length and source).
fn packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[12..16].copy_from_slice(&[198, 19, 1, 2]);
    p[16..20].copy_from_slice(&[198, 19, 2, 2]);
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// A data message from us under `session`.
fn data_message(session: &Session, counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 16 + payload.len() + TAG_LEN];
    m[0] = 4;
    m[4..8].copy_from_slice(&session.remote_index.to_le_bytes());
    m[8..16].copy_from_slice(&counter.to_le_bytes());
    m[16..16 + payload.len()].copy_from_slice(payload);
    seal(&session.send_key, counter, &[], &mut m[16..], payload.len());
    m
}

/// Opens a data message to us under `session`: (counter, payload).
fn open_data(session: &Session, m: &[u8]) -> (u64, Vec<u8>) {
    assert_eq!(m[0], 4, "a data message");
    assert_eq!(
        u32::from_le_bytes(m[4..8].try_into().unwrap()),
        session.local_index
    );
    let counter = u64::from_le_bytes(m[8..16].try_into().unwrap());
    let len = m.len() - 16 - TAG_LEN;
    let mut body = m[16..].to_vec();
    assert!(
        open(&session.receive_key, counter, &[], &mut body, len),
        "the data message opens"
    );
    body.truncate(len);
    (counter, body)
}

/// Data both ways between us (`session`) and boringtun (`tunn`), us first.
fn exchange_data(session: &Session, tunn: &mut Tunn, our_counter: u64) {
    let mut buf = vec![0u8; 2048];
    let p = packet(1420);
    let m = data_message(session, our_counter, &p);
    match tunn.decapsulate(Some(SOURCE), &m, &mut buf) {
        TunnResult::WriteToTunnelV4(got, _) => assert_eq!(got, &p[..]),
        _ => panic!("boringtun did not take our data message"),
    }
    let back = packet(100);
    let m = match tunn.encapsulate(&back, &mut buf) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => panic!("boringtun made no data message"),
    };
    assert_eq!(open_data(session, &m).1, back);
}

/// Us (our identity and boringtun's node as our peer, with `our_psk`) and boringtun's tunnel
/// to us (with `their_psk`, and `limited`: a rate limiter that puts it always under load).
fn parties(
    our_psk: Option<[u8; 32]>,
    their_psk: Option<[u8; 32]>,
    limited: bool,
) -> (Identity, Peer, Tunn) {
    let us = Identity::new(StaticSecret::from(OURS));
    let them_secret = StaticSecret::from(THEIRS);
    let them_public = PublicKey::from(&them_secret);
    let peer = Peer::new(&us, them_public, our_psk);
    // A limit of zero handshakes per second: always under load.
    let limiter = limited.then(|| Arc::new(RateLimiter::new(&them_public, 0)));
    let tunn = Tunn::new(them_secret, *us.public(), their_psk, None, 7, limiter);
    (us, peer, tunn)
}

/// We initiate, boringtun answers: the session we then hold, and boringtun's side.
fn we_initiate(psk: Option<[u8; 32]>) -> (Session, Tunn) {
    let (us, peer, mut tunn) = parties(psk, psk, false);
    let (init, initiated) = initiate(&us, &peer, 0x1234, ephemeral(3), now(), None).unwrap();
    let mut buf = vec![0u8; 2048];
    let response = match tunn.decapsulate(Some(SOURCE), &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        _ => panic!("boringtun did not answer our initiation"),
    };
    let session = consume_response(&us, &peer, &initiated, &response).unwrap();
    assert_eq!(session.local_index, 0x1234);
    (session, tunn)
}

fn they_initiate(psk: Option<[u8; 32]>) {
    let (us, peer, mut tunn) = parties(psk, psk, false);
    let mut buf = vec![0u8; 2048];
    let init = match tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => panic!("no initiation from boringtun"),
    };
    let (seen, found) =
        consume_initiation(&us, &init, |k| (k == peer.public()).then_some(&peer)).unwrap();
    assert_eq!(&seen.peer, peer.public());
    let (response, session) = respond(found, &seen, 0x5678, ephemeral(4), None).unwrap();
    // boringtun confirms the session with a keepalive (an empty data message).
    match tunn.decapsulate(Some(SOURCE), &response, &mut buf) {
        TunnResult::WriteToNetwork(keepalive) => {
            let (counter, payload) = open_data(&session, keepalive);
            assert_eq!((counter, payload.len()), (0, 0));
        }
        _ => panic!("boringtun did not complete the handshake"),
    }
    exchange_data(&session, &mut tunn, 0);
}

#[test]
fn our_initiation_is_answered_by_boringtun_and_data_flows() {
    for psk in [None, Some([0x77; 32])] {
        let (session, mut tunn) = we_initiate(psk);
        exchange_data(&session, &mut tunn, 0);
    }
}

#[test]
fn boringtuns_initiation_is_answered_by_us_and_data_flows() {
    they_initiate(None);
    they_initiate(Some([0x77; 32]));
}

#[test]
fn a_mismatched_psk_fails_the_response() {
    let (us, peer, mut tunn) = parties(Some([1; 32]), Some([2; 32]), false);
    let (init, initiated) = initiate(&us, &peer, 1, ephemeral(3), now(), None).unwrap();
    let mut buf = vec![0u8; 2048];
    // The initiation carries no PSK yet: boringtun answers; the response does not open.
    let response = match tunn.decapsulate(Some(SOURCE), &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        _ => panic!("boringtun did not answer"),
    };
    assert!(consume_response(&us, &peer, &initiated, &response).is_err());
}

#[test]
fn boringtun_under_load_sends_a_cookie_we_open_and_then_accepts_our_mac2() {
    let (us, peer, mut tunn) = parties(None, None, true);
    let mut buf = vec![0u8; 2048];
    let (init, initiated) = initiate(&us, &peer, 9, ephemeral(3), now(), None).unwrap();
    let reply = match tunn.decapsulate(Some(SOURCE), &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        _ => panic!("no cookie reply"),
    };
    assert_eq!(reply[0], 3, "a cookie reply, not a response");
    assert!(
        cookie::consume_reply(&peer, &[0; 16], &reply).is_err(),
        "bound to our MAC1"
    );
    let cookie = cookie::consume_reply(&peer, &initiated.mac1, &reply).unwrap();
    let (init, initiated) = initiate(&us, &peer, 10, ephemeral(5), now(), Some(&cookie)).unwrap();
    let response = match tunn.decapsulate(Some(SOURCE), &init, &mut buf) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        _ => panic!("boringtun refused our MAC2"),
    };
    assert_eq!(response[0], 2, "a handshake response");
    let session = consume_response(&us, &peer, &initiated, &response).unwrap();
    exchange_data(&session, &mut tunn, 0);
}

#[test]
fn boringtun_takes_our_cookie_and_proves_its_address_with_mac2() {
    let (us, peer, mut tunn) = parties(None, None, false);
    let mut buf = vec![0u8; 2048];
    let init = match tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => panic!("no initiation"),
    };
    assert!(
        !cookie::mac2_valid(&init, &[0; 16]),
        "no cookie yet: MAC2 is zero"
    );
    let secret = [0x42; 32];
    let earned = cookie::cookie_for(&secret, &[198, 18, 0, 2, 0xca, 0x6c]);
    let reply = cookie::reply(&us, &init, &earned, [0x99; 24]).unwrap();
    assert!(matches!(
        tunn.decapsulate(Some(SOURCE), &reply, &mut buf),
        TunnResult::Done
    ));
    let again = match tunn.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => panic!("no second initiation"),
    };
    assert!(cookie::mac2_valid(&again, &earned));
    assert!(!cookie::mac2_valid(
        &again,
        &cookie::cookie_for(&secret, &[198, 18, 0, 3, 0xca, 0x6c])
    ));
    let (seen, found) =
        consume_initiation(&us, &again, |k| (k == peer.public()).then_some(&peer)).unwrap();
    let (response, session) = respond(found, &seen, 0x9abc, ephemeral(6), None).unwrap();
    match tunn.decapsulate(Some(SOURCE), &response, &mut buf) {
        TunnResult::WriteToNetwork(keepalive) => assert_eq!(open_data(&session, keepalive).0, 0),
        _ => panic!("boringtun did not complete the handshake"),
    }
}

#[test]
fn transport_seals_in_place_for_boringtun_and_opens_its_messages_in_an_8128_window() {
    use std::time::Instant;
    use tailsk8s_noise::replay::{ReplayError, WINDOW};
    use tailsk8s_noise::transport::{Transport, TransportError, HEADER_LEN};

    let (session, mut tunn) = we_initiate(None);
    let transport = Transport::new(&session, Instant::now());
    let mut out = vec![0u8; 2048];
    // Ours to boringtun: the packet is written where it will be sealed, no copy.
    for n in [20usize, 100, 1420] {
        let p = packet(n);
        let mut buf = vec![0u8; HEADER_LEN + n + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&p);
        let len = transport.seal(Instant::now(), &mut buf, n).unwrap();
        match tunn.decapsulate(Some(SOURCE), &buf[..len], &mut out) {
            TunnResult::WriteToTunnelV4(got, _) => assert_eq!(got, &p[..]),
            _ => panic!("boringtun refused our data message of {n} bytes"),
        }
    }
    // Boringtun's to ours, far out of order: the newest first, then 3,000 older ones — up
    // to 2,999 behind, where boringtun's own 1,024-message window would refuse them.
    let messages: Vec<Vec<u8>> = (0..3000)
        .map(|_| match tunn.encapsulate(&packet(60), &mut out) {
            TunnResult::WriteToNetwork(m) => m.to_vec(),
            _ => panic!("boringtun made no data message"),
        })
        .collect();
    let last = messages.len() - 1;
    for i in std::iter::once(last).chain(0..last) {
        let mut m = messages[i].clone();
        let (counter, plain) = transport.open(Instant::now(), &mut m).unwrap();
        assert_eq!(counter, i as u64);
        assert_eq!(&plain[..60], &packet(60)[..]);
    }
    let mut again = messages[17].clone();
    assert_eq!(
        transport.open(Instant::now(), &mut again).err(),
        Some(TransportError::Replay(ReplayError::Duplicate))
    );
    // Push the greatest WINDOW + 1 past message 0's counter: it is now too old to tell.
    let skip = WINDOW as usize + 1 - messages.len();
    for _ in 0..skip {
        let _ = tunn.encapsulate(&packet(60), &mut out);
    }
    let mut newest = match tunn.encapsulate(&packet(60), &mut out) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => panic!("boringtun made no data message"),
    };
    assert_eq!(
        transport.open(Instant::now(), &mut newest).unwrap().0,
        WINDOW + 1
    );
    let mut oldest = messages[0].clone();
    assert_eq!(
        transport.open(Instant::now(), &mut oldest).err(),
        Some(TransportError::Replay(ReplayError::TooOld))
    );
}
