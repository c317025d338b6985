//! WireGuard's timer rules, stepped: two engines back to back, time passed in through
//! `tick`, assertions on what goes out and on counters — no sleeps. Every rule runs on engine
//! time (`crate::noise`'s timers and the engine's persistent keepalive).

use std::time::{Duration, Instant};

use crate::engine::messages::{DATA_OVERHEAD, INITIATION_LEN, MESSAGE_DATA};
use crate::stats::DropReason;
use crate::testing::{established_pair, pump, Capture, Node};

/// The protocol's constants (shared/reference/wireguard-protocol.md), in seconds.
const REKEY_AFTER_TIME: u64 = 120;
const REJECT_AFTER_TIME: u64 = 180;
const REKEY_ATTEMPT_TIME: u64 = 90;
const REKEY_TIMEOUT: u64 = 5;
const KEEPALIVE_TIMEOUT: u64 = 10;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ping(src: &str, dst: &str, seq: u16) -> Vec<u8> {
    super::ping_v4(src, dst, seq, 56)
}

/// A → B and B → A pods of the fixture's pair.
fn ping_ab(seq: u16) -> Vec<u8> {
    ping("198.19.1.2", "198.19.2.2", seq)
}

fn ping_ba(seq: u16) -> Vec<u8> {
    ping("198.19.2.2", "198.19.1.2", seq)
}

fn keepalives(out: &Capture) -> usize {
    out.sent
        .iter()
        .filter(|(_, d)| d.len() == DATA_OVERHEAD && d[0] == MESSAGE_DATA)
        .count()
}

fn initiations(out: &Capture) -> usize {
    out.sent
        .iter()
        .filter(|(_, d)| d.len() == INITIATION_LEN && d[0] == 1)
        .count()
}

fn established() -> (Node, Node) {
    established_pair(Instant::now(), &ping_ab(0))
}

/// Whether `node` holds any session with the peer `key`.
fn has_session(node: &Node, key: &crate::key::Key) -> bool {
    let config = node.engine.config.read();
    config
        .by_key
        .get(key)
        .and_then(|&slot| config.peer(slot))
        .is_some_and(|peer| peer.state.lock().noise.has_session())
}

/// Ticks both nodes at `t` seconds; returns what each sent.
fn tick_both(a: &mut Node, b: &mut Node, t: u64) -> (Capture, Capture) {
    (a.tick(secs(t)), b.tick(secs(t)))
}

/// Ticks both nodes at `t` seconds and delivers what they send to each other.
fn tick_and_deliver(a: &mut Node, b: &mut Node, t: u64) {
    let (out_a, out_b) = tick_both(a, b, t);
    pump(a, b, out_a, true);
    pump(a, b, out_b, false);
}

#[test]
fn persistent_keepalive_counts_from_the_last_datagram_sent() {
    let (mut a, mut b) = established();
    let mut keepalive = crate::config::PeerUpdate::new(b.public);
    keepalive.persistent_keepalive = Some(25);
    assert!(a.apply(&crate::config::DeviceUpdate {
        peers: vec![keepalive],
        ..Default::default()
    }));
    // Switched on: one at once.
    let out = a.tick(secs(1));
    assert_eq!(keepalives(&out), 1);
    pump(&mut a, &mut b, out, true);
    // b answers a's first packet with its passive keepalive at 10 s.
    tick_and_deliver(&mut a, &mut b, 10);
    // Data both ways at 11 s: a's reply to b's data is its passive keepalive at 21 s, and
    // the persistent interval counts from there: nothing at 45 s, one at 46 s.
    a.tick(secs(11));
    b.tick(secs(11));
    let data = a.tun_in(&ping_ab(1));
    let (_, b_tun) = pump(&mut a, &mut b, data, true);
    assert_eq!(b_tun.len(), 1);
    let reply = b.tun_in(&ping_ba(1));
    let (a_tun, _) = pump(&mut a, &mut b, reply, false);
    assert_eq!(a_tun.len(), 1);
    assert_eq!(
        a.tick(secs(20)).sent.len(),
        0,
        "the data at 11 s counts as sent"
    );
    let out = a.tick(secs(21));
    assert_eq!(keepalives(&out), 1, "KEEPALIVE_TIMEOUT after b's data");
    // The keepalive is authentic at b and counted there, nothing reaches b's TUN.
    let before = b.peer(&a.public).rx_bytes;
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert!(b_tun.is_empty());
    assert_eq!(b.peer(&a.public).rx_bytes, before + DATA_OVERHEAD as u64);
    // And on: every 25 s while nothing else goes out.
    for (t, expected) in [(45, 0), (46, 1), (70, 0), (71, 1)] {
        let out = a.tick(secs(t));
        assert_eq!(keepalives(&out), expected, "at {t} s");
    }
}

