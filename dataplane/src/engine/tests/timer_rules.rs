//! WireGuard's timer rules, stepped: two engines back to back, time passed in through
//! `tick`, assertions on what goes out and on counters — no sleeps.
//!
//! Persistent keepalive is the engine's own rule on engine time and is tested always. The
//! others (REKEY_TIMEOUT, REKEY_ATTEMPT_TIME, REKEY_AFTER_TIME, REJECT_AFTER_TIME,
//! KEEPALIVE_TIMEOUT) run inside boringtun's `Tunn`, on boringtun's clock: they can only be
//! stepped with the `boringtun-mock-clock` feature, which makes engine time boringtun's
//! time (`cargo test -p tailsk8s-dataplane --features boringtun-mock-clock`; scripts/test
//! runs it). Without it they would need minutes of real time, so they are not compiled.

use std::time::{Duration, Instant};

use crate::engine::messages::{DATA_OVERHEAD, MESSAGE_DATA};
use crate::testing::{established_pair, pump, Capture, Node};

/// The protocol's constants (shared/reference/wireguard-protocol.md), in seconds.
#[cfg(feature = "boringtun-mock-clock")]
mod protocol {
    pub const REKEY_AFTER_TIME: u64 = 120;
    pub const REJECT_AFTER_TIME: u64 = 180;
    pub const REKEY_ATTEMPT_TIME: u64 = 90;
    pub const REKEY_TIMEOUT: u64 = 5;
    pub const KEEPALIVE_TIMEOUT: u64 = 10;
}

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

fn keepalives(out: &Capture) -> usize {
    out.sent
        .iter()
        .filter(|(_, d)| d.len() == DATA_OVERHEAD && d[0] == MESSAGE_DATA)
        .count()
}

fn established() -> (Node, Node) {
    established_pair(Instant::now(), &ping_ab(0))
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
    assert_eq!(keepalives(&a.tick(secs(1))), 1);
    // Data at 10 s (answered, so no other rule wants a handshake) restarts the interval:
    // nothing at 26 s, one at 35 s.
    a.tick(secs(10));
    b.tick(secs(10));
    let data = a.tun_in(&ping_ab(1));
    let (_, b_tun) = pump(&mut a, &mut b, data, true);
    assert_eq!(b_tun.len(), 1);
    let reply = b.tun_in(&ping("198.19.2.2", "198.19.1.2", 1));
    let (a_tun, _) = pump(&mut a, &mut b, reply, false);
    assert_eq!(a_tun.len(), 1);
    assert_eq!(
        a.tick(secs(26)).sent.len(),
        0,
        "the data at 10 s counts as sent"
    );
    let out = a.tick(secs(35));
    assert_eq!(keepalives(&out), 1, "25 s after the last datagram");
    // The keepalive is authentic at b and counted there, nothing reaches b's TUN.
    let before = b.peer(&a.public).rx_bytes;
    let (_, b_tun) = pump(&mut a, &mut b, out, true);
    assert!(b_tun.is_empty());
    assert_eq!(b.peer(&a.public).rx_bytes, before + DATA_OVERHEAD as u64);
    // And on: every 25 s while nothing else goes out.
    for (t, expected) in [(59, 0), (60, 1), (84, 0), (85, 1)] {
        let out = a.tick(secs(t));
        assert_eq!(keepalives(&out), expected, "at {t} s");
    }
}

#[cfg(feature = "boringtun-mock-clock")]
mod boringtun_rules {
    use super::protocol::*;
    use super::*;
    use crate::engine::messages::INITIATION_LEN;
    use crate::stats::DropReason;

    fn ping_ba(seq: u16) -> Vec<u8> {
        ping("198.19.2.2", "198.19.1.2", seq)
    }

    fn initiations(out: &Capture) -> usize {
        out.sent
            .iter()
            .filter(|(_, d)| d.len() == INITIATION_LEN && d[0] == 1)
            .count()
    }

    /// Ticks both nodes at `t` seconds; returns what each sent.
    fn tick_both(a: &mut Node, b: &mut Node, t: u64) -> (Capture, Capture) {
        (a.tick(secs(t)), b.tick(secs(t)))
    }

    /// a's first packet starts a handshake that b never answers; returns, per second from
    /// 1 s to `until`, how many initiations a's timers sent.
    fn unanswered_initiations(until: u64) -> (Node, Vec<usize>) {
        let (mut a, _b) = crate::testing::pair(Instant::now());
        let out = a.tun_in(&ping_ab(0));
        assert_eq!(initiations(&out), 1, "the first packet starts a handshake");
        let per_second = (1..=until).map(|t| initiations(&a.tick(secs(t)))).collect();
        (a, per_second)
    }

    #[test]
    fn rekey_timeout_retransmits_an_unanswered_initiation() {
        let (a, per_second) = unanswered_initiations(30);
        let at: Vec<u64> = (1..=30u64)
            .filter(|t| per_second[*t as usize - 1] > 0)
            .collect();
        let expected: Vec<u64> = (1..=30u64).filter(|t| t % REKEY_TIMEOUT == 0).collect();
        assert_eq!(at, expected, "one initiation every REKEY_TIMEOUT");
        assert!(per_second.iter().all(|&n| n <= 1));
        assert_eq!(
            a.peers()[0].tx_bytes,
            (1 + expected.len() as u64) * INITIATION_LEN as u64,
            "every initiation counted"
        );
    }

    #[test]
    fn rekey_attempt_time_gives_up_and_a_new_packet_starts_again() {
        let (mut a, per_second) = unanswered_initiations(REKEY_ATTEMPT_TIME + 60);
        let sent_until = |t: u64| per_second[..t as usize].iter().sum::<usize>();
        // Retransmits at 5, 10 … 85 s; at REKEY_ATTEMPT_TIME (90 s) it gives up.
        let retransmits = (REKEY_ATTEMPT_TIME - 1) / REKEY_TIMEOUT;
        assert_eq!(sent_until(REKEY_ATTEMPT_TIME), retransmits as usize);
        assert_eq!(
            sent_until(REKEY_ATTEMPT_TIME + 60),
            retransmits as usize,
            "nothing after REKEY_ATTEMPT_TIME"
        );
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
        // The new handshake is reported with its engine time.
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
        // b last sent at 0 s (its handshake response): a keepalive is due at KEEPALIVE_TIMEOUT.
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
            let (_, out_b) = tick_both(&mut a, &mut b, t);
            assert_eq!(keepalives(&out_b), 0, "b replied at 5 s ({t} s)");
        }
    }

    #[test]
    fn data_without_any_answer_starts_a_new_handshake() {
        // KEEPALIVE_TIMEOUT + REKEY_TIMEOUT after a's data with nothing heard back, a
        // assumes the session is dead and handshakes again.
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
}
