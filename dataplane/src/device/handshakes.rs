//! The handshake queue, apart from data: the UDP threads copy handshake
//! messages (initiation, response, cookie reply) into a fixed number of slots and go on with
//! data, so no data packet waits behind a handshake flood; one handshake thread (in
//! `workers`), at a lower priority than the data threads, takes them out in batches. A message that finds every
//! slot taken is dropped and counted (`handshake_queue_full`): the queue, not the sender,
//! bounds the handshake work. How full the queue is says whether the device is under load
//! ([`LoadPolicy`]), which makes the engine answer with cookie replies instead of doing a
//! Diffie-Hellman. The kernel's design: a 4,096-message queue, under load from an eighth
//! full and for a second after.
//!
//! ```text
//!  udp thread        datagram of type 1, 2 or 3 ─► free slot? ─► copy ─► queued
//!                                                   └─ none ─► drop (handshake_queue_full)
//!  handshake thread  queued (a batch) ─► under load? (LoadPolicy) ─► engine ─► UDP sends
//!                    ─► slots back to free
//! ```

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::engine::messages::{is_handshake, INITIATION_LEN};

/// Handshake messages that may wait (the kernel's `MAX_QUEUED_INCOMING_HANDSHAKES`).
pub(crate) const CAPACITY: usize = 4096;
/// Queued messages from which the device is under load (the kernel's: an eighth).
const LOADED_FROM: usize = CAPACITY / 8;
/// How long the device stays under load after the queue was last that full.
const LOAD_HOLD_MS: u64 = 1000;
/// Messages the handshake thread takes per engine batch.
pub(super) const BATCH: usize = 64;
/// The handshake thread's nice value: data threads (nice 0) get ~10 times its CPU share
/// when they compete, so a flood costs the data path little more than receiving it.
pub(super) const NICE: libc::c_int = 10;
/// How often the thread wakes to notice a stop request.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Whether a datagram goes to the handshake queue: a handshake type, no longer than the
/// largest handshake message (a longer one is malformed: the UDP thread drops it itself).
pub(crate) fn belongs_here(datagram: &[u8]) -> bool {
    is_handshake(datagram) && datagram.len() <= INITIATION_LEN
}

/// One queued handshake message.
pub(crate) struct Handshake {
    pub(super) from: SocketAddr,
    pub(super) local_ip: Option<IpAddr>,
    len: usize,
    bytes: [u8; INITIATION_LEN],
}