/// a's first packet starts a handshake that b never answers; returns the engine times (ms)
/// of a's initiations, ticking every 100 ms up to `until` seconds.
fn unanswered_initiations(until: u64) -> (Node, Vec<u64>) {
    let (mut a, _b) = crate::testing::pair(Instant::now());
    let out = a.tun_in(&ping_ab(0));
    assert_eq!(initiations(&out), 1, "the first packet starts a handshake");
    let mut at = vec![0];
    for ms in (100..=until * 1000).step_by(100) {
        let out = a.tick(Duration::from_millis(ms));
        assert!(initiations(&out) <= 1);
        if initiations(&out) == 1 {
            at.push(ms);
        }
    }
    (a, at)
}

#[test]
fn rekey_timeout_retransmits_an_unanswered_initiation_with_jitter() {
    let (a, at) = unanswered_initiations(30);
    assert!(at.len() >= 5, "{at:?}");
    for gap in at.windows(2).map(|w| w[1] - w[0]) {
        // REKEY_TIMEOUT plus up to 333 ms of jitter, seen at the next 100 ms tick.
        assert!(
            (REKEY_TIMEOUT * 1000..=REKEY_TIMEOUT * 1000 + 400).contains(&gap),
            "retries at {at:?}"
        );
    }
    assert_eq!(
        a.peers()[0].tx_bytes,
        at.len() as u64 * INITIATION_LEN as u64,
        "every initiation counted"
    );
}

#[test]
fn rekey_attempt_time_gives_up_and_a_new_packet_starts_again() {
    let (mut a, at) = unanswered_initiations(REKEY_ATTEMPT_TIME + 60);
    // 18 initiations in all (REKEY_ATTEMPT_TIME / REKEY_TIMEOUT), the last before ~96 s.
    assert_eq!(
        at.len() as u64,
        REKEY_ATTEMPT_TIME / REKEY_TIMEOUT,
        "{at:?}"
    );
    assert!(*at.last().unwrap() < (REKEY_ATTEMPT_TIME + 6) * 1000);
    // The packet that waited for it is dropped when it gives up.
    assert_eq!(a.drops(DropReason::NoSession), 1);
    // A packet to send is an explicit reason to try again.
    let out = a.tun_in(&ping_ab(1));
    assert_eq!(initiations(&out), 1);
}

#[test]
fn rekey_after_time_makes_the_initiator_handshake_again() {
    let (mut a, mut b) = established();
    let first = a.peer(&b.public).last_handshake;
    // Traffic both ways every second: no keepalive or other rule interferes.
    for t in 1..=REKEY_AFTER_TIME + 5 {
        let (out_a, out_b) = tick_both(&mut a, &mut b, t);
        let expected = usize::from(t == REKEY_AFTER_TIME);
        assert_eq!(initiations(&out_a), expected, "a's initiations at {t} s");
        assert_eq!(
            initiations(&out_b),
            0,
            "the responder does not rekey ({t} s)"
        );
        let (a_tun, b_tun) = pump(&mut a, &mut b, out_a, true);
        assert!(a_tun.is_empty() && b_tun.is_empty());
        let (_, b_tun) = {
            let out = a.tun_in(&ping_ab(t as u16));
            pump(&mut a, &mut b, out, true)
        };
        assert_eq!(b_tun.len(), 1, "a → b at {t} s");
        let (a_tun, _) = {
            let out = b.tun_in(&ping_ba(t as u16));
            pump(&mut a, &mut b, out, false)
        };
        assert_eq!(a_tun.len(), 1, "b → a at {t} s");
    }
    // The new handshake is reported with its engine time, on both sides (b's once a's
    // first message on the new session confirmed it).
    let rekeyed = a.peer(&b.public).last_handshake;
    assert_eq!(
        rekeyed.and_then(|r| r.duration_since(first?).ok()),
        Some(secs(REKEY_AFTER_TIME))
    );
    assert_eq!(b.peer(&a.public).last_handshake, rekeyed);
}