impl Handshake {
    pub(super) fn datagram(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// See the module documentation. Slots travel between two bounded channels (free and
/// queued), so a message in and out allocates nothing.
pub(crate) struct HandshakeQueue {
    queued_tx: Sender<Box<Handshake>>,
    queued_rx: Receiver<Box<Handshake>>,
    free_tx: Sender<Box<Handshake>>,
    free_rx: Receiver<Box<Handshake>>,
}

impl HandshakeQueue {
    pub(crate) fn new(capacity: usize) -> HandshakeQueue {
        let (queued_tx, queued_rx) = crossbeam_channel::bounded(capacity);
        let (free_tx, free_rx) = crossbeam_channel::bounded(capacity);
        for _ in 0..capacity {
            let slot = Box::new(Handshake {
                from: SocketAddr::from(([0, 0, 0, 0], 0)),
                local_ip: None,
                len: 0,
                bytes: [0; INITIATION_LEN],
            });
            let _ = free_tx.try_send(slot);
        }
        HandshakeQueue {
            queued_tx,
            queued_rx,
            free_tx,
            free_rx,
        }
    }

    /// Copies a handshake message in (one that [`belongs_here`]); false when the queue is
    /// full (the caller counts the drop).
    pub(crate) fn offer(
        &self,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        datagram: &[u8],
    ) -> bool {
        let Some(bytes) = Some(datagram).filter(|d| d.len() <= INITIATION_LEN) else {
            return false;
        };
        let Ok(mut slot) = self.free_rx.try_recv() else {
            return false;
        };
        slot.from = from;
        slot.local_ip = local_ip;
        slot.len = bytes.len();
        slot.bytes[..bytes.len()].copy_from_slice(bytes);
        match self.queued_tx.try_send(slot) {
            Ok(()) => true,
            Err(e) => {
                // Cannot happen (as many slots as room), but a slot is never lost.
                let _ = self.free_tx.try_send(e.into_inner());
                false
            }
        }
    }

    /// Messages waiting.
    pub(crate) fn len(&self) -> usize {
        self.queued_rx.len()
    }

    pub(super) fn recv_timeout(&self, timeout: Duration) -> Option<Box<Handshake>> {
        self.queued_rx.recv_timeout(timeout).ok()
    }

    pub(super) fn try_recv(&self) -> Option<Box<Handshake>> {
        self.queued_rx.try_recv().ok()
    }

    pub(super) fn recycle(&self, slot: Box<Handshake>) {
        let _ = self.free_tx.try_send(slot);
    }
}

/// Under load from [`LOADED_FROM`] queued messages, and for [`LOAD_HOLD_MS`] after: a flood
/// that the queue absorbs in bursts keeps getting cookie replies between them.
#[derive(Debug, Default)]
pub(crate) struct LoadPolicy {
    /// When the queue was last found loaded (engine ms).
    loaded_at_ms: Option<u64>,
}

impl LoadPolicy {
    /// Whether the device is under load with `queued` messages waiting at `now_ms`.
    pub(crate) fn under_load(&mut self, queued: usize, now_ms: u64) -> bool {
        if queued >= LOADED_FROM {
            self.loaded_at_ms = Some(now_ms);
            return true;
        }
        match self.loaded_at_ms {
            Some(at) if now_ms.saturating_sub(at) < LOAD_HOLD_MS => true,
            _ => {
                self.loaded_at_ms = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "198.18.0.9:4000".parse().unwrap()
    }

    #[test]
    fn a_full_queue_refuses_and_gives_every_slot_back() {
        let queue = HandshakeQueue::new(4);
        for n in 0..4u8 {
            assert!(queue.offer(addr(), None, &[1, 0, 0, 0, n]));
        }
        assert!(!queue.offer(addr(), None, &[1, 0, 0, 0, 9]), "full");
        assert_eq!(queue.len(), 4);
        let first = queue.try_recv().unwrap();
        assert_eq!(first.datagram(), &[1, 0, 0, 0, 0], "in order");
        assert_eq!(first.from, addr());
        // Taken but not yet recycled: the slot is still in use.
        assert!(!queue.offer(addr(), None, &[1, 0, 0, 0, 9]));
        queue.recycle(first);
        assert!(queue.offer(addr(), None, &[2, 0, 0, 0, 5]));
        let mut seen = Vec::new();
        while let Some(slot) = queue.try_recv() {
            seen.push(slot.datagram()[4]);
            queue.recycle(slot);
        }
        assert_eq!(seen, [1, 2, 3, 5]);
        assert!(queue.offer(addr(), None, &[1, 0, 0, 0, 9]));
    }

    #[test]
    fn only_handshake_messages_that_fit_a_slot_belong_here() {
        let mut init = [0u8; INITIATION_LEN];
        init[0] = 1;
        assert!(belongs_here(&init));
        let mut long = [0u8; INITIATION_LEN + 1];
        long[0] = 1;
        assert!(!belongs_here(&long));
        let mut data = [0u8; INITIATION_LEN];
        data[0] = 4;
        assert!(!belongs_here(&data));
        let queue = HandshakeQueue::new(1);
        assert!(!queue.offer(addr(), None, &long), "never truncated");
    }

    #[test]
    fn under_load_from_an_eighth_full_and_for_a_second_after() {
        let mut policy = LoadPolicy::default();
        assert!(!policy.under_load(0, 0));
        assert!(!policy.under_load(LOADED_FROM - 1, 10));
        assert!(policy.under_load(LOADED_FROM, 20));
        // Drained, yet still loaded for a second.
        assert!(policy.under_load(0, 500));
        assert!(policy.under_load(1, 1019));
        assert!(!policy.under_load(1, 1020));
        assert!(!policy.under_load(0, 1021));
        // Loaded again renews the second.
        assert!(policy.under_load(CAPACITY, 5000));
        assert!(policy.under_load(LOADED_FROM, 5900));
        assert!(policy.under_load(0, 6899));
        assert!(!policy.under_load(0, 6900));
    }
}