#[test]
fn reject_after_time_ends_a_session() {
    let (mut a, mut b) = established();
    // Two data messages of the fresh session, held back.
    let early = a.tun_in(&ping_ab(1));
    let late = a.tun_in(&ping_ab(2));
    assert_eq!(early.sent[0].1[0], MESSAGE_DATA);
    // Time passes with nothing delivered (keepalives and retries are lost).
    for t in 1..REJECT_AFTER_TIME {
        tick_both(&mut a, &mut b, t);
    }
    assert_eq!(
        b.net_in(a.addr, &early.sent[0].1).tun.len(),
        1,
        "just inside REJECT_AFTER_TIME the session still decrypts"
    );
    tick_both(&mut a, &mut b, REJECT_AFTER_TIME + 1);
    let rejected = b.net_in(a.addr, &late.sent[0].1);
    assert!(
        rejected.tun.is_empty(),
        "past REJECT_AFTER_TIME it does not"
    );
    assert_eq!(b.drops(DropReason::NoSession), 1);
    // And a no longer encrypts with it: a packet waits for a new handshake.
    let out = a.tun_in(&ping_ab(3));
    assert!(
        out.sent.iter().all(|(_, d)| d[0] != MESSAGE_DATA),
        "no data message on an expired session"
    );
}

#[test]
fn keepalive_timeout_answers_data_that_got_no_reply() {
    let (mut a, mut b) = established();
    tick_both(&mut a, &mut b, 1);
    let (_, b_tun) = {
        let out = a.tun_in(&ping_ab(1));
        pump(&mut a, &mut b, out, true)
    };
    assert_eq!(b_tun.len(), 1);
    // b got data at 0 s and 1 s and sent nothing back: a keepalive KEEPALIVE_TIMEOUT after
    // the first.
    let mut sent_by_b = Vec::new();
    for t in 2..=3 * KEEPALIVE_TIMEOUT {
        let (out_a, out_b) = tick_both(&mut a, &mut b, t);
        assert!(
            out_a.sent.is_empty(),
            "a hears back in time: no new handshake ({t} s)"
        );
        if keepalives(&out_b) > 0 {
            sent_by_b.push(t);
        }
        assert_eq!(initiations(&out_b), 0);
        pump(&mut a, &mut b, out_b, false);
    }
    assert_eq!(sent_by_b, vec![KEEPALIVE_TIMEOUT], "one keepalive, once");
}

#[test]
fn a_reply_in_time_means_no_passive_keepalive() {
    let (mut a, mut b) = established();
    tick_both(&mut a, &mut b, 1);
    {
        let out = a.tun_in(&ping_ab(1));
        pump(&mut a, &mut b, out, true)
    };
    tick_both(&mut a, &mut b, 5);
    let (a_tun, _) = {
        let out = b.tun_in(&ping_ba(1));
        pump(&mut a, &mut b, out, false)
    };
    assert_eq!(a_tun.len(), 1);
    for t in 6..=3 * KEEPALIVE_TIMEOUT {
        let (out_a, out_b) = tick_both(&mut a, &mut b, t);
        assert_eq!(keepalives(&out_b), 0, "b replied at 5 s ({t} s)");
        pump(&mut a, &mut b, out_a, true);
    }
}

#[test]
fn data_without_any_answer_starts_a_new_handshake() {
    // KEEPALIVE_TIMEOUT + REKEY_TIMEOUT after a's data with nothing heard back, a
    // assumes the session is dead and handshakes again. (The established pair's first
    // packet, at 0 s, is still unanswered.)
    let (mut a, _b) = established();
    a.tick(secs(1));
    let lost = a.tun_in(&ping_ab(1));
    assert_eq!(lost.sent.len(), 1);
    let mut at = Vec::new();
    for t in 2..=30 {
        let out_a = a.tick(secs(t));
        if initiations(&out_a) > 0 {
            at.push(t);
        }
    }
    assert_eq!(at.first(), Some(&(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)));
}

#[test]
fn keys_are_dropped_after_three_reject_after_times_of_silence() {
    let (mut a, mut b) = established();
    // b's passive keepalive answers a's packet; then silence.
    tick_and_deliver(&mut a, &mut b, KEEPALIVE_TIMEOUT);
    for t in KEEPALIVE_TIMEOUT + 1..3 * REJECT_AFTER_TIME {
        let (out_a, out_b) = tick_both(&mut a, &mut b, t);
        assert!(
            out_a.sent.is_empty() && out_b.sent.is_empty(),
            "silence ({t} s)"
        );
    }
    assert!(has_session(&a, &b.public));
    tick_both(&mut a, &mut b, 3 * REJECT_AFTER_TIME);
    assert!(!has_session(&a, &b.public), "a's keys are gone");
    assert!(!has_session(&b, &a.public), "b's keys are gone");
}
